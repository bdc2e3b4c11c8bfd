"""Rotary position embeddings (Su et al., 2021) for q and k in one Triton kernel, in HF's rotate-half layout.

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]   (halves of head_dim)

One program per (batch, position) loads that position's cos / sin once and rotates every query and key head; the
backward is the inverse rotation (the transpose): dx1 = dy1*cos1 + dy2*sin2, dx2 = dy2*cos2 - dy1*sin1.
q (B, Hq, T, D) and k (B, Hkv, T, D) may be strided views (e.g. a transposed projection); the last dim must be dense.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from nanotune.kernels.launch import check_device


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The PyTorch oracle (the model files' `apply_rope`): x (B, H, T, D), cos / sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@triton.jit
def _rope_heads(X, Y, sx_b, sx_h, sx_t, sy_b, sy_h, sy_t, b, t, n_heads, c1, c2, s1, s2, half, BACKWARD: tl.constexpr,
                BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    for h in range(n_heads):
        x_row = X + b * sx_b + h * sx_h + t * sx_t
        y_row = Y + b * sy_b + h * sy_h + t * sy_t
        x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + half + cols, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(y_row + cols, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + half + cols, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, T, n_q_heads, n_k_heads, half,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_b, sc_t,
                 BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    cs_row = b * sc_b + t * sc_t
    c1 = tl.load(COS + cs_row + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs_row + half + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs_row + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs_row + half + cols, mask=mask, other=0.0).to(tl.float32)
    _rope_heads(Q, QO, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, b, t, n_q_heads, c1, c2, s1, s2, half, BACKWARD, BLOCK)
    _rope_heads(K, KO, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, b, t, n_k_heads, c1, c2, s1, s2, half, BACKWARD, BLOCK)


def _launch(q, k, cos, sin, backward: bool):
    B, Hq, T, D = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos.expand(B, T, D)
    sin = sin.expand(B, T, D)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # same strides as the inputs
    half = D // 2
    _rope_kernel[(B * T,)](
        q, k, q_out, k_out, cos, sin, T, Hq, k.shape[1], half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), BACKWARD=backward, BLOCK=triton.next_power_of_2(half),
    )
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        check_device(q)
        if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1] or cos.shape[-1] != q.shape[-1]:
            raise ValueError(f"rope: head dims of q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)} "
                             "must be equal and even")
        ctx.save_for_backward(cos, sin)
        ctx.q_like, ctx.k_like = (q.shape, q.dtype, q.device), (k.shape, k.dtype, k.device)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        if dq is None:  # only one of the outputs was used
            dq = torch.zeros(ctx.q_like[0], dtype=ctx.q_like[1], device=ctx.q_like[2])
        if dk is None:
            dk = torch.zeros(ctx.k_like[0], dtype=ctx.k_like[1], device=ctx.k_like[2])
        dq, dk = _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None  # cos / sin come from positions: no gradient


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, Hq, T, D), k (B, Hkv, T, D), cos / sin (B, T, D) -> rotated (q, k); `rope_reference` on both."""
    return _Rope.apply(q, k, cos, sin)


class TritonRope(nn.Module):
    """Stands in for a model's `Rope` module (no parameters): q and k rotated by one kernel launch."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(q, k, cos, sin)
