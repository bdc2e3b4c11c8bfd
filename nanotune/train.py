"""Fine-tune a language model: the whole training loop, top to bottom.

    python nanotune/train.py configs/quickstart.toml                      # one process (CPU or one GPU)
    torchrun --nproc_per_node=4 nanotune/train.py configs/x.toml          # FSDP2 over 4 processes
    python nanotune/train.py configs/x.toml --train.max_steps=100 --output_dir=outputs/try --dry-run
    python nanotune/train.py configs/x.toml --checkpoint.resume=auto    # continue the newest step-N in output_dir
    python nanotune/train.py configs/x.toml --overwrite                 # delete output_dir's earlier run, start anew

The run: config -> tokenizer and data -> model (meta device -> LoRA swaps -> weights -> sharding) -> optimizer ->
resume -> for each step: accumulate micro-batches, normalise by the trainable tokens of the whole step, clip, step,
log, evaluate, checkpoint -> final/ (HF format) and adapter/.

What lives where (precision setting `train.precision`):
- fp32:     parameters, gradients and AdamW states in fp32.
- bf16:     parameters and gradients in bf16, AdamW states in bf16 too (pure bf16: half the memory, some rounding).
- amp-bf16: fp32 parameters, gradients and AdamW states; matmuls in bf16 through autocast (or, with several
            processes, FSDP2 gathers bf16 copies of the parameters and reduces gradients in fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `nanotune` and `models` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import models
from models import attention
from nanotune import checkpoint, context_parallel, fp8, lora, memory, metrics, parallel, qat, rundir
from nanotune.config import Config, ConfigError, check_paths, load_config, parse_toml, to_dict, to_toml
from nanotune.data import DataError, RowError, SourceError, TemplateError, TokenizerError, load_tokenizer, prepare_data
from nanotune.data.pipeline import describe_rows
from nanotune.loss import cross_entropy_sum, linear_cross_entropy_sum, lm_head_weight
from nanotune.metrics import log
from nanotune.optim import build_optimizer, lr_at
from nanotune.packing import BatchLoader

# DCP says so each time it saves in a single process; that is the intended use here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp-bf16": torch.float32}


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits 0."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Fine-tune a language model.", usage=__doc__)
    parser.add_argument("config", help="a TOML config, e.g. configs/quickstart.toml")
    parser.add_argument("--dry-run", action="store_true", help="validate config, data and model; print the plan")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the earlier run's outputs in output_dir (checkpoints, final/, logs) and start anew")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def build_model(cfg: Config, vocab_size: int, device: torch.device, layout: dict | None = None):
    """Model from an HF folder or a named size, in the parameter dtype of the precision setting, with LoRA /
    QLoRA swapped in on the meta device before the weights stream in (so NF4 is quantised while loading). The
    [parallel] layout is checked against the model's shapes on the meta device, before any weight is read."""
    dtype = PARAM_DTYPES[cfg.train.precision]
    attn = cfg.attention.implementation
    try:
        lora_prepare = lora.prepare_from_config(cfg.lora, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def prepare(model):  # LoRA's complaints (e.g. targets that match no module) are about the [lora] config
        set_router_losses(model, cfg)
        expert_lora = cfg.lora.enabled and (cfg.lora.target_experts or cfg.lora.quantize_experts)
        not_yet = {k: v for k, v in (layout or {}).items() if k in ("tp", "cp") and v > 1}
        if expert_lora and not_yet:  # they run in one process, under FSDP2 / HSDP and with expert parallelism
            keys = ", ".join(f"parallel.{k} = {v}" for k, v in not_yet.items())
            raise ConfigError(f"lora.target_experts / lora.quantize_experts with {keys} are not supported yet; "
                              "they train in one process and with parallel.dp_shard / dp_replicate / ep (FSDP2, "
                              f"HSDP, expert parallelism): set {' and '.join(f'parallel.{k} = 1' for k in not_yet)}, "
                              "or leave them out")
        if layout is not None:
            parallel.check_model_layout(layout, model.config, cfg.lora, ep=cfg.parallel.ep)
        if lora_prepare is None:
            return
        try:
            lora_prepare(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.model.path:
        model = models.from_pretrained(cfg.model.path, dtype=dtype, device=device, attn_implementation=attn,
                                       prepare=prepare, overrides=cfg.model.overrides,
                                       fuse_projections=cfg.model.fuse_projections)
    elif cfg.model.size:
        model = models.from_size(cfg.model.size, vocab_size, dtype, device, attn, seed=cfg.seed,
                                 overrides=cfg.model.overrides, fuse_projections=cfg.model.fuse_projections)
        prepare(model)
    else:
        raise ConfigError("set model.path (an HF model folder) or model.size (one of " + ", ".join(models.SIZES) + ")")
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}; "
            "use the model's own tokenizer (model.tokenizer)"
        )
    return model


def set_router_losses(model, cfg: Config) -> None:
    """The [model] router loss weights of a mixture-of-experts model (refused for a model without a router)."""
    aux, z = cfg.model.router_aux_loss_coef, cfg.model.router_z_loss_coef
    if not hasattr(model.config, "router_aux_loss_coef"):
        if aux >= 0 or z:
            raise ConfigError(f"model.router_aux_loss_coef / model.router_z_loss_coef apply to mixture-of-experts "
                              f"models; {model.config.model_type} has no router: leave them out")
        return
    if aux >= 0:
        model.config.router_aux_loss_coef = aux
    model.config.router_z_loss_coef = z


