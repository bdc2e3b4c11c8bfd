"""The MoE glue kernels (nanotune/kernels/moe.py) against their PyTorch references and the model's own ops, the swapped
`TritonExperts` against the plain Qwen MoE, and a decoder block with the swap compiled without graph breaks.

On a GPU the kernels are compiled; without one they run through Triton's interpreter (TRITON_INTERPRET=1, chosen when
triton is first imported: when something imported it earlier in this process, the tests skip and
`test_in_a_fresh_process` runs this file again in a new process). Shapes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the kernels need triton (pip install triton)")
INTERPRETED = type(triton.language.sum).__name__ == "InterpretedFunction"
RUNNABLE = ON_GPU or (INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(
    not RUNNABLE, reason="triton was imported without TRITON_INTERPRET=1 in this process; test_in_a_fresh_process "
    "runs these tests"
)

import models  # noqa: E402
from models import attention  # noqa: E402
from models.qwen_moe import (  # noqa: E402
    Experts, QwenMoeConfig, combine, grouped_mm_works, load_balancing_loss, router_z_loss, sort_by_expert,
)
from nanotune.kernels import apply_kernels  # noqa: E402
from nanotune.kernels.moe import (  # noqa: E402
    TritonExperts, expert_positions, permute, permute_reference, swiglu, swiglu_reference, unpermute,
    unpermute_reference,
)
from tests.conftest import assert_compiled_backward_matches_eager  # noqa: E402


def test_in_a_fresh_process(tmp_path):
    if RUNNABLE:
        pytest.skip("the kernels run in this process: the other tests of this file cover them")
    from tests.conftest import rerun_in_fresh_process

    rerun_in_fresh_process(__file__, tmp_path, min_ran=15)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def routing(N: int, K: int, E: int, seed: int = 0):
    """K distinct experts per token from E - 1 of them (the last expert gets no token), and the sorted layout."""
    g = torch.Generator().manual_seed(seed)
    expert_NK = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)]).to(DEVICE)  # (N, K)
    order, token, counts = sort_by_expert(expert_NK, E)
    assert counts[-1] == 0
    return expert_NK, order, token, expert_positions(order, N, K)


def leaf(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()


def forward_backward(fn, inputs, grad_out):
    """fn's output and the gradients of <output, grad_out> for every input, on fresh copies of the inputs."""
    copies = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*copies)
    return out, torch.autograd.grad(out, copies, grad_out)


@needs_kernels
@pytest.mark.parametrize("D", [37, 2100])  # masked lanes; 2100: the loop over column blocks (3 of them for K = 4)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_permute_forward_and_backward(K, D):
    N, E = 7, 6
    _, order, token, pos = routing(N, K, E, seed=K)
    x = leaf(N, D)
    grad = torch.randn(N * K, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, (dx,) = forward_backward(lambda x: permute(x, pos), [x], grad)
    ref, (dx_ref,) = forward_backward(lambda x: permute_reference(x, pos), [x], grad)
    assert torch.equal(out, ref) and torch.equal(out, x.detach()[token])  # a copy: exact; the model's x[token]
    torch.testing.assert_close(dx, dx_ref, **TOL[torch.float32])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I", [11, 1100])  # masked lanes; 1100: two column blocks a row
def test_swiglu_on_the_packed_rows(dtype, I):
    h = leaf(9, 2 * I, dtype=dtype, scale=3.0)  # both tails of silu
    grad = torch.randn(9, I, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out, (dh,) = forward_backward(swiglu, [h], grad)
    ref, (dh_ref,) = forward_backward(swiglu_reference, [h], grad)
    assert out.dtype == dtype and dh.dtype == dtype and dh.shape == h.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(dh, dh_ref, **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [37, 2100])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_unpermute_forward_and_gradients_for_rows_and_weights(K, D, dtype):
    N, E = 7, 6
    _, order, _, pos = routing(N, K, E, seed=K)
    h = leaf(N * K, D, dtype=dtype, seed=2)
    w = torch.rand(N, K, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(N, D, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    out, grads = forward_backward(lambda h, w: unpermute(h, pos, w), [h, w], grad)
    ref, grads_ref = forward_backward(lambda h, w: unpermute_reference(h, pos, w), [h, w], grad)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if dtype == torch.float32:  # the reference is the model's combine
        torch.testing.assert_close(out, combine(h.detach(), order, w.detach()), **TOL[dtype])
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref, **TOL[dtype])


@needs_kernels
def test_unpermute_with_frozen_weights_gives_no_weight_gradient():
    _, _, _, pos = routing(5, 2, 4)
    h, w = leaf(10, 16), torch.rand(5, 2, device=DEVICE)
    (dh,) = torch.autograd.grad(unpermute(h, pos, w).square().sum(), [h])
    (dh_ref,) = torch.autograd.grad(unpermute_reference(h, pos, w).square().sum(), [h])
    torch.testing.assert_close(dh, dh_ref, **TOL[torch.float32])


def tiny_model(family: str, dtype=torch.float32, top_k: int = 2) -> torch.nn.Module:
    """A random Qwen MoE of 2 layers (hidden 32, expert width 16: aligned for torch._grouped_mm where it runs)."""
    config = QwenMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=5, num_experts_per_tok=top_k, moe_intermediate_size=16,
        shared_expert_intermediate_size=24 if family == "qwen2_moe" else 0, qkv_bias=family == "qwen2_moe",
        qk_norm=family == "qwen3_moe", norm_topk_prob=family == "qwen3_moe", router_z_loss_coef=1e-3,
        attn_implementation="sdpa" if dtype == torch.bfloat16 else "eager", model_type=family,
    )  # fmt: skip
    model = models.build_model(config, "meta", dtype)
    model.to_empty(device=DEVICE)
    model.init_weights(torch.Generator(device=DEVICE).manual_seed(0))  # also chooses the grouped GEMM, once
    with torch.no_grad():  # decisive routing: no near-ties that summation order could flip
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0, generator=torch.Generator(device=DEVICE).manual_seed(1))
    return model


@needs_kernels
@pytest.mark.parametrize("family,top_k,checkpointing", [("qwen2_moe", 1, "none"), ("qwen2_moe", 2, "selective"),
                                                         ("qwen3_moe", 4, "full")])
def test_swapped_experts_give_the_plain_models_logits_and_gradients(family, top_k, checkpointing):
    model = tiny_model(family, top_k=top_k)
    model.activation_checkpointing = checkpointing  # the kernels run again in the recompute
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        (logits.square().mean() + model.aux_loss).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits_ref, grads_ref = run()
    swapped = apply_kernels(model, norms=False, mlps=False, ropes=False)
    assert swapped == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(type(model.get_submodule(n)) is TritonExperts for n in swapped)
    assert [n for n, _ in model.named_parameters()] == names and all(
        a is b for a, b in zip(model.parameters(), params))  # the very same Parameters: optimizer state follows
    logits, grads = run()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    for n in names:
        assert grads_ref[n].abs().max() > 0 or "shared_expert_gate" in n, n
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6, msg=n)


