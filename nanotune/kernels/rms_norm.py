"""RMSNorm (Zhang & Sennrich, 2019) as one Triton kernel forward and one backward, fp32 inside.

    y = (x / rms(x)) * (weight + offset),   rms(x) = sqrt(mean(x^2) + eps) over the last dim

Two roundings exist in the model files and both are matched:
- Llama, Mistral, Qwen (`cast_before_scale=True`, offset 0): `weight * (x.float() * rstd).to(x.dtype)`;
- Gemma (`cast_before_scale=False`, offset 1): `(x.float() * rstd * (1 + weight.float())).to(x.dtype)`.

The forward reads x once and writes y and one fp32 rstd per row; the backward reads dy, x, rstd and writes dx, with
the weight gradient summed per program in fp32 and reduced over programs at the end:
    dx = rstd * (dy*g - xhat * mean(dy*g*xhat)),  g = weight + offset, xhat = x * rstd;   dweight = sum_rows dy * xhat
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from nanotune.kernels.launch import check_device, num_programs


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast_before_scale: bool = True) -> torch.Tensor:
    """The PyTorch oracle: the model files' two RMSNorm roundings."""
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_scale:
        return (weight + offset) * h.to(x.dtype)
    return (h * (offset + weight.float())).to(x.dtype)


@triton.jit
def _rms_norm_forward(X, W, Y, RSTD, stride_x, stride_y, D, eps, offset,
                      CAST_BEFORE_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    xhat = x * rstd
    if CAST_BEFORE_SCALE:  # round to the input dtype before scaling, as the Llama-style modules do
        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
    g = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(Y + row * stride_y + cols, (xhat * g).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, D, offset,
                       rows_per_program, CAST_BEFORE_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    g = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(rows_per_program):
        row = (first + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            dyg = dy * g
            dx = rstd * (dyg - xhat * (tl.sum(dyg * xhat, axis=0) / D))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if CAST_BEFORE_SCALE:
                xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
            dw += dy * xhat
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, cast_before_scale: bool):
        check_device(x)
        shape, D = x.shape, x.shape[-1]
        x_2d = x.reshape(-1, D)
        if x_2d.stride(-1) != 1:
            x_2d = x_2d.contiguous()
        out_dtype = torch.promote_types(weight.dtype, x.dtype) if cast_before_scale else x.dtype
        y = torch.empty(x_2d.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x_2d.shape[0], dtype=torch.float32, device=x.device)
        BLOCK_D = triton.next_power_of_2(D)
        _rms_norm_forward[(x_2d.shape[0],)](
            x_2d, weight, y, rstd, x_2d.stride(0), y.stride(0), D, eps, offset,
            CAST_BEFORE_SCALE=cast_before_scale, BLOCK_D=BLOCK_D, num_warps=_num_warps(BLOCK_D),
        )
        ctx.save_for_backward(x_2d, weight, rstd)
        ctx.offset, ctx.cast_before_scale, ctx.x_dtype = offset, cast_before_scale, x.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_2d, weight, rstd = ctx.saved_tensors
        D = x_2d.shape[-1]
        dy_2d = dy.reshape(-1, D)
        if dy_2d.stride(-1) != 1:
            dy_2d = dy_2d.contiguous()
        n_rows = x_2d.shape[0]
        programs = num_programs(x_2d.device, n_rows)
        rows_per_program = triton.cdiv(n_rows, programs)
        dx = torch.empty(x_2d.shape, dtype=ctx.x_dtype, device=x_2d.device)
        dw_partial = torch.empty(programs, D, dtype=torch.float32, device=x_2d.device)
        BLOCK_D = triton.next_power_of_2(D)
        _rms_norm_backward[(programs,)](
            dy_2d, x_2d, weight, rstd, dx, dw_partial, dy_2d.stride(0), x_2d.stride(0), dx.stride(0), n_rows, D,
            ctx.offset, rows_per_program, CAST_BEFORE_SCALE=ctx.cast_before_scale, BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_D),
        )
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(dy.shape), dw, None, None, None


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast_before_scale: bool = True) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D); the Triton version of `rms_norm_reference`."""
    return _RMSNorm.apply(x, weight, eps, offset, cast_before_scale)


class TritonRMSNorm(nn.Module):
    """Stands in for a model's RMSNorm: holds the same `weight` Parameter (same name), runs `rms_norm`."""

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0, cast_before_scale: bool = True):
        super().__init__()
        self.weight = weight
        self.eps, self.offset, self.cast_before_scale = eps, offset, cast_before_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.cast_before_scale)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, "
                f"cast_before_scale={self.cast_before_scale}")
