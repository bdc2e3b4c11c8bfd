"""What a run reports: a progress line per log interval, metrics.jsonl, optional TensorBoard / W&B, a loss plot."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch

from nanotune.config import LoggingConfig

log = logging.getLogger("nanotune")

# Dense bf16 peak of the card, for MFU; unknown cards report no MFU rather than a wrong one.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def setup_logging(output_dir: Path | None, is_main: bool, rank: int = 0) -> None:
    """Progress on rank 0's console and in output_dir/train.log; the other ranks print warnings and add their errors
    to train.log (opened only when one comes), so that every error that ends a run is there."""
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(output_dir / "train.log", delay=not is_main)
        who = "" if is_main else f"rank {rank}: "
        file.setFormatter(logging.Formatter(f"%(asctime)s {who}%(message)s", "%Y-%m-%d %H:%M:%S"))
        if not is_main:
            file.setLevel(logging.ERROR)
        log.addHandler(file)


def close_log_file() -> None:
    """Detach and close train.log (the console handler stays)."""
    for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        handler.close()
        log.removeHandler(handler)


def log_error_to_file(e: BaseException, with_traceback: bool = True) -> None:
    """Write the error that ends a run into train.log (the console shows it already, through the caller)."""
    if isinstance(e, SystemExit) and not e.code:
        return
    files = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    text = f"error: {type(e).__name__}: {e}" if str(e) else f"error: {type(e).__name__}"
    if with_traceback:
        text += "\n" + "".join(traceback.format_exception(e)).rstrip()
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, None)
    for handler in files:
        handler.handle(record)


def parse_record(line: str) -> dict | None:
    """One metrics.jsonl line, or None for an empty or half-written one (a run killed, or a disk full, mid-line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model, seq_len: int, trainable_fraction: float = 1.0) -> float:
    """PaLM (appendix B): 6N + 12 L H Q T for full training; frozen weights get no weight gradient (4N)."""
    c = model.config
    n = sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_)
    if getattr(c, "num_experts", None) and getattr(c, "num_experts_per_tok", None):  # MoE: only active experts work
        experts = sum(p.numel() for n_, p in model.named_parameters() if ".experts." in n_)
        n -= experts * (1 - c.num_experts_per_tok / c.num_experts)
    if getattr(c, "tie_word_embeddings", False):
        n += c.vocab_size * c.hidden_size  # the LM head still does its matmul
    factor = 6 if trainable_fraction > 0.5 else 4
    return factor * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


class MetricsLogger:
    """Writes metrics.jsonl (one object per logged step) and forwards to TensorBoard / W&B when enabled."""

    def __init__(self, output_dir: Path, cfg: LoggingConfig, is_main: bool, run_config: dict):
        self.is_main = is_main
        self.path = output_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not is_main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                log.warning("logging.tensorboard = true but tensorboard is not installed; pip install tensorboard")
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, config=run_config, dir=str(output_dir))
            except ImportError:
                log.warning("logging.wandb = true but wandb is not installed; pip install wandb")

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def expert_load(tokens_LE: torch.Tensor) -> dict:
    """Tokens routed to each expert (sparse layers, E) -> metrics.jsonl's view of it: per layer the min / max / mean
    over the experts, and `expert_load_max`, the largest max / mean of any layer (1: balanced; E / K: one expert per
    slot took everything). Computed on the device; one read-back."""
    t = tokens_LE.detach().float()
    per_layer = torch.stack([t.min(1).values, t.max(1).values, t.mean(1)])  # (3, layers)
    worst = (per_layer[1] / per_layer[2].clamp_min(1e-12)).max()
    values = torch.cat([per_layer.flatten(), worst[None]]).tolist()
    L = t.shape[0]
    return {"tokens_per_expert": {"min": values[:L], "max": values[L:2 * L], "mean": values[2 * L:3 * L]},
            "expert_load_max": values[-1]}


def format_progress(r: dict, total_steps: int) -> str:
    parts = [
        f"step {r['step']}/{total_steps}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"grad norm {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:,.0f} tok/s",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {r['mfu']:.1%}")
    if r.get("peak_mem_gib") is not None:
        parts.append(f"peak mem {r['peak_mem_gib']:.1f} GiB")
    if r.get("aux_loss") is not None:
        parts.append(f"aux {r['aux_loss']:.4f}")
    if r.get("expert_load_max") is not None:
        parts.append(f"expert load max/mean {r['expert_load_max']:.2f}")
    parts.append(f"ETA {format_seconds(r['eta_s'])}")
    return " | ".join(parts)


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def plot_loss(output_dir: Path) -> Path | None:
    """loss.png from metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = (output_dir / "metrics.jsonl").read_text(errors="replace").splitlines()
    records = [r for r in map(parse_record, lines) if r is not None]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = output_dir / "loss.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


class Timer:
    """Training time per log window; time spent inside `paused()` (evaluation, checkpoints) is left out."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start, self.excluded = now - self.start - self.excluded, now, 0.0
        return elapsed

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start
