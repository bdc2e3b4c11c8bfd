"""LoRA, rsLoRA and DoRA as in-place swaps of linear layers; merging; adapters in PEFT's format.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a linear weight W (out, in) and learns a low-rank
update: y = W x + b + s * B A x, with A (r, in) Kaiming-uniform, B (out, r) zero, so a fresh adapter changes nothing,
and s = alpha / r (rsLoRA, Kalajdzievski 2023: s = alpha / sqrt(r), which keeps updates the same size as r grows).
DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353) splits the merged weight into a learned per-row magnitude m
and a direction: W' = m * (W + s B A) / ||W + s B A||, the norm taken over each output row and, as in section 4.3 of
the paper, treated as a constant in the backward pass.

    apply_lora(model, ["q_proj", "v_proj"], rank=16, alpha=32)    # or "all-linear"; on a meta or a loaded model
    ... train: only lora_A, lora_B (and lora_magnitude_vector, modules_to_save) require grad ...
    save_adapter(model, "out/adapter")                              # loads in peft.PeftModel.from_pretrained
    load_adapter(model, "some/peft_adapter")                        # made by PEFT or by nanotune
    merge_lora(model)                                               # plain nn.Linear again, ready to save in HF format
    merge_adapter_into_base("base/", "out/adapter", "out/merged")   # from disk: full-precision base + adapter -> HF folder

Parameter names match PEFT's saved keys after the "base_model.model." prefix: `...q_proj.lora_A.weight`,
`...q_proj.lora_B.weight`, `...q_proj.lora_magnitude_vector`; modules trained in full (`modules_to_save`) are saved
under their own names (`lm_head.weight`). The frozen base weight keeps its HF name (`...q_proj.weight`), so the model
loader fills it as if no swap had happened. With QLoRA the base is NF4 (nanotune/qlora.py) and only the base matmul
and the dequantised weight differ.

Two forward paths compute the same thing. The reference (`_adapter_forward`) is the formula above written with
nn.Linear calls, in the adapters' dtype (fp32 by default). The fused path (the default) runs the layer in the base's
compute dtype (bf16 in a bf16 or autocast run: the fp32 adapters are cast, not the activations); for LoRA and rsLoRA
it is one autograd Function (`_LoRALinearFunction`) that adds s * (x Aᵀ) Bᵀ into the base output in place and saves
for the backward only x (or dropout(x)) and x Aᵀ; DoRA keeps the reference's formula (`_dora_forward`).
`set_fast_path(model, fused=False)` switches every layer back to the reference.

In a model with fused projections (models/fusion.py: `qkv_proj`, `gate_up_proj`) targets still name the parts
(`q_proj` ...); a fused module with targeted parts becomes one `FusedLoRALinear` holding PEFT's adapter of each part,
whose fused path computes x Aᵀ for all of them in one matmul. Adapter files and merging see the parts' names.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import models
from models import fusion
from nanotune import lora_experts
from nanotune.qlora import NF4Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT saves keys relative to PeftModel -> LoraModel -> the transformers model
LORA_PARAM_NAMES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


class _LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s (x_lora Aᵀ) Bᵀ for a frozen W, in one dtype, saving only what the backward needs.

    x (N, in); x_lora is dropout(x), or None when there is no dropout (then x itself feeds the adapter); weight W
    (out, in), or None when `dequantize()` gives it (an NF4 base); A (r, in); B (out, r); s a float. Every tensor is
    already in the compute dtype. W, b and the base of an NF4 layer are frozen: no gradient is computed for them.

    Saved for the backward: the adapter's input (N, in) for dA, x Aᵀ (N, r) for dB, and the parameters, which are held
    anyway. Plain autograd over the reference also keeps an fp32 copy of the input in a bf16 run (the cast to the
    adapters' dtype), and its (N, out) update is a temporary added in a second pass. The dequantised NF4 weight (out,
    in) is saved only with `keep_weight` (worth it under activation checkpointing, where the forward that saves it is
    the recompute right before this layer's backward); otherwise the backward dequantises again.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling, dequantize, keep_weight):
        w = weight if dequantize is None else dequantize()  # (out, in)
        adapter_in = x if x_lora is None else x_lora  # (N, in)
        out = F.linear(x, w, bias)  # (N, out): the base matmul
        xa = adapter_in @ lora_A.t()  # (N, r)
        out.addmm_(xa, lora_B.t(), alpha=scaling)  # out += s (x Aᵀ) Bᵀ in place: no (N, out) temporary
        ctx.scaling, ctx.dequantize, ctx.has_dropout = scaling, dequantize, x_lora is not None
        kept = w if dequantize is None or keep_weight else None
        need_A, need_B = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        ctx.save_for_backward(adapter_in if need_A else None, xa if need_B else None, kept, lora_A, lora_B)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        adapter_in, xa, w, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        grad_x = grad_x_lora = grad_A = grad_B = None
        # s scales the small products (N, r) and (out, r), not the (N, out) gradient: one element-wise pass less
        g_b = (grad_out @ lora_B).mul_(s)  # (N, r)
        if ctx.needs_input_grad[4]:
            grad_A = g_b.t() @ adapter_in  # (r, in)
        if ctx.needs_input_grad[5]:
            grad_B = (grad_out.t() @ xa).mul_(s)  # (out, r)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if w is None:  # NF4 base without a kept weight: dequantise again
                w = ctx.dequantize()
            grad_x = grad_out @ w  # (N, in) through the frozen base
            if ctx.has_dropout:
                grad_x_lora = g_b @ lora_A  # (N, in); autograd takes it back through the dropout
            else:
                grad_x.addmm_(g_b, lora_A)  # the adapter's share, added in place
        return grad_x, grad_x_lora, None, None, grad_A, grad_B, None, None, None


def _compute_dtype(x: torch.Tensor, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype the base layer computes in: autocast's when it is on (amp-bf16), else the base weight's."""
    device = x.device.type  # the meta device (byte counts at real shapes) has no autocast to ask about
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return base_dtype


