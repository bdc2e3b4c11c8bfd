"""Training speed and memory of nanotune against HF transformers on the workloads W1-W7, side by side in one process.

    python scripts/bench.py                                   # W1-W7 on one GPU: HF (+peft / +bitsandbytes), nanotune,
                                                              # then HF + Liger-Kernel where installed
    python scripts/bench.py --workloads W1,W3 --steps 8 --warmup 3 --out bench.jsonl
    python scripts/bench.py --device cpu --tiny               # tiny shapes, a couple of steps: the smoke test
    python scripts/bench.py --workloads W1,W2,W5,W6,W7 --fuse-projections   # nanotune with q/k/v and gate/up fused;
                                                              # the same command without the flag is its baseline

The workloads are defined in docs/BENCHMARKS.md ("Workloads"). For each one, every implementation gets the same
weights (the HF model is built from a seed and its state_dict is copied into nanotune's model: the parameter names are
the same), the same token ids, the same AdamW(fused=True), `--warmup` untimed steps, then `--steps` timed ones (CUDA
events around the steps). Reported: tokens/s (W7: real, non-padding tokens/s), MFU (PaLM's 6N + 12LHQT, 4N for LoRA,
over 989 TFLOP/s dense bf16 on H100 / H200), peak `torch.cuda.max_memory_allocated`, and nanotune / baseline ratios.

Correctness in the same run: the first step's loss (before any update) of nanotune and of the HF baseline are computed
on identical weights and tokens and must agree (bf16: within 2e-2 + 1e-2 * loss; fp32: 1e-3); W7's nanotune loss for
this check is computed on the baseline's first batch, packed into one row. The exit code is 1 when a check fails.

HF + Liger-Kernel runs come last: Liger patches functions of transformers' modelling modules, which would change every
later HF run in the process. Nothing here may be imported by nanotune itself (transformers and peft are baselines).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from scripts import activation_memory  # noqa: E402
from nanotune.kernels.launch import interpreting  # noqa: E402
from nanotune.loss import IGNORE_INDEX, linear_cross_entropy_sum, lm_head_weight  # noqa: E402
from nanotune.packing import BatchLoader  # noqa: E402

PEAK_FLOPS = 989e12  # H100 / H200 SXM dense bf16, the denominator of MFU in docs/BENCHMARKS.md
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# W6-LoRA: a Qwen3-MoE has no dense MLP; its LoRA is on attention and on the stacked experts (PEFT's target_parameters)
MOE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["gate_up_proj", "down_proj"]

# ------------------------------------------------------------------------------------------------- workloads

LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                max_position_embeddings=131072)
LLAMA_8B = dict(LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                tie_word_embeddings=False)
GEMMA3_1B = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                 num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                 query_pre_attn_scalar=256, tie_word_embeddings=True, max_position_embeddings=32768,
                 layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
                 rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
                 num_experts_per_tok=8, moe_intermediate_size=512, norm_topk_prob=True, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=32768)


@dataclass
class Workload:
    name: str
    hf: dict  # HF config.json fields
    mode: str  # full | lora | qlora
    batch: int  # rows a step (W7: the baseline's padded rows)
    seq_len: int  # tokens a row (W7: nanotune's packed row)
    packed: bool = False  # W7: documents of log-normal lengths, packed by nanotune, padded by the baseline
    # the memory target in GiB (its ratio x the baseline's peak in the first H200 run, docs/BENCHMARKS.md "Results"):
    # --checkpointing=auto picks the cheapest checkpointing mode that fits it by scripts/activation_memory.py's count
    memory_budget_gib: float | None = None
    liger: bool = False  # whether an HF + Liger-Kernel row is run (docs/BENCHMARKS.md's baselines)
    speed_target: tuple[str, float] = ("hf", 1.0)  # (baseline, least nanotune / baseline tokens/s)
    memory_target: tuple[str, float] | None = None  # (baseline, most nanotune / baseline peak memory)
    doc_median: float = 600.0  # W7 document lengths: log-normal(median, sigma) clipped to doc_range
    doc_sigma: float = 0.8
    doc_range: tuple[int, int] = (16, 4096)
    notes: list[str] = field(default_factory=list)
    lora_experts: bool = False  # LoRA also on the stacked MoE expert weights (W6-LoRA)

    @property
    def target(self) -> str:
        (base, speed), what = self.speed_target, "real tok/s" if self.packed else "tok/s"
        text = f">= {speed:g}x {base.upper().replace('LIGER', 'Liger')} {what}"
        if self.memory_target:
            base, memory = self.memory_target
            text += f" at <= {memory:g}x {base.upper().replace('LIGER', 'Liger')} memory"
        return text


WORKLOADS = {
    "W1": Workload("W1", LLAMA_1B, "full", 4, 2048, liger=True, memory_budget_gib=1.0 * 16.9,
                   speed_target=("hf+liger", 1.3), memory_target=("hf+liger", 1.0)),
    "W2": Workload("W2", LLAMA_1B, "lora", 4, 2048, speed_target=("hf", 2.0)),
    "W3": Workload("W3", LLAMA_8B, "lora", 1, 4096, liger=True, memory_budget_gib=0.6 * 57.4,
                   speed_target=("hf", 2.0), memory_target=("hf", 0.6)),
    "W4": Workload("W4", LLAMA_8B, "qlora", 1, 4096, memory_budget_gib=0.4 * 47.8,
                   speed_target=("hf", 2.0), memory_target=("hf", 0.4)),
    "W5": Workload("W5", GEMMA3_1B, "full", 4, 2048, liger=True, memory_budget_gib=0.35 * 52.7,
                   speed_target=("hf", 2.0), memory_target=("hf", 0.35)),
    "W6": Workload("W6", QWEN3_MOE, "full", 4, 2048, liger=True, speed_target=("hf", 3.0)),
    "W6-LoRA": Workload("W6-LoRA", QWEN3_MOE, "lora", 4, 2048, speed_target=("hf", 3.0), lora_experts=True),
    "W7": Workload("W7", LLAMA_1B, "full", 4, 8192, packed=True, speed_target=("hf", 10.0)),
}

# initializer_range 0.2: logits of std ~1.6 at hidden 64 (as 0.02 gives at hidden 2048), so the loss depends on the
# tokens and the loss check can see a wrong shift, mask or softcap
TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, initializer_range=0.2)
TINY_OVERRIDES = {
    "gemma3_text": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                        query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
}


def tiny(w: Workload) -> Workload:
    """The same workload on tiny shapes (CPU smoke test): every code path, none of the cost."""
    hf = {**w.hf, **TINY_SHAPE, **TINY_OVERRIDES.get(w.hf["model_type"], {})}
    return Workload(w.name, hf, w.mode, batch=2, seq_len=128 if w.packed else 32, packed=w.packed,
                    memory_budget_gib=w.memory_budget_gib, liger=w.liger, speed_target=w.speed_target,
                    memory_target=w.memory_target, doc_median=20.0, doc_range=(4, 64), lora_experts=w.lora_experts)


# --------------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    hf_labels: torch.Tensor  # (B, T) unshifted (transformers shifts), -100 on padding
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token; None when no padding
    labels: torch.Tensor  # (B, T) pre-shifted, nanotune's convention
    position_ids: torch.Tensor  # (B, T)
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    real_tokens: int  # non-padding tokens
    trained_tokens: int  # labels != -100
    packed: bool = False  # rows hold several documents (what nanotune's loader says of its batches)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.hf_labels), move(self.attention_mask), move(self.labels),
                     move(self.position_ids), move(self.cu_seqlens), self.max_seqlen, self.real_tokens,
                     self.trained_tokens, self.packed)


def dense_batches(w: Workload, vocab: int, n: int, seed: int) -> list[Batch]:
    """Full rows of random token ids, identical for every implementation."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (w.batch, w.seq_len), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
        pos = torch.arange(w.seq_len).expand(w.batch, w.seq_len)
        out.append(Batch(ids, ids, None, labels, pos, None, None, ids.numel(), int((labels != IGNORE_INDEX).sum())))
    return out


