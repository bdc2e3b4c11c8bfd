"""FP8 training of linear layers through `torch._scaled_mm`, as an in-place swap (like LoRA).

A linear layer y = x W^T + b does three matrix products per step: the output (x W^T), the input gradient (dy W) and
the weight gradient (dy^T x). `Float8Linear` runs all three on FP8 operands (Micikevicius et al. 2022, "FP8 formats
for deep learning", https://arxiv.org/abs/2209.05433) with dynamic scaling: just before each product, each operand is
scaled so that its largest magnitude lands at the top of the FP8 range, cast, and multiplied; `torch._scaled_mm`
undoes the scales in its fp32 accumulator and returns the high-precision result.

    swapped = apply_fp8(model, recipe="tensorwise", skip=["lm_head"], min_dim=1024)  # after LoRA, before sharding

Two scaling recipes:
- tensorwise: one scale per operand tensor.
- rowwise: one scale per row of the left operand and one per column of the right operand, i.e. per slice along the
  contraction dimension of each product, so one outlier token or channel costs precision only in its own row.
Forward operands are e4m3 (3 mantissa bits, range +-448); the output gradient is e5m2 (range +-57344, for the wider
spread of gradients) or e4m3, as configured. Scales are rounded down to a power of two, so that scaling and unscaling
are exact and the only rounding is the FP8 cast itself.

What stays in high precision: the parameters (the swap keeps the very same `weight` and `bias` Parameters, so state
dicts, optimizer states and checkpoints are exactly those of the plain model), the bias add, the LM head, MoE routers,
stacked MoE experts, embeddings, norms and attention. Only the operands of the three products are FP8, and only for
the duration of each product.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanotune.config import ConfigError
from nanotune.lora import LoRALinear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
RECIPES = ("tensorwise", "rowwise")
GRAD_DTYPES = ("auto", "e5m2", "e4m3")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
GEMM_MULTIPLE = 16  # torch._scaled_mm on CUDA needs the contraction and output dimensions in multiples of 16
AMAX_EPS = 1e-12  # an all-zero operand gets a finite scale


# ---------------------------------------------------------------------------------------------------- scaling


def to_float8(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) in high precision -> (x_fp8 (R, C), unscale) with x ~= x_fp8 * unscale.

    unscale is a () tensor (tensorwise) or (R, 1) (rowwise: one per row, the amax taken along C). The scale is
    the largest power of two that keeps amax * scale within the FP8 range.
    """
    fp8_max = torch.finfo(dtype).max
    x32 = x.float()
    amax = x32.abs().amax(dim=1, keepdim=True) if rowwise else x32.abs().amax()  # (R, 1) or ()
    scale = torch.exp2(torch.floor(torch.log2(fp8_max / amax.clamp(min=AMAX_EPS))))
    x_fp8 = (x32 * scale).clamp(-fp8_max, fp8_max).to(dtype)  # the clamp guards rounding at the top of the range
    return x_fp8, scale.reciprocal()