def _autocast_off(device: str):
    """A context in which autocast is off on `device` (nothing to switch off where autocast does not exist)."""
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def init_adapter_pair(lora_A: nn.Linear, lora_B: nn.Linear, device) -> None:
    """Allocate one adapter's A and B on `device`: A Kaiming-uniform (as nn.Linear's default), B zero (PEFT's init)."""
    lora_A.to_empty(device=device)
    lora_B.to_empty(device=device)
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)


class _Adapter:
    """The LoRA / DoRA part shared by LoRALinear (full-precision base) and QLoRALinear (NF4 base).

    A subclass provides `in_features`, `out_features`, `bias`, `base_weight()` (the full W, (out, in)) and calls
    `_add_adapter` in its constructor; its forward calls `_fused_forward` (LoRA) or `_dora_forward` (DoRA) under the
    fused switch, else the reference `_adapter_forward(x, base_out)`.
    """

    def _add_adapter(self, rank: int, alpha: float, dropout: float, rslora: bool, dora: bool, dtype, device):
        if rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {rank}")
        self.rank, self.alpha, self.rslora, self.dora = rank, alpha, rslora, dora
        self.fused = True  # the fused path (see _LoRALinearFunction); False: the reference, _adapter_forward
        self.keep_dequantized_weight = False  # NF4 base: save the dequantised weight for the backward
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device="meta", dtype=dtype)  # A: (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device="meta", dtype=dtype)  # B: (out, r)
        self.lora_magnitude_vector = None
        if dora:  # m: (out,), one magnitude per output row
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device="meta", dtype=dtype))
        if device.type != "meta":  # the base weight is already here: allocate and initialise now
            self._init_adapter(device)

    def _init_adapter(self, device) -> None:
        """A Kaiming-uniform (as nn.Linear's default), B zero; DoRA's m = ||W|| row norms, so W' = W at the start."""
        init_adapter_pair(self.lora_A, self.lora_B, device)
        with torch.no_grad():
            if self.dora:
                m = self.base_weight().to(self.lora_A.weight.dtype).norm(dim=1)  # (out,)
                self.lora_magnitude_vector = nn.Parameter(m.to(device))

    def materialize_after_load(self, device) -> None:
        """Called by the model loader once the base weight is in: allocate and initialise the adapter."""
        if self.lora_A.weight.is_meta and not self._base_is_meta():
            self._init_adapter(torch.device(device))

    def delta_weight(self) -> torch.Tensor:
        """s * B A, (out, in) in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The weight that makes a plain linear compute what this module computes (in eval), in fp32."""
        w = self.base_weight().float() + self.delta_weight().float()  # (out, in)
        if self.dora:
            w = w * (self.lora_magnitude_vector.float() / w.norm(dim=1)).unsqueeze(1)
        return w

    def _use_fused(self, base_weight: torch.Tensor | None) -> bool:
        """The fused switch, unless the base is trainable (the fused backward computes no gradient for it)."""
        frozen = (base_weight is None or not base_weight.requires_grad) and (self.bias is None
                                                                           or not self.bias.requires_grad)
        return self.fused and frozen

    def _fused_forward(self, x: torch.Tensor, weight, bias, dequantize=None) -> torch.Tensor:
        """x (..., in), weight (out, in) or None with `dequantize`, bias: all in the compute dtype -> (..., out)."""
        x_2d = x.reshape(-1, self.in_features)  # (N, in)
        dropout = isinstance(self.lora_dropout, nn.Dropout) and self.training
        x_lora = self.lora_dropout(x_2d) if dropout else None  # same draws as the reference's dropout(x)
        lora_A = self.lora_A.weight.to(x.dtype)  # (r, in): fp32 master weights cast, the activations are not
        lora_B = self.lora_B.weight.to(x.dtype)  # (out, r)
        out = _LoRALinearFunction.apply(x_2d, x_lora, weight, bias, lora_A, lora_B, self.scaling, dequantize,
                                        self.keep_dequantized_weight)  # (N, out)
        return out.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        """DoRA's ||W + s B A|| per output row, (out,) in fp32, from the base weight w (out, in).

        A constant for the backward (DoRA section 4.3), so no graph is built. It is computed afresh in every forward,
        never cached, so it cannot go stale when the optimizer changes A and B; the cost, r * out * in multiply-adds
        and one (out, in) temporary, is small next to the layer's matmul over a batch of tokens.
        """
        with _autocast_off(w.device.type):  # in fp32 even under amp-bf16
            return (w.float() + self.delta_weight().float()).norm(dim=1)

    def _dora_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA under the fused switch: the reference's formula in base_out's dtype (bf16 in a bf16 run) instead of the
        adapters', so no activation is cast; only the weight norm stays fp32. x (..., in), base_out (..., out)."""
        dtype = base_out.dtype
        w = self.base_weight()  # (out, in), frozen
        mag_scale = (self.lora_magnitude_vector / self._weight_norm(w)).to(dtype).view(1, -1)  # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            wx = base_out if self.bias is None else base_out - self.bias.to(dtype)  # W x, from the base matmul
        else:  # with dropout the adapter sees dropout(x), and so must the rescaled W x
            x = self.lora_dropout(x)
            wx = F.linear(x, w.to(dtype))
        lora_out = F.linear(F.linear(x, self.lora_A.weight.to(dtype)), self.lora_B.weight.to(dtype))  # (..., out)
        return base_out + (mag_scale - 1) * wx + mag_scale * lora_out * self.scaling

    def _adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The reference: base_out = W x + b (..., out) -> the adapted output, in base_out's dtype."""
        x = x.to(self.lora_A.weight.dtype)  # adapters may be fp32 while the base runs in bf16
        if not self.dora:
            out = base_out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
            return out.to(base_out.dtype)
        # DoRA: y = m/||W + sBA|| * (W x + s B A x) + b = base_out + (m/n - 1) * W x + m/n * s B A x
        w = self.base_weight().to(x.dtype)  # (out, in), frozen
        with torch.no_grad():  # the norm is a constant for backward (DoRA section 4.3), so build no graph for it
            norm = (w + self.scaling * (self.lora_B.weight @ self.lora_A.weight)).norm(dim=1)  # (out,)
        mag_scale = (self.lora_magnitude_vector / norm).view(1, -1)  # (1, out)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            wx = base_out if self.bias is None else base_out - self.bias  # W x, reused from the base matmul
        else:  # with dropout the adapter sees dropout(x), and so must the rescaled W x
            x = self.lora_dropout(x)
            wx = F.linear(x, w)
        lora_out = self.lora_B(self.lora_A(x))  # (..., out)
        out = base_out + (mag_scale - 1) * wx + mag_scale * lora_out * self.scaling
        return out.to(base_out.dtype)

    def _adapter_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}, dora={self.dora}"


