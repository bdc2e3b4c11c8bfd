"""Quantisation-aware training: fake-quant numerics against plain references, the straight-through gradient, the
int4 export and its loader, the trainer's start step, and a toy task where QAT beats quantising after training."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import models
from nanotune import qat
from nanotune.config import ConfigError, QatConfig
from nanotune.qat import QATLinear, apply_qat, fake_quantize_int4, fake_quantize_int8_per_token, set_fake_quant
from tests.test_train import losses, run  # noqa: F401  (run is the trainer fixture)


def reference_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group by group in float64: scale = max |w| / 7, round half to even, clamp to [-8, 7], multiply back."""
    out = torch.empty_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            group = w[r, start:start + group_size].double()
            scale = max(group.abs().max().item(), 1e-12) / 7
            out[r, start:start + group_size] = (group / scale).round().clamp(-8, 7) * scale
    return out


def reference_int8_token(x: torch.Tensor) -> torch.Tensor:
    """Token by token in float64: 256 levels spanning [min(x, 0), max(x, 0)], with 0 exactly on the grid."""
    out = torch.empty_like(x, dtype=torch.float64)
    for i, row in enumerate(x.double()):
        low, high = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        scale = max(high - low, 1e-12) / 255
        zero = -128 - round(low / scale)
        out[i] = ((row / scale).round() + zero).clamp(-128, 127).sub(zero) * scale
    return out


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_weight_fake_quant_equals_the_reference(group_size):
    """fp32 against float64 arithmetic: values agree to fp32 rounding of one multiply (rtol 1e-6); 16 levels per
    group at most, and every group's largest magnitude is exact."""
    w = torch.randn(6, 256, generator=torch.Generator().manual_seed(0))
    w[2, 40] = 9.0  # an outlier only affects its own group
    got, want = fake_quantize_int4(w, group_size), reference_int4(w, group_size)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    groups = got.view(6, -1, group_size)
    assert all(len(torch.unique(g)) <= 16 for g in groups.reshape(-1, group_size))
    torch.testing.assert_close(groups.abs().amax(-1), w.view(6, -1, group_size).abs().amax(-1))


def test_int8_per_token_fake_quant_equals_the_reference():
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(1)) * torch.tensor([[0.01], [1], [30], [1], [1]])
    x[3] = x[3].abs()  # all positive: the grid starts at 0
    x[4] = 0.0  # all zero: finite, exact
    got = fake_quantize_int8_per_token(x)
    torch.testing.assert_close(got.double(), reference_int8_token(x), rtol=1e-6, atol=1e-9)
    assert (got[4] == 0).all()
    step = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255  # each token's error is at most half its step
    assert ((got - x).abs() <= step.unsqueeze(1) / 2 * (1 + 1e-5)).all()


def test_gradients_pass_straight_through():
    """d/dw of sum(c * fq(w)) is c, as if there were no rounding; the same for the activations."""
    w = torch.randn(4, 64, requires_grad=True)
    c = torch.randn(4, 64)
    (fake_quantize_int4(w, 32) * c).sum().backward()
    torch.testing.assert_close(w.grad, c)
    x = torch.randn(3, 64, requires_grad=True)
    (fake_quantize_int8_per_token(x) * c[:3]).sum().backward()
    torch.testing.assert_close(x.grad, c[:3])


def test_qat_linear_keeps_parameters_and_computes_on_the_grids():
    base = nn.Linear(64, 32)
    layer = QATLinear(base, "int8-int4", 32)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 5, 64)
    want = nn.functional.linear(fake_quantize_int8_per_token(x), fake_quantize_int4(base.weight, 32), base.bias)
    torch.testing.assert_close(layer(x), want)
    layer.fake_quant = False
    torch.testing.assert_close(layer(x), base(x))
    weight_only = QATLinear(base, "int4", 32)
    torch.testing.assert_close(weight_only(x), nn.functional.linear(x, fake_quantize_int4(base.weight, 32), base.bias))


