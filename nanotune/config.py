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
    router_aux_loss_coef: float = -1.0  # MoE: weight of the load-balancing loss (< 0: config.json's value)
    router_z_loss_coef: float = 0.0  # MoE: weight of the router z-loss, mean logsumexp(router logits)^2 (0: off)
    # q/k/v and gate/up as one weight each, one GEMM instead of three / two (models/fusion.py); checkpoints and final/
    # keep HF's separate tensors. Not with LoRA / QLoRA or parallel.tp > 1, which address those modules by name
    fuse_projections: bool = False
    # config.json fields to change, e.g. {max_position_embeddings = 32768, rope_scaling = {rope_type = "yarn",
    # factor = 4.0, original_max_position_embeddings = 8192}}; saved in final/config.json (docs/long-context.md)
    overrides: dict = field(default_factory=dict)


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
    # micro-batches collated ahead of the training step on a background thread, in pinned memory on CUDA so that
    # their copies do not wait (0: collated when the step asks for them)
    prefetch: int = 2

    def __post_init__(self):
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch must be at least 0 (micro-batches collated ahead; 0: off), got "
                              f"{self.prefetch}")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # rows per forward pass (per process)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # stop after this many optimizer steps (0: run `epochs`)
    epochs: float = 1.0  # passes over the training data, when max_steps is 0 (fractions allowed)
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    eval_batches: int = 0  # micro-batches per evaluation and process (0: the whole eval split)
    # error (stop at the next logging step, eval or checkpoint, naming the first non-finite step) | skip (skip that
    # step: reads one flag from the device per step): what a non-finite loss or gradient norm does
    nonfinite: str = "error"
    max_skipped_steps: int = 10  # with nonfinite = "skip": stop with an error after this many skipped steps in a row
    # fp32 | bf16 (bf16 parameters, gradients and AdamW states; LoRA adapters stay fp32) | amp-bf16 (fp32 parameters
    # and AdamW states, bf16 compute)
    precision: str = "fp32"
    # none | selective (keep matmul and attention outputs, recompute the element-wise ops between them) | full
    # (recompute each decoder layer in the backward) | every_k (full recompute of every k-th layer)
    activation_checkpointing: str = "none"
    activation_checkpointing_k: int = 2  # every_k: layers 0, k, 2k, ... are recomputed fully
    # keep saved activations in host memory between forward and backward: overlap (copies on a side CUDA stream, back
    # a layer ahead of the backward; true means this) | sync (torch's save_on_cpu: every copy waits) | false
    activation_offload: bool | str = False
    tiled_mlp: bool = False  # each decoder layer's MLP over tiles of tiled_mlp_tile tokens, recomputed in the backward
    tiled_mlp_tile: int = 4096  # tokens per MLP tile (of the micro-batch's rows flattened): its activation memory
    layer_offload: bool = False  # LoRA / QLoRA: frozen layer weights in host memory, on the device a layer ahead
    # none | blocks (torch.compile each decoder block) | model (the whole forward and loss of one process, one graph);
    # the old true / false still mean blocks / none
    compile: str | bool = "none"
    loss: str = "auto"  # auto (chunked where it applies) | plain | chunked: LM head + CE a chunk of tokens at a time
    kernels: bool = False  # Triton RMSNorm, SwiGLU/GeGLU, RoPE and MoE-glue kernels (CUDA; needs triton)

    def __post_init__(self):
        if isinstance(self.compile, bool):  # the switch was a boolean that compiled each decoder block
            self.compile = "blocks" if self.compile else "none"


@dataclass
class OptimConfig:
    lr: float = 2e-5  # peak learning rate of AdamW (reached after warmup_steps)
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay; by default not on norms, biases and embeddings
    decay_norms_biases_embeddings: bool = False  # weight decay on norms, biases and embeddings too
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's [beta1, beta2] moment decay rates
    eps: float = 1e-8  # AdamW's denominator term, added to the root of the second moment
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr (a count of steps, not a ratio)
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    fused: str = "auto"  # auto (fused AdamW on CUDA) | true | false