class LoRALinear(_Adapter, nn.Module):
    """nn.Linear with a frozen weight and a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), HF name kept so the loader fills it
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._add_adapter(rank, alpha, dropout, rslora, dora, dtype, base.weight.device)

    def base_weight(self) -> torch.Tensor:
        return self.weight

    def _base_is_meta(self) -> bool:
        return self.weight.is_meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_fused(self.weight):
            return self._adapter_forward(x, F.linear(x, self.weight, self.bias))
        dtype = _compute_dtype(x, self.weight.dtype)  # bf16 under autocast, else the base weight's dtype
        x, weight, bias = x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)
        if self.dora:
            return self._dora_forward(x, F.linear(x, weight, bias))
        return self._fused_forward(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._adapter_repr()}"


class QLoRALinear(_Adapter, NF4Linear):
    """NF4Linear (frozen 4-bit base) with a trainable low-rank update: QLoRA (Dettmers et al. 2023)."""

    def __init__(self, base: NF4Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype = torch.float32):
        NF4Linear.__init__(self, base.in_features, base.out_features, False, base.compute_dtype, base.quant_device)
        self.weight, self.weight_absmax, self.bias = base.weight, base.weight_absmax, base.bias  # take over the storage
        self._add_adapter(rank, alpha, dropout, rslora, dora, dtype, base.weight.device)

    def base_weight(self) -> torch.Tensor:
        return self.dequantize()

    def _base_is_meta(self) -> bool:
        return self.weight.is_meta

    def materialize_after_load(self, device) -> None:
        NF4Linear.materialize_after_load(self, device)
        _Adapter.materialize_after_load(self, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._use_fused(None):
            return self._adapter_forward(x, NF4Linear.forward(self, x))
        self._check_loaded()
        x_c = x.to(self.compute_dtype)  # NF4 computes in its compute dtype (bf16)
        if self.dora:
            return self._dora_forward(x_c, NF4Linear.forward(self, x_c)).to(x.dtype)
        return self._fused_forward(x_c, None, self.bias, self.dequantize).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{NF4Linear.extra_repr(self)}, {self._adapter_repr()}"


class _FusedLoRALinearFunction(torch.autograd.Function):
    """_LoRALinearFunction for a fused projection (qkv_proj, gate_up_proj) whose parts have their own adapters:
    y = x Wᵀ + b, then for each adapted part p, y[:, rows_p] += s (x A_pᵀ) B_pᵀ, with every x A_pᵀ from ONE matmul.

    x (N, in); weight W (out, in); lora_A (P r, in): the adapted parts' A stacked in part order; rows: per adapted part
    its (start, stop) output columns; lora_Bs: per adapted part B_p (stop - start, r). All in the compute dtype; W and b
    frozen. Saved for the backward, as in the one-part Function: x for dA, x [A_p]ᵀ (N, P r) for the dB's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, scaling, rows, *lora_Bs):
        out = F.linear(x, weight, bias)  # (N, out): the base matmul, all parts at once
        xa = x @ lora_A.t()  # (N, P r): every part's x A_pᵀ in one matmul
        r = lora_A.shape[0] // len(rows)
        for i, ((start, stop), lora_B) in enumerate(zip(rows, lora_Bs)):  # block-diagonal B: one small matmul each
            out[:, start:stop].addmm_(xa[:, i * r:(i + 1) * r], lora_B.t(), alpha=scaling)  # in place, no temporary
        ctx.scaling, ctx.rows, ctx.rank = scaling, rows, r
        need_A, need_B = ctx.needs_input_grad[3], any(ctx.needs_input_grad[6:])
        ctx.save_for_backward(x if need_A else None, xa if need_B else None, weight, lora_A, *lora_Bs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, weight, lora_A, *lora_Bs = ctx.saved_tensors
        s, r = ctx.scaling, ctx.rank
        g_bs, grad_Bs = [], []
        for i, ((start, stop), lora_B) in enumerate(zip(ctx.rows, lora_Bs)):
            g_part = grad_out[:, start:stop]  # (N, rows of part i)
            g_bs.append(g_part @ lora_B)  # (N, r)
            needs = ctx.needs_input_grad[6 + i]
            grad_Bs.append((g_part.t() @ xa[:, i * r:(i + 1) * r]).mul_(s) if needs else None)  # (rows, r)
        g_b = torch.cat(g_bs, dim=1).mul_(s)  # (N, P r)
        grad_x = grad_A = None
        if ctx.needs_input_grad[3]:
            grad_A = g_b.t() @ x  # (P r, in): every part's dA in one matmul
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight  # (N, in) through the frozen base
            grad_x.addmm_(g_b, lora_A)  # the adapters' share, added in place
        return grad_x, None, None, grad_A, None, None, *grad_Bs


class _PartAdapter(nn.Module):
    """One part's adapter inside a FusedLoRALinear: A (r, in), B (part rows, r), PEFT's tensors of that projection."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device="meta", dtype=dtype)  # A: (r, in)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device="meta", dtype=dtype)  # B: (rows, r)

    def init_adapter(self, device) -> None:
        """As _Adapter._init_adapter: A Kaiming-uniform, B zero."""
        init_adapter_pair(self.lora_A, self.lora_B, device)


class FusedLoRALinear(nn.Module):
    """A fused projection (models/fusion.py: qkv_proj = [q_proj; k_proj; v_proj], gate_up_proj = [gate_proj; up_proj])
    with LoRA on some of its parts: each adapted part holds PEFT's adapter of that projection (a child named after it,
    `qkv_proj.k_proj.lora_A.weight`, saved as `k_proj.lora_A.weight`), so the model computes what the unfused model
    with LoRALinear on those parts computes. The fused path runs the base product once and x Aᵀ for all adapted parts
    as one matmul (`_FusedLoRALinearFunction`); the reference (`fused = False`, or dropout in training: each part draws
    its own mask, in part order as the unfused layers do) adds each part's B A x with nn.Linear calls.
    """

    def __init__(self, base: nn.Linear, part_sizes: dict[str, int], adapted, rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # (out, in): the fused HF-named weight the loader fills
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.rslora, self.dora = rank, alpha, rslora, False
        self.fused, self.keep_dequantized_weight = True, False
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.part_rows, start = {}, 0  # part -> (start, stop) of its output features
        for part, size in part_sizes.items():
            self.part_rows[part] = (start, start + size)
            start += size
        self.adapted = tuple(p for p in part_sizes if p in adapted)  # in the fused weight's (and the init's) order
        for part in self.adapted:
            self.add_module(part, _PartAdapter(self.in_features, part_sizes[part], rank, dtype))
        if base.weight.device.type != "meta":
            self._init_adapters(base.weight.device)

    def _init_adapters(self, device) -> None:
        for part in self.adapted:  # part by part, as the unfused layers draw theirs (in module order)
            self.get_submodule(part).init_adapter(device)

    def materialize_after_load(self, device) -> None:
        if self.get_submodule(self.adapted[0]).lora_A.weight.is_meta and not self.weight.is_meta:
            self._init_adapters(torch.device(device))

    def merged_weight(self, gather=lambda t: t.detach()) -> torch.Tensor:
        """W plus s B_p A_p on each adapted part's rows, (out, in) in fp32. `gather`: whole tensors from shards."""
        w = gather(self.weight).float().clone()  # (out, in)
        for part in self.adapted:
            start, stop = self.part_rows[part]
            adapter = self.get_submodule(part)
            w[start:stop] += (gather(adapter.lora_B.weight).float() @ gather(adapter.lora_A.weight).float()) \
                * self.scaling
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout = isinstance(self.lora_dropout, nn.Dropout) and self.training
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not self.fused or dropout or not frozen:
            return self._reference_forward(x)
        dtype = _compute_dtype(x, self.weight.dtype)  # bf16 under autocast, else the base weight's dtype
        x_2d = x.to(dtype).reshape(-1, self.in_features)  # (N, in)
        bias = None if self.bias is None else self.bias.to(dtype)
        adapters = [self.get_submodule(p) for p in self.adapted]
        lora_A = torch.cat([a.lora_A.weight.to(dtype) for a in adapters])  # (P r, in): fp32 masters cast, then stacked
        lora_Bs = [a.lora_B.weight.to(dtype) for a in adapters]  # (rows_p, r) each
        rows = tuple(self.part_rows[p] for p in self.adapted)
        out = _FusedLoRALinearFunction.apply(x_2d, self.weight.to(dtype), bias, lora_A, self.scaling, rows, *lora_Bs)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """LoRALinear's reference for each part: s B_p A_p dropout(x) added on its columns, in the adapters' dtype."""
        base_out = F.linear(x, self.weight, self.bias)  # (..., out)
        x_lora = x.to(self.get_submodule(self.adapted[0]).lora_A.weight.dtype)
        pieces = []
        for part, (start, stop) in self.part_rows.items():
            if part in self.adapted:
                adapter = self.get_submodule(part)
                pieces.append(adapter.lora_B(adapter.lora_A(self.lora_dropout(x_lora))) * self.scaling)
            else:  # not adapted: its columns unchanged
                pieces.append(x_lora.new_zeros(*x.shape[:-1], stop - start))
        return (base_out + torch.cat(pieces, dim=-1)).to(base_out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapted={list(self.adapted)}, "
                f"rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}")


