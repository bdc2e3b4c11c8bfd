"""Check the attention backends against eager, then time forward+backward on packed rows.

    python scripts/bench_attention.py                          # CUDA: bf16 check, then the benchmark
    python scripts/bench_attention.py --out bench_attention.md  # also write the markdown section to a file
    python scripts/bench_attention.py --device cpu --tiny       # smoke test on tiny shapes (run by the tests)

1. Check: every backend available on the device equals the eager oracle computed in fp32 (forward and the gradients
   of q, k, v), on packed rows with grouped-query heads, with and without a sliding window, and with logit
   softcapping where the backend has it. bf16 on CUDA, fp32 on CPU.
2. Benchmark: one row of 8,192 tokens packed with ~16 documents of random lengths, at the attention shapes of
   Llama-3.2-1B (32 query heads, 8 key/value heads, head_dim 64) and Llama-3.1-8B (32, 8, 128). Each backend's
   forward+backward time for one layer (the context with its masks is built once per batch and timed apart),
   and its ratio to SDPA with a dense block-diagonal mask. `sdpa-causal` ignores document boundaries: it is not
   correct on packed rows and is listed only as the speed of one causal flash attention over the whole row.
Prints a markdown section with the card and versions, for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import attention as A

HEAD_SHAPES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}  # (query heads, key/value heads, head_dim)
TINY_HEAD_SHAPES = {"tiny": (4, 2, 16)}


def packed_position_ids(lengths: list[int], device) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None].to(device)  # (1, T)


def random_lengths(total: int, num_docs: int, gen: torch.Generator) -> list[int]:
    cuts = sorted((torch.randperm(total - 1, generator=gen)[: num_docs - 1] + 1).tolist())
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def can_backprop(backend: str, device: torch.device) -> bool:
    return not (backend == "flex" and device.type == "cpu" and not A.flex_backward_on_cpu())


def available_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends to run on this device, and the reason each other one is left out."""
    backends, skipped = ["sdpa"], {}
    if A.flex_attention_fn() is not None:
        backends.append("flex")
    else:
        skipped["flex"] = "the installed torch has no flex_attention"
    if device.type != "cuda":
        skipped["varlen"] = "CUDA only"
    elif A.varlen_attn_fn() is None:
        skipped["varlen"] = "the installed torch has no torch.nn.attention.varlen"
    elif torch.cuda.get_device_capability(device) < (8, 0):
        skipped["varlen"] = "flash attention needs an Ampere or newer GPU"
    else:
        backends.append("varlen")
    return backends, skipped


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------------- check