@dataclass
class LoraConfig:
    enabled: bool = False  # train low-rank adapters instead of the full model (the base weights stay frozen)
    rank: int = 16  # r: the inner dimension of each adapter pair A (r x in) and B (out x r)
    alpha: float = 32.0  # adapter output scale alpha / rank (alpha / sqrt(rank) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input during training
    targets: list = field(default_factory=lambda: ["all-linear"])  # module-name suffixes, or ["all-linear"]
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(rank) (Kalajdzievski 2023)
    dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature (Liu et al. 2024)
    modules_to_save: list = field(default_factory=list)  # e.g. ["embed_tokens", "lm_head"], trained in full
    quantize: str = ""  # "" | nf4 (QLoRA through bitsandbytes)
    # MoE: stacked expert weights given per-expert adapters (PEFT's target_parameters): ["gate_up_proj", "down_proj"]
    target_experts: list = field(default_factory=list)
    quantize_experts: bool = False  # MoE: store the frozen stacked expert weights in NF4 (bitsandbytes)
    merge: bool = True  # write the merged model to <output_dir>/final


@dataclass
class Fp8Config:
    """FP8 matrix products through torch._scaled_mm (docs/fp8.md); parameters and checkpoints stay as they are."""

    enabled: bool = False  # linear layers compute in FP8 (CUDA compute capability 8.9+; the CPU too, for tests)
    recipe: str = "tensorwise"  # tensorwise (one scale per operand) | rowwise (per row / column, along each product)
    grad_dtype: str = "auto"  # auto (e5m2 with tensorwise, e4m3 with rowwise) | e5m2 | e4m3: output gradients
    # module-name suffixes kept in high precision: the LM head and MoE routers
    skip: list = field(default_factory=lambda: ["lm_head", "gate", "shared_expert_gate"])
    min_dim: int = 1024  # linears with a smaller input or output dimension stay in high precision (0: all eligible)
    # FSDP2 all-gathers the FP8 layers' weights in e4m3 (1 byte per element) with the whole weight's scale, instead of
    # in the parameter dtype; tensorwise only, several processes with parallel.dp_shard > 1; results are unchanged
    fsdp_float8_all_gather: bool = False


@dataclass
class QatConfig:
    """Quantisation-aware training (docs/fp8.md): fake-quantised linears in forward, a quantised export at the end."""

    enabled: bool = False  # train the full model with the quantisation it will be served with simulated in forward
    scheme: str = "int8-int4"  # int8-int4 (int8 per-token activations, int4 weights) | int4 (weights only)
    group_size: int = 32  # 32 | 64 | 128: int4 weights sharing one scale, along the input dimension
    start_step: int = 0  # optimizer steps trained without fake quantisation first
    skip: list = field(default_factory=lambda: ["lm_head", "gate", "shared_expert_gate"])  # left unquantised
    export: bool = True  # write <output_dir>/final/quantized (int4 weights + scales) beside the full weights


@dataclass
class AttentionConfig:
    implementation: str = "auto"  # auto | eager | sdpa | flex | varlen


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: none by step count; see every_minutes; always on SIGTERM / SIGINT)
    # also a checkpoint after this much wall-clock time since the last one (0: off); with several processes, at the
    # first logging step after that time
    every_minutes: float = 30.0
    keep: int = 2  # keep the newest K step-N checkpoints (0: keep all)
    resume: str = ""  # "" | auto (newest step-N in output_dir) | a path to a step-N folder
    save_final: bool = True  # write <output_dir>/final in HF format