ADAPTED = (LoRALinear, QLoRALinear, FusedLoRALinear)


def set_fast_path(model: nn.Module, fused: bool = True, keep_dequantized_weight: bool = False) -> int:
    """Choose the forward of every LoRA layer in `model`; returns how many layers were set.

    fused: the fused path (compute dtype, in-place update, few saved tensors); False: the reference `_adapter_forward`.
    keep_dequantized_weight: QLoRA layers (not DoRA ones) save their dequantised bf16 weight (out, in) for the
        backward instead of dequantising again. Turn it on only for layers under full activation checkpointing: there
        each weight is kept just from its recompute to its backward; without checkpointing every layer's weight would
        stay from its forward to its backward, the whole model in bf16. Pass a submodule to set only its layers.
    """
    layers = [m for m in model.modules() if isinstance(m, ADAPTED)]
    for module in layers:
        module.fused, module.keep_dequantized_weight = fused, keep_dequantized_weight
    return len(layers)


# ---------------------------------------------------------------------------------------------------- applying


def apply_lora(model: nn.Module, targets, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
               dora: bool = False, modules_to_save=(), dtype: torch.dtype = torch.float32) -> list[str]:
    """Swap the targeted linear layers of `model` for LoRA layers in place and freeze everything else.

    targets: module-name suffixes (["q_proj", "v_proj"] matches "model.layers.3.self_attn.q_proj"), "all-linear"
        (every linear layer except the LM head), or a regular expression string matched against whole module names
        (as PEFT does for a string target_modules).
    modules_to_save: module-name suffixes trained in full (e.g. ["embed_tokens", "lm_head"]).
    dtype: the adapters' dtype; fp32 by default even for a bf16 model, so small updates are not rounded away.
    Works on a model on the meta device (inside `models.from_pretrained(prepare=...)`: the adapters are allocated by
    `materialize_after_load` after the base weights are in) and on a loaded model (allocated and initialised now).
    Returns the names of the swapped modules.
    """
    modules_to_save = list(modules_to_save or [])
    if any(isinstance(m, ADAPTED) for m in model.modules()):
        raise ValueError("this model already has LoRA layers; apply_lora once (load_adapter reuses existing layers).")
    linear_names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, NF4Linear)]
    # a fused projection (models/fusion.py) is matched as its parts: targets name q_proj, not qkv_proj
    chosen = _match_targets(_as_parts(model, [n for n, _ in model.named_modules()]), targets,
                            _as_parts(model, linear_names), modules_to_save)
    fused_parts = _fused_targets(model, chosen, set(linear_names), dora)  # fused module -> its adapted parts

    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        if name in set(linear_names):
            base = model.get_submodule(name)
            cls = QLoRALinear if isinstance(base, NF4Linear) else LoRALinear
            model.set_submodule(name, cls(base, rank, alpha, dropout, rslora, dora, dtype))
            continue
        # a part: its fused layer is built at its first part with all its adapters, drawn in the unfused layers' order
        fused_name = _fused_name(name)
        base = model.get_submodule(fused_name)
        if isinstance(base, nn.Linear):
            sizes = fusion.part_sizes(model.config, fused_name.rpartition(".")[2], base.out_features)
            parts = dict(zip(fusion.FUSED[fused_name.rpartition(".")[2]], sizes))
            model.set_submodule(fused_name, FusedLoRALinear(base, parts, fused_parts[fused_name], rank, alpha,
                                                            dropout, rslora, dtype))
    for name in _match_suffixes([n for n, _ in model.named_modules()], modules_to_save, "lora.modules_to_save"):
        module = model.get_submodule(name)
        if any(isinstance(m, (NF4Linear, *ADAPTED)) for m in module.modules()):
            raise ValueError(f"lora.modules_to_save: {name} is (or holds) a LoRA target or a quantised layer; "
                             "train each module one way only.")
        for p in module.parameters():
            p.requires_grad_(True)
    return chosen


