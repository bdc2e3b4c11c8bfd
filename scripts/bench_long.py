"""The longest sequence that trains one step, and the memory each token costs, for a model, a recipe and the
long-context switches (docs/long-context.md).

    python scripts/bench_long.py --model llama-3.1-8b --recipe qlora --loss chunked --tiled-mlp 8192 \\
        --checkpointing full --offload overlap --budget-gib 80            # one GPU: binary search, 80 GiB of it
    python scripts/bench_long.py --device cpu --tiny --slopes            # CPU: bytes per token of each switch
    python scripts/bench_long.py --device cpu --tiny --budget-mib 8      # CPU: the binary search on the count

Each length tried prints its peak and the step's seconds (the first includes warm-up; on CPU the count slows it).
One step is what the trainer does per micro-batch: forward, loss (plain or chunked), backward, on one row of random
tokens of length T (packing does not change the memory: the documents of a row share it). The optimizer step is left
out: its states cost per parameter, not per token, and are allocated before the first step.

What "peak memory" is:
- on CUDA, `torch.cuda.max_memory_allocated` during the step minus what was allocated before it (weights, adapters),
  as the caching allocator counts it; a length fits when the step neither runs out of memory nor passes the budget
  (`--budget-gib`, which also caps the process with `set_per_process_memory_fraction`).
- on CPU, a count, not a measurement of the process: the peak, over the step, of the bytes of every tensor storage
  the step creates and has not yet freed (a TorchDispatchMode sees each op's outputs; a storage counts until it is
  freed). Weights and other tensors made before the step are not counted; host copies made by the activation offload
  are not counted either (on a GPU they live in host memory). Peak RSS would include the allocator's caching and the
  host copies, and moves by whole pages; the count is exact and repeatable.

The binary search doubles T from `--start` until a step does not fit, then bisects down to `--granularity` tokens.
Peak memory per token is the slope of a line fitted through the lengths measured (bytes = intercept + slope * T).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from nanotune import lora, memory  # noqa: E402
from nanotune.loss import cross_entropy_sum, linear_cross_entropy_sum, lm_head_weight  # noqa: E402

# HF config.json fields of the models the GPU commands name (random weights: memory does not depend on their values)
LLAMA_31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                   max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
# tiny, with the ratios that matter for memory roughly kept (vocab > intermediate > hidden)
TINY = dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=224, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
MODELS = {"llama-3.1-8b": LLAMA_31_8B, "tiny": TINY}


@dataclass
class Switches:
    loss: str = "plain"  # plain | chunked
    tiled_mlp: int = 0  # tokens per MLP tile; 0: off
    checkpointing: str = "none"  # none | selective | full
    offload: str = "none"  # none | sync | overlap
    layer_offload: bool = False

    def describe(self) -> str:
        on = [f"{self.loss} loss"]
        if self.tiled_mlp:
            on.append(f"tiled MLP ({self.tiled_mlp})")
        if self.checkpointing != "none":
            on.append(f"{self.checkpointing} checkpointing")
        if self.offload != "none":
            on.append(f"{self.offload} offload")
        if self.layer_offload:
            on.append("layer offload")
        return " + ".join(on)


# ------------------------------------------------------------------------------------------------ the model


def build(hf: dict, recipe: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised model with the recipe's trainable parameters (full | lora | qlora)."""
    config = models.config_from_hf(hf)
    config.attn_implementation = "sdpa"
    model = models.build_model(config, "meta", dtype)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    if recipe == "qlora":
        from nanotune.qlora import quantize_nf4

        quantize_nf4(model, compute_dtype=dtype, device=device)
    if recipe in ("lora", "qlora"):
        lora.apply_lora(model, ["all-linear"], rank=16, alpha=32)
        for module in model.modules():
            if hasattr(module, "materialize_after_load") and any(p.is_meta for p in module.parameters()):
                module.materialize_after_load(device)
        for name, p in model.named_parameters():
            p.requires_grad = ".lora_" in name
    elif recipe != "full":
        raise SystemExit(f"--recipe {recipe!r}: choose full, lora or qlora")
    return model.train()


