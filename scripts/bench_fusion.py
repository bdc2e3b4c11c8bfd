"""Does fusing the q / k / v and the gate / up projections pay? Times them separate and fused, alone.

    python scripts/bench_fusion.py                          # on a GPU: bf16, the W1-W5 shapes, 8192 tokens
    python scripts/bench_fusion.py --device cpu --tokens 512 --dtype float32   # smoke test (CPU timing is no evidence)

For every shape, one training step of the projections alone (forward, and the gradients of the input and the
weights, as a full fine-tune needs them):
- separate: `F.linear` three times (q, k, v) or twice (gate, up) on the same input, as the model files do now;
- fused:    one `F.linear` with the weights concatenated once, outside the timing: what a stored fused weight
            ("fuse at load, split at save", model.fuse_projections) does;
- cat:      one `F.linear` with the weights concatenated in every step: fusion that keeps the parameters as they are
            (names, LoRA, TP plans unchanged) and pays a weight copy forward and a split of its gradient backward.
Reported: ms per step and fused / separate, cat / separate; and the share of a decoder layer's matmul FLOPs that these
projections are, so that a speed-up of the projections can be read as a speed-up of the step. Whole training steps
with the switch on and off: `scripts/bench.py --fuse-projections` against the same command without it
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

# (hidden, intermediate, attention heads, kv heads, head dim)
SHAPES = {
    "llama-3.2-1b": (2048, 8192, 32, 8, 64),
    "llama-3.1-8b": (4096, 14336, 32, 8, 128),
    "gemma-2-9b": (3584, 14336, 16, 8, 256),
    "mistral-7b": (4096, 14336, 32, 8, 128),
}


def timed(step, warmup: int, iters: int, device) -> float:
    """Milliseconds per call of step() after warmup calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def projection_steps(x, weights):
    """Three ways to run the same projections forward and backward: separate, fused (stored), cat (per step)."""
    fused_w = torch.cat([w.detach() for w in weights]).requires_grad_()
    dys = [torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype) for w in weights]
    dy_fused = torch.cat(dys, dim=1)

    def separate():
        outs = [F.linear(x, w) for w in weights]
        torch.autograd.backward(outs, dys)

    def fused():
        F.linear(x, fused_w).backward(dy_fused)

    def cat():
        F.linear(x, torch.cat(weights)).backward(dy_fused)

    return {"separate": separate, "fused": fused, "cat": cat}


def layer_flops_share(hidden, inter, heads, kv_heads, head_dim, tokens):
    """Share of one decoder layer's matmul FLOPs (projections + attention scores) in q/k/v and in gate/up."""
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    o = heads * head_dim * hidden
    mlp = 3 * hidden * inter
    attention = 2 * tokens * heads * head_dim / 2  # causal: half of QK^T and PV, per token
    total = qkv + o + mlp + attention
    return qkv / total, 2 * hidden * inter / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--tokens", type=int, default=8192, help="rows of input (micro-batch x seq_len)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="", help="also append the records to this JSONL file")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    records = []
    for name, (hidden, inter, heads, kv_heads, head_dim) in SHAPES.items():
        x = torch.randn(args.tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
        groups = {"qkv": [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], "gate_up": [inter, inter]}
        share_qkv, share_gate_up = layer_flops_share(hidden, inter, heads, kv_heads, head_dim, args.tokens)
        for group, outs in groups.items():
            weights = [(torch.randn(n, hidden, device=device, dtype=dtype, generator=g) * hidden**-0.5)
                       .requires_grad_() for n in outs]
            ms = {way: timed(step, args.warmup, args.iters, device)
                  for way, step in projection_steps(x, weights).items()}
            record = {"shape": name, "group": group, "tokens": args.tokens, "dtype": args.dtype, "device": str(device),
                      **{f"{way}_ms": round(t, 3) for way, t in ms.items()},
                      "fused_speedup": round(ms["separate"] / ms["fused"], 3),
                      "cat_speedup": round(ms["separate"] / ms["cat"], 3),
                      "share_of_layer_flops": round(share_qkv if group == "qkv" else share_gate_up, 3)}
            records.append(record)
            print(json.dumps(record), flush=True)
            del weights
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
