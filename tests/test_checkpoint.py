"""Checkpoints on a tiny module: exact round trip, no code run from any file, damage and a full disk reported
clearly, old checkpoints removed so that no final name ever holds a partial folder."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from nanotune import checkpoint
from nanotune.config import ConfigError
from nanotune.packing import BatchLoader
from nanotune.parallel import DistInfo
from tests.conftest import ROOT
from tests.test_packing import ToyData, lengths

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
ONE = DistInfo()


def trained(seed: int):
    """A tiny model with a tied weight (as a tied LM head) and an AdamW state after one step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model[1].weight = model[0].weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.arange(6)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def save(tmp_path, step=1, keep=2, model_optimizer=None):
    model, optimizer = model_optimizer or trained(0)
    return checkpoint.save(tmp_path, step, model, optimizer, {"data": {"epoch": 0, "position": step}}, ONE, keep,
                           config_toml='seed = 0\n')


class Payload:
    """Unpickling this creates `marker`: proof that loading ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker):
    path.write_bytes(pickle.dumps(Payload(marker)))


def test_round_trip_restores_model_optimizer_and_rng_states_exactly(tmp_path):
    model, optimizer = trained(0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save(tmp_path, model_optimizer=(model, optimizer))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    other_model, other_optimizer = trained(1)  # different weights and moments
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    extra = checkpoint.load(path, other_model, other_optimizer, ONE)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert extra["step"] == 1 and extra["data"] == {"epoch": 0, "position": 1}
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)
    assert other_model[1].weight is other_model[0].weight  # the tie survives
    saved, restored = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for i in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[i][key], restored[i][key])
    assert checkpoint.read_info(path) == {"format": 1, "step": 1, "world_size": 1, "config": "seed = 0\n",
                                          "layout": {"dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}}


def test_a_checkpoint_holds_no_pickle(tmp_path):
    path = save(tmp_path)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["checkpoint.json", "extra-rank0.json", "extra-rank0.safetensors",
                     "state/shard-00001-model-00001-of-00001.safetensors"]
    for p in path.rglob("*"):
        if p.is_file():
            assert not p.read_bytes().startswith(b"\x80")  # the pickle protocol opcode


def test_stray_pickles_in_a_checkpoint_are_never_read(tmp_path):
    path = save(tmp_path)
    marker = tmp_path / "pwned"
    for name in (".metadata", "extra-rank0.pt", "state/.metadata", "state/__0_0.distcp", "state/evil.pt"):
        plant(path / name, marker)
    model, optimizer = trained(1)
    checkpoint.read_info(path)
    checkpoint.load(path, model, optimizer, ONE)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["checkpoint.json", "extra-rank0.json", "extra-rank0.safetensors",
                                  "state/shard-00001-model-00001-of-00001.safetensors"])
def test_each_file_replaced_by_a_pickle_payload_is_refused_and_runs_nothing(tmp_path, name):
    path = save(tmp_path)
    marker = tmp_path / "pwned"
    plant(path / name, marker)
    model, optimizer = trained(1)
    with pytest.raises(ConfigError, match="damaged"):
        checkpoint.read_info(path)
        checkpoint.load(path, model, optimizer, ONE)
    assert not marker.exists()


def test_an_old_pickle_format_checkpoint_is_refused_unread(tmp_path):
    old = tmp_path / "step-3"
    old.mkdir()
    marker = tmp_path / "pwned"
    plant(old / ".metadata", marker)
    plant(old / "extra-rank0.pt", marker)
    assert checkpoint.resolve_resume(str(old), tmp_path) == old
    with pytest.raises(ConfigError, match="pickle-based format, which is not read"):
        checkpoint.read_info(old)
    assert not marker.exists()


def info_of(world_size, layout=None, micro_batch_size=1, grad_accum_steps=1, parallel=""):
    """checkpoint.json of a run with these settings (`layout`: mesh sizes other than 1; None: not recorded, as in a
    checkpoint written before the layout was)."""
    info = {"format": 1, "step": 4, "world_size": world_size,
            "config": f"seed = 0\n[train]\nmicro_batch_size = {micro_batch_size}\ngrad_accum_steps = {grad_accum_steps}\n"
                      f"[parallel]\n{parallel}"}
    if layout is not None:
        info["layout"] = {**dict.fromkeys(("dp_replicate", "dp_shard", "cp", "tp"), 1), **layout}
    return info


def mesh(**sizes):
    return {**dict.fromkeys(("dp_replicate", "dp_shard", "cp", "tp"), 1), **sizes}


@pytest.mark.parametrize("saved,layout,batch", [
    (info_of(2, {"dp_shard": 2}, 2, 1), mesh(), (2, 2)),  # FSDP over 2 -> one process, twice the accumulation
    (info_of(2, {"dp_shard": 2}, 2, 1), mesh(), (4, 1)),  # ... or twice the micro-batch
    (info_of(2, {"tp": 2}, 1, 4), mesh(dp_shard=2), (1, 2)),  # TP -> FSDP
    (info_of(4, {"dp_shard": 4}, 1, 1), mesh(dp_shard=2, tp=2), (1, 2)),  # FSDP over 4 -> FSDP 2 x TP 2
    (info_of(2, None, 1, 4, parallel="tp = 2\n"), mesh(tp=2), (1, 4)),  # no recorded layout: from the config
])
def test_a_resume_on_another_layout_with_the_same_rows_per_step_is_accepted(saved, layout, batch):
    checkpoint.check_layout(saved, "step-4", layout, *batch)


@pytest.mark.parametrize("saved,layout,batch,message", [
    (info_of(2, {"dp_shard": 2}, 2, 1), mesh(), (2, 1),
     r"step-4 was written with 4 rows per optimizer step \(train.micro_batch_size 2 x train.grad_accum_steps 1 x 2 "
     r"data-parallel process\(es\)\) but this run takes 2 \(2 x 1 x 1\); set --train.grad_accum_steps=2 so that every "
     r"step trains on the same rows, or start anew in another output_dir"),
    (info_of(1, {}, 2, 1), mesh(dp_shard=2), (2, 1),
     r"2 rows per optimizer step .* this run takes 4 \(2 x 1 x 2\); set --train.micro_batch_size=1 "
     r"--train.grad_accum_steps=1 so that"),
    (info_of(2, {"dp_shard": 2}, 2, 1), mesh(dp_shard=3), (1, 1),
     r"launch a number of data-parallel processes \(parallel.dp_replicate x dp_shard\) that divides 4"),
    (info_of(2, {"tp": 2}, 1, 4), mesh(dp_shard=2), (1, 4), r"this run takes 8 \(1 x 4 x 2\); set --train.grad_accum_steps=2"),
    # a checkpoint without a recorded layout: its config's [parallel] keys say it was FSDP over 2 processes
    (info_of(2, None, 1, 2), mesh(), (1, 2), r"4 rows per optimizer step .* set --train.grad_accum_steps=4"),
])
def test_a_resume_that_changes_the_rows_per_step_is_refused_naming_the_keys(saved, layout, batch, message):
    with pytest.raises(ConfigError, match=message) as err:
        checkpoint.check_layout(saved, "step-4", layout, *batch)
    assert "\n" not in str(err.value)


def rows_of_steps(loaders, accum: int, num_steps: int) -> list[list[tuple]]:
    """Drive the data-parallel ranks' loaders as train.py does (epoch after epoch) for num_steps optimizer steps;
    -> per step, the real tokens of each row it trained on, in the plan's order (micro-batch by micro-batch, rank by
    rank within one)."""
    def stream(loader):
        epoch = loader.epoch
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    streams = [stream(loader) for loader in loaders]
    steps = []
    for _ in range(num_steps):
        rows = []
        for _ in range(accum):
            for batch in [next(s) for s in streams]:  # (B, T) each: rank 0's rows come first in the plan
                rows += [tuple(ids[real].tolist()) for ids, real in zip(batch["input_ids"], batch["attention_mask"])]
        steps.append(rows)
    return steps


def loaders(data, micro_batch_size: int, world_size: int, accum: int):
    return [BatchLoader(data, seq_len=256, micro_batch_size=micro_batch_size, rank=r, world_size=world_size, seed=3,
                        grad_accum_steps=accum) for r in range(world_size)]


def test_the_data_position_carries_over_to_another_number_of_data_parallel_processes():
    """8 rows per step: 2 ranks x 2 rows x 2 micro-batches for 5 steps, then resumed on 1 rank x 2 rows x 4, into the
    next epoch. Every step trains on the same rows, in the same order, as an uninterrupted 1 x 8 x 1 run: nothing in
    the epoch is skipped or seen twice, and the epoch ends at the same step."""
    data = ToyData(lengths(125, hi=200))  # 51 rows an epoch: 5 fill the last step of 8
    reference_loader = loaders(data, 8, 1, 1)
    steps_per_epoch = len(reference_loader[0])
    assert 5 < steps_per_epoch < 12  # the resumed part crosses into the next epoch
    reference = rows_of_steps(reference_loader, 1, 12)
    two = loaders(data, 2, 2, 2)
    before = rows_of_steps(two, 2, 5)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in two]  # survives a checkpoint round trip
    assert states[0] == states[1] and states[0]["rows"] == 5 * 8  # the same global count on every rank
    one = loaders(data, 2, 1, 4)
    one[0].load_state_dict(states[0])
    assert one[0].position == 20  # micro-batches of 2 rows: 40 rows of the epoch consumed
    after = rows_of_steps(one, 4, 7)
    assert before + after == reference
    epoch = [row for step in reference[:steps_per_epoch] for row in step]
    assert len(set(epoch)) == len(epoch) - (-len(set(epoch)) % 8)  # each row once (but the few that fill the last step)


def test_a_loader_refuses_a_position_from_another_number_of_rows_per_step():
    data = ToyData(lengths(50))
    state = loaders(data, 2, 2, 1)[0].state_dict()  # 4 rows per step
    with pytest.raises(ValueError, match="took 4 rows per optimizer step .* this one takes 2"):
        loaders(data, 2, 1, 1)[0].load_state_dict(state)
    loaders(data, 2, 1, 2)[0].load_state_dict(state)  # 2 x 1 x 2: the same 4 rows per step


def test_on_another_layout_every_process_takes_rank_0s_data_position_and_rng_states(tmp_path):
    """Written by one process, resumed as rank 1 of tensor parallel over 2 (no extra-rank1 exists): rank 1 restores
    rank 0's data position and RNG states, as its tensor-parallel peer does."""
    model, optimizer = trained(0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save(tmp_path, model_optimizer=(model, optimizer))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    other_model, other_optimizer = trained(1)
    extra = checkpoint.load(path, other_model, other_optimizer, DistInfo(rank=1, world_size=2, layout=mesh(tp=2)))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert extra["data"] == {"epoch": 0, "position": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other_model.parameters()))


