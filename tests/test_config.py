"""Config loading: typed sections, errors that name the key, overrides, the docs and the shipped configs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from nanotune.config import (ALIASES, DATASET_ALIASES, Config, ConfigError, DatasetConfig, all_keys, check_paths,
                             load_config, to_toml)
from nanotune.train import check_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_docs_config_md_lists_every_key_as_the_dataclasses_define_it():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    check_config(cfg)
    assert cfg.data.datasets, f"{path.name} names no data set"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "llama-3.1-8b-lora.toml", ["--train.max_steps=7", "--lora.rank=8"])
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg


def test_resolved_config_keeps_strings_with_newlines_and_quotes(tmp_path):
    (tmp_path / "c.toml").write_text('[[data.datasets]]\npath = "a.jsonl"\nsystem_prompt = """Be brief.\nSay "hi" \\\\ ok"""\n')
    cfg = load_config(tmp_path / "c.toml")
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "resolved.toml") == cfg
    assert cfg.data.datasets[0].system_prompt == 'Be brief.\nSay "hi" \\ ok'


def test_overrides_are_typed():
    cfg = load_config(None, ["--train.max_steps=12", "--optim.lr=1e-3", "--data.packing=false",
                             "--lora.targets=['q_proj','v_proj']", "--output_dir=out/x", "--optim.betas=[0.9, 0.95]"])
    assert cfg.train.max_steps == 12 and cfg.optim.lr == 1e-3 and cfg.data.packing is False
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.output_dir == "out/x"
    assert cfg == load_config(None, ["--train.max_steps=12", "--optim.lr=0.001", "--data.packing=false",
                                     "--lora.targets=['q_proj','v_proj']", "--output_dir=out/x",
                                     "--optim.betas=[0.9, 0.95]"])
    assert Config().train.max_steps == 0


def test_compile_takes_a_mode_and_the_old_boolean():
    """train.compile was a boolean that compiled each decoder block: true still does, false still does not."""
    assert load_config(None, []).train.compile == "none"
    for value, mode in [("true", "blocks"), ("false", "none"), ("model", "model"), ("blocks", "blocks")]:
        cfg = load_config(None, [f"--train.compile={value}"])
        assert cfg.train.compile == mode
        check_config(cfg)
    with pytest.raises(ConfigError, match="train.compile = 'whole' is not one of"):
        check_config(load_config(None, ["--train.compile=whole"]))


@pytest.mark.parametrize(
    "toml,message",
    [
        ("[train]\nlearning_rate = 1.0\n", "unknown config key train.learning_rate"),
        ("[train]\nlr = 1.0\n", "unknown config key train.lr; it belongs in another section: optim.lr"),
        ("[optim]\nlrr = 1.0\n", "unknown config key optim.lrr; did you mean optim.lr?"),
        ("[train]\nmicro_batch_size = 1.5\n", "train.micro_batch_size must be int, got 1.5"),
        ("[train]\nepochs = true\n", "train.epochs must be float, got True"),
        ("train = 3\n", "[train] must be a table"),
        ("[[data.datasets]]\npaht = 'x.jsonl'\n", "unknown config key data.datasets[0].paht; did you mean data.datasets[0].path"),
        ("[data\n", "is not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path, toml, message):
    (tmp_path / "bad.toml").write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.toml")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "toml,message",
    [
        # names from axolotl and HF TrainingArguments, in any section or at the top level
        ("learning_rate = 1e-4\n", "unknown config key learning_rate; did you mean optim.lr?"),
        ("[train]\ngradient_accumulation_steps = 4\n", "did you mean train.grad_accum_steps?"),
        ("sequence_len = 4096\n", "did you mean data.seq_len?"),
        ("[data]\nsample_packing = true\n", "unknown config key data.sample_packing; did you mean data.packing?"),
        ("[train]\nnum_epochs = 3\n", "did you mean train.epochs?"),
        ("[lora]\nlora_r = 8\n", "unknown config key lora.lora_r; did you mean lora.rank?"),
        ("[optim]\nwarmup_ratio = 0.1\n", "did you mean optim.warmup_steps (a number of steps, not a ratio)?"),
        ("[train]\ngradient_checkpointing = true\n", 'did you mean train.activation_checkpointing ("full")?'),
        ("[[data.datasets]]\ntype = 'alpaca'\n", "data.datasets[0].type; did you mean data.datasets[0].format?"),
        # typos are matched against the keys of every section, not only the one they were written in
        ("[optim]\nlerning_rate = 1e-4\n", "unknown config key optim.lerning_rate; did you mean optim.lr?"),
        ("[train]\nwarmup_step = 10\n", "unknown config key train.warmup_step; did you mean optim.warmup_steps?"),
        ("[training]\nmax_steps = 3\n", "unknown config key training; did you mean train?"),
        ("[optim]\nmin_lr = 0.0\n", "did you mean optim.min_lr_ratio?"),
    ],
)
def test_names_from_other_tools_and_typos_point_to_the_nanotune_key(tmp_path, toml, message):
    (tmp_path / "bad.toml").write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "bad.toml")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--optim.lerning_rate=1e-3", "unknown config key optim.lerning_rate; did you mean optim.lr?"),
        ("--learning_rate=1e-3", "unknown config key learning_rate; did you mean optim.lr?"),
        ("--micro_batch_size=2", "did you mean train.micro_batch_size?"),
        ("--train.lr=1e-3", "unknown config key train.lr; it belongs in another section: optim.lr"),
        ("--optim.zzzz=1", "unknown config key optim.zzzz; valid keys: lr, weight_decay"),
    ],
)
def test_overrides_suggest_the_key_meant(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_every_alias_names_a_real_key():
    keys = set(all_keys())
    assert {target for target, _ in ALIASES.values()} <= keys
    dataset_keys = {f.name for f in dataclasses.fields(DatasetConfig)}
    assert {target for target, _ in DATASET_ALIASES.values()} <= dataset_keys


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ROOT / "configs" / "nope.toml")


def test_missing_model_folder_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["--model.path=models-hf/llama-3.2-1b-instruct"])
    with pytest.raises(ConfigError) as err:
        check_paths(cfg)
    assert str(err.value) == (
        "model.path = 'models-hf/llama-3.2-1b-instruct': the model folder does not exist (relative paths are resolved "
        f"against the current directory {tmp_path}); download it with: python scripts/download.py ORG/NAME "
        "--out models-hf/llama-3.2-1b-instruct"
    )
    (tmp_path / "models-hf" / "llama-3.2-1b-instruct").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"is not an HF-format model folder \(no config.json in it\); download"):
        check_paths(cfg)


def test_relative_paths_resolve_against_the_current_directory_and_say_so(tmp_path, monkeypatch):
    # a config in configs/ naming data/train.jsonl, as the bundled configs do, run from the repository root
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    config_file = tmp_path / "configs" / "run.toml"
    config_file.write_text('[[data.datasets]]\npath = "data/train.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    check_paths(load_config(config_file), config_file)  # found from the repository root
    monkeypatch.chdir(tmp_path / "configs")
    with pytest.raises(ConfigError) as err:
        check_paths(load_config(config_file), config_file)
    assert str(err.value).startswith(
        f"data.datasets[0].path = 'data/train.jsonl' does not exist (relative paths are resolved against the current "
        f"directory {tmp_path / 'configs'}"
    )
    # the same path next to the config file: the error says so, and how to fix it
    (tmp_path / "configs" / "data").mkdir()
    (tmp_path / "configs" / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "train.jsonl").unlink()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'configs' / 'data' / 'train.jsonl'} exists: run from "
                                          f"{tmp_path / 'configs'} or write the path as"):
        check_paths(load_config(config_file), config_file)


def test_check_paths_leaves_hub_names_and_absolute_paths_alone(tmp_path):
    cfg = load_config(None, ["--data.datasets=[{path = 'HuggingFaceH4/ultrachat_200k'}]"])
    check_paths(cfg)  # an HF Hub data set repo: read later from the Hub
    cfg = load_config(None, [f"--data.chat_template={tmp_path / 'none.jinja'}"])
    with pytest.raises(ConfigError) as err:
        check_paths(cfg)
    assert str(err.value) == f"data.chat_template = '{tmp_path / 'none.jinja'}' does not exist"


def test_trainer_checks_paths_before_loading_anything(tmp_path, monkeypatch):
    from nanotune.train import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('[model]\npath = "models-hf/missing"\n[[data.datasets]]\npath = "d.jsonl"\n')
    with pytest.raises(ConfigError, match=r"model.path = 'models-hf/missing': the model folder does not exist .*"
                                          r"python scripts/download.py ORG/NAME --out models-hf/missing"):
        main([str(tmp_path / "run.toml")])
    assert not (tmp_path / "outputs").exists()  # nothing was started
