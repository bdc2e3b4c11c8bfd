"""Attention backends against the eager oracle, on packed rows, with GQA, sliding windows and softcapping.

Every backend available on CPU must equal `eager` (fp32, relative error <= 1e-5, forward and gradients where the
backend can backpropagate on CPU); a packed row must equal the separate forwards of its documents. varlen runs on
CUDA only: its glue (flattening, cu_seqlens, GQA, window mapping) is checked here against a stand-in kernel that
follows the documented flash semantics, and the real kernel by scripts/bench_attention.py on a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from models import attention as A

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

TOL = 1e-5  # fp32 relative error
HAS_FLEX = A.flex_attention_fn() is not None
FLEX_GRAD = A.flex_backward_on_cpu()
CPU_BACKENDS = ["sdpa"] + (["flex"] if HAS_FLEX else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def packed_position_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    """[[3, 5], [8]] -> (B, T) positions restarting at 0 for each document."""
    rows = [torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row]
    return torch.stack(rows)


def random_lengths(gen: torch.Generator, T: int, num_docs: int) -> list[int]:
    """num_docs random positive lengths summing to T."""
    cuts = torch.randperm(T - 1, generator=gen)[: num_docs - 1] + 1
    bounds = [0] + sorted(cuts.tolist()) + [T]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def make_qkv(B, Hq, Hkv, T, D, gen, dtype=torch.float32, requires_grad=False):
    q = torch.randn(B, Hq, T, D, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return q, k, v


def run(implementation, q, k, v, position_ids=None, cu_seqlens=None, **kwargs):
    B, _, T, _ = q.shape
    ctx = A.build_context(implementation, (B, T), q.device, position_ids=position_ids, cu_seqlens=cu_seqlens)
    return A.attend(q, k, v, ctx, **kwargs)


# ------------------------------------------------------------------------------------------ packing information


def test_document_ids_and_cu_seqlens_from_position_ids():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # row 1 opens with a continued document
    doc = A.document_ids_from_position_ids(position_ids)
    assert doc.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    cu, max_seqlen = A.cu_seqlens_from_document_ids(doc)
    assert cu.tolist() == [0, 3, 5, 7, 10] and cu.dtype == torch.int32 and max_seqlen == 3
    ctx = A.build_context("sdpa", (2, 5), "cpu", position_ids=position_ids)
    assert ctx.is_packed and ctx.cu_seqlens.tolist() == [0, 3, 5, 7, 10]


def test_unpacked_rows_are_not_packed():
    ctx = A.build_context("sdpa", (2, 6), "cpu", position_ids=torch.arange(6).expand(2, 6))
    assert not ctx.is_packed and ctx.cu_seqlens is None


def test_cu_seqlens_split_at_row_boundaries():
    # one "document" of 7 tokens would continue from row 0 into row 1: it is split at the row boundary
    ctx = A.build_context("sdpa", (2, 5), "cpu", cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32))
    assert ctx.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert ctx.document_ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 2]]


def test_cu_seqlens_must_cover_the_batch():
    with pytest.raises(ValueError, match="B\\*T"):
        A.build_context("sdpa", (2, 5), "cpu", cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32))


@pytest.mark.parametrize("implementation", ["eager"] + CPU_BACKENDS)
def test_cu_seqlens_equal_position_ids(implementation):
    gen = torch.Generator().manual_seed(1)
    lengths = [[5, 9, 2], [16]]
    position_ids = packed_position_ids(lengths)
    q, k, v = make_qkv(2, 4, 2, 16, 8, gen)
    cu = torch.tensor([0, 5, 14, 16, 32], dtype=torch.int32)
    a = run(implementation, q, k, v, position_ids=position_ids)
    b = run(implementation, q, k, v, cu_seqlens=cu)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- backends == eager

B, T, D, HKV = 2, 48, 16, 2
WINDOWS = {"none": None, "short": 3, "long": 40}  # 3 < most documents; 40 > every document when packed


@pytest.mark.parametrize("num_docs", [1, 3, 8])
@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("implementation", CPU_BACKENDS)
def test_backend_equals_eager(implementation, group, window, num_docs):
    gen = torch.Generator().manual_seed(100 * group + num_docs)
    lengths = [random_lengths(gen, T, num_docs), random_lengths(gen, T, max(1, num_docs - 1))]
    position_ids = packed_position_ids(lengths)
    with_grad = implementation != "flex" or FLEX_GRAD
    q, k, v = make_qkv(B, HKV * group, HKV, T, D, gen, requires_grad=with_grad)
    sliding_window = WINDOWS[window]

    expected = run("eager", q, k, v, position_ids=position_ids, sliding_window=sliding_window)
    got = run(implementation, q, k, v, position_ids=position_ids, sliding_window=sliding_window)
    assert got.shape == q.shape
    assert rel_err(got, expected) <= TOL
    if with_grad:
        d_out = torch.randn(expected.shape, generator=gen)
        grads_expected = torch.autograd.grad(expected, (q, k, v), d_out)
        grads_got = torch.autograd.grad(got, (q, k, v), d_out)
        for g, e in zip(grads_got, grads_expected):
            assert rel_err(g, e) <= TOL


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("implementation", ["flex", "auto"])
def test_softcap_equals_eager(implementation, window):
    if implementation == "flex" and not HAS_FLEX:
        pytest.skip("the installed torch has no flex_attention")
    gen = torch.Generator().manual_seed(7)
    position_ids = packed_position_ids([random_lengths(gen, T, 4), random_lengths(gen, T, 2)])
    with_grad = implementation != "flex" or FLEX_GRAD
    q, k, v = make_qkv(B, 8, HKV, T, D, gen, requires_grad=with_grad)
    q = q * 3  # scores of a few units, so that a softcap of 1 changes them a lot
    kwargs = dict(position_ids=position_ids, sliding_window=WINDOWS[window])
    expected = run("eager", q, k, v, softcap=1.0, **kwargs)
    assert rel_err(run("eager", q, k, v, **kwargs), expected) > 0.05  # the softcap matters at this scale
    got = run(implementation, q, k, v, softcap=1.0, **kwargs)
    assert rel_err(got, expected) <= TOL
    if with_grad:
        for g, e in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
            assert rel_err(g, e) <= TOL


@pytest.mark.parametrize("implementation", ["eager"] + CPU_BACKENDS)
def test_custom_scale(implementation):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 4, 4, 16, 8, gen)
    position_ids = packed_position_ids([[6, 10]])
    expected = run("eager", q * 0.5 * 8**0.5, k, v, position_ids=position_ids)  # scale 0.5 == default on q*0.5*sqrt(D)
    got = run(implementation, q, k, v, position_ids=position_ids, scale=0.5)
    assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("implementation", ["eager", "auto"] + CPU_BACKENDS)
@pytest.mark.parametrize("sliding_window", [None, 4])
def test_packed_row_equals_separate_documents(implementation, sliding_window):
    """A packed row never attends across documents: each document's output is the output of that document alone."""
    gen = torch.Generator().manual_seed(11)
    lengths = [7, 1, 12, 4]
    q, k, v = make_qkv(1, 4, 2, sum(lengths), 8, gen)
    packed = run(implementation, q, k, v, position_ids=packed_position_ids([lengths]), sliding_window=sliding_window)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = run(implementation, q[:, :, part], k[:, :, part], v[:, :, part], sliding_window=sliding_window)
        assert rel_err(packed[:, :, part], alone) <= TOL
        start += n


