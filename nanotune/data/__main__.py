"""Preprocess the data of a run config and print what the trainer will see.

    python -m nanotune.data configs/gsm8k.toml                      # statistics; last line: one JSON object
    python -m nanotune.data configs/gsm8k.toml --show 3             # + 3 examples with the trained tokens marked
    python -m nanotune.data configs/gsm8k.toml --data.seq_len=1024  # the same overrides as the trainer

The tokenized data is cached (data.cache_dir), so the training run that follows starts without preprocessing.
Trained tokens are shown in green on a terminal, and between [[ and ]] otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nanotune.config import ConfigError, check_paths, load_config
from nanotune.data.pipeline import DataError, prepare_data
from nanotune.data.sources import RowError, SourceError
from nanotune.data.template import TemplateError
from nanotune.data.tokenizer import TokenizerError, load_tokenizer
from nanotune.packing import packing_efficiency


def histogram_lines(lengths: np.ndarray, seq_len: int, bins: int = 10, width: int = 40) -> list[str]:
    # up to the longest example (not seq_len), so that short examples do not all fall into the first bin
    edges = np.unique(np.linspace(0, max(int(lengths.max()), bins), bins + 1).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    return [f"  {lo:>6}-{hi:<6} {c:>8} {'#' * int(round(width * c / top))}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def save_histogram_png(lengths: np.ndarray, seq_len: int, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=50, range=(0, seq_len))
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{len(lengths)} examples, seq_len {seq_len}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def marked(tok, ids: np.ndarray, mask: np.ndarray, color: bool) -> str:
    """The example's text with each run of trained tokens wrapped in markers."""
    on, off = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            text = tok.decode(ids[start:k])
            out.append(f"{on}{text}{off}" if mask[start] else text)
            start = k
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanotune.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the run's TOML config")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print N examples with the mask")
    parser.add_argument("--no-cache", action="store_true", help="tokenize again and do not write the cache")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        check_paths(cfg, args.config)
        tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        data = prepare_data(cfg.data, tok, seed=cfg.seed, use_cache=not args.no_cache)
    except (ConfigError, DataError, RowError, SourceError, TemplateError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    stats = data.stats
    lengths = data.train.lengths
    stats["packing_efficiency"] = round(packing_efficiency(lengths, cfg.data.seq_len, seed=cfg.seed), 4)
    stats["seq_len"] = cfg.data.seq_len

    print(f"tokenizer: {tok}")
    for d in stats["datasets"]:
        reasons = f" {d['dropped']}" if d["dropped"] else ""
        print(f"{d['path']} ({d['format']}): {d['rows']} rows, {d['dropped_rows']} dropped{reasons}, "
              f"{d['examples']} train examples, {d['eval_examples']} held out, cache {d['cache']}")
    print(f"rows read        {stats['rows']}")
    print(f"rows dropped     {stats['dropped_rows']}" + "".join(f"\n  {k:<24}{v}" for k, v in stats["dropped"].items()))
    print(f"rows truncated   {stats['truncated_rows']}")
    print(f"rows split       {stats['split_rows']}")
    print(f"train examples   {stats['examples']}")
    print(f"tokens           {stats['tokens']}")
    print(f"trainable tokens {stats['trainable_tokens']} ({stats['trainable_tokens'] / max(stats['tokens'], 1):.1%})")
    if data.eval is not None:
        print(f"eval examples    {stats['eval_examples']} ({stats['eval_tokens']} tokens)")
    print(f"packing efficiency at seq_len {cfg.data.seq_len}: {stats['packing_efficiency']:.4f}")
    print("example lengths (tokens):")
    print("\n".join(histogram_lines(lengths, cfg.data.seq_len)))
    png_path = Path(cfg.data.cache_dir) / f"{Path(args.config).stem}_lengths.png"
    png = save_histogram_png(lengths, cfg.data.seq_len, png_path)
    if png is not None:
        print(f"length histogram: {png}")
        stats["histogram_png"] = str(png)

    color = sys.stdout.isatty()
    for i in range(min(args.show, len(data.train))):
        ids, mask = data.train[i]
        print(f"\n--- example {i}: {len(ids)} tokens, {int(mask.sum())} trained ---")
        print(marked(tok, ids, mask, color))
    if args.show:
        print()
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
