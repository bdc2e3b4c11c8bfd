"""Quantisation-aware training (QAT): train with the serving quantisation simulated, then export it.

A model served with int4 weights loses accuracy when it was trained in full precision and rounded afterwards. QAT
(Jacob et al. 2018, https://arxiv.org/abs/1712.05877; the int8-activation / int4-weight scheme of LLM-QAT, Liu et al.
2023, https://arxiv.org/abs/2305.17888) runs every forward pass through "fake quantisation": each linear layer's weight
(and, with int8-int4, its input) is rounded to the integer grid and straight back to floats, so the loss sees the
rounding. Rounding has no useful gradient, so the backward treats it as the identity (the straight-through estimator,
Bengio et al. 2013) and the full-precision weights keep learning.

    swapped = apply_qat(model, scheme="int8-int4", group_size=32, skip=["lm_head"])
    set_fake_quant(model, step >= start_step)       # the trainer may train the first steps without it
    export_quantized("out/final", cfg)              # -> out/final/quantized: packed int4 weights + scales
    model = load_quantized("out/final/quantized")   # a nanotune model that computes what was trained

The grids: weights symmetric int4 in [-8, 7], one fp32 scale amax/7 per group of `group_size` consecutive input
features of each output row; activations (int8-int4 only) asymmetric int8 in [-128, 127] with a scale and a zero
point per token (per row of the input), computed on the fly from that token's min and max.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import models
from nanotune.config import ConfigError

SCHEMES = ("int8-int4", "int4")
GROUP_SIZES = (32, 64, 128)
INT4_MIN, INT4_MAX = -8, 7
INT8_MIN, INT8_MAX = -128, 127
SCALE_EPS = 1e-12  # an all-zero group or token gets a finite scale
EXPORT_DIR = "quantized"
EXPORT_CONFIG = "quantization_config.json"
EXPORT_FORMAT = "nanotune-int4-grouped-v1"


# ---------------------------------------------------------------------------------------------------- the grids


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (q (out, in) int8 holding values in [-8, 7], scale (out, in // group_size) fp32)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)  # (out, G, g)
    scale = groups.abs().amax(dim=-1).clamp(min=SCALE_EPS) / INT4_MAX  # (out, G)
    q = torch.round(groups / scale.unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX)  # (out, G, g)
    return q.reshape(out_features, in_features).to(torch.int8), scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q (out, in), scale (out, G)) -> the weight those stand for, (out, in) fp32."""
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, in_features // group_size, group_size)  # (out, G, g)
    return (groups * scale.unsqueeze(-1)).reshape(out_features, in_features)


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight rounded to its int4 grid and back, (out, in) in weight's dtype; gradients pass straight through."""
    q, scale = quantize_int4(weight.detach(), group_size)
    return straight_through(weight, dequantize_int4(q, scale, group_size).to(weight.dtype))