def test_a_full_disk_keeps_the_earlier_checkpoints_and_says_so(tmp_path, monkeypatch):
    first = save(tmp_path, step=1)
    before = {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("safetensors.torch.save", no_space)  # what DCP writes each shard with
    with pytest.raises(checkpoint.CheckpointSaveError, match="^no space left on device while saving step 2 to "):
        save(tmp_path, step=2, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # no step-2.tmp, step-1 not rotated out
    assert {p.name: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    monkeypatch.undo()  # space freed: the run can save again
    save(tmp_path, step=2, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-2"]


def test_old_checkpoints_are_renamed_before_they_are_deleted(tmp_path, monkeypatch):
    save(tmp_path, step=1)
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        if str(path).endswith(".deleting"):
            raise KeyboardInterrupt  # the run dies halfway through deleting an old checkpoint
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, step=2, keep=1)
    monkeypatch.undo()
    # what was being deleted no longer carries a checkpoint's name; the next run clears it away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1.deleting", "step-2"]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-2"]
    assert checkpoint.remove_leftovers(tmp_path) == ["step-1.deleting"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]


def test_tampered_rng_states_are_reported_as_damage(tmp_path):
    path = save(tmp_path)
    extra = json.loads((path / "extra-rank0.json").read_text())
    (path / "extra-rank0.json").write_text(json.dumps({**extra, "rng": {"python": [3, [1, 2], None], "numpy": []}}))
    model, optimizer = trained(1)
    with pytest.raises(ConfigError, match="extra-rank0.json: RNG states"):
        checkpoint.load(path, model, optimizer, ONE)


def test_a_damaged_checkpoint_gives_one_line(tmp_path):
    path = save(tmp_path)
    shard = next((path / "state").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short, as by a crash without the atomic rename
    model, optimizer = trained(1)
    with pytest.raises(ConfigError) as err:
        checkpoint.load(path, model, optimizer, ONE)
    assert "does not fit this model and optimizer, or is damaged" in str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ launcher watchdog

WORKER = """
import sys, time
sys.path.insert(0, {root!r})
from nanotune import parallel
parallel.exit_when_launcher_dies(on_exit=lambda message: print(message, flush=True), interval_s=0.1)
print("ready", flush=True)
time.sleep(120)
"""

LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=open(sys.argv[2], "w"))
print(worker.pid, flush=True)
time.sleep(120)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped; only its exit code is left
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see whether the worker runs")
def test_a_worker_stops_within_seconds_when_its_launcher_is_killed(tmp_path):
    log = tmp_path / "worker.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER.format(root=str(ROOT)), str(log)],
                                stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        deadline = time.time() + 60
        while "ready" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        assert running(worker)
        launcher.send_signal(signal.SIGKILL)  # no chance to pass anything on to the worker
        launcher.wait()
        deadline = time.time() + 10
        while running(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not running(worker), "the worker kept running after its launcher died"
        assert f"the launcher (pid {launcher.pid}) is gone" in log.read_text()
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)

