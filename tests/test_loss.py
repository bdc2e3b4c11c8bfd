"""The fused linear + cross-entropy against the plain loss: value and gradients, chunking, softcap, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanotune.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum, lm_head_weight


def make_inputs(B=2, T=13, D=16, V=50, dtype=torch.float64, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[::ignore_every] = IGNORE_INDEX
    return hidden, weight, labels


def plain(hidden, weight, labels, softcap=None):
    return cross_entropy_sum(hidden @ weight.t(), labels, softcap=softcap)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 1024])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_matches_plain_value_and_gradients(chunk_size, softcap):
    hidden, weight, labels = make_inputs()
    ref = plain(hidden, weight, labels, softcap)
    out = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=chunk_size, softcap=softcap)
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-5)
    # a non-trivial upstream gradient (the trainer divides by the step's trainable tokens)
    g_ref = grads(ref / 7.0, hidden, weight)
    g_out = grads(out / 7.0, hidden, weight)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_positions_get_zero_gradient_and_frozen_weight_gets_none():
    hidden, weight, labels = make_inputs()
    weight = weight.detach()  # a frozen LM head (LoRA): no weight gradient is computed
    out = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=4)
    (g_hidden,) = grads(out, hidden)
    ignored = labels == IGNORE_INDEX
    assert ignored.any()
    assert torch.all(g_hidden[ignored] == 0)
    assert torch.all(g_hidden[~ignored].abs().sum(-1) > 0)
    (g_ref,) = grads(plain(hidden, weight, labels), hidden)
    torch.testing.assert_close(g_hidden, g_ref, rtol=1e-5, atol=1e-6)


def test_all_positions_ignored_gives_zero_with_a_graph():
    hidden, weight, labels = make_inputs()
    labels = torch.full_like(labels, IGNORE_INDEX)
    out = linear_cross_entropy_sum(hidden, weight, labels)
    assert out.item() == 0.0
    g_hidden, g_weight = grads(out, hidden, weight)
    assert torch.all(g_hidden == 0) and torch.all(g_weight == 0)


def test_plain_softcap_matches_gemma_softcap():
    models_gemma = pytest.importorskip("models.gemma")
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 40
    labels = torch.randint(0, 11, (2, 5))
    capped = models_gemma.softcap(logits, 30.0)
    ref = torch.nn.functional.cross_entropy(capped.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(cross_entropy_sum(logits, labels, softcap=30.0), ref.float())


def test_bf16_close_to_fp32_reference():
    hidden, weight, labels = make_inputs(B=2, T=32, D=32, V=96, dtype=torch.float32)
    ref = plain(hidden, weight, labels)
    g_ref = grads(ref, hidden, weight)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    out = linear_cross_entropy_sum(h16, w16, labels, chunk_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=0.0)
    g_out = grads(out, h16, w16)
    assert g_out[0].dtype == torch.bfloat16 and g_out[1].dtype == torch.bfloat16
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.02)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) that any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_never_holds_logits_for_all_tokens():
    B, T, D, V, chunk = 2, 64, 8, 512, 16
    hidden, weight, labels = make_inputs(B=B, T=T, D=D, V=V, dtype=torch.float32, ignore_every=10**9)
    with LargestTensor() as fused:
        linear_cross_entropy_sum(hidden, weight, labels, chunk_size=chunk).backward()
    with LargestTensor() as unfused:
        plain(hidden, weight, labels).backward()
    assert unfused.largest >= B * T * V  # the check can see full logits when they exist
    assert fused.largest <= max(chunk * V, V * D, B * T * D)  # one chunk of logits, the weight, the hidden states


def test_lm_head_weight_refuses_heads_that_are_not_plain_linears():
    head = torch.nn.Linear(8, 20, bias=False)
    assert lm_head_weight(head) is head.weight
    with pytest.raises(ValueError, match="cross_entropy_sum"):
        lm_head_weight(torch.nn.Linear(8, 20, bias=True))
    lora = pytest.importorskip("nanotune.lora")
    model = torch.nn.Sequential()
    model.lm_head = torch.nn.Linear(8, 20, bias=False)
    lora.apply_lora(model, ["lm_head"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="LoRALinear"):
        lm_head_weight(model.lm_head)