def prepare(model, switches: Switches, device):
    """Apply the switches as the trainer does; returns (the forward's context factory, the layer offloader or None)."""
    model.activation_checkpointing = switches.checkpointing
    if switches.tiled_mlp:
        memory.apply_tiled_mlp(model, switches.tiled_mlp)
    layers = memory.LayerOffload(model, device) if switches.layer_offload else None
    if switches.offload == "overlap":
        offload = HostCopiesUncounted(model, device)
        return offload.saving, layers
    if switches.offload == "sync":
        if device.type != "cuda":
            raise SystemExit("--offload sync is torch's save_on_cpu: on CPU it keeps everything where it is; use "
                             "--offload overlap, which runs the same hooks on CPU")
        return (lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)), layers
    return (lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)), layers


class HostCopiesUncounted(memory.ActivationOffload):
    """On CPU, the offload's host copies are made outside the counting mode: on a GPU they are host memory."""

    def _pack(self, t):
        with _disable_current_modes():
            return super()._pack(t)


def one_step(model, context, switches: Switches, seq_len: int, device, seed: int = 0) -> None:
    """Forward, loss and backward on one row of `seq_len` random tokens (labels: the next token)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=g).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    with context():
        if switches.loss == "chunked":
            hidden = model(inputs, return_hidden=True)  # (1, T, D)
            loss = linear_cross_entropy_sum(hidden, lm_head_weight(model.lm_head), labels)
        else:
            loss = cross_entropy_sum(model(inputs), labels)  # (1, T, V) logits
    (loss / seq_len).backward()
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ measuring


class PeakStorages(TorchDispatchMode):
    """The peak of the bytes of storages created inside the mode and not yet freed (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and not _is_input_storage(key, args, kwargs):
                    self.live[key] = storage.nbytes()
                    self.bytes += storage.nbytes()
                    self.peak = max(self.peak, self.bytes)
                    weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.bytes -= self.live.pop(key, 0)


def _is_input_storage(key: int, args, kwargs) -> bool:
    """An op's output on an input's storage (a view, an in-place op) is no new memory."""
    return any(isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == key
               for a in tree_flatten((args, kwargs))[0])


def peak_bytes(model, context, switches: Switches, seq_len: int, device) -> int | None:
    return measure(model, context, switches, seq_len, device)[0]


def measure(model, context, switches: Switches, seq_len: int, device) -> tuple[int | None, float]:
    """(the step's peak memory in bytes (see the module docstring), or None when it ran out of memory; its seconds)."""
    gc.collect()
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            one_step(model, context, switches, seq_len, device)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            return None, time.perf_counter() - start
        return torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - start
    with PeakStorages() as tracker:
        one_step(model, context, switches, seq_len, device)
    return tracker.peak, time.perf_counter() - start


def longest(model, context, switches, device, budget: int, start: int, granularity: int, limit: int):
    """Binary search for the longest length whose step fits in `budget` bytes; returns (length, {length: bytes})."""
    seen: dict[int, int | None] = {}

    def fits(n: int) -> bool:
        seen[n], seconds = measure(model, context, switches, n, device)
        size = "out of memory" if seen[n] is None else f"{seen[n] / 2**20:10.1f} MiB"
        print(f"  T = {n:>8}: {size}, step {seconds:.2f} s", flush=True)
        return seen[n] is not None and seen[n] <= budget

    good, bad = 0, None
    n = start
    while bad is None and n <= limit:  # double until a step does not fit
        if fits(n):
            good, n = n, 2 * n
        else:
            bad = n
    bad = bad or 2 * good
    while bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity or granularity
        if mid in (good, bad):
            break
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, {n: b for n, b in seen.items() if b is not None}


def fit_line(points: dict[int, int]) -> tuple[float, float, float]:
    """(intercept, slope in bytes per token, largest relative distance of a point from the line)."""
    xs, ys = list(points), [float(points[x]) for x in points]
    if len(xs) < 2:
        return 0.0, ys[0] / xs[0] if xs else 0.0, 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    off = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys))
    return intercept, slope, off


# ------------------------------------------------------------------------------------------------ the CPU table

# each switch alone, then stacked: the rows of docs/long-context.md's table
SLOPE_ROWS = [
    ("baseline", Switches()),
    ("chunked loss", Switches(loss="chunked")),
    ("tiled MLP", Switches(tiled_mlp=128)),
    ("selective checkpointing", Switches(checkpointing="selective")),
    ("full checkpointing", Switches(checkpointing="full")),
    ("activation offload", Switches(offload="overlap")),
    ("chunked loss + tiled MLP", Switches(loss="chunked", tiled_mlp=128)),
    ("chunked loss + tiled MLP + offload", Switches(loss="chunked", tiled_mlp=128, offload="overlap")),
    ("chunked loss + tiled MLP + full checkpointing", Switches(loss="chunked", tiled_mlp=128, checkpointing="full")),
    ("chunked loss + tiled MLP + full checkpointing + offload",
     Switches(loss="chunked", tiled_mlp=128, checkpointing="full", offload="overlap")),
]


