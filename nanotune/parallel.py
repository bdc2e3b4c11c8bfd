"""Process groups and FSDP2 sharding, applied to a finished model from outside.

    dist = init_distributed("auto")              # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    model = shard_model(model, dist, mp_dtype)    # fully_shard each decoder layer, then the root

One data-parallel dimension for now: each process holds 1/world_size of every parameter, gradient and optimizer
state (ZeRO-3 style, through `torch.distributed.fsdp.fully_shard`). Gradients are averaged over processes by the
reduce-scatter; train.py scales its loss by world_size so that the result is the sum over all tokens divided by the
trainable tokens of the whole step, exactly as in one process.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from nanotune.config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no CUDA device is visible; set device = 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device_name: str = "auto", backend: str = "auto") -> DistInfo:
    """One process: nothing to set up. Under torchrun: a process group (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world_size == 1:
        return DistInfo(device=device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), world_size, local_rank, device)


def shard_model(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard every decoder layer as its own unit (gathered just before its forward), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = torch.distributed.device_mesh.init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def all_reduce_sum(value: float | int, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item()


def broadcast_from_main(value: int, info: DistInfo) -> int:
    """Rank 0's value on every rank: for decisions all ranks must take together (e.g. a checkpoint on the clock)."""
    if not info.enabled:
        return value
    t = torch.tensor(int(value), dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


_watchdog: threading.Thread | None = None


def exit_when_launcher_dies(on_exit=None, interval_s: float = 1.0) -> None:
    """Under a launcher (torchrun), end this worker within seconds of the launcher's death: a `kill -9` of torchrun
    cannot pass a signal on, and the worker would otherwise train to the end. A daemon thread sees the parent pid
    change (the orphan is re-parented) and calls `on_exit(message)` (for the log), then exits at once: the other
    workers may be gone too, so nothing collective (such as a checkpoint) could finish."""
    global _watchdog
    if _watchdog is not None and _watchdog.is_alive():
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(interval_s)
        try:
            if on_exit is not None:
                on_exit(f"the launcher (pid {launcher}) is gone; stopping this worker (pid {os.getpid()})")
        finally:
            os._exit(1)

    _watchdog = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    _watchdog.start()
