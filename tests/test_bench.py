"""scripts/bench.py on tiny shapes on CPU: every workload runs for nanotune and the HF baseline, and the first-step
losses agree on identical weights and tokens (a wrong loss makes the run fail)."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the benchmark's baseline is HF transformers")
pytest.importorskip("peft", reason="the LoRA baselines use peft")

import models  # noqa: E402
from scripts import bench  # noqa: E402


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_run_all_workloads_agree_with_hf(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    rc = bench.main(["--device", "cpu", "--tiny", "--steps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    records = read_jsonl(out)
    assert records[0]["impl"] == "run" and records[0]["torch"] == torch.__version__
    runs = {(r["workload"], r["impl"]): r for r in records if r["impl"] in ("hf", "nanotune")}
    summaries = {r["workload"]: r for r in records if r["impl"] == "summary"}
    assert set(summaries) == set(bench.WORKLOADS)
    for name in bench.WORKLOADS:
        for impl in ("hf", "nanotune"):
            r = runs[(name, impl)]
            if "skipped" in r:  # only QLoRA may be skipped, and only without bitsandbytes
                assert name == "W4" and "bitsandbytes" in r["skipped"]
                continue
            assert "failed" not in r
            assert r["metric_tokens_per_s"] > 0 and r["step_s"] > 0
        if "loss_ok" in summaries[name]:
            assert summaries[name]["loss_ok"], summaries[name]
            assert summaries[name]["speed_vs_hf"] > 0
    # W7 reports real (non-padding) tokens: fewer than the slots the padded baseline computes
    w7 = runs[("W7", "hf")]
    assert w7["real_tokens_per_s"] < w7["tokens_per_s"]
    assert printed.rindex("| workload | speed vs HF |") > printed.rindex("| workload | impl |")  # ratios last


def test_a_wrong_loss_fails_the_check(tmp_path, monkeypatch, capsys):
    real = bench.nanotune_loss_sum
    monkeypatch.setattr(bench, "nanotune_loss_sum", lambda *a, **k: real(*a, **k) * 1.01)
    rc = bench.main(["--device", "cpu", "--tiny", "--workloads", "W1", "--steps", "1", "--no-liger"])
    assert rc == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_a_shifted_packing_fails_the_w7_check(monkeypatch, capsys):
    """The W7 check runs nanotune on the baseline's documents packed into one row: dropping the document
    boundaries (one long document) must be caught."""
    real = bench.packed_rows_of

    def unpacked(batch):
        b = real(batch)
        b.position_ids = torch.arange(b.input_ids.shape[1])[None]
        return b

    monkeypatch.setattr(bench, "packed_rows_of", unpacked)
    rc = bench.main(["--device", "cpu", "--tiny", "--workloads", "W7", "--steps", "1", "--no-liger"])
    assert rc == 1, capsys.readouterr().out


@pytest.mark.parametrize("name", ["W1", "W3", "W5", "W6"])
def test_flops_count_every_matmul_weight_but_the_embedding(name):
    """N of the MFU formula against the parameters of the real-shaped model (on the meta device: no memory)."""
    w = bench.WORKLOADS[name]
    model = models.build_model(models.config_from_hf(w.hf), "meta")
    n = 0
    for pname, p in model.named_parameters(remove_duplicate=False):  # a tied LM head counts again
        if "embed_tokens" in pname or p.ndim < 2:
            continue
        n += p.numel()
        if ".experts." in pname:  # only the active experts' share
            n -= p.numel() - p.numel() * w.hf["num_experts_per_tok"] // w.hf["num_experts"]
    assert bench.matmul_params(w.hf, w.mode) == n
    if name == "W1":  # Llama-3.2-1B: 1.236B parameters, of which 67,584 are norm weights
        assert n == 1_235_814_400 - 67_584


@pytest.mark.slow
def test_tiny_run_with_triton_kernels_agrees_with_hf(tmp_path):
    """nanotune with its Triton kernels (norms, gated MLPs, the chunked cross-entropy), run by Triton's interpreter
    on CPU, against HF on the three model families. A fresh process: the interpreter is chosen when triton is
    imported, and transformers imports it."""
    pytest.importorskip("triton", reason="the kernels need triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench.jsonl"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "scripts/bench.py", "--device", "cpu", "--tiny", "--workloads", "W2,W5,W6", "--steps", "1",
           "--no-liger", "--out", str(out)]
    result = subprocess.run(cmd, cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_jsonl(out)
    for r in records:
        if r["impl"] == "nanotune":
            assert any(n.startswith("triton kernels on") for n in r["notes"]), r
        if r["impl"] == "summary":
            assert r["loss_ok"], r


@pytest.mark.parametrize("name", sorted(bench.WORKLOADS))
def test_real_shapes_build_the_same_parameters_as_hf(name):
    """Every workload at its real shape, on the meta device (no memory): nanotune's model built from the HF model's
    config has the HF model's parameter names and shapes, so the benchmark's weight copy works on the GPU."""
    w = bench.WORKLOADS[name]
    hf = bench.build_hf(w, torch.device("meta"), torch.bfloat16, seed=0)
    nt = models.build_model(models.config_from_hf(hf.config.to_dict()), "meta", torch.bfloat16)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    nt_shapes = {k: tuple(v.shape) for k, v in nt.state_dict().items() if not k.endswith("inv_freq")}
    assert nt_shapes == hf_shapes
    assert bench.matmul_params(w.hf, w.mode) > 0


@pytest.mark.parametrize("mode, workloads", [("selective", "W1,W3,W4,W5,W6"), ("every_k", "W1"), ("full", "W4")])
def test_tiny_run_with_each_checkpointing_mode_agrees_with_hf(tmp_path, mode, workloads):
    """--checkpointing reaches nanotune's model (the notes say which mode ran) and the loss check still passes."""
    out = tmp_path / "bench.jsonl"
    rc = bench.main(["--device", "cpu", "--tiny", "--workloads", workloads, "--steps", "1", "--no-liger",
                     "--checkpointing", mode, "--out", str(out)])
    assert rc == 0
    for r in read_jsonl(out):
        if r["impl"] == "nanotune" and "skipped" not in r:
            assert f"activation checkpointing {mode} (asked)" in r["notes"], r
        if r["impl"] == "summary" and "loss_ok" in r:
            assert r["loss_ok"], r


