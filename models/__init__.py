"""Model families, and loading / saving HF-format checkpoint folders.

    model = models.from_pretrained("path/to/Llama-3.2-1B", dtype=torch.bfloat16, device="cuda")
    models.save_pretrained(model, "out/final")          # config.json + model.safetensors (or shards + index)

Build order: the module is created on the meta device (no memory), `prepare(model)` may swap modules there
(QLoRA, FP8), then each checkpoint tensor is read from disk straight into its final dtype and device, one tensor at a
time, so peak host memory stays near one copy of the model in the target dtype.

Checkpoint-key hooks a model may define (the identity is used otherwise):
- `model.expected_hf_keys() -> {key: shape}`: every tensor the model reads from a checkpoint;
- `model.param_for_hf_key(key) -> (param_name, index | None)`: where a checkpoint tensor lands (`index` selects a slice
  of a stacked parameter, e.g. one expert of a (num_experts, ...) tensor, or a tuple such as (expert, slice));
- `model.ignored_hf_key_prefixes`: checkpoint keys the model does not read (a vision tower beside the text model);
- `model.hf_state_dict() -> dict[str, Tensor]`: the tensors under their checkpoint names, for saving.
Module hooks used while loading:
- `module.load_hf_weight(name, tensor)`: called instead of assigning the parameter (NF4 quantisation happens here);
  a parameter with `hf_shape = None` (NF4 block scales) is made by such a module and is not read from checkpoints;
- `module.materialize_after_load(device)`: allocates and initialises tensors that checkpoints do not hold (RoPE
  frequencies, fresh LoRA adapters).
With `fuse_projections` (models/fusion.py) the functions below also map q/k/v and gate/up checkpoint tensors to rows
of the fused parameters on load, and cut those back into the checkpoint tensors on save, after the model's hooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from models import fusion, gemma, llama, mistral, qwen_moe, safetensors_io
from models.hf_config import apply_overrides
from models.safetensors_io import CheckpointError
from models.llama import LlamaConfig, LlamaForCausalLM
from models.mistral import MistralConfig, MistralForCausalLM
from models.gemma import GemmaConfig, GemmaForCausalLM
from models.qwen_moe import QwenMoeConfig, QwenMoeForCausalLM

# model_type in config.json -> (config class, model class)
FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2_moe": (QwenMoeConfig, QwenMoeForCausalLM),
    "qwen3_moe": (QwenMoeConfig, QwenMoeForCausalLM),
    "gemma2": (GemmaConfig, GemmaForCausalLM),
    "gemma3_text": (GemmaConfig, GemmaForCausalLM),
    "gemma3": (GemmaConfig, GemmaForCausalLM),  # the text model of an image-text checkpoint
}

# Named sizes for random init (the quickstart, pretraining-style runs); HF config.json fields.
SIZES: dict[str, dict] = {
    "llama-tiny": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True),
    "llama-small": dict(model_type="llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                        tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True,
                     max_position_embeddings=131072),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# model_type -> the config.json keys its family reads, with transformers' defaults (what `overrides` may set)
HF_KEYS: dict[str, dict] = {**llama.HF_DEFAULTS, **mistral.HF_DEFAULTS, **gemma.HF_DEFAULTS, **qwen_moe.HF_DEFAULTS}


def config_from_hf(hf: dict, overrides: dict | None = None):
    """The family's config for an HF config.json dict, with `overrides` (config.json fields) merged in first."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported; nanotune supports {sorted(FAMILIES)}"
        )
    config_cls, _ = FAMILIES[model_type]
    try:
        if overrides and model_type == "gemma3":  # image-text: the overrides are about its text model
            hf = {**hf, "text_config": apply_overrides(hf.get("text_config") or {}, overrides, HF_KEYS["gemma3_text"])}
        elif overrides:
            hf = apply_overrides(hf, overrides, HF_KEYS[model_type])
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        return config_cls.from_hf(hf)
    except (TypeError, ValueError, KeyError) as e:
        # the family's messages start with "config.json: "; say it once, with the model type
        raise CheckpointError(f"config.json ({model_type}): {str(e).removeprefix('config.json: ')}") from None


