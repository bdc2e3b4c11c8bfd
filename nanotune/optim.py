"""AdamW with sensible parameter groups, and the learning-rate schedule as a plain function of the step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from nanotune.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters, split so that norms, biases and embeddings get no weight decay (unless configured)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "norm" in name or id(p) in embeddings
        (no_decay if exempt and not cfg.decay_norms_biases_embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant / linear / cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    elif cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.schedule {cfg.schedule!r} is unknown; choose constant, linear or cosine")
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)