@dataclass
class LoggingConfig:
    # steps between progress lines; the loop reads loss and gradient norm back from the device only then, and with
    # several processes agrees on a stop request (SIGTERM / SIGINT) and checkpoint.every_minutes only then
    every: int = 1
    tensorboard: bool = False  # also write TensorBoard event files to <output_dir>/tensorboard (needs tensorboard)
    wandb: bool = False  # also log to Weights & Biases (needs wandb and a login)
    wandb_project: str = "nanotune"  # the W&B project the run is logged under
    plot: bool = True  # loss curve PNG at the end (needs matplotlib)


@dataclass
class ParallelConfig:
    """How the processes of a torchrun job share the model: one DeviceMesh (dp_replicate, dp_shard, cp, tp) whose
    sizes multiply to the number of processes. See docs/parallel.md."""

    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    dp_replicate: int = 1  # data-parallel replicas of the sharded model (HSDP: > 1, usually the number of nodes)
    dp_shard: int = -1  # FSDP2: processes that share one copy of the model, each holding 1/dp_shard (-1: the rest)
    tp: int = 1  # tensor parallel: processes that split every attention / MLP matmul (keep it within one node)
    cp: int = 1  # context parallel: processes that split each row's tokens; data.seq_len a multiple of 2 cp
    ep: int = 1  # expert parallel: processes of dp_shard that split the experts of every MoE layer (a divisor of it)
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
    fp8: Fp8Config = field(default_factory=Fp8Config)
    qat: QatConfig = field(default_factory=QatConfig)
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


