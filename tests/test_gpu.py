"""What only a GPU can show: every family trains in bf16 on CUDA with the fast paths (flex, varlen, Triton kernels,
torch._grouped_mm, bitsandbytes NF4) and matches the fp32 CPU model; the trainer runs end to end on a GPU.

Every test here carries the `cuda` mark and skips without a GPU (`python -m pytest -m cuda` runs them on one;
scripts/gpu_check.sh does, with a time limit). The kernels' own tests (tests/test_kernels.py, tests/test_loss.py)
compile for the GPU by themselves when one is present.

Tolerances: bf16 keeps 8 bits of mantissa (relative rounding ~4e-3 per operation), so a 2-layer model's logits in
bf16 land within ~1e-2 of fp32 (norm-wise relative error); 3e-2 leaves room for accumulation order, 6e-2 for the
gradients that go through one more pass. MoE families get 8e-2 and 0.15: bf16 rounding of the router's logits flips
some tokens' top-k choice to another expert (the same model in bf16 on CPU lands at 0.045 and 0.09). A wrong mask,
shift or softcap is off by far more (order 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models

pytestmark = pytest.mark.cuda
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
TOLERANCES = {"dense": (3e-2, 6e-2), "moe": (8e-2, 0.15)}  # (logits, gradients), norm-wise relative

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False,
            initializer_range=0.1)


def hf_config(family: str) -> dict:
    """A tiny config.json of `family`, written by transformers' own config class (every key as the Hub has it)."""
    if family == "llama":
        config = transformers.LlamaConfig(**BASE)
    elif family == "mistral":
        config = transformers.MistralConfig(**BASE, sliding_window=48)
    elif family == "gemma2":
        config = transformers.Gemma2Config(**BASE, sliding_window=48, query_pre_attn_scalar=32,
                                           attn_logit_softcapping=20.0, final_logit_softcapping=10.0)
    elif family == "gemma3_text":
        config = transformers.Gemma3TextConfig(**BASE, sliding_window=48, query_pre_attn_scalar=32,
                                               layer_types=["sliding_attention", "full_attention"])
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    else:  # qwen2_moe: with the gated shared expert
        config = transformers.Qwen2MoeConfig(**BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                                             shared_expert_intermediate_size=128)
    return config.to_dict()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


def packed_batch(lengths_per_row: list[list[int]], seed: int = 0):
    """Random ids (B, T) and position ids restarting at 0 for every document of a row."""
    gen = torch.Generator().manual_seed(seed)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    input_ids = torch.randint(0, VOCAB, position_ids.shape, generator=gen)
    return input_ids, position_ids


