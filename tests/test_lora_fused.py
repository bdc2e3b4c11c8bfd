"""LoRA on fused projections (model.fuse_projections with lora.enabled: nanotune/lora.py FusedLoRALinear), against
LoRA on the unfused model and against PEFT.

Llama, Gemma 3 and Qwen3-MoE: the fused model with adapters on all or some parts of qkv_proj / gate_up_proj computes,
trains, saves (adapter/ key for key, merged final/ by both savers) and loads adapters like the unfused model with
LoRALinear on q_proj ... up_proj; PEFT loads its adapter. One matmul computes x·Aᵀ for all adapted parts. The trainer:
one fused process and two (FSDP2, sharded load and streamed save) train like one unfused process. What stays refused.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import models
from nanotune import lora, parallel, train
from nanotune.config import ConfigError, load_config
from nanotune.lora import FusedLoRALinear, apply_lora, load_adapter, merge_lora, save_adapter
from tests.conftest import ROOT, run_torchrun
from tests.test_fusion import loss_of, write_checkpoint
from tests.test_lora import hf_model_from, logits, max_diff
from tests.test_parallel import QUICKSTART, base_argv, write_family_checkpoint
from tests.test_train import assert_same_params, losses

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARTIAL = ["q_proj", "v_proj", "up_proj"]  # some parts of each fused projection: the others keep their columns


def ids_for(T=16, seed=0):
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(seed))


def by_peft_name(model) -> dict[str, torch.nn.Parameter]:
    """The trained tensors under the unfused model's names (a fused projection's adapters by part)."""
    return {lora._peft_name(n): p for n, p in lora.trainable_parameters(model).items()}


def randomize(model, seed=1):
    """Random values for every adapter tensor, drawn by PEFT name so that a fused and an unfused model get the same."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(by_peft_name(model).items()):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def plain_and_fused(folder, targets, **options):
    """The checkpoint loaded unfused and fused, LoRA applied to each after the same seed."""
    out = []
    for fuse in (False, True):
        model = models.from_pretrained(folder, fuse_projections=fuse, attn_implementation="eager")
        torch.manual_seed(0)
        apply_lora(model, targets, **{"rank": 4, "alpha": 8, **options})
        out.append(model)
    return out


