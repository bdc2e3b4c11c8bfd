"""The trainer end to end on a tiny model: loss normalisation, exact resume, signals, non-finite losses, final/."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nanotune import checkpoint, train
from nanotune.config import ConfigError
from tests.conftest import ROOT

QUICKSTART = ROOT / "data" / "quickstart"


@pytest.fixture
def run(tmp_path):
    """run(*overrides) trains configs/quickstart.toml on 96 rows with a tiny model; returns the output folder."""
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:96]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:8]) + "\n")
    counter = iter(range(100))

    def go(*overrides, name=None, expect_rc=0):
        out = tmp_path / (name or f"run{next(counter)}")
        argv = [
            str(ROOT / "configs" / "quickstart.toml"),
            "--model.size=llama-tiny",
            f"--model.tokenizer={QUICKSTART / 'tokenizer'}",
            f'--data.datasets=[{{path="{tmp_path / "train.jsonl"}", format="chat"}}]',
            f'--data.eval_datasets=[{{path="{tmp_path / "eval.jsonl"}", format="chat"}}]',
            "--data.seq_len=64",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--train.micro_batch_size=2",
            "--train.max_steps=4",
            "--train.eval_every=0",
            "--optim.warmup_steps=0",
            "--logging.every=1",
            "--logging.plot=false",
            f"--output_dir={out}",
            *overrides,
        ]
        assert train.main(argv) == expect_rc
        return out

    return go


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in metrics(out) if "loss" in r]


def final_params(out):
    return load_file(out / "final" / "model.safetensors")


def assert_same_params(a, b, atol=3e-5, max_outlier_fraction=1e-4, outlier_atol=2e-3):
    """Equal up to fp32 summation order. AdamW moves each weight by about lr * m / sqrt(v) per step, which is close
    to lr * sign(grad) early on: where a gradient is ~1e-8, a rounding difference can flip that sign and move the
    weight by up to ~lr (3e-3 here). So: all but a handful of elements (1e-4 of them) agree to 3e-5 (1% of lr), and
    none differ by more than about one such step."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= outlier_atol, f"{k}: max diff {diff.max():.3g}"
        assert (diff > atol).float().mean() <= max_outlier_fraction, f"{k}: {(diff > atol).sum()} elements differ"