def reference_model(family: str) -> torch.nn.Module:
    """The fp32 CPU model with eager attention: the oracle."""
    config = models.config_from_hf(hf_config(family))
    config.attn_implementation = "eager"
    model = models.build_model(config, "cpu")
    model.tie_weights()
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # norms of 1 (or 0 for Gemma) would hide a wrong norm kernel: randomise them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def loss_and_grads(model, input_ids, position_ids, device):
    """Logits (B, T, V) and the gradients of a fixed function of them, on `device`."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids.to(device), position_ids.to(device))  # (B, T, V)
    weights = torch.linspace(-1, 1, logits.shape[-1], device=device)  # a dense upstream gradient
    (logits.float() * weights).sum().div(logits.shape[0] * logits.shape[1]).backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), grads


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text", "qwen3_moe", "qwen2_moe"])
def test_family_in_bf16_on_cuda_matches_fp32_cpu(family, kernels):
    reference = reference_model(family)
    input_ids, position_ids = packed_batch([[100, 60, 96], [256]])  # packed row + a row longer than the windows
    ref_logits, ref_grads = loss_and_grads(reference, input_ids, position_ids, "cpu")

    model = reference_model(family).to("cuda", torch.bfloat16)
    for module in model.modules():  # RoPE frequencies are derived, not parameters
        if hasattr(module, "materialize_after_load"):
            module.materialize_after_load("cuda")
    model.config.attn_implementation = "auto"  # flex / varlen / sdpa, whatever the family and row need
    if kernels:
        from nanotune.kernels import apply_kernels

        assert apply_kernels(model), "no module was swapped for a Triton kernel"
    logits, grads = loss_and_grads(model, input_ids, position_ids, "cuda")
    logits_tol, grad_tol = TOLERANCES["moe" if "moe" in family else "dense"]
    assert torch.isfinite(logits).all()
    assert rel_err(logits, ref_logits) <= logits_tol
    assert set(grads) == set(ref_grads)
    worst = max(grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
    assert rel_err(grads[worst], ref_grads[worst]) <= grad_tol, worst


def test_flex_attention_compiled_on_cuda_matches_eager_with_window_and_softcap():
    from models import attention as A

    if A.flex_attention_fn() is None:
        pytest.fail("this torch has no flex_attention")
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, D = 2, 4, 2, 384, 64
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    _, position_ids = packed_batch([[200, 100, 84], [384]])
    out = {}
    for name, dtype, device in (("flex", torch.bfloat16, "cuda"), ("eager", torch.float32, "cpu")):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        ctx = A.build_context(name, (B, T), device, position_ids=position_ids.to(device))
        o = A.attend(*leaves, ctx, sliding_window=64, softcap=5.0)
        (o.float() * torch.linspace(-1, 1, D, device=device)).sum().backward()
        out[name] = [o] + [t.grad for t in leaves]
    for got, expected, what in zip(out["flex"], out["eager"], ("out", "dq", "dk", "dv")):
        assert rel_err(got, expected) <= (1e-2 if what == "out" else 2e-2), what


def test_grouped_mm_is_used_on_cuda_and_matches_the_padded_bmm():
    from models.qwen_moe import grouped_matmul, grouped_mm_works

    assert grouped_mm_works("cuda", torch.bfloat16), "torch._grouped_mm refused bf16 on this GPU"
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([7, 0, 33, 24])  # an empty group too
    x = torch.randn(int(counts.sum()), 128, generator=gen)
    w = torch.randn(4, 64, 128, generator=gen) / 128**0.5
    results = []
    for use_grouped_mm in (True, False):
        xs, ws = (t.to("cuda", torch.bfloat16).requires_grad_() for t in (x, w))
        y = grouped_matmul(xs, ws, counts.cuda(), use_grouped_mm)  # (M, 64)
        (y.float() * torch.linspace(-1, 1, 64, device="cuda")).sum().backward()
        results.append((y, xs.grad, ws.grad))
    for got, expected in zip(*results):
        assert rel_err(got, expected) <= 1e-2


def test_nf4_linear_on_cuda_with_lora_matches_its_dequantised_weight():
    pytest.importorskip("bitsandbytes")
    from nanotune.lora import apply_lora
    from nanotune.qlora import NF4Linear

    gen = torch.Generator().manual_seed(6)
    linear = torch.nn.Linear(256, 512, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(512, 256, generator=gen) / 16)
        linear.bias.copy_(torch.randn(512, generator=gen))
    nf4 = NF4Linear.from_linear(linear.cuda(), compute_dtype=torch.bfloat16)
    assert nf4.weight.device.type == "cuda" and nf4.weight.dtype == torch.uint8
    w = nf4.dequantize()  # (512, 256) bf16
    assert rel_err(w, linear.weight) <= 0.12  # NF4's error on Gaussian weights is ~0.1 of their norm
    x = torch.randn(3, 10, 256, generator=gen).cuda().to(torch.bfloat16)
    expected = torch.nn.functional.linear(x, w, nf4.bias)
    assert rel_err(nf4(x), expected) <= 1e-2

    model = torch.nn.Sequential()
    model.add_module("proj", nf4)
    assert apply_lora(model, ["proj"], rank=8, alpha=16) == ["proj"]
    lora = model.proj
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x.requires_grad_()
    y = model(x)
    y.float().sum().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_trainer_runs_the_quickstart_on_cuda(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "nanotune" / "train.py"), str(ROOT / "configs" / "quickstart.toml"),
           f"--output_dir={out}", "--device=cuda", "--train.max_steps=60", "--train.eval_every=30",
           "--logging.every=10", "--train.precision=amp-bf16", "--train.kernels=true"]  # varlen + Triton
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert any("eval_loss" in r for r in lines)
    assert (out / "final" / "config.json").exists()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_batches_arrive_pinned_and_copy_to_the_device_unchanged(prefetch):
    """With a CUDA pin_device the loader hands out pinned tensors (made on its prefetch thread when prefetch > 0), so
    the trainer's non-blocking copies never wait; the batches are those of a loader that does not pin."""
    from nanotune.packing import BatchLoader
    from nanotune.train import to_device
    from tests.test_packing import ToyData, lengths

    data = ToyData(lengths(100))
    args = dict(seq_len=256, micro_batch_size=2, seed=1)
    expected = list(BatchLoader(data, **args))
    loader = BatchLoader(data, **args, prefetch=prefetch, pin_device=torch.device("cuda"))
    device = torch.device("cuda", torch.cuda.current_device())
    count = 0
    for got, want in zip(loader, expected, strict=True):
        tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
        assert tensors and all(got[k].is_pinned() for k in tensors)
        assert not want["input_ids"].is_pinned()
        on_device = to_device(got, device)
        torch.cuda.synchronize()
        for k in tensors:
            assert on_device[k].device == device and torch.equal(on_device[k].cpu(), want[k]), k
        count += 1
    assert count == len(expected) > 0
    unpinned = to_device(expected[0], device)  # a tensor made after the loader (context parallelism) is pinned there
    assert torch.equal(unpinned["labels"].cpu(), expected[0]["labels"])