def prepare_from_config(cfg, device=None):
    """The `prepare` callable for `models.from_pretrained` from a [lora] config section, or None when disabled.

    It quantises the base to NF4 first when `cfg.quantize == "nf4"` (on `device`; modules trained in full and the
    LM head stay in full precision), then swaps in the adapters.
    """
    if not cfg.enabled:
        return None
    if cfg.quantize not in ("", "nf4"):
        raise ValueError(f"lora.quantize = {cfg.quantize!r} is not supported; use \"nf4\" (QLoRA) or \"\" (none).")
    check_expert_options(cfg.target_experts, cfg.dropout, cfg.dora)

    def prepare(model: nn.Module) -> None:
        if cfg.quantize == "nf4":
            from nanotune.qlora import quantize_nf4

            quantize_nf4(model, skip=("lm_head", *cfg.modules_to_save), device=device)
        if cfg.quantize_experts:
            lora_experts.quantize_experts(model, device=device)
        apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora, cfg.modules_to_save)
        if cfg.target_experts:
            lora_experts.apply_expert_lora(model, cfg.target_experts, cfg.rank, cfg.alpha, cfg.rslora, device=device)

    return prepare


def check_expert_options(target_experts, dropout: float, dora: bool) -> None:
    """What PEFT's adapters on fused expert weights (ParamWrapper) cannot express, refused before any work."""
    if target_experts and dropout:
        raise ValueError(f"lora.dropout = {dropout} with lora.target_experts: PEFT's adapters on stacked expert "
                         "weights have no dropout (it cannot be factored out of the grouped product); "
                         "set lora.dropout = 0")
    if target_experts and dora:
        raise ValueError("lora.dora = true with lora.target_experts is not supported (PEFT has no DoRA for stacked "
                         "expert weights); set one of them off")


