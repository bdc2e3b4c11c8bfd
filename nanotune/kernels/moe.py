"""The glue around a MoE layer's two grouped GEMMs as Triton kernels: permute, SwiGLU, weighted un-permute.

    x (N, D) --permute--> (N*K, D) in expert order --grouped GEMM gate_up--> (N*K, 2I) --SwiGLU--> (N*K, I)
             --grouped GEMM down--> (N*K, D) --un-permute, weighted--> out (N, D)

The grouped GEMMs are the model's own (`Experts.project`: torch._grouped_mm or its fallback); this file replaces the
PyTorch ops between them. Every token's K (token, expert) slots have a place in expert order, `pos (N, K)` (the inverse
of the sort of `sort_by_expert`). Each kernel runs one program per token and touches only that token's K rows:
- permute:    xs[pos[n, k]] = x[n]                        backward: dx[n] = sum_k dxs[pos[n, k]]
- un-permute: out[n] = sum_k w[n, k] * h[pos[n, k]]        backward: dh[pos[n, k]] = w[n, k] * dout[n],
                                                                      dw[n, k] = <dout[n], h[pos[n, k]]>
pos is a permutation, so every written row has exactly one writer: the backward sums gather a token's rows instead of
adding into shared rows, no atomics, and results and gradients are the same in every run. SwiGLU reads the packed
(N*K, 2I) rows in place (glu.py's `glu_halves_forward`). Sums and products in fp32.

Each kernel is wrapped in a torch.library custom operator with a shape function and its backward registered, so
torch.compile sees one node per kernel (the shapes follow from the input shapes alone) and traces a decoder block with
this path into one graph; this holds for Triton's interpreter on CPU too, where a raw kernel launch would be traced
into. Nothing here reads a value back to the host.

`TritonExperts` stands in for the model's plain `Experts` (swapped by `apply_kernels(model, moe=True)`): the same
Parameters, the same grouped GEMMs, these kernels between them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from models.qwen_moe import Experts, sort_by_expert
from nanotune.kernels.glu import glu_halves_backward, glu_halves_forward
from nanotune.kernels.launch import check_device

# ------------------------------------------------------------------------------------------ PyTorch references


def expert_positions(order: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """order (N*K,): slot n*K + k of each row in expert order (`sort_by_expert`) -> pos (N, K): the row of expert
    order that slot (n, k) went to. A copy to distinct places, on the device."""
    rows = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).index_copy_(0, order, rows).view(num_tokens, top_k)


def permute_reference(x_ND: torch.Tensor, pos_NK: torch.Tensor) -> torch.Tensor:
    """Row pos[n, k] of the result is x[n]: (N, D) -> (N*K, D) in expert order (the model's `x[token]`)."""
    K = pos_NK.shape[1]
    out = x_ND.new_empty(pos_NK.numel(), x_ND.shape[1])
    return out.index_copy(0, pos_NK.flatten(), x_ND.repeat_interleave(K, dim=0))


def swiglu_reference(h_M2I: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the packed (M, 2I) rows -> (M, I), as `Experts.forward` computes it."""
    gate, up = h_M2I.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def unpermute_reference(h_MD: torch.Tensor, pos_NK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_k w[n, k] * h[pos[n, k]]: (N*K, D) in expert order -> (N, D) (the model's `combine`)."""
    return (weight_NK.to(h_MD.dtype)[:, :, None] * h_MD[pos_NK]).sum(1)


# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _scatter_rows(X, POS, W, OUT, H, DW, D, K, HAS_WEIGHT: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program n: OUT[pos[n, k]] = (w[n, k] *) X[n] for each k; WEIGHT_GRAD: also DW[n, k] = <X[n], H[pos[n, k]]>."""
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    pos = tl.load(POS + n * K + ks, mask=k_mask, other=0).to(tl.int64)  # (BLOCK_K,) rows in expert order
    if HAS_WEIGHT:
        w = tl.load(W + n * K + ks, mask=k_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_mask = cols < D
        tile_mask = k_mask[:, None] & d_mask[None, :]
        rows = pos[:, None] * D + cols[None, :]  # (BLOCK_K, BLOCK_D)
        x = tl.load(X + n * D + cols, mask=d_mask, other=0.0).to(tl.float32)  # (BLOCK_D,)
        if HAS_WEIGHT:
            y = w[:, None] * x[None, :]
        else:
            y = tl.broadcast_to(x[None, :], (BLOCK_K, BLOCK_D))
        tl.store(OUT + rows, y.to(OUT.dtype.element_ty), mask=tile_mask)
        if WEIGHT_GRAD:
            h = tl.load(H + rows, mask=tile_mask, other=0.0).to(tl.float32)
            dw += tl.sum(h * x[None, :], axis=1)
    if WEIGHT_GRAD:
        tl.store(DW + n * K + ks, dw.to(DW.dtype.element_ty), mask=k_mask)


@triton.jit
def _gather_rows(SRC, POS, W, OUT, D, K, HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program n: OUT[n] = sum_k (w[n, k] *) SRC[pos[n, k]]."""
    n = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    pos = tl.load(POS + n * K + ks, mask=k_mask, other=0).to(tl.int64)
    if HAS_WEIGHT:
        w = tl.load(W + n * K + ks, mask=k_mask, other=0.0).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        d_mask = cols < D
        tile_mask = k_mask[:, None] & d_mask[None, :]
        tile = tl.load(SRC + pos[:, None] * D + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            tile = tile * w[:, None]
        tl.store(OUT + n * D + cols, tl.sum(tile, axis=0).to(OUT.dtype.element_ty), mask=d_mask)


def _blocks(K: int, D: int) -> dict:
    """A (BLOCK_K, BLOCK_D) tile of about 4096 values a program holds at once; D is covered in a loop."""
    block_k = triton.next_power_of_2(K)
    return dict(BLOCK_K=block_k, BLOCK_D=min(triton.next_power_of_2(D), max(16, 4096 // block_k)))


def _check(rows: torch.Tensor, pos_NK: torch.Tensor, weight_NK: torch.Tensor | None = None) -> None:
    check_device(rows)
    if rows.dim() != 2 or pos_NK.dim() != 2 or pos_NK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe kernels: rows must be (rows, D) and pos (N, K) integers, got {tuple(rows.shape)} and "
                         f"{tuple(pos_NK.shape)} {pos_NK.dtype}")
    if weight_NK is not None and weight_NK.shape != pos_NK.shape:
        raise ValueError(f"moe kernels: routing weights {tuple(weight_NK.shape)} must have pos's shape "
                         f"{tuple(pos_NK.shape)}")


# ----------------------------------------------------------------- operators (one node each for torch.compile)


@torch.library.custom_op("nanotune::moe_permute", mutates_args=())
def _permute(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    _check(x, pos)
    x, pos = x.contiguous(), pos.contiguous()
    (N, K), D = pos.shape, x.shape[1]
    out = x.new_empty(N * K, D)
    if N:
        _scatter_rows[(N,)](x, pos, x, out, x, x, D, K, HAS_WEIGHT=False, WEIGHT_GRAD=False, **_blocks(K, D))
    return out


@_permute.register_fake
def _(x, pos):
    return x.new_empty(pos.numel(), x.shape[1])


def _slot_sums(rows: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """out[n] = sum_k (weight[n, k] *) rows[pos[n, k]], (N, D): one program per token, reading its K rows."""
    has_weight = weight is not None
    rows, pos = rows.contiguous(), pos.contiguous()
    weight = weight.contiguous() if has_weight else rows  # without weights: a placeholder the kernel does not read
    (N, K), D = pos.shape, rows.shape[1]
    out = rows.new_empty(N, D)
    if N:
        _gather_rows[(N,)](rows, pos, weight, out, D, K, HAS_WEIGHT=has_weight, **_blocks(K, D))
    return out


@torch.library.custom_op("nanotune::moe_sum_slots", mutates_args=())
def _sum_slots(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The backward of permute: each token's K rows summed, (N*K, D) -> (N, D)."""
    _check(rows, pos)
    return _slot_sums(rows, pos, None)


@_sum_slots.register_fake
def _(rows, pos):
    return rows.new_empty(pos.shape[0], rows.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_backward(ctx, grad):
    (pos,) = ctx.saved_tensors
    return _sum_slots(grad, pos), None


_permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("nanotune::moe_unpermute", mutates_args=())
def _unpermute(h: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    _check(h, pos, weight)
    return _slot_sums(h, pos, weight)


@_unpermute.register_fake
def _(h, pos, weight):
    return h.new_empty(pos.shape[0], h.shape[1])


@torch.library.custom_op("nanotune::moe_unpermute_backward", mutates_args=())
def _unpermute_backward_op(grad: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor,
                           weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dh (N*K, D), dw (N, K), or an empty tensor when the routing weights need no gradient)."""
    _check(grad, pos, weight)
    grad, h, pos, weight = grad.contiguous(), h.contiguous(), pos.contiguous(), weight.contiguous()
    (N, K), D = pos.shape, grad.shape[1]
    dh = torch.empty_like(h)
    dw = weight.new_empty(N, K) if weight_grad else weight.new_empty(0)
    if N:
        _scatter_rows[(N,)](grad, pos, weight, dh, h, dw, D, K, HAS_WEIGHT=True, WEIGHT_GRAD=weight_grad,
                            **_blocks(K, D))
    return dh, dw


@_unpermute_backward_op.register_fake
def _(grad, h, pos, weight, weight_grad):
    return torch.empty_like(h), weight.new_empty(pos.shape if weight_grad else (0,))


def _unpermute_setup(ctx, inputs, output):
    h, pos, weight = inputs
    ctx.save_for_backward(h, pos, weight)


def _unpermute_backward(ctx, grad):
    h, pos, weight = ctx.saved_tensors
    weight_grad = ctx.needs_input_grad[2]
    dh, dw = _unpermute_backward_op(grad, h, pos, weight, weight_grad)
    return dh, None, dw if weight_grad else None


_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


@torch.library.custom_op("nanotune::moe_swiglu", mutates_args=())
def _swiglu(h: torch.Tensor) -> torch.Tensor:
    return glu_halves_forward(h, "silu")


@_swiglu.register_fake
def _(h):
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("nanotune::moe_swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return glu_halves_backward(grad, h, "silu")


@_swiglu_backward_op.register_fake
def _(grad, h):
    return torch.empty_like(h)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return _swiglu_backward_op(grad, h)


_swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


# ---------------------------------------------------------------------------------------------- public functions


def permute(x_ND: torch.Tensor, pos_NK: torch.Tensor) -> torch.Tensor:
    """x (N, D) -> (N*K, D), row pos[n, k] = x[n]; the Triton version of `permute_reference`."""
    return _permute(x_ND, pos_NK)


def swiglu(h_M2I: torch.Tensor) -> torch.Tensor:
    """Packed (M, 2I) gate / up rows -> silu(gate) * up (M, I); the Triton version of `swiglu_reference`."""
    if h_M2I.dim() != 2 or h_M2I.shape[1] % 2:
        raise ValueError(f"swiglu: expected (M, 2I) rows, got {tuple(h_M2I.shape)}")
    return _swiglu(h_M2I)


def unpermute(h_MD: torch.Tensor, pos_NK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """(N*K, D) in expert order -> (N, D), out[n] = sum_k w[n, k] * h[pos[n, k]]; `unpermute_reference` in Triton.
    Gradients for h and for the routing weights (in the weights' dtype)."""
    return _unpermute(h_MD, pos_NK, weight_NK)


class TritonExperts(Experts):
    """Stands in for the model's plain `Experts`: the very same `gate_up_proj` / `down_proj` Parameters and grouped
    GEMMs (`Experts.project`), with the permute, SwiGLU and weighted un-permute in the kernels above."""

    def __init__(self, base: Experts):
        nn.Module.__init__(self)
        self.num_experts = base.num_experts
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.use_grouped_mm = base.use_grouped_mm  # the choice made when the weights were materialised
        self.train(base.training)

    def forward(self, x_ND: torch.Tensor, expert_NK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
        """x (N, D); each token's K chosen experts and their weights (N, K) -> sum_k weight * expert_k(x), (N, D)."""
        if self.use_grouped_mm is None:
            self.choose_kernel(x_ND.device)
        N, K = expert_NK.shape
        order, _, counts = sort_by_expert(expert_NK, self.num_experts)  # (N*K,), (E,)
        pos = expert_positions(order, N, K)  # (N, K) row of each slot in expert order
        h = self.project("gate_up_proj", permute(x_ND, pos), counts)  # (N*K, 2I)
        h = self.project("down_proj", swiglu(h), counts)  # (N*K, D)
        return unpermute(h, pos, weight_NK).to(x_ND.dtype)  # (N, D)
