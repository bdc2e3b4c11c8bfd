"""QLoRA's fused path: the same numbers as the reference, and how often each NF4 weight is dequantised per step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from nanotune import lora

pytest.importorskip("bitsandbytes")
from nanotune.lora import QLoRALinear  # noqa: E402
from nanotune.qlora import NF4Linear  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts the ops that run (forward and backward), by name: `bitsandbytes.dequantize_4bit`, `aten.mm`, ..."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def qlora_layer(compute_dtype=torch.float32, keep=False, fused=True, seed=0):
    """An NF4 base (64 -> 48, with bias) with a rank-4 adapter, alpha / rank = 2, B random so gradients see it."""
    torch.manual_seed(seed)
    base = NF4Linear.from_linear(nn.Linear(64, 48, bias=True), compute_dtype=compute_dtype)
    layer = QLoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.fused, layer.keep_dequantized_weight = fused, keep
    return layer


def forward_backward(layer, x, checkpoint=False):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpoint else layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out.float() * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("keep", [False, True], ids=["dequantise-again", "keep-weight"])
def test_fused_qlora_is_bitwise_the_reference_with_fp32_compute(keep):
    """NF4 dequantised to fp32 and alpha / rank = 2 (an exact scaling): the fused path, with the dequantised weight
    kept for the backward or dequantised again, gives the reference's output and gradients bit for bit."""
    layer = qlora_layer(keep=keep)
    reference = copy.deepcopy(layer)
    lora.set_fast_path(reference, fused=False)
    x = torch.randn(2, 5, 64)
    (out, gx, grads), (out_ref, gx_ref, grads_ref) = forward_backward(layer, x), forward_backward(reference, x)
    assert out.dtype == torch.float32
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)
    assert grads.keys() == {"lora_A.weight", "lora_B.weight"}
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads)


def test_bf16_qlora_computes_in_bf16_and_matches_the_reference():
    """NF4 in bf16 (QLoRA's default): the fused adapter runs in bf16 too, so the output differs from the reference's
    fp32 adapter by bf16 rounding: within 1% of the largest output (bf16 keeps 8 significant bits, 0.4%)."""
    layer = qlora_layer(compute_dtype=torch.bfloat16)
    reference = copy.deepcopy(layer)
    lora.set_fast_path(reference, fused=False)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    out, _, grads = forward_backward(layer, x)
    out_ref, _, grads_ref = forward_backward(reference, x)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads.values())
    assert (out.float() - out_ref.float()).abs().max() <= 1e-2 * out_ref.float().abs().max()
    for n in grads:
        assert (grads[n] - grads_ref[n]).abs().max() <= 1e-2 * grads_ref[n].abs().max()


@pytest.mark.parametrize("checkpoint", [False, True], ids=["no-checkpointing", "full-checkpointing"])
def test_nf4_dequantisations_per_step(checkpoint):
    """How many times one step reads each NF4 weight whole (a dequantisation, or bitsandbytes' dequantise-and-matmul
    `gemm_4bit`), and what keeping the dequantised weight costs in saved bytes without checkpointing."""
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    passes, saved = {}, {}
    for name, options in [("reference", dict(fused=False)), ("fused", dict()), ("fused+keep", dict(keep=True))]:
        layer = qlora_layer(compute_dtype=torch.bfloat16, **options)
        counter, storages = OpCounter(), {}

        def pack(t):
            storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_backward(layer, x, checkpoint=checkpoint)
        passes[name] = counter.counts.get("bitsandbytes.dequantize_4bit", 0) + counter.counts.get(
            "bitsandbytes.gemm_4bit", 0)
        saved[name] = sum(storages.values())
    print(passes, saved)  # reported by `pytest -s`
    forwards = 2 if checkpoint else 1  # checkpointing runs each forward again before the layer's backward
    # the reference and the plain fused path: each forward, then once more for the input gradient
    assert passes["reference"] == passes["fused"] == forwards + 1
    # keeping the weight: the backward reuses the (re)computed forward's copy
    assert passes["fused+keep"] == forwards
    if not checkpoint:  # without checkpointing the kept weight, (out, in) in bf16, stays alive until the backward
        assert saved["fused+keep"] - saved["fused"] == 48 * 64 * 2


def test_keeping_the_dequantised_weight_under_checkpointing_changes_no_number(hf_checkpoint):
    """A whole QLoRA model with full activation checkpointing: keeping each dequantised weight for the backward gives
    the same gradients bit for bit, with two weight passes per layer and step instead of three."""
    import models
    from nanotune.qlora import quantize_nf4

    folder, _ = hf_checkpoint("llama")

    def prepare(model):
        quantize_nf4(model)
        lora.apply_lora(model, "all-linear", rank=4, alpha=8)

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for keep in (False, True):
        torch.manual_seed(0)  # the same Kaiming-uniform A in both models
        model = models.from_pretrained(folder, prepare=prepare)
        with torch.no_grad():  # B = 0 at init would hide the adapters from every gradient
            for name, p in sorted(lora.trainable_parameters(model).items()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        num_layers = lora.set_fast_path(model, keep_dequantized_weight=keep)
        model.activation_checkpointing = True
        model.train()
        counter = OpCounter()
        with counter:
            model(ids).float().logsumexp(-1).mean().backward()
        passes = counter.counts.get("bitsandbytes.dequantize_4bit", 0) + counter.counts.get("bitsandbytes.gemm_4bit", 0)
        results[keep] = passes, {n: p.grad for n, p in lora.trainable_parameters(model).items()}
    assert num_layers == 2 * 7  # two decoder layers, seven projections each
    # every layer: its forward and the recompute; then, for the input gradient, every layer but q, k and v of the first
    # decoder layer, whose input (from the frozen embedding) needs no gradient: dequantised again, or the kept copy
    assert results[False][0] == 2 * num_layers + (num_layers - 3)
    assert results[True][0] == 2 * num_layers
    grads, grads_kept = results[False][1], results[True][1]
    assert grads.keys() == grads_kept.keys() and all(torch.equal(grads[n], grads_kept[n]) for n in grads)
