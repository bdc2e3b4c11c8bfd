"""Context parallelism: the split, the mask, the refusals, and cp = 2 equal to one process.

The multi-process tests start one torchrun job of 2 gloo processes; inside it this file runs as a script (`worker`)
that first compares the model alone (every case below, in each process against the same model run whole in that
process), then trains through train.main with cp = 2 (FSDP2 over dp_shard x cp). A second, smaller job of 4 processes
runs the packed model cases with cp = 4, where a document spans more than two processes (chunks of 8 tokens: the
40-token example of the packed batch lies on all four).

Tolerance: in fp32 cp = 2 adds the same numbers in another order (the softmax over keys gathered in another order,
the gradients of the gathered keys summed over the processes), so losses agree to ~1e-7 relative and gradients to
~1e-6 of the largest gradient; the comparisons allow 1e-5. Attention across document boundaries changes the loss of
these batches by 1e-3 to 1e-2 (checked below), two orders of magnitude above that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import models
from models import attention
from nanotune import context_parallel, parallel, train
from nanotune.config import ConfigError, ParallelConfig, load_config
from nanotune.context_parallel import ContextParallel, rank_positions, split_batch
from nanotune.loss import cross_entropy_sum
from nanotune.packing import IGNORE_INDEX, BatchLoader
from tests.conftest import ROOT, run_torchrun
from tests.test_parallel import base_argv, write_family_checkpoint
from tests.test_train import losses, metrics

QUICKSTART = ROOT / "data" / "quickstart"
SEQ_LEN = 64

# ----------------------------------------------------------------------------------------------- the split and mask


def test_each_rank_holds_one_early_and_one_late_chunk():
    assert rank_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert rank_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    every = torch.cat([rank_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))  # every position exactly once
    # causal work (keys at or before each query) is the same on every rank
    work = [int((rank_positions(24, 3, r) + 1).sum()) for r in range(3)]
    assert len(set(work)) == 1


class ToyData:
    """Examples of given lengths: random token ids below 64, every token after the first two trained."""

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.examples = [(rng.integers(1, 64, n), np.r_[np.zeros(min(n, 2)), np.ones(max(n - 2, 0))]) for n in lengths]

    def __getitem__(self, i):
        return self.examples[i]


# name -> (example lengths, rows of example indices, packed): documents cross every chunk boundary (chunks of 16);
# example 1 covers chunks 0-2 (both ranks), the 64-token example the whole row; "unpacked" rows are 37 and 20 long,
# padded to 40 for the split; "short" leaves rank 1 (positions 16-47) with no real token at all
BATCHES = {
    "packed": ([5, 40, 12, 64], [[0, 1, 2], [3]], True),
    "unpacked": ([37, 20], [[0], [1]], False),
    "short": ([3], [[0]], True),
}


def make_batch(name: str) -> dict:
    lengths, rows, packed = BATCHES[name]
    loader = BatchLoader(ToyData(lengths), seq_len=SEQ_LEN, micro_batch_size=len(rows), packing=packed, shuffle=False)
    return loader.collate(rows)


@pytest.mark.parametrize("name", list(BATCHES))
def test_the_split_keeps_every_token_target_and_position(name):
    batch = make_batch(name)
    parts = [split_batch(batch, 2, rank) for rank in range(2)]
    T = parts[0]["context_parallel"].document_ids.shape[1]
    assert T % 4 == 0 and T - batch["input_ids"].shape[1] < 4
    assert sum(p["num_trainable_tokens"] for p in parts) == batch["num_trainable_tokens"]
    for key in ("input_ids", "labels", "position_ids", "attention_mask"):
        whole = parts[0][key].new_empty(batch[key].shape[0], T)
        for rank, part in enumerate(parts):
            whole[:, rank_positions(T, 2, rank)] = part[key]
        original = batch[key]
        assert torch.equal(whole[:, :original.shape[1]], original), key
        if key == "labels":  # the padding of the split is never trained
            assert (whole[:, original.shape[1]:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", ["packed", "unpacked"])
@pytest.mark.parametrize("window", [None, 7, 40])
def test_the_mask_is_the_whole_rows_mask_seen_from_each_rank(name, window):
    """Rank r's (T/cp, T) mask is the one-process (T, T) mask (causal, same document, window) at r's queries and the
    gathered keys: documents that span ranks, and windows longer than a rank's part of the row, included. Padding
    added for the split (the unpacked rows: 37 -> 40) is seen by no real token."""
    batch = make_batch(name)
    B, T = batch["input_ids"].shape
    whole = attention.build_context("sdpa", (B, T), "cpu", cu_seqlens=batch["cu_seqlens"])
    expected = attention.allowed_mask(whole, attention.checked_window(window, T)).expand(B, 1, T, T)
    for rank in range(2):
        rows = split_batch(batch, 2, rank)["context_parallel"]
        mask = rows.mask(window)  # (B, 1, T'/2, T')
        real_q, real_k = rows.query_index < T, rows.key_index < T
        q, k = rows.query_index[real_q], rows.key_index[real_k]
        assert torch.equal(mask[:, :, real_q][..., real_k], expected[:, :, q][..., k])
        assert not mask[:, :, real_q][..., ~real_k].any()
        assert mask.any(-1).all()  # every query sees at least itself


# ----------------------------------------------------------------------------------------------- refusals


def cfg_with(*overrides):
    return load_config(None, ["--model.size=llama-tiny", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["--parallel.cp=2", "--data.seq_len=90"],
     r"data.seq_len = 90 is not a multiple of 2 x parallel.cp = 4: .* set data.seq_len to 88 or 92"),
    (["--parallel.cp=2", "--attention.implementation=varlen"],
     r"attention.implementation = 'varlen' cannot take the mask of context parallelism .* use 'auto', 'sdpa', 'flex' "
     r"or 'eager'"),
    (["--parallel.cp=2", "--train.compile=true"], r"train.compile = .blocks. with parallel.cp > 1 is not supported yet"),
])
def test_what_cannot_be_exact_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.check_config(cfg_with(*overrides))
    train.check_config(cfg_with("--parallel.cp=2", "--data.seq_len=64"))  # and the same run with cp = 2 is fine


@pytest.mark.parametrize("world_size,keys,message", [
    (4, dict(cp=2, tp=2), r"parallel.cp = 2 with parallel.tp = 2 is not supported yet; set parallel.tp = 1"),
    (4, dict(cp=2, dp_replicate=2), r"parallel.cp = 2 with parallel.dp_replicate = 2 is not supported yet"),
    (3, dict(cp=2), r"parallel.dp_replicate x cp x tp = 2 does not divide the 3 processes"),
    (2, dict(cp=0), r"parallel.cp must be at least 1"),
])
def test_layouts_context_parallelism_does_not_take_are_refused(world_size, keys, message):
    with pytest.raises(ConfigError, match=message):
        parallel.resolve_layout(ParallelConfig(**keys), world_size)
    assert parallel.resolve_layout(ParallelConfig(cp=2), 4) == {"dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 1}


def test_training_with_flex_on_cpu_is_refused_where_torch_cannot_backpropagate_it(tmp_path):
    """As in one process (models/attention.py): flex attention forward works on CPU, its backward may not."""
    if attention.flex_backward_on_cpu():
        pytest.skip("the installed torch backpropagates flex attention on CPU")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny_model("llama", "flex")
        cp = ContextParallel(dist.group.WORLD, 0, 1, "flex")
        cp.apply(model)
        batch = cp.split(make_batch("packed"))
        cp.prepare(batch, torch.device("cpu"))
        with pytest.raises(ValueError, match="flex_attention cannot backpropagate on CPU; use 'sdpa'"):
            model(batch["input_ids"], batch["position_ids"])
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- cp = 2 vs one process

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    # a window (40) longer than a rank's 32 tokens but shorter than the row: it must count whole-row positions
    "gemma3": dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                   sliding_window=40, layer_types=["sliding_attention", "full_attention"]),
    # Gemma 2: alternating local (window 24, less than a rank's part of the row) and global layers, logit softcapping
    # (eager under auto)
    "gemma2": dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                   sliding_window=24),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                      moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], router_aux_loss_coef=0.1),
}
# (family, batch, attention implementation)
MODEL_CASES = [(f, b, "sdpa") for f in ("llama", "gemma3", "qwen3_moe") for b in ("packed", "unpacked")] + [
    ("llama", "packed", "eager"), ("gemma2", "packed", "auto"), ("qwen3_moe", "short", "sdpa"),
    ("llama", "packed", "flex"), ("gemma3", "packed", "flex")]  # flex: forward only (no flex backward on CPU)


def tiny_model(family: str, implementation: str):
    config = models.config_from_hf(FAMILY_CONFIGS[family])
    config.attn_implementation = implementation
    model = models.build_model(config, "cpu")
    model.init_weights(torch.Generator().manual_seed(0))  # also computes the RoPE tables
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger than the init's 0.02, and norms away from 1: attention far from uniform
        for p in model.parameters():
            p.normal_(0.0, 0.3, generator=generator)
    return model


def objective(model, batch, num_tokens: float, world_size: int):
    """What train.py backpropagates for one micro-batch: summed token losses * world_size / step tokens (+ aux).
    -> (objective, summed token losses, aux loss or None)."""
    is_moe = hasattr(model, "aux_loss")
    extra = {"aux_loss_mask": batch["attention_mask"]} if is_moe else {}  # as train.py passes it
    logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"], **extra)
    loss_sum = cross_entropy_sum(logits, batch["labels"])
    obj = loss_sum * world_size / num_tokens
    if not is_moe:
        return obj, loss_sum.detach(), None
    return obj + model.aux_loss, loss_sum.detach(), model.aux_loss.detach()


def compare_with_one_process(family: str, batch_name: str, implementation: str) -> dict:
    """In each of the cp processes: the model on the whole batch (one process), then its cp = 2 forward and backward
    on this rank's part; gradients averaged over the processes (as FSDP2 does) against the one-process ones."""
    rank, size = dist.get_rank(), dist.get_world_size()
    batch = make_batch(batch_name)
    num_tokens = batch["num_trainable_tokens"]
    model = tiny_model(family, implementation)
    backward = implementation != "flex"
    with torch.set_grad_enabled(backward):
        whole_obj, whole_loss, whole_aux = objective(model, batch, num_tokens, 1)
    if backward:
        whole_obj.backward()
        whole_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

    cp = ContextParallel(dist.group.WORLD, rank, size, implementation)
    cp.apply(model)
    local = cp.split(batch)
    cp.prepare(local, torch.device("cpu"))
    with torch.set_grad_enabled(backward):
        obj, loss, aux = objective(model, local, num_tokens, size)
    dist.all_reduce(loss)
    result = {"loss": float(loss), "whole_loss": float(whole_loss)}
    if backward:
        obj.backward()
        worst = 0.0
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)
            grad = p.grad / size
            worst = max(worst, float((grad - whole_grads[n]).abs().max() / whole_grads[n].abs().max().clamp_min(1e-12)))
        result["grad_rel_error"] = worst
    if aux is not None:
        result.update(aux=float(aux), whole_aux=float(whole_aux))
    if batch_name == "packed":  # control: the same split with the documents of each row merged into one
        rows = local["context_parallel"]
        rows.document_ids = torch.zeros_like(rows.document_ids)
        cp.prepare(local, torch.device("cpu"))
        with torch.no_grad():
            _, crossed, _ = objective(model, local, num_tokens, size)
        dist.all_reduce(crossed)
        result["loss_across_documents"] = float(crossed)
    return result


