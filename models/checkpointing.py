"""Activation checkpointing of decoder layers: which layers recompute in the backward, and what they recompute.

Every model family runs its layer loop through `checkpointed(layer, index, mode, k)`, so that one switch,
`model.activation_checkpointing`, chooses between:

- `none`: store every activation the backward needs (fastest, most memory);
- `full`: store only each layer's input and run the whole layer forward again in its backward (about one extra forward
  pass; Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost");
- `every_k`: full recompute of every k-th layer (`model.activation_checkpointing_k`), the others store everything;
- `selective`: store the outputs of the matmuls and of attention, recompute only the cheap element-wise ops between
  them (norms, RoPE, the SwiGLU / GeGLU product, residual adds) in the backward (Korthikanti et al., 2022, "Reducing
  Activation Recomputation in Large Transformer Models"). Nearly no extra FLOPs, and most of the memory of `none`.

`selective` uses torch's selective checkpoint contexts: a policy function sees every aten op the layer's forward runs
and answers "save" or "recompute" for its output.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full", "every_k")

_aten = torch.ops.aten
# ops whose outputs `selective` keeps: the GEMMs (their recompute is what full checkpointing pays for) and the fused
# attention kernels (O(T^2) FLOPs; their outputs include what their backward needs, e.g. flash's logsumexp)
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._flash_attention_forward.default,
    _aten._efficient_attention_forward.default,
}
if hasattr(_aten, "_grouped_mm"):  # stacked MoE experts in one grouped GEMM (newer torch)
    SAVED_OPS.add(_aten._grouped_mm.default)


def normalize_mode(mode: str | bool) -> str:
    """The mode as a string; the old boolean switch still works (True: "full", False: "none")."""
    if mode is True:
        return "full"
    if mode is False:
        return "none"
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {MODES}")
    return mode


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Only ops that autograd records: inside a custom autograd Function's forward grad mode is off, and such a
    # Function may write into its matmul's output in place (LoRA adds its update into the base output), which a
    # saved output must not see. Such a Function is recomputed whole.
    save = op in SAVED_OPS and torch.is_grad_enabled()
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


def checkpointed(layer: Callable, index: int, mode: str | bool, k: int = 1) -> Callable:
    """`layer` itself, or a function with the same arguments that runs it under activation checkpointing.

    `index` is the layer's position in the stack (every_k recomputes layers 0, k, 2k, ...). Call with mode "none"
    outside training: checkpointing only matters when a backward follows.
    """
    mode = normalize_mode(mode)
    if mode == "none" or (mode == "every_k" and index % k != 0):
        return layer
    if mode in ("full", "every_k"):
        return functools.partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False)
    # selective: non-reentrant only (the reentrant variant has no context_fn)
    return functools.partial(torch.utils.checkpoint.checkpoint, layer, use_reentrant=False,
                             context_fn=_selective_contexts)
