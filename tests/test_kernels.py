"""Triton kernels against their PyTorch references: compiled on a GPU when there is one, otherwise on CPU through
Triton's interpreter (TRITON_INTERPRET=1). Shapes are tiny: the interpreter is slow.

The interpreter is chosen when triton is imported. If something imported triton earlier in this process (transformers
does), the tests here skip and `test_in_a_fresh_process` runs this file again in a new process with the interpreter on.
"""

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels then run on CPU tensors

triton = pytest.importorskip("triton", reason="the kernels need triton (pip install triton)")
INTERPRETED = type(triton.language.sum).__name__ == "InterpretedFunction"
RUNNABLE = ON_GPU or (INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="triton was imported without TRITON_INTERPRET=1 in this process; test_in_a_fresh_process "
    "runs these tests"
)

import models  # noqa: E402
from nanotune.kernels import (  # noqa: E402
    EXPERTS_CLASSES, GLU_MLP_CLASSES, RMSNORM_CLASSES, ROPE_CLASSES, apply_kernels,
)
from nanotune.kernels.cross_entropy import cross_entropy_chunk_, cross_entropy_chunk_reference  # noqa: E402
from nanotune.kernels.glu import glu, glu_reference  # noqa: E402
from nanotune.kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from nanotune.kernels.rope import apply_rope, rope_reference  # noqa: E402
from nanotune.loss import cross_entropy_sum, linear_cross_entropy_sum  # noqa: E402


def test_in_a_fresh_process(tmp_path):
    if RUNNABLE:
        pytest.skip("the kernels run in this process: the other tests of this file cover them")
    from tests.conftest import rerun_in_fresh_process

    rerun_in_fresh_process(__file__, tmp_path, min_ran=20)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def check_forward_backward(fn, ref, inputs, dtype):
    """Same outputs and same input gradients for a random upstream gradient."""
    a = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    b = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out, expected = fn(*a), ref(*b)
    outs, expecteds = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    grads_up = [torch.randn_like(e) for e in expecteds]
    for o, e in zip(outs, expecteds):
        assert o.dtype == e.dtype and o.shape == e.shape
        torch.testing.assert_close(o, e, **TOL[dtype])
    torch.autograd.backward(outs, grads_up)
    torch.autograd.backward(expecteds, grads_up)
    for x, y in zip(a, b):
        if x.requires_grad:
            assert x.grad.dtype == y.grad.dtype
            torch.testing.assert_close(x.grad, y.grad, **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,cast_before_scale", [(0.0, True), (1.0, False)])
def test_rms_norm(dtype, offset, cast_before_scale):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, dtype=dtype, device=DEVICE, requires_grad=True)  # D not a power of two: masked lanes
    w = (torch.randn(48, device=DEVICE) * 0.2 + (1 - offset)).to(dtype).requires_grad_()
    check_forward_backward(
        lambda x, w: rms_norm(x, w, 1e-6, offset, cast_before_scale),
        lambda x, w: rms_norm_reference(x, w, 1e-6, offset, cast_before_scale), [x, w], dtype,
    )