def fake_quantize_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) with each token (row) rounded to its own asymmetric int8 grid and back; straight-through gradient.

    The grid covers [min(x_row, 0), max(x_row, 0)] in 255 steps; the zero point makes 0.0 exactly representable.
    """
    x32 = x.detach().float()
    low = x32.amin(dim=-1, keepdim=True).clamp(max=0)  # (..., 1)
    high = x32.amax(dim=-1, keepdim=True).clamp(min=0)  # (..., 1)
    scale = (high - low).clamp(min=SCALE_EPS) / (INT8_MAX - INT8_MIN)  # (..., 1)
    zero_point = INT8_MIN - torch.round(low / scale)  # (..., 1), an integer in [-128, 127]
    q = (torch.round(x32 / scale) + zero_point).clamp(INT8_MIN, INT8_MAX)  # (..., D)
    return straight_through(x, ((q - zero_point) * scale).to(x.dtype))


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` in the forward, the identity in the backward (the straight-through estimator)."""
    return x + (rounded - x).detach()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8 in [-8, 7] -> (out, in // 2) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    nibbles = (q.to(torch.int16) - INT4_MIN).to(torch.uint8)  # [0, 15]
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (out, in // 2) uint8 -> (out, in) int8 in [-8, 7]."""
    low, high = packed & 0x0F, packed >> 4
    nibbles = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)  # (out, in): low, high, low, ...
    return (nibbles.to(torch.int16) + INT4_MIN).to(torch.int8)


# ---------------------------------------------------------------------------------------------------- the module


class QATLinear(nn.Module):
    """A linear layer that sees fake-quantised weights (and inputs) once `fake_quant` is on; weight and bias are the
    original Parameters, so state dicts, optimizer states and checkpoints are those of the plain model."""

    def __init__(self, base: nn.Linear, scheme: str = "int8-int4", group_size: int = 32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,)
        self.scheme, self.group_size = scheme, group_size
        self.fake_quant = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant:
            return F.linear(x, self.weight, self.bias)
        if self.scheme == "int8-int4":
            x = fake_quantize_int8_per_token(x)  # (..., in)
        return F.linear(x, fake_quantize_int4(self.weight, self.group_size), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, group_size={self.group_size}, fake_quant={self.fake_quant}")


def apply_qat(model: nn.Module, scheme: str = "int8-int4", group_size: int = 32, skip=("lm_head",),
              names: list[str] | None = None) -> list[str]:
    """Swap plain linear layers for QATLinear in place (fake quantisation on); returns the swapped names.

    skip: module-name suffixes left alone; layers whose input dimension is not a multiple of group_size stay too.
    names: swap exactly these modules instead (what an export recorded).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"qat.scheme = {scheme!r} is not one of {SCHEMES}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"qat.group_size = {group_size} is not one of {GROUP_SIZES}")
    swapped = []
    for name, module in list(model.named_modules()):
        if names is not None:
            chosen = name in names
        else:
            chosen = (type(module) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
                      and module.in_features % group_size == 0)
        if chosen:
            model.set_submodule(name, QATLinear(module, scheme, group_size))
            swapped.append(name)
    return swapped


def set_fake_quant(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.fake_quant = on


# ---------------------------------------------------------------------------------------------------- the trainer


def check_config(cfg, lora_enabled: bool = False, fp8_enabled: bool = False) -> None:
    """Refuse a [qat] section that cannot run, before any data or weights are read."""
    if not cfg.enabled:
        return
    if cfg.scheme not in SCHEMES:
        raise ConfigError(f"qat.scheme = {cfg.scheme!r} is not one of {SCHEMES}")
    if cfg.group_size not in GROUP_SIZES:
        raise ConfigError(f"qat.group_size = {cfg.group_size} is not one of {GROUP_SIZES}")
    if cfg.start_step < 0:
        raise ConfigError(f"qat.start_step must be at least 0, got {cfg.start_step}")
    if lora_enabled:
        raise ConfigError("qat.enabled = true trains the full model; set lora.enabled = false (or qat.enabled = false)")
    if fp8_enabled:
        raise ConfigError("qat.enabled and fp8.enabled both change how linear layers compute; enable one of them")


def apply_from_config(model: nn.Module, cfg) -> list[str]:
    """The trainer's swap stage for a [qat] section (after LoRA, before sharding and compile)."""
    if not cfg.enabled:
        return []
    swapped = apply_qat(model, cfg.scheme, cfg.group_size, cfg.skip)
    if not swapped:
        raise ConfigError(f"qat.enabled = true but no linear layer has an input dimension divisible by "
                          f"qat.group_size = {cfg.group_size}; choose another group size or set qat.enabled = false")
    return swapped


def update(model: nn.Module, cfg, step: int) -> None:
    """Called before each optimizer step: fake quantisation is off for the first `qat.start_step` steps."""
    if cfg.enabled:
        set_fake_quant(model, step >= cfg.start_step)


# ---------------------------------------------------------------------------------------------------- export


def export_quantized(final_dir: str | Path, cfg) -> Path:
    """Write <final_dir>/quantized from the full-precision model in final_dir; returns its path.

    The folder holds config.json (copied), quantization_config.json (format, scheme, group size, the quantised
    modules) and model.safetensors with, for each quantised linear `<name>`: `<name>.weight_int4` (out, in // 2)
    uint8 (two int4 values per byte, see pack_int4) and `<name>.weight_scale` (out, in // group_size) fp32; every other
    tensor as in final_dir. `load_quantized` reads it back.
    """
    final_dir = Path(final_dir)
    out = final_dir / EXPORT_DIR
    dtype = models.DTYPES.get(models.read_config(final_dir).get("dtype") or "float32", torch.float32)
    model = models.from_pretrained(final_dir, dtype=dtype, device="cpu")
    names = apply_qat(model, cfg.scheme, cfg.group_size, cfg.skip)
    tensors = dict(models.hf_state_dict(model))
    for name in names:
        q, scale = quantize_int4(tensors.pop(f"{name}.weight"), cfg.group_size)
        tensors[f"{name}.weight_int4"] = pack_int4(q)
        tensors[f"{name}.weight_scale"] = scale
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(final_dir / "config.json", out / "config.json")
    export_config = {"format": EXPORT_FORMAT, "scheme": cfg.scheme, "group_size": cfg.group_size, "modules": names}
    (out / EXPORT_CONFIG).write_text(json.dumps(export_config, indent=2) + "\n")
    models.make_readable(out)
    return out


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A nanotune model from an export: int4 weights dequantised into QATLinear layers with fake quantisation on, so
    it computes exactly what the quantised model computes (int8 per-token inputs too, with int8-int4)."""
    folder = Path(folder)
    export_config = json.loads((folder / EXPORT_CONFIG).read_text())
    if export_config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{folder / EXPORT_CONFIG}: format {export_config.get('format')!r} is not {EXPORT_FORMAT}")
    group_size = export_config["group_size"]
    model = models.build_model(models.config_from_hf(models.read_config(folder)), "meta", dtype)
    apply_qat(model, export_config["scheme"], group_size, names=export_config["modules"])
    tensors = load_file(str(folder / "model.safetensors"))
    for name in export_config["modules"]:
        q = unpack_int4(tensors.pop(f"{name}.weight_int4"))
        tensors[f"{name}.weight"] = dequantize_int4(q, tensors.pop(f"{name}.weight_scale"), group_size)
    for key, tensor in tensors.items():
        models.place(model, key, tensor, dtype, device)
    for module in model.modules():
        if hasattr(module, "materialize_after_load"):
            module.materialize_after_load(torch.device(device))
    model.tie_weights()
    return model

