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

Under FSDP2, `gather_weights_in_float8(model)` (before fully_shard) makes FSDP2 all-gather these layers' weights
already cast to e4m3 with the whole weight's tensorwise scale, one byte per element; the products then use the
gathered bytes as they are, so the results are bitwise those of gathering in high precision and casting after.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from nanotune.config import ConfigError
from nanotune.lora import FusedLoRALinear, LoRALinear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
RECIPES = ("tensorwise", "rowwise")
GRAD_DTYPES = ("auto", "e5m2", "e4m3")
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
GEMM_MULTIPLE = 16  # torch._scaled_mm on CUDA needs the contraction and output dimensions in multiples of 16
AMAX_EPS = 1e-12  # an all-zero operand gets a finite scale


# ---------------------------------------------------------------------------------------------------- scaling


def to_float8(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, C) in high precision -> (x_fp8 (R, C), unscale) with x ~= x_fp8 * unscale.

    unscale is a () tensor (tensorwise) or (R, 1) (rowwise: one per row, the amax taken along C). The scale is
    the largest power of two that keeps amax * scale within the FP8 range. With a process `group` (tensorwise only),
    x is one of the group's shards of a tensor, and the amax is the max over all of them: the whole tensor's.
    """
    fp8_max = torch.finfo(dtype).max
    x32 = x.float()
    amax = x32.abs().amax(dim=1, keepdim=True) if rowwise else x32.abs().amax()  # (R, 1) or ()
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)  # exact: a max needs no rounding
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
    a_fp8, a_unscale = cast_operand(a, a_dtype, rowwise)  # (M, K), () or (M, 1)
    b_fp8, b_unscale = cast_operand(b_rows, b_dtype, rowwise)  # (N, K), () or (N, 1)
    # CUDA's rowwise kernels write bf16 only: an fp32 layer's rowwise result is rounded to bf16 there, then cast up
    mm_dtype = torch.bfloat16 if rowwise and a.is_cuda else out_dtype
    out = torch._scaled_mm(a_fp8, b_fp8.t(), scale_a=a_unscale, scale_b=b_unscale.t(), out_dtype=mm_dtype)
    return out.to(out_dtype)  # (M, N)


def cast_operand(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """An operand (R, C) -> (x_fp8 (R, C) row-major, unscale). Row-major copies where the operands are transposed views:
    casts keep their input's layout, and CUDA's kernels want the left operand row-major and the right one
    column-major (b_fp8.t() of a row-major b_fp8). A weight FSDP2 gathered in FP8 comes cast already."""
    if isinstance(x, Float8Weight):
        if rowwise:
            raise ValueError("a weight all-gathered in FP8 has one tensorwise scale; it cannot serve a rowwise product")
        return x.float8()
    return to_float8(x.contiguous(), dtype, rowwise)


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T with the output, input-gradient and weight-gradient products in FP8.

    forward:  y  (M, N) = x  (M, K) @ W (N, K)^T       e4m3 x e4m3, contraction over K
    backward: dx (M, K) = dy (M, N) @ W^T (K, N)^T     grad x e4m3, contraction over N
              dW (N, K) = dy^T (N, M) @ x^T (K, M)^T   grad x e4m3, contraction over M (tokens)
    x and W are saved in high precision and cast again in the backward, along the backward's contraction dimension
    (for rowwise scaling that is a different axis than in the forward). A weight FSDP2 gathered in FP8 (a
    `Float8Weight`, tensorwise) is used as it came in both products: its one scale serves W and W^T alike.
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


# ---------------------------------------------------------------------------------------- FSDP2: gathered in FP8

aten = torch.ops.aten


class Float8GatherShard(torch.Tensor):
    """This process's FSDP2 shard of an FP8 layer's weight, in high precision, which FSDP2 all-gathers in FP8.

    To everything but the all-gather it is its high-precision data: optimizer updates, gradient clipping and
    checkpoints compute on that data and get plain tensors back (an op keeps the wrapper only where it yields a part or
    a copy of the weight itself: FSDP2's sharding, `to_empty`, offloading). FSDP2 calls the two hooks below around
    every all-gather of the weight (torch/distributed/fsdp/_fully_shard/_fsdp_param.py):
    - fsdp_pre_all_gather casts the shard to e4m3 with the tensorwise scale of the whole weight (one all-reduce of
      the shards' amax), so one byte per element goes over the wire instead of two (bf16) or four (fp32);
    - fsdp_post_all_gather wraps the gathered bytes and that scale as a `Float8Weight`, which Float8Linear's products
      take without casting the weight again.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                                   device=data.device, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor):
        self._data = data  # (rows of this shard, in), high precision

    def __repr__(self):
        return f"Float8GatherShard({self._data!r})"

    # ops that yield the weight itself or a part of it: the result is still a shard that gathers in FP8
    KEEPS_WRAPPER = {aten.detach.default, aten.alias.default, aten.view.default, aten.as_strided.default,
                     aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.new_zeros.default,
                     aten.empty_like.default, aten._to_copy.default, aten._pin_memory.default, aten.clone.default}

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        data_args, data_kwargs = tree_map_only(cls, lambda t: t._data, (args, kwargs or {}))
        out = func(*data_args, **data_kwargs)
        if func in cls.KEEPS_WRAPPER:
            return tree_map_only(torch.Tensor, cls, out)
        if isinstance(args[0], cls) and out is data_args[0]:  # an in-place op returns its first argument
            return args[0]
        return out  # plain tensors: optimizer states, norms, checkpoint copies

    __torch_function__ = torch._C._disabled_torch_function_impl

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """-> ((this shard in e4m3,), (unscale,)): what is all-gathered, and what every process already has."""
        weight = self._data.to(mp_policy.param_dtype or self.dtype)  # the values a high-precision gather would send
        rows = -(-outer_size[0] // mesh.size())  # FSDP2 pads every shard to this many rows (uneven sharding)
        if weight.shape[0] < rows:
            weight = F.pad(weight, (0, 0, 0, rows - weight.shape[0]))  # zero rows change no amax
        data, unscale = to_float8(weight, E4M3, rowwise=False, group=mesh.get_group())  # (rows, in), ()
        return (data,), (unscale,)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """The gathered (all rows, in) e4m3 bytes -> the unsharded weight FSDP2 hands to the layer."""
        (data,), (unscale,) = outputs, metadata
        if out is not None:  # later gathers write into the same buffer (out's data): only the scale is new
            out._unscale.copy_(unscale)
            return
        return Float8Weight(data, unscale, param_dtype), ()


class Float8Weight(torch.Tensor):
    """A weight as FSDP2 gathered it in FP8: (out, in) e4m3 data with one tensorwise unscale. To autograd it is a
    tensor of the high-precision dtype (its gradient has that dtype); only Float8Linear's products read it."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, unscale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=dtype,
                                                   device=data.device)

    def __init__(self, data: torch.Tensor, unscale: torch.Tensor, dtype: torch.dtype):
        self._data, self._unscale = data, unscale  # (out, in) e4m3, () fp32

    def __repr__(self):
        return f"Float8Weight({tuple(self.shape)}, {self.dtype} gathered as {self._data.dtype})"

    def float8(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._data.contiguous(), self._unscale

    # what torch.compile needs to trace through the wrapper: its inner tensors and how to rebuild it
    def __tensor_flatten__(self):
        return ["_data", "_unscale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Float8Weight(inner["_data"], inner["_unscale"], dtype)

    # FSDP2 views the gathered buffer as the weight's shape and makes a Parameter of it; the backward transposes it
    VIEWS = {aten.detach.default, aten.alias.default, aten.as_strided.default, aten.t.default}

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        weight = args[0]
        if func in cls.VIEWS:
            return cls(func(weight._data, *args[1:], **(kwargs or {})), weight._unscale, weight.dtype)
        if func in (aten.zeros_like.default, aten.empty_like.default):  # FSDP2's zero gradient for an unused weight
            return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        raise NotImplementedError(f"{func} on a weight all-gathered in FP8 (fp8.fsdp_float8_all_gather): only "
                                  "Float8Linear's products read it")

    __torch_function__ = torch._C._disabled_torch_function_impl


def gather_weights_in_float8(model: nn.Module) -> int:
    """Before FSDP2's fully_shard: make every FP8 layer's weight a `Float8GatherShard`, so that FSDP2 all-gathers it in
    FP8; returns the number of weights. Tensorwise layers only: see `check_config`. Checkpoints see plain tensors."""
    count = 0
    for module in model.modules():
        if isinstance(module, (Float8Linear, Float8LoRALinear)):
            if module.recipe != "tensorwise":
                raise ValueError(f"all-gathering weights in FP8 needs the tensorwise recipe, not {module.recipe!r}")
            weight = module.weight
            module.weight = nn.Parameter(Float8GatherShard(weight.data), requires_grad=weight.requires_grad)
            module.register_state_dict_post_hook(_plain_weight_in_state_dict)
            count += 1
    return count


def _plain_weight_in_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: the weight as the plain (DTensor) tensor it wraps, sharing its storage, so that checkpoints
    (saved and loaded in place by DCP) and final/ never see the wrapper."""
    key = prefix + "weight"
    weight = state_dict[key]
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    if not isinstance(local, Float8GatherShard):
        return
    if local is weight:
        state_dict[key] = local._data
    else:
        from torch.distributed.tensor import DTensor

        state_dict[key] = DTensor.from_local(local._data, weight.device_mesh, weight.placements, run_check=False,
                                             shape=weight.shape, stride=weight.stride())


# ---------------------------------------------------------------------------------------------------- applying


def eligible(module: nn.Module, min_dim: int) -> bool:
    """Dimensions FP8 GEMMs take (multiples of 16) and big enough to gain (at least min_dim each)."""
    dims = (module.in_features, module.out_features)
    return all(d % GEMM_MULTIPLE == 0 and d >= min_dim for d in dims)


def apply_fp8(model: nn.Module, recipe: str = "tensorwise", skip=("lm_head",), min_dim: int = 0,
              grad_dtype: str = "auto") -> list[str]:
    """Swap the plain linear layers and LoRA layers of `model` for FP8 ones in place; returns the swapped names.

    skip: module-name suffixes left in high precision (the LM head, MoE routers). Layers with a dimension that is not
    a multiple of 16 or smaller than `min_dim` stay too. NF4 (QLoRA) layers are never swapped; LoRA on a fused
    projection (nanotune/lora.py `FusedLoRALinear`) is refused unless skipped. Works on the meta
    device and on a loaded model alike (nothing is allocated: the swap takes over the existing Parameters).
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8.recipe = {recipe!r} is not one of {RECIPES}")
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"fp8.grad_dtype = {grad_dtype!r} is not one of {GRAD_DTYPES}")
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedLoRALinear) and not _ends_with(name, skip):
            raise ValueError(f"{name}: FP8 does not swap LoRA on fused projections (model.fuse_projections with "
                             "lora.enabled); leave the projections unfused for FP8 with LoRA, or name it in skip")
        plain, adapted = type(module) is nn.Linear, type(module) is LoRALinear
        if not (plain or adapted) or _ends_with(name, skip) or not eligible(module, min_dim):
            continue
        new = Float8Linear(module, recipe, grad_dtype) if plain else float8_lora(module, recipe, grad_dtype)
        model.set_submodule(name, new)
        swapped.append(name)
    return swapped


def check_config(cfg, device: torch.device, lora_quantize: str = "", dp_shard: int = 1, dora: bool = False) -> None:
    """Refuse an [fp8] section that cannot run here, before any data or weights are read. dp_shard: the processes
    FSDP2 shards over (parallel.dp_shard as resolved); dora: lora.enabled and lora.dora."""
    if cfg.fsdp_float8_all_gather:
        check_float8_all_gather(cfg, dp_shard, dora)
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


def check_float8_all_gather(cfg, dp_shard: int, dora: bool) -> None:
    key = "fp8.fsdp_float8_all_gather = true"
    if not cfg.enabled:
        raise ConfigError(f"{key} gathers the weights of FP8 layers, but fp8.enabled = false; enable FP8 or set "
                          "fp8.fsdp_float8_all_gather = false")
    if cfg.recipe != "tensorwise":
        raise ConfigError(
            f"{key} needs fp8.recipe = 'tensorwise', not {cfg.recipe!r}: rowwise casts the weight per input column "
            "for the input gradient, a max over the output rows that FSDP2 spreads over the processes, so a weight "
            "gathered in FP8 with per-row scales cannot serve that product exactly; use tensorwise, or set "
            "fp8.fsdp_float8_all_gather = false")
    if dp_shard < 2:
        raise ConfigError(f"{key} changes how FSDP2 all-gathers sharded weights, but this run shards over "
                          f"{dp_shard} process (parallel.dp_shard = {dp_shard}); launch several processes with "
                          "parallel.dp_shard > 1, or set fp8.fsdp_float8_all_gather = false")
    if dora:
        raise ConfigError(f"{key} with lora.dora = true is not supported (DoRA reads the base weight in high "
                          "precision for its norms); set lora.dora = false or fp8.fsdp_float8_all_gather = false")


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

