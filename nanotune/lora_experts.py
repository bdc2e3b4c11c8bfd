"""LoRA and NF4 for stacked mixture-of-experts weights (`Experts` of models/qwen_moe.py), as a module swap.

A MoE model keeps its experts as two stacked tensors, `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I), run as
grouped GEMMs over the tokens sorted by expert. `FrozenExperts` takes their place with the same parameter names and
changes only the product `project(name, x, counts)`:

- LoRA (`target_experts`): every expert e of a targeted weight W (E, out, in) gets its own pair A_e (r, in), B_e
  (out, r), stacked as `lora_A.<name>` (E, r, in) and `lora_B.<name>` (E, out, r). The update runs inside the grouped
  GEMM path: two more grouped GEMMs over the same sorted rows, x -> x A_eᵀ (M, r) -> s (x A_eᵀ) B_eᵀ (M, out), no
  loop over experts. Initialised as LoRA (A Kaiming-uniform, B zero); merged exactly as W_e + s B_e A_e.
- NF4 (`quantize_experts`, QLoRA for MoE): the frozen stacked weights are stored as nanotune/qlora.py stores a
  linear weight, with its functions: 4-bit NormalFloat codes and one bf16 absmax per 64 values of a row, the rows
  being the E*out output features of the stack (so every expert has its own scales), 4.25 bits a value instead of 16. They are quantised as the checkpoint streams in, one expert's
  tensor at a time, and dequantised inside the MoE layer, one layer's stack at a time; the backward dequantises again
  rather than keeping the bf16 stack alive between forward and backward.

With several processes every stacked tensor (values, NF4 codes and scales, adapters) is sharded by its first
dimension: by rows under FSDP2 (nanotune/parallel.py loads and quantises each process's rows), by experts under expert
parallelism (nanotune/expert_parallel.py). `project` runs on the tensors as the forward holds them (`local`); saving
and merging gather them (`whole`).

Adapters are saved and loaded in PEFT's format for fused expert parameters (`target_parameters`, peft's
`lora.ParamWrapper`): per targeted parameter a `lora_A.weight` (r*E, in) whose rows are expert-major (row e*r + j is
A_e[j]) and a `lora_B.weight` (out, r*E) whose columns are rank-major (column j*E + e is B_e[:, j]). PEFT wraps the
targeted parameters of one module in nested wrappers, in the module's registration order (`gate_up_proj` inside,
`down_proj` outside), so the innermost one's keys carry one `base_layer.` per wrapper around it:
`mlp.experts.base_layer.lora_A.weight` is gate_up_proj's, `mlp.experts.lora_A.weight` down_proj's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.qwen_moe import Experts, grouped_matmul
from nanotune.qlora import NF4_BLOCKSIZE, _bnb, dequantize_nf4, padded_in_features, quantize_nf4_rows

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # in registration order, which sets PEFT's nesting


def whole(t: torch.Tensor) -> torch.Tensor:
    """A stored tensor whole, without grad: a DTensor (a model sharded by FSDP2, outside its forward) is gathered, a
    collective that every process must call in the same order; a plain tensor is itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (expert parallelism: its experts), differentiably; a plain tensor is itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class _FrozenGroupedMatmul(torch.autograd.Function):
    """Rows sorted by expert times a frozen stacked weight that `dequantize()` gives (E, out, in): saves nothing of
    the weight for the backward, which dequantises again (an NF4 stack must not live in bf16 until the backward)."""

    @staticmethod
    def forward(ctx, x_MK, counts_E, dequantize, use_grouped_mm):
        ctx.dequantize, ctx.use_grouped_mm = dequantize, use_grouped_mm
        ctx.save_for_backward(counts_E)
        return grouped_matmul(x_MK, dequantize(), counts_E, use_grouped_mm)  # (M, out)

    @staticmethod
    def backward(ctx, grad_MN):
        (counts_E,) = ctx.saved_tensors
        w_T = ctx.dequantize().transpose(1, 2)  # (E, in, out): grad_x[rows of e] = grad[rows of e] @ W_e
        return grouped_matmul(grad_MN.contiguous(), w_T, counts_E, ctx.use_grouped_mm), None, None, None