def assert_close_dicts(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max().item() <= atol, key


@pytest.mark.parametrize("targets", [ALL, PARTIAL], ids=["all", "partial"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_moe"])
def test_fused_lora_computes_trains_saves_and_merges_like_unfused_lora(tmp_path, family, targets):
    write_checkpoint(tmp_path / "m", family)
    plain, fused = plain_and_fused(tmp_path / "m", targets)
    layers = [m for m in fused.modules() if isinstance(m, FusedLoRALinear)]
    assert layers and all(m.adapted for m in layers)
    if targets == PARTIAL:
        assert {m.adapted for m in layers} == {("q_proj", "v_proj"), ("up_proj",)}
    # the same adapters at init: the fused layers draw A part by part, in the unfused layers' order
    assert_close_dicts(by_peft_name(fused), by_peft_name(plain), atol=0)
    ids = ids_for()
    assert max_diff(logits(fused, ids), logits(plain, ids)) <= 1e-6

    # two SGD steps (the first moves only B, the second A too): the same losses and adapters
    optimizers = [torch.optim.SGD(lora.trainable_parameters(m).values(), lr=0.5) for m in (plain, fused)]
    for step in range(2):
        step_losses = []
        for model, opt in zip((plain, fused), optimizers):
            loss = loss_of(model, ids_for(seed=step))
            loss.backward()
            opt.step()
            opt.zero_grad()
            step_losses.append(loss.item())
        assert abs(step_losses[0] - step_losses[1]) <= 1e-6
    assert max(p.abs().max().item() for n, p in by_peft_name(plain).items() if "lora_B" in n) > 1e-3
    assert_close_dicts(by_peft_name(fused), by_peft_name(plain), atol=1e-6)
    assert max_diff(logits(fused, ids), logits(plain, ids)) <= 1e-5

    # adapter/: the unfused run's keys and config
    for name, model in (("plain", plain), ("fused", fused)):
        save_adapter(model, tmp_path / name, base_model_name_or_path="base")
    assert_close_dicts(load_file(tmp_path / "fused" / lora.ADAPTER_WEIGHTS),
                       load_file(tmp_path / "plain" / lora.ADAPTER_WEIGHTS), atol=1e-6)
    assert (json.loads((tmp_path / "fused" / lora.ADAPTER_CONFIG).read_text())
            == json.loads((tmp_path / "plain" / lora.ADAPTER_CONFIG).read_text()))

    # final/: W_part + s B_part A_part on each part's rows, by the streamed saver (cut into HF's tensors) and by merging
    parallel.save_final_streamed(fused, tmp_path / "streamed", parallel.DistInfo(), merge_lora=True)
    expected = models.hf_state_dict(merge_lora(plain))
    assert_close_dicts(load_file(tmp_path / "streamed" / "model.safetensors"), expected, atol=1e-6)
    merged = merge_lora(fused)
    assert not any(isinstance(m, FusedLoRALinear) for m in merged.modules())
    assert_close_dicts(models.hf_state_dict(merged), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fused_adapters_load_in_peft_and_adapters_load_in_a_fused_model(tmp_path, family):
    """A fused model's adapter gives PEFT's logits; an unfused run's adapter and a PEFT-made one, loaded into a fused
    model, give the unfused model's and PEFT's logits. (PEFT refuses up_proj without gate_proj in a MoE model, whose
    experts transformers stores with gate and up fused: attention only there.)"""
    write_checkpoint(tmp_path / "m", family)
    targets, peft_targets = (PARTIAL, ["k_proj", "gate_proj"]) if family == "llama" else (["q_proj", "v_proj"],
                                                                                        ["k_proj"])
    plain, fused = plain_and_fused(tmp_path / "m", targets)
    randomize(plain)
    randomize(fused)
    save_adapter(fused, tmp_path / "fused_adapter")
    save_adapter(plain, tmp_path / "plain_adapter")
    ids = ids_for()
    ours = logits(fused, ids)
    reference = peft.PeftModel.from_pretrained(hf_model_from(tmp_path / "m"), tmp_path / "fused_adapter").eval()
    assert max_diff(ours, logits(reference, ids)) <= 1e-4
    assert max_diff(ours, logits(models.from_pretrained(tmp_path / "m"), ids)) > 1e-3  # the adapters do something

    loaded = load_adapter(models.from_pretrained(tmp_path / "m", fuse_projections=True), tmp_path / "plain_adapter")
    assert any(isinstance(m, FusedLoRALinear) for m in loaded.modules())
    assert max_diff(logits(loaded, ids), logits(plain, ids)) <= 1e-6

    torch.manual_seed(3)
    made = peft.get_peft_model(hf_model_from(tmp_path / "m"),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    made.eval().save_pretrained(tmp_path / "peft_adapter")
    loaded = load_adapter(models.from_pretrained(tmp_path / "m", fuse_projections=True), tmp_path / "peft_adapter")
    assert max_diff(logits(loaded, ids), logits(made, ids)) <= 1e-4


class MatmulLog(TorchDispatchMode):
    """(input shapes, output shape) of every matmul that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm", "matmul"):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((shapes, tuple(out.shape)))
        return out


def test_one_matmul_computes_x_times_A_for_q_k_and_v(tmp_path):
    """Forward: of the matmuls that read x (N, D), one gives x·[A_q; A_k; A_v]ᵀ (N, 3r) and none a single part's
    (N, r); backward: one gives [dA_q; dA_k; dA_v] (3r, D). The unfused layers run three of each."""
    write_checkpoint(tmp_path / "m", "llama")
    plain, fused = plain_and_fused(tmp_path / "m", ["q_proj", "k_proj", "v_proj"], rank=3, alpha=6)
    attention = fused.model.layers[0].self_attn
    D, r = attention.qkv_proj.in_features, 3
    x = torch.randn(2, 5, D, requires_grad=True)

    def run(*modules):
        with MatmulLog() as forward:
            y = sum(m(x).sum() for m in modules)
        with MatmulLog() as backward:
            y.backward()
        from_x = [out for shapes, out in forward.calls if (10, D) in shapes and out != (10, D)]
        dA = [out for shapes, out in backward.calls if out[-2:] in ((r, D), (3 * r, D))]
        return from_x, dA

    from_x, dA = run(attention.qkv_proj)
    assert [o for o in from_x if o[-1] in (r, 3 * r)] == [(10, 3 * r)]
    assert dA == [(3 * r, D)]
    unfused = plain.model.layers[0].self_attn
    from_x, dA = run(unfused.q_proj, unfused.k_proj, unfused.v_proj)
    assert [o for o in from_x if o[-1] in (r, 3 * r)] == [(10, r)] * 3 and dA == [(r, D)] * 3


def test_dropout_and_the_reference_path_match_unfused_lora(tmp_path):
    """With lora.dropout each part draws its own mask in the unfused layers' order (the reference path), so training
    equals the unfused model's; set_fast_path(fused=False) gives the same as the fused path; bf16 is close."""
    write_checkpoint(tmp_path / "m", "llama")
    plain, fused = plain_and_fused(tmp_path / "m", ALL, dropout=0.25)
    randomize(plain)
    randomize(fused)
    ids = ids_for()
    results = []
    for model in (plain, fused):
        torch.manual_seed(5)
        loss = loss_of(model.train(), ids)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in by_peft_name(model).items()}))
    assert abs(results[0][0] - results[1][0]) <= 1e-6
    assert_close_dicts(results[1][1], results[0][1], atol=1e-5)

    fused.eval()
    fast = logits(fused, ids)
    assert lora.set_fast_path(fused, fused=False) == len([m for m in fused.modules() if isinstance(m, lora.ADAPTED)])
    assert max_diff(logits(fused, ids), fast) <= 1e-6
    lora.set_fast_path(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = logits(fused, ids)
    assert bf16.dtype == torch.bfloat16 and max_diff(bf16, fast) <= 0.05 * fast.abs().max().item()


def test_fused_lora_runs_in_one_and_two_processes_like_the_unfused_run(tmp_path):
    """The trainer: unfused LoRA in one process, fused LoRA in one process and in two (FSDP2, dp_shard 2: the sharded
    loader draws the adapters as one process does); the same losses, adapter/ and merged final/. The fused run resumes
    from its step-1 checkpoint exactly."""
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:16]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    write_family_checkpoint(tmp_path / "base", "llama")
    lora_keys = ["--lora.enabled=true", "--lora.rank=4", "--lora.alpha=8",
                 "--lora.targets=['q_proj','v_proj','gate_proj','up_proj','down_proj']"]
    out = {name: tmp_path / name for name in ("plain", "fused", "fsdp")}
    fuse = "--model.fuse_projections=true"
    assert train.main(base_argv(tmp_path, tmp_path / "base", out["plain"])
                      + ["--train.grad_accum_steps=4", *lora_keys]) == 0
    fused_keys = ["--train.grad_accum_steps=4", *lora_keys, fuse, "--checkpoint.every=1", "--checkpoint.keep=0"]
    assert train.main(base_argv(tmp_path, tmp_path / "base", out["fused"]) + fused_keys) == 0
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([base_argv(tmp_path, tmp_path / "base", out["fsdp"])
                                + ["--parallel.dp_shard=2", "--train.grad_accum_steps=2", *lora_keys, fuse]]))
    run_torchrun(ROOT / "tests" / "test_parallel.py", str(spec), nproc=2)
    adapter = load_file(out["plain"] / "adapter" / lora.ADAPTER_WEIGHTS)
    final = load_file(out["plain"] / "final" / "model.safetensors")
    for name in ("fused", "fsdp"):
        assert losses(out[name]) == pytest.approx(losses(out["plain"]), rel=1e-5), name
        assert_same_params(load_file(out[name] / "adapter" / lora.ADAPTER_WEIGHTS), adapter)
        assert_same_params(load_file(out[name] / "final" / "model.safetensors"), final)
        assert ((out[name] / "adapter" / lora.ADAPTER_CONFIG).read_text()
                == (out["plain"] / "adapter" / lora.ADAPTER_CONFIG).read_text())

    resumed = tmp_path / "resumed"
    shutil.copytree(out["fused"], resumed, ignore=shutil.ignore_patterns("step-2", "final", "adapter"))
    assert train.main(base_argv(tmp_path, tmp_path / "base", resumed) + [*fused_keys, "--checkpoint.resume=auto"]) == 0
    assert losses(resumed) == losses(out["fused"])
    assert_close_dicts(load_file(resumed / "adapter" / lora.ADAPTER_WEIGHTS),
                       load_file(out["fused"] / "adapter" / lora.ADAPTER_WEIGHTS), atol=0)


@pytest.mark.parametrize("keys,message", [
    (["--lora.dora=true"], r"lora.dora = true \(DoRA's magnitudes"),
    (["--lora.quantize=nf4"], r"lora.quantize = 'nf4' \(QLoRA"),
    (["--parallel.tp=2"], r"parallel.tp = 2 \(the tensor-parallel plans"),
    (["--fp8.enabled=true"], r"lora.enabled = true and fp8.enabled = true"),
])
def test_what_fused_lora_does_not_do_is_refused(keys, message):
    cfg = load_config(None, ["--model.size=llama-tiny", "--model.fuse_projections=true", "--train.max_steps=1",
                             "--lora.enabled=true", *keys])
    with pytest.raises(ConfigError, match=message + ".*model.fuse_projections = false"):
        train.check_config(cfg)
    train.check_config(load_config(None, ["--model.size=llama-tiny", "--model.fuse_projections=true",
                                          "--train.max_steps=1", "--lora.enabled=true"]))  # plain LoRA is allowed


def test_apply_lora_refuses_dora_on_a_fused_projection(tmp_path):
    write_checkpoint(tmp_path / "m", "llama")
    model = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    with pytest.raises(ValueError, match=r"lora.dora = true does not work on fused projections"):
        apply_lora(model, ["k_proj"], rank=2, alpha=4, dora=True)
    assert not any(isinstance(m, lora.ADAPTED) for m in model.modules())  # refused before anything was swapped
    apply_lora(model, ["o_proj"], rank=2, alpha=4, dora=True)  # an unfused projection may still have DoRA


def test_fp8_refuses_lora_on_a_fused_projection_rather_than_skip_it(tmp_path):
    from nanotune.fp8 import apply_fp8

    write_checkpoint(tmp_path / "m", "llama")
    model = models.from_pretrained(tmp_path / "m", fuse_projections=True)
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"self_attn.qkv_proj: FP8 does not swap LoRA on fused projections"):
        apply_fp8(model, skip=("lm_head",))
    assert apply_fp8(model, skip=("lm_head", "qkv_proj"))  # named in skip: the rest goes to FP8


def test_fused_lora_model_compiles_in_one_graph():
    """train.compile: the fused LoRA layers' autograd Function traces without a graph break."""
    import functools

    from tests import test_compile

    config = models.config_from_hf({**test_compile.TINY, **test_compile.FAMILIES["llama"]})
    config.attn_implementation, config.fuse_projections = "auto", True
    model = models.build_model(config, "cpu", torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    apply_lora(model, PARTIAL, rank=4, alpha=8)
    assert any(isinstance(m, FusedLoRALinear) for m in model.modules())
    batch = test_compile.rows(packed=True)
    assert test_compile.graph_breaks(functools.partial(test_compile.loss_sum, model), batch) == []
