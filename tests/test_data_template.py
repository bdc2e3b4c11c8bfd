"""Chat templates: rendering equals transformers' apply_chat_template, and the loss mask equals the assistant mask
transformers computes from `{% generation %}`-tagged copies of the same templates (an independent oracle).

The four real templates (Llama 3, Gemma 3, Qwen 2.5, Mistral v2/v3) are copied under fixtures/data/templates so that
these tests always run; the copies are checked against ../shared/chat_templates when that folder exists.
"""

import re
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "data"))
import tiny_tokenizer as tt  # noqa: E402

from nanotune.config import DatasetConfig  # noqa: E402
from nanotune.data import ChatTemplate, TemplateError, load_tokenizer  # noqa: E402
from nanotune.data.examples import RowProcessor  # noqa: E402
from nanotune.data.formats import MaskOptions  # noqa: E402

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama3", "gemma3", "qwen2_5", "mistral_v2v3"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "chat_templates"

CHATS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "The answer is 4."}],
    "multi_turn_whitespace": [
        {"role": "user", "content": " Hello!  How can I help?\n"},
        {"role": "assistant", "content": "  You are a helpful assistant.\n\n"},
        {"role": "user", "content": "Add 3 and 5."},
        {"role": "assistant", "content": "3 + 5 = 8."},
    ],
    # an answer that is also a header word: a search for the content would find the header first
    "content_equals_role": [
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "user"},
    ],
    "system": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
}


@pytest.fixture(scope="module")
def backend():
    return tt.train_backend()


def hf_tokenizer(folder: Path, family: str, template: str):
    special = {k: v for k, v in tt.FAMILIES[family].items() if v}
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=template,
                                                **special)


def supported(family: str, chat: str) -> bool:
    return not (family == "mistral_v2v3" and chat == "system")  # that template raises on a system turn


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_templates_match_shared(family):
    if not SHARED.is_dir():
        pytest.skip("../shared/chat_templates is not present")
    assert (tt.TEMPLATES / f"{family}.jinja").read_text() == (SHARED / f"{family}.jinja").read_text()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chat", list(CHATS))
def test_render_equals_transformers(tmp_path, backend, family, chat):
    if not supported(family, chat):
        pytest.skip("the Mistral template rejects system turns (tested below)")
    folder = tt.make_tokenizer_folder(tmp_path / family, family, backend=backend)
    tok = load_tokenizer(folder)
    template = ChatTemplate(tok.chat_template, tok.special_tokens_map(), tok.special_tokens)
    hf = hf_tokenizer(folder, family, tok.chat_template)
    for gen in (False, True):
        ours = template.render(CHATS[chat], add_generation_prompt=gen)
        theirs = hf.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=gen)
        assert ours == theirs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chat", list(CHATS))
def test_mask_equals_transformers_generation_mask(tmp_path, backend, family, chat):
    if not supported(family, chat):
        pytest.skip("the Mistral template rejects system turns")
    folder = tt.make_tokenizer_folder(tmp_path / family, family, backend=backend)
    tok = load_tokenizer(folder)
    tagged = (tt.TEMPLATES / f"{family}_generation.jinja").read_text()
    hf = hf_tokenizer(folder, family, tagged)
    messages = CHATS[chat]
    # the tagged copy must render exactly as the real template, or it would not be an oracle for it
    assert hf.apply_chat_template(messages, tokenize=False) == ChatTemplate(
        tok.chat_template, tok.special_tokens_map()).render(messages)
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ds = DatasetConfig(path="x.jsonl", format="chat")
    processor = RowProcessor(tok.to_state(), tok.chat_template, ds, MaskOptions(), 4096, "drop", "split")
    chunk = processor([("x.jsonl:1", 0, {"messages": messages})])
    assert chunk.input_ids.tolist() == list(out["input_ids"])
    assert chunk.mask.tolist() == list(out["assistant_masks"])
    assert chunk.mask.sum() > 0


