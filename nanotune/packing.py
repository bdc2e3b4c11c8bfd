"""Batches from tokenized examples: multipack bin packing, data-parallel sharding and exact mid-epoch resume.

    loader = BatchLoader(data.train, seq_len=2048, micro_batch_size=2, packing=True, seed=0,
                         rank=rank, world_size=world_size, grad_accum_steps=4, pad_id=tok.pad_id)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...   # input_ids, labels, position_ids, cu_seqlens, max_seqlen, num_trainable_tokens

Packing (multipack): every epoch the examples are shuffled with (seed, epoch), cut into groups of `group_size`
consecutive examples, and each group is packed into rows of `seq_len` tokens by best-fit decreasing (each example,
longest first, goes to the fullest row it still fits in). Packing within groups keeps the epoch in random order
(packing everything at once would put the long examples first) and still fills rows to ~99%. The rows of all groups
are shuffled again, then dealt out: micro-batch k of rank r holds rows [(k*W + r)*B, (k*W + r + 1)*B). So optimizer
step s (A micro-batches per rank) trains on rows [s*G, (s+1)*G) of the plan, G = B*W*A rows, however B, W and A split
G. When the rows do not divide into G, the first rows of the epoch are repeated to fill the last step
(`fill="repeat"`) or empty rows are added (`fill="empty"`, all labels -100), so every rank runs the same number of
steps and every epoch is a whole number of optimizer steps.

Resume on another layout: the position is saved as rows of the plan consumed by all ranks together (`rows`), and a
loader with another B*W (the same G) continues from row `rows`: the plan depends only on the seed, the data and G.

LABELS ARE PRE-SHIFTED: `labels[b, t]` is the target for the logits at position t, i.e. `input_ids[b, t + 1]` where
that token is trained, else -100. The last token of every document has label -100, so no position is ever trained
to predict the first token of the next document packed behind it; padding is -100 too. The loss is then plain
`cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)` with no shift.

Prefetch (`prefetch=N`): a background thread collates the next N micro-batches of the epoch while the training step
runs, and pins them (page-locked host memory, `pin_device`) so that the copies to the GPU can be queued with
`non_blocking=True`. The batches and their order are the same as without it; the thread only collates, so
`position` (and the state a checkpoint saves) counts the micro-batches handed to the caller, not those prepared
ahead. An error while collating (a malformed example) is raised in the caller's thread, at the micro-batch it
belongs to. `close()` stops the thread (a pass that ends, or is abandoned, stops its own).

Unpacked mode (`packing=False`, for comparison): one example per row, padded to the longest example of the
micro-batch (not to seq_len), in shuffled order.

Batch (B rows, T columns; T = seq_len when packing):
    input_ids     (B, T) int64    pad_id in padding slots
    labels        (B, T) int64    pre-shifted targets, -100 = not trained
    position_ids  (B, T) int64    0, 1, 2, ... restarting at every document; a padding run is its own segment
    cu_seqlens    (S + 1,) int32  segment boundaries over the flattened B*T tokens (documents and padding runs)
    max_seqlen    int             longest segment
    num_trainable_tokens int      labels != -100 in this micro-batch
    num_tokens    int             real (not padding) tokens in this micro-batch
    attention_mask (B, T) bool    False in padding slots (HF's meaning; attention itself uses the segments above)
    packed        bool            rows may hold several documents (the loader's `packing`): the model needs to look
                                  at no tensor to know, so a compiled forward has no data-dependent branch. Unpacked
                                  rows hold one example followed by padding, which plain causal attention handles.
"""

from __future__ import annotations

import bisect
import queue
import threading

import numpy as np
import torch

IGNORE_INDEX = -100
PREFETCH_THREAD = "nanotune-prefetch"  # the name of the loader's background thread


def pack_group(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: bins (lists of positions into `lengths`) whose lengths sum to <= capacity."""
    free: list[tuple[int, int]] = []  # (free slots, bin number), sorted
    bins: list[list[int]] = []
    for j in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[j])
        k = bisect.bisect_left(free, (n, -1))  # the fullest bin with room for n
        if k == len(free):
            bins.append([j])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(j)
            bisect.insort(free, (room - n, b))
    return bins


def pack(lengths: np.ndarray, capacity: int, order: np.ndarray, group_size: int) -> list[list[int]]:
    """Pack examples (indices into `lengths`) group by group, in the given order. Returns rows of example indices."""
    rows = []
    for s in range(0, len(order), group_size):
        group = order[s : s + group_size]
        rows.extend([group[j] for j in b] for b in pack_group(lengths[group], capacity))
    return rows


def packing_efficiency(lengths: np.ndarray, seq_len: int, seed: int = 0, group_size: int = 4096) -> float:
    """Real tokens / token slots of one epoch's packed rows."""
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))
    rows = pack(np.asarray(lengths), seq_len, order, group_size)
    return float(np.sum(lengths) / max(len(rows) * seq_len, 1))