class Documents:
    """Random documents with log-normal lengths, in the shape nanotune.packing.BatchLoader reads."""

    def __init__(self, w: Workload, vocab: int, n: int, seed: int):
        rng = np.random.default_rng(seed)
        lengths = rng.lognormal(math.log(w.doc_median), w.doc_sigma, n).round().astype(np.int64)
        self.lengths = np.clip(lengths, *w.doc_range)
        self.ids = [rng.integers(0, vocab, int(k)) for k in self.lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        return self.ids[i], np.ones(len(self.ids[i]), dtype=np.int64)


def from_loader(b: dict) -> Batch:
    """An unpacked loader batch (one document a row, then padding) for the baseline: mask and unshifted labels."""
    ids, pos = b["input_ids"], b["position_ids"]
    B, T = ids.shape
    restart = pos == 0
    restart[:, 0] = False
    doc_len = torch.where(restart.any(1), restart.int().argmax(1), torch.tensor(T))  # (B,) the document's length
    real = torch.arange(T)[None] < doc_len[:, None]  # (B, T)
    hf_labels = torch.where(real, ids, IGNORE_INDEX)
    return Batch(ids, hf_labels, real.long(), b["labels"], pos, b["cu_seqlens"], b["max_seqlen"], int(real.sum()),
                 b["num_trainable_tokens"])


def packed_batch(b: dict) -> Batch:
    """A packed loader batch for nanotune; real tokens = trained tokens + one untrained last token per document."""
    seg_len = torch.diff(b["cu_seqlens"].long())  # (S,) documents and padding runs
    seg_id = torch.repeat_interleave(torch.arange(len(seg_len)), seg_len)  # (B*T,)
    trained = (b["labels"].flatten() != IGNORE_INDEX).float()
    per_seg = torch.zeros(len(seg_len)).index_add_(0, seg_id, trained)
    num_docs = int((per_seg > 0).sum())  # a padding run has no trained label; a document (>= 2 tokens) has
    return Batch(b["input_ids"], b["input_ids"], None, b["labels"], b["position_ids"], b["cu_seqlens"],
                 b["max_seqlen"], b["num_trainable_tokens"] + num_docs, b["num_trainable_tokens"], packed=True)


def document_batches(w: Workload, vocab: int, n: int, seed: int) -> tuple[list[Batch], list[Batch], float]:
    """W7: (baseline batches of `batch` padded rows, nanotune's packed rows of seq_len, mean document length).

    Both read the same documents, shuffled as a training run reads them (nanotune.packing: best-fit decreasing for
    the packed rows, which are then shuffled too, so the timed rows are not the longest-first ones).
    """
    docs = Documents(w, vocab, n * (w.batch + 4 * w.seq_len // int(w.doc_median)), seed)
    padded = BatchLoader(docs, seq_len=w.doc_range[1], micro_batch_size=w.batch, packing=False, seed=seed)
    packed = BatchLoader(docs, seq_len=w.seq_len, micro_batch_size=1, packing=True, seed=seed)
    hf = [from_loader(b) for _, b in zip(range(n), padded)]
    nt = [packed_batch(b) for _, b in zip(range(n), packed)]
    return hf, nt, float(docs.lengths.mean())


def packed_rows_of(batch: Batch) -> Batch:
    """The documents of a padded batch packed into one row (for W7's correctness check on the baseline's batch)."""
    ids, labels, pos = [], [], []
    for row_ids, row_mask in zip(batch.input_ids, batch.attention_mask):
        n = int(row_mask.sum())
        ids.append(row_ids[:n])
        lab = torch.full((n,), IGNORE_INDEX)
        lab[:-1] = row_ids[1:n]
        labels.append(lab)
        pos.append(torch.arange(n))
    ids, labels, pos = torch.cat(ids)[None], torch.cat(labels)[None], torch.cat(pos)[None]
    return Batch(ids, ids, None, labels, pos, None, None, ids.numel(), int((labels != IGNORE_INDEX).sum()),
                 packed=True)


# ------------------------------------------------------------------------------------------------- flops, mfu


def matmul_params(hf: dict, mode: str) -> float:
    """N of PaLM's formula: every matmul weight except the input embedding; the LM head counts even when tied;
    MoE: only the active experts' share (experts x top_k / num_experts)."""
    D, L, V = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    H, KV = hf["num_attention_heads"], hf["num_key_value_heads"]
    Q = hf.get("head_dim") or D // H
    attn = D * H * Q * 2 + D * KV * Q * 2
    if hf.get("num_experts"):
        mlp = D * hf["num_experts"] + 3 * D * hf["moe_intermediate_size"] * hf["num_experts_per_tok"]
    else:
        mlp = 3 * D * hf["intermediate_size"]
    return L * (attn + mlp) + V * D


def flops_per_token(hf: dict, mode: str, attn_len: float) -> float:
    D, L, H = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    Q = hf.get("head_dim") or D // H
    factor = 6 if mode == "full" else 4  # frozen weights get no weight gradient
    return factor * matmul_params(hf, mode) + 12 * L * H * Q * attn_len


# ------------------------------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, batches: list[Batch], warmup: int, steps: int, device) -> dict:
    """Run warmup + steps training steps; the first step's loss (before any update) and the timed steps' rate."""
    batches = [b.to(device) for b in batches[: warmup + steps]]  # host-to-device copies outside the timing
    first_loss = step(batches[0]).item()
    for b in batches[1:warmup]:
        step(b)
    sync(device)
    timed = batches[warmup : warmup + steps]
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for b in timed:
            step(b)
        end.record()
        sync(device)
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for b in timed:
            step(b)
        seconds = time.perf_counter() - t0
    return dict(first_loss=first_loss, step_s=seconds / len(timed),
                tokens_per_s=sum(b.input_ids.numel() for b in timed) / seconds,
                real_tokens_per_s=sum(b.real_tokens for b in timed) / seconds)


def profile_steps(step, batches: list[Batch], device, path: Path) -> None:
    """Two more steps under torch.profiler: a Chrome trace at `path`.json and the top ops by device time at
    `path`.txt (printed too): where a missed target's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for b in batches[:2]:
            step(b)
        sync(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path.with_suffix(".json")))
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=20)
    path.with_suffix(".txt").write_text(table)
    print(table, flush=True)


def make_step(model, optimizer, device, loss_fn):
    """One training step on a batch: loss_fn(model, batch) -> scalar loss, backward, AdamW, zero the gradients."""

    def step(b: Batch) -> torch.Tensor:
        loss = loss_fn(model, b.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def hf_loss(model, b: Batch) -> torch.Tensor:
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.hf_labels).loss


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):  # a device / dtype without the fused kernel
        return torch.optim.AdamW(params, lr=1e-5)


def free() -> None:
    """Give back what the last run left (callers `del` their references first; models hold reference cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_scope(device):
    """Peak allocated memory of what runs inside (what was allocated before counts as the starting level)."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


# ------------------------------------------------------------------------------------------------- HF side


def build_hf(w: Workload, device, dtype, seed: int):
    import transformers

    config = transformers.AutoConfig.for_model(**w.hf, use_cache=False)  # training: no KV cache to build
    torch.manual_seed(seed)  # the weights: the same seed gives the same weights for every implementation
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def hf_quantize_nf4(model: nn.Module, dtype) -> None:
    """What transformers does for load_in_4bit (NF4, double quantisation, bf16 compute), on a built model."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        q = q.to(module.weight.device)  # quantises
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)


def hf_lora(model: nn.Module, w: Workload) -> nn.Module:
    import peft

    if w.lora_experts:
        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=MOE_LORA_TARGETS,
                                 target_parameters=[f"mlp.experts.{t}" for t in EXPERT_TARGETS], task_type="CAUSAL_LM")
    else:
        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def apply_liger(model: nn.Module) -> None:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


def run_hf(w: Workload, batches: list[Batch], args, device, dtype, liger: bool = False) -> dict:
    model = build_hf(w, device, dtype, args.seed)
    if liger:
        apply_liger(model)
    if w.mode == "qlora":
        hf_quantize_nf4(model, dtype)
    if w.mode in ("lora", "qlora"):
        model = hf_lora(model, w)
    model.train()
    with memory_scope(device) as mem:
        optimizer = make_optimizer(model)
        step = make_step(model, optimizer, device, hf_loss)
        result = measure(step, batches, args.warmup, args.steps, device)
    del model, optimizer, step
    free()
    return {**result, **mem}


# ------------------------------------------------------------------------------------------------- nanotune side


def build_nanotune(w: Workload, device, dtype, args) -> tuple[nn.Module, list[str]]:
    """nanotune's model with the HF model's weights (same names), then the swaps: QLoRA, LoRA, kernels, compile."""
    notes = []
    hf_model = build_hf(w, device, dtype, args.seed)
    config = models.config_from_hf(hf_model.config.to_dict())
    config.attn_implementation = "auto"
    config.fuse_projections = args.fuse_projections  # qkv_proj / gate_up_proj, filled from HF's separate tensors
    model = models.build_model(config, "meta", dtype)
    model.to_empty(device=device)
    model.tie_weights()
    copy_weights(model, hf_model.state_dict(), dtype, device)
    del hf_model
    free()
    for module in model.modules():  # RoPE frequencies: derived, not in the state_dict
        if hasattr(module, "materialize_after_load"):
            module.materialize_after_load(device)
    if args.fuse_projections:
        notes.append("fused q/k/v and gate/up projections")
    if w.mode == "qlora":
        from nanotune.qlora import quantize_nf4

        quantize_nf4(model, skip=("lm_head",), compute_dtype=dtype, device=device)
    if w.mode in ("lora", "qlora"):
        from nanotune.lora import apply_lora

        apply_lora(model, MOE_LORA_TARGETS if w.lora_experts else LORA_TARGETS, rank=16, alpha=32, dropout=0.0)
        if w.lora_experts:  # per-expert adapters inside the grouped GEMMs
            from nanotune.lora_experts import apply_expert_lora

            apply_expert_lora(model, EXPERT_TARGETS, rank=16, alpha=32)
    checkpointing, why = args.checkpointing, "asked"
    if checkpointing == "auto":
        checkpointing, why = auto_checkpointing(w, model, dtype, args.chunk_size)
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing, model.activation_checkpointing_k = checkpointing, 2
        notes.append(f"activation checkpointing {checkpointing} ({why})")
    elif checkpointing != "none":
        notes.append(f"activation checkpointing {checkpointing} asked, but {type(model).__name__} has no switch")
    if w.mode == "qlora" and checkpointing == "full":  # the recompute's dequantised weight serves the backward too
        from nanotune.lora import set_fast_path

        set_fast_path(model, keep_dequantized_weight=True)
        notes.append("NF4 weights dequantised once per recompute")
    if args.kernels and (device.type == "cuda" or interpreting()):
        from nanotune.kernels import apply_kernels, triton_available

        if triton_available():
            notes.append(f"triton kernels on {len(apply_kernels(model))} modules")
        else:
            notes.append("triton not installed: no kernels")
    if args.compile:
        for layer in model.model.layers:
            layer.compile()
        notes.append("torch.compile per decoder block")
    return model, notes


# cheapest first, by what the backward recomputes: nothing, the element-wise ops, every other layer, every layer
CHEAPEST_FIRST = ("none", "selective", "every_k", "full")


def state_bytes(model: nn.Module) -> int:
    """Weights and buffers, plus a gradient and two AdamW states in its own dtype for each trainable parameter."""
    params = list(model.parameters())  # a tied weight once
    total = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    return total + sum(3 * p.numel() * p.element_size() for p in params if p.requires_grad)


def memory_estimates(w: Workload, model: nn.Module, dtype, chunk_size: int) -> dict[str, float]:
    """Mode -> GiB by the count: the model's states + each layer's saved activations (scripts/activation_memory.py,
    the base layer without adapters) + one chunk of the chunked loss's logits in `dtype`. Transients of the backward
    are not in it."""
    per_layer = activation_memory.per_layer_table(w.hf, w.batch, w.seq_len, k=2, dtype=dtype)
    loss_chunk = chunk_size * w.hf["vocab_size"] * torch.tensor([], dtype=dtype).element_size()
    fixed = state_bytes(model) + loss_chunk
    return {mode: (fixed + w.hf["num_hidden_layers"] * per_layer[mode]) / 2**30 for mode in CHEAPEST_FIRST}


def auto_checkpointing(w: Workload, model: nn.Module, dtype, chunk_size: int) -> tuple[str, str]:
    """(the cheapest mode whose estimate fits the workload's memory budget, the reason in words)."""
    if w.memory_budget_gib is None:
        return "none", "auto: no memory target"
    estimates = memory_estimates(w, model, dtype, chunk_size)
    fits = [mode for mode in CHEAPEST_FIRST if estimates[mode] <= w.memory_budget_gib]
    mode = fits[0] if fits else "full"
    return mode, (f"auto: {estimates[mode]:.1f} GiB by the count against {w.memory_budget_gib:.1f}; "
                  + ", ".join(f"{m} {estimates[m]:.1f}" for m in CHEAPEST_FIRST))


@torch.no_grad()
def copy_weights(model: nn.Module, hf_sd: dict, dtype, device) -> None:
    """HF tensors into nanotune's model: by name where the names are the same (transformers 5 keeps stacked experts
    under nanotune's names), else through the model's checkpoint-key map (one tensor per expert, older layouts)."""
    own = model.state_dict()
    if set(own) == set(hf_sd):
        model.load_state_dict(hf_sd, strict=True)
        return
    checkpoint_keys = models.expected_checkpoint_keys(model)
    unknown = []
    for key, tensor in hf_sd.items():
        if key in own:
            own[key].copy_(tensor)
        elif key in checkpoint_keys:
            models.place(model, key, tensor, dtype, device)
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"HF parameters with no place in nanotune's {type(model).__name__}: {unknown[:8]}")


def nanotune_loss_sum(model, b: Batch, args) -> torch.Tensor:
    # the model is told whether rows are packed, as the trainer's loader tells it, so that it does not inspect the
    # device for document boundaries (a host sync every step)
    hidden = model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, return_hidden=True,
                   packed=b.packed)  # (B, T, D)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    # None: the Triton chunk kernel on CUDA when triton is installed; under TRITON_INTERPRET=1 on CPU as well
    use_triton = (True if interpreting() else None) if args.kernels else False
    return linear_cross_entropy_sum(hidden, lm_head_weight(model.lm_head), b.labels, chunk_size=args.chunk_size,
                                    softcap=softcap, use_triton=use_triton)