@pytest.mark.parametrize("implementation", ["eager"] + CPU_BACKENDS)
def test_masks_prebuilt_by_build_context_are_used(implementation):
    position_ids = packed_position_ids([[3, 5], [8]])
    ctx = A.build_context(implementation, (2, 8), "cpu", position_ids=position_ids, sliding_windows=(None, 3, 100))
    built = dict(ctx.cache)
    assert len(built) == 2  # a window of 100 >= T is no window
    q, k, v = make_qkv(2, 2, 2, 8, 4, torch.Generator().manual_seed(0))
    for window in (None, 3, 100):
        A.attend(q, k, v, ctx, sliding_window=window)
    assert ctx.cache.keys() == built.keys() and all(ctx.cache[key] is built[key] for key in built)


def test_mask_is_reused_by_every_layer():
    position_ids = packed_position_ids([[3, 5], [8]])
    ctx = A.build_context("sdpa", (2, 8), "cpu", position_ids=position_ids)
    assert A.allowed_mask(ctx, 4) is A.allowed_mask(ctx, 4)
    if HAS_FLEX:
        assert A.flex_block_mask(ctx, None) is A.flex_block_mask(ctx, None)
        assert A.flex_block_mask(ctx, None) is not A.flex_block_mask(ctx, 4)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLEX, reason="the installed torch has no flex_attention")