def check_config(cfg: Config) -> None:
    """Cheap checks of values that the dataclass types cannot express, before anything expensive starts."""
    choices = {
        "train.precision": (cfg.train.precision, tuple(PARAM_DTYPES)),
        "train.nonfinite": (cfg.train.nonfinite, ("error", "skip")),
        "train.activation_checkpointing": (cfg.train.activation_checkpointing, models.checkpointing.MODES),
        "train.loss": (cfg.train.loss, ("auto", "plain", "chunked")),
        "train.compile": (cfg.train.compile, ("none", "blocks", "model")),
        "optim.schedule": (cfg.optim.schedule, ("constant", "linear", "cosine")),
        "device": (cfg.device, ("auto", "cpu", "cuda")),
        "attention.implementation": (cfg.attention.implementation, attention.IMPLEMENTATIONS),
        "parallel.backend": (cfg.parallel.backend, ("auto", "nccl", "gloo")),
        "optim.fused": (cfg.optim.fused, ("auto", "true", "false")),
        "lora.quantize": (cfg.lora.quantize, ("", "nf4")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {allowed}")
    t, o = cfg.train, cfg.optim
    for key, value, least in [
        ("train.micro_batch_size", t.micro_batch_size, 1), ("train.grad_accum_steps", t.grad_accum_steps, 1),
        ("data.seq_len", cfg.data.seq_len, 1), ("logging.every", cfg.logging.every, 1),
        ("train.max_steps", t.max_steps, 0), ("train.eval_every", t.eval_every, 0),
        ("train.eval_batches", t.eval_batches, 0), ("train.max_grad_norm", t.max_grad_norm, 0),
        ("checkpoint.every", cfg.checkpoint.every, 0), ("checkpoint.keep", cfg.checkpoint.keep, 0),
        ("checkpoint.every_minutes", cfg.checkpoint.every_minutes, 0),
        ("train.max_skipped_steps", t.max_skipped_steps, 1),
        ("train.activation_checkpointing_k", t.activation_checkpointing_k, 1),
        ("optim.lr", o.lr, 0), ("optim.warmup_steps", o.warmup_steps, 0), ("optim.weight_decay", o.weight_decay, 0),
        ("model.router_z_loss_coef", cfg.model.router_z_loss_coef, 0),
    ]:
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, got {value}")
    for section in ("fp8", "qat"):  # the TP plans shard nn.Linear layers; swapped FP8 / QAT linears are not built for it
        if getattr(cfg, section).enabled and cfg.parallel.tp > 1:
            raise ConfigError(f"{section}.enabled with parallel.tp = {cfg.parallel.tp} is not supported yet; use "
                              "parallel.tp = 1 (FSDP2 / HSDP over dp_shard and dp_replicate work with it)")
    try:
        memory.offload_mode(cfg.train.activation_offload)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.tiled_mlp_tile < 1:
        raise ConfigError(f"train.tiled_mlp_tile must be at least 1 (tokens per tile), got {cfg.train.tiled_mlp_tile}")
    if cfg.train.layer_offload and not cfg.lora.enabled:
        raise ConfigError("train.layer_offload = true moves frozen weights to host memory between uses, but full "
                          "fine-tuning trains every weight; set lora.enabled = true (LoRA / QLoRA), or "
                          "parallel.cpu_offload = true with several processes to keep FSDP2's shards in host memory")
    if cfg.train.layer_offload and cfg.train.compile != "none":
        raise ConfigError("train.layer_offload = true frees and refills weights between layers, which torch.compile's "
                          "graphs do not expect; set train.compile = false")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas}")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        raise ConfigError("set train.max_steps or train.epochs to a positive number")
    context_parallel.check_config(cfg)
    check_fusion(cfg)


def check_fusion(cfg: Config) -> None:
    """model.fuse_projections replaces q_proj / k_proj / v_proj and gate_proj / up_proj by qkv_proj and gate_up_proj
    (models/fusion.py): refuse the features that address those modules by name or that do not handle them yet. LoRA
    adapts the parts of a fused module (lora.FusedLoRALinear: PEFT's per-part adapters, one x·Aᵀ matmul for all of
    them); FP8 and QAT swap the fused linears as they swap any other; only their skip lists name modules."""
    if not cfg.model.fuse_projections:
        return
    fix = "; set model.fuse_projections = false (docs/kernels.md)"
    if cfg.lora.enabled and cfg.lora.quantize:
        raise ConfigError(f"model.fuse_projections = true does not work with lora.quantize = {cfg.lora.quantize!r} "
                          f"(QLoRA quantises and adapts each projection by name){fix}")
    if cfg.lora.enabled and cfg.lora.dora:
        raise ConfigError("model.fuse_projections = true does not work with lora.dora = true (DoRA's magnitudes and "
                          f"row norms are per projection; fused LoRA layers hold LoRA and rsLoRA only){fix}, or set "
                          "lora.dora = false")
    if cfg.lora.enabled and cfg.fp8.enabled:
        raise ConfigError("model.fuse_projections = true does not work with lora.enabled = true and fp8.enabled = true "
                          f"(the fused LoRA layers have no FP8 base product){fix}, or set fp8.enabled = false")
    if cfg.parallel.tp > 1:
        raise ConfigError(f"model.fuse_projections = true does not work with parallel.tp = {cfg.parallel.tp} (the "
                          "tensor-parallel plans split q_proj, k_proj, v_proj, gate_proj, up_proj by whole heads and "
                          f"columns, part by part){fix}, or shard with parallel.dp_shard")
    parts = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    for section in ("fp8", "qat"):
        named = sorted(parts & set(getattr(cfg, section).skip))
        if getattr(cfg, section).enabled and named:
            raise ConfigError(f"{section}.skip names {named}, which a model with model.fuse_projections = true does "
                              "not have (they are qkv_proj and gate_up_proj there); name those instead, or set "
                              "model.fuse_projections = false")


def check_compile_layout(compile_mode: str, dist) -> None:
    """train.compile = "model" is for one process: FSDP2's and tensor parallelism's hooks sit between the blocks."""
    if compile_mode == "model" and dist.world_size > 1:
        raise ConfigError(f"train.compile = 'model' compiles the forward and loss of one process; with "
                          f"{dist.world_size} processes use train.compile = 'blocks' (each decoder block compiled, "
                          "inside tensor parallelism and FSDP2)")
    if compile_mode != "none" and dist.ep > 1:
        raise ConfigError(f"train.compile = {compile_mode!r} with parallel.ep = {dist.ep} is not supported: the token "
                          "dispatch of expert parallelism reads its all-to-all sizes on the host in every MoE layer; "
                          "set train.compile = 'none'")


# What a resumed run must keep as it was: the model, the adapters, the data and its order (the rows per optimizer step
# too, checked by checkpoint.check_layout: micro_batch_size and grad_accum_steps may change with the layout).
RESUME_INVARIANT = ("seed", "model", "lora", "data")
RESUME_FREE = ("data.cache_dir", "data.num_workers", "data.prefetch")


def check_resumable(saved_toml: str, cfg: Config) -> None:
    """Refuse to resume with settings that change the model, its adapters or the batch plan (by key)."""
    saved, now = flatten(parse_toml(saved_toml)), flatten(parse_toml(to_toml(cfg)))
    changed = [k for k in sorted(saved.keys() | now.keys())
               if k.startswith(RESUME_INVARIANT) and not k.startswith(RESUME_FREE) and saved.get(k) != now.get(k)]
    if changed:
        diffs = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in changed[:5])
        raise ConfigError(f"cannot resume: {diffs} changed since the checkpoint was written; resume with the same "
                          "settings, or start a new run in another output_dir")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix.startswith("data.datasets"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def forget_metrics_after(output_dir: Path, step: int) -> None:
    """On resume, drop metrics the interrupted run logged after its checkpoint: they are logged again. A line the
    run was writing when it died (or when the disk filled up) is half-written: it is dropped too."""
    path = output_dir / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text(errors="replace").splitlines()
                if (record := metrics.parse_record(line)) is not None and record.get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def choose_loss(model, setting: str, dist, cp=None, compile_model: bool = False):
    """The token-loss function of the run: the plain CE on (B, T, V) logits, or the chunked LM head + CE that never
    holds fp32 logits for all tokens. `auto` takes the chunked one where it applies: one process (under FSDP the
    head weight is sharded outside its module's forward) and a plain linear head (not LoRA- or NF4-wrapped).
    `compile_model` (train.compile = "model"): the forward and the loss are compiled together, one graph (the batch
    says whether its rows are packed, so nothing in them reads the device)."""
    softcap = getattr(model.config, "final_logit_softcapping", None)

    # MoE routers' load-balancing loss leaves padding slots out, as HF's attention_mask does
    takes_mask = "aux_loss_mask" in inspect.signature(model.forward).parameters

    def forward(model, batch, return_hidden):
        extra = {"aux_loss_mask": batch["attention_mask"]} if takes_mask else {}
        return model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"],
                     return_hidden=return_hidden, packed=batch["packed"], **extra)

    def plain(model, batch):
        logits = forward(model, batch, return_hidden=False)  # (B, T, V)
        return cross_entropy_sum(logits, batch["labels"])

    def chunked(model, batch):
        hidden = forward(model, batch, return_hidden=True)  # (B, T, D)
        return linear_cross_entropy_sum(hidden, lm_head_weight(model.lm_head), batch["labels"], softcap=softcap)

    loss = plain
    if setting != "plain":
        try:
            lm_head_weight(model.lm_head)
            usable = not dist.enabled
            why = "it needs one process for now (the head weight is sharded under FSDP2)"
        except ValueError as e:
            usable, why = False, str(e)
        if setting == "chunked" and not usable:
            raise ConfigError(f"train.loss = 'chunked' cannot be used here: {why}; use train.loss = 'auto' or 'plain'")
        loss = chunked if usable else plain
    if compile_model:
        loss = torch.compile(loss)

    def token_loss_sum(model, batch, device):
        if cp is not None:  # a micro-batch split over the cp group: its attention context for the model's layers
            cp.prepare(batch, device)
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return loss(model, on_device)

    return token_loss_sum