@needs_kernels
def test_only_plain_experts_are_swapped():
    from nanotune.lora_experts import FrozenExperts, apply_expert_lora

    model = tiny_model("qwen3_moe")
    apply_expert_lora(model, ["gate_up_proj", "down_proj"], rank=2, alpha=4.0)
    assert apply_kernels(model, norms=False, mlps=False, ropes=False) == []  # LoRA experts keep their forward
    assert all(type(layer.mlp.experts) is FrozenExperts for layer in model.model.layers)
    plain = tiny_model("qwen3_moe")
    assert apply_kernels(plain, moe=False, norms=False, mlps=False, ropes=False) == []
    assert all(type(layer.mlp.experts) is Experts for layer in plain.model.layers)


compiles_on_cpu = pytest.mark.skipif(
    not ON_GPU and not (grouped_mm_works("cpu", torch.bfloat16) and grouped_mm_works("meta", torch.bfloat16)),
    reason="torch._grouped_mm does not run and compile in bf16 on CPU in this torch (the fallback syncs)",
)


def block_loss(block, x, cos, sin, ctx):
    out, stats = block(x, cos, sin, ctx)
    num_tokens = x.shape[0] * x.shape[1]
    router = load_balancing_loss([stats], num_tokens, 5) + router_z_loss([stats], num_tokens)
    return out.float().square().mean() + router


@needs_kernels
@compiles_on_cpu
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_decoder_block_with_the_swap_compiles_forward_and_backward_without_graph_breaks(family):
    """Only the MoE swap: the other Triton kernels are raw launches, which under the interpreter torch.compile would
    trace into (the interpreter's Python); the MoE kernels are custom operators, one opaque node each."""
    model = tiny_model(family, torch.bfloat16)
    apply_kernels(model, norms=False, mlps=False, ropes=False)
    block = model.model.layers[0]
    assert isinstance(block.mlp.experts, TritonExperts) and block.mlp.experts.use_grouped_mm
    x = torch.randn(2, 12, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    position_ids = torch.arange(12, device=DEVICE).expand(2, 12)
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    ctx = attention.build_context("sdpa", (2, 12), DEVICE, position_ids)

    explained = torch._dynamo.explain(block_loss)(block, x, cos, sin, ctx)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    ops = [str(node.target) for g in explained.graphs for node in g.graph.nodes]
    assert sum("nanotune.moe_" in op for op in ops) == 3 and sum("_grouped_mm" in op for op in ops) == 2, ops

    assert_compiled_backward_matches_eager(block_loss, block, x, cos, sin, ctx)


@needs_kernels
@compiles_on_cpu
def test_whole_model_with_the_swap_and_its_losses_is_one_graph():
    model = tiny_model("qwen3_moe", torch.bfloat16)
    apply_kernels(model, norms=False, mlps=False, ropes=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def loss_fn(ids):
        logits = model(ids, packed=False)  # (B, T, V)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return ce + model.aux_loss

    explained = torch._dynamo.explain(loss_fn)(ids)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    ops = [str(node.target) for g in explained.graphs for node in g.graph.nodes]
    assert sum("nanotune.moe_" in op for op in ops) == 3 * len(model.model.layers), ops


@needs_kernels
def test_bench_moe_smoke():
    """scripts/bench_moe.py on tiny shapes: both variants time, and the fused one agrees with the plain one."""
    from scripts import bench_moe

    records = bench_moe.main(["--device", DEVICE, "--dtype", "float32", "--tokens", "16", "--hidden", "32",
                              "--experts", "4", "--top-k", "2", "--expert-width", "16", "--warmup", "1", "--iters", "1"])
    assert [r["variant"] for r in records] == ["plain", "fused"] and all(r["ms"] > 0 for r in records)
    assert all(diff < 1e-5 for diff in records[1]["max_abs_diff"].values()), records[1]["max_abs_diff"]
