"""Expert parallelism through the trainer (`parallel.ep`): Qwen2-MoE (with its shared expert) and Qwen3-MoE trained
with the experts split over 2 and 4 gloo processes equal one process: losses (the router auxiliary loss included)
within 1e-5 and final weights within the tolerance of every other layout (see tests/test_parallel.py's docstring).
A checkpoint written with the experts split resumes in one process like the uninterrupted run, and one written by one
process resumes with the experts split (DCP reshards the whole-shape expert DTensors), and the layouts expert parallelism cannot run are refused naming the key.

As in tests/test_parallel.py, one torchrun job per world size trains every configuration in turn."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanotune import parallel, train
from nanotune.config import ConfigError, ParallelConfig
from tests.conftest import ROOT, run_torchrun
from tests.test_parallel import QUICKSTART, assert_continues_like, base_argv, worker
from tests.test_train import assert_same_params, losses, metrics

AUX = ["--model.router_aux_loss_coef=0.05", "--model.router_z_loss_coef=0.01"]  # so that a wrong router loss shows
LORA = ["--lora.enabled=true", "--lora.rank=4", "--lora.alpha=8", "--lora.targets=['q_proj','v_proj','o_proj']"]
# name -> (world size, [parallel] overrides); 4 rows per optimizer step, 1 per micro-batch, as in one process
LAYOUTS = {
    "ep2": (2, ["--parallel.dp_shard=2", "--parallel.ep=2", "--train.grad_accum_steps=2"]),
    # experts split over 2 and sharded by FSDP2 over the 2 processes that hold the same ones
    "fsdp2-ep2": (4, ["--parallel.dp_shard=4", "--parallel.ep=2", "--train.grad_accum_steps=1"]),
    "ep4": (4, ["--parallel.dp_shard=4", "--parallel.ep=4", "--train.grad_accum_steps=1"]),
    # and with the Triton kernels (norms, SwiGLU, RoPE; the experts keep their all-to-all dispatch)
    "ep2-kernels": (2, ["--parallel.dp_shard=2", "--parallel.ep=2", "--train.grad_accum_steps=2",
                        "--train.kernels=true"]),
    "hsdp-ep2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.ep=2",
                     "--train.grad_accum_steps=1"]),
}
CASES = [("qwen3_moe", "full", name) for name in LAYOUTS] + [("qwen2_moe", "full", "ep2"), ("qwen2_moe", "full", "ep4"),
                                                            ("qwen3_moe", "lora", "ep2")]


def write_moe_checkpoint(folder: Path, family: str) -> None:
    """A tiny random transformers checkpoint: 4 experts of 2 per token, layer 0 dense (Qwen3) or every layer sparse
    with a gated shared expert (Qwen2); norms moved off their init value, so that a wrong gradient shows."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  router_aux_loss_coef=0.05)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, mlp_only_layers=[0])
    else:
        config = transformers.Qwen2MoeConfig(**common, shared_expert_intermediate_size=24)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One process and every case of CASES; -> {(family, tuning, layout): output folder}."""
    tmp = tmp_path_factory.mktemp("moe-ep")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:48]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    outs, runs = {}, {2: [], 4: []}
    for family, tuning, name in CASES:
        extra = AUX + (LORA if tuning == "lora" else [])
        if not (tmp / family).exists():
            write_moe_checkpoint(tmp / family, family)
        if (family, tuning, "single") not in outs:
            single = tmp / f"{family}-{tuning}-single"
            argv = base_argv(tmp, tmp / family, single) + ["--train.grad_accum_steps=4", *extra]
            if (family, tuning) == ("qwen3_moe", "full"):  # and a checkpoint at step 1, for the resume test
                argv += ["--checkpoint.every=1", "--checkpoint.keep=0"]
            assert train.main(argv) == 0
            outs[family, tuning, "single"] = single
        nproc, keys = LAYOUTS[name]
        out = tmp / f"{family}-{tuning}-{name}"
        argv = base_argv(tmp, tmp / family, out) + [*keys, *extra]
        if (family, tuning, name) == ("qwen3_moe", "full", "ep2"):
            argv += ["--checkpoint.every=1", "--checkpoint.keep=0"]
        runs[nproc].append(argv)
        outs[family, tuning, name] = out
    # and the other way round: the one-process step-1 checkpoint resumed with the experts split over 2 processes
    resumed = tmp / "qwen3_moe-full-single-then-ep2"
    runs[2].append(base_argv(tmp, tmp / "qwen3_moe", resumed) + [*LAYOUTS["ep2"][1], *AUX,
                   f"--checkpoint.resume={outs['qwen3_moe', 'full', 'single'] / 'step-1'}"])
    outs["qwen3_moe", "full", "single-then-ep2"] = resumed
    for nproc, argvs in runs.items():
        spec = tmp / f"runs-{nproc}.json"
        spec.write_text(json.dumps(argvs))
        run_torchrun(__file__, str(spec), nproc=nproc)
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("family,tuning,layout_name", CASES, ids=["-".join(c) for c in CASES])
def test_expert_parallel_trains_like_one_process(trained, family, tuning, layout_name):
    single, out = trained[family, tuning, "single"], trained[family, tuning, layout_name]
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    aux = [r["aux_loss"] for r in metrics(out) if "aux_loss" in r]
    assert aux and aux == pytest.approx([r["aux_loss"] for r in metrics(single) if "aux_loss" in r], rel=1e-5)
    final = load_file(out / "final" / "model.safetensors")
    reference = load_file(single / "final" / "model.safetensors")
    assert final.keys() == reference.keys()
    base = load_file(out.parent / family / "model.safetensors")
    if tuning == "full":
        assert_same_params(final, reference)
        key = "model.layers.1.mlp.experts.3.down_proj.weight"  # an expert of the last process: trained, and alike
        assert (final[key] - base[key]).abs().max() > 1e-3
    else:
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        one_element = 1 / min(t.numel() for t in adapter.values())
        assert_same_params(adapter, load_file(single / "adapter" / "adapter_model.safetensors"),
                           max_outlier_fraction=one_element)
        assert_same_params(final, reference, max_outlier_fraction=0.02)
        key = "model.layers.1.mlp.experts.3.down_proj.weight"  # the frozen experts stay as they were, exactly
        assert torch.equal(final[key], base[key])


@pytest.mark.slow
def test_an_expert_parallel_checkpoint_resumes_in_one_process(trained, tmp_path):
    """The step-1 checkpoint of the 2-process ep run (each process wrote its experts) resumed in one process trains
    step 2 like the uninterrupted one-process run."""
    ep_run, single = trained["qwen3_moe", "full", "ep2"], trained["qwen3_moe", "full", "single"]
    tmp = ep_run.parent
    out = tmp_path / "resumed"
    argv = base_argv(tmp, tmp / "qwen3_moe", out) + ["--train.grad_accum_steps=4", *AUX,
                                                       f"--checkpoint.resume={ep_run / 'step-1'}"]
    assert train.main(argv) == 0
    assert_continues_like(out, single, 2)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_with_the_experts_split(trained):
    """The one-process step-1 checkpoint resumed with ep 2 (DCP reshards each whole expert tensor into the processes'
    experts) trains step 2 like the uninterrupted run."""
    assert_continues_like(trained["qwen3_moe", "full", "single-then-ep2"], trained["qwen3_moe", "full", "single"], 2)


@pytest.mark.parametrize("keys,message", [
    (dict(ep=2, dp_shard=3), "does not divide parallel.dp_shard"),
    (dict(ep=2, dp_shard=2, tp=2), "parallel.ep = 2 with parallel.tp = 2"),
    (dict(ep=2, dp_shard=2, cp=2), "parallel.ep = 2 with parallel.cp = 2"),
    (dict(ep=0), "parallel.ep must be at least 1"),
])
def test_layouts_expert_parallelism_cannot_run_are_refused(keys, message):
    world = 1
    for key in ("dp_replicate", "dp_shard", "cp", "tp"):
        world *= max(keys.get(key, 1), 1)
    with pytest.raises(ConfigError, match=message):
        parallel.resolve_layout(ParallelConfig(**keys), world)


def test_ep_must_divide_the_experts_of_a_moe_model():
    from models.llama import LlamaConfig
    from models.qwen_moe import QwenMoeConfig

    layout = {"dp_replicate": 1, "dp_shard": 4, "cp": 1, "tp": 1}
    with pytest.raises(ConfigError, match=r"parallel.ep = 4 does not divide the model's 6 experts.*parallel.ep to 3"):
        parallel.check_model_layout(layout, QwenMoeConfig(num_experts=6), ep=4)
    with pytest.raises(ConfigError, match="has none; set parallel.ep = 1"):
        parallel.check_model_layout(layout, LlamaConfig(), ep=2)
    parallel.check_model_layout(layout, QwenMoeConfig(num_experts=6), ep=2)


if __name__ == "__main__":
    worker(sys.argv[1])