def check(device: torch.device, dtype: torch.dtype, tiny: bool) -> bool:
    """Every backend vs the fp32 eager oracle; prints one line per case, returns whether all pass."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(0)
    T, (Hq, Hkv, D) = (48, TINY_HEAD_SHAPES["tiny"]) if tiny else (1024, (16, 4, 64))
    lengths = [random_lengths(T, 5, gen), random_lengths(T, 2, gen)]
    position_ids = torch.cat([packed_position_ids(row, "cpu") for row in lengths]).to(device)  # (2, T)
    q, k, v = (torch.randn(2, H, T, D, generator=gen).to(device) for H in (Hq, Hkv, Hkv))
    if not tiny:
        q = q * 2  # larger scores, so that the softcap case bites
    d_out = torch.randn(2, Hq, T, D, generator=gen).to(device)
    backends, _ = available_backends(device)
    cases = [dict(), dict(sliding_window=T // 8), dict(softcap=5.0), dict(softcap=5.0, sliding_window=T // 8)]
    print(
        f"\nCheck against fp32 eager: {device.type}, {str(dtype).removeprefix('torch.')}, B=2, T={T}, "
        f"Hq={Hq}, Hkv={Hkv}, D={D}, documents per row {[len(r) for r in lengths]}; relative error <= {tol:g}"
    )
    all_ok = True
    for kwargs in cases:
        ctx = A.build_context("eager", (2, T), device, position_ids=position_ids)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = A.attend(q32, k32, v32, ctx, **kwargs)
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), d_out.float())
        # eager in the working dtype first: its error is the rounding floor the others are compared with
        for backend in ["eager"] + backends + ["auto"]:
            if "softcap" in kwargs and backend in ("sdpa", "varlen"):
                continue  # refused by design: no softcapping in these kernels
            grad = can_backprop(backend, device)
            qb, kb, vb = (t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v))
            try:
                ctx = A.build_context(backend, (2, T), device, position_ids=position_ids)
                with torch.set_grad_enabled(grad):
                    out = A.attend(qb, kb, vb, ctx, **kwargs)
                errors = {"out": rel_err(out, ref)}
                if grad:
                    grads = torch.autograd.grad(out, (qb, kb, vb), d_out.to(dtype))
                    errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
            except Exception as e:  # report and go on: one broken backend must not hide the others' results
                errors = {f"error {type(e).__name__}: {e}".replace("\n", " ")[:200]: float("inf")}
            ok = all(e <= tol for e in errors.values())
            all_ok &= ok
            shown = ", ".join(n if e == float("inf") else f"{n} {e:.1e}" for n, e in errors.items())
            print(
                f"  {'ok  ' if ok else 'FAIL'} {backend:<7} {str(kwargs or 'causal+packed'):<40} {shown}"
                + ("" if grad else "  (forward only: no backward on this device)")
            )
    return all_ok


# --------------------------------------------------------------------------------------------------- benchmark


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):  # includes torch.compile on the first call
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters * 1e3


def forward_backward(qkv: list[torch.Tensor], ctx: A.AttentionContext, grad: bool) -> None:
    with torch.set_grad_enabled(grad):
        out = A.attend(*qkv, ctx)
        if grad:
            out.backward(torch.ones_like(out))


def build_with_mask(implementation: str, total: int, device: torch.device, position_ids) -> A.AttentionContext:
    """The per-batch work: the context and the mask (or cu_seqlens) its backend uses, which every layer reuses."""
    ctx = A.build_context(implementation, (1, total), device, position_ids=position_ids)
    if implementation == "flex":
        A.flex_block_mask(ctx, None)
    elif implementation == "varlen":
        A.varlen_seqlens(ctx)
    elif ctx.is_packed or implementation == "eager":
        A.allowed_mask(ctx, None)
    return ctx


def bench(device: torch.device, dtype: torch.dtype, tiny: bool, eager: bool) -> list[str]:
    """Markdown table rows: one per (head shape, backend)."""
    total, num_docs = (64, 4) if tiny else (8192, 16)
    warmup, iters = (1, 2) if tiny else (3, 20)
    gen = torch.Generator().manual_seed(1)
    lengths = random_lengths(total, num_docs, gen)
    position_ids = packed_position_ids(lengths, device)
    backends, skipped = available_backends(device)
    # (label, implementation, position_ids given to the context)
    runs = [("sdpa-dense", "sdpa", position_ids), ("sdpa-causal", "sdpa", None)]
    runs += [(b, b, position_ids) for b in backends if b != "sdpa"]
    if eager or tiny:
        runs.append(("eager", "eager", position_ids))
    rows = []
    print(
        f"\nBenchmark: one row of {total} tokens, {num_docs} documents (longest {max(lengths)}), "
        f"{str(dtype).removeprefix('torch.')}, forward+backward of one attention layer"
    )
    for shape_name, (Hq, Hkv, D) in (TINY_HEAD_SHAPES if tiny else HEAD_SHAPES).items():
        q, k, v = (torch.randn(1, H, total, D, device=device, dtype=dtype) for H in (Hq, Hkv, Hkv))
        baseline = None
        for label, implementation, pos in runs:
            build = functools.partial(build_with_mask, implementation, total, device, pos)
            grad = can_backprop(implementation, device)
            qkv = [t.detach().requires_grad_(grad) for t in (q, k, v)]
            try:
                ctx_ms = time_ms(build, device, warmup, iters)
                ms = time_ms(functools.partial(forward_backward, qkv, build(), grad), device, warmup, iters)
            except Exception as e:  # out of memory, a kernel missing on this card: record it, time the others
                rows.append(f"| {shape_name} ({Hq}/{Hkv}/{D}) | {label}: {type(e).__name__} | | | |")
                print(rows[-1], str(e)[:300])
                qkv = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if label == "sdpa-dense":
                baseline = ms
            note = "" if grad else " (forward only)"
            ratio = f"{ms / baseline:.2f}x" if baseline and grad else ""
            rows.append(f"| {shape_name} ({Hq}/{Hkv}/{D}) | {label}{note} | {ms:.2f} | {ratio} | {ctx_ms:.2f} |")
            print(rows[-1])
        for name, reason in skipped.items():
            rows.append(f"| {shape_name} ({Hq}/{Hkv}/{D}) | {name}: not run ({reason}) | | | |")
    return rows


def environment(device: torch.device) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    cuda = torch.version.cuda or "none"
    return f"{card}; torch {torch.__version__}; CUDA {cuda}; Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test of the script itself")
    parser.add_argument("--eager", action="store_true", help="also time eager (O(T^2) memory: ~35 GB at 8k tokens)")
    parser.add_argument("--out", type=Path, help="also write the markdown section to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"Environment: {environment(device)}")
    ok = check(device, dtype, args.tiny)
    rows = bench(device, dtype, args.tiny, args.eager)
    section = "\n".join([
        f"### Attention backends ({time.strftime('%Y-%m-%d')})",
        "",
        f"{environment(device)}. Check against fp32 eager: {'all checks passed' if ok else 'FAILED'}.",
        "",
        "| head shape (Hq/Hkv/D) | backend | fwd+bwd ms per layer | vs sdpa-dense | context + mask ms per batch |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])  # fmt: skip
    print("\n" + section)
    if args.out:
        args.out.write_text(section + "\n")
    if not ok:
        raise SystemExit("attention check FAILED: a backend differs from eager beyond tolerance (see above)")


if __name__ == "__main__":
    main()
