"""Reading and writing safetensors files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
bytes. Reading a tensor with `readinto` into a fresh buffer (rather than memory-mapping the whole file) keeps the
process's resident memory at one copy of the model plus one tensor in flight, whatever the file size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A model folder that cannot be loaded as it is, with a message naming the file or keys."""


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards named by the index, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {absent}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    hint = " (nanotune reads safetensors only; convert .bin weights first)" if any(folder.glob("*.bin")) else ""
    raise CheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json{hint}")


def read_header(path: Path) -> dict[str, dict]:
    """The JSON header, each entry with its absolute `start` and `nbytes`; refuses files that are not whole."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):
            raise CheckpointError(f"{path} is a git-lfs pointer, not the weights: run `git lfs pull` in its folder")
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        if n + 8 > size:
            raise CheckpointError(f"{path} is not a safetensors file or is truncated (header of {n} bytes in a "
                                  f"{size}-byte file); download it again")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{path} has a corrupt safetensors header; download it again") from None
    header.pop("__metadata__", None)
    base = 8 + n
    for info in header.values():
        info["start"] = base + info["data_offsets"][0]
        info["nbytes"] = info["data_offsets"][1] - info["data_offsets"][0]
        if info["start"] + info["nbytes"] > size:
            raise CheckpointError(f"{path} is truncated ({size} bytes, its header needs "
                                  f"{info['start'] + info['nbytes']}); download it again")
    return header


def read_tensor(f, info: dict) -> torch.Tensor:
    """Read one tensor (described by a header entry) from an open file into a new CPU tensor."""
    dtype = DTYPES[info["dtype"]]
    out = torch.empty(info["shape"], dtype=dtype)
    f.seek(info["start"])
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    if f.readinto(view) != info["nbytes"]:
        raise IOError(f"{f.name}: truncated data for a tensor of shape {info['shape']}")
    return out


def read_slice(f, info: dict, index: tuple[slice, ...]) -> torch.Tensor:
    """Read only `index` of a tensor (step-1 slices of its leading dimensions) from an open file into a new CPU tensor.

    After the last dimension that is cut, every dimension is whole, so each run of that dimension is contiguous in
    the file: one read per run (one read in all for a block of rows; one per row for a block of columns). Reading
    with `readinto`, not through a memory map, keeps the process's resident memory at what it keeps."""
    shape = list(info["shape"])
    if not shape:
        return read_tensor(f, info)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]  # (start, stop) per dimension
    out = torch.empty([stop - start for start, stop in bounds], dtype=DTYPES[info["dtype"]])
    if out.numel() == 0:
        return out
    cut = max((d for d, (start, stop) in enumerate(bounds) if (start, stop) != (0, shape[d])), default=0)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]  # in elements, row-major
    run_bytes = (bounds[cut][1] - bounds[cut][0]) * strides[cut] * out.element_size()
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
    for i, outer in enumerate(itertools.product(*(range(start, stop) for start, stop in bounds[:cut]))):
        first = sum(j * s for j, s in zip(outer, strides)) + bounds[cut][0] * strides[cut]  # element offset
        f.seek(info["start"] + first * out.element_size())
        if f.readinto(buffer[i * run_bytes:(i + 1) * run_bytes]) != run_bytes:
            raise IOError(f"{f.name}: truncated data for a tensor of shape {shape}")
    return out


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past max_shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    for stale in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        write_atomic(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_atomic(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
