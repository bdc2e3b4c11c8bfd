"""The gated activations of the MLPs as one elementwise Triton kernel each way (Shazeer, 2020, "GLU Variants").

    SwiGLU (Llama, Mistral, Qwen):  h = silu(gate) * up,        silu(g) = g * sigmoid(g)
    GeGLU  (Gemma):                 h = gelu_tanh(gate) * up,   gelu_tanh(g) = g/2 * (1 + tanh(c (g + 0.044715 g^3)))

Eager PyTorch runs two or three kernels and keeps gate, act(gate) and up for the backward; here one kernel reads gate
and up and writes h, the backward recomputes act(gate) from gate, so only gate and up are kept. Math in fp32.
`glu_halves_forward` / `_backward` do the same on the MoE experts' packed (M, 2I) rows, gate and up side by side as
one grouped GEMM writes them, without splitting them into two tensors first (nanotune/kernels/moe.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from nanotune.kernels.launch import check_device

ACTIVATIONS = ("silu", "gelu_tanh")
_SQRT_2_OVER_PI = 0.7978845608028654


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """The PyTorch oracle, as the model files compute it."""
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh") * up


@triton.jit
def _tanh(z):
    # tanh via the sigmoid (no libdevice, so the same code runs in the interpreter); exact in fp32 to ~1 ulp
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """act(g) in fp32."""
    if ACTIVATION == "silu":
        act = g * tl.sigmoid(g)
    else:
        act = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    return act


@triton.jit
def _activation_and_derivative(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(g)
        act = g * s
        dact = s * (1.0 + g * (1.0 - s))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        act = 0.5 * g * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * g * g)
    return act, dact


@triton.jit
def _glu_forward(G, U, H, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + offs, (_activation(g, ACTIVATION) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _glu_backward(DH, G, U, DG, DU, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation_and_derivative(g, ACTIVATION)
    tl.store(DG + offs, (dh * u * dact).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * act).to(DU.dtype.element_ty), mask=mask)


# The packed layout of the MoE experts: gate and up side by side in one (M, 2I) row, as one GEMM against the stacked
# [gate_proj; up_proj] weight writes them. Program (m, j) takes columns [j*BLOCK, (j+1)*BLOCK) of row m: h[m, c] reads
# x[m, c] and x[m, I + c]; the backward writes the two halves of dx in place of a concatenation.
@triton.jit
def _glu_halves_forward(X, H, width, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x_row = X + row * 2 * width  # x (M, 2I)
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + row * width + cols, (_activation(g, ACTIVATION) * u).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _glu_halves_backward(DH, X, DX, width, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x_row, dx_row = X + row * 2 * width, DX + row * 2 * width
    dh = tl.load(DH + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    act, dact = _activation_and_derivative(g, ACTIVATION)
    tl.store(dx_row + cols, (dh * u * dact).to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_row + width + cols, (dh * act).to(DX.dtype.element_ty), mask=mask)


_BLOCK = 1024


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation: str):
        check_device(gate)
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        n = gate.numel()
        _glu_forward[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, ACTIVATION=activation, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _glu_backward[(triton.cdiv(n, _BLOCK),)](dh, gate, up, d_gate, d_up, n, ACTIVATION=ctx.activation, BLOCK=_BLOCK)
        return d_gate, d_up, None


def glu_halves_forward(x: torch.Tensor, activation: str) -> torch.Tensor:
    """x (M, 2I), gate in the first I columns and up in the last I -> act(gate) * up (M, I). No autograd: the MoE
    path (moe.py) wraps it, with `glu_halves_backward`, in an operator torch.compile sees as one node."""
    check_device(x)
    x = x.contiguous()
    M, width = x.shape[0], x.shape[1] // 2
    h = x.new_empty(M, width)
    if h.numel():
        block = min(triton.next_power_of_2(width), _BLOCK)
        _glu_halves_forward[(M, triton.cdiv(width, block))](x, h, width, ACTIVATION=activation, BLOCK=block)
    return h


def glu_halves_backward(dh: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """The gradient of `glu_halves_forward` with respect to x (M, 2I), from dh (M, I) and x."""
    x, dh = x.contiguous(), dh.contiguous()
    dx = torch.empty_like(x)
    M, width = dh.shape
    if dh.numel():
        block = min(triton.next_power_of_2(width), _BLOCK)
        _glu_halves_backward[(M, triton.cdiv(width, block))](dh, x, dx, width, ACTIVATION=activation, BLOCK=block)
    return dx


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU); the Triton version of `glu_reference`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    return _GLU.apply(gate, up, activation)


class TritonGLUMLP(nn.Module):
    """Stands in for a model's gated MLP: the same gate_proj / up_proj / down_proj modules (same parameter names,
    LoRA layers included), with the activation and product in one kernel."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class TritonFusedGLUMLP(nn.Module):
    """TritonGLUMLP for a model with fused projections (models/fusion.py): gate and up are the two halves of one
    gate_up_proj product (the kernel reads contiguous copies of them)."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., F) each
        return self.down_proj(glu(gate, up, self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