def run_nanotune(w: Workload, batches: list[Batch], args, device, dtype, check_batch: Batch | None) -> dict:
    model, notes = build_nanotune(w, device, dtype, args)
    model.train()
    check_loss = None
    if check_batch is not None:  # W7: the baseline's first documents, packed, before any update
        with torch.no_grad():
            b = check_batch.to(device)
            check_loss = (nanotune_loss_sum(model, b, args) / b.trained_tokens).item()
    with memory_scope(device) as mem:
        optimizer = make_optimizer(model)
        # divided by the step's trained tokens, as the trainer does (HF: the mean over the same tokens)
        step = make_step(model, optimizer, device, lambda m, b: nanotune_loss_sum(m, b, args) / b.trained_tokens)
        result = measure(step, batches, args.warmup, args.steps, device)
    if args.profile:
        profile_steps(step, [b.to(device) for b in batches[-2:]], device, args.profile / f"{w.name}_nanotune")
    del model, optimizer, step
    free()
    if check_loss is not None:
        result["check_loss"] = check_loss
    return {**result, **mem, "notes": notes}


# ------------------------------------------------------------------------------------------------- driver


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def missing_for(w: Workload, impl: str, have: dict) -> str | None:
    """Why an implementation cannot run here, or None."""
    if w.mode == "qlora" and not have["bitsandbytes"]:
        return "bitsandbytes is not installed"
    if impl.startswith("hf") and w.mode != "full" and not have["peft"]:
        return "peft is not installed"
    if impl == "hf+liger" and not have["liger_kernel"]:
        return "liger-kernel is not installed"
    return None