def _as_parts(model: nn.Module, names: list[str]) -> list[str]:
    """Module names with each fused projection of a fused model (models/fusion.py: qkv_proj, gate_up_proj) replaced
    by the names of its parts (q_proj, k_proj, v_proj; gate_proj, up_proj): the unfused model's names, which LoRA
    targets and PEFT's adapters use."""
    if not models.is_fused(model):
        return list(names)
    out = []
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf in fusion.FUSED and isinstance(model.get_submodule(name), (nn.Linear, NF4Linear, FusedLoRALinear)):
            out += [f"{prefix}.{part}" for part in fusion.FUSED[leaf]]
        else:
            out.append(name)
    return out


def _fused_name(part_name: str) -> str:
    """"model.layers.0.self_attn.k_proj" -> "model.layers.0.self_attn.qkv_proj"."""
    prefix, _, leaf = part_name.rpartition(".")
    return f"{prefix}.{fusion.FUSED_OF[leaf]}"


def _fused_targets(model, chosen: list[str], linear_names: set[str], dora: bool) -> dict[str, list[str]]:
    """The chosen names that are parts of fused projections, by fused module: {"...qkv_proj": ["q_proj", "v_proj"]};
    refuses what FusedLoRALinear does not do, before anything is swapped."""
    out: dict[str, list[str]] = {}
    for name in chosen:
        if name in linear_names:
            continue
        fused_name = _fused_name(name)
        if dora:
            raise ValueError(f"lora.dora = true does not work on fused projections ({fused_name}); set "
                             "model.fuse_projections = false or lora.dora = false")
        if isinstance(model.get_submodule(fused_name), NF4Linear):
            raise ValueError(f"QLoRA (lora.quantize) does not work on fused projections ({fused_name}); set "
                             "model.fuse_projections = false or lora.quantize = \"\"")
        out.setdefault(fused_name, []).append(name.rpartition(".")[2])
    return out


# an adapter of a fused projection's part under PEFT's name: "...qkv_proj.k_proj.lora_A.weight" -> "...k_proj.lora_A..."
_FUSED_PART_PARAM = re.compile(rf"\.(?:{'|'.join(fusion.FUSED)})\.({'|'.join(fusion.FUSED_OF)})\.(lora_[AB]\.weight)$")


def _peft_name(name: str) -> str:
    return _FUSED_PART_PARAM.sub(r".\1.\2", name)


def _adapted_by_peft_name(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT module name -> the LoRA layer adapting it (a FusedLoRALinear once for each adapted part)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLoRALinear):
            out.update({f"{name.rpartition('.')[0]}.{part}": module for part in module.adapted})
        elif isinstance(module, ADAPTED):
            out[name] = module
    return out