def worker(spec_file: str) -> None:
    """Inside torchrun: the model cases (rank 0 writes their results), then the training runs of the spec."""
    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_file).read_text())
    cases = [tuple(c) for c in spec.get("cases", MODEL_CASES)]
    results = {"-".join(case): compare_with_one_process(*case) for case in cases}
    if dist.get_rank() == 0:
        Path(spec["results"]).write_text(json.dumps(results))
    for argv in spec["runs"]:
        assert train.main(argv) == 0
    dist.destroy_process_group()


# Qwen3-MoE: its aux loss through the trainer and FSDP2's averaging, with activation checkpointing (the layers run
# again in the backward: the keys are gathered again, the routing statistics are not counted twice)
TRAIN_FAMILIES = {"llama": [], "qwen3_moe": ["--train.activation_checkpointing=full"]}


@pytest.fixture(scope="module")
def cp_job(tmp_path_factory):
    """One torchrun job of 2 processes: the model cases and a cp = 2 training run of each TRAIN_FAMILIES; the same
    training in one process here. -> (results of the model cases, {family: (one-process out, cp out)})."""
    tmp = tmp_path_factory.mktemp("cp")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:16]
    (tmp / "train.jsonl").write_text("\n".join(rows) + "\n")
    runs, outs = [], {}
    common = ["--train.grad_accum_steps=2", "--checkpoint.every=1", "--checkpoint.keep=0"]
    for family, extra in TRAIN_FAMILIES.items():
        write_family_checkpoint(tmp / family, family)
        assert train.main(base_argv(tmp, tmp / family, tmp / f"{family}-single") + common) == 0
        runs.append(base_argv(tmp, tmp / family, tmp / f"{family}-cp") +
                    [*common, "--parallel.cp=2", "--parallel.dp_shard=1", *extra])
        outs[family] = (tmp / f"{family}-single", tmp / f"{family}-cp")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"results": str(tmp / "results.json"), "runs": runs}))
    run_torchrun(__file__, str(spec), nproc=2)
    return json.loads((tmp / "results.json").read_text()), outs