@needs_kernels
def test_rms_norm_strided_input_and_frozen_weight():
    torch.manual_seed(0)
    # a (B, H, T, hd) view, as Gemma's q_norm sees it
    x = torch.randn(2, 6, 3, 16, device=DEVICE).transpose(1, 2).requires_grad_()
    w = torch.randn(16, device=DEVICE)
    check_forward_backward(lambda x: rms_norm(x, w, 1e-6), lambda x: rms_norm_reference(x, w, 1e-6), [x],
                           torch.float32)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu(dtype, activation):
    torch.manual_seed(0)
    gate = (torch.randn(3, 7, 40, device=DEVICE) * 3).to(dtype).requires_grad_()  # both tails of the activation
    up = torch.randn(3, 7, 40, dtype=dtype, device=DEVICE, requires_grad=True)
    check_forward_backward(lambda g, u: glu(g, u, activation), lambda g, u: glu_reference(g, u, activation),
                           [gate, up], dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope(dtype):
    torch.manual_seed(0)
    B, T, Hq, Hkv, D = 2, 5, 4, 2, 16
    q = torch.randn(B, T, Hq, D, dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_()  # strided, as in models
    k = torch.randn(B, T, Hkv, D, dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_()
    freqs = torch.arange(T, device=DEVICE)[None, :, None] * torch.rand(B, 1, D // 2, device=DEVICE) * 0.7  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    check_forward_backward(
        lambda q, k: apply_rope(q, k, cos, sin),
        lambda q, k: (rope_reference(q, cos, sin), rope_reference(k, cos, sin)), [q, k], dtype,
    )


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("V", [37, 4100])  # one block of the vocabulary, and two (the second partly masked)
def test_cross_entropy_chunk_in_place(dtype, softcap, V):
    torch.manual_seed(0)
    logits = (torch.randn(4, V, device=DEVICE) * 3).to(dtype)
    labels = torch.tensor([0, V - 1, -100, V // 2], device=DEVICE)  # row 2 not trained: masked inside the kernel
    loss_ref, grad_ref = cross_entropy_chunk_reference(logits, labels, softcap)
    grad = logits.clone()
    loss = cross_entropy_chunk_(grad, labels, softcap)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])
    assert loss[2] == 0 and torch.all(grad[2] == 0) and torch.all(loss[[0, 1, 3]] > 0)


@needs_kernels
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_cross_entropy_with_the_triton_chunk_matches_plain(softcap):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9), device=DEVICE)
    labels[0, :3] = -100
    out = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=5, softcap=softcap, use_triton=True)
    ref = cross_entropy_sum(hidden @ weight.t(), labels, softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g_out = torch.autograd.grad(out, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


TINY = {
    "llama": dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2),
    "gemma3_text": dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        sliding_window=4, layer_types=["sliding_attention"]),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24),
}


def tiny_model(hf):
    model = models.build_model(models.config_from_hf(hf), DEVICE, torch.float32)
    model.config.attn_implementation = "eager"
    model.init_weights(torch.Generator(device=DEVICE).manual_seed(0))
    with torch.no_grad():  # norms away from their init, so the (1 + weight) offset matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@needs_kernels
@pytest.mark.parametrize("family", sorted(TINY))
def test_apply_kernels_keeps_names_logits_and_gradients(family):
    model = tiny_model(TINY[family])
    input_ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    names_before = [n for n, _ in model.named_parameters()]
    logits_ref = model(input_ids)
    logits_ref.square().mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    swapped = apply_kernels(model)
    assert [n for n, _ in model.named_parameters()] == names_before
    kinds = {type(model.get_submodule(n)).__name__ for n in swapped}
    assert kinds == {"TritonRMSNorm", "TritonGLUMLP", "TritonRope"} | ({"TritonExperts"} if "moe" in family else set())
    logits = model(input_ids)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
    logits.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-3, atol=1e-6, msg=n)


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2_moe"])
def test_rope_swap_alone_equals_the_plain_rotation(family):
    """Every attention's Rope module, and only those, is swapped; packed rows (cos / sin restarting per document)."""
    model = tiny_model(TINY[family])
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]] * 2, device=DEVICE)
    with torch.no_grad():
        ref = model(input_ids, position_ids)
        swapped = apply_kernels(model, norms=False, mlps=False, moe=False)
        assert swapped == [f"model.layers.{i}.self_attn.rope" for i in range(len(model.model.layers))]
        torch.testing.assert_close(model(input_ids, position_ids), ref, rtol=1e-5, atol=1e-6)


def test_tables_name_the_model_classes():
    import importlib

    for qualified in [*RMSNORM_CLASSES, *GLU_MLP_CLASSES, *ROPE_CLASSES, *EXPERTS_CLASSES]:
        module_name, _, cls = qualified.rpartition(".")
        assert hasattr(importlib.import_module(module_name), cls), qualified


def test_apply_kernels_refuses_cpu_without_interpreter_and_meta(monkeypatch):
    model = tiny_model(TINY["llama"]).cpu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        apply_kernels(model)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    meta = models.build_model(models.config_from_hf(TINY["llama"]), "meta")
    with pytest.raises(RuntimeError, match="meta"):
        apply_kernels(meta)