def test_loss_does_not_depend_on_micro_batch_size_or_accumulation(run):
    one_by_four = run("--train.micro_batch_size=1", "--train.grad_accum_steps=4", "--train.max_steps=2")
    four_by_one = run("--train.micro_batch_size=4", "--train.grad_accum_steps=1", "--train.max_steps=2")
    assert losses(one_by_four) == pytest.approx(losses(four_by_one), rel=1e-5)
    assert_same_params(final_params(one_by_four), final_params(four_by_one))
    # and the step changed something: the comparison is not between two untouched models
    untouched = run("--train.max_steps=2", "--optim.lr=0.0", "--train.micro_batch_size=4")
    moved = final_params(four_by_one)["model.layers.0.mlp.up_proj.weight"] - final_params(untouched)["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 1e-3


def torchrun(config_path, *overrides, expect_ok=True):
    """Two processes (FSDP2 over gloo) on a config file; returns the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "nanotune" / "train.py"), str(config_path), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora.enabled=true", "--lora.rank=4", "--lora.targets=['q_proj','up_proj']"]],
                         ids=["full", "lora"])
def test_two_processes_match_one(run, tmp_path, extra):
    """2 processes x 1 row x 2 accumulation == 1 process x 1 row x 4 accumulation (FSDP2 over gloo); with LoRA the
    gathered adapter/ and merged final/ match too."""
    single = run("--train.micro_batch_size=1", "--train.grad_accum_steps=4", "--train.max_steps=2",
                 "--train.loss=plain", *extra)
    (tmp_path / "dist.toml").write_text((single / "config.toml").read_text())
    out = tmp_path / "dist"
    torchrun(tmp_path / "dist.toml", "--train.grad_accum_steps=2", f"--output_dir={out}")
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert_same_params(final_params(out), final_params(single))
    if extra:
        assert_same_params(load_file(out / "adapter" / "adapter_model.safetensors"),
                           load_file(single / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_process_resume_is_exact(run, tmp_path):
    """Sharded (DCP) checkpoints: 2 processes x 4 steps == 2 processes x 2 steps, then resumed for 2 more. The
    checkpoints are taken on rank 0's clock (every step here): every rank must save at the same step."""
    base = run("--train.max_steps=1", "--checkpoint.every=1", name="base")  # its config, and a 1-process checkpoint
    (tmp_path / "dist.toml").write_text((base / "config.toml").read_text())
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(tmp_path / "dist.toml", "--train.max_steps=4", "--checkpoint.every=0", f"--output_dir={straight}")
    torchrun(tmp_path / "dist.toml", "--train.max_steps=4", "--checkpoint.every=0", "--checkpoint.every_minutes=1e-9",
             "--checkpoint.keep=0", f"--output_dir={resumed}")
    assert sorted(p.name for p in resumed.glob("step-*")) == ["step-1", "step-2", "step-3", "step-4"]
    shutil.rmtree(resumed / "step-4")
    shutil.rmtree(resumed / "step-3")
    torchrun(tmp_path / "dist.toml", "--train.max_steps=4", "--checkpoint.resume=auto", f"--output_dir={resumed}")
    assert losses(resumed) == losses(straight)
    assert_same_params(final_params(resumed), final_params(straight), atol=0, max_outlier_fraction=0)
    # another number of processes with other rows per step: refused with one line on every rank, before anything
    # is built (tests/test_parallel.py resumes on other layouts that keep them)
    with pytest.raises(ConfigError, match=r"written with 4 rows per optimizer step .* but this run takes 2 \(2 x 1 x 1\); "
                                          r"set --train.grad_accum_steps=2"):
        run(f"--checkpoint.resume={resumed / 'step-4'}", name="one")
    refused = torchrun(tmp_path / "dist.toml", f"--checkpoint.resume={base / 'step-1'}", f"--output_dir={tmp_path / 'two'}",
                       expect_ok=False)
    assert refused.returncode != 0
    message = (f"error: {base / 'step-1'} was written with 2 rows per optimizer step (train.micro_batch_size 2 x "
               "train.grad_accum_steps 1 x 1 data-parallel process(es)) but this run takes 4 (2 x 1 x 2)")
    assert refused.stderr.count(message) == 2, refused.stderr[-3000:]  # rank 0 and rank 1
    logged = (tmp_path / "two" / "train.log").read_text()  # every error that ends a run is in its log
    body = message.removeprefix("error: ")
    assert logged.count(body) == 2 and f"rank 1: error: ConfigError: {body}" in logged, logged


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the launcher's workers")
def test_workers_stop_when_torchrun_is_killed(run, tmp_path):
    from tests.test_checkpoint import running

    base = run("--train.max_steps=1", name="base")  # its config, and a warm data cache
    (tmp_path / "dist.toml").write_text((base / "config.toml").read_text())
    out = tmp_path / "orphans"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "nanotune" / "train.py"), str(tmp_path / "dist.toml"), "--train.max_steps=100000",
           f"--output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    workers = []
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        workers = [int(pid) for task in os.listdir(f"/proc/{launcher.pid}/task")
                   for pid in open(f"/proc/{launcher.pid}/task/{task}/children").read().split()]
        assert len(workers) == 2 and all(map(running, workers))
        launcher.kill()  # SIGKILL: torchrun cannot tell its workers
        launcher.wait()
        deadline = time.time() + 15
        while any(map(running, workers)) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(map(running, workers)), "workers kept training after torchrun was killed"
        assert "the launcher (pid" in (out / "train.log").read_text()
    finally:
        launcher.kill()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("extra", [[], ["--lora.enabled=true", "--lora.rank=4", "--lora.dropout=0.1"]],
                         ids=["full", "lora-with-dropout"])