def _match_targets(names, targets, linear_names, modules_to_save) -> list[str]:
    if targets == "all-linear" or list(targets) == ["all-linear"]:
        # as PEFT: every linear but the output layer, which maps to the vocabulary and is trained in full if at all
        chosen = [n for n in linear_names if not _ends_with(n, ["lm_head", *modules_to_save])]
    elif isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        chosen = _match_suffixes(names, list(targets), "lora.targets")
    not_linear = [n for n in chosen if n not in linear_names]
    if not_linear:
        raise ValueError(
            f"lora.targets matched {not_linear[:4]}, which are not linear layers; LoRA here adapts nn.Linear only "
            f"(train embeddings or the LM head in full with lora.modules_to_save)."
        )
    if not chosen:
        suffixes = sorted({n.rpartition(".")[2] for n in linear_names})
        raise ValueError(f"lora.targets {targets!r} matched no linear layer; the model's linear layers are {suffixes}.")
    return chosen


def _match_suffixes(names: list[str], suffixes: list[str], what: str) -> list[str]:
    chosen = [n for n in names if _ends_with(n, suffixes)]
    unmatched = [s for s in suffixes if not any(_ends_with(n, [s]) for n in names)]
    if unmatched:
        leaves = sorted({n.rpartition(".")[2] for n in names if n})
        raise ValueError(f"{what} {unmatched} matched no module; module names end in {leaves}.")
    return chosen


def _ends_with(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter for everything that is trained: what the optimizer and training checkpoints hold."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 weight counts as the out*in values it stands for."""
    trainable = total = 0
    seen = set()  # tied parameters (embedding and LM head) count once
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.endswith("_absmax") and isinstance(module, (NF4Linear, lora_experts.FrozenExperts)):
                continue  # the block scales of an NF4 weight, counted with it
            nf4 = isinstance(module, NF4Linear) and name == "weight"
            n = module.out_features * module.in_features if nf4 else p.numel()
            if isinstance(module, lora_experts.FrozenExperts) and module.nf4 and name in lora_experts.EXPERT_PARAMS:
                n = math.prod(module.shapes[name])  # NF4 expert codes: the values they stand for
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def describe_parameters(model: nn.Module) -> str:
    """One line for the run log: 'trainable params: 1,024 of 1,048,576 (0.0977%)'."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4g}%)"


# ---------------------------------------------------------------------------------------------------- merging


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and swap the module back to nn.Linear, in place.

    NF4 layers (adapted or not) are dequantised to nn.Linear in their compute dtype, so the result is a plain model
    that `models.save_pretrained` writes in HF format. A LoRA layer keeps its base weight's dtype. Returns `model`.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, ADAPTED):
            weight, dtype = module.merged_weight(), (module.compute_dtype if isinstance(module, NF4Linear)
                                                     else module.weight.dtype)
        elif isinstance(module, NF4Linear):
            weight, dtype = module.dequantize(), module.compute_dtype
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    lora_experts.merge_experts(model)  # stacked MoE experts: adapters folded in, NF4 stacks dequantised
    return model


# ---------------------------------------------------------------------------------------------------- adapter files


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter (LoRA tensors and modules trained in full) under PEFT's key names."""
    out = {PEFT_PREFIX + _peft_name(n): p.detach() for n, p in model.named_parameters()
           if (p.requires_grad or _is_lora(n)) and not lora_experts.is_expert_adapter(n)}
    out.update({PEFT_PREFIX + k: v for k, v in lora_experts.peft_state_dict(model).items()})  # PEFT's expert layout
    return out


def _is_lora(name: str) -> bool:
    return name.endswith(LORA_PARAM_NAMES)


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """PEFT's adapter_config.json for the LoRA layers of `model` (all of them share rank, alpha and options)."""
    adapted = _adapted_by_peft_name(model)  # a fused projection's parts under their own names
    experts = [m for m in model.modules() if isinstance(m, lora_experts.FrozenExperts) and m.rank]
    if not adapted and not experts:
        raise ValueError("the model has no LoRA layers to save; call apply_lora (or load_adapter) first.")
    settings = {(m.rank, m.alpha, m.rslora, m.dora, _dropout_p(m)) for m in adapted.values()}
    settings |= {(m.rank, m.alpha, m.rslora, False, 0.0) for m in experts}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (rank, alpha, rslora, dora, dropout): {sorted(settings)}; "
                         "PEFT's format here needs one setting for all of them.")
    rank, alpha, rslora, dora, dropout = settings.pop()
    # target_modules as leaf names when they select exactly the adapted layers, else the full names
    leaves = sorted({n.rpartition(".")[2] for n in adapted})
    linears = _as_parts(model, [n for n, m in model.named_modules()
                                if isinstance(m, (nn.Linear, NF4Linear, *ADAPTED))])
    exact = {n for n in linears if _ends_with(n, leaves)} == set(adapted)
    trained_in_full = sorted({n.rpartition(".")[0] for n, p in model.named_parameters()
                              if p.requires_grad and not _is_lora(n) and not lora_experts.is_expert_adapter(n)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": leaves if exact else sorted(adapted),
        "use_rslora": rslora,
        "use_dora": dora,
        "modules_to_save": trained_in_full or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_parameters": lora_experts.peft_target_parameters(model) or None,  # stacked MoE expert weights
    }


def _dropout_p(module) -> float:
    return module.lora_dropout.p if isinstance(module.lora_dropout, nn.Dropout) else 0.0


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format (loads in PeftModel.from_pretrained)."""
    path = Path(path)
    config = adapter_config(model, base_model_name_or_path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    models.make_readable(path)  # 0644 files, 0755 folder, like a saved model


# PEFT options that change what an adapter computes and that nanotune does not implement: (key, the harmless value)
_UNSUPPORTED = [("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False), ("rank_pattern", {}),
                ("alpha_pattern", {}), ("layers_to_transform", None), ("layer_replication", None),
                ("use_qalora", False), ("trainable_token_indices", None),
                ("exclude_modules", None)]


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_CONFIG}; an adapter folder holds {ADAPTER_CONFIG} and "
                                f"{ADAPTER_WEIGHTS} (PEFT's format).")
    config = json.loads(file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; nanotune loads LoRA adapters only.")
    for key, default in _UNSUPPORTED:
        if config.get(key, default) not in (default, None, {}, False):
            raise ValueError(f"{file}: {key} = {config[key]!r} is not supported by nanotune (only {default!r}).")
    others = [t for t in config.get("target_parameters") or []
              if t.rpartition(".")[2] not in lora_experts.EXPERT_PARAMS]
    if others:
        raise ValueError(f"{file}: target_parameters {others} are not supported by nanotune (only stacked MoE "
                         f"expert weights: {list(lora_experts.EXPERT_PARAMS)}).")
    return config


def load_adapter(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an adapter written by PEFT or by nanotune into a loaded model, in place; returns the model.

    A model without LoRA layers gets them first (apply_lora with the adapter's config); one that has them must
    match it. Every LoRA tensor and module trained in full must be in the file, and nothing else may be.
    """
    path = Path(path)
    config = read_adapter_config(path)
    if any(p.is_meta for n, p in model.named_parameters() if not _is_lora(n)):
        raise ValueError("load_adapter needs the base weights loaded; call it after models.from_pretrained.")
    rank, alpha = config["r"], config["lora_alpha"]
    rslora, dora = config.get("use_rslora", False), config.get("use_dora", False)
    adapted = [m for m in model.modules() if isinstance(m, ADAPTED)]
    expert_targets = sorted({t.rpartition(".")[2] for t in config.get("target_parameters") or []})
    if not adapted:
        if config["target_modules"]:
            apply_lora(model, config["target_modules"], rank, alpha, dropout=config.get("lora_dropout", 0.0),
                       rslora=rslora, dora=dora, modules_to_save=config.get("modules_to_save") or [], dtype=dtype)
        if expert_targets:
            lora_experts.apply_expert_lora(model, expert_targets, rank, alpha, rslora, dtype)
    elif any((m.rank, m.alpha, m.rslora, m.dora) != (rank, alpha, rslora, dora) for m in adapted):
        raise ValueError(f"{path}: the adapter has r={rank}, lora_alpha={alpha}, use_rslora={rslora}, "
                         f"use_dora={dora}, but the model's LoRA layers differ; load it into a model without LoRA.")
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS} (nanotune reads safetensors adapters only).")
    tensors = {}
    for key, tensor in load_file(str(file)).items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith("lora_magnitude_vector.weight"):  # how older PEFT versions named it
            name = name.removesuffix(".weight")
        tensors[name] = tensor
    wanted = adapter_state_dict(model)
    wanted = {k.removeprefix(PEFT_PREFIX): v for k, v in wanted.items()}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model's LoRA layers: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}. Was it made for this base model and config?")
    params = {_peft_name(n): p for n, p in model.named_parameters()}  # a fused projection's adapters by part
    expert_keys = set(lora_experts.peft_state_dict(model))
    lora_experts.load_peft_state_dict(model, {k: tensors.pop(k) for k in expert_keys})
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}.")
            params[name].copy_(tensor)
    return model