# Names users bring from axolotl and HF TrainingArguments -> the nanotune key that means the same, with a note
# where the value differs. A test checks that every target is a real key.
ALIASES: dict[str, tuple[str, str]] = {
    "learning_rate": ("optim.lr", ""),
    "gradient_accumulation_steps": ("train.grad_accum_steps", ""),
    "sequence_len": ("data.seq_len", ""),
    "sequence_length": ("data.seq_len", ""),
    "max_seq_length": ("data.seq_len", ""),
    "max_seq_len": ("data.seq_len", ""),
    "max_length": ("data.seq_len", ""),
    "sample_packing": ("data.packing", ""),
    "micro_batch_size": ("train.micro_batch_size", ""),
    "per_device_train_batch_size": ("train.micro_batch_size", ""),
    "batch_size": ("train.micro_batch_size", "rows per forward pass; the step is micro_batch_size x "
                                               "grad_accum_steps x processes"),
    "num_epochs": ("train.epochs", ""),
    "num_train_epochs": ("train.epochs", ""),
    "warmup_steps": ("optim.warmup_steps", ""),
    "warmup_ratio": ("optim.warmup_steps", "a number of steps, not a ratio"),
    "weight_decay": ("optim.weight_decay", ""),
    "lr_scheduler": ("optim.schedule", ""),
    "lr_scheduler_type": ("optim.schedule", ""),
    "cosine_min_lr_ratio": ("optim.min_lr_ratio", ""),
    "adam_beta1": ("optim.betas", "[beta1, beta2]"),
    "adam_beta2": ("optim.betas", "[beta1, beta2]"),
    "adam_epsilon": ("optim.eps", ""),
    "max_grad_norm": ("train.max_grad_norm", ""),
    "adapter": ("lora.enabled", "true; for QLoRA also lora.quantize = \"nf4\""),
    "load_in_4bit": ("lora.quantize", "\"nf4\""),
    "lora_r": ("lora.rank", ""),
    "r": ("lora.rank", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_dropout": ("lora.dropout", ""),
    "lora_target_modules": ("lora.targets", ""),
    "target_modules": ("lora.targets", ""),
    "lora_target_linear": ("lora.targets", "[\"all-linear\"]"),
    "lora_modules_to_save": ("lora.modules_to_save", ""),
    "use_rslora": ("lora.rslora", ""),
    "peft_use_rslora": ("lora.rslora", ""),
    "use_dora": ("lora.dora", ""),
    "peft_use_dora": ("lora.dora", ""),
    "base_model": ("model.path", "a local HF-format folder; fetch one with scripts/download.py"),
    "model_name_or_path": ("model.path", "a local HF-format folder; fetch one with scripts/download.py"),
    "tokenizer_name": ("model.tokenizer", ""),
    "tokenizer_config": ("model.tokenizer", ""),
    "max_steps": ("train.max_steps", ""),
    "save_steps": ("checkpoint.every", ""),
    "save_total_limit": ("checkpoint.keep", ""),
    "resume_from_checkpoint": ("checkpoint.resume", ""),
    "eval_steps": ("train.eval_every", ""),
    "logging_steps": ("logging.every", ""),
    "report_to": ("logging.wandb", "or logging.tensorboard"),
    "wandb_project": ("logging.wandb_project", ""),
    "gradient_checkpointing": ("train.activation_checkpointing", "\"full\""),
    "activation_offloading": ("train.activation_offload", ""),
    "torch_compile": ("train.compile", "\"model\" (forward and loss in one graph) or \"blocks\""),
    "bf16": ("train.precision", "\"bf16\" or \"amp-bf16\""),
    "fp16": ("train.precision", "\"amp-bf16\"; there is no fp16 training"),
    "tf32": ("train.precision", ""),
    "flash_attention": ("attention.implementation", "\"varlen\""),
    "sdp_attention": ("attention.implementation", "\"sdpa\""),
    "flex_attention": ("attention.implementation", "\"flex\""),
    "attn_implementation": ("attention.implementation", ""),
    "seed": ("seed", ""),
    "val_set_size": ("data.eval_fraction", ""),
    "datasets": ("data.datasets", ""),
    "test_datasets": ("data.eval_datasets", ""),
    "chat_template": ("data.chat_template", ""),
    "train_on_inputs": ("data.train_on_inputs", ""),
    "dataset_prepared_path": ("data.cache_dir", ""),
    "dataset_processes": ("data.num_workers", ""),
    "dataloader_num_workers": ("data.num_workers", ""),
    "dataloader_prefetch_factor": ("data.prefetch", "micro-batches collated ahead on a thread"),
    "output_dir": ("output_dir", ""),
}

# The same for the keys of one [[data.datasets]] table (axolotl's dataset entries).
DATASET_ALIASES: dict[str, tuple[str, str]] = {
    "type": ("format", ""),
    "ds_type": ("format", ""),
    "name": ("data_files", "a glob of files inside the repo"),
    "field_messages": ("messages_field", ""),
    "message_field_role": ("role_field", ""),
    "message_field_content": ("content_field", ""),
    "roles": ("role_map", "{their name = \"user\"}"),
    "field_instruction": ("instruction_field", ""),
    "field_input": ("input_field", ""),
    "field_output": ("output_field", ""),
    "field": ("text_field", ""),
}


def all_keys() -> list[str]:
    """Every key of every section, dotted (e.g. "optim.lr"), sections themselves included."""
    keys = []
    for f in dataclasses.fields(Config):
        keys.append(f.name)
        section = section_type(Config, f)
        if section is not None:
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)]
    return keys


def unknown_key_message(key_path: str, valid: list[str]) -> str:
    """"unknown config key K; did you mean X?" with X from the alias table, the same name in another section, or
    the closest key of any section (the same for a TOML file and a --section.key=value override)."""
    return f"unknown config key {key_path}{suggestion(key_path) or '; valid keys: ' + ', '.join(valid)}"