def scaled_matmul(a: torch.Tensor, b_rows: torch.Tensor, a_dtype: torch.dtype, b_dtype: torch.dtype, rowwise: bool,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b_rows (N, K)^T -> (M, N) in out_dtype, both operands cast to FP8 along their K dimension.

    `b_rows` holds the right operand's columns as rows, so its rowwise scales are per column of the product and its
    transpose is the column-major layout `torch._scaled_mm` wants for its second argument.
    """
    K = a.shape[1]
    if K % GEMM_MULTIPLE:  # zero columns change neither the amax nor the product (only the weight gradient pads: K=M)
        pad = GEMM_MULTIPLE - K % GEMM_MULTIPLE
        a, b_rows = F.pad(a, (0, pad)), F.pad(b_rows, (0, pad))
    # row-major copies where the operands are transposed views: casts keep their input's layout, and CUDA's kernels
    # want the left operand row-major and the right one column-major (b_fp8.t() of a row-major b_fp8)
    a_fp8, a_unscale = to_float8(a.contiguous(), a_dtype, rowwise)  # (M, K), () or (M, 1)
    b_fp8, b_unscale = to_float8(b_rows.contiguous(), b_dtype, rowwise)  # (N, K), () or (N, 1)
    # CUDA's rowwise kernels write bf16 only: an fp32 layer's rowwise result is rounded to bf16 there, then cast up
    mm_dtype = torch.bfloat16 if rowwise and a.is_cuda else out_dtype
    out = torch._scaled_mm(a_fp8, b_fp8.t(), scale_a=a_unscale, scale_b=b_unscale.t(), out_dtype=mm_dtype)
    return out.to(out_dtype)  # (M, N)


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T with the output, input-gradient and weight-gradient products in FP8.

    forward:  y  (M, N) = x  (M, K) @ W (N, K)^T       e4m3 x e4m3, contraction over K
    backward: dx (M, K) = dy (M, N) @ W^T (K, N)^T     grad x e4m3, contraction over N
              dW (N, K) = dy^T (N, M) @ x^T (K, M)^T   grad x e4m3, contraction over M (tokens)
    x and W are saved in high precision and cast again in the backward, along the backward's contraction dimension
    (for rowwise scaling that is a different axis than in the forward).
    """

    @staticmethod
    def forward(ctx, x_MK, weight_NK, rowwise: bool, grad_dtype: torch.dtype, out_dtype: torch.dtype):
        ctx.save_for_backward(x_MK, weight_NK)
        ctx.rowwise, ctx.grad_dtype = rowwise, grad_dtype
        return scaled_matmul(x_MK, weight_NK, E4M3, E4M3, rowwise, out_dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, weight_NK = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = scaled_matmul(dy_MN, weight_NK.t(), ctx.grad_dtype, E4M3, ctx.rowwise, x_MK.dtype)  # (M, K)
        if ctx.needs_input_grad[1]:  # frozen weights (a LoRA base) skip the third product
            dw = scaled_matmul(dy_MN.t(), x_MK.t(), ctx.grad_dtype, E4M3, ctx.rowwise, weight_NK.dtype)  # (N, K)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rowwise: bool,
               grad_dtype: torch.dtype) -> torch.Tensor:
    """F.linear with its products in FP8: x (..., in), weight (out, in) -> (..., out).

    The result has x's dtype, or the autocast dtype inside autocast (amp-bf16), as F.linear would.
    """
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):  # the dtypes here are chosen explicitly
        y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, rowwise, grad_dtype, out_dtype)  # (M, out)
        y = y.view(*x.shape[:-1], weight.shape[0])  # (..., out)
        return y if bias is None else y + bias.to(y.dtype)


# ---------------------------------------------------------------------------------------------------- modules


class Float8Linear(nn.Module):
    """A linear layer whose matrix products run in FP8; weight and bias are the original Parameters, unchanged."""

    def __init__(self, base: nn.Linear, recipe: str = "tensorwise", grad_dtype: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,): same names, dtype and requires_grad
        self.recipe, self.grad_dtype = recipe, resolve_grad_dtype(recipe, grad_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe == "rowwise", self.grad_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"recipe={self.recipe}, grad={self.grad_dtype}")