def build_model(config, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Create the module for a config (on the meta device by default: no memory is used)."""
    _, model_cls = FAMILIES[config.model_type]
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype)


def from_size(name: str, vocab_size: int, dtype=torch.float32, device="cpu", attn_implementation="auto",
              seed: int = 0, overrides: dict | None = None, fuse_projections: bool = False) -> nn.Module:
    """A randomly initialised model of a named size (see SIZES). `fuse_projections`: see models/fusion.py (the random
    numbers then fill the fused weights, so they differ from the unfused model's)."""
    if name not in SIZES:
        raise CheckpointError(f"model.size {name!r} is unknown; choose one of {sorted(SIZES)}")
    config = config_from_hf({**SIZES[name], "vocab_size": vocab_size}, overrides)
    config.attn_implementation = attn_implementation
    config.fuse_projections = fuse_projections
    config.hf_config = {}  # not read from a file: save_pretrained writes a complete config.json (hf_config_from)
    model = build_model(config, "meta", dtype)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist (download one with scripts/download.py)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; an HF-format model folder needs config.json and *.safetensors")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None


def from_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "auto",
    prepare=None,
    overrides: dict | None = None,
    fuse_projections: bool = False,
) -> nn.Module:
    """Load an HF-format folder (config.json + model.safetensors, or shards + model.safetensors.index.json).
    `overrides`: config.json fields to change (e.g. rope_scaling for a longer context); saving writes them.
    `fuse_projections`: q/k/v and gate/up as one fused weight each (models/fusion.py); checkpoints keep HF's keys."""
    path = Path(path)
    config = config_from_hf(read_config(path), overrides)
    config.attn_implementation = attn_implementation
    config.fuse_projections = fuse_projections
    files = safetensors_io.checkpoint_files(path)  # raises when there are none
    headers = {f: safetensors_io.read_header(f) for f in files}  # cheap: only the JSON headers

    model = build_model(config, "meta", dtype)
    if prepare is not None:
        prepare(model)
    expected = expected_checkpoint_keys(model)
    # e.g. the vision tower of an image-text checkpoint whose text model is loaded
    ignored = tuple(getattr(model, "ignored_hf_key_prefixes", ()))
    found = {k: (f, info) for f, h in headers.items() for k, info in h.items() if not (ignored and k.startswith(ignored))}
    check_keys(path, expected, found)
    if torch.device(device).type == "meta":
        return model  # a check of config and keys only (dry runs): no tensor is read

    for file, header in headers.items():
        with open(file, "rb") as f:
            for key, info in header.items():
                if key in expected:
                    place(model, key, safetensors_io.read_tensor(f, info), dtype, device)
    for module in model.modules():
        if hasattr(module, "materialize_after_load"):
            module.materialize_after_load(torch.device(device))
    model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: nothing was loaded for {still_meta[:8]} (missing from the checkpoint)")
    return model


def expected_checkpoint_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> expected shape, for every tensor the model reads from a checkpoint."""
    shapes = model.expected_hf_keys() if hasattr(model, "expected_hf_keys") else default_checkpoint_keys(model)
    if not is_fused(model):
        return shapes
    # a fused parameter stands for its parts: qkv_proj.weight -> q_proj.weight, k_proj.weight, v_proj.weight
    return {part: part_shape for key, shape in shapes.items()
            for part, _, part_shape in fusion.hf_parts(model.config, key, shape)}


def default_checkpoint_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The parameters under their own names (adapters, tensors made while loading and a tied LM head left out)."""
    shapes = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if ".lora_" in name or getattr(param, "hf_shape", ()) is None:
            continue  # adapters are not in base checkpoints, nor tensors made while loading (NF4 block scales)
        shapes[name] = tuple(getattr(param, "hf_shape", param.shape))
    if getattr(model.config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def check_keys(path: Path, expected: dict, found: dict) -> None:
    """Refuse a checkpoint with missing or mis-shaped keys before any tensor is read; extra keys are reported."""
    missing = [k for k in expected if k not in found]
    # derived or tied tensors some exporters still write: nothing to load from them
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")
    unexpected = [k for k in found if k not in expected and not k.endswith(ignorable)]
    misshaped = [
        f"{k}: checkpoint {tuple(found[k][1]['shape'])}, model {expected[k]}"
        for k in expected
        if k in found and tuple(found[k][1]["shape"]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if misshaped:
        problems.append(f"mis-shaped keys {misshaped[:8]}")
    if problems:
        raise CheckpointError(
            f"{path}: the checkpoint does not match its config.json: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )


def is_fused(model: nn.Module) -> bool:
    """Whether the model was built with fused q/k/v and gate/up projections (models/fusion.py)."""
    return getattr(getattr(model, "config", None), "fuse_projections", False)  # a module of no family: not fused


def param_for_hf_key(model: nn.Module, key: str) -> tuple[str, object]:
    """Checkpoint key -> (parameter name, index into it | None): the model's own map (`param_for_hf_key`), then, in
    a fused model, q/k/v and gate/up land in rows of their fused parameter."""
    name, index = model.param_for_hf_key(key) if hasattr(model, "param_for_hf_key") else (key, None)
    if index is None and is_fused(model):
        fused = fusion.fused_place(model.config, name, lambda fused_name: model.get_parameter(fused_name).shape[0])
        if fused is not None:
            return fused  # (e.g. "...qkv_proj.weight", the rows of k_proj in it)
    return name, index


def place(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype, device) -> None:
    """Put one checkpoint tensor where it belongs: its parameter (or buffer), or one slice of a stacked parameter."""
    name, index = param_for_hf_key(model, key)
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "load_hf_weight"):
        module.load_hf_weight(local, tensor) if index is None else module.load_hf_weight(local, tensor, index)
        return
    old = getattr(module, local)
    target_dtype = old.dtype if old.is_floating_point() else tensor.dtype
    if index is not None:  # e.g. expert `index` of a (num_experts, ...) parameter, or q_proj's rows of qkv_proj:
        # allocate it once, fill slices
        if old.is_meta:
            old = nn.Parameter(torch.empty(old.shape, dtype=target_dtype, device=device), old.requires_grad)
            setattr(module, local, old)
        with torch.no_grad():
            old[index].copy_(tensor)
        return
    value = tensor.to(device=device, dtype=target_dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, local, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(local, value)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names (tied LM head left out, as HF does)."""
    if hasattr(model, "hf_state_dict"):
        sd = model.hf_state_dict()
    else:
        sd = {k: v for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
    if not is_fused(model):
        return sd
    # fused parameters cut into their parts, copied: safetensors refuses tensors that share storage
    return {part: tensor if rows is None else tensor[rows].clone()
            for key, tensor in sd.items() for part, rows, _ in fusion.hf_parts(model.config, key, tensor.shape)}


def save_pretrained(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json and the weights (sharded with an index when larger than max_shard_size)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    safetensors_io.save_sharded(tensors, path, parse_size(max_shard_size))
    write_config_json(model, path, str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    make_readable(path)


def write_config_json(model: nn.Module, path: Path, dtype_name: str) -> None:
    """config.json for saved weights of dtype `dtype_name` (e.g. "bfloat16"), written atomically."""
    hf = dict(model.config.hf_config) or hf_config_from(model.config)
    hf.pop("torch_dtype", None)
    hf["dtype"] = dtype_name
    tmp = Path(path) / "config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, Path(path) / "config.json")


def make_readable(folder: str | Path) -> None:
    """Files 0644 and folders 0755 in `folder` (itself included): a saved model is meant to be read by others (a
    serving process, colleagues), whatever the writer's umask or temp-file machinery (mkstemp creates files 0600)."""
    folder = Path(folder)
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        if not path.is_symlink():  # a link's target may lie outside the folder: leave it as it is
            path.chmod(0o755 if path.is_dir() else 0o644)


def hf_config_from(config) -> dict:
    """An HF config.json dict for a model that was built from a named size rather than loaded."""
    from dataclasses import asdict

    hf = {k: v for k, v in asdict(config).items() if k not in ("hf_config", "attn_implementation", "fuse_projections")}
    # both spellings: transformers 5 reads rope_parameters, transformers 4 rope_theta / rope_scaling
    hf["rope_parameters"] = {"rope_theta": hf["rope_theta"], **(hf["rope_scaling"] or {"rope_type": "default"})}
    hf["architectures"] = [FAMILIES[config.model_type][1].__name__]
    hf["hidden_act"] = "silu"
    return hf


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


__all__ = ["from_pretrained", "save_pretrained", "make_readable", "from_size", "build_model", "config_from_hf",
           "expected_checkpoint_keys", "param_for_hf_key", "is_fused",
           "FAMILIES", "SIZES", "DTYPES", "CheckpointError"]