def failure(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text[:300]


def loss_tolerance(dtype, ref: float, mode: str = "full") -> float:
    if dtype != torch.float32:
        return 2e-2 + 1e-2 * abs(ref)
    # QLoRA: the two sides hold different NF4 block scales (bitsandbytes double-quantises them to 8 bits, nanotune keeps
    # them in bf16 so that they shard by rows under FSDP2): weights differ by a few 1e-3 relative, the loss by ~3e-3
    return 1e-2 if mode == "qlora" else 1e-3


def run_workload(w: Workload, args, device, dtype, have, records: list[dict]) -> None:
    n = args.warmup + args.steps
    attn_len = float(w.seq_len)
    check_batch = None
    if w.packed:
        hf_batches, nt_batches, attn_len = document_batches(w, w.hf["vocab_size"], n, args.seed)
        check_batch = packed_rows_of(hf_batches[0])
    else:
        hf_batches = nt_batches = dense_batches(w, w.hf["vocab_size"], n, args.seed)
    flops = flops_per_token(w.hf, w.mode, attn_len)
    for impl, batches in (("hf", hf_batches), ("nanotune", nt_batches)):
        record = dict(workload=w.name, impl=impl, mode=w.mode, batch=w.batch, seq_len=w.seq_len)
        reason = missing_for(w, impl, have)
        if reason:
            records.append({**record, "skipped": reason})
            print(f"{w.name} {impl}: skipped ({reason})", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if impl == "hf":
                result = run_hf(w, batches, args, device, dtype)
            else:
                result = run_nanotune(w, batches, args, device, dtype, check_batch)
        except Exception as e:  # one failure (out of memory, a missing feature) must not lose the other rows
            records.append({**record, "failed": failure(e)})
            print(f"{w.name} {impl}: FAILED {failure(e)}", flush=True)
            free()
            continue
        metric = result["real_tokens_per_s"] if w.packed else result["tokens_per_s"]
        record.update(result, metric_tokens_per_s=metric, flops_per_token=flops)
        if device.type == "cuda":
            record["mfu"] = flops * metric / PEAK_FLOPS
        records.append(record)
        print(f"{w.name} {impl}: {metric:,.0f} tok/s, first loss {result['first_loss']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def run_liger(w: Workload, args, device, dtype, have, records: list[dict]) -> None:
    record = dict(workload=w.name, impl="hf+liger", mode=w.mode, batch=w.batch, seq_len=w.seq_len)
    reason = missing_for(w, "hf+liger", have)
    if reason:
        records.append({**record, "skipped": reason})
        return
    batches = dense_batches(w, w.hf["vocab_size"], args.warmup + args.steps, args.seed)
    try:
        result = run_hf(w, batches, args, device, dtype, liger=True)
    except Exception as e:
        records.append({**record, "failed": failure(e)})
        print(f"{w.name} hf+liger: FAILED {failure(e)}", flush=True)
        free()
        return
    flops = flops_per_token(w.hf, w.mode, float(w.seq_len))
    record.update(result, metric_tokens_per_s=result["tokens_per_s"], flops_per_token=flops)
    if device.type == "cuda":
        record["mfu"] = flops * result["tokens_per_s"] / PEAK_FLOPS
    records.append(record)
    print(f"{w.name} hf+liger: {result['tokens_per_s']:,.0f} tok/s", flush=True)


def summarize(workloads: list[Workload], records: list[dict], dtype) -> list[dict]:
    """Per workload: nanotune / baseline speed and memory ratios and the loss check."""
    out = []
    for w in workloads:
        rows = {r["impl"]: r for r in records if r["workload"] == w.name and "first_loss" in r}
        nt, hf = rows.get("nanotune"), rows.get("hf")
        s = dict(workload=w.name, impl="summary", target=w.target)
        for base in ("hf", "hf+liger"):
            b = rows.get(base)
            if nt and b:
                s[f"speed_vs_{base}"] = nt["metric_tokens_per_s"] / b["metric_tokens_per_s"]
                if "peak_mem_gib" in nt and "peak_mem_gib" in b:
                    s[f"memory_vs_{base}"] = nt["peak_mem_gib"] / b["peak_mem_gib"]
        if nt and hf:
            ours = nt.get("check_loss", nt["first_loss"])
            s["loss_nanotune"], s["loss_hf"] = ours, hf["first_loss"]
            s["loss_ok"] = abs(ours - hf["first_loss"]) <= loss_tolerance(dtype, hf["first_loss"], w.mode)
        s["target_met"] = target_met(w, s)
        out.append(s)
    return out


def target_met(w: Workload, s: dict) -> bool | None:
    """Whether the summary meets the workload's targets and its loss check; None when a needed run is missing."""
    base, least = w.speed_target
    wanted = [(s.get(f"speed_vs_{base}"), lambda ratio: ratio >= least)]
    if w.memory_target:
        base, most = w.memory_target
        wanted.append((s.get(f"memory_vs_{base}"), lambda ratio: ratio <= most))
    if "loss_ok" not in s or any(ratio is None for ratio, _ in wanted):
        return None
    return s["loss_ok"] and all(ok(ratio) for ratio, ok in wanted)


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def print_table(records: list[dict], summaries: list[dict]) -> None:
    print("\n| workload | impl | tok/s | MFU | peak GiB | first loss | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        if "first_loss" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['failed']}"
            print(f"| {r['workload']} | {r['impl']} | - | - | - | - | {why} |")
            continue
        print(f"| {r['workload']} | {r['impl']} | {r['metric_tokens_per_s']:,.0f} | {fmt(r.get('mfu'), '.3f')} | "
              f"{fmt(r.get('peak_mem_gib'), '.1f')} | {r['first_loss']:.4f} | {'; '.join(r.get('notes', []))} |")
    print("\n| workload | speed vs HF | memory vs HF | speed vs HF+Liger | memory vs HF+Liger | loss check | target | "
          "target met |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        check = "-" if "loss_ok" not in s else (
            f"{'ok' if s['loss_ok'] else 'MISMATCH'} ({s['loss_nanotune']:.4f} vs {s['loss_hf']:.4f})")
        ratios = [fmt(s.get(f"{what}_vs_{base}"), ".2f", "x")
                  for base in ("hf", "hf+liger") for what in ("speed", "memory")]
        met = {True: "yes", False: "no", None: "-"}[s["target_met"]]
        print(f"| {s['workload']} | {' | '.join(ratios)} | {check} | {s['target']} | {met} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage=__doc__)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, e.g. W1,W3")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, >= 1 (default 3; 1 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes of every workload (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="also write every record as JSON lines here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing", choices=("auto", *CHEAPEST_FIRST), default="auto",
                   help="nanotune's activation checkpointing (every_k: k = 2); auto: per workload, the cheapest mode "
                        "that fits its memory target by scripts/activation_memory.py's count")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="nanotune without Triton kernels")
    p.add_argument("--compile", action="store_true", help="torch.compile each nanotune decoder block")
    p.add_argument("--fuse-projections", action="store_true",
                   help="nanotune with q/k/v and gate/up as one GEMM each (model.fuse_projections; not QLoRA)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the fused linear + CE")
    p.add_argument("--no-liger", dest="liger", action="store_false", help="skip the HF + Liger-Kernel rows")
    p.add_argument("--profile", type=Path, default=None,
                   help="folder: profile two more nanotune steps per workload (Chrome trace + top ops table)")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first warm-up step gives the loss check)")
    unknown = [n for n in args.workloads.split(",") if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    quantized = [n for n in args.workloads.split(",") if WORKLOADS[n].mode == "qlora"]
    if args.fuse_projections and quantized:
        others = ", ".join(n for n, w in WORKLOADS.items() if w.mode != "qlora")
        p.error(f"--fuse-projections: {quantized} quantise q_proj ... up_proj to NF4 one by one, which a fused model "
                f"does not have (model.fuse_projections refuses lora.quantize); choose among {others}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU smoke test: fp32 for a tight check
    workloads = [WORKLOADS[n] for n in args.workloads.split(",")]
    if args.tiny:
        workloads = [tiny(w) for w in workloads]
    have = versions()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = dict(impl="run", card=card, date=now,
                  command=" ".join(["python", "scripts/bench.py", *(argv if argv is not None else sys.argv[1:])]),
                  dtype=str(dtype).removeprefix("torch."), steps=args.steps, warmup=args.warmup, **have)
    print(json.dumps(header), flush=True)

    # records are written as they come, so a run stopped by a time limit keeps what it measured
    sink = open(args.out, "w") if args.out else None
    records: list[dict] = []
    written = 0

    def write_new(extra=()) -> None:
        nonlocal written
        if sink:
            for record in [*records[written:], *extra]:
                sink.write(json.dumps(record) + "\n")
            sink.flush()
        written = len(records)

    write_new([header])
    for w in workloads:
        run_workload(w, args, device, dtype, have, records)
        write_new()
    if args.liger:  # last: Liger patches transformers' modules for everything after it
        for w in workloads:
            if w.liger:
                run_liger(w, args, device, dtype, have, records)
                write_new()
    summaries = summarize(workloads, records, dtype)
    write_new(summaries)
    if sink:
        sink.close()
    print_table(records, summaries)
    mismatched = [s["workload"] for s in summaries if s.get("loss_ok") is False]
    crashed = [f"{r['workload']} {r['impl']}" for r in records if "failed" in r]
    if mismatched:
        print(f"\nloss check FAILED for {mismatched}: nanotune and the HF baseline disagree on identical weights and "
              "tokens")
    if crashed:
        print(f"\nruns that failed: {crashed}")
    return 1 if mismatched else 2 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
