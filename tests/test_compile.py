"""A compile-clean forward and loss: torch._dynamo captures a whole tiny model + loss of every family, plain and packed
rows, in one graph (no host sync, no data-dependent shape), and a compiled training run equals an eager one."""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo

import models
from nanotune.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum, lm_head_weight

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
GEMMA = dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=16)
MOE = dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "gemma2": dict(model_type="gemma2", **GEMMA),  # attention softcap: eager under "auto" on CPU
    "gemma3_text": dict(model_type="gemma3_text", layer_types=["sliding_attention", "full_attention"], **GEMMA),
    "qwen2_moe": dict(model_type="qwen2_moe", shared_expert_intermediate_size=24, **MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", **MOE),
}


def tiny_model(family: str, attn: str = "sdpa"):
    """fp32, but the MoE families in bf16: torch._grouped_mm traces for bf16 only in this torch, and in fp32 on CPU
    the experts take the padded-bmm path, which reads the busiest expert's count (a documented host sync, chosen when
    the model is built; tests/test_moe_compile.py)."""
    config = models.config_from_hf({**TINY, **FAMILIES[family]})
    config.attn_implementation = attn
    model = models.build_model(config, "cpu", torch.bfloat16 if "moe" in family else torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def rows(packed: bool, B: int = 2, T: int = 12):
    """A batch as the loader makes it: packed rows of two documents (7 + 5 tokens), or one document per row."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels[:, :3] = IGNORE_INDEX  # a prompt
    if packed:
        position_ids = torch.cat([torch.arange(7), torch.arange(5)]).expand(B, T).contiguous()
        cu_seqlens = torch.tensor([0, 7, 12, 19, 24], dtype=torch.int32)
        labels[:, 6] = IGNORE_INDEX  # a document's last token is never trained on the next document's first
        max_seqlen = 7
    else:
        position_ids = torch.arange(T).expand(B, T).contiguous()
        cu_seqlens, max_seqlen = torch.tensor([0, T, 2 * T], dtype=torch.int32), T
    return dict(input_ids=input_ids, labels=labels, position_ids=position_ids, cu_seqlens=cu_seqlens,
                max_seqlen=max_seqlen, packed=packed)


def loss_sum(model, batch, chunked=True):
    """The trainer's loss: the model's hidden states -> chunked LM head + CE (or plain CE on logits)."""
    out = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"],
                return_hidden=chunked, packed=batch["packed"])
    if not chunked:
        return cross_entropy_sum(out, batch["labels"])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return linear_cross_entropy_sum(out, lm_head_weight(model.lm_head), batch["labels"], softcap=softcap)


def graph_breaks(fn, *args) -> list[str]:
    """Where torch._dynamo breaks the graph of fn(*args): one line per break (empty: a single graph)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [f"{r.reason.splitlines()[0]} at {r.user_stack[-1] if r.user_stack else '?'}"
               for r in explanation.break_reasons]
    return reasons or ["(unnamed)"] * explanation.graph_break_count


@pytest.mark.parametrize("family", FAMILIES)
def test_model_and_loss_have_no_graph_break(family):
    """Plain and packed rows, forward + chunked loss, in training mode (what train.compile = "model" captures)."""
    model = tiny_model(family, attn="auto")  # sdpa on CPU; eager for Gemma 2's attention softcap
    plain, packed = rows(packed=False), rows(packed=True)

    def both(plain, packed):
        return loss_sum(model, plain) + loss_sum(model, packed)

    assert graph_breaks(both, plain, packed) == []


def test_plain_loss_on_logits_has_no_graph_break():
    model = tiny_model("llama")
    assert graph_breaks(functools.partial(loss_sum, model, chunked=False), rows(packed=True)) == []


def test_flex_forward_has_no_graph_break():
    """flex cannot backpropagate on CPU with this torch: its forward (evaluation) is captured whole; Gemma 2 asks for
    sliding windows and the softcap score_mod."""
    model = tiny_model("gemma2", attn="flex").eval()
    with torch.no_grad():
        assert graph_breaks(functools.partial(loss_sum, model), rows(packed=True)) == []


def test_packed_flag_needs_no_look_at_the_data():
    """packed=True/False from the loader gives the same numbers as finding out from the data (packed=None)."""
    model = tiny_model("llama").eval()
    for packed in (False, True):
        batch = rows(packed)
        told = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"],
                     packed=packed)
        found = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"] if packed else None)
        torch.testing.assert_close(told, found, rtol=0, atol=0)


def test_compiled_forward_loss_and_backward_equal_eager():
    """Gemma 2 (softcaps, sliding windows, eager attention under auto) on packed rows: one graph (fullgraph) with
    AOTAutograd's backward gives the eager loss and gradients."""
    model = tiny_model("gemma2", attn="auto")
    batch = rows(packed=True)
    expected = loss_sum(model, batch)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(functools.partial(loss_sum, model), backend="aot_eager", fullgraph=True)
    out = compiled(batch)
    out.backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-5, atol=1e-7, msg=n)
