"""Typed run configuration: a TOML file -> one dataclass per section.

    cfg = load_config("configs/quickstart.toml", ["--train.max_steps=20", "--output_dir=outputs/try"])
    cfg.train.max_steps   # 20

Each section is a flat dataclass below; a component receives only its own section. Unknown keys and values of the
wrong type are errors that name the key path and suggest the closest valid key. Overrides on the command line are
`--section.key=value` (or `--key=value` for top-level keys); the value is parsed as TOML, falling back to a string.
Every key is documented in docs/config.md (a test keeps that file in sync with these dataclasses).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


# ----------------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    path: str = ""  # HF-format model folder (config.json + *.safetensors); empty: build `size` with random init
    size: str = ""  # a named size for random init (see models.SIZES), used when `path` is empty
    tokenizer: str = ""  # folder or tokenizer.json; default: the model folder


@dataclass
class DatasetConfig:
    path: str = ""  # local .jsonl / .json / .parquet file, or an HF Hub dataset repo "org/name"
    format: str = "chat"  # text | alpaca | chat | prompt_completion
    split: str = "train"  # split of an HF Hub dataset
    data_files: str = ""  # glob of files inside an HF Hub dataset repo
    revision: str = ""  # HF Hub revision (branch, tag or commit)
    weight: float = 1.0  # mixing weight: fraction of this data set's rows used (1.0 = all, 2.0 = twice)
    text_field: str = "text"  # format text: the document
    instruction_field: str = "instruction"  # format alpaca: the task (masked)
    input_field: str = "input"  # format alpaca: optional context (masked); may be missing or empty
    output_field: str = "output"  # format alpaca: the answer (trained)
    prompt_field: str = "prompt"  # format prompt_completion: the prompt (masked)
    completion_field: str = "completion"  # format prompt_completion: the completion (trained)
    messages_field: str = ""  # default: "messages", or "conversations" for ShareGPT rows
    role_field: str = "role"  # "from" for ShareGPT
    content_field: str = "content"  # "value" for ShareGPT
    role_map: dict = field(default_factory=dict)  # e.g. {human = "user", gpt = "assistant"}
    system_prompt: str = ""  # inserted as a system turn when a chat has none
    # question/answer style rows rendered as a chat: field -> role, e.g. {question = "user", answer = "assistant"}
    fields_to_roles: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    datasets: list = field(default_factory=list)  # list of [[data.datasets]] tables (DatasetConfig)
    eval_datasets: list = field(default_factory=list)  # explicit eval files (DatasetConfig tables)
    eval_fraction: float = 0.0  # held-out fraction of the training rows, when no eval_datasets are given
    seq_len: int = 2048  # tokens per packed row; the longest example kept
    chat_template: str = ""  # path to a Jinja template; default: the tokenizer's own chat_template
    roles_to_train: list = field(default_factory=lambda: ["assistant"])  # chat roles whose turns are trained
    train_on_inputs: bool = False  # train every token, prompts included
    train_on_eos: str = "turn"  # turn: end-of-turn token of each trained turn | last | all | none
    too_long: str = "drop"  # drop | truncate: rows longer than seq_len (`text` rows are split into chunks: split)
    text_too_long: str = "split"  # split | truncate | drop, for the `text` format
    packing: bool = True  # multipack rows into seq_len; False pads one example per row
    cache_dir: str = ".cache/nanotune"  # tokenized data is cached here, keyed by content and options
    num_workers: int = 0  # processes for tokenizing (0: in-process)


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # rows per forward pass (per process)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # stop after this many optimizer steps (0: run `epochs`)
    epochs: float = 1.0  # passes over the training data, when max_steps is 0 (fractions allowed)
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int = 0  # micro-batches per evaluation and process (0: the whole eval split)
    nonfinite: str = "error"  # error | skip: what a non-finite loss or gradient norm does
    # fp32 | bf16 (bf16 parameters, gradients and AdamW states; LoRA adapters stay fp32) | amp-bf16 (fp32 parameters
    # and AdamW states, bf16 compute)
    precision: str = "fp32"
    activation_checkpointing: str = "none"  # none | full: recompute each decoder layer in the backward
    activation_offload: bool = False  # keep saved activations in host memory between forward and backward
    compile: bool = False  # torch.compile each decoder block
    loss: str = "auto"  # auto (chunked where it applies) | plain | chunked: LM head + CE a chunk of tokens at a time
    kernels: bool = False  # Triton RMSNorm and SwiGLU/GeGLU kernels (CUDA; needs triton)


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    decay_norms_biases_embeddings: bool = False  # weight decay on norms, biases and embeddings too
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    fused: str = "auto"  # auto (fused AdamW on CUDA) | true | false


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["all-linear"])  # module-name suffixes, or ["all-linear"]
    rslora: bool = False
    dora: bool = False
    modules_to_save: list = field(default_factory=list)  # e.g. ["embed_tokens", "lm_head"], trained in full
    quantize: str = ""  # "" | nf4 (QLoRA through bitsandbytes)
    merge: bool = True  # write the merged model to <output_dir>/final


@dataclass
class AttentionConfig:
    implementation: str = "auto"  # auto | eager | sdpa | flex | varlen


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only when stopped by a signal)
    keep: int = 2  # keep the newest K step-N checkpoints (0: keep all)
    resume: str = ""  # "" | auto (newest step-N in output_dir) | a path to a step-N folder
    save_final: bool = True  # write <output_dir>/final in HF format


@dataclass
class LoggingConfig:
    every: int = 1  # steps between progress lines
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "nanotune"
    plot: bool = True  # loss curve PNG at the end (needs matplotlib)


@dataclass
class ParallelConfig:
    """How the processes of a torchrun job share the model: one DeviceMesh (dp_replicate, dp_shard, cp, tp) whose
    sizes multiply to the number of processes. See docs/parallel.md."""

    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    dp_replicate: int = 1  # data-parallel replicas of the sharded model (HSDP: > 1, usually the number of nodes)
    dp_shard: int = -1  # FSDP2: processes that share one copy of the model, each holding 1/dp_shard (-1: the rest)
    tp: int = 1  # tensor parallel: processes that split every attention / MLP matmul (keep it within one node)
    cp: int = 1  # context parallel (not built yet: must be 1)
    ep: int = 1  # expert parallel (not built yet: must be 1)
    param_dtype: str = "auto"  # FSDP2 compute dtype of gathered parameters: auto (bf16 for amp-bf16) | fp32 | bf16
    reduce_dtype: str = "auto"  # FSDP2 gradient reduction dtype: auto (fp32 for amp-bf16, else the parameters') | fp32 | bf16
    reshard_after_forward: bool = True  # free gathered parameters after each layer's forward (False: keep until backward)
    cpu_offload: bool = False  # FSDP2 keeps parameters, gradients and optimizer state in host memory (CUDA)


@dataclass
class Config:
    output_dir: str = "outputs/run"  # where checkpoints, logs, final/ and adapter/ go
    seed: int = 0  # data order, initialisation and dropout
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# Lists of tables whose items are themselves typed sections.
LIST_ITEM_TYPES = {("data", "datasets"): DatasetConfig, ("data", "eval_datasets"): DatasetConfig}

# ------------------------------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or nothing: defaults) and apply `--section.key=value` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        key, value = parse_override(item)
        set_path(raw, key, value)
    return from_dict(Config, raw, prefix="")


def parse_toml(text: str) -> dict:
    return tomllib.loads(text)


def parse_override(item: str) -> tuple[str, object]:
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"override {item!r} must look like --section.key=value (e.g. --train.max_steps=100)")
    key, text = item[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare string such as --output_dir=outputs/x
    return key, value


def set_path(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: {p} is not a section")
    node[last] = value


def from_dict(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix + key, list(fields)))
        f = fields[key]
        section = section_type(cls, f)
        if section is not None:
            kwargs[key] = from_dict(section, value, prefix + key + ".")
        else:
            kwargs[key] = check_value(cls, f, value, prefix + key)
    return cls(**kwargs)


def section_type(cls, f):
    t = typing.get_type_hints(cls)[f.name]
    return t if dataclasses.is_dataclass(t) else None


def check_value(cls, f, value, key_path: str):
    expected = typing.get_type_hints(cls)[f.name]
    if isinstance(expected, types.UnionType):  # e.g. int | None
        expected = tuple(a for a in typing.get_args(expected) if a is not type(None))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        names = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
        raise ConfigError(f"{key_path} must be {names}, got {value!r} ({type(value).__name__})")
    section_key = tuple(key_path.split("."))[-2:]
    if section_key in LIST_ITEM_TYPES:
        item_cls = LIST_ITEM_TYPES[section_key]
        value = [from_dict(item_cls, v, f"{key_path}[{i}].") for i, v in enumerate(value)]
    return value


def unknown_key_message(key_path: str, valid: list[str]) -> str:
    name = key_path.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    elsewhere = [f"{section}.{name}" for section, cls in section_classes().items()
                 if name in {f.name for f in dataclasses.fields(cls)}]
    if close:
        hint = f"; did you mean {key_path[: -len(name)]}{close[0]}?"
    elif elsewhere:
        hint = f"; it belongs in another section: {' or '.join(elsewhere)}"
    else:
        hint = f"; valid keys: {', '.join(valid)}"
    return f"unknown config key {key_path}{hint}"


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg) -> str:
    """Serialise a Config back to TOML (the resolved config written into the output directory)."""
    data = to_dict(cfg)
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"\n[{section}]")
        tables = []
        for k, v in values.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                tables.append((k, v))
            else:
                lines.append(f"{k} = {toml_value(v)}")
        for k, items in tables:
            for item in items:
                lines.append(f"\n[[{section}.{k}]]")
                lines.extend(f"{ik} = {toml_value(iv)}" for ik, iv in item.items())
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid in TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")
