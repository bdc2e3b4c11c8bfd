"""Tokenized examples: rows -> (token ids, target mask) in flat arrays, and the on-disk cache of those arrays.

One data set is stored as flat arrays (a "part"): all token ids back to back, the target mask beside them, and per
example its length, the row it came from and its number of targets. A `TokenizedDataset` is a list of parts and
an index of (part, example) pairs, so splitting off an eval set, mixing data sets or repeating one costs an index
array and never a copy of the tokens.
Cached parts are opened as numpy memmaps: a second run, and every data-parallel process, reads them from disk.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nanotune.data.formats import (
    KNOWN_ROLES,
    MaskOptions,
    MissingFieldError,
    RowError,
    chat_messages,
    guess_format,
    render_chat,
    render_plain,
    role_map_of,
    token_ranges,
)
from nanotune.data.sources import parse_record
from nanotune.data.template import ChatTemplate
from nanotune.data.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------- rows -> tokens


@dataclass
class Chunk:
    """The tokenized examples of a run of consecutive rows, with what happened to the rows."""

    input_ids: np.ndarray  # (N_tokens,) int32, examples back to back
    mask: np.ndarray  # (N_tokens,) uint8, 1 = this token is a training target
    lengths: np.ndarray  # (N_examples,) int32
    row_ids: np.ndarray  # (N_examples,) int64, the row each example came from (a split `text` row gives several)
    trainable: np.ndarray = None  # (N_examples,) int64, targets per example
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    truncated_rows: int = 0
    split_rows: int = 0


class RowProcessor:
    """Render, tokenize and mask rows of one data set. Built once per worker process."""

    def __init__(self, tok_state: tuple, template_source: str | None, ds, opts: MaskOptions, seq_len: int,
                 too_long: str, text_too_long: str, template_name: str = "the chat template",
                 key: str = "the data set"):
        self.tok = Tokenizer.from_state(tok_state)
        self.template = None
        if template_source is not None:
            self.template = ChatTemplate(template_source, self.tok.special_tokens_map(), self.tok.special_tokens,
                                         name=template_name)
        self.ds, self.opts, self.seq_len = ds, opts, seq_len
        self.key = key  # the data set's place in the config, e.g. "data.datasets[0]", for errors
        self.too_long, self.text_too_long = too_long, text_too_long
        self.known_roles = set(KNOWN_ROLES) | set(opts.roles_to_train)
        self.known_roles |= set(ds.role_map.values()) | set(ds.fields_to_roles.values())
        self.role_map = role_map_of(ds)

    def render(self, where: str, raw):
        row = parse_record(where, raw)
        try:
            if self.ds.format == "chat":
                messages = chat_messages(row, self.ds, where, self.known_roles, self.role_map)
                return render_chat(messages, self.template, self.opts, where)
            return render_plain(row, self.ds, self.opts, where)
        except MissingFieldError as e:
            raise self.wrong_format(row, where) or e from None

    def wrong_format(self, row: dict, where: str) -> RowError | None:
        """A row that lacks a field of its format but has the fields of another: name that format and the key."""
        guess = guess_format(row)
        if guess is None or guess[0] == self.ds.format or self.ds.fields_to_roles:
            return None
        fmt, fields = guess
        return RowError(
            f"{where}: the rows look like format = \"{fmt}\" (fields {', '.join(fields)}), but {self.key}.format = "
            f"\"{self.ds.format}\"; set {self.key}.format = \"{fmt}\" (see docs/data.md for the formats)"
        )

    def __call__(self, records: list) -> Chunk:
        """records: (where, row id, row) triples, the row a dict or a raw JSON line."""
        rendered = [self.render(where, raw) for where, _, raw in records]
        encodings = self.tok.encode_batch([r.text for r in rendered])
        chunk = Chunk(None, None, None, None, rows=len(records))
        # Token ids stay Python lists and masks stay [start, end) ranges until the whole chunk is done: one
        # conversion to arrays per chunk costs a fraction of one per row.
        id_lists, ranges_out, lengths, row_ids, trainable = [], [], [], [], []
        bos, eos = self.tok.bos_id, self.tok.eos_id
        offset = 0
        for (_, row_id, _), r, enc in zip(records, rendered, encodings):
            if not r.text.strip():
                chunk.dropped["empty"] += 1
                continue
            ids = enc.ids
            ranges = token_ranges(enc, r.spans)
            if r.add_bos and bos is not None:
                ids = [bos] + ids
                ranges = [(a + 1, b + 1) for a, b in ranges]
            if r.eos_trained is not None and eos is not None:
                ids = ids + [eos]
                if r.eos_trained:
                    ranges.append((len(ids) - 1, len(ids)))
            if not r.has_trained_turn:
                chunk.dropped["no_turn_to_train"] += 1  # e.g. a conversation without an assistant turn
                continue
            fitted = self.fit(ids, ranges, chunk)  # [] when dropped as too long (counted there)
            pieces = [(i, rs) for i, rs in fitted if rs]  # a window without targets carries no signal
            if fitted and not pieces:
                chunk.dropped["no_trainable_tokens"] += 1
            for ids_k, ranges_k in pieces:
                id_lists.append(ids_k)
                ranges_out += [(offset + a, offset + b) for a, b in ranges_k]
                offset += len(ids_k)
                lengths.append(len(ids_k))
                row_ids.append(row_id)
                trainable.append(sum(b - a for a, b in ranges_k))
        chunk.input_ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=offset)
        chunk.mask = np.zeros(offset, dtype=np.uint8)
        for a, b in ranges_out:
            chunk.mask[a:b] = 1
        chunk.lengths = np.asarray(lengths, dtype=np.int32)
        chunk.row_ids = np.asarray(row_ids, dtype=np.int64)
        chunk.trainable = np.asarray(trainable, dtype=np.int64)
        return chunk

    def fit(self, ids: list[int], ranges: list, chunk: Chunk) -> list:
        """The example(s) a row becomes under seq_len: itself, truncated, split into windows, or none (dropped).
        Each is (ids, target ranges); the first token of an example is never a target."""
        S = self.seq_len
        if len(ids) <= S:
            return [(ids, clip(ranges, 1, len(ids)))]
        policy = self.text_too_long if self.ds.format == "text" else self.too_long
        if policy == "drop":
            chunk.dropped["too_long"] += 1
            return []
        if policy == "truncate":
            chunk.truncated_rows += 1
            return [(ids[:S], clip(ranges, 1, S))]
        chunk.split_rows += 1  # split: consecutive windows of seq_len tokens
        return [(ids[s : s + S], [(a - s, b - s) for a, b in clip(ranges, s + 1, s + S)])
                for s in range(0, len(ids), S)]


def clip(ranges: list, lo: int, hi: int) -> list:
    """The parts of token ranges inside [lo, hi), sorted, overlaps merged, empty ones left out."""
    out = []
    for a, b in sorted(ranges):
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        if out and a <= out[-1][1]:  # a token shared by a content and its end-of-turn range counts once
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------- the data set


@dataclass
class Part:
    input_ids: np.ndarray  # (N_tokens,) int32
    mask: np.ndarray  # (N_tokens,) uint8
    starts: np.ndarray  # (N_examples,) int64
    lengths: np.ndarray  # (N_examples,) int32
    row_ids: np.ndarray  # (N_examples,) int64
    trainable: np.ndarray  # (N_examples,) int64, targets per example

    @classmethod
    def from_chunks(cls, chunks: list[Chunk]) -> "Part":
        ids = np.concatenate([c.input_ids for c in chunks]) if chunks else np.zeros(0, np.int32)
        mask = np.concatenate([c.mask for c in chunks]) if chunks else np.zeros(0, np.uint8)
        lengths = np.concatenate([c.lengths for c in chunks]) if chunks else np.zeros(0, np.int32)
        row_ids = np.concatenate([c.row_ids for c in chunks]) if chunks else np.zeros(0, np.int64)
        trainable = np.concatenate([c.trainable for c in chunks]) if chunks else np.zeros(0, np.int64)
        return cls.from_arrays(ids, mask, lengths, row_ids, trainable)

    @classmethod
    def from_arrays(cls, ids, mask, lengths, row_ids, trainable=None) -> "Part":
        starts = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            starts[1:] = np.cumsum(lengths[:-1], dtype=np.int64)
        if trainable is None:  # stored in the cache, so that opening a large cache never reads every mask byte
            cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
            trainable = cum[starts + lengths] - cum[starts]
        return cls(ids, mask, starts, lengths, row_ids, trainable)


class TokenizedDataset:
    """Examples as (input_ids, mask) numpy pairs. `lengths` is what the packer needs; `dataset[i]` gives one."""

    def __init__(self, parts: list[Part], index: np.ndarray | None = None):
        self.parts = parts
        if index is None:  # (N, 2): part number, example number in that part
            index = np.concatenate(
                [np.stack([np.full(len(p.lengths), k), np.arange(len(p.lengths))], 1) for k, p in enumerate(parts)]
            ) if parts else np.zeros((0, 2), np.int64)
        self.index = index.astype(np.int64).reshape(-1, 2)
        self.lengths = self._gather("lengths").astype(np.int64)  # (N,)
        self.trainable = self._gather("trainable")  # (N,)

    def _gather(self, name: str) -> np.ndarray:
        out = np.zeros(len(self.index), dtype=np.int64)
        for k, p in enumerate(self.parts):
            sel = self.index[:, 0] == k
            out[sel] = getattr(p, name)[self.index[sel, 1]]
        return out

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        k, j = self.index[i]
        p = self.parts[k]
        s, n = p.starts[j], p.lengths[j]
        return np.asarray(p.input_ids[s : s + n]), np.asarray(p.mask[s : s + n])

    def subset(self, positions: np.ndarray) -> "TokenizedDataset":
        return TokenizedDataset(self.parts, self.index[np.asarray(positions, dtype=np.int64)])

    def row_ids(self) -> np.ndarray:
        return self._gather("row_ids")

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_trainable_tokens(self) -> int:
        return int(self.trainable.sum())

    @staticmethod
    def concat(datasets: list["TokenizedDataset"]) -> "TokenizedDataset":
        parts, index = [], []
        for d in datasets:
            index.append(d.index + np.array([len(parts), 0]))
            parts.extend(d.parts)
        return TokenizedDataset(parts, np.concatenate(index) if index else None)


# ---------------------------------------------------------------------------------------------- the cache

ARRAYS = ("input_ids", "mask", "lengths", "row_ids", "trainable")


def save_part(folder: Path, part: Part, meta: dict) -> None:
    """Write a part and its statistics atomically (a temp folder renamed), so a crash never leaves half a cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(part, name))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists() and load_part(folder) is None:  # an incomplete entry from an older version
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
    finally:  # another process may have written the same entry first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def load_part(folder: Path) -> tuple[Part, dict] | None:
    """A cached part, or None when there is none (or an incomplete one: it is then tokenized again)."""
    if not (folder / "meta.json").is_file() or not all((folder / f"{n}.npy").is_file() for n in ARRAYS):
        return None
    arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS]
    meta = json.loads((folder / "meta.json").read_text())
    return Part.from_arrays(*arrays), meta
