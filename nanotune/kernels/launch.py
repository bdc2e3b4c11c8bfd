"""Where Triton kernels may run, and how many programs a reduction over rows gets."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors through Triton's interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"a Triton kernel got a tensor on {x.device}; the kernels run on CUDA tensors (set TRITON_INTERPRET=1 "
            "before importing triton to run them on CPU for tests), or call the model without apply_kernels"
        )


def num_programs(device: torch.device, n_rows: int) -> int:
    """Programs for a kernel that loops over rows and reduces per program: a few per SM on a GPU."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 2))
