"""BatchLoader with prefetch: the same micro-batches in the same order as collating on demand, a position that counts
what the caller took (so a resume lands on the next micro-batch), collation errors raised in the caller's thread, and
no thread left behind (after a pass, `close()`, an error, or a trainer run that fails or is stopped)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import torch

from nanotune import train
from nanotune.packing import PREFETCH_THREAD, BatchLoader
from tests.test_packing import ToyData, lengths
from tests.test_train import losses, metrics, run  # noqa: F401  (run is the trainer fixture)


class RecordingData(ToyData):
    """ToyData that remembers which threads read its examples, and fails on the example numbered `bad`."""

    def __init__(self, *args, bad: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad, self.readers = bad, set()

    def __getitem__(self, i):
        self.readers.add(threading.current_thread().name)
        if i == self.bad:
            raise MalformedExample(f"example {i}: the mask is shorter than the tokens")
        return super().__getitem__(i)


class MalformedExample(ValueError):
    pass


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD]


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def make_loader(data, packing, prefetch, **kw):
    # rank 1 of 2 with 2 micro-batches per step: dealing and filling are exercised too
    return BatchLoader(data, seq_len=256, micro_batch_size=3, packing=packing, seed=3, rank=1, world_size=2,
                       grad_accum_steps=2, prefetch=prefetch, **kw)


def assert_same_batches(got: list[dict], expected: list[dict]):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k


def drive(loader) -> list[dict]:
    """Two epochs the way the trainer and an evaluation use a loader: epoch 0 is started, abandoned after 5
    micro-batches and rewound, then run whole; epoch 1 is taken 4 at a time through one pass."""
    out = []
    loader.set_epoch(0)
    for i, batch in enumerate(loader):
        out.append(batch)
        if i == 4:
            break
    loader.rewind()
    out += list(loader)
    loader.set_epoch(1)
    stream = iter(loader)
    while True:
        step = [b for _, b in zip(range(4), stream)]
        out += step
        if len(step) < 4:
            break
    return out


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_prefetched_stream_is_the_plain_stream_over_two_epochs(packing):
    plain_data, ahead_data = RecordingData(lengths(300)), RecordingData(lengths(300))
    expected = drive(make_loader(plain_data, packing, prefetch=0))
    got = drive(make_loader(ahead_data, packing, prefetch=3))
    assert len(expected) > 2 * 20
    assert_same_batches(got, expected)
    assert plain_data.readers == {threading.main_thread().name}  # collated on demand, in this thread
    assert ahead_data.readers == {PREFETCH_THREAD}  # every example was read on the prefetch thread
    assert not prefetch_threads()  # every pass ended (or was abandoned and collected) and stopped its thread


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_resume_from_a_state_taken_while_batches_are_prefetched(packing):
    data = ToyData(lengths(300))
    reference = make_loader(data, packing, prefetch=0)
    reference.set_epoch(1)
    epoch1 = list(reference)
    reference.set_epoch(2)
    epoch2 = list(reference)

    loader = make_loader(data, packing, prefetch=4)
    collated = []  # micro-batches made, on the prefetch thread
    real_collate = loader.collate
    loader.collate = lambda rows: collated.append(len(rows)) or real_collate(rows)
    loader.set_epoch(1)
    stream = iter(loader)
    taken = [next(stream) for _ in range(5)]
    wait_for(lambda: len(collated) >= 5 + 4)  # four more wait in the queue: the thread is ahead of the caller
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5  # what the caller took, not what was made

    resumed = make_loader(data, packing, prefetch=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what the trainer's stream does first: the same epoch keeps the position
    assert_same_batches(taken + list(resumed), epoch1)
    resumed.set_epoch(2)
    assert_same_batches(list(resumed), epoch2)
    # the first loader goes on from where its caller was, too
    assert_same_batches(taken + list(stream), epoch1)
    assert not prefetch_threads()


def test_a_collation_error_reaches_the_caller_after_the_batches_before_it():
    data = RecordingData(lengths(300), bad=None)
    plain = make_loader(data, packing=True, prefetch=0)
    batches = list(plain)
    bad_batch = 7  # a micro-batch of this rank whose first example will fail
    data.bad = int(plain._plan()[(bad_batch * 2 + 1) * 3][0])
    for prefetch in (0, 3):
        loader = make_loader(data, packing=True, prefetch=prefetch)
        got = []
        with pytest.raises(MalformedExample, match=f"example {data.bad}: the mask is shorter than the tokens"):
            for batch in loader:
                got.append(batch)
        assert_same_batches(got, batches[:bad_batch])
        assert loader.position == bad_batch  # the micro-batches handed out; the failed one was not
        assert not prefetch_threads()


def test_the_thread_is_gone_after_a_pass_close_and_a_failure_in_the_caller():
    data = ToyData(lengths(300))
    loader = make_loader(data, packing=True, prefetch=2)
    stream = iter(loader)
    next(stream)
    assert len(prefetch_threads()) == 1
    list(stream)  # exhausted
    assert not prefetch_threads()

    stream = iter(loader)
    next(stream)
    wait_for(lambda: loader._prefetchers and next(iter(loader._prefetchers))._queue.full())  # blocked on a full queue
    loader.close()
    assert not prefetch_threads()
    assert loader.position == 1
    second = next(stream)  # a closed pass can go on: a new thread from where it was
    assert_same_batches([second], [make_loader(data, packing=True, prefetch=0).collate(loader._plan()[9:12])])
    loader.close()

    def consume():
        for i, _ in enumerate(loader):
            if i == 2:
                raise RuntimeError("the step failed")

    with pytest.raises(RuntimeError, match="the step failed") as failure:
        consume()
    assert failure.value.__traceback__ is not None  # the traceback keeps the suspended pass alive ...
    loader.close()  # ... so the trainer closes its loaders when the run ends
    assert not prefetch_threads()


def test_prefetch_is_checked():
    with pytest.raises(ValueError, match="prefetch = -1"):
        make_loader(ToyData(lengths(30)), packing=True, prefetch=-1)


# ------------------------------------------------------------------------------------------------ in the trainer


def test_resumed_run_with_prefetch_matches_a_plain_run(run):
    """Two micro-batches per step, prefetched, checkpointed at step 3 and resumed with another prefetch depth: the same
    losses and weights as a run that collates on demand (the checkpoint's position counts the batches trained on)."""
    common = ("--train.max_steps=6", "--train.grad_accum_steps=2", "--train.eval_every=3")
    plain = run(*common, "--data.prefetch=0", name="plain")
    resumed = run(*common, "--checkpoint.every=3", "--data.prefetch=3", name="resumed")
    shutil.rmtree(resumed / "step-6")
    run(*common, "--checkpoint.every=3", "--checkpoint.resume=auto", "--data.prefetch=1", name="resumed")
    assert losses(resumed) == losses(plain)  # bit-identical on CPU in fp32
    assert [r["eval_loss"] for r in metrics(resumed) if "eval_loss" in r] == \
        [r["eval_loss"] for r in metrics(plain) if "eval_loss" in r]
    assert not prefetch_threads()


@pytest.mark.parametrize("how", ["error", "sigterm"])
def test_no_prefetch_thread_outlives_a_run_that_fails_or_is_stopped(run, monkeypatch, how):
    """The loop fails at step 3 (the traceback keeps the loop's frame, and with it the suspended stream), or is
    stopped by SIGTERM there (it saves and returns): either way the loaders' threads are gone when main returns."""
    real_lr_at = train.lr_at

    def lr_at(step, *args):
        if step == 2:
            assert prefetch_threads()  # the stream is running ahead
            if how == "error":
                raise RuntimeError("the step failed")
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: finish the step, save, return 0
        return real_lr_at(step, *args)

    monkeypatch.setattr(train, "lr_at", lr_at)
    if how == "error":
        with pytest.raises(RuntimeError, match="the step failed") as failure:
            run("--train.eval_every=1", "--train.grad_accum_steps=2")
        # held as a notebook or a logger holds it: its traceback keeps the loop's suspended stream alive
        assert failure.value.__traceback__ is not None
    else:
        out = run("--train.eval_every=1", "--train.grad_accum_steps=2")
        assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert not prefetch_threads()
