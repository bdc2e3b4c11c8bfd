"""Throughput of the data pipeline: reading + chat templating + tokenizing + masking, in rows per second.

    python scripts/bench_data.py                    # GSM8K train repeated to >= 100,000 rows, 1 and all cores
    python scripts/bench_data.py --rows 20000 --workers 2

Each row is a GSM8K question/answer rendered as a chat with the shipped tokenizer's template and masked. The
cache is off, so every run does the full work; worker start-up and reading the file are inside the timing.
`--workers 0` runs in this process with the tokenizer on one thread. Besides wall-clock rows/s, the CPU time of
this process and its workers is measured: rows per CPU-second is the per-core rate, and it stays meaningful on a
machine whose cores are shared with other jobs (where wall-clock rates drop).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanotune.config import DataConfig, DatasetConfig  # noqa: E402
from nanotune.data import load_tokenizer, prepare_data  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="at least this many rows (GSM8K repeated)")
    parser.add_argument("--workers", default=f"0,{os.cpu_count()}", help="comma-separated worker counts to time")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    args = parser.parse_args()

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # in-process runs use one core, like one worker
    lines = (ROOT / "data/gsm8k/train.jsonl").read_text().splitlines(keepends=True)
    copies = -(-args.rows // len(lines))
    tok = load_tokenizer(ROOT / "data/gsm8k/tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gsm8k_repeated.jsonl"
        path.write_text("".join(lines) * copies)
        num_rows = len(lines) * copies
        print(f"{num_rows} rows ({copies} x GSM8K train), {os.cpu_count()} cores, tokenizer vocab {tok.vocab_size}")
        for workers in [int(w) for w in args.workers.split(",")]:
            roles = {"question": "user", "answer": "assistant"}
            ds = DatasetConfig(path=str(path), format="chat", fields_to_roles=roles)
            cfg = DataConfig(datasets=[ds], seq_len=2048, num_workers=workers, cache_dir="")
            best, best_cpu = float("inf"), float("inf")
            for _ in range(args.repeats):
                cpu0, start = cpu_seconds(), time.perf_counter()
                data = prepare_data(cfg, tok, quiet=True, use_cache=False)
                best = min(best, time.perf_counter() - start)
                best_cpu = min(best_cpu, cpu_seconds() - cpu0)
            assert data.stats["rows"] == num_rows and data.stats["dropped_rows"] == 0
            print(f"workers={workers}: {best:.2f} s wall, {num_rows / best:,.0f} rows/s, "
                  f"{data.stats['tokens'] / best:,.0f} tokens/s; {best_cpu:.2f} CPU-s, "
                  f"{num_rows / best_cpu:,.0f} rows per CPU-second (per core)")


if __name__ == "__main__":
    main()
