"""Reading an HF config.json as transformers reads it: the helpers every model family shares.

Each family file holds one table, `HF_DEFAULTS[model_type] = {config.json key: the value transformers' config class
for that model type takes when config.json leaves the key out}`. A None there means "derived from other keys" (as
transformers derives it: num_key_value_heads = num_attention_heads, head_dim = hidden_size // num_attention_heads,
layer_types from the layer pattern) or "off" (no rope scaling, no softcapping). The tables are tested key by key
against transformers' config classes (tests/test_models_hf_config.py).

RoPE settings come in two spellings: transformers 4's top-level `rope_theta` and `rope_scaling`, and transformers 5's
`rope_parameters` (rope_theta inside it). Both are read; as in transformers, `rope_scaling` wins over
`rope_parameters`, and a rope_theta inside the dict wins over the top-level one.
"""

from __future__ import annotations

# keys each rope type needs inside rope_scaling / rope_parameters; without them the frequencies are undefined
ROPE_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def read_keys(hf: dict, defaults: dict, nullable: frozenset | set = frozenset()) -> dict:
    """{key: value} for every key of `defaults`: config.json's value, or the default where the key is left out.

    A null in config.json stays None where None means something: the default itself is None (derived or off), or the
    key is in `nullable` (e.g. Mistral's sliding_window: null is full causal attention). Any other null is refused,
    as transformers refuses it.
    """
    values = {}
    for key, default in defaults.items():
        value = hf.get(key, default)
        if value is None and default is not None and key not in nullable:
            raise ValueError(
                f"config.json: {key} is null; give it a value or leave the key out (then transformers' default for "
                f"{hf.get('model_type')}, {default!r}, is used)"
            )
        values[key] = list(value) if isinstance(value, list) else value  # never share the table's lists
    return values


def rope_from_hf(hf: dict, theta: float) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) for one rope; `theta` is the top-level rope_theta or the family's default."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    return float(params.get("rope_theta", theta)), rope_scaling_of(params)


def rope_scaling_of(params: dict) -> dict | None:
    """The scaling part of a rope dict (transformers 4's `type` read as `rope_type`); None for plain RoPE."""
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return None if scaling.get("rope_type", "default") == "default" else scaling


def check_rope_scaling(scaling: dict | None, supported: tuple[str, ...], model_type: str) -> None:
    """Refuse, while the config is read, a rope scaling nanotune does not implement or one that lacks a key it needs."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in supported:
        raise ValueError(
            f"config.json: rope scaling type {kind!r} is not supported for {model_type}; nanotune implements {supported}"
        )
    missing = [key for key in ROPE_REQUIRED_KEYS[kind] if scaling.get(key) is None]
    if missing:
        known = " (original_max_position_embeddings is 8192 for Llama 3.1 to 3.3)" if kind == "llama3" else ""
        raise ValueError(
            f"config.json: rope_scaling (or rope_parameters) of rope_type {kind!r} has no {', '.join(missing)}; "
            f"add {'them' if len(missing) > 1 else 'it'} as the model was trained{known}"
        )
