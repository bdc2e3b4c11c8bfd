"""Resumable training checkpoints (`<output_dir>/step-N/`) with torch.distributed.checkpoint (DCP).

A checkpoint holds the trainable parameters and the optimizer state (sharded: each process writes its own part), and
per process the data position and RNG states; rank 0 adds the step, the number of processes, the mesh and the resolved
config. Nothing in it is a pickle, so resuming never runs code from the files (a checkpoint is as safe to receive as a
final/ folder):

    step-N/checkpoint.json               step, world_size, layout (mesh sizes), config (TOML text); written last, so
                                         it marks a whole one
    step-N/state/*.safetensors           DCP shards: tensors, with their offsets in the global tensor as JSON in
                                         the safetensors header (torch's HuggingFaceStorageWriter/Reader)
    step-N/extra-rank{r}.json            data position, Python's and NumPy's RNG states as plain lists
    step-N/extra-rank{r}.safetensors     torch's CPU (and CUDA) RNG states

Resuming on another mesh (other world size, dp_shard, tp): DCP reads each process's shards from the saved ones by
their offsets in the global tensors, whatever sharding wrote them. The data position is a count of rows of the epoch
consumed by all data-parallel processes together, which maps onto any layout that trains on the same rows per
optimizer step (micro_batch_size x grad_accum_steps x dp_replicate x dp_shard); `check_layout` refuses the others.
On the same mesh every process restores its own RNG states; on another, every process takes rank 0's.

Optimizer hyperparameters (param_groups) are not saved: they come from the config of the resumed run (the learning
rate is set from the schedule at every step anyway). A checkpoint is written into `step-N.tmp/` and renamed to
`step-N/` once every process has finished; old ones are renamed to `*.deleting` before they are removed, so no name
a resume looks for ever holds a partial folder. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import errno
import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanotune.config import ConfigError, TrainConfig, parse_toml
from nanotune.parallel import MESH_DIMS, DistInfo, all_reduce_sum, barrier

STEP_DIR = re.compile(r"^step-(\d+)$")
INFO_FILE = "checkpoint.json"
STATE_DIR = "state"
FORMAT = 1
# Frozen weights (the base model under LoRA) never change: they come from model.path, not from the checkpoint.
OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the earlier checkpoints are untouched."""


# ------------------------------------------------------------------------------------------------ RNG states


def rng_state() -> tuple[dict, dict]:
    """(JSON-able states of Python's and NumPy's generators, torch's generator states as uint8 tensors)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(keys), gauss], "numpy": [name, np_keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict) -> None:
    version, keys, gauss = plain["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ------------------------------------------------------------------------------------------------ saving


def tensor_state(model, optimizer) -> tuple[dict, list]:
    """({"model": {fqn: tensor}, "optim": {fqn: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}}, param_groups):
    the first holds only tensors, which DCP writes into safetensors files (other values would need a pickle)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": without_aliases(model_sd), "optim": optim_sd["state"]}
    for fqn, per_param in state["optim"].items():
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{key} is not a tensor ({type(value).__name__}); "
                                "checkpoints hold only tensors")
    return state, optim_sd["param_groups"]


def without_aliases(tensors: dict) -> dict:
    """Tied weights (an LM head that is the embedding) appear under two names with one storage; safetensors will not
    write that twice, and restoring the first name restores both."""
    seen, kept = set(), {}
    for name, t in tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
        where = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if local.numel() and where in seen:
            continue
        seen.add(where)
        kept[name] = t
    return kept


