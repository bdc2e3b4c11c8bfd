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
from nanotune.parallel import DistInfo
from tests.conftest import ROOT

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
    assert checkpoint.read_info(path) == {"format": 1, "step": 1, "world_size": 1, "config": "seed = 0\n"}


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


def test_a_resume_on_another_number_of_processes_is_refused():
    info = {"format": 1, "step": 4, "world_size": 2, "config": ""}
    checkpoint.check_world_size(info, "step-4", 2)
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) but this run has 1; resume with "
                                          r"--nproc_per_node=2"):
        checkpoint.check_world_size(info, "step-4", 1)


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