def suggestion(key_path: str) -> str | None:
    """The hint for an unknown key, or None when no key is likely to be meant."""
    section, _, name = key_path.rpartition(".")
    normal = name.lower().replace("-", "_")
    if "[" in section:  # a key of one [[data.datasets]] table: only that table's keys can be meant
        keys = [f.name for f in dataclasses.fields(DatasetConfig)]
        target, note = DATASET_ALIASES.get(normal) or (closest(normal, {k: k for k in keys}, ""), "")
        return None if target is None else did_you_mean(f"{section}.{target}", note)
    if normal in ALIASES:
        return did_you_mean(*ALIASES[normal])
    elsewhere = [k for k in all_keys() if k.rpartition(".")[2] == normal and k != key_path]
    if elsewhere:
        return f"; it belongs in another section: {' or '.join(elsewhere)}"
    # fuzzy: every key of every section by its own name, and every alias, by similarity of the last component
    candidates = {k.rpartition(".")[2]: k for k in all_keys() if k.rpartition(".")[0] != section}
    candidates |= {k.rpartition(".")[2]: k for k in all_keys() if k.rpartition(".")[0] == section}  # same section wins
    candidates |= {alias: target for alias, (target, _) in ALIASES.items() if len(alias) > 3}  # "r" is no typo
    target = closest(normal, candidates, section)
    return None if target is None else did_you_mean(target, "")


def closest(name: str, candidates: dict[str, str], section: str) -> str | None:
    """The key (a value of `candidates`) whose name (the dict key) is most similar to `name`; ties favour keys of
    `section`. None when nothing is similar enough to be a likely typo."""
    def score(item):
        other, key = item
        ratio = difflib.SequenceMatcher(None, name, other).ratio()
        return ratio, key.rpartition(".")[0] == section
    best = max(candidates.items(), key=score, default=None)
    return best[1] if best is not None and score(best)[0] >= 0.6 else None


def did_you_mean(key: str, note: str) -> str:
    return f"; did you mean {key}" + (f" ({note})" if note else "") + "?"


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


# ------------------------------------------------------------------------------------------------------ paths


def is_hub_repo_name(path: str) -> bool:
    """"org/name" with no data-file suffix: read from the HF Hub when no local file or folder has that name."""
    return not path.startswith((".", "/", "~")) and path.count("/") == 1 and Path(path).suffix not in (
        ".jsonl", ".json", ".parquet")


def relative_note(path: str | Path, config_file: str | Path | None = None) -> str:
    """Where a missing relative path was looked for (the current directory), and whether it is next to the config
    file instead; empty for an absolute path. Appended to "... does not exist"."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return ""
    note = f" (relative paths are resolved against the current directory {Path.cwd()}"
    if config_file is not None and (Path(config_file).parent / path).exists():
        beside = Path(config_file).parent / path
        note += f"; {beside} exists: run from {Path(config_file).parent} or write the path as {beside}"
    return note + ")"


def check_paths(cfg: Config, config_file: str | Path | None = None) -> None:
    """Every local file and folder the run reads exists, checked before anything is loaded; the errors say where a
    relative path was looked for and, for a missing model, how to download it."""
    def missing(key: str, value: str) -> ConfigError:
        return ConfigError(f"{key} = {value!r} does not exist{relative_note(value, config_file)}")

    model = cfg.model.path
    if model:
        folder = Path(model).expanduser()
        download = f"download it with: python scripts/download.py ORG/NAME --out {model}"
        if not folder.exists():
            raise ConfigError(f"model.path = {model!r}: the model folder does not exist"
                              f"{relative_note(model, config_file)}; {download}")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path = {model!r} is not an HF-format model folder (no config.json in it); "
                              f"{download}")
    if cfg.model.tokenizer and not Path(cfg.model.tokenizer).expanduser().exists():
        raise missing("model.tokenizer", cfg.model.tokenizer)
    if cfg.data.chat_template and not Path(cfg.data.chat_template).expanduser().is_file():
        raise missing("data.chat_template", cfg.data.chat_template)
    for kind in ("datasets", "eval_datasets"):
        for i, ds in enumerate(getattr(cfg.data, kind)):
            if ds.path and not Path(ds.path).expanduser().exists() and not is_hub_repo_name(ds.path):
                raise missing(f"data.{kind}[{i}].path", ds.path)


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