def save(output_dir: Path, step: int, model, optimizer, extra: dict, info: DistInfo, keep: int,
         config_toml: str) -> Path:
    """Write step-N atomically; `extra` (data position, ...) is saved per process with the RNG states.
    Raises CheckpointSaveError on every process if any process failed to write its part."""
    final = output_dir / f"step-{step}"
    tmp = output_dir / f"step-{step}.tmp"
    failure = None
    if info.is_main:
        failure = attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
    raise_if_any_failed(failure, step, output_dir, tmp, info)  # also the barrier before the others write into tmp

    def write():
        dcp.save(tensor_state(model, optimizer)[0],
                 storage_writer=HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=True))
        plain, tensors = rng_state()
        write_json(tmp / f"extra-rank{info.rank}.json", {**extra, "step": step, "rng": plain})
        save_file(tensors, tmp / f"extra-rank{info.rank}.safetensors")
        if info.is_main:  # last: a folder with this file was written completely
            write_json(tmp / INFO_FILE, {"format": FORMAT, "step": step, "world_size": info.world_size,
                                         "layout": info.layout, "config": config_toml})

    raise_if_any_failed(attempt(write), step, output_dir, tmp, info)
    if info.is_main:
        if final.exists():
            discard(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            discard(old)
    barrier(info)
    return final


def attempt(fn) -> BaseException | None:
    """Run fn; return what it raised (DCP's CheckpointException is a BaseException, so it is caught by name)."""
    try:
        fn()
    except (Exception, CheckpointException) as e:  # noqa: BLE001 -- the caller shares it with the other processes
        return e
    return None


def raise_if_any_failed(failure: BaseException | None, step: int, output_dir: Path, tmp: Path, info: DistInfo) -> None:
    """Every process learns whether any process failed (DCP raises on all of them, but our own files may fail on one
    only; a process left waiting at the next barrier would wait forever), and all raise together."""
    if not all_reduce_sum(failure is not None, info):
        return
    disk_full = all_reduce_sum(failure is not None and is_disk_full(failure), info)
    barrier(info)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier checkpoints stay as they were
    if disk_full:
        raise CheckpointSaveError(
            f"no space left on device while saving step {step} to {output_dir}; the earlier checkpoints are "
            "intact: free some space and continue with --checkpoint.resume=auto") from None
    if failure is not None:
        raise failure
    raise CheckpointSaveError(f"saving step {step} failed on another process; see its error")


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in an exception, its causes, or DCP's per-rank failures."""
    seen, todo = set(), [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return False


def discard(path: Path) -> None:
    """Remove a folder so that its name never points at a half-deleted one: rename first, then delete."""
    trash = path.with_name(path.name + ".deleting")
    if trash.exists():  # left by a run killed while deleting
        shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(output_dir: Path) -> list[str]:
    """step-N.tmp/ and *.deleting/ folders of a run that was killed while saving or deleting (call under the lock)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and (
        (p.name.endswith(".tmp") and STEP_DIR.match(p.name[:-4])) or
        (p.name.endswith(".deleting") and STEP_DIR.match(p.name[:-9])))]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in found]


# ------------------------------------------------------------------------------------------------ loading


def damaged(path: Path, what: str) -> ConfigError:
    return ConfigError(f"checkpoint {path} is damaged or incomplete ({what}); resume from an earlier step-N folder "
                       "or start anew")


def read_info(path: Path) -> dict:
    """checkpoint.json of a step-N folder: {"format", "step", "world_size", "config"}; cheap, read before any model
    is built so that a checkpoint that cannot be resumed is refused at once."""
    file = path / INFO_FILE
    if not file.is_file():
        if (path / ".metadata").is_file():
            raise ConfigError(f"{path} was written by an older nanotune in a pickle-based format, which is not read "
                              "because loading it could run code; start anew")
        raise damaged(path, f"no {INFO_FILE}")
    try:
        info = json.loads(file.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, f"{INFO_FILE}: {e}") from None
    missing = [k for k in ("format", "step", "world_size", "config") if k not in info]
    if missing:
        raise damaged(path, f"{INFO_FILE} lacks {', '.join(missing)}")
    try:
        parse_toml(info["config"])
    except (TypeError, ValueError) as e:  # TOMLDecodeError is a ValueError
        raise damaged(path, f"{INFO_FILE}: its config is not TOML ({e})") from None
    if info["format"] != FORMAT:
        raise ConfigError(f"{path} has checkpoint format {info['format']!r}; this nanotune reads format {FORMAT}")
    return info


def saved_layout(info: dict) -> dict[str, int]:
    """The mesh a checkpoint was written on (dimension -> size): its `layout`, or for a checkpoint written before the
    layout was recorded, the [parallel] keys of its config resolved on its world_size (dp_shard = -1: the rest)."""
    if "layout" in info:
        return {dim: int(info["layout"].get(dim, 1)) for dim in MESH_DIMS}
    keys = parse_toml(info["config"]).get("parallel", {})
    layout = {dim: int(keys.get(dim, 1)) for dim in MESH_DIMS}
    if keys.get("dp_shard", -1) == -1:
        layout["dp_shard"] = info["world_size"] // (layout["dp_replicate"] * layout["cp"] * layout["tp"])
    return layout


def same_layout(info: dict, layout: dict[str, int]) -> bool:
    return saved_layout(info) == {dim: layout[dim] for dim in MESH_DIMS}


def check_layout(info: dict, path: Path, layout: dict[str, int], micro_batch_size: int, grad_accum_steps: int) -> None:
    """A checkpoint resumes on any mesh (DCP reshards the model and optimizer state), but the data position maps onto
    the new data-parallel processes exactly only if every optimizer step still trains on the same rows: refuse a run
    whose rows per step (micro_batch_size x grad_accum_steps x dp_replicate x dp_shard) differ, naming the keys that
    would keep them."""
    train = parse_toml(info["config"]).get("train", {})
    was = (train.get("micro_batch_size", TrainConfig.micro_batch_size),
           train.get("grad_accum_steps", TrainConfig.grad_accum_steps), data_parallel_size(saved_layout(info)))
    now = (micro_batch_size, grad_accum_steps, data_parallel_size(layout))
    rows_was, rows_now = math.prod(was), math.prod(now)
    if rows_was == rows_now:
        return
    raise ConfigError(
        f"{path} was written with {rows_was} rows per optimizer step (train.micro_batch_size {was[0]} x "
        f"train.grad_accum_steps {was[1]} x {was[2]} data-parallel process(es)) but this run takes {rows_now} "
        f"({now[0]} x {now[1]} x {now[2]}); {same_rows_fix(rows_was, micro_batch_size, now[2])} so that every step "
        "trains on the same rows, or start anew in another output_dir")


def data_parallel_size(layout: dict[str, int]) -> int:
    return layout["dp_replicate"] * layout["dp_shard"]


def same_rows_fix(rows: int, micro_batch_size: int, dp_size: int) -> str:
    """The override(s) that make micro_batch_size x grad_accum_steps x dp_size equal `rows` (keeping the micro-batch
    size if it can), or what to launch instead."""
    if rows % dp_size:
        return (f"launch a number of data-parallel processes (parallel.dp_replicate x dp_shard) that divides {rows}, "
                "then set train.grad_accum_steps to match")
    per_process = rows // dp_size
    if per_process % micro_batch_size == 0:
        return f"set --train.grad_accum_steps={per_process // micro_batch_size}"
    fits = max(b for b in range(1, min(micro_batch_size, per_process) + 1) if per_process % b == 0)
    return f"set --train.micro_batch_size={fits} --train.grad_accum_steps={per_process // fits}"


def load(path: Path, model, optimizer, info: DistInfo) -> dict:
    """Restore model and optimizer in place (resharded by DCP onto this run's mesh); returns the extra state (RNG states
    already restored): this process's own on the mesh the checkpoint was written on, else rank 0's on every process.
    Rank 0's holds the same data position as every other (a count over all data-parallel processes), and its RNG
    states keep the processes of a tensor-parallel group drawing the same random numbers, as a fresh start's common
    seed does."""
    rank = info.rank if same_layout(read_info(path), info.layout) else 0
    extra_json, extra_tensors = path / f"extra-rank{rank}.json", path / f"extra-rank{rank}.safetensors"
    try:
        extra = json.loads(extra_json.read_text())
        rng_tensors = load_file(extra_tensors)
    except (OSError, ValueError, UnicodeDecodeError, SafetensorError) as e:
        raise damaged(path, f"process {rank}'s extra state: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(extra, dict) or not {"step", "data", "rng"} <= extra.keys() or "torch" not in rng_tensors:
        raise damaged(path, f"{extra_json.name} lacks step, data or RNG states")
    # the optimizer's hyperparameters (param_groups) are this run's, from its config
    state, param_groups = tensor_state(model, optimizer)
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / STATE_DIR)))
    except (Exception, CheckpointException) as e:  # missing or mis-shaped tensors come as a long chain of errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"{path} does not fit this model and optimizer, or is damaged ({first}); resume with the "
                          "settings it was written with, or from an earlier step-N folder") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": param_groups}, options=OPTIONS)
    try:
        set_rng_state(extra["rng"], rng_tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # not the lists and tensors that rng_state() wrote
        raise damaged(path, f"{extra_json.name}: RNG states: {e}") from None
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
    if not (path / INFO_FILE).is_file() and not (path / ".metadata").is_file():
        raise ConfigError(f"checkpoint.resume = {resume!r} is not a complete step-N checkpoint folder; "
                          "give a step-N folder or 'auto'")
    return path