@pytest.mark.parametrize("name", ["W1", "W3", "W5", "W7"])
def test_auto_checkpointing_picks_the_cheapest_mode_that_fits_by_the_count(name):
    """At real shapes on the meta device: the chosen mode's estimate fits the budget and every cheaper mode's does not;
    a workload without a memory target stores everything."""
    w = bench.WORKLOADS[name]
    model = models.build_model(models.config_from_hf(w.hf), "meta", torch.bfloat16)
    mode, why = bench.auto_checkpointing(w, model, torch.bfloat16, chunk_size=1024)
    if w.memory_budget_gib is None:
        assert mode == "none" and "no memory target" in why
        return
    estimates = bench.memory_estimates(w, model, torch.bfloat16, chunk_size=1024)
    cheaper = bench.CHEAPEST_FIRST[: bench.CHEAPEST_FIRST.index(mode)]
    assert estimates[mode] <= w.memory_budget_gib or mode == "full"
    assert all(estimates[m] > w.memory_budget_gib for m in cheaper), estimates
    assert estimates["none"] > estimates["selective"] > estimates["full"]


def test_target_met_reads_speed_memory_and_loss_check():
    w1, w6 = bench.WORKLOADS["W1"], bench.WORKLOADS["W6"]  # W1: speed and memory vs HF+Liger; W6: speed vs HF
    ok = dict(loss_ok=True, **{"speed_vs_hf+liger": 1.4, "memory_vs_hf+liger": 0.9})
    assert bench.target_met(w1, ok) is True
    assert bench.target_met(w1, {**ok, "speed_vs_hf+liger": 1.2}) is False
    assert bench.target_met(w1, {**ok, "memory_vs_hf+liger": 1.1}) is False
    assert bench.target_met(w1, {**ok, "loss_ok": False}) is False
    assert bench.target_met(w1, {"loss_ok": True, "speed_vs_hf+liger": 1.4}) is None  # no memory measured (CPU)
    assert bench.target_met(w6, {"loss_ok": True, "speed_vs_hf": 3.1, "speed_vs_hf+liger": 0.5}) is True
    assert bench.target_met(w6, {"speed_vs_hf": 3.1}) is None  # no loss check
    assert w1.target == ">= 1.3x HF+Liger tok/s at <= 1x HF+Liger memory"


def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    """scripts/gpu_check.sh --cpu: every step of the GPU check (versions, both bench calls with profiles, the
    cuda-marked tests) on tiny shapes, and every output file written."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "check"
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), str(out), "--cpu"], cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for name in ("env.txt", "bench.log", "bench_small.jsonl", "bench_8b.jsonl", "top_ops.txt", "traces.tar.gz",
                 "tests.log"):
        assert (out / name).stat().st_size > 0, name
    assert "torch" in (out / "env.txt").read_text()
    for jsonl, workload in (("bench_small.jsonl", "W7"), ("bench_8b.jsonl", "W3")):
        summary = [r for r in read_jsonl(out / jsonl) if r["impl"] == "summary"]
        assert [s["workload"] for s in summary] == [workload] and summary[0]["loss_ok"], summary
    assert "## W7_nanotune" in (out / "top_ops.txt").read_text()
    assert "(time limit)" not in result.stdout and "skipped" in (out / "tests.log").read_text()
