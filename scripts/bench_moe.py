"""One MoE layer's experts, forward and backward: the glue in PyTorch (`Experts`) against the Triton glue
(`TritonExperts`, nanotune/kernels/moe.py). The same grouped GEMMs run in both.

    python scripts/bench_moe.py                       # on a GPU: bf16, W6's shapes (docs/BENCHMARKS.md), 8192 tokens
    python scripts/bench_moe.py --compile             # both compiled (torch.compile of the experts' forward)
    TRITON_INTERPRET=1 python scripts/bench_moe.py --device cpu --dtype float32 --tokens 16 --hidden 32 \\
        --experts 4 --top-k 2 --expert-width 16 --warmup 1 --iters 1     # smoke test (CPU timing is no evidence)

The routing is fixed for the run (a random router's softmax top-k over random tokens); each step is the experts'
forward from (x, experts, weights) and the backward of a random upstream gradient, with gradients for x, the routing
weights and both stacked weights, as full fine-tuning needs them. Reported per variant: ms per step, the peak memory
of the timed steps above what was allocated before them (CUDA: activations and gradients), and `speedup` (plain ms /
this variant's ms); and the largest difference of the output and of every gradient between the two (same inputs, same
weights), so a fast wrong kernel shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.qwen_moe import Experts  # noqa: E402
from scripts.bench_fusion import timed  # noqa: E402  (ms per call after warm-up, synchronised on CUDA)

W6 = dict(hidden=1024, experts=64, top_k=8, expert_width=512, tokens=4 * 2048)  # Qwen3-MoE small, 4 x 2048 tokens



def build(args, device, dtype):
    """The plain experts with random weights, and the inputs of one layer: x, the chosen experts and their weights."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    experts = Experts(args.experts, args.hidden, args.expert_width)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.02, generator=g)
        experts.down_proj.normal_(0.0, 0.02, generator=g)
    experts = experts.to(device, dtype)
    experts.choose_kernel(device)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    router = torch.randn(args.hidden, args.experts, generator=g).to(device) / args.hidden ** 0.5
    probs = torch.softmax(x.float() @ router, dim=-1)  # (N, E)
    top_p, top_e = torch.topk(probs, args.top_k, dim=-1)  # (N, K)
    grad_out = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    return experts, x, top_e, top_p.to(dtype), grad_out


def run_step(module, forward, x, top_e, top_w, grad_out):
    """One forward and backward; returns the output and the gradients (x, weights, gate_up_proj, down_proj)."""
    module.zero_grad(set_to_none=True)
    x, top_w = x.detach().requires_grad_(), top_w.detach().requires_grad_()
    out = forward(x, top_e, top_w)
    out.backward(grad_out)
    return out.detach(), [x.grad, top_w.grad, module.gate_up_proj.grad, module.down_proj.grad]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tokens", type=int, default=W6["tokens"], help="tokens of the micro-batch (N)")
    p.add_argument("--hidden", type=int, default=W6["hidden"], help="hidden size (D)")
    p.add_argument("--experts", type=int, default=W6["experts"], help="experts (E)")
    p.add_argument("--top-k", type=int, default=W6["top_k"], help="experts per token (K)")
    p.add_argument("--expert-width", type=int, default=W6["expert_width"], help="moe_intermediate_size (I)")
    p.add_argument("--compile", action="store_true", help="torch.compile each variant's forward")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also append the records to this JSONL file")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from nanotune.kernels.moe import TritonExperts

    plain, x, top_e, top_w, grad_out = build(args, device, dtype)
    fused = TritonExperts(plain)  # the very same Parameters
    variants = {"plain": plain, "fused": fused}
    results, records = {}, []
    for name, module in variants.items():
        forward = torch.compile(module) if args.compile else module
        results[name] = run_step(module, forward, x, top_e, top_w, grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ms = timed(lambda: run_step(module, forward, x, top_e, top_w, grad_out), args.warmup, args.iters, device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
        records.append(dict(variant=name, ms=round(ms, 3), peak_gib=None if peak is None else round(peak, 3)))

    (out_p, grads_p), (out_f, grads_f) = results["plain"], results["fused"]
    diffs = {n: (a.float() - b.float()).abs().max().item()
             for n, a, b in zip(["out", "x", "weights", "gate_up_proj", "down_proj"], [out_p, *grads_p],
                                [out_f, *grads_f])}
    shape = dict(tokens=args.tokens, hidden=args.hidden, experts=args.experts, top_k=args.top_k,
                 expert_width=args.expert_width, dtype=args.dtype, device=args.device, compile=args.compile,
                 grouped_mm=plain.use_grouped_mm)
    for r in records:
        r.update(shape, speedup=round(records[0]["ms"] / r["ms"], 3), max_abs_diff=diffs)
        print(json.dumps(r))
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return records


if __name__ == "__main__":
    main()
