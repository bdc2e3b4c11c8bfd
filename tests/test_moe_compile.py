"""A MoE layer never syncs with the host: torch.compile traces a Qwen MoE decoder block, forward and backward, into one
graph, and the whole model with its loss and router losses too when the batch says whether it is packed
(torch._dynamo.explain counts the breaks)."""

from __future__ import annotations

import pytest
import torch

import models
from models import attention
from models.qwen_moe import QwenMoeConfig, SparseMoeBlock, grouped_mm_works, load_balancing_loss, router_z_loss
from tests.conftest import assert_compiled_backward_matches_eager

if not (grouped_mm_works("cpu", torch.bfloat16) and grouped_mm_works("meta", torch.bfloat16)):
    pytest.skip("torch._grouped_mm does not run and compile in bf16 on CPU in this torch", allow_module_level=True)

VOCAB = 64


def tiny_model(family: str) -> torch.nn.Module:
    """A random bf16 Qwen MoE of 2 layers (hidden 32, expert width 16: aligned for torch._grouped_mm)."""
    config = QwenMoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24 if family == "qwen2_moe" else 0, qkv_bias=family == "qwen2_moe",
        qk_norm=family == "qwen3_moe", router_z_loss_coef=1e-3, attn_implementation="sdpa", model_type=family,
    )  # fmt: skip
    model = models.build_model(config, "meta", torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))  # also chooses the expert kernel, once
    return model


def block_loss(block, x, cos, sin, ctx):
    """One decoder block's output and its router losses, as training uses them: one scalar."""
    out, stats = block(x, cos, sin, ctx)
    num_tokens = x.shape[0] * x.shape[1]
    return out.float().square().mean() + load_balancing_loss([stats], num_tokens, 4) + router_z_loss([stats], num_tokens)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_decoder_block_compiles_forward_and_backward_without_graph_breaks(family):
    model = tiny_model(family)
    block = model.model.layers[0]
    assert isinstance(block.mlp, SparseMoeBlock) and block.mlp.experts.use_grouped_mm
    x = torch.randn(2, 12, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(12).expand(2, 12)
    cos, sin = model.model.rotary_emb(position_ids, x.dtype)
    ctx = attention.build_context("sdpa", (2, 12), "cpu", position_ids)

    explained = torch._dynamo.explain(block_loss)(block, x, cos, sin, ctx)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]

    # the backward too: aot_autograd traces it into a graph of its own, which a host sync would break
    assert_compiled_backward_matches_eager(block_loss, block, x, cos, sin, ctx)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_whole_model_with_its_loss_and_router_losses_is_one_graph(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))

    def loss_fn(ids):
        logits = model(ids, packed=False)  # (B, T, V); the loader's word on packing: nothing read from the data
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return ce + model.aux_loss

    explained = torch._dynamo.explain(loss_fn)(ids)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    # and it holds every layer's two grouped GEMMs
    grouped = [sum("_grouped_mm" in str(node.target) for node in g.graph.nodes) for g in explained.graphs]
    assert grouped == [2 * len(model.model.layers)], grouped
