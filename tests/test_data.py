"""prepare_data: formats, field options, drops and their counts, errors that name the row, eval split, mixing,
the cache, worker processes, file types, the HF Hub path, and `python -m nanotune.data`."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
import tiny_tokenizer as tt  # noqa: E402

from nanotune.config import DataConfig, DatasetConfig  # noqa: E402
from nanotune.data import DataError, RowError, SourceError, TokenizerError, load_tokenizer, prepare_data  # noqa: E402
from nanotune.data.pipeline import describe_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tt.make_tokenizer_folder(tmp_path_factory.mktemp("tok"), "qwen2_5"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(tmp_path, datasets, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(datasets=datasets, **kw)


def trained_text(tok, data, i):
    ids, mask = data.train[i]
    return tok.decode(ids[mask.astype(bool)])


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                  {"role": "assistant", "content": f"It is {2 * i}."}]}
    for i in range(20)
]


# ------------------------------------------------------------------------------------------------ formats


def test_text_format_trains_every_token_and_adds_eos(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello! How can I help you today?"}])
    data = prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format="text")]), tok, quiet=True)
    ids, mask = data.train[0]
    assert ids[-1] == tok.eos_id and mask[0] == 0 and mask[1:].all()  # qwen-style: no BOS, EOS = <|im_end|>
    assert tok.decode(ids[:-1]) == "Hello! How can I help you today?"


@pytest.mark.parametrize("policy,examples,dropped,split,truncated", [
    ("split", 3, 0, 1, 0), ("truncate", 1, 0, 0, 1), ("drop", 0, 1, 0, 0)])
def test_long_text_split_truncated_or_dropped(tmp_path, tok, policy, examples, dropped, split, truncated):
    long = " ".join(["the assistant said it is sunny"] * 6)
    rows = [{"text": long}, {"text": "Add 3 and 5."}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    n = len(tok.encode(long)) + 1  # + EOS
    seq_len = (n + 2) // 3 + 1  # the long row needs 3 windows
    cfg = config(tmp_path, [DatasetConfig(path=str(f), format="text")], seq_len=seq_len, text_too_long=policy)
    data = prepare_data(cfg, tok, quiet=True)
    assert data.stats["rows"] == 2
    assert len(data.train) == examples + 1
    assert data.stats["dropped_rows"] == dropped and data.stats["dropped"].get("too_long", 0) == dropped
    assert data.stats["split_rows"] == split and data.stats["truncated_rows"] == truncated
    assert data.train.lengths.max() <= seq_len
    if policy == "split":  # the windows together are the whole document
        windows = np.flatnonzero(data.train.row_ids() == 0)  # the long row is row 0
        assert len(windows) == 3
        joined = np.concatenate([data.train[i][0] for i in windows])
        assert tok.decode(joined[:-1]) == long


def test_alpaca_masks_the_prompt(tmp_path, tok):
    rows = [{"instruction": "Add 3 and 5.", "input": "", "output": "3 + 5 = 8."},
            {"instruction": "Answer briefly.", "input": "What is 2+2?", "output": "4"}]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format="alpaca")]), tok, quiet=True)
    assert trained_text(tok, data, 0) == "3 + 5 = 8.<|im_end|>"
    assert trained_text(tok, data, 1) == "4<|im_end|>"
    assert "### Input:\nWhat is 2+2?" in tok.decode(data.train[1][0])
    assert "### Input" not in tok.decode(data.train[0][0])


def test_prompt_completion_with_custom_fields_and_train_on_inputs(tmp_path, tok):
    f = write_jsonl(tmp_path / "p.jsonl", [{"q": "What is 2+2? ", "a": "The answer is 4."}])
    ds = DatasetConfig(path=str(f), format="prompt_completion", prompt_field="q", completion_field="a")
    data = prepare_data(config(tmp_path, [ds]), tok, quiet=True)
    # the token " The" holds the prompt's last space and the completion's first letter: it overlaps the
    # completion, so it is trained (the model must learn to emit it after "2+2?")
    assert trained_text(tok, data, 0) == " The answer is 4.<|im_end|>"
    assert tok.decode(data.train[0][0]) == "What is 2+2? The answer is 4.<|im_end|>"
    data = prepare_data(config(tmp_path, [ds], train_on_inputs=True), tok, quiet=True)
    assert data.train[0][1][1:].all()


def test_sharegpt_role_map_and_system_prompt(tmp_path, tok):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello!"}]}
    f = write_jsonl(tmp_path / "s.jsonl", [row])
    ds = DatasetConfig(path=str(f), format="chat", role_map={"bot": "assistant"}, system_prompt="Answer briefly.")
    data = prepare_data(config(tmp_path, [ds]), tok, quiet=True)
    text = tok.decode(data.train[0][0])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert trained_text(tok, data, 0) == "Hello!<|im_end|>"


def test_fields_to_roles(tmp_path, tok):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "What is 2+2?", "answer": "4", "id": 7}])
    ds = DatasetConfig(path=str(f), format="chat", fields_to_roles={"question": "user", "answer": "assistant"})
    data = prepare_data(config(tmp_path, [ds]), tok, quiet=True)
    assert trained_text(tok, data, 0) == "4<|im_end|>"


def test_chat_without_assistant_turn_is_dropped_and_counted(tmp_path, tok):
    rows = CHAT_ROWS[:3] + [{"messages": [{"role": "user", "content": "only a question"}]}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    data = prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True)
    assert data.stats["rows"] == 4 and len(data.train) == 3
    assert data.stats["dropped"] == {"no_turn_to_train": 1}
    assert describe_rows(data.stats) == "4 rows, 1 dropped (no_turn_to_train: 1)"


def test_too_long_chat_rows_dropped_or_truncated(tmp_path, tok):
    long_answer = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": " ".join(["Hello! How can I help you today?"] * 10)}]}
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS[:2] + [long_answer])
    cfg = config(tmp_path, [DatasetConfig(path=str(f))])
    full = prepare_data(cfg, tok, quiet=True).train.lengths
    cfg.seq_len = int(full[2]) - 5  # the short rows fit, the long one does not
    assert full[:2].max() <= cfg.seq_len
    data = prepare_data(cfg, tok, quiet=True)
    assert len(data.train) == 2 and data.stats["dropped"] == {"too_long": 1}
    cfg.too_long = "truncate"
    data = prepare_data(cfg, tok, quiet=True)
    assert len(data.train) == 3 and data.stats["truncated_rows"] == 1 and data.train.lengths.max() == cfg.seq_len


# ------------------------------------------------------------------------------------------------ errors


def test_malformed_json_names_file_and_line(tmp_path, tok):
    f = write_jsonl(tmp_path / "bad.jsonl", [CHAT_ROWS[0], CHAT_ROWS[1], '{"messages": [oops]}'])
    with pytest.raises(RowError, match=r"bad.jsonl:3:15: invalid JSON: Expecting value"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True)


def test_malformed_json_list_file_names_line(tmp_path, tok):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"text": "a"},\n {"text": "b",}\n]\n')
    with pytest.raises(SourceError, match=r"bad.json:3:15: invalid JSON: Expecting property name"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format="text")]), tok, quiet=True)


def test_missing_field_names_field_and_keys(tmp_path, tok):
    f = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "x", "response": "y"}])
    expected = r"m.jsonl:1: row has no field 'output' \(fields present: instruction, response\)"
    with pytest.raises(RowError, match=expected):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format="alpaca")]), tok, quiet=True)


def test_unknown_role_names_role_and_row(tmp_path, tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    f = write_jsonl(tmp_path / "r.jsonl", [CHAT_ROWS[0], row])
    with pytest.raises(RowError, match=r"r.jsonl:2: unknown role 'bot' in message 1.*role_map"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True)


def test_no_rows_left_is_a_clear_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS[:3])
    with pytest.raises(DataError, match=r"no training examples left: 3 rows read, 3 dropped \(too_long: 3\)"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f))], seq_len=4), tok, quiet=True)


def test_bad_options_and_missing_files(tmp_path, tok):
    with pytest.raises(DataError, match="format = 'chatml'"):
        prepare_data(config(tmp_path, [DatasetConfig(path="x.jsonl", format="chatml")]), tok, quiet=True)
    with pytest.raises(SourceError, match=r"data.datasets\[0\].path = '.*nope.jsonl' does not exist"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(tmp_path / "nope.jsonl"))]), tok, quiet=True)
    with pytest.raises(DataError, match="no training data"):
        prepare_data(config(tmp_path, []), tok, quiet=True)


def test_missing_chat_template_is_a_clear_error(tmp_path):
    tok = load_tokenizer(tt.make_tokenizer_folder(tmp_path / "tok", "qwen2_5", template=None))
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS[:1])
    with pytest.raises(DataError, match="has no chat_template.*data.chat_template"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True)
    template = tmp_path / "t.jinja"
    template.write_text((tt.TEMPLATES / "qwen2_5.jinja").read_text())
    data = prepare_data(config(tmp_path, [DatasetConfig(path=str(f))], chat_template=str(template)), tok, quiet=True)
    assert len(data.train) == 1


def test_malformed_json_reports_line_and_column(tmp_path, tok):
    # the column counts characters (as editors do), after a non-ASCII character and a byte-order mark on line 1
    f = tmp_path / "bad.jsonl"
    f.write_text("\ufeff" + json.dumps(CHAT_ROWS[0]) + "\n" + '{"text": "é", "x": tru}\n', encoding="utf-8")
    with pytest.raises(RowError, match=r"bad.jsonl:2:20: invalid JSON: Expecting value"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True)
    f.write_text("\ufeff" + json.dumps(CHAT_ROWS[0]) + "\n", encoding="utf-8")  # a BOM alone is no error
    assert len(prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True).train) == 1


@pytest.mark.parametrize("rows,fmt,looks_like,fields", [
    (CHAT_ROWS[:2], "alpaca", "chat", "messages"),
    ([{"instruction": "Add 2 and 2.", "output": "4"}], "chat", "alpaca", "instruction, output"),
    ([{"prompt": "2+2=", "completion": "4"}], "text", "prompt_completion", "prompt, completion"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}], "prompt_completion", "chat", "conversations"),
])
def test_wrong_format_names_the_format_the_rows_look_like(tmp_path, tok, rows, fmt, looks_like, fields):
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    expected = (f'rows.jsonl:1: the rows look like format = "{looks_like}" \\(fields {fields}\\), but '
                f'data.datasets\\[0\\].format = "{fmt}"; set data.datasets\\[0\\].format = "{looks_like}"')
    with pytest.raises(RowError, match=expected):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format=fmt)]), tok, quiet=True)


def test_wrong_format_of_an_eval_file_names_its_key(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS[:2])
    test = write_jsonl(tmp_path / "test.jsonl", CHAT_ROWS[:2])
    cfg = config(tmp_path, [DatasetConfig(path=str(train))], eval_datasets=[DatasetConfig(path=str(test),
                                                                                          format="alpaca")])
    with pytest.raises(RowError, match=r'set data.eval_datasets\[0\].format = "chat"'):
        prepare_data(cfg, tok, quiet=True)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("blank.jsonl", "\n  \n"), ("e.json", "[]")])
def test_empty_data_file_is_named(tmp_path, tok, name, content):
    full = write_jsonl(tmp_path / "full.jsonl", CHAT_ROWS[:2])
    empty = tmp_path / name
    empty.write_text(content)
    cfg = config(tmp_path, [DatasetConfig(path=str(full)), DatasetConfig(path=str(empty))])
    with pytest.raises(SourceError, match=f"{empty}" + r" (is empty|holds an empty list): no rows to read"):
        prepare_data(cfg, tok, quiet=True)


def test_empty_parquet_file_is_named(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), f)
    with pytest.raises(SourceError, match="e.parquet is empty"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format="text")]), tok, quiet=True)


def test_dropped_rows_are_described_by_reason(tmp_path, tok):
    no_answer = {"messages": [{"role": "user", "content": "only a question"}]}
    long_answer = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": " ".join(["Hello! How can I help you?"] * 20)}]}
    train = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS[:3] + [no_answer, no_answer, long_answer])
    test = write_jsonl(tmp_path / "test.jsonl", CHAT_ROWS[:2] + [no_answer])
    cfg = config(tmp_path, [DatasetConfig(path=str(train))], eval_datasets=[DatasetConfig(path=str(test))], seq_len=128)
    data = prepare_data(cfg, tok, quiet=True)
    assert describe_rows(data.stats) == ("6 rows, 3 dropped (no_turn_to_train: 2, too_long: 1); "
                                         "3 eval rows, 1 dropped (no_turn_to_train: 1)")


def test_hostile_chat_template_stops_in_a_worker_process(tmp_path, tok):
    template = tmp_path / "evil.jinja"
    template.write_text("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS[:1])
    cfg = config(tmp_path, [DatasetConfig(path=str(f))], chat_template=str(template), num_workers=1)
    start = time.monotonic()
    with pytest.raises(RowError, match=f"c.jsonl:1: the chat template {template} was stopped: rendering took longer"):
        prepare_data(cfg, tok, quiet=True, use_cache=False)
    assert time.monotonic() - start < 30  # the render stops after 1 s; the rest is starting the worker process


def test_missing_tokenizer_folder_says_so(tmp_path):
    with pytest.raises(TokenizerError, match=r"the tokenizer folder nope/model does not exist \(relative paths are "
                                             r"resolved against the current directory .*download.py"):
        load_tokenizer("nope/model")


# ------------------------------------------------------------------------------------------------ eval, mixing


def test_eval_fraction_holds_out_whole_rows_deterministically(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    cfg = config(tmp_path, [DatasetConfig(path=str(f))], eval_fraction=0.25)
    a, b = prepare_data(cfg, tok, seed=1, quiet=True), prepare_data(cfg, tok, seed=1, quiet=True)
    assert len(a.eval) == 5 and len(a.train) == 15
    assert set(a.eval.row_ids()) == set(b.eval.row_ids())
    assert not set(a.eval.row_ids()) & set(a.train.row_ids())
    c = prepare_data(cfg, tok, seed=2, quiet=True)
    assert set(a.eval.row_ids()) != set(c.eval.row_ids())


def test_eval_files_and_mixing_weights(tmp_path, tok):
    f1 = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    f2 = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Hello number {i}"} for i in range(10)])
    cfg = config(tmp_path, [DatasetConfig(path=str(f1), weight=0.5), DatasetConfig(path=str(f2), format="text",
                                                                                   weight=2.0)],
                 eval_datasets=[DatasetConfig(path=str(f1))])
    data = prepare_data(cfg, tok, quiet=True)
    assert len(data.train) == 10 + 20 and len(data.eval) == 20
    assert data.stats["rows"] == 30 and data.stats["eval_rows"] == 20
    assert data.stats["tokens"] == int(data.train.lengths.sum())


# ------------------------------------------------------------------------------------------------ cache, workers


def test_cache_is_reused_and_keyed_by_content_and_options(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    cfg = config(tmp_path, [DatasetConfig(path=str(f))])
    first = prepare_data(cfg, tok, quiet=True)
    second = prepare_data(cfg, tok, quiet=True)
    assert first.stats["datasets"][0]["cache"] == "miss" and second.stats["datasets"][0]["cache"] == "hit"
    for i in range(len(first.train)):
        assert all(np.array_equal(x, y) for x, y in zip(first.train[i], second.train[i]))
    assert second.stats["rows"] == first.stats["rows"]
    cfg.train_on_eos = "none"
    assert prepare_data(cfg, tok, quiet=True).stats["datasets"][0]["cache"] == "miss"
    write_jsonl(f, CHAT_ROWS[:-1])
    changed = prepare_data(cfg, tok, quiet=True)
    assert changed.stats["datasets"][0]["cache"] == "miss" and changed.stats["rows"] == 19


def test_worker_processes_give_identical_examples(tmp_path, tok, monkeypatch):
    from nanotune.data import pipeline

    monkeypatch.setattr(pipeline, "ROWS_PER_CHUNK", 7)  # several chunks, returned in order
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS * 3)
    f.write_text(f.read_text().replace("\n", "\n\n", 3))  # blank lines are skipped, and line numbers kept
    serial = prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True, use_cache=False)
    parallel = prepare_data(config(tmp_path, [DatasetConfig(path=str(f))], num_workers=2), tok, quiet=True,
                            use_cache=False)
    assert len(serial.train) == len(parallel.train) == 60
    for i in range(60):
        assert all(np.array_equal(x, y) for x, y in zip(serial.train[i], parallel.train[i]))
    assert np.array_equal(serial.train.row_ids(), parallel.train.row_ids())
    lines = f.read_text().splitlines()
    lines[40] = '{"messages": [oops]}'
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(RowError, match=r"c.jsonl:41:15: invalid JSON"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f))], num_workers=2), tok, quiet=True, use_cache=False)


# ------------------------------------------------------------------------------------------------ sources


def test_json_list_and_parquet_files(tmp_path, tok):
    rows = [{"text": f"Hello number {i}"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data = prepare_data(config(tmp_path, [DatasetConfig(path=str(tmp_path / "d.json"), format="text")]), tok,
                        quiet=True)
    assert len(data.train) == 5
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from_parquet = prepare_data(config(tmp_path, [DatasetConfig(path=str(tmp_path / "d.parquet"), format="text")]),
                                tok, quiet=True)
    assert [from_parquet.train[i][0].tolist() for i in range(5)] == [data.train[i][0].tolist() for i in range(5)]


def test_hub_repo_files_by_split_and_glob(tmp_path, tok, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train-00000-of-00001.jsonl", CHAT_ROWS[:6])
    write_jsonl(snapshot / "data" / "test-00000-of-00001.jsonl", CHAT_ROWS[:2])
    calls = []

    def fake_snapshot_download(repo_id, repo_type, revision, allow_patterns):
        calls.append((repo_id, repo_type, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    train = prepare_data(config(tmp_path, [DatasetConfig(path="org/name")]), tok, quiet=True)
    assert len(train.train) == 6 and calls[0][:2] == ("org/name", "dataset")
    test = prepare_data(config(tmp_path, [DatasetConfig(path="org/name", split="test", revision="v1")]), tok,
                        quiet=True)
    assert len(test.train) == 2 and calls[1][2] == "v1"
    glob = prepare_data(config(tmp_path, [DatasetConfig(path="org/name", data_files="data/t*.jsonl")]), tok,
                        quiet=True)
    assert len(glob.train) == 8 and calls[2][3] == ["data/t*.jsonl"]
    with pytest.raises(SourceError, match="no data file matches split 'validation'"):
        prepare_data(config(tmp_path, [DatasetConfig(path="org/name", split="validation")]), tok, quiet=True)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_reads_special_tokens_and_template(tmp_path):
    folder = tt.make_tokenizer_folder(tmp_path, "llama3")
    config_file = folder / "tokenizer_config.json"
    cfg = json.loads(config_file.read_text())
    cfg["bos_token"] = {"content": "<|begin_of_text|>", "special": True}  # the serialised AddedToken form
    cfg["additional_special_tokens"] = ["<|python_tag|>"]
    config_file.write_text(json.dumps(cfg))
    tok = load_tokenizer(folder / "tokenizer.json")
    assert tok.bos_id == tok.backend.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == tok.pad_id == tok.backend.token_to_id("<|eot_id|>")  # no pad token: EOS is reused
    assert tok.encode("<|python_tag|>") == [tok.backend.token_to_id("<|python_tag|>")]
    assert "<|start_header_id|>" in tok.chat_template
    assert tok.decode(tok.encode("What is 2+2?")) == "What is 2+2?"
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)


# ------------------------------------------------------------------------------------------------ command line


def test_cli_on_the_shipped_gsm8k_config(tmp_path, capsys, monkeypatch):
    from nanotune.data.__main__ import main

    monkeypatch.chdir(ROOT)  # the config names its files relative to the repository, as from a fresh clone
    assert main(["configs/gsm8k.toml", "--show", "1", f"--data.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    stats = json.loads(out[-1])
    assert stats["rows"] == 7473 and stats["dropped_rows"] == 0
    assert stats["trainable_tokens"] < stats["tokens"]
    assert stats["packing_efficiency"] >= 0.98
    text = "\n".join(out)
    assert "[[Natalia sold 48/2 = <<48/2=24>>24 clips in May." in text and "#### 72<|im_end|>]]" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "histogram_png" not in stats
    else:
        assert Path(stats["histogram_png"]).is_file()


def test_progress_shows_rate_and_eta(capsys, monkeypatch):
    from nanotune.data import pipeline

    clock = iter([0.0, 2.0, 2.5, 4.0])  # start, update, update (under a second later: silent), final
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: next(clock))
    progress = pipeline.Progress("train.jsonl", total=1000, quiet=False)
    progress.update(400)
    progress.update(500)
    progress.update(1000, final=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["  train.jsonl: 400/1000 rows, 200 rows/s, ETA 3s", "  train.jsonl: 1000/1000 rows, 250 rows/s"]


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from nanotune.data.__main__ import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\ntokenizer = "{tmp_path}/none"\n')
    assert main([str(cfg)]) == 1
    assert f"error: model.tokenizer = '{tmp_path}/none' does not exist" in capsys.readouterr().err


def test_trainable_counts_match_masks(tmp_path, tok):
    rows = CHAT_ROWS + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a b\n"},
                                      {"role": "user", "content": "x"}, {"role": "assistant", "content": "ok"}]}]
    f = write_jsonl(tmp_path / "c.jsonl", rows)
    data = prepare_data(config(tmp_path, [DatasetConfig(path=str(f))]), tok, quiet=True)
    for i in range(len(data.train)):
        assert data.train.trainable[i] == int(data.train[i][1].sum())
    assert data.stats["trainable_tokens"] == sum(int(data.train[i][1].sum()) for i in range(len(data.train)))


def test_jsonl_named_json_gets_a_hint(tmp_path, tok):
    f = tmp_path / "rows.json"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(SourceError, match=r"rows.json:2:1: invalid JSON: Extra data.*name the file .jsonl"):
        prepare_data(config(tmp_path, [DatasetConfig(path=str(f), format="text")]), tok, quiet=True)


def test_incomplete_cache_entry_is_rebuilt(tmp_path, tok):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    cfg = config(tmp_path, [DatasetConfig(path=str(f))])
    prepare_data(cfg, tok, quiet=True)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    (folder / "trainable.npy").unlink()
    again = prepare_data(cfg, tok, quiet=True)
    assert again.stats["datasets"][0]["cache"] == "miss" and (folder / "trainable.npy").is_file()
    assert prepare_data(cfg, tok, quiet=True).stats["datasets"][0]["cache"] == "hit"


def test_shipped_gsm8k_tokenizer_rebuilds_byte_identical(tmp_path):
    import subprocess

    out = tmp_path / "tok"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_gsm8k_tokenizer.py"), "--out", str(out)], check=True,
                   capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ROOT / "data/gsm8k/tokenizer" / name).read_bytes()


def test_shipped_gsm8k_tokenizer_renders_like_transformers():
    transformers = pytest.importorskip("transformers")
    from nanotune.data import ChatTemplate

    folder = ROOT / "data/gsm8k/tokenizer"
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = load_tokenizer(folder)
    row = json.loads((ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[0])
    messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    text = ChatTemplate(tok.chat_template, tok.special_tokens_map()).render(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False)
    assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
