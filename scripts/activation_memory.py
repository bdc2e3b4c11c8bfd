"""Bytes of activations one decoder layer keeps from its forward to its backward, per activation checkpointing mode.

    python scripts/activation_memory.py                  # W1, W3, W5 at their real shapes, as a markdown table

A count, not a measurement: one decoder layer is built on the meta device (no memory, no compute) at a workload's
shapes and dtype (bf16), its forward runs on a (B, T, D) input that requires grad, and every storage an op creates
during that forward is tracked until it is freed. What is still alive when the forward returns is what the layer keeps
for its backward, its output included (the next layer's input, which `full` keeps as its checkpoint input).

Attention on the meta device runs torch's math path, which keeps (T, T) scores and probabilities; flash attention on a
GPU keeps only its output and a (B, heads, T) fp32 logsumexp. The count therefore leaves out every tensor whose last two
dimensions are (T, T) (scores, probabilities, masks) and adds the logsumexp, so that it describes a flash attention run.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from models import attention, checkpointing  # noqa: E402

GIB = 2**30


class LiveStorages(TorchDispatchMode):
    """Tracks every storage an op creates inside the mode, with its bytes and the shape of the tensor that made it,
    until it is freed."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live: dict[int, tuple[int, tuple[int, ...]]] = {}  # storage id -> (bytes, shape of its first tensor)
        # storages made before the mode (weights, the input): views of them (a weight's transpose) are not new memory
        self.existing = {t.untyped_storage()._cdata for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.existing:
                    self.live[key] = (storage.nbytes(), tuple(t.shape))
                    weakref.finalize(storage, self.live.pop, key, None)
        return out


def build_layer(hf: dict, dtype: torch.dtype):
    """(the first full-attention decoder layer on the meta device, the model's config, its rotary embedding)."""
    config = models.config_from_hf(hf)
    config.attn_implementation = "sdpa"
    model = models.build_model(config, "meta", dtype)
    layers = model.model.layers
    layer = next((la for la in layers if not getattr(la.self_attn, "is_local", False)), layers[0])
    return layer.train(), config, model.model.rotary_emb


def layer_saved_bytes(hf: dict, batch: int, seq_len: int, mode: str, dtype=torch.bfloat16) -> int:
    """Bytes one decoder layer keeps for its backward under `mode` ("none" | "selective" | "full"), counted on the
    meta device and adjusted to flash attention (see the module docstring)."""
    layer, config, rope = build_layer(hf, dtype)
    B, T, D = batch, seq_len, config.hidden_size
    x = torch.empty(B, T, D, device="meta", dtype=dtype, requires_grad=True)  # (B, T, D), the layer's input
    position_ids = torch.arange(T, device="meta").expand(B, T)
    cos, sin = rope(position_ids, dtype)  # (B, T, head_dim) each, made once per forward for every layer
    ctx = attention.build_context("sdpa", (B, T), torch.device("meta"))  # one document a row: no packing
    extra = (None,) if hasattr(config, "num_experts") else ()  # the MoE layer's token weights for the aux loss
    run = checkpointing.checkpointed(layer, 0, mode)
    with LiveStorages([x, cos, sin, *layer.parameters(), *layer.buffers()]) as tracker:
        out = run(x, cos, sin, ctx, *extra)
    # (..., T, T): attention scores, probabilities and masks of the math path (not the (B, T, D) output when D == T)
    kept = [nbytes for nbytes, shape in tracker.live.values() if shape[-2:] != (T, T) or shape == (B, T, D)]
    del out
    logsumexp = B * config.num_attention_heads * T * 4  # (B, heads, T) fp32, kept by flash attention
    return sum(kept) + logsumexp


def per_layer_table(hf: dict, batch: int, seq_len: int, k: int = 2, dtype=torch.bfloat16) -> dict[str, float]:
    """Mode -> bytes a layer keeps (every_k: the average over k layers, one recomputed fully, k - 1 storing all)."""
    table = {mode: layer_saved_bytes(hf, batch, seq_len, mode, dtype) for mode in ("none", "selective", "full")}
    table["every_k"] = (table["full"] + (k - 1) * table["none"]) / k
    return table


def main() -> int:
    from scripts.bench import WORKLOADS

    print("| workload | layers | none | selective | every_k (k=2) | full | GiB per layer: none / selective / full |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in ("W1", "W3", "W5"):
        w = WORKLOADS[name]
        table = per_layer_table(w.hf, w.batch, w.seq_len)
        layers = w.hf["num_hidden_layers"]
        total = " | ".join(f"{table[m] * layers / GIB:.2f} GiB" for m in ("none", "selective", "every_k", "full"))
        per = " / ".join(f"{table[m] / GIB:.3f}" for m in ("none", "selective", "full"))
        print(f"| {name} ({w.batch} x {w.seq_len}) | {layers} | {total} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
