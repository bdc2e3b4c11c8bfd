"""Reading an HF config.json as transformers reads it: the helpers every model family shares.

Each family file holds one table, `HF_DEFAULTS[model_type] = {config.json key: the value transformers' config class
for that model type takes when config.json leaves the key out}`. A None there means "derived from other keys" (as
transformers derives it: num_key_value_heads = num_attention_heads, head_dim = hidden_size // num_attention_heads,
layer_types from the layer pattern) or "off" (no rope scaling, no softcapping). The tables are tested key by key
against transformers' config classes (tests/test_models_hf_config.py).

RoPE settings come in two spellings: transformers 4's top-level `rope_theta` and `rope_scaling`, and transformers 5's
`rope_parameters` (rope_theta inside it). Both are read; as in transformers, `rope_scaling` wins over
`rope_parameters`, a rope_theta inside the dict wins over the top-level one, and a top-level
`original_max_position_embeddings` (Phi-3's spelling) wins over the one inside the dict.

`[model] overrides` in a run's config are merged into config.json's fields (`apply_overrides`) before the family's
config is built, so that e.g. a longer context with YaRN is one table in the TOML and is saved in final/config.json.
"""

from __future__ import annotations

import difflib

from models.rope_scaling import REQUIRED_KEYS as ROPE_REQUIRED_KEYS
from models.rope_scaling import check_frequencies_shape

ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta")


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
    return float(params.get("rope_theta", theta)), rope_scaling_of(params, hf.get("original_max_position_embeddings"))


def rope_scaling_of(params: dict, original_context: int | None = None) -> dict | None:
    """The scaling part of a rope dict (transformers 4's `type` read as `rope_type`); None for plain RoPE.
    `original_context`: a top-level original_max_position_embeddings, which wins for the types that read it."""
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type") in ("llama3", "yarn", "longrope") and original_context is not None:
        scaling["original_max_position_embeddings"] = original_context
    return None if scaling.get("rope_type", "default") == "default" else scaling


def check_rope_scaling(scaling: dict | None, supported: tuple[str, ...], model_type: str,
                       head_dim: int | None = None) -> None:
    """Refuse, while the config is read, a rope scaling nanotune does not implement or one that lacks a key it needs."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind == "dynamic":
        raise ValueError(
            "config.json: rope scaling type 'dynamic' (dynamic NTK) changes the frequencies with the length of the "
            "text being generated, an inference-time method with no fixed frequencies to train with; fine-tune "
            "with rope_type 'yarn' or 'linear' instead (e.g. model.overrides.rope_scaling)"
        )
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
    if head_dim is not None:
        check_frequencies_shape(scaling, head_dim)


def apply_overrides(hf: dict, overrides: dict, known_keys) -> dict:
    """config.json's fields with `overrides` (the run's `[model] overrides` table) merged in, checked key by key.

    An override of rope_scaling or rope_parameters replaces both spellings in the file (else the file's rope_scaling
    would win over an overriding rope_parameters); the file's rope_theta is kept unless the override gives one.
    """
    if not overrides:
        return dict(hf)
    allowed = set(known_keys) | set(ROPE_KEYS) | {"original_max_position_embeddings"}
    for key, value in overrides.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; {hf.get('model_type')} reads {sorted(allowed)}"
            raise ValueError(f"model.overrides.{key} is not a config.json key this model reads{hint}")
        current = hf.get(key, known_keys.get(key) if isinstance(known_keys, dict) else None)
        if not _same_kind(current, value) or (key in ROPE_KEYS[:2] and not isinstance(value, dict)):
            raise ValueError(f"model.overrides.{key} = {value!r} does not fit config.json's {key} ({current!r}); "
                             "give a value of the same kind")
    merged = dict(hf)
    nested = {"full_attention", "sliding_attention"} & set(hf.get("rope_parameters") or {})
    if "rope_theta" in overrides and not ({"rope_scaling", "rope_parameters"} & set(overrides)):
        if nested:
            raise ValueError("model.overrides.rope_theta: this config.json has one rope per layer type "
                             "(rope_parameters.full_attention / sliding_attention); override rope_parameters instead")
        for spelling in ("rope_scaling", "rope_parameters"):  # a rope_theta inside the file's rope dict would win
            if hf.get(spelling):
                merged[spelling] = {**hf[spelling], "rope_theta": overrides["rope_theta"]}
    if "rope_scaling" in overrides or "rope_parameters" in overrides:
        if nested and "rope_parameters" not in overrides:
            raise ValueError("model.overrides.rope_scaling: this config.json has one rope per layer type "
                             "(rope_parameters.full_attention / sliding_attention); override rope_parameters with "
                             "both tables instead")
        theta = (hf.get("rope_scaling") or {}).get("rope_theta") or (hf.get("rope_parameters") or {}).get(
            "rope_theta") or hf.get("rope_theta")
        merged.pop("rope_scaling", None)
        merged.pop("rope_parameters", None)
        if theta is not None and not nested:
            merged["rope_theta"] = theta
    merged.update(overrides)
    return merged


def _same_kind(current, value) -> bool:
    """Whether `value` can stand where config.json has `current` (None: anything; ints for floats)."""
    if current is None or value is None:
        return True
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(current, float) or isinstance(value, int))
    return isinstance(value, type(current))
