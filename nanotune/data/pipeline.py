"""prepare_data: every data set of the config -> tokenized train (and eval) examples, through the cache.

    data = prepare_data(cfg.data, tok, seed=cfg.seed)
    data.train, data.eval, data.stats

For each data set: find its files -> hash them with the tokenizer, template and options -> reuse the cached arrays
or read, render, tokenize and mask the rows (in worker processes when `num_workers` > 0) and cache them. Then the
eval split is taken (whole rows, so pieces of one split document never land on both sides) and the mixing weights
are applied to the training examples. Every row read is either an example or counted under a drop reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanotune.config import relative_note
from nanotune.data.examples import Part, RowProcessor, TokenizedDataset, load_part, save_part
from nanotune.data.formats import FORMATS, MaskOptions
from nanotune.data.sources import (
    check_not_empty,
    file_digest,
    jsonl_ranges,
    read_jsonl_range,
    read_records,
    resolve_files,
)
from nanotune.data.tokenizer import Tokenizer

CACHE_VERSION = 3  # bump when the arrays a given input produces, or their files, change
ROWS_PER_CHUNK = 512  # rows per task sent to a worker


class DataError(ValueError):
    """A problem with the data or the data options, with the fix."""


@dataclass
class PreparedData:
    train: TokenizedDataset
    eval: TokenizedDataset | None
    stats: dict  # rows, dropped_rows, dropped (by reason), tokens, trainable_tokens, ... (see `prepare_data`)


def check_options(cfg) -> None:
    choices = {"train_on_eos": ("turn", "last", "all", "none"), "too_long": ("drop", "truncate"),
               "text_too_long": ("split", "truncate", "drop")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise DataError(f"data.{name} = {getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")
    if cfg.seq_len < 2:
        raise DataError(f"data.seq_len = {cfg.seq_len}; it must be at least 2")
    if not cfg.datasets:
        raise DataError("no training data: add a [[data.datasets]] table with a path (see docs/data.md)")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction = {cfg.eval_fraction}; it must be in [0, 1)")
    for kind, items in (("datasets", cfg.datasets), ("eval_datasets", cfg.eval_datasets)):
        for i, ds in enumerate(items):
            if ds.format not in FORMATS:
                raise DataError(f"data.{kind}[{i}].format = {ds.format!r}; choose one of {', '.join(FORMATS)}")
            if ds.weight < 0:
                raise DataError(f"data.{kind}[{i}].weight = {ds.weight}; it must be >= 0")


def chat_template_source(cfg, tok: Tokenizer) -> tuple[str | None, str]:
    """The Jinja source of the chat template and a name for it in errors (its file, or the tokenizer's folder)."""
    if cfg.chat_template:
        path = Path(cfg.chat_template)
        if not path.is_file():
            raise DataError(f"data.chat_template = {cfg.chat_template!r} does not exist{relative_note(path)}")
        return path.read_text(), f"the chat template {path}"
    name = f"the chat template of the tokenizer at {tok.source}"
    if any(ds.format == "chat" for ds in list(cfg.datasets) + list(cfg.eval_datasets)):
        if not tok.chat_template:
            raise DataError(
                f"the tokenizer at {tok.source} has no chat_template and a data set has format = \"chat\"; "
                "set data.chat_template to a Jinja template file (e.g. one from the model's HF repo)"
            )
        return tok.chat_template, name
    return None, name


def cache_key(ds, files: list[Path], tok: Tokenizer, template: str | None, opts: MaskOptions, cfg) -> str:
    options = {k: v for k, v in dataclasses.asdict(ds).items() if k != "weight"}
    blob = {
        "version": CACHE_VERSION,
        "files": [(p.name, file_digest(p)) for p in files],
        "tokenizer": tok.fingerprint(),
        "template": template if ds.format == "chat" else None,
        "dataset": options,
        "mask": dataclasses.asdict(opts),
        "seq_len": cfg.seq_len,
        "too_long": cfg.too_long,
        "text_too_long": cfg.text_too_long,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()


# -------------------------------------------------------------------------------------------- worker processes

_processor: RowProcessor | None = None


def _init_worker(args: tuple) -> None:
    global _processor
    # one worker = one core: the tokenizer's own thread pool would oversubscribe the cores the workers share
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _processor = RowProcessor(*args)


def _work(task: tuple):
    if task[0] == "jsonl":  # a byte range of a JSONL file: the worker reads it itself
        return _processor(read_jsonl_range(*task[1:]))
    return _processor(task[1])


def chunked(records, size: int):
    batch = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def worker_tasks(files: list[Path]):
    for k, p in enumerate(files):
        if p.suffix == ".jsonl":
            for start, end, first_line in jsonl_ranges(p, ROWS_PER_CHUNK):
                yield "jsonl", p, start, end, first_line, k
        else:
            for records in chunked(read_records(p, k), ROWS_PER_CHUNK):
                yield "records", records


class Progress:
    """Rows done, rows/s and an ETA on stderr, at most once a second, for inputs that take a while."""

    def __init__(self, name: str, total: int | None, quiet: bool):
        self.name, self.total, self.quiet = name, total, quiet
        self.start = self.last = time.perf_counter()
        self.printed = False

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.quiet or (not final and now - self.last < 1.0) or (final and not self.printed):
            return
        self.last, self.printed = now, True
        rate = done / max(now - self.start, 1e-9)
        eta = f", ETA {(self.total - done) / rate:.0f}s" if self.total and rate > 0 and not final else ""
        total = f"/{self.total}" if self.total else ""
        print(f"  {self.name}: {done}{total} rows, {rate:,.0f} rows/s{eta}", file=sys.stderr, flush=True)


def count_rows(files: list[Path]) -> int | None:
    total = 0
    for p in files:
        if p.suffix != ".jsonl":
            return None
        with open(p, "rb") as f:
            total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
    return total


def tokenize_files(files: list[Path], processor_args: tuple, num_workers: int, name: str, quiet: bool):
    """Read, render, tokenize and mask all rows of the files; returns (Part, meta)."""
    progress = Progress(name, count_rows(files), quiet)
    chunks, rows = [], 0
    if num_workers > 0:
        # spawn, not fork: the caller may hold CUDA or tokenizer threads that a forked child must not inherit
        with mp.get_context("spawn").Pool(num_workers, initializer=_init_worker, initargs=(processor_args,)) as pool:
            for chunk in pool.imap(_work, worker_tasks(files), chunksize=1):
                chunks.append(chunk)
                rows += chunk.rows
                progress.update(rows)
    else:
        processor = RowProcessor(*processor_args)
        records = (rec for k, p in enumerate(files) for rec in read_records(p, k))
        for records_k in chunked(records, ROWS_PER_CHUNK):
            chunk = processor(records_k)
            chunks.append(chunk)
            rows += chunk.rows
            progress.update(rows)
    progress.update(rows, final=True)
    dropped = Counter()
    for c in chunks:
        dropped.update(c.dropped)
    meta = {
        "rows": rows,
        "dropped": dict(dropped),
        "truncated_rows": sum(c.truncated_rows for c in chunks),
        "split_rows": sum(c.split_rows for c in chunks),
        "files": [str(p) for p in files],
    }
    return Part.from_chunks(chunks), meta


def load_dataset(ds, key: str, tok, template, template_name, opts, cfg, quiet: bool, use_cache: bool = True):
    """One data set (named by `key` in errors, e.g. "data.datasets[0]") -> (TokenizedDataset, meta), through the
    cache."""
    files = resolve_files(ds, key)
    for path in files:
        check_not_empty(path)
    digest = cache_key(ds, files, tok, template, opts, cfg)
    folder = Path(cfg.cache_dir) / digest[:24]
    cached = load_part(folder) if use_cache and cfg.cache_dir else None
    if cached is not None:
        part, meta = cached
        meta = {**meta, "cache": "hit"}
    else:
        args = (tok.to_state(), template if ds.format == "chat" else None, ds, opts, cfg.seq_len, cfg.too_long,
                cfg.text_too_long, template_name, key)
        part, meta = tokenize_files(files, args, cfg.num_workers, ds.path, quiet)
        if use_cache and cfg.cache_dir:
            save_part(folder, part, meta)
        meta = {**meta, "cache": "miss"}
    meta["cache_dir"] = str(folder)
    return TokenizedDataset([part]), meta


# -------------------------------------------------------------------------------------------- prepare_data


def prepare_data(cfg, tok: Tokenizer, seed: int = 0, quiet: bool = False, use_cache: bool = True) -> PreparedData:
    """Tokenized train/eval examples and statistics for a `DataConfig` (see docs/data.md)."""
    check_options(cfg)
    template, template_name = chat_template_source(cfg, tok)
    opts = MaskOptions(tuple(cfg.roles_to_train), cfg.train_on_inputs, cfg.train_on_eos)
    rng = np.random.default_rng(seed)

    train_sets, eval_sets, per_dataset = [], [], []
    for i, ds in enumerate(cfg.datasets):
        data, meta = load_dataset(ds, f"data.datasets[{i}]", tok, template, template_name, opts, cfg, quiet, use_cache)
        held_out = None
        if not cfg.eval_datasets and cfg.eval_fraction > 0:
            data, held_out = split_rows(data, cfg.eval_fraction, rng)
            eval_sets.append(held_out)
        used = apply_weight(data, ds.weight, rng)
        train_sets.append(used)
        per_dataset.append({"path": ds.path, "format": ds.format, **summary(meta), "examples": len(used),
                            "eval_examples": len(held_out) if held_out is not None else 0, "cache": meta["cache"]})
    eval_meta = []
    for i, ds in enumerate(cfg.eval_datasets):
        data, meta = load_dataset(ds, f"data.eval_datasets[{i}]", tok, template, template_name, opts, cfg, quiet,
                                  use_cache)
        eval_sets.append(data)
        eval_meta.append(summary(meta))

    train = TokenizedDataset.concat(train_sets)
    evaluation = TokenizedDataset.concat(eval_sets) if eval_sets else None
    if evaluation is not None and len(evaluation) == 0:  # e.g. eval_fraction of a one-row data set
        evaluation = None
    stats = combine(per_dataset)
    stats.update(examples=len(train), tokens=train.num_tokens, trainable_tokens=train.num_trainable_tokens)
    if evaluation is not None:
        stats.update(eval_examples=len(evaluation), eval_tokens=evaluation.num_tokens,
                     eval_trainable_tokens=evaluation.num_trainable_tokens)
    if eval_meta:
        stats["eval_rows"] = sum(m["rows"] for m in eval_meta)
        stats["eval_dropped_rows"] = sum(m["dropped_rows"] for m in eval_meta)
        stats["eval_dropped"] = combine(eval_meta)["dropped"]
    stats["datasets"] = per_dataset
    if len(train) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats["dropped"].items()) or "none"
        raise DataError(
            f"no training examples left: {stats['rows']} rows read, {stats['dropped_rows']} dropped ({reasons}); "
            f"check seq_len ({cfg.seq_len}), too_long, roles_to_train and the data set weights"
        )
    return PreparedData(train, evaluation, stats)


def describe_rows(stats: dict) -> str:
    """The rows read and dropped, by reason, for the trainer's data line: "1000 rows, 3 dropped (too_long: 2,
    no_turn_to_train: 1)"; eval rows likewise when eval files were given."""
    def part(rows: int, dropped: dict, what: str) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        return f"{rows} {what}rows, {sum(dropped.values())} dropped" + (f" ({reasons})" if reasons else "")

    text = part(stats["rows"], stats["dropped"], "")
    if "eval_rows" in stats:
        text += "; " + part(stats["eval_rows"], stats["eval_dropped"], "eval ")
    return text


def summary(meta: dict) -> dict:
    return {"rows": meta["rows"], "dropped_rows": sum(meta["dropped"].values()), "dropped": meta["dropped"],
            "truncated_rows": meta["truncated_rows"], "split_rows": meta["split_rows"]}


def combine(per_dataset: list[dict]) -> dict:
    dropped = Counter()
    for d in per_dataset:
        dropped.update(d["dropped"])
    return {
        "rows": sum(d["rows"] for d in per_dataset),
        "dropped_rows": sum(dropped.values()),
        "dropped": dict(dropped),
        "truncated_rows": sum(d["truncated_rows"] for d in per_dataset),
        "split_rows": sum(d["split_rows"] for d in per_dataset),
    }


def split_rows(data: TokenizedDataset, fraction: float, rng) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Hold out `fraction` of the rows (all examples of a held-out row go to eval)."""
    row_ids = data.row_ids()
    rows = np.unique(row_ids)
    num_eval = int(round(len(rows) * fraction))
    if num_eval == 0 and fraction > 0 and len(rows) > 1:
        num_eval = 1
    held = rng.choice(rows, size=num_eval, replace=False) if num_eval else np.zeros(0, np.int64)
    is_eval = np.isin(row_ids, held)
    return data.subset(np.flatnonzero(~is_eval)), data.subset(np.flatnonzero(is_eval))


def apply_weight(data: TokenizedDataset, weight: float, rng) -> TokenizedDataset:
    """weight 1: every example once; 2.5: twice, plus a random half of them once more; 0.3: a random 30%."""
    if weight == 1.0:
        return data
    n = len(data)
    whole, frac = int(weight), weight - int(weight)
    positions = [np.arange(n)] * whole
    positions.append(np.sort(rng.choice(n, size=int(round(frac * n)), replace=False)))
    return data.subset(np.concatenate(positions))
