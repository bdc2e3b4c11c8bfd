"""Fused input projections (`fuse_projections` in a family's config): one GEMM for q / k / v, one for gate / up.

With the switch on, an attention layer holds `qkv_proj` instead of `q_proj`, `k_proj`, `v_proj`, and a dense gated
MLP `gate_up_proj` instead of `gate_proj`, `up_proj`: the same weights stacked along the output features,

    qkv_proj.weight     = [q_proj.weight; k_proj.weight; v_proj.weight]    ((Hq + 2 Hkv) * head_dim, D)
    gate_up_proj.weight = [gate_proj.weight; up_proj.weight]                (2 I, D)

(biases likewise), and the forward splits the one product into its parts. Checkpoints keep HF's separate tensors:
`FUSED` is the one table between the two layouts, read on load (`fused_place`: a checkpoint tensor lands in rows of a
fused parameter, as a Qwen MoE expert lands in a slice of its stacked tensor) and on save (`hf_parts`: a fused
parameter is cut back into the checkpoint tensors). MoE experts are stacked already (`experts.gate_up_proj`) and are
left as they are. LoRA adapts the parts of a fused module (nanotune/lora.py FusedLoRALinear); the TP plans, which
shard q_proj ... up_proj by name, are refused with the switch.
"""

from __future__ import annotations

# fused module -> the checkpoint modules it stacks, in the order of its output features
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
FUSED_OF = {part: fused for fused, parts in FUSED.items() for part in parts}  # q_proj -> qkv_proj, ...


def part_sizes(config, fused: str, num_rows: int) -> list[int]:
    """Output features of each part of a fused weight with `num_rows` rows, in FUSED's order."""
    if fused == "qkv_proj":
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        return [q, kv, kv]
    return [num_rows // 2, num_rows // 2]  # gate and up are equally wide


def _split_name(name: str) -> tuple[str, str, str]:
    """"model.layers.0.self_attn.q_proj.weight" -> ("model.layers.0.self_attn", "q_proj", "weight")."""
    owner, _, local = name.rpartition(".")
    prefix, _, module = owner.rpartition(".")
    return prefix, module, local


def fused_place(config, name: str, num_rows_of) -> tuple[str, slice] | None:
    """Where the checkpoint tensor of parameter `name` (HF layout) lands in a fused model: (fused parameter, its rows),
    or None when it is not part of one. `num_rows_of(fused name)`: the fused parameter's number of rows."""
    prefix, module, local = _split_name(name)
    if module not in FUSED_OF or local not in ("weight", "bias"):
        return None
    fused = FUSED_OF[module]
    fused_name = f"{prefix}.{fused}.{local}"
    sizes = part_sizes(config, fused, num_rows_of(fused_name))
    start = sum(sizes[: FUSED[fused].index(module)])
    return fused_name, slice(start, start + sizes[FUSED[fused].index(module)])


def hf_parts(config, name: str, shape) -> list[tuple[str, slice | None, tuple[int, ...]]]:
    """The checkpoint tensors a parameter holds: [(name, rows of it, shape)]; a fused one gives one per part, any
    other itself whole (rows None)."""
    prefix, module, local = _split_name(name)
    if module not in FUSED or local not in ("weight", "bias"):
        return [(name, None, tuple(shape))]
    out, start = [], 0
    for part, size in zip(FUSED[module], part_sizes(config, module, shape[0])):
        out.append((f"{prefix}.{part}.{local}", slice(start, start + size), (size, *shape[1:])))
        start += size
    return out