def test_resume_is_exact(run, extra):
    straight = run("--train.max_steps=6", *extra, name="straight")
    run("--train.max_steps=6", "--checkpoint.every=3", *extra, name="resumed")
    resumed_dir = straight.parent / "resumed"
    # an interrupted run: its newest checkpoint is step-3 (its metrics after step 3 are dropped on resume)
    shutil.rmtree(resumed_dir / "step-6")
    run("--train.max_steps=6", "--checkpoint.every=3", "--checkpoint.resume=auto", *extra, name="resumed")
    assert losses(resumed_dir) == losses(straight)  # bit-identical on CPU in fp32
    assert_same_params(final_params(resumed_dir), final_params(straight), atol=0, max_outlier_fraction=0)


def test_resume_never_opens_pickles_dropped_into_a_checkpoint(run, tmp_path):
    from tests.test_checkpoint import plant

    out = run("--train.max_steps=2", "--checkpoint.every=2", name="planted")
    marker = tmp_path / "pwned"
    for name in (".metadata", "extra-rank0.pt", "state/.metadata", "state/__0_0.distcp"):
        plant(out / "step-2" / name, marker)
    run("--train.max_steps=3", "--checkpoint.every=2", "--checkpoint.resume=auto", name="planted")
    assert not marker.exists() and [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


def test_checkpoints_keep_the_newest_and_never_leave_partial_folders(run):
    out = run("--train.max_steps=4", "--checkpoint.every=1", "--checkpoint.keep=2")
    assert sorted(p.name for p in out.glob("step-*")) == ["step-3", "step-4"]
    assert not list(out.glob("*.tmp"))


def test_nonfinite_loss_stops_with_the_step_or_skips(run, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 2: .* is not finite"):
        run("--optim.lr=1e30", "--optim.schedule=constant", "--checkpoint.every=1", name="nan")
    assert sorted(p.name for p in (tmp_path / "nan").glob("step-*")) == ["step-1"]  # step 2 never saved



def test_nonfinite_step_is_skipped_when_configured(run, monkeypatch, capsys):
    """A NaN loss in the second of three steps: that step changes nothing, the others train, the weights stay finite."""
    calls = iter(range(1000))
    real = train.cross_entropy_sum

    def nan_on_second_step(logits, labels):
        value = real(logits, labels)
        return value * float("nan") if next(calls) == 1 else value

    monkeypatch.setattr(train, "cross_entropy_sum", nan_on_second_step)
    out = run("--train.nonfinite=skip", "--train.loss=plain", "--train.max_steps=3", "--train.eval_every=0",
              "--data.eval_datasets=[]", name="skip")
    assert "step 2: non-finite loss or gradient norm, step skipped" in capsys.readouterr().out
    steps = metrics(out)
    assert [r["step"] for r in steps] == [1, 2, 3] and steps[1]["loss"] != steps[1]["loss"]  # NaN logged as is
    assert all(torch.isfinite(t).all() for t in final_params(out).values())


def test_final_model_loads_in_transformers_with_same_logits(run):
    transformers = pytest.importorskip("transformers")
    import models

    out = run("--train.max_steps=2")
    ours = models.from_pretrained(out / "final").eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "final", attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
    assert (out / "final" / "tokenizer.json").exists()
    record = metrics(out)[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= record.keys()


def test_eval_is_logged(run):
    out = run("--train.max_steps=2", "--train.eval_every=1")
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["eval_loss"] > 0 and r["eval_perplexity"] > 1 for r in evals)


def test_dry_run_trains_nothing(run, tmp_path, capsys):
    run("--dry-run", name="dry")
    assert not (tmp_path / "dry" / "final").exists()
    assert "dry run" in capsys.readouterr().out


def test_sigterm_saves_a_checkpoint_and_exits_zero(run, tmp_path):
    run("--train.max_steps=1", name="warm")  # builds the data cache, so the subprocess starts training at once
    config = (tmp_path / "warm" / "config.toml").read_text()
    (tmp_path / "sig.toml").write_text(config)
    out = tmp_path / "sig"
    cmd = [sys.executable, str(ROOT / "nanotune" / "train.py"), str(tmp_path / "sig.toml"),
           "--train.max_steps=100000", f"--output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "stopped by SIGTERM" in stdout
    saved = list(out.glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "checkpoint.json").exists()


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    "override,message",
    [
        ("--train.max_stepz=3", "unknown config key train.max_stepz; did you mean train.max_steps?"),
        ("--train.max_steps=three", "train.max_steps must be int, got 'three'"),
        ("--trian.max_steps=3", "unknown config key trian; did you mean train?"),
        ("train.max_steps=3", "must look like --section.key=value"),
        ("--train.precision=fp8", "train.precision = 'fp8' is not one of"),
        ("--logging.every=0", "logging.every must be at least 1, got 0"),
        ("--checkpoint.every=-1", "checkpoint.every must be at least 0, got -1"),
        ("--checkpoint.every_minutes=-1", "checkpoint.every_minutes must be at least 0, got -1"),
        ("--train.max_skipped_steps=0", "train.max_skipped_steps must be at least 1, got 0"),
        ("--optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
        ("--attention.implementation=bogus", "attention.implementation = 'bogus' is not one of"),
        ("--checkpoint.resume=/nowhere", "checkpoint.resume = '/nowhere' is not a complete step-N checkpoint folder"),
    ],
)
def test_config_errors_name_the_key(run, override, message):
    with pytest.raises(ConfigError) as err:
        run(override)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ LoRA and MoE


def test_lora_run_writes_a_peft_adapter_and_a_merged_model(run, hf_checkpoint):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch.distributed.checkpoint as dcp

    import models

    folder, _ = hf_checkpoint("llama", vocab_size=64)
    out = run(f"--model.path={folder}", "--lora.enabled=true", "--lora.rank=4", "--lora.alpha=8",
              "--lora.targets=['q_proj', 'v_proj', 'down_proj']", "--optim.lr=1e-2", "--checkpoint.every=2")
    # the training checkpoint holds only what trains: adapters (and their optimizer state)
    saved = dcp.HuggingFaceStorageReader(str(out / "step-4" / "state")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    # adapter/ loads in PEFT on the transformers base, and gives the merged final/ model's logits
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(0, 51, (2, 16))
    with torch.no_grad():
        base_logits = base(ids).logits
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter").eval()  # injects into `base` in place
    merged = models.from_pretrained(out / "final").eval()
    with torch.no_grad():
        assert (with_adapter(ids).logits - merged(ids)).abs().max() <= 1e-4
        # and the adapter learned something: the merged model is not the base
        assert (base_logits - merged(ids)).abs().max() > 1e-3


def test_moe_run_logs_the_router_aux_loss(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    out = run(f"--model.path={tmp_path / 'moe'}", "--train.max_steps=2")
    records = [r for r in metrics(out) if "loss" in r]
    assert all(r["aux_loss"] > 0 for r in records)
    assert (out / "final" / "config.json").exists()


def test_a_new_run_never_overwrites_an_old_one(run, tmp_path):
    run("--train.max_steps=1", "--checkpoint.every=1", name="old")
    before = (tmp_path / "old" / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run \(final, step-1\).*--checkpoint.resume=auto.*--overwrite"):
        run("--train.max_steps=1", name="old")
    assert (tmp_path / "old" / "final" / "model.safetensors").read_bytes() == before
    # a finished run without checkpoints: resume=auto finds nothing to resume and must not start over on top of it
    run("--train.max_steps=1", name="no-ckpt")
    with pytest.raises(ConfigError, match="it has no checkpoint to resume"):
        run("--train.max_steps=1", "--checkpoint.resume=auto", name="no-ckpt")
    # resume=auto into an empty folder is a fresh start (the usual setting for preemptible jobs)
    assert (run("--train.max_steps=1", "--checkpoint.resume=auto", name="fresh") / "final").exists()


def test_resuming_a_finished_run_trains_and_logs_nothing_more(run, tmp_path):
    out = run("--train.max_steps=2", "--checkpoint.every=2", "--train.eval_every=2", name="done")
    before = metrics(out)
    run("--train.max_steps=2", "--checkpoint.every=2", "--train.eval_every=2", "--checkpoint.resume=auto", name="done")
    assert metrics(out) == before


def test_qlora_run_on_cpu_writes_adapter_and_merged_model(run, hf_checkpoint):
    pytest.importorskip("bitsandbytes")
    import models

    folder, _ = hf_checkpoint("llama", vocab_size=64)
    out = run(f"--model.path={folder}", "--lora.enabled=true", "--lora.quantize=nf4", "--lora.rank=4",
              "--train.max_steps=2", "--train.precision=bf16")
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = models.from_pretrained(out / "final")  # merged into the original full-precision weights
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not (out / "final.tmp").exists()


def test_qlora_with_full_checkpointing_trains_as_without(run, hf_checkpoint):
    """Under full checkpointing the trainer keeps each NF4 weight dequantised by the recompute for the backward;
    the losses must be those of a run that stores activations (fp32 compute: the same arithmetic, bit for bit)."""
    pytest.importorskip("bitsandbytes")
    folder, _ = hf_checkpoint("llama", vocab_size=64)
    common = (f"--model.path={folder}", "--lora.enabled=true", "--lora.quantize=nf4", "--lora.rank=4",
              "--train.max_steps=3", "--checkpoint.save_final=false")
    stored = losses(run(*common, "--train.activation_checkpointing=none"))
    out = run(*common, "--train.activation_checkpointing=full")
    assert len(stored) == 3 and losses(out) == stored
    assert "layers keep the weight they dequantise in the recompute" in (out / "train.log").read_text()


def test_quickstart_command_and_generate_script(tmp_path):
    """The README's first command, shortened to a few steps, then scripts/generate.py on its final/."""
    out = tmp_path / "qs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    train_cmd = [sys.executable, str(ROOT / "nanotune" / "train.py"), str(ROOT / "configs" / "quickstart.toml"),
                 "--train.max_steps=3", "--train.eval_every=0", f"--output_dir={out}",
                 f"--data.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(train_cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "step 3/3" in result.stdout and (out / "final" / "tokenizer.json").exists()
    gen_cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), str(out / "final"), "reverse: abc",
               "--max-new-tokens=5"]
    result = subprocess.run(gen_cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("'reverse: abc' -> ")


def test_chunked_and_plain_loss_train_the_same(run):
    chunked = run("--train.loss=chunked", "--train.max_steps=2")
    plain = run("--train.loss=plain", "--train.max_steps=2")
    assert losses(chunked) == pytest.approx(losses(plain), rel=1e-5)
    assert_same_params(final_params(chunked), final_params(plain))


def test_activation_checkpointing_and_offload_change_nothing_but_memory(run):
    plain = run("--train.max_steps=2")
    saving = run("--train.max_steps=2", "--train.activation_checkpointing=full", "--train.activation_offload=true")
    assert losses(saving) == pytest.approx(losses(plain), rel=1e-6)
    assert_same_params(final_params(saving), final_params(plain), atol=1e-6, max_outlier_fraction=0)



@pytest.mark.parametrize("change,message", [
    ("--data.seq_len=96", r"cannot resume: data.seq_len \(checkpoint"),
    ("--lora.enabled=true", r"cannot resume: lora.enabled \(checkpoint"),
    ("--train.micro_batch_size=4", r"written with 2 rows per optimizer step .* but this run takes 4 \(4 x 1 x 1\); "
                                   r"set --train.micro_batch_size=2 --train.grad_accum_steps=1"),
    ("--train.grad_accum_steps=2", r"but this run takes 4 \(2 x 2 x 1\); set --train.grad_accum_steps=1"),
], ids=["seq_len", "lora", "micro_batch_size", "grad_accum_steps"])
def test_resume_refuses_changed_settings(run, change, message):
    run("--train.max_steps=4", "--checkpoint.every=2", name="base")
    with pytest.raises(ConfigError, match=message):
        run("--train.max_steps=6", "--checkpoint.resume=auto", change, name="base")


def test_resume_with_another_split_of_the_same_rows_per_step(run):
    """2 rows x 1 micro-batch per step, resumed as 1 row x 2 micro-batches: the same rows, the loss normalised over
    the whole step, so the same losses and weights within fp32 summation order (`assert_same_params`)."""
    straight = run("--train.max_steps=4", "--train.loss=plain", name="straight")
    run("--train.max_steps=4", "--train.loss=plain", "--checkpoint.every=2", name="resumed")
    resumed = straight.parent / "resumed"
    shutil.rmtree(resumed / "step-4")
    shutil.rmtree(resumed / "final")
    run("--train.max_steps=4", "--train.loss=plain", "--checkpoint.resume=auto", "--train.micro_batch_size=1",
        "--train.grad_accum_steps=2", name="resumed")
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    assert_same_params(final_params(resumed), final_params(straight))


def test_signal_handlers_are_restored_after_a_run(run):
    before = signal.getsignal(signal.SIGINT)
    run("--train.max_steps=1")
    assert signal.getsignal(signal.SIGINT) is before


def test_triton_kernels_train_like_the_plain_modules(run):
    """train.kernels swaps RMSNorm and SwiGLU for Triton kernels (run here by Triton's CPU interpreter)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)")
    plain = run("--train.max_steps=2", "--train.loss=plain")
    fused = run("--train.max_steps=2", "--train.loss=plain", "--train.kernels=true")
    assert losses(fused) == pytest.approx(losses(plain), rel=1e-5)
    assert_same_params(final_params(fused), final_params(plain))


def test_compiled_model_trains_like_eager(run, monkeypatch):
    """train.compile = "model" (forward + chunked loss in one graph) trains like eager: the graph dynamo captures, with
    AOTAutograd's forward and backward (backend aot_eager: inductor's C++ code for the whole model takes ~2 minutes on
    2 cores). "blocks" runs through inductor in the slow test below."""
    quick = ("--train.max_steps=3", "--data.eval_datasets=[]", "--checkpoint.save_final=false")
    eager = run(*quick)  # train.loss auto: the chunked LM head + CE
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = run(*quick, "--train.compile=model")  # steps 2 and 3 start from the weights steps 1 and 2 updated
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5)


def test_compile_model_refuses_several_processes():
    cfg_error = pytest.raises(ConfigError, match="train.compile = 'model'.*'blocks'")
    dist = type("Dist", (), {"world_size": 2, "ep": 1})()
    with cfg_error:
        train.check_compile_layout("model", dist)
    train.check_compile_layout("blocks", dist)
    dist.ep = 2  # expert parallelism reads the all-to-all sizes on the host in every MoE layer
    with pytest.raises(ConfigError, match="train.compile = 'blocks' with parallel.ep = 2.*train.compile = 'none'"):
        train.check_compile_layout("blocks", dist)
    train.check_compile_layout("none", dist)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(run):
    """train.compile compiles each decoder block (inductor's C++ backend on CPU) without changing the numbers; `true`
    is the old spelling of "blocks"."""
    eager = run("--train.max_steps=2", "--train.loss=plain")
    compiled = run("--train.max_steps=2", "--train.loss=plain", "--train.compile=true")
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)


def test_resume_at_an_epoch_boundary_is_exact(run):
    """96 rows in rows of 64 tokens make 22 micro-batches of 2 rows: the checkpoint at step 22 ends epoch 0."""
    straight = run("--train.max_steps=25", "--train.eval_every=0", name="straight")
    assert [r["epoch"] for r in metrics(straight) if r["step"] in (22, 25) and "loss" in r] == [0, 1]
    resumed = run("--train.max_steps=25", "--train.eval_every=0", "--checkpoint.every=22", name="resumed")
    shutil.rmtree(resumed / "final")
    (resumed / "metrics.jsonl").unlink()
    run("--train.max_steps=25", "--train.eval_every=0", "--checkpoint.every=22", "--checkpoint.resume=auto",
        name="resumed")
    assert losses(resumed) == [r["loss"] for r in metrics(straight) if r["step"] > 22 and "loss" in r]
    assert_same_params(final_params(resumed), final_params(straight), atol=0, max_outlier_fraction=0)


# ------------------------------------------------------------------------------------------------ runs that always resume


def test_a_run_killed_before_its_first_checkpoint_starts_again(run, tmp_path):
    """What a run killed during step 3 of its first try leaves: config, logs, metrics, a stale lock, a half-written
    checkpoint. Starting it again, with or without resume=auto, trains from the start and logs each step once."""
    out = tmp_path / "killed"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "nanotune.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (out / "config.toml").write_text("seed = 0\n")
    (out / "train.log").write_text("step 1/4\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    (out / "step-3.tmp").mkdir()
    run(name="killed")
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4] and 9.0 not in losses(out)
    assert not (out / "step-3.tmp").exists() and not (out / "nanotune.lock").exists()
    shutil.rmtree(out / "final")  # killed again before its first checkpoint, this time started with resume=auto
    run("--checkpoint.resume=auto", name="killed")
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_second_run_in_the_same_output_dir_is_refused_naming_the_first(run, tmp_path):
    earlier = run("--train.max_steps=1", name="earlier")  # this process's previous run, with its own train.log
    out = tmp_path / "busy"
    out.mkdir()
    lock = {"pid": os.getppid(), "host": socket.gethostname()}  # a live process that is not this one
    (out / "nanotune.lock").write_text(json.dumps(lock))
    with pytest.raises(ConfigError, match=rf"output_dir {out} is in use by another run \(pid {os.getppid()}"):
        run(name="busy")
    assert json.loads((out / "nanotune.lock").read_text()) == lock  # the other run's lock is left alone
    assert sorted(p.name for p in out.iterdir()) == ["nanotune.lock"]
    assert "in use by another run" not in (earlier / "train.log").read_text()


def test_overwrite_starts_afresh_and_deletes_only_run_outputs(run, tmp_path):
    out = run("--checkpoint.every=2", name="old")
    (out / "notes.txt").write_text("mine")
    (out / "step-x").mkdir()  # not a name nanotune writes
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "tensorboard").symlink_to(elsewhere)  # a name nanotune writes, linked to someone else's folder
    with pytest.raises(ConfigError, match="--overwrite deletes the checkpoints"):
        run("--checkpoint.resume=auto", "--overwrite", name="old")
    run("--train.max_steps=1", "--overwrite", name="old")
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "final", "metrics.jsonl", "notes.txt", "step-x",
                                                    "train.log"]
    assert [r["step"] for r in metrics(out)] == [1, 1]  # one train line and one eval line of the new run
    assert (elsewhere / "keep.txt").read_text() == "mine"  # the link went, not what it points to
    # a folder without a nanotune config.toml is never emptied
    stranger = tmp_path / "stranger"
    (stranger / "final").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no config.toml, so it may not be a nanotune run's output_dir"):
        run("--overwrite", name="stranger")
    assert (stranger / "final").is_dir()


def test_checkpoints_on_the_clock_and_not_when_it_is_off(run):
    on = run("--checkpoint.every=0", "--checkpoint.every_minutes=1e-9", "--checkpoint.keep=0", "--train.max_steps=3")
    assert sorted(p.name for p in on.glob("step-*")) == ["step-1", "step-2", "step-3"]
    off = run("--checkpoint.every=0", "--checkpoint.every_minutes=0", "--train.max_steps=3")
    assert not list(off.glob("step-*"))


def test_a_full_disk_stops_with_one_line_and_the_run_continues_once_space_is_freed(run, tmp_path, monkeypatch):
    import safetensors.torch

    real_save, calls = safetensors.torch.save, iter(range(100))

    def full_on_second_checkpoint(*args, **kwargs):  # DCP writes each checkpoint's shard with this
        if next(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save", full_on_second_checkpoint)
    with pytest.raises(checkpoint.CheckpointSaveError, match="no space left on device while saving step 4"):
        run("--checkpoint.every=2", "--checkpoint.keep=1", name="full")
    out = tmp_path / "full"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2"]
    assert "no space left on device while saving step 4" in (out / "train.log").read_text()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the disk filled up in the middle of a line
    monkeypatch.undo()
    run("--checkpoint.every=2", "--checkpoint.keep=1", "--checkpoint.resume=auto", name="full")
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_full_disk_while_saving_final_says_so_and_frees_what_it_wrote(run, tmp_path, monkeypatch):
    import models

    def no_space(model, path, **kwargs):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(models, "save_pretrained", no_space)
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"no space left on device while saving .*final; the "
                                                             r"checkpoints are intact"):
        run("--train.max_steps=2", "--checkpoint.every=2", name="full-final")
    out = tmp_path / "full-final"
    assert not (out / "final.tmp").exists() and not (out / "final").exists() and (out / "step-2").is_dir()


def test_resuming_a_damaged_checkpoint_by_path_gives_one_line(run, tmp_path):
    out = run("--checkpoint.every=2", name="damaged")
    (out / "step-4" / "checkpoint.json").write_text('{"format": 1, "st')
    with pytest.raises(ConfigError) as err:
        run(f"--checkpoint.resume={out / 'step-4'}", name="resumed")
    assert f"checkpoint {out / 'step-4'} is damaged or incomplete" in str(err.value) and "\n" not in str(err.value)
    assert f"error: ConfigError: {err.value}\n" in (tmp_path / "resumed" / "train.log").read_text()


def test_a_checkpoint_from_another_number_of_processes_is_refused_before_the_model_is_built(run, monkeypatch):
    """Written by FSDP over 2 processes with 2 rows each per step; one process with the same settings takes half the
    rows per step, so the data position cannot carry over."""
    out = run("--checkpoint.every=2", name="two")
    info = json.loads((out / "step-4" / "checkpoint.json").read_text())
    (out / "step-4" / "checkpoint.json").write_text(json.dumps({**info, "world_size": 2,
                                                                "layout": {**info["layout"], "dp_shard": 2}}))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(train, "build_model", no_model)
    with pytest.raises(ConfigError, match=r"written with 4 rows per optimizer step .*; set --train.grad_accum_steps=2"):
        run("--train.max_steps=6", "--checkpoint.resume=auto", name="two")


def test_skipped_steps_in_a_row_stop_the_run_without_a_final_model(run, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "cross_entropy_sum", lambda logits, labels: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"steps 1-3: 3 steps in a row had a non-finite loss"):
        run("--train.nonfinite=skip", "--train.loss=plain", "--train.max_skipped_steps=3", "--train.max_steps=10",
            name="nan")
    out = tmp_path / "nan"
    assert not (out / "final").exists()
    log_text = (out / "train.log").read_text()
    assert "error: FloatingPointError: steps 1-3" in log_text and "Traceback" not in log_text


def test_long_evaluations_report_progress(run, monkeypatch, capsys):
    monkeypatch.setattr(train, "EVAL_PROGRESS_SECONDS", 0.0)
    run("--train.max_steps=1", "--data.eval_datasets=[]", "--data.eval_fraction=0.25")
    progress = re.findall(r"^eval at step 1: (\d+)/(\d+) batches$", capsys.readouterr().out, flags=re.M)
    num_batches = int(progress[0][1])
    assert num_batches > 1 and progress == [(str(i), str(num_batches)) for i in range(1, num_batches)]