def spans_text(text, spans, role):
    return [text[s.content[0] : s.content[1]] for s in spans if s.role == role]


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_name_each_message(tmp_path, backend, family):
    tok = load_tokenizer(tt.make_tokenizer_folder(tmp_path, family, backend=backend))
    template = ChatTemplate(tok.chat_template, tok.special_tokens_map(), tok.special_tokens)
    messages = CHATS["multi_turn_whitespace"]
    text, spans = template.render_with_spans(messages)
    assert [s.index for s in spans] == [0, 1, 2, 3]
    trims = family in ("llama3", "gemma3")  # these two templates trim content
    expected = [m["content"].strip() if trims else m["content"] for m in messages if m["role"] == "assistant"]
    assert spans_text(text, spans, "assistant") == expected
    eot = {"llama3": "<|eot_id|>", "gemma3": "<end_of_turn>", "qwen2_5": "<|im_end|>", "mistral_v2v3": "</s>"}[family]
    for s in spans:
        if s.role == "assistant":
            assert text[s.end_of_turn[0] : s.end_of_turn[1]] == eot


def test_default_system_prompt_is_not_trained(tmp_path, backend):
    # Qwen 2.5 inserts "You are Qwen, ..." when the chat has no system turn; it is template text, never trained
    tok = load_tokenizer(tt.make_tokenizer_folder(tmp_path, "qwen2_5", backend=backend))
    processor = RowProcessor(tok.to_state(), tok.chat_template, DatasetConfig(path="x", format="chat"), MaskOptions(),
                             4096, "drop", "split")
    chunk = processor([("x:1", 0, {"messages": CHATS["single"]})])
    ids = chunk.input_ids
    assert tok.decode(ids[chunk.mask.astype(bool)]) == "The answer is 4.<|im_end|>"
    assert "You are Qwen" in tok.decode(ids)


@pytest.mark.parametrize("train_on_eos,expected", [
    ("turn", "4.<|eot_id|>ok<|eot_id|>"),
    ("last", "4.ok<|eot_id|>"),
    ("none", "4.ok"),
    ("all", "4.<|eot_id|>ok<|eot_id|>"),  # + the eot of every user turn, checked below
])
def test_train_on_eos(tmp_path, backend, train_on_eos, expected):
    tok = load_tokenizer(tt.make_tokenizer_folder(tmp_path, "llama3", backend=backend))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "ok"}]
    opts = MaskOptions(("assistant",), False, train_on_eos)
    processor = RowProcessor(tok.to_state(), tok.chat_template, DatasetConfig(path="x", format="chat"), opts, 4096,
                             "drop", "split")
    chunk = processor([("x:1", 0, {"messages": messages})])
    trained = tok.decode(chunk.input_ids[chunk.mask.astype(bool)])
    if train_on_eos == "all":
        # user turns end with <|eot_id|> too: 4 end-of-turn tokens in all
        ids = chunk.input_ids[chunk.mask.astype(bool)].tolist()
        assert ids.count(tok.token_id("<|eot_id|>")) == 4
        assert trained.replace("<|eot_id|>", "") == "4.ok"
    else:
        assert trained == expected


def test_roles_to_train_and_train_on_inputs(tmp_path, backend):
    tok = load_tokenizer(tt.make_tokenizer_folder(tmp_path, "qwen2_5", backend=backend))
    ds = DatasetConfig(path="x", format="chat")
    row = {"messages": CHATS["system"]}
    opts = MaskOptions(("user", "assistant"))
    user = RowProcessor(tok.to_state(), tok.chat_template, ds, opts, 4096, "drop", "split")
    chunk = user([("x:1", 0, row)])
    assert tok.decode(chunk.input_ids[chunk.mask.astype(bool)]) == "What is 2+2?<|im_end|>4<|im_end|>"
    everything = RowProcessor(tok.to_state(), tok.chat_template, ds, MaskOptions(train_on_inputs=True), 4096, "drop",
                              "split")
    chunk = everything([("x:1", 0, row)])
    assert chunk.mask[0] == 0 and chunk.mask[1:].all()