def test_compiled_flex_equals_eager():
    """The compiled path (the one used on CUDA) through inductor's CPU backend: BlockMask, GQA, window, softcap."""
    gen = torch.Generator().manual_seed(5)
    position_ids = packed_position_ids([random_lengths(gen, 64, 5), random_lengths(gen, 64, 2)])
    q, k, v = make_qkv(2, 8, 2, 64, 16, gen)
    ctx = A.build_context("flex", (2, 64), "cpu", position_ids=position_ids, compile_flex=True)
    ctx_eager = A.build_context("eager", (2, 64), "cpu", position_ids=position_ids)
    for kwargs in (dict(), dict(sliding_window=5, softcap=2.0)):
        got = A.attend(q, k, v, ctx, **kwargs)
        assert rel_err(got, A.attend(q, k, v, ctx_eager, **kwargs)) <= TOL


# ------------------------------------------------------------------------------------------------------ auto


def test_auto_picks_per_device_and_feature():
    kw = dict(is_packed=True, dtype=torch.bfloat16)
    assert A.auto_backend("cpu", **kw) == "sdpa"
    assert A.auto_backend("cpu", **kw, softcap=30.0) == "eager"
    flex_or = "flex" if HAS_FLEX else "sdpa"
    assert A.auto_backend("cuda", is_packed=False, dtype=torch.bfloat16) == "sdpa"
    assert A.auto_backend("cuda", **kw, softcap=30.0) == ("flex" if HAS_FLEX else "eager")
    assert A.auto_backend("cuda", is_packed=True, dtype=torch.float32) == flex_or
    assert A.auto_backend("cuda", **kw) == ("varlen" if A._varlen_usable_on_gpu(None) else flex_or)
    ctx = A.build_context("auto", (1, 4), "cpu")
    assert ctx.auto and ctx.implementation == "sdpa"


# -------------------------------------------------------------------------------------------------- refusals


def test_refusals_name_a_backend_that_can():
    with pytest.raises(ValueError, match="choose one of"):
        A.build_context("flash", (1, 4), "cpu")
    with pytest.raises(ValueError, match="CUDA only.*'sdpa'"):
        A.build_context("varlen", (1, 4), "cpu")
    q, k, v = make_qkv(1, 2, 2, 4, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="softcapping; use 'flex'"):
        run("sdpa", q, k, v, softcap=30.0)
    with pytest.raises(ValueError, match="positive"):
        run("eager", q, k, v, sliding_window=0)
    ctx = A.build_context("eager", (1, 4), "cpu")
    with pytest.raises(ValueError, match="T = 4"):
        A.attend(torch.cat([q, q], dim=2), k, v, ctx)


@pytest.mark.skipif(not HAS_FLEX or FLEX_GRAD, reason="this torch's flex_attention can backpropagate on CPU")
def test_flex_refuses_backward_on_cpu():
    q, k, v = make_qkv(1, 2, 2, 4, 8, torch.Generator().manual_seed(0), requires_grad=True)
    with pytest.raises(ValueError, match="cannot backpropagate on CPU; use 'sdpa'"):
        run("flex", q, k, v)
    with torch.no_grad():  # inference is fine
        run("flex", q, k, v)


# ---------------------------------------------------------------------- varlen glue, with a stand-in kernel


def reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """The documented varlen_attn contract, computed per sequence in fp32: (N, Hq, D) tokens -> (N, Hq, D)."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    assert q.shape[1] == k.shape[1] or enable_gqa
    left, right = window_size
    out = torch.empty_like(q)
    bounds = cu_seq_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        assert n <= max_q
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = torch.ones(n, n, dtype=torch.bool)
        if left >= 0:
            mask &= j >= i - left
        if right >= 0:
            mask &= j <= i + right
        seg = [t[start:end].float().transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, n, D)
        out[start:end] = A.eager_attention(*seg, mask[None, None], scale=scale)[0].transpose(0, 1).to(q.dtype)
    return out


def old_reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """An older varlen_attn: causal flag, no window_size, no enable_gqa, no scale."""
    window = (-1, 0) if is_causal else (-1, -1)
    return reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window)


@pytest.mark.parametrize(
    "kernel, sliding_window",
    [(reference_varlen, None), (reference_varlen, 3), (old_reference_varlen, None)],  # older: no window (refused)
    ids=["current", "current-window", "older"],
)
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("packed", [True, False])
def test_varlen_glue_matches_eager(kernel, sliding_window, packed, scale):
    gen = torch.Generator().manual_seed(2)
    position_ids = packed_position_ids([[5, 9, 2], [3, 13]]) if packed else None
    q, k, v = make_qkv(2, 8, 2, 16, 8, gen, dtype=torch.bfloat16)
    ctx = A.build_context("eager", (2, 16), "cpu", position_ids=position_ids)
    got = A.varlen_attention(q, k, v, ctx, sliding_window, scale=scale, kernel=kernel)
    expected = A.attend(q.float(), k.float(), v.float(), ctx, sliding_window=sliding_window, scale=scale)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert rel_err(got, expected) <= 1e-2  # bf16 rounding of the output; a wrong mask is off by ~1


def test_varlen_refuses_fp32_and_window_without_window_size():
    q, k, v = make_qkv(1, 2, 2, 8, 8, torch.Generator().manual_seed(0))
    ctx = A.build_context("eager", (1, 8), "cpu")
    with pytest.raises(ValueError, match="bf16 or fp16.*'flex' or 'sdpa'"):
        A.varlen_attention(q, k, v, ctx, None, None, kernel=reference_varlen)
    with pytest.raises(ValueError, match="window_size.*use 'flex'"):
        A.varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ctx, 3, None, kernel=old_reference_varlen)


@pytest.mark.cuda  # varlen_attn runs flash attention on CUDA only
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_varlen_on_cuda_matches_eager(sliding_window):
    if A.varlen_attn_fn() is None:
        pytest.skip("the installed torch has no torch.nn.attention.varlen")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 64, 64, gen, dtype=torch.bfloat16))
    position_ids = packed_position_ids([[10, 30, 24], [64]]).cuda()
    got = run("varlen", q, k, v, position_ids=position_ids, sliding_window=sliding_window)
    expected = run("eager", q.float(), k.float(), v.float(), position_ids=position_ids, sliding_window=sliding_window)
    assert rel_err(got, expected) <= 1e-2


# -------------------------------------------------------------------------- models: packed == separate forwards


TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def tiny_model(family: str, implementation: str):
    """A small random model of `family`; windows (4) shorter than most test documents, softcaps that matter."""
    module = pytest.importorskip(f"models.{family}")
    if family == "llama":
        model = module.LlamaForCausalLM(module.LlamaConfig(**TINY, intermediate_size=48, num_key_value_heads=1))
    elif family == "mistral":
        config = module.MistralConfig(**TINY, intermediate_size=48, num_key_value_heads=2, sliding_window=4)
        model = module.MistralForCausalLM(config)
    elif family == "gemma":  # Gemma 2: local (window) and global layers alternate, attention logits soft-capped
        config = module.GemmaConfig(**TINY, intermediate_size=48, num_key_value_heads=2, head_dim=8,
                                    query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=5.0)  # fmt: skip
        model = module.GemmaForCausalLM(config)
    else:  # qwen_moe: routed experts and a shared expert after the attention
        config = module.QwenMoeConfig(**TINY, intermediate_size=48, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24)  # fmt: skip
        model = module.QwenMoeForCausalLM(config)
    model.config.attn_implementation = implementation
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize("implementation", ["eager", "auto"] + CPU_BACKENDS)
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "qwen_moe"])
def test_packed_model_forward_equals_separate_forwards(family, implementation):
    model = tiny_model(family, implementation)
    gen = torch.Generator().manual_seed(9)
    lengths = [[6, 1, 9], [10, 6]]
    input_ids = torch.randint(0, 64, (2, 16), generator=gen)
    position_ids = packed_position_ids(lengths)
    cu_seqlens = torch.tensor([0, 6, 7, 16, 26, 32], dtype=torch.int32)
    if family == "gemma" and implementation == "sdpa":
        with pytest.raises(ValueError, match="soft-caps|softcapping"):
            model(input_ids, position_ids=position_ids)
        return
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids)
        packed_cu = model(input_ids, position_ids=position_ids, cu_seqlens=cu_seqlens)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model(input_ids[row : row + 1, start : start + n])  # (1, n, V)
                assert rel_err(packed[row : row + 1, start : start + n], alone) <= TOL
                start += n
    torch.testing.assert_close(packed_cu, packed, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- benchmark


def test_bench_script_tiny_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "scripts" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--device", "cpu", "--tiny"])
    out = capsys.readouterr().out
    assert "| backend" in out and "sdpa-dense" in out and "all checks passed" in out