class Float8LoRALinear(LoRALinear):
    """LoRALinear whose frozen base product runs in FP8; the adapter path (A, B, DoRA) stays in high precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = fp8_linear(x, self.weight, self.bias, self.recipe == "rowwise", self.grad_dtype)
        return self._adapter_forward(x, base_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 base: recipe={self.recipe}, grad={self.grad_dtype}"


def float8_lora(module: nn.Module, recipe: str, grad_dtype: str) -> nn.Module:
    """The same LoRA layer (every Parameter, adapter and setting taken over as is) with an FP8 base product."""
    new = Float8LoRALinear.__new__(Float8LoRALinear)
    nn.Module.__init__(new)
    new.__dict__.update(vars(module))  # parameters, submodules and settings of the LoRA layer: nothing is copied
    new.recipe, new.grad_dtype = recipe, resolve_grad_dtype(recipe, grad_dtype)
    return new


def resolve_grad_dtype(recipe: str, grad_dtype: str) -> torch.dtype:
    """auto: e5m2 for tensorwise (the usual choice); e4m3 for rowwise (some CUDA builds' rowwise kernels take e4m3
    operands only)."""
    if grad_dtype == "auto":
        grad_dtype = "e4m3" if recipe == "rowwise" else "e5m2"
    return FP8_DTYPES[grad_dtype]


# ---------------------------------------------------------------------------------------------------- applying


def eligible(module: nn.Module, min_dim: int) -> bool:
    """Dimensions FP8 GEMMs take (multiples of 16) and big enough to gain (at least min_dim each)."""
    dims = (module.in_features, module.out_features)
    return all(d % GEMM_MULTIPLE == 0 and d >= min_dim for d in dims)


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", skip=("lm_head",), min_dim: int = 0,
              grad_dtype: str = "auto") -> list[str]:
    """Swap the plain linear layers and LoRA layers of `model` for FP8 ones in place; returns the swapped names.

    skip: module-name suffixes left in high precision (the LM head, MoE routers). Layers with a dimension that is not
    a multiple of 16 or smaller than `min_dim` stay too. NF4 (QLoRA) layers are never swapped. Works on the meta
    device and on a loaded model alike (nothing is allocated: the swap takes over the existing Parameters).
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8.recipe = {recipe!r} is not one of {RECIPES}")
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"fp8.grad_dtype = {grad_dtype!r} is not one of {GRAD_DTYPES}")
    swapped = []
    for name, module in list(model.named_modules()):
        plain, adapted = type(module) is nn.Linear, type(module) is LoRALinear
        if not (plain or adapted) or _ends_with(name, skip) or not eligible(module, min_dim):
            continue
        new = Float8Linear(module, recipe, grad_dtype) if plain else float8_lora(module, recipe, grad_dtype)
        model.set_submodule(name, new)
        swapped.append(name)
    return swapped


def check_config(cfg, device: torch.device, lora_quantize: str = "") -> None:
    """Refuse an [fp8] section that cannot run here, before any data or weights are read."""
    if not cfg.enabled:
        return
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"fp8.recipe = {cfg.recipe!r} is not one of {RECIPES}")
    if cfg.grad_dtype not in GRAD_DTYPES:
        raise ConfigError(f"fp8.grad_dtype = {cfg.grad_dtype!r} is not one of {GRAD_DTYPES}")
    if cfg.min_dim < 0:
        raise ConfigError(f"fp8.min_dim must be at least 0, got {cfg.min_dim}")
    if lora_quantize:
        raise ConfigError(f"fp8.enabled = true with lora.quantize = {lora_quantize!r}: an NF4 base cannot also be FP8; "
                          "set fp8.enabled = false for QLoRA (FP8 with plain LoRA puts the frozen base in FP8)")
    check_device(device)


def check_device(device: torch.device) -> None:
    """FP8 matrix products need CUDA compute capability 8.9 or newer; the CPU runs them too (slowly: for tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(f"fp8.enabled = true needs a CUDA GPU (or the CPU, for tests), not {device.type}; "
                          "set fp8.enabled = false")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        needed, has = ".".join(map(str, MIN_CAPABILITY)), ".".join(map(str, capability))
        raise ConfigError(f"fp8.enabled = true needs FP8 matrix cores (CUDA compute capability {needed} or newer: Ada, "
                          f"Hopper, Blackwell), but {name} has {has}; set fp8.enabled = false")


def apply_from_config(model: nn.Module, cfg) -> list[str]:
    """The trainer's swap stage for an [fp8] section (after LoRA, before sharding and compile)."""
    if not cfg.enabled:
        return []
    swapped = apply_fp8(model, cfg.recipe, cfg.skip, cfg.min_dim, cfg.grad_dtype)
    if not swapped:
        raise ConfigError(f"fp8.enabled = true but no linear layer qualifies (fp8.min_dim = {cfg.min_dim}, dimensions "
                          f"must be multiples of {GEMM_MULTIPLE}); lower fp8.min_dim or set fp8.enabled = false")
    return swapped


def _ends_with(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)