@pytest.mark.parametrize("case", MODEL_CASES, ids=["-".join(c) for c in MODEL_CASES])
def test_cp2_forward_and_backward_equal_one_process(cp_job, case):
    result = cp_job[0]["-".join(case)]
    assert result["loss"] == pytest.approx(result["whole_loss"], rel=1e-5)
    assert result.get("grad_rel_error", 0.0) < 1e-5 and ("grad_rel_error" in result) == (case[2] != "flex")
    if "aux" in result:  # Qwen3-MoE: the load-balancing loss of the whole rows (also with a rank of padding only)
        assert result["aux"] == pytest.approx(result["whole_aux"], rel=1e-5)
    if "loss_across_documents" in result:  # the comparison can fail: attention across documents shows
        assert abs(result["loss_across_documents"] - result["whole_loss"]) > 1e-3 * result["whole_loss"]


# cp = 4: the 2 x 4 = 8 chunks of 8 tokens of a 64-token row; each process holds chunks r and 7 - r
CP4_CASES = [("llama", "packed", "sdpa"), ("gemma3", "packed", "sdpa"), ("qwen3_moe", "packed", "sdpa"),
             ("llama", "unpacked", "sdpa")]


@pytest.fixture(scope="module")
def cp4_job(tmp_path_factory):
    """One torchrun job of 4 processes running the CP4_CASES (the model alone, no training runs)."""
    tmp = tmp_path_factory.mktemp("cp4")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"results": str(tmp / "results.json"), "runs": [], "cases": CP4_CASES}))
    run_torchrun(__file__, str(spec), nproc=4)
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("case", CP4_CASES, ids=["-".join(c) for c in CP4_CASES])
def test_cp4_forward_and_backward_equal_one_process(cp4_job, case):
    result = cp4_job["-".join(case)]
    assert result["loss"] == pytest.approx(result["whole_loss"], rel=1e-5)
    assert result["grad_rel_error"] < 1e-5
    if "aux" in result:
        assert result["aux"] == pytest.approx(result["whole_aux"], rel=1e-5)
    if "loss_across_documents" in result:
        assert abs(result["loss_across_documents"] - result["whole_loss"]) > 1e-3 * result["whole_loss"]


