"""Triton kernels for the hot elementwise and normalisation ops, each beside a few-line PyTorch reference.

    from nanotune.kernels import apply_kernels
    swapped = apply_kernels(model)     # after the weights are loaded or initialised, on a CUDA model

`apply_kernels` swaps modules from outside, keeping parameter names (the swapped modules hold the very same
Parameters and submodules, so checkpoints, LoRA adapters and optimizer state do not notice):
- every RMSNorm of the model files -> `TritonRMSNorm` (rms_norm.py), with the family's rounding and Gemma's 1 + weight;
- every dense gated MLP (SwiGLU, GeGLU) -> `TritonGLUMLP` (glu.py): same gate/up/down projections, one fused
  activation kernel (`TritonFusedGLUMLP` where gate and up are one `gate_up_proj`, models/fusion.py);
- every attention's `Rope` module (q and k rotated by position) -> `TritonRope` (rope.py): both in one launch;
- every plain stacked MoE `Experts` -> `TritonExperts` (moe.py): the same Parameters and grouped GEMMs, with the
  permute into expert order, the SwiGLU and the weighted un-permute between them in Triton kernels. Only the plain
  class is swapped: LoRA / NF4 experts (nanotune/lora_experts.py) and expert-parallel experts keep their own forward.

The module classes are named in tables below (names as data: of the kernels, only moe.py imports a model file, for
the `Experts` its `TritonExperts` extends), and a test checks the tables against the model files. Kernels run on CUDA
tensors; on CPU they run only under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), which the
tests use.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from nanotune.kernels.launch import interpreting

# "module.Class" of a model file's RMSNorm -> how it rounds (see rms_norm.py)
RMSNORM_CLASSES = {
    "models.llama.RMSNorm": dict(offset=0.0, cast_before_scale=True),  # also Mistral (same modules)
    "models.qwen_moe.RMSNorm": dict(offset=0.0, cast_before_scale=True),
    "models.gemma.RMSNorm": dict(offset=1.0, cast_before_scale=False),  # (1 + weight), scaled in fp32
}
# "module.Class" of a dense gated MLP (gate_proj, up_proj, down_proj) -> its activation
GLU_MLP_CLASSES = {
    "models.llama.MLP": "silu",
    "models.qwen_moe.MLP": "silu",
    "models.gemma.MLP": "gelu_tanh",
}
# "module.Class" of an attention's RoPE module: forward(q, k, cos, sin) -> (q, k), HF's rotate-half layout
ROPE_CLASSES = ("models.llama.Rope", "models.qwen_moe.Rope", "models.gemma.Rope")
# "module.Class" of stacked MoE experts: forward(x (N, D), experts (N, K), weights (N, K)), SwiGLU experts. The class
# itself only (a subclass changes the forward or the products: LoRA, NF4, expert parallelism)
EXPERTS_CLASSES = ("models.qwen_moe.Experts",)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def apply_kernels(model: nn.Module, norms: bool = True, mlps: bool = True, ropes: bool = True,
                  moe: bool = True, device: torch.device | None = None) -> list[str]:
    """Swap the model's RMSNorms, gated MLPs, RoPE modules and plain MoE experts for Triton-backed ones in place;
    returns the swapped names.

    Call it after the weights are loaded or initialised (the models' `init_weights` recognise only their own norm
    class) and after LoRA / QLoRA swaps, before torch.compile. A model on the meta device whose weights are filled in
    by name afterwards (the sharded loader: the swapped modules keep the same Parameters) may be swapped too: pass the
    `device` it will run on. Raises when triton is missing or the model is on a device the kernels cannot run on.
    """
    if not triton_available():
        raise ImportError("apply_kernels needs triton (`pip install triton`; CUDA builds of torch ship it), "
                          "or train without kernels")
    devices = {p.device.type for p in model.parameters()}
    if "meta" in devices:
        if device is None:
            raise RuntimeError("apply_kernels: the model is still on the meta device; apply the kernels after the "
                               "weights are loaded or initialised, or pass the device they will be loaded on")
        devices = (devices - {"meta"}) | {torch.device(device).type}
    if devices - {"cuda"} and not interpreting():
        raise RuntimeError(
            f"apply_kernels: the model is on {sorted(devices)}, but the Triton kernels run on CUDA tensors; move the "
            "model to a GPU first, or leave the kernels off on CPU (TRITON_INTERPRET=1 runs them slowly, for tests)"
        )
    from nanotune.kernels.glu import TritonFusedGLUMLP, TritonGLUMLP
    from nanotune.kernels.moe import TritonExperts  # a subclass of models.qwen_moe.Experts
    from nanotune.kernels.rms_norm import TritonRMSNorm
    from nanotune.kernels.rope import TritonRope

    swapped = []
    for name, module in list(model.named_modules()):
        kind = _qualified_name(module)
        if norms and kind in RMSNORM_CLASSES:
            new = TritonRMSNorm(module.weight, module.eps, **RMSNORM_CLASSES[kind])
        elif mlps and kind in GLU_MLP_CLASSES and hasattr(module, "gate_up_proj"):  # fused projections
            new = TritonFusedGLUMLP(module.gate_up_proj, module.down_proj, GLU_MLP_CLASSES[kind])
        elif mlps and kind in GLU_MLP_CLASSES:
            new = TritonGLUMLP(module.gate_proj, module.up_proj, module.down_proj, GLU_MLP_CLASSES[kind])
        elif ropes and kind in ROPE_CLASSES:
            new = TritonRope()
        elif moe and kind in EXPERTS_CLASSES:
            new = TritonExperts(module)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped


__all__ = ["apply_kernels", "triton_available", "RMSNORM_CLASSES", "GLU_MLP_CLASSES", "ROPE_CLASSES",
           "EXPERTS_CLASSES"]
