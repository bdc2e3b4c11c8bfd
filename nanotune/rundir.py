"""The output_dir of a run: one run at a time (a lock file), what a new run may start on top of, and `--overwrite`.

    nanotune.lock      {"pid": ..., "host": ...} of the run that owns the folder; removed when it ends. A lock whose
                       process is gone (killed, out of memory) is taken over by the next run.

A new run refuses a folder that holds an earlier run's checkpoints, final/ or adapter/ (resume it, or pass
--overwrite); a run that was killed before its first checkpoint left only logs behind and is simply started again.
--overwrite deletes only what a nanotune run writes (the names in RUN_OUTPUTS and step-N folders), never anything
else, and only in a folder that holds a nanotune config.toml.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from nanotune import checkpoint
from nanotune.checkpoint import STEP_DIR
from nanotune.config import ConfigError
from nanotune.parallel import DistInfo, barrier, broadcast_from_main

LOCK_FILE = "nanotune.lock"
RUN_OUTPUTS = ("config.toml", "train.log", "metrics.jsonl", "loss.png", "final", "final.tmp", "adapter", "tensorboard",
               "wandb")


def acquire_lock(output_dir: Path, info: DistInfo) -> Path | None:
    """Rank 0 takes output_dir/nanotune.lock; every rank raises the same error if another live run holds it.
    Returns the lock file to release (on rank 0; None elsewhere)."""
    holder = try_lock(output_dir / LOCK_FILE) if info.is_main else 0
    holder = broadcast_from_main(holder, info)  # 0: taken by this run; otherwise the pid of the run that holds it
    if holder:
        raise ConfigError(
            f"output_dir {output_dir} is in use by another run (pid {holder}, see {output_dir / LOCK_FILE}); wait for "
            "it to end, stop it, or choose another --output_dir")
    return output_dir / LOCK_FILE if info.is_main else None


def try_lock(path: Path) -> int:
    """0 when this process now holds the lock, else the pid of the live process that does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # atomic: one of two racing runs wins
        except FileExistsError:
            holder = read_lock(path)
            if holder is not None and holder != me and holder_alive(holder):
                return int(holder["pid"])
            path.unlink(missing_ok=True)  # a dead run's lock (or our own, left by an earlier run in this process)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return 0
    raise ConfigError(f"could not take the lock {path}: another run keeps taking it; choose another --output_dir")


def read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None  # unreadable or half-written: its writer died before it finished


def holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # a process on another machine (shared storage): we cannot tell, so assume it runs
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def release_lock(path: Path | None) -> None:
    """Remove the lock if it is still this process's."""
    if path is not None and (read_lock(path) or {}).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def run_outputs(output_dir: Path) -> list[Path]:
    """What earlier nanotune runs wrote into output_dir (nothing else in it)."""
    if not output_dir.is_dir():
        return []
    found = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    return found + [p for p in sorted(output_dir.iterdir()) if p.is_dir() and STEP_DIR.match(p.name)]


def start_afresh(output_dir: Path, info: DistInfo) -> list[str]:
    """--overwrite: rank 0 deletes the earlier run's outputs (under the lock); returns their names."""
    removed = []
    if info.is_main:
        outputs = run_outputs(output_dir)
        names = {p.name for p in outputs}
        if names - {"train.log"} and "config.toml" not in names:
            raise ConfigError(f"--overwrite: {output_dir} holds {', '.join(sorted(names))} but no config.toml, so it "
                              "may not be a nanotune run's output_dir; nothing was deleted; choose another --output_dir")
        for p in outputs:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:  # a file, or a link (only the link goes, never what it points to)
                p.unlink()
            removed.append(p.name)
        removed += checkpoint.remove_leftovers(output_dir)
    barrier(info)
    return removed


def remove_leftovers(output_dir: Path, info: DistInfo) -> list[str]:
    """Rank 0 removes the step-N.tmp/ and *.deleting/ folders of a run killed while saving or deleting."""
    return checkpoint.remove_leftovers(output_dir) if info.is_main else []


def check_output_dir(output_dir: Path, resume_from: Path | None) -> None:
    """Refuse to start a new run on top of an old one: its checkpoints and final model would be lost. A run that
    stopped before its first checkpoint left only logs and metrics; starting again over it loses nothing."""
    if resume_from is not None:
        return
    previous = [p.name for p in run_outputs(output_dir) if p.name in ("final", "adapter") or STEP_DIR.match(p.name)]
    if previous:
        hint = ("continue it with --checkpoint.resume=auto" if any(p.startswith("step-") for p in previous)
                else "it has no checkpoint to resume")
        raise ConfigError(
            f"output_dir {output_dir} already holds a run ({', '.join(previous[:4])}); {hint}, start anew with "
            "another --output_dir, or delete that run's outputs with --overwrite"
        )
