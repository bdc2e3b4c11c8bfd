"""Peak host memory per process while loading a model: one process versus 2 and 4 processes with sharded loading.

    python scripts/measure_load_memory.py --write outputs/llama-1b-random --size llama-1b   # a random HF-format Llama
    python scripts/measure_load_memory.py outputs/llama-1b-random --nproc 1 2 4             # the table

One process loads the whole model as training does (`models.from_pretrained`). With N processes (torchrun, gloo on
CPU, parallel.dp_shard = N) each builds the model on the meta device, applies FSDP2, and reads only its own slices
from the safetensors files (`parallel.load_sharded`). Each process reports its peak resident set size (ru_maxrss)
and, to show what the model adds, its resident size just before loading. Each also sums the values of the shards it
holds; the sums over all processes must equal the sum over the checkpoint, so the measurement is of a real load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import models  # noqa: E402
from nanotune import parallel, train  # noqa: E402
from nanotune.config import load_config  # noqa: E402


def rss_mib() -> float:
    """The resident set size now, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_random_llama(folder: Path, size: str, vocab_size: int = 128256) -> None:
    """A randomly initialised Llama of a named size (models.SIZES), saved in HF format in bf16 (as released
    checkpoints are; it is loaded in the training dtype, fp32 by default)."""
    model = models.from_size(size, vocab_size, torch.bfloat16, "cpu")
    models.save_pretrained(model, folder)


def tensor_sum(t: torch.Tensor, rows: int = 4096) -> float:
    """The sum of a tensor in float64, a block of rows at a time (no float64 copy of a large tensor)."""
    if t.ndim == 0:
        return float(t.double())
    return sum(float(t[i:i + rows].double().sum()) for i in range(0, t.shape[0], rows))


def load_and_report(model_path: str, out: Path) -> None:
    """In each process: load as train.py would, then write {rank, peak, before, checksum} to out/rank-R.json."""
    cfg = load_config(None, [f"--model.path={model_path}", "--device=cpu"])
    dist = parallel.init_distributed("cpu", cfg.parallel)
    sharded = parallel.loads_sharded(cfg, dist)
    before = rss_mib()
    model = train.build_model(cfg, 0, torch.device("meta" if sharded else "cpu"), dist.layout)
    model = parallel.parallelize(model, dist, cfg.parallel, cfg.train.precision)
    if sharded:
        parallel.load_sharded(model, model_path, torch.device("cpu"))
    peak = peak_rss_mib()
    checksum = 0.0  # over this rank's part of every parameter (FSDP: the parts do not overlap)
    for p in {id(p): p for p in model.parameters()}.values():
        checksum += tensor_sum(p.to_local() if hasattr(p, "to_local") else p.data)
    record = {"rank": dist.rank, "world_size": dist.world_size, "peak_mib": peak, "before_mib": before,
              "checksum": checksum}
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(record))
    parallel.cleanup(dist)


def file_checksum(model_path: Path) -> float:
    """The sum of every tensor the model reads, straight from the files, one tensor at a time."""
    from safetensors import safe_open

    total = 0.0
    for file in models.safetensors_io.checkpoint_files(model_path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                part, rows = f.get_slice(key), 4096
                n = part.get_shape()[0] if part.get_shape() else 0
                total += sum(float(part[i:i + rows].double().sum()) for i in range(0, n, rows)) if n else \
                    float(f.get_tensor(key).double().sum())
    return total


def measure(model_path: Path, nproc: int) -> list[dict]:
    """Run the load in `nproc` fresh processes; -> one record per process."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        me = [str(Path(__file__).resolve()), str(model_path), "--worker", tmp]
        cmd = [sys.executable, *me] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{nproc} process(es) failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
        return sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank-*.json")), key=lambda r: r["rank"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="HF-format model folder")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--write", help="write a random Llama in HF format to this folder and stop")
    parser.add_argument("--size", default="llama-1b", help="named size for --write (models.SIZES)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one process of a measurement
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.write:
        write_random_llama(Path(args.write), args.size)
        return 0
    if args.worker:
        load_and_report(args.model, Path(args.worker))
        return 0
    expected = file_checksum(Path(args.model))
    results, single_peak = {}, None
    print("| processes | peak RSS per process (MiB) | before loading (MiB) | peak / one-process peak |")
    print("| --- | --- | --- | --- |")
    for nproc in args.nproc:
        records = measure(Path(args.model), nproc)
        total = sum(r["checksum"] for r in records)
        if abs(total - expected) > 1e-6 * max(1.0, abs(expected)) + 1e-3:
            raise RuntimeError(f"{nproc} process(es) loaded values summing to {total}, the files to {expected}")
        peak = max(r["peak_mib"] for r in records)
        single_peak = single_peak or (peak if nproc == 1 else None)
        ratio = f"{peak / single_peak:.2f}" if single_peak else "-"
        peaks = ", ".join(f"{r['peak_mib']:.0f}" for r in records)
        befores = ", ".join(f"{r['before_mib']:.0f}" for r in records)
        print(f"| {nproc} | {peaks} | {befores} | {ratio} |", flush=True)
        results[nproc] = records
    if args.json:
        Path(args.json).write_text(json.dumps({"expected_checksum": expected, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