def test_swap_filter():
    model = nn.ModuleDict(dict(a=nn.Linear(64, 32), odd=nn.Linear(48, 32), lm_head=nn.Linear(64, 96)))
    assert apply_qat(model, group_size=32, skip=["lm_head"]) == ["a"]  # 48 inputs do not split into groups of 32


def test_pack_unpack_round_trip():
    q = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
    packed = qat.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert torch.equal(qat.unpack_int4(packed), q)


@pytest.mark.parametrize("cfg, message", [
    (QatConfig(enabled=True, scheme="int2"), "qat.scheme = 'int2' is not one of"),
    (QatConfig(enabled=True, group_size=48), "qat.group_size = 48 is not one of"),
    (QatConfig(enabled=True, start_step=-1), "qat.start_step must be at least 0"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        qat.check_config(cfg)


def test_refuses_lora_and_fp8_together_with_qat():
    with pytest.raises(ConfigError, match="set lora.enabled = false"):
        qat.check_config(QatConfig(enabled=True), lora_enabled=True)
    with pytest.raises(ConfigError, match="enable one of them"):
        qat.check_config(QatConfig(enabled=True), fp8_enabled=True)


# ------------------------------------------------------------------------------------------------ the toy task


def train_regression(qat_on: bool, steps: int = 100, seed: int = 0) -> nn.Module:
    """Fit a two-layer MLP to a fixed random teacher, from the same start near it; with or without fake quantisation.

    lr 1e-4 is a fine-tuning rate: with the straight-through estimator, Adam at 3e-4 and above was seen to make the
    QAT loss climb again after ~50 steps (weights hopping between grid points), which is why QAT runs want small rates.
    """
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))
    student = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))
    with torch.no_grad():
        for p, q in zip(teacher.parameters(), student.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            q.copy_(p + torch.randn(p.shape, generator=g) * 0.02)  # fine-tuning: start near the solution
    apply_qat(student, "int8-int4", 32, skip=[])
    set_fake_quant(student, qat_on)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    x = torch.randn(1024, 64, generator=g)
    with torch.no_grad():
        y = teacher(x)
    for _ in range(steps):
        loss = (student(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval_data = (torch.randn(1024, 64, generator=g), teacher)
    return student


def quantised_loss(student: nn.Module) -> float:
    x, teacher = student.eval_data
    set_fake_quant(student, True)  # what the served int8-int4 model computes
    with torch.no_grad():
        return (student(x) - teacher(x)).square().mean().item()


def test_qat_then_quantise_loses_less_than_train_then_quantise():
    """Same start, data, steps and optimizer; the only difference is fake quantisation during training. Both are
    measured on held-out inputs after quantisation; QAT must come out lower (both numbers are in the message)."""
    plain, aware = quantised_loss(train_regression(qat_on=False)), quantised_loss(train_regression(qat_on=True))
    assert aware < plain, f"quantised MSE: QAT {aware:.3e}, train-then-quantise {plain:.3e}"


# ------------------------------------------------------------------------------------------------ the trainer


def test_trainer_starts_qat_at_start_step_and_exports_a_loadable_int4_model(run):
    """Steps before qat.start_step train exactly as without QAT (same losses); after it they differ. final/ holds
    the full-precision weights, final/quantized the int4 export, and load_quantized computes what a QAT model
    built from final/ computes with fake quantisation on."""
    plain = run("--train.max_steps=3")
    aware = run("--train.max_steps=3", "--qat.enabled=true", "--qat.start_step=2", "--qat.group_size=32")
    a, b = losses(plain), losses(aware)
    assert a[:2] == b[:2] and a[2] != b[2]
    final = aware / "final"
    assert (final / "model.safetensors").is_file() and (final / "quantized" / "model.safetensors").is_file()
    full = models.from_pretrained(final)
    assert apply_qat(full, "int8-int4", 32, skip=QatConfig().skip)
    served = qat.load_quantized(final / "quantized")
    ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(ids), full(ids), rtol=1e-5, atol=1e-5)  # fp32 rounding of the scale only
        set_fake_quant(full, False)
        assert (served(ids) - full(ids)).abs().max() > 1e-3  # the export really is quantised