class FrozenExperts(Experts):
    """Frozen stacked experts, stored in their dtype or in NF4, with optional per-expert LoRA (module docstring)."""

    def __init__(self, base: Experts, nf4: bool = False, compute_dtype: torch.dtype = torch.bfloat16, device=None):
        nn.Module.__init__(self)
        self.load_device = None if device is None else torch.device(device)  # None: where checkpoint tensors arrive
        E, D, I = base.down_proj.shape
        self.shapes = {"gate_up_proj": (E, 2 * I, D), "down_proj": (E, D, I)}  # (E, out, in) of each stacked weight
        self.num_experts = E
        self.nf4 = nf4
        self.nf4_dtype = compute_dtype
        self.use_grouped_mm = base.use_grouped_mm
        self.rank, self.alpha, self.rslora, self.scaling = 0, 0.0, False, 0.0
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # name -> (E, r, in), (E, out, r)
        for name in EXPERT_PARAMS:
            weight = getattr(base, name)
            if not nf4:
                self.register_parameter(name, nn.Parameter(weight.data, requires_grad=False))
                continue
            self._store_nf4(name, *self._nf4_storage(name, "meta"))
            if not weight.is_meta:  # a loaded model: quantise now, expert by expert
                for e in range(E):
                    self.load_hf_weight(name, weight[e], (e, slice(None)))

    # ---------------------------------------------------------------------------------------------- weights

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.nf4_dtype if self.nf4 else self.down_proj.dtype

    def matmul_sizes(self) -> tuple[int, ...]:
        E, D, I = self.shapes["down_proj"]
        return (D, I, self.rank) if self.rank else (D, I)

    def _nf4_storage(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty NF4 storage of a stack as nanotune/qlora.py lays out a weight, one row per expert's output feature:
        codes (E*out, in_padded / 2) uint8, two a byte, and absmax (E*out, in_padded / 64) bf16, one per block."""
        E, out, inner = self.shapes[name]
        padded = padded_in_features(inner)
        return (torch.empty(E * out, padded // 2, dtype=torch.uint8, device=device),
                torch.empty(E * out, padded // NF4_BLOCKSIZE, dtype=torch.bfloat16, device=device))

    def _store_nf4(self, name: str, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        """Codes and scales of a stack as two frozen parameters, as NF4Linear keeps them: FSDP2 shards both by rows,
        so each process holds whole rows and whole quantisation blocks."""
        self.register_parameter(name, nn.Parameter(codes, requires_grad=False))
        getattr(self, name).hf_shape = self.shapes[name]  # what the checkpoint holds, for the loader's key check
        self.register_parameter(f"{name}_absmax", nn.Parameter(absmax, requires_grad=False))
        getattr(self, f"{name}_absmax").hf_shape = None  # made from the weight while loading: no checkpoint holds it

    def load_hf_weight(self, name: str, tensor: torch.Tensor, index) -> None:
        """One checkpoint tensor: rows `index[1]` of expert `index[0]` of the stacked weight `name`."""
        expert, rows = index
        param = getattr(self, name)
        if param.is_meta:  # the first tensor of this weight: allocate the stack (codes, or values)
            device = self.load_device or tensor.device
            if self.nf4:
                self._store_nf4(name, *self._nf4_storage(name, device))
            else:
                setattr(self, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                                 requires_grad=False))
            param = getattr(self, name)
        with torch.no_grad():
            if not self.nf4:
                param[expert, rows].copy_(tensor)
                return
            start, stop = self.stack_rows(name, index)  # these rows' place among the stack's E*out rows
            self.load_hf_rows(tensor, param.data[start:stop], getattr(self, f"{name}_absmax").data[start:stop])

    def stack_rows(self, name: str, index) -> tuple[int, int]:
        """The rows [start, stop) of NF4 storage (E*out rows) filled by the checkpoint tensor at (expert, rows)."""
        expert, rows = index
        out = self.shapes[name][1]
        first, last, _ = rows.indices(out)
        return expert * out + first, expert * out + last

    @torch.no_grad()
    def load_hf_rows(self, rows: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, device=None) -> None:
        """Quantise `rows` (n, in) of a checkpoint tensor into n rows of NF4 storage, `codes` (n, in_padded / 2) and
        `absmax` (n, in_padded / 64), on `device` (by default where `codes` are); as NF4Linear.load_hf_rows, which the
        sharded loader calls for this process's rows of a stack."""
        c, a = quantize_nf4_rows(rows.to(device=device or codes.device, dtype=self.nf4_dtype))  # blocks of 64 a row
        codes.copy_(c)
        absmax.copy_(a)

    def weight(self, name: str, gather=local) -> torch.Tensor:
        """The frozen stacked weight (E, out, in), dequantised in the compute dtype when stored in NF4: as the forward
        sees it (under expert parallelism this process's experts), or whole with `gather=whole` (a sharded model)."""
        if not self.nf4:
            return gather(getattr(self, name))
        E, out, inner = self.shapes[name]
        w = dequantize_nf4(gather(getattr(self, name)), gather(getattr(self, f"{name}_absmax")), inner, self.nf4_dtype)
        return w.view(-1, out, inner)  # E experts, or this process's under expert parallelism (gather = local)

    def merged_weight(self, name: str, w: torch.Tensor | None = None, gather=whole) -> torch.Tensor:
        """W_e + s B_e A_e for every expert, (E, out, in), computed in fp32 and returned in W's dtype; W is `w` when
        given (the original full-precision stack of an NF4 run), else the module's own (NF4 dequantised)."""
        w = self.weight(name, gather) if w is None else w
        if name not in self.lora_A:
            return w
        delta = torch.bmm(gather(self.lora_B[name]).float(), gather(self.lora_A[name]).float()) * self.scaling
        return (w.float() + delta).to(w.dtype)

    def storage_bytes(self) -> int:
        """Bytes that hold the frozen expert weights (codes and scales for NF4)."""
        tensors = [getattr(self, n) for n in EXPERT_PARAMS]
        if self.nf4:
            tensors += [getattr(self, f"{n}_absmax") for n in EXPERT_PARAMS]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---------------------------------------------------------------------------------------------- adapters

    def add_adapters(self, targets, rank: int, alpha: float, rslora: bool = False, dtype=torch.float32) -> None:
        """Per-expert LoRA on the stacked weights named in `targets` (a subset of EXPERT_PARAMS)."""
        unknown = [t for t in targets if t not in EXPERT_PARAMS]
        if unknown or not targets:
            raise ValueError(f"lora.target_experts {list(targets)!r}: name stacked expert weights, "
                             f"some of {list(EXPERT_PARAMS)}")
        if rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {rank}")
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        for name in EXPERT_PARAMS:  # registration order, whatever the order of `targets`
            if name in targets:
                E, out, inner = self.shapes[name]
                self.lora_A[name] = nn.Parameter(torch.empty(E, rank, inner, dtype=dtype, device="meta"))
                self.lora_B[name] = nn.Parameter(torch.empty(E, out, rank, dtype=dtype, device="meta"))
        if not self.down_proj.is_meta:  # the base is loaded: allocate and initialise now
            self._init_adapters(self.down_proj.device)

    def initial_adapters(self, device="cpu"):
        """(ParameterDict, name, initial value) of every adapter, drawn in this order: A_e Kaiming-uniform as
        nn.Linear(in, r) (bound 1/sqrt(in)), B_e zero, so a fresh adapter changes nothing. The sharded loader draws
        the whole values too and keeps each process's part (the same random numbers as one process)."""
        for name in list(self.lora_A):
            A, B = self.lora_A[name], self.lora_B[name]
            bound = 1 / math.sqrt(A.shape[-1])
            yield self.lora_A, name, torch.empty(A.shape, dtype=A.dtype, device=device).uniform_(-bound, bound)
            yield self.lora_B, name, torch.zeros(B.shape, dtype=B.dtype, device=device)

    def _init_adapters(self, device) -> None:
        for adapters, name, value in self.initial_adapters(device):
            adapters[name] = nn.Parameter(value)

    def materialize_after_load(self, device) -> None:
        device = torch.device(device)
        for name in EXPERT_PARAMS if self.nf4 else ():  # quantised where they arrived: move codes and scales
            codes, absmax = getattr(self, name), getattr(self, f"{name}_absmax")
            if not codes.is_meta and codes.device != device:
                self._store_nf4(name, codes.data.to(device), absmax.data.to(device))
        if any(p.is_meta for p in self.lora_A.values()) and not self.down_proj.is_meta:
            self._init_adapters(torch.device(device))
        self.choose_kernel(device)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s * B_e A_e for every expert, (E, out, in) in fp32."""
        return torch.bmm(self.lora_B[name].float(), self.lora_A[name].float()) * self.scaling

    # ---------------------------------------------------------------------------------------------- forward

    def project(self, name: str, x_MK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """(M, in) rows sorted by expert -> (M, out): x W_eᵀ + s (x A_eᵀ) B_eᵀ, every product a grouped GEMM.
        Under expert parallelism (nanotune/expert_parallel.py) the rows and the tensors are this process's experts'."""
        x_MK = x_MK.to(self.compute_dtype)
        if self.nf4:
            out = _FrozenGroupedMatmul.apply(x_MK, counts_E, lambda: self.weight(name), self.use_grouped_mm)
        else:
            out = grouped_matmul(x_MK, local(getattr(self, name)), counts_E, self.use_grouped_mm)  # (M, out)
        if name in self.lora_A:
            A, B = local(self.lora_A[name]).to(x_MK.dtype), local(self.lora_B[name]).to(x_MK.dtype)  # fp32 cast
            xa = grouped_matmul(x_MK, A, counts_E, self.use_grouped_mm)  # (M, r)
            out = out + self.scaling * grouped_matmul(xa, B, counts_E, self.use_grouped_mm)  # (M, out)
        return out

    def extra_repr(self) -> str:
        E, D, I = self.shapes["down_proj"]
        lora = f", lora on {list(self.lora_A)} rank={self.rank}, alpha={self.alpha}" if self.rank else ""
        return f"experts={E}, hidden={D}, intermediate={I}, {'nf4' if self.nf4 else 'frozen'}{lora}"


# ------------------------------------------------------------------------------------------------------ swaps


def _experts(model: nn.Module) -> dict[str, Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def quantize_experts(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, device=None) -> list[str]:
    """Swap every stacked `Experts` for NF4 `FrozenExperts` (on the meta model, so the checkpoint is quantised as it
    streams in; on a loaded model, now). Returns the swapped module names."""
    _bnb()  # fail early when bitsandbytes is missing
    found = _experts(model)
    if not found:
        raise ValueError("lora.quantize_experts = true, but the model has no stacked MoE experts")
    for name, module in found.items():
        if isinstance(module, FrozenExperts):
            raise ValueError(f"{name} is already swapped; quantise the experts before adding adapters")
        model.set_submodule(name, FrozenExperts(module, nf4=True, compute_dtype=compute_dtype, device=device))
    return list(found)


def apply_expert_lora(model: nn.Module, targets, rank: int, alpha: float, rslora: bool = False,
                      dtype: torch.dtype = torch.float32, device=None) -> list[str]:
    """Per-expert LoRA on the stacked expert weights `targets` (e.g. ["gate_up_proj", "down_proj"]) of every MoE
    layer, in place; the expert weights are frozen. Returns the adapted module names."""
    found = _experts(model)
    if not found:
        raise ValueError("lora.target_experts is set, but the model has no stacked MoE experts")
    for name, module in found.items():
        if not isinstance(module, FrozenExperts):
            module = FrozenExperts(module, device=device)
            model.set_submodule(name, module)
        module.add_adapters(list(targets), rank, alpha, rslora, dtype)
    return list(found)


@torch.no_grad()
def merge_experts(model: nn.Module) -> None:
    """Fold every expert adapter into its stacked weight (NF4 stacks dequantised) and swap plain `Experts` back."""
    for name, module in _experts(model).items():
        if not isinstance(module, FrozenExperts):
            continue
        E, D, I = module.shapes["down_proj"]
        with torch.device("meta"):  # no memory until its tensors are set below
            plain = Experts(E, D, I)
        for param in EXPERT_PARAMS:
            setattr(plain, param, nn.Parameter(module.merged_weight(param).clone(), requires_grad=False))
        plain.use_grouped_mm = None
        plain.choose_kernel(plain.down_proj.device)
        model.set_submodule(name, plain)


# ------------------------------------------------------------------------------------------ PEFT's key layout


def peft_target_parameters(model: nn.Module) -> list[str]:
    """adapter_config.json's `target_parameters`: the adapted stacked weights, as `mlp.experts.<name>`."""
    return sorted({".".join([*n.split(".")[-2:], p]) for n, m in _experts(model).items()
                   if isinstance(m, FrozenExperts) for p in m.lora_A})


def _peft_names(module_name: str, module: FrozenExperts) -> dict[str, tuple[str, str]]:
    """PEFT key (without the base_model.model. prefix) -> (stacked weight, "A" | "B") for one module."""
    targeted = [p for p in EXPERT_PARAMS if p in module.lora_A]
    out = {}
    for k, param in enumerate(targeted):
        prefix = module_name + ".base_layer" * (len(targeted) - 1 - k)  # the first wrapped sits innermost
        out[f"{prefix}.lora_A.weight"] = (param, "A")
        out[f"{prefix}.lora_B.weight"] = (param, "B")
    return out


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The expert adapters under PEFT's keys (no prefix) and in its layout (module docstring), whole: sharded ones
    are gathered (every process calls this, in the same order)."""
    out = {}
    for module_name, module in _experts(model).items():
        if not isinstance(module, FrozenExperts):
            continue
        for key, (param, which) in _peft_names(module_name, module).items():
            if which == "A":  # (E, r, in) -> (E*r, in), row e*r + j
                out[key] = whole(module.lora_A[param]).flatten(0, 1)
            else:  # (E, out, r) -> (out, r, E) -> (out, r*E), column j*E + e
                out[key] = whole(module.lora_B[param]).permute(1, 2, 0).flatten(1)
    return out


def load_peft_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-layout expert adapters (keys as peft_state_dict's) into the model's FrozenExperts."""
    for module_name, module in _experts(model).items():
        if not isinstance(module, FrozenExperts):
            continue
        for key, (param, which) in _peft_names(module_name, module).items():
            target = module.lora_A[param] if which == "A" else module.lora_B[param]
            E, a, b = target.shape  # A: (E, r, in); B: (E, out, r)
            expected = (E * a, b) if which == "A" else (a, b * E)
            tensor = tensors[key]
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, the model expects {expected}")
            with torch.no_grad():
                if which == "A":
                    target.copy_(tensor.view(E, a, b))
                else:
                    target.copy_(tensor.view(a, b, E).permute(2, 0, 1))


def is_expert_adapter(name: str) -> bool:
    """Whether a parameter name is an expert adapter (saved through peft_state_dict, not under its own name)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B") and parts[-1] in EXPERT_PARAMS