def to_device(batch: dict, device: torch.device) -> dict:
    """A micro-batch's tensors on the device. On CUDA they are copied from pinned host memory with non_blocking=True:
    the host queues the copy and goes on, instead of waiting for the device to finish the work queued before it (a
    copy from pageable memory would). The loader pins them, ahead on its thread with data.prefetch; a tensor made
    after it (context parallelism's part of each row) is pinned here."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) if isinstance(v, torch.Tensor)
            else v for k, v in batch.items()}


EVAL_PROGRESS_SECONDS = 30.0  # a long evaluation says how far it is at most this often


def evaluate(model, loader, max_batches: int, device, autocast, token_loss_sum, step: int = 0) -> dict:
    model.eval()
    loader.rewind()  # from the first eval batch, also after an earlier pass stopped at max_batches
    num_batches = min(len(loader), max_batches) if max_batches else len(loader)
    loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device, read once
    last_report = time.monotonic()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            with autocast():
                loss_sum += token_loss_sum(model, to_device(batch, device), device).double()
            tokens += batch["num_trainable_tokens"]
            if time.monotonic() - last_report >= EVAL_PROGRESS_SECONDS and i + 1 < num_batches:
                log.info(f"eval at step {step}: {i + 1}/{num_batches} batches")
                last_report = time.monotonic()
    model.train()
    return {"loss_sum": loss_sum.item(), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    """Run training; the caller's signal handlers are restored afterwards (it may be a notebook or a test), the
    output_dir's lock is released, and an error that ends the run is also written to train.log."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.ExitStack() as on_exit:
            return run(argv, on_exit)
    except BaseException as e:
        metrics.log_error_to_file(e, with_traceback=not isinstance(e, USER_ERRORS))
        raise
    finally:
        metrics.close_log_file()  # a later run in this process must not write into this run's train.log
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(argv: list[str] | None, on_exit: contextlib.ExitStack) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, overrides)
    check_config(cfg)
    check_paths(cfg, args.config)
    if args.overwrite and cfg.checkpoint.resume:
        raise ConfigError("--overwrite deletes the checkpoints that checkpoint.resume would continue from; use one")
    dist = parallel.init_distributed(cfg.device, cfg.parallel)
    device = dist.device
    check_compile_layout(cfg.train.compile, dist)
    # refuse GPUs without FP8 matrix cores, and an FP8 all-gather without FSDP2 sharding, before any work
    fp8.check_config(cfg.fp8, device, cfg.lora.quantize, dist.layout["dp_shard"], cfg.lora.enabled and cfg.lora.dora)
    if cfg.train.layer_offload and dist.world_size > 1:
        raise ConfigError(f"train.layer_offload = true runs in one process (this run has {dist.world_size}): under "
                          "FSDP2 each process holds a shard of the weights already; use parallel.cpu_offload = true "
                          "to keep the shards in host memory")
    qat.check_config(cfg.qat, cfg.lora.enabled, cfg.fp8.enabled)
    output_dir = Path(cfg.output_dir)
    if args.dry_run:
        metrics.setup_logging(None, dist.is_main)
    else:  # one run per output_dir: the lock first, then what an earlier run left is deleted or kept
        on_exit.callback(rundir.release_lock, rundir.acquire_lock(output_dir, dist))
        removed = rundir.start_afresh(output_dir, dist) if args.overwrite else rundir.remove_leftovers(output_dir, dist)
        metrics.setup_logging(output_dir, dist.is_main, dist.rank)  # from here on, an error that ends the run is in train.log
        if removed:
            log.info(f"{'--overwrite: deleted' if args.overwrite else 'removed unfinished'} {', '.join(removed)}")
    resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, output_dir)  # None: a fresh start
    if resume_from is not None:  # refuse a checkpoint that cannot be resumed before anything is built
        saved = checkpoint.read_info(resume_from)
        checkpoint.check_layout(saved, resume_from, dist.layout, cfg.train.micro_batch_size, cfg.train.grad_accum_steps)
        check_resumable(saved["config"], cfg)
    if not args.dry_run:
        rundir.check_output_dir(output_dir, resume_from)
    if "LOCAL_RANK" in os.environ:  # started by torchrun: stop when it dies
        parallel.exit_when_launcher_dies(on_exit=log.error)
    torch.manual_seed(cfg.seed)

    # ---- tokenizer and data: tokenized once (cached), then packed into rows of seq_len; same step count on every rank
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    if not dist.is_main:  # rank 0 tokenizes and fills the cache; the others then read it
        parallel.barrier(dist)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.seed, quiet=not dist.is_main)
    if dist.is_main:
        parallel.barrier(dist)
    # micro-batches collated data.prefetch ahead on a thread, in pinned memory on CUDA (see nanotune/packing.py)
    loader_args = dict(seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                       packing=cfg.data.packing, pad_id=tokenizer.pad_id, rank=dist.dp_rank, world_size=dist.dp_size,
                       prefetch=cfg.data.prefetch, pin_device=device if device.type == "cuda" else None)
    train_loader = BatchLoader(data.train, seed=cfg.seed, grad_accum_steps=cfg.train.grad_accum_steps, **loader_args)
    # every eval example exactly once, in file order; empty (untrained) rows even out the ranks
    eval_loader = BatchLoader(data.eval, seed=cfg.seed, shuffle=False, fill="empty", **loader_args) \
        if data.eval is not None else None
    for loader in (train_loader, eval_loader):  # their threads stop when the run ends, by an error or a signal too
        if loader is not None:
            on_exit.callback(loader.close)
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"one epoch has {len(train_loader)} micro-batches per process, fewer than train.grad_accum_steps = {accum}; "
            "lower grad_accum_steps or micro_batch_size, or add data"
        )
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)

    # ---- model: meta device -> (LoRA) -> weights -> sharding, or with several processes meta -> (LoRA) -> sharding ->
    # each rank's slices of the weights; see docs/parallel.md
    sharded_load = parallel.loads_sharded(cfg, dist)
    on_meta = args.dry_run or sharded_load
    model = build_model(cfg, tokenizer.vocab_size, torch.device("meta") if on_meta else device, dist.layout)
    if cfg.parallel.cp > 1 and (getattr(model.config, "rope_scaling", None) or {}).get("rope_type") == "longrope":
        raise ConfigError("longrope picks its frequencies by the longest position of the whole batch, which a "
                          "context-parallel process does not see; use parallel.cp = 1, or another rope_type "
                          "(e.g. model.overrides.rope_scaling = {rope_type = \"yarn\", ...})")
    # FP8 / QAT swaps after the LoRA ones, before compile and sharding; the Parameters stay the same
    for name, swapped in [("FP8", fp8.apply_from_config(model, cfg.fp8)),
                          ("QAT", qat.apply_from_config(model, cfg.qat))]:
        if swapped:
            log.info(f"{name}: {len(swapped)} linear layers swapped")
    num_trainable, num_params = lora.count_parameters(model)
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * accum * dist.dp_size
    log.info(f"model: {model.config.model_type}, {num_params:,} parameters, {num_trainable:,} trainable "
             f"({num_trainable / num_params:.2%})")
    log.info(f"data: {describe_rows(data.stats)}, {len(train_loader)} micro-batches/epoch/process, "
             f"{tokens_per_step:,} token slots/step, {total_steps} steps on {dist.world_size} process(es), {device}")
    if args.dry_run:
        log.info("dry run: config, data and model are valid; nothing was trained")
        return 0

    model.activation_checkpointing = cfg.train.activation_checkpointing  # see models/checkpointing.py
    model.activation_checkpointing_k = cfg.train.activation_checkpointing_k
    if cfg.lora.quantize == "nf4" and model.activation_checkpointing == "full":
        # the NF4 weight the recompute dequantises serves the backward too (one pass per layer fewer)
        log.info(f"QLoRA: {lora.set_fast_path(model, keep_dequantized_weight=True)} layers keep the weight they "
                 "dequantise in the recompute for the backward")
    if cfg.train.kernels:
        from nanotune.kernels import apply_kernels

        try:
            # expert-parallel experts keep their own dispatch (all-to-all between the permute and the un-permute);
            # the model is on the meta device when each process loads its shards next (the swaps keep the Parameters)
            swapped = apply_kernels(model, moe=cfg.parallel.ep == 1, device=device if sharded_load else None)
            log.info(f"Triton kernels: {len(swapped)} modules swapped")
        except (ImportError, RuntimeError) as e:
            raise ConfigError(f"train.kernels = true: {e}") from None
    if cfg.fp8.fsdp_float8_all_gather:  # before fully_shard: FSDP2 then gathers these weights in e4m3 (docs/fp8.md)
        log.info(f"FP8 all-gather: FSDP2 gathers {fp8.gather_weights_in_float8(model)} weights in e4m3")
    if cfg.train.tiled_mlp:  # after the swaps that replace whole MLPs (kernels), before compile and sharding
        log.info(f"tiled MLP: {memory.apply_tiled_mlp(model, cfg.train.tiled_mlp_tile)} MLPs run over tiles of "
                 f"{cfg.train.tiled_mlp_tile} tokens")
    # tensor parallel -> (activation checkpointing) -> compile each block -> FSDP2 / HSDP; see docs/parallel.md
    model = parallel.parallelize(model, dist, cfg.parallel, cfg.train.precision,
                                 compile=cfg.train.compile == "blocks")
    if sharded_load:
        parallel.load_sharded(model, cfg.model.path, device, offload=cfg.parallel.cpu_offload)
    use_autocast = cfg.train.precision == "amp-bf16" and dist.fsdp_size == 1  # else FSDP2 gathers bf16 parameters
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext
    # activations saved for the backward go to (pinned) host memory and come back when needed; see nanotune/memory.py
    offload_mode = memory.offload_mode(cfg.train.activation_offload)
    if offload_mode == "overlap":  # copies on a side stream, back a layer ahead of the backward
        offload = memory.ActivationOffload(model, device).saving
    elif offload_mode == "sync":  # every copy waits
        offload = lambda: torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")  # noqa: E731
    else:
        offload = contextlib.nullcontext
    layer_offload = memory.LayerOffload(model, device) if cfg.train.layer_offload else None
    if layer_offload is not None:
        log.info(f"layer offload: {layer_offload.bytes_offloaded() / 2**20:.1f} MiB of frozen layer weights in host "
                 "memory, on the device a layer ahead of their use")
    # context parallel: every micro-batch becomes this process's part of each row (see nanotune/context_parallel.py)
    cp = context_parallel.ContextParallel.build(model, dist)
    if cp is not None:
        train_loader, eval_loader = cp.wrap(train_loader), cp.wrap(eval_loader)
    # with parallel.cpu_offload the parameters, gradients and AdamW states live in host memory: the step runs there
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu") if cfg.parallel.cpu_offload else device)
    token_loss_sum = choose_loss(model, cfg.train.loss, dist, cp, compile_model=cfg.train.compile == "model")

    # ---- resume: model, optimizer, data position, RNG states and step, exactly
    step, epoch = 0, 0
    if resume_from is not None:
        extra = checkpoint.load(resume_from, model, optimizer, dist)
        try:
            train_loader.load_state_dict(extra["data"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{resume_from}: the data position does not fit this run ({e})") from None
        step, epoch = extra["step"], train_loader.epoch
        log.info(f"resumed from {resume_from} at step {step}")
    if dist.is_main:  # metrics logged after the checkpoint (all of them, on a fresh start) are logged again
        forget_metrics_after(output_dir, step)
    finished_before = resume_from is not None and step >= total_steps
    if finished_before:
        log.info(f"{resume_from} is the end of this run ({total_steps} steps): nothing left to train")
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.toml").write_text(to_toml(cfg))
    logger = metrics.MetricsLogger(output_dir, cfg.logging, dist.is_main, run_config=to_dict(cfg))
    stop = StopRequested()
    flops_per_token = metrics.flops_per_token(model, cfg.data.seq_len, num_trainable / num_params)
    peak = metrics.peak_flops(device)

    last_save = time.monotonic()

    def save_checkpoint():
        nonlocal last_save
        extra = {"data": train_loader.state_dict()}  # the data state holds the epoch
        path = checkpoint.save(output_dir, step, model, optimizer, extra, dist, cfg.checkpoint.keep, to_toml(cfg))
        log.info(f"saved checkpoint {path}")
        last_save = time.monotonic()

    def checkpoint_due(logging_step: bool) -> bool:
        """Every `checkpoint.every` steps, and every `checkpoint.every_minutes` of wall-clock time as rank 0's clock
        says. With several processes the clock is broadcast on logging steps only (a collective read back on the host
        would make every step wait for the device), so that every rank saves at the same step."""
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            return True
        if not cfg.checkpoint.every_minutes:
            return False
        late = time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes
        if not dist.enabled:
            return late
        return logging_step and bool(parallel.broadcast_from_main(late, dist))

    def micro_batches():
        """Endless stream of micro-batches, epoch after epoch, reshuffled each epoch."""
        nonlocal epoch
        while True:
            train_loader.set_epoch(epoch)
            yield from train_loader
            epoch += 1

    def run_eval():
        result = evaluate(model, eval_loader, cfg.train.eval_batches, device, autocast, token_loss_sum, step)
        loss = parallel.all_reduce_sum(result["loss_sum"], dist) / max(1.0, parallel.all_reduce_sum(result["tokens"], dist))
        log.info(f"eval at step {step}: loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}")
        logger.write({"step": step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})

    # ---- the loop. The host queues work and runs ahead of the device: it reads a value back (a sync: it waits for
    # the device to finish everything queued) only on logging steps, for evaluations and checkpoints, and with
    # train.nonfinite = "skip" once per step. Loss, gradient norm and the non-finite check stay on the device between.
    model.train()
    stream = micro_batches()
    timer, run_start, start_step = metrics.Timer(), time.perf_counter(), step
    window_loss, window_steps, window_tokens = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    # train.nonfinite = "error": (step, loss, gradient norm) of the first non-finite step, step 0 while there is none
    first_nonfinite = torch.zeros(3, dtype=torch.float64, device=device)
    expert_tokens = None  # MoE: tokens routed to each expert in the log window, summed on the device
    num_skipped = 0  # consecutive steps skipped for a non-finite loss or gradient norm

    def check_finite():
        """Stop at the first non-finite step (read here, before anything is logged, evaluated or saved after it)."""
        if first_nonfinite[0].item():
            bad_step, bad_loss, bad_norm = first_nonfinite.tolist()
            raise FloatingPointError(
                f"step {int(bad_step)}: loss {bad_loss} / gradient norm {bad_norm} is not finite; no checkpoint was "
                "written for this step or after it. Lower optim.lr, check the data, or set train.nonfinite = 'skip'")

    while step < total_steps:
        lr = lr_at(step, total_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the step's micro-batches (collated ahead by the loader) and their copies queued at once (non-blocking on CUDA)
        batches = [to_device(next(stream), device) for _ in range(accum)]
        qat.update(model, cfg.qat, step)  # fake quantisation from step qat.start_step on
        # divide by trainable tokens in the whole step (all micro-batches, all ranks) so that the loss and gradients
        # do not depend on micro-batch size, accumulation steps or world size
        step_tokens = parallel.all_reduce_sum_on_device(sum(b["num_trainable_tokens"] for b in batches), dist)
        denominator = step_tokens.clamp(min=1.0).float()  # () on the device
        loss_sum = aux_sum = torch.zeros((), device=device)  # summed on the device
        for i, batch in enumerate(batches):
            if dist.fsdp_size > 1:  # FSDP2 reduces gradients once, after the last micro-batch
                model.set_requires_gradient_sync(i == accum - 1)
            with autocast(), offload():
                loss_i = token_loss_sum(model, batch, device)  # summed over this micro-batch's trained tokens
                # FSDP averages gradients over dp (and cp) ranks: scale by world_size (step_tokens counts each
                # tensor-parallel group's tokens tp times; cp ranks count only their own) to get the sum over all ranks
                objective = loss_i * dist.world_size / denominator
                aux = getattr(model, "aux_loss", None)  # MoE load balancing, already times router_aux_loss_coef
                if aux is not None:
                    objective = objective + aux / accum  # a mean over the step's micro-batches (and ranks, by FSDP)
                    aux_sum = aux_sum + aux.detach() / accum
                routed = getattr(model, "tokens_per_expert", None)  # MoE: (sparse layers, E), read back when logged
                if routed is not None:
                    expert_tokens = routed if expert_tokens is None else expert_tokens + routed
            objective.backward()
            loss_sum = loss_sum + loss_i.detach()
        step_loss = parallel.all_reduce_sum_on_device(loss_sum, dist) / step_tokens.clamp(min=1.0)  # () fp64
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = parallel.clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_norm, dist)
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)  # the same on every rank: both are global
        if cfg.train.nonfinite == "skip" and not finite.item():  # skipping needs the answer now: a read per step
            optimizer.zero_grad(set_to_none=True)
            log.warning(f"step {step + 1}: non-finite loss or gradient norm, step skipped")
            num_skipped += 1
            if num_skipped >= cfg.train.max_skipped_steps:  # the model is not training any more: no final/ of it
                raise FloatingPointError(
                    f"steps {step + 2 - num_skipped}-{step + 1}: {num_skipped} steps in a row had a non-finite loss "
                    f"or gradient norm (train.max_skipped_steps = {cfg.train.max_skipped_steps}); stopping without "
                    "a final model. Lower optim.lr, check the data, or resume from an earlier step-N")
        else:
            num_skipped = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.train.nonfinite == "error":  # a non-finite step is remembered here and stops the run in check_finite
                this_step = torch.stack([torch.full_like(step_loss, step + 1), step_loss, grad_norm.double()])
                first_nonfinite = torch.where(~finite & (first_nonfinite[0] == 0), this_step, first_nonfinite)
        step += 1

        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        window_tokens += sum(b["num_tokens"] for b in batches) * dist.fsdp_size  # real tokens, not padding
        logging_step = step % cfg.logging.every == 0 or step == total_steps
        # a stop request (SIGTERM / SIGINT): at once in one process; with several, agreed on at logging steps, so
        # that every rank stops at the same step without a collective read back on every step
        signalled = stop.signal is not None if not dist.enabled else \
            logging_step and parallel.all_reduce_sum(stop.signal is not None, dist) > 0
        if logging_step or signalled:  # a stopped run logs its last steps
            check_finite()
            elapsed = timer.lap()
            tokens_per_s = window_tokens / elapsed
            record = {"step": step, "loss": window_loss.item() / window_steps, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_s": tokens_per_s, "epoch": epoch}
            if getattr(model, "aux_loss", None) is not None:
                record["aux_loss"] = parallel.all_reduce_sum(aux_sum.item(), dist) / dist.world_size
            if expert_tokens is not None:  # per optimizer step, over all processes (tensor-parallel ones count once)
                summed = parallel.all_reduce_sum_on_device(expert_tokens, dist)
                record.update(metrics.expert_load(summed * dist.fsdp_size / dist.world_size / window_steps))
                expert_tokens = None
            if peak:
                record["mfu"] = flops_per_token * tokens_per_s / dist.world_size / peak
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            done = step - start_step
            record["eta_s"] = (time.perf_counter() - run_start) / done * (total_steps - step)
            log.info(metrics.format_progress(record, total_steps))
            logger.write(record)
            window_loss, window_steps, window_tokens = torch.zeros_like(window_loss), 0, 0
        with timer.paused():  # evaluation and checkpoints do not count against tokens/s
            eval_due = eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0
            save_due = checkpoint_due(logging_step) or signalled
            if eval_due or save_due:
                check_finite()
            if eval_due:
                run_eval()
            if save_due:
                save_checkpoint()
        if signalled:
            log.info(f"stopped by {stop.signal or 'a signal'} after step {step}; resume with --checkpoint.resume=auto")
            logger.close()
            parallel.cleanup(dist)
            return 0

    # ---- the end: last eval, final model in HF format
    check_finite()
    if layer_offload is not None:  # every weight back on the device, for the merge and the save
        layer_offload.close()
    if eval_loader is not None and not finished_before and not (cfg.train.eval_every and step % cfg.train.eval_every == 0):
        run_eval()  # the end of the run, unless the loop just evaluated this step
    if cfg.checkpoint.save_final:
        try:
            save_final(model, cfg, output_dir, dist)
        except Exception as e:
            if not checkpoint.is_disk_full(e):
                raise
            shutil.rmtree(output_dir / "final.tmp", ignore_errors=True)  # give back the space it took
            raise checkpoint.CheckpointSaveError(
                f"no space left on device while saving {output_dir / 'final'}; the checkpoints are intact: free some "
                "space and continue with --checkpoint.resume=auto") from None
        if cfg.qat.enabled and cfg.qat.export and dist.is_main:
            log.info(f"saved quantised export: {qat.export_quantized(output_dir / 'final', cfg.qat)}")
    logger.close()
    if dist.is_main and cfg.logging.plot and metrics.plot_loss(output_dir):
        log.info(f"loss curve: {output_dir / 'loss.png'}")
    parallel.cleanup(dist)
    return 0


def save_final(model, cfg: Config, output_dir: Path, dist) -> None:
    """<output_dir>/final: an HF-format folder (config.json, safetensors, tokenizer files) that transformers loads.
    With LoRA, <output_dir>/adapter in PEFT's format, and final/ holds the merged model (unless lora.merge = false)."""
    if dist.enabled and parallel.saves_streamed(cfg, model):
        save_final_streamed(model, cfg, output_dir, dist)
        return
    if dist.enabled:
        model = gather_on_rank0(model, cfg, dist)
        if model is None:  # other ranks: rank 0 writes
            parallel.barrier(dist)
            return
    tokenizer_source = Path(cfg.model.tokenizer or cfg.model.path)
    tmp = output_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
    if cfg.lora.enabled:
        adapter = output_dir / "adapter"
        lora.save_adapter(model, adapter, base_model_name_or_path=cfg.model.path or None)
        log.info(f"saved adapter (PEFT format): {adapter}")
        if not cfg.lora.merge:
            parallel.barrier(dist)
            return
        if quantized_base_folder(cfg):  # merge into the original full-precision weights, not dequantised NF4 ones
            lora.merge_adapter_into_base(Path(cfg.model.path), adapter, tmp, overrides=cfg.model.overrides)
            finish_final(output_dir, tokenizer_source)
            parallel.barrier(dist)
            return
        lora.merge_lora(model)
    models.save_pretrained(model, tmp)
    finish_final(output_dir, tokenizer_source)
    parallel.barrier(dist)


def quantized_base_folder(cfg: Config) -> str | None:
    """The HF folder whose full-precision weights final/ is merged into when training quantised them to NF4 (QLoRA of
    the linears or of the experts); None otherwise."""
    return cfg.model.path if (cfg.lora.quantize or cfg.lora.quantize_experts) and cfg.model.path else None


def save_final_streamed(model, cfg: Config, output_dir: Path, dist) -> None:
    """save_final for a sharded model: every process takes part in gathering one tensor at a time; rank 0 writes."""
    tmp = output_dir / "final.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
    if cfg.lora.enabled:
        parallel.save_adapter_streamed(model, output_dir / "adapter", dist, cfg.model.path or None)
        log.info(f"saved adapter (PEFT format): {output_dir / 'adapter'}")
    if not cfg.lora.enabled or cfg.lora.merge:
        # QLoRA: merged into the original full-precision weights, as in one process (save_final)
        parallel.save_final_streamed(model, tmp, dist, merge_lora=cfg.lora.enabled, original=quantized_base_folder(cfg))
        if dist.is_main:
            finish_final(output_dir, Path(cfg.model.tokenizer or cfg.model.path))
    parallel.barrier(dist)


def finish_final(output_dir: Path, tokenizer_source: Path) -> None:
    """Copy the tokenizer files next to the weights, then move final.tmp into place (final/ is never half-written)."""
    final, tmp = output_dir / "final", output_dir / "final.tmp"
    copy_tokenizer_files(tokenizer_source, tmp)
    models.make_readable(tmp)  # the copies keep their source's modes; final/ is for others to read (0644 / 0755)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info(f"saved final model: {final}")


def gather_on_rank0(model, cfg: Config, dist):
    """The full, unsharded model on rank 0's CPU (None on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    single = models.build_model(model.config, "meta", next(iter(full.values())).dtype)
    if cfg.lora.enabled:
        lora.apply_lora(single, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.rslora,
                        cfg.lora.dora, cfg.lora.modules_to_save)
    single.load_state_dict(full, assign=True)
    single.tie_weights()
    return single


def copy_tokenizer_files(source: Path, target: Path) -> None:
    folder = source if source.is_dir() else source.parent
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, target / name)


USER_ERRORS = (ConfigError, models.CheckpointError, DataError, RowError, SourceError, TemplateError, TokenizerError,
               FloatingPointError, checkpoint.CheckpointSaveError)


def cli() -> None:
    try:
        sys.exit(main())
    except USER_ERRORS as e:  # problems with the user's input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
