"""NF4 stacked experts (lora.quantize_experts): quantised per expert, as nanotune/qlora.py quantises a weight, while the
checkpoint streams in; their storage in bytes against bf16, outputs within NF4 error of the bf16 model, the
re-dequantising backward, LoRA on top."""

from __future__ import annotations

import pytest
import torch

import models
from models.qwen_moe import Experts, grouped_matmul
from nanotune import lora, lora_experts
from nanotune.config import LoraConfig
from nanotune.lora_experts import FrozenExperts
from nanotune.qlora import dequantize_nf4, quantize_nf4_rows
from tests.test_models_qwen_moe import VOCAB, loop_reference, write_checkpoint

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")


def nf4_model(folder, **lora_options):
    """The checkpoint loaded with its experts quantised while streaming in (bf16 elsewhere), as training does."""
    cfg = LoraConfig(enabled=True, targets=["q_proj"], quantize_experts=True, rank=4, alpha=8, **lora_options)
    return models.from_pretrained(folder, dtype=torch.bfloat16, prepare=lora.prepare_from_config(cfg))


def test_each_expert_is_quantised_as_qlora_quantises_a_weight(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen3_moe")
    bf16 = models.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    model = nf4_model(tmp_path / "m")
    for plain, layer in zip(bf16.model.layers, model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, FrozenExperts) and experts.nf4
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(plain.mlp.experts, name).detach()  # (E, out, in) bf16
            # each expert's matrix quantised on its own, as QLoRA quantises a linear weight: the stack equals it exactly
            each = [dequantize_nf4(*quantize_nf4_rows(w[e]), w.shape[2], torch.bfloat16) for e in range(w.shape[0])]
            dequantised = experts.weight(name)
            assert torch.equal(dequantised, torch.stack(each))
            # and NF4's error: half the widest gap between levels (1 - 0.696) times the block's absmax, at most
            error = (dequantised.float() - w.float()).abs().amax(dim=-1)  # (E, out): in <= 64, one block a row
            absmax = w.float().abs().amax(dim=-1)
            assert (error <= 0.153 * absmax * 1.01 + 1e-4).all() and error.max() > 0
    trainable, total = lora.count_parameters(model)
    assert total == lora.count_parameters(bf16)[1] + trainable  # the NF4 stacks count as the values they stand for


def test_nf4_expert_storage_against_bf16():
    base = Experts(8, 128, 64)  # rows of whole blocks: no padding
    base.gate_up_proj = torch.nn.Parameter(torch.randn(8, 128, 128, dtype=torch.bfloat16))
    base.down_proj = torch.nn.Parameter(torch.randn(8, 128, 64, dtype=torch.bfloat16))
    module = FrozenExperts(base, nf4=True)
    bf16_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    values = bf16_bytes // 2
    assert module.storage_bytes() == values // 2 + values // 64 * 2  # 4-bit codes + a bf16 absmax per 64 values
    assert module.storage_bytes() / bf16_bytes == pytest.approx(0.265625)


def test_outputs_are_within_nf4_error_of_the_bf16_model(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen2_moe")
    bf16 = models.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    model = nf4_model(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ref, ours = bf16(ids).float(), model(ids).float()
        # the same model with its expert stacks replaced by their dequantised NF4 values: equal up to bf16 rounding
        for plain, layer in zip(bf16.model.layers, model.model.layers):
            for name in ("gate_up_proj", "down_proj"):
                getattr(plain.mlp.experts, name).copy_(layer.mlp.experts.weight(name))
        dequantised = bf16(ids).float()
    assert (ours - dequantised).abs().max() <= 2e-2
    # and NF4's error: clearly there, and small next to the logits
    error = (ours - ref).abs().max()
    assert 0 < error <= 0.1 * ref.abs().max()


def test_backward_dequantises_again_and_gives_the_gradient_of_the_dequantised_weight():
    gen = torch.Generator().manual_seed(0)
    base = Experts(4, 64, 32)
    base.gate_up_proj = torch.nn.Parameter(torch.randn(4, 64, 64, generator=gen))
    base.down_proj = torch.nn.Parameter(torch.randn(4, 64, 32, generator=gen))
    module = FrozenExperts(base, nf4=True)  # quantised now: the weights are loaded
    module.choose_kernel("cpu")
    calls = []
    weight = module.weight
    module.weight = lambda name: calls.append(name) or weight(name)
    counts = torch.tensor([5, 0, 2, 6])
    x = torch.randn(13, 32, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    out = module.project("down_proj", x, counts)  # (13, 64)
    g = torch.randn(out.shape, generator=gen, dtype=torch.bfloat16)
    out.backward(g)
    assert calls == ["down_proj", "down_proj"]  # once in the forward, once in the backward: nothing kept between
    x2 = x.detach().clone().requires_grad_()
    loop_reference(x2, weight("down_proj"), counts).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)


def test_lora_on_nf4_experts_trains_and_merges_into_the_dequantised_weights(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen3_moe")
    model = nf4_model(tmp_path / "m", target_experts=["gate_up_proj", "down_proj"])
    experts = model.model.layers[0].mlp.experts
    assert experts.nf4 and set(experts.lora_A) == {"gate_up_proj", "down_proj"}
    ids = torch.randint(0, VOCAB, (2, 16))
    logits = model(ids)
    (logits.float().square().mean() + model.aux_loss).backward()
    for p in (experts.lora_A["gate_up_proj"], experts.lora_B["down_proj"]):
        assert p.grad is not None
    assert experts.lora_B["down_proj"].grad.abs().max() > 0  # B starts at zero; its gradient does not
    with torch.no_grad():
        for p in experts.lora_B.values():
            p.normal_(0.0, 0.2)
        adapted = model(ids).float()
        lora.merge_lora(model)
        assert type(model.model.layers[0].mlp.experts) is Experts
        assert (model(ids).float() - adapted).abs().max() <= 3e-2  # bf16 merged weights against bf16 + fp32 adapters