def test_template_errors_name_the_row(tmp_path, backend):
    tok = load_tokenizer(tt.make_tokenizer_folder(tmp_path, "mistral_v2v3", backend=backend))
    processor = RowProcessor(tok.to_state(), tok.chat_template, DatasetConfig(path="x", format="chat"), MaskOptions(),
                             4096, "drop", "split")
    with pytest.raises(ValueError, match=r"data.jsonl:7: the chat template raised: Conversation roles must alternate"):
        processor([("data.jsonl:7", 0, {"messages": [{"role": "assistant", "content": "hi"}]})])
    with pytest.raises(ValueError, match=r"data.jsonl:9: the chat template raised: Conversation roles must alternate"):
        processor([("data.jsonl:9", 0, {"messages": CHATS["system"]})])  # this template has no system turn
    with pytest.raises(TemplateError, match="line 1"):
        ChatTemplate("{% for x in %}", {})


def test_tojson_and_raise_exception_like_transformers():
    template = ChatTemplate("{{ messages | tojson }}{% if x %}{{ raise_exception('bad: ' + x) }}{% endif %}", {})
    assert template.render([{"role": "user", "content": "<a> & é"}]) == '[{"role": "user", "content": "<a> & é"}]'
    with pytest.raises(TemplateError, match="bad: y"):
        template.render([], x="y")


def test_sandbox_blocks_attribute_escape():
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(TemplateError):
        template.render([])


def test_content_dependent_template_falls_back_to_search():
    # the skeleton (placeholders) cannot show the "NOTE: " branch; the spans are still found in the real text
    source = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'].startswith('#') %}NOTE: "
              "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}")
    template = ChatTemplate(source, {}, ["<|im_start|>", "<|im_end|>"])
    messages = [{"role": "user", "content": "# title"}, {"role": "assistant", "content": "# answer"}]
    text, spans = template.render_with_spans(messages)
    assert "NOTE: # answer<|im_end|>" in text
    assert text[slice(*spans[1].content)] == "# answer"
    assert text[slice(*spans[1].end_of_turn)] == "<|im_end|>"


def test_template_that_rewrites_content_is_an_error():
    template = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", {})
    with pytest.raises(TemplateError, match="cannot find message 0"):
        template.render_with_spans([{"role": "user", "content": "hello"}])


# Templates come from downloaded repos: a hostile one must stop with an error that names it, not run forever.
ENDLESS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
HOSTILE = {  # name: (source, seconds allowed, the limit that must stop it)
    "endless_loop": (ENDLESS, 0.5, "rendering took longer than 0.5 s"),
    # the output bound alone (the deadline is far away): a million characters are reached in about a thousand steps
    "endless_output": ("{% for a in range(100000) %}{% for b in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
                       "{% endfor %}", 60.0, "the rendered text grew past"),
    "endless_calls": ("{% for a in range(100000) %}{{ range(100000) | join }}{% endfor %}", 60.0,
                      "the rendered text grew past"),
    "huge_repeat": ("{{ 'x' * 10 ** 9 }}", 60.0, "`*` would build a sequence of 1,000,000,000 items"),
    "huge_power": ("{{ 7 ** 100000 }}", 60.0, "`**` would build an integer of more than"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_stops_with_an_error_naming_it(name):
    source, seconds, reason = HOSTILE[name]
    template = ChatTemplate(source, {}, name="evil/tokenizer_config.json", max_seconds=seconds)
    start = time.monotonic()
    with pytest.raises(TemplateError, match=re.escape(f"evil/tokenizer_config.json was stopped: {reason}")):
        template.render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5.0


def test_render_bound_works_in_threads():
    # no signals: the deadline is checked inside the template's own loops, in whichever thread renders
    template = ChatTemplate(ENDLESS, {}, name="evil.jinja", max_seconds=0.5)
    errors = []

    def render():
        try:
            template.render([{"role": "user", "content": "hi"}])
        except TemplateError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=render) for _ in range(2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert time.monotonic() - start < 5.0
    assert len(errors) == 2 and all("evil.jinja was stopped: rendering took longer" in e for e in errors)


def test_bounded_sandbox_still_allows_what_real_templates_do():
    # loops, loop variables, calls, `*` on short strings and small powers render as plain Jinja renders them
    source = ("{% for m in messages %}{{ loop.index }}:{{ m['role'] | upper }}={{ m['content'] }}{{ '-' * 3 }}"
              "{% endfor %}{{ 2 ** 10 }}{% for i in range(3) %}{{ i }}{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ChatTemplate(source, {}).render(messages) == "1:USER=a---2:ASSISTANT=b---1024012"
