"""The training loop reads nothing back from the device between logging steps.

Reading a device value on the host (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:`) makes the host wait until
the device has finished everything queued before it: a host-device sync, which on a GPU leaves it idle while the host
prepares the next work. Every such read runs `aten._local_scalar_dense`; a TorchDispatchMode counts the ones that
nanotune's own code asks for (the loop, the loss, the parallel helpers), during real trainer runs on the CPU, and
attributes them to optimizer steps with torch's global optimizer step hook. (`tolist()` does not go through that op:
the loop uses it only after an `.item()` has found a non-finite step, to word the error.) Reads made inside torch (the optimizer's step counter lives on the host) and
by the data loader (host memory) are not host-device syncs and are not counted; reads in a model's forward are the
model files' business and are counted separately (tests for the models' compile-clean forward cover them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode

from nanotune import train
from tests.conftest import ROOT, run_torchrun
from tests.test_train import QUICKSTART, run  # noqa: F401  (run is the trainer fixture)

TORCH_DIR = str(Path(torch.__file__).parent)
MACHINERY = ("_dynamo/eval_frame.py", "torch/_compile.py", "utils/_python_dispatch.py", "torch/_tensor.py", __file__)


def asker(frame) -> str:
    """The file of the code that asked for a value: the first frame outside the dispatch machinery."""
    while frame is not None and frame.f_code.co_filename.endswith(MACHINERY):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


class CountHostReads(TorchDispatchMode):
    """reads[i]: where the reads between optimizer step i and step i + 1 came from (reads[0]: before the first step)."""

    def __init__(self):
        super().__init__()
        self.reads = [[]]
        self.hook = register_optimizer_step_post_hook(lambda *_: self.reads.append([]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            where = asker(sys._getframe(1))
            if where.startswith(str(ROOT / "nanotune")) and not where.endswith(("packing.py", "pipeline.py")):
                self.reads[-1].append(os.path.relpath(where, ROOT))
            elif where.startswith(str(ROOT / "models")):
                self.reads[-1].append("model:" + os.path.relpath(where, ROOT))
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        self.hook.remove()
        return super().__exit__(*exc)


def loop_reads(reads: list[list[str]]) -> list[int]:
    """Per optimizer step i >= 1: the loop's reads after step i up to step i + 1 (what step i logs or saves, and step
    i + 1's micro-batches, forward, backward and clipping); the model's forward is left out."""
    return [sum(not r.startswith("model:") for r in after) for after in reads[1:]]


def counted_run(run, *overrides) -> list[list[str]]:
    with CountHostReads() as counter:
        run("--train.max_steps=4", "--logging.every=2", "--train.grad_accum_steps=2", "--train.eval_every=0",
            "--data.eval_datasets=[]", *overrides)
    return counter.reads


def test_no_host_sync_between_logging_steps(run):
    """Four steps of two micro-batches, logging every second: the steps before a logging step read nothing back; a
    logging step reads the loss, the gradient norm and the non-finite flag (the counter sees them: it can fail).
    With train.nonfinite = 'skip' the loop must know before the optimizer step whether to take it: exactly one read
    per step besides the logging steps (documented in docs/architecture.md)."""
    reads = counted_run(run)  # the chunked LM head + CE
    per_step = loop_reads(reads)
    assert len(per_step) == 4  # four optimizer steps
    assert per_step[0] == per_step[2] == 0, reads
    assert per_step[1] > 0  # step 2 is logged
    skipping = loop_reads(counted_run(run, "--train.nonfinite=skip", "--train.loss=plain"))
    assert skipping[0] == skipping[2] == 1


def worker(spec_file: str) -> None:
    """Inside torchrun: one counted trainer run; rank 0 writes the reads per step."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    spec = json.loads(Path(spec_file).read_text())
    with CountHostReads() as counter:
        assert train.main(spec["argv"]) == 0
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(counter.reads))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_agree_on_the_clock_and_signals_only_at_logging_steps(run, tmp_path):
    """FSDP2 over 2 gloo processes with checkpoint.every_minutes set: the step's token count, loss and the clock and
    stop decisions would each be a collective read back on every step; the loop keeps the first two on the device and
    takes the decisions at logging steps only, so the steps in between read nothing back."""
    base = run("--train.max_steps=1", name="base")  # writes the data cache and the resolved config
    argv = [str(base / "config.toml"), "--train.max_steps=4", "--logging.every=2", "--checkpoint.every_minutes=1e-9",
            "--checkpoint.keep=0", "--train.eval_every=0", "--data.eval_datasets=[]", "--train.loss=plain",
            f"--output_dir={tmp_path / 'dist'}"]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"argv": argv, "out": str(tmp_path / "reads.json")}))
    run_torchrun(__file__, str(spec), nproc=2, timeout=300)
    reads = json.loads((tmp_path / "reads.json").read_text())
    per_step = loop_reads(reads)
    assert per_step[0] == per_step[2] == 0, reads
    assert per_step[1] > 0
    # the clock said "save" at every step, but the processes agree on it at logging steps only
    assert sorted(p.name for p in (tmp_path / "dist").glob("step-*")) == ["step-2", "step-4"]


if __name__ == "__main__":
    worker(sys.argv[1])