def assert_same_final(out: Path, single: Path) -> None:
    final, reference = load_file(out / "final" / "model.safetensors"), load_file(single / "final" / "model.safetensors")
    # assert_same_params, with at most one outlier per tensor: AdamW's sign-like first steps may move a weight whose
    # gradient is ~0 by up to ~lr (see tests/test_parallel.py); these tensors are too small for 1e-4 of one to be one
    assert final.keys() == reference.keys()
    for k in final:
        diff = (final[k] - reference[k]).abs()
        assert diff.max() <= 2e-3 and (diff > 3e-5).sum() <= 1, f"{k}: max diff {diff.max():.3g}"


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
def test_cp2_training_with_fsdp_over_dp_shard_x_cp_equals_one_process(cp_job, family):
    """Two steps of two packed rows each through train.main: losses, the MoE aux loss and the weights of final/ as
    one process."""
    single, out = cp_job[1][family]
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    aux = [[r["aux_loss"] for r in metrics(run) if "aux_loss" in r] for run in (out, single)]
    assert aux[0] == pytest.approx(aux[1], rel=1e-5) and len(aux[0]) == (2 if family == "qwen3_moe" else 0)
    assert_same_final(out, single)
    final, base = load_file(out / "final" / "model.safetensors"), load_file(out.parent / family / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (final[key] - base[key]).abs().max() > 1e-3  # training moved the weights


def test_a_cp2_checkpoint_resumes_in_one_process(cp_job, tmp_path):
    """Step 1 of cp = 2 (FSDP2 shards over the flattened dp_shard x cp mesh), resumed in one process: step 2 as the
    uninterrupted single-process run."""
    single, out = cp_job[1]["llama"]
    argv = base_argv(single.parent, single.parent / "llama", tmp_path / "resumed")
    assert train.main(argv + ["--train.grad_accum_steps=2", f"--checkpoint.resume={out / 'step-1'}"]) == 0
    assert losses(tmp_path / "resumed") == pytest.approx(losses(single)[1:], rel=1e-5)
    assert_same_final(tmp_path / "resumed", single)


if __name__ == "__main__":
    worker(sys.argv[1])