def slopes(hf: dict, recipe: str, device, dtype, lengths: list[int], table=SLOPE_ROWS) -> list[dict]:
    rows = []
    for name, switches in table:
        model = build(hf, recipe, device, dtype)
        context, _ = prepare(model, switches, device)
        points = {n: peak_bytes(model, context, switches, n, device) for n in lengths}
        intercept, slope, off = fit_line(points)
        rows.append(dict(name=name, points=points, slope=slope, intercept=intercept, off=off))
    base = rows[0]["slope"]
    print(f"| switches | peak at T = {', '.join(map(str, lengths))} (KiB) | bytes per token | vs baseline | "
          "off the line |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        peaks = ", ".join(f"{r['points'][n] / 1024:.0f}" for n in lengths)
        print(f"| {r['name']} | {peaks} | {r['slope']:.0f} | {r['slope'] / base:.2f} | {r['off']:.1%} |")
    return rows


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help=f"one of {sorted(MODELS)}, or an HF model folder "
                   "(its config.json; the weights are random)")
    p.add_argument("--recipe", default="qlora", help="full | lora | qlora (rank 16, all linear layers)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(models.DTYPES))
    p.add_argument("--tiny", action="store_true", help="the tiny model, fp32 (CPU smoke runs)")
    p.add_argument("--loss", default="chunked", choices=["plain", "chunked"])
    p.add_argument("--tiled-mlp", type=int, default=0, metavar="TOKENS", help="tokens per MLP tile (0: off)")
    p.add_argument("--checkpointing", default="none", choices=["none", "selective", "full"])
    p.add_argument("--offload", default="none", choices=["none", "sync", "overlap"])
    p.add_argument("--layer-offload", action="store_true")
    p.add_argument("--budget-gib", type=float, default=0.0, help="CUDA: the memory a step may use (0: the GPU's)")
    p.add_argument("--budget-mib", type=float, default=0.0, help="the budget in MiB (CPU runs)")
    p.add_argument("--start", type=int, default=0, help="first length tried (default 8192 on CUDA, 256 on CPU)")
    p.add_argument("--granularity", type=int, default=0, help="stop bisecting at this many tokens")
    p.add_argument("--limit", type=int, default=1 << 22, help="never try longer than this")
    p.add_argument("--slopes", action="store_true", help="the table of bytes per token, switch by switch")
    p.add_argument("--lengths", default="256,512,1024", help="--slopes: the lengths measured")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if args.tiny:
        hf, dtype = TINY, torch.float32
    else:
        hf = MODELS.get(args.model) or models.read_config(args.model)
        dtype = models.DTYPES[args.dtype]
    if args.slopes:
        slopes(hf, args.recipe if not args.tiny else "lora", device, dtype, [int(n) for n in args.lengths.split(",")])
        return 0
    switches = Switches(args.loss, args.tiled_mlp, args.checkpointing, args.offload, args.layer_offload)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(args.budget_gib * 2**30) if args.budget_gib else total
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    elif args.budget_mib:
        budget = int(args.budget_mib * 2**20)
    else:
        raise SystemExit("on CPU give --budget-mib (the count the search compares with), or use --slopes")
    model = build(hf, args.recipe, device, dtype)
    context, _ = prepare(model, switches, device)
    print(f"{args.model if not args.tiny else 'tiny'} {args.recipe}: {switches.describe()}; budget "
          f"{budget / 2**30:.2f} GiB")
    start = args.start or (8192 if device.type == "cuda" else 256)
    granularity = args.granularity or (1024 if device.type == "cuda" else 64)
    length, points = longest(model, context, switches, device, budget, start, granularity, args.limit)
    if not length:
        print(f"not even {start} tokens fit")
        return 1
    _, slope, _ = fit_line(points)
    print(f"longest: {length} tokens, peak {points[length] / 2**30:.2f} GiB, {slope / 1024:.1f} KiB per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