# files of a model folder that are not weights and carry over to a merged model unchanged
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja", "chat_template.json")


def checkpoint_dtype(base: str | Path) -> torch.dtype:
    """The dtype a base folder's config.json declares (float32 when it declares none)."""
    hf = models.read_config(base)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in models.DTYPES:
        raise ValueError(f"{Path(base) / 'config.json'}: dtype {name!r} is not one of {sorted(models.DTYPES)}; "
                         "give the merge a dtype explicitly.")
    return models.DTYPES[name]


def merge_adapter_into_base(base: str | Path, adapter: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                            device: str = "cpu", overrides: dict | None = None) -> None:
    """Fold an adapter folder into the full-precision base folder and write an HF-format folder to `out`.

    The base is read in its checkpoint dtype unless `dtype` says otherwise; each merged weight is computed in fp32
    and stored in that dtype. Tokenizer and generation files of the base are copied alongside. An adapter trained
    with QLoRA is merged into the original weights, not into dequantised NF4 ones (the usual practice). `overrides`:
    the config.json fields the run changed (model.overrides), written into the merged config.json.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    read_adapter_config(adapter)  # a malformed or unsupported adapter stops here, before the base is read
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new output folder for the merged model.")
    dtype = dtype or checkpoint_dtype(base)
    model = models.from_pretrained(base, dtype=dtype, device=device, overrides=overrides)
    load_adapter(model, adapter)
    merge_lora(model)
    models.save_pretrained(model, out, dtype=dtype)
    for name in CARRIED_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    models.make_readable(out)  # the copies keep the base's modes; the merged model is for others to read
