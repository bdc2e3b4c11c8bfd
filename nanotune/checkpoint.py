"""Resumable training checkpoints (`<output_dir>/step-N/`) with torch.distributed.checkpoint (DCP).

A checkpoint holds the trainable parameters and the optimizer state (sharded: each process writes its own part), and per process the
data position, RNG states, step and the resolved config. It is written into `step-N.tmp/` and renamed to `step-N/`
only once every process has finished, so a run killed mid-write never leaves a checkpoint that looks complete.
Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanotune.config import ConfigError
from nanotune.parallel import DistInfo, barrier

STEP_DIR = re.compile(r"^step-(\d+)$")
# Frozen weights (the base model under LoRA) never change: they come from model.path, not from the checkpoint.
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(output_dir: Path, step: int, model, optimizer, extra: dict, info: DistInfo, keep: int) -> Path:
    """Write step-N atomically; `extra` (data position, config, ...) is saved per process with the RNG states."""
    final = output_dir / f"step-{step}"
    tmp = output_dir / f"step-{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({**extra, "step": step, "rng": rng_state()}, tmp / f"extra-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load(path: Path, model, optimizer, info: DistInfo, check=None) -> dict:
    """Restore model and optimizer in place; returns this process's extra state (RNG states already restored).
    `check(extra)` runs first, before any tensor is read (e.g. to refuse a changed config)."""
    extra_file = path / f"extra-rank{info.rank}.pt"
    if not extra_file.is_file():
        raise ConfigError(
            f"{path} has no {extra_file.name}: it was written by a run with a different number of processes "
            f"or is incomplete; resume with the same number of processes or start anew"
        )
    extra = torch.load(extra_file, weights_only=False)
    if check is not None:
        check(extra)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP reports missing or mis-shaped tensors as a long chain of errors
        first = str(e).strip().splitlines()[0][:300]
        raise ConfigError(f"{path} does not fit this model and optimizer ({first}); resume with the settings it was "
                          "written with") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=OPTIONS)
    set_rng_state(extra["rng"])
    return extra


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete step-N folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """"" -> None; "auto" -> the newest step-N in output_dir (None if there is none); otherwise that path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / ".metadata").is_file():
        raise ConfigError(f"checkpoint.resume = {resume!r} is not a complete step-N checkpoint folder; "
                          "give a step-N folder or 'auto'")
    return path