class BatchLoader:
    def __init__(self, dataset, seq_len: int, micro_batch_size: int, packing: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0, shuffle: bool = True, group_size: int = 4096,
                 fill: str = "repeat", grad_accum_steps: int = 1, prefetch: int = 0,
                 pin_device: torch.device | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch = {prefetch}; use 0 (collate when asked) or more micro-batches ahead")
        if fill not in ("repeat", "empty"):
            raise ValueError(f"fill = {fill!r}; choose repeat or empty")
        self.dataset = dataset  # needs .lengths (N,) and dataset[i] -> (input_ids, mask) arrays
        self.lengths = np.asarray(dataset.lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("the data set has no examples")
        if self.lengths.max() > seq_len:
            raise ValueError(f"an example has {self.lengths.max()} tokens, more than seq_len {seq_len}; prepare the "
                             "data with the same seq_len as the loader")
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.group_size, self.fill = group_size, fill
        # rows of one optimizer step over all ranks (G): the plan is padded to a multiple of it
        self.rows_per_step = micro_batch_size * world_size * grad_accum_steps
        self.epoch, self.position = 0, 0  # position: micro-batches of this epoch already yielded
        self._plan_epoch = None
        self._rows: list[list[int]] = []
        self.efficiency = 0.0  # real tokens / slots of this epoch's rows (before filling)
        self.prefetch = prefetch  # micro-batches collated ahead on a background thread (0: when the caller asks)
        if pin_device is not None and pin_device.index is None:  # the thread must pin for this process's GPU
            pin_device = torch.device(pin_device.type, torch.cuda.current_device())
        self.pin_device = pin_device  # a CUDA device: batches come in pinned memory, for non-blocking copies to it
        self._prefetchers: set[Prefetcher] = set()  # running ones, for close()

    # ---------------------------------------------------------------------------------------------- the plan

    def _plan(self) -> list[list[int]]:
        """This epoch's rows (lists of example indices), identical on every rank, padded to a multiple of G = B*W*A."""
        if self._plan_epoch == self.epoch:
            return self._rows
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.packing:
            rows = pack(self.lengths, self.seq_len, order, self.group_size)
            if self.shuffle:  # best-fit emits each group's rows longest-first; undo that order
                rows = [rows[i] for i in rng.permutation(len(rows))]
            self.efficiency = float(self.lengths.sum() / (len(rows) * self.seq_len))
        else:
            rows = [[int(i)] for i in order]
        missing = -len(rows) % self.rows_per_step
        if self.fill == "repeat":
            rows = rows + [rows[i % len(rows)] for i in range(missing)]
        else:
            rows = rows + [[] for _ in range(missing)]
        self._rows, self._plan_epoch = rows, self.epoch
        return rows

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank (the same on every rank). With packing it can differ by a few
        between epochs, because each epoch packs a different shuffle."""
        return len(self._plan()) // (self.micro_batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`. The same epoch again keeps the position, so a resumed run continues mid-epoch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def rewind(self) -> None:
        """Start this epoch from its first micro-batch again (e.g. before an evaluation that stops early: an
        abandoned pass leaves the position where it stopped, as a checkpoint needs)."""
        self.position = 0

    def state_dict(self) -> dict:
        """The position as rows of this epoch's plan consumed by all ranks together (`rows`), which another layout
        with the same rows per step can continue from; `position` (micro-batches per rank) says the same for this one."""
        return {"epoch": self.epoch, "position": self.position, "rows": self.position * self.micro_batch_size *
                self.world_size, "rows_per_step": self.rows_per_step, "seed": self.seed,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved row of the saved epoch, on this loader's B and W. The plan must be the same: same
        seed and same rows per optimizer step (B*W*A), and the rows consumed must be whole micro-batches here."""
        if state["seed"] != self.seed:
            raise ValueError(f"cannot resume: the saved loader had seed={state['seed']}, this one has {self.seed}; "
                             "the batches would differ")
        # a state saved before `rows` and `rows_per_step` were: its rows from its position, its plan taken as this one's
        rows_per_step = state.get("rows_per_step", self.rows_per_step)
        if rows_per_step != self.rows_per_step:
            raise ValueError(f"cannot resume: the saved loader took {rows_per_step} rows per optimizer step "
                             f"(micro_batch_size x data-parallel processes x grad_accum_steps), this one takes "
                             f"{self.rows_per_step}; the epoch would be planned differently")
        rows = state.get("rows", int(state["position"]) * state["micro_batch_size"] * state["world_size"])
        per_round = self.micro_batch_size * self.world_size  # rows of one micro-batch on every rank
        if rows % per_round:
            raise ValueError(f"cannot resume: {rows} rows of the epoch were consumed, not a multiple of the {per_round} "
                             "rows (micro_batch_size x data-parallel processes) of one micro-batch on every rank")
        self.epoch, self.position = int(state["epoch"]), rows // per_round

    def __iter__(self):
        rows = self._plan()
        B, W = self.micro_batch_size, self.world_size
        num_steps = len(rows) // (B * W)

        def micro_batch(k: int) -> dict:  # micro-batch k of this rank (run on the prefetch thread when there is one)
            first = (k * W + self.rank) * B
            return pin(self.collate(rows[first : first + B]), self.pin_device)

        ahead = None
        try:
            while self.position < num_steps:
                k = self.position
                if not self.prefetch:
                    batch = micro_batch(k)
                else:
                    if ahead is None or ahead.closed or ahead.next_position != k:  # the first, or moved / closed
                        if ahead is not None:
                            self._stop(ahead)
                        ahead = Prefetcher(micro_batch, k, num_steps, self.prefetch, self.pin_device)
                        self._prefetchers.add(ahead)
                    batch = ahead.get()
                self.position += 1  # counted before yielding: a checkpoint taken after this step resumes at the next
                yield batch
        finally:  # the epoch is done, or the pass was abandoned (closed, collected) or failed
            if ahead is not None:
                self._stop(ahead)
        self.position = 0  # a finished epoch: iterating again replays it unless set_epoch moves on

    def _stop(self, prefetcher: Prefetcher) -> None:
        prefetcher.close()
        self._prefetchers.discard(prefetcher)

    def close(self) -> None:
        """Stop the prefetch thread of any pass in progress (the position stays; a pass resumed later starts a new
        one). For the end of a run, however it ends: a pass left suspended keeps its thread until it is collected."""
        for prefetcher in list(self._prefetchers):
            self._stop(prefetcher)

    # ---------------------------------------------------------------------------------------------- tensors

    def collate(self, rows: list[list[int]]) -> dict:
        if self.packing:
            T = self.seq_len
        else:
            T = max([int(self.lengths[r[0]]) for r in rows if r] + [1])
        B = len(rows)
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((B, T), dtype=np.int64)
        real = np.zeros((B, T), dtype=bool)  # False in padding slots
        seqlens = []  # segment lengths in order over the flattened (B*T,) tokens
        for b, row in enumerate(rows):
            o = 0
            for i in row:
                ids, mask = self.dataset[int(i)]
                n = len(ids)
                input_ids[b, o : o + n] = ids
                # (n-1,) pre-shifted: the logits at t are trained on ids[t+1] when that token is a target
                labels[b, o : o + n - 1] = np.where(mask[1:] != 0, ids[1:], IGNORE_INDEX)
                position_ids[b, o : o + n] = np.arange(n)
                real[b, o : o + n] = True
                seqlens.append(n)
                o += n
            if o < T:  # the padding run: its own segment, never trained
                position_ids[b, o:] = np.arange(T - o)
                seqlens.append(T - o)
        cu_seqlens = np.zeros(len(seqlens) + 1, dtype=np.int32)
        cu_seqlens[1:] = np.cumsum(seqlens)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(max(seqlens)),
            "num_trainable_tokens": int((labels != IGNORE_INDEX).sum()),
            "num_tokens": int(real.sum()),  # real (not padding) tokens, counted here on the host for tokens/s
            "attention_mask": torch.from_numpy(real),
            "packed": self.packing,
        }


def pin(batch: dict, device: torch.device | None) -> dict:
    """The batch's tensors in pinned (page-locked) host memory when `device` is a CUDA device: a copy from there can
    be queued without waiting (from pageable memory the copy waits for the device's queued work first)."""
    if device is None:
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Prefetcher:
    """Micro-batches start, start + 1, ..., stop - 1 of one pass, made by `make(k)` on a background thread and
    handed out in order by `get()`, at most `size` of them waiting. An exception in `make` is raised by `get()` in
    the caller's thread, after the batches before it."""

    def __init__(self, make, start: int, stop: int, size: int, pin_device: torch.device | None):
        self.next_position, self.closed = start, False  # the micro-batch that get() returns next
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(make, start, stop, pin_device), name=PREFETCH_THREAD,
                                        daemon=True)  # never holds up the interpreter's exit
        self._thread.start()

    def _work(self, make, start: int, stop: int, pin_device: torch.device | None) -> None:
        try:
            if pin_device is not None:  # else pinning from this thread would open a CUDA context on GPU 0
                torch.cuda.set_device(pin_device)
            for k in range(start, stop):
                if self._stopping.is_set():
                    return
                self._queue.put((make(k), None))
        except BaseException as e:  # noqa: BLE001 (raised again by get(), in the caller's thread)
            self._queue.put((None, e))

    def get(self) -> dict:
        batch, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        self.next_position += 1
        return batch

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the micro-batch it is making)."""
        if self.closed:
            return
        self.closed = True
        self._stopping.set()
        while True:  # empty the queue: a thread blocked on a full one gets its place, then sees the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
