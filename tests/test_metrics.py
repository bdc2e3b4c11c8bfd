"""MFU's flops per token (PaLM appendix B) and the training-time window."""

import time

import models
from nanotune import metrics


def test_flops_per_token_counts_the_tied_head_and_only_active_experts():
    dense = models.build_model(models.config_from_hf(dict(
        model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)))
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # q,o + k,v + MLP + 2 norms
    n = 2 * per_layer + 32 + 100 * 32  # final norm + the tied LM head
    assert metrics.flops_per_token(dense, 64) == 6 * n + 12 * 2 * 4 * 8 * 64
    assert metrics.flops_per_token(dense, 64, trainable_fraction=0.01) == 4 * n + 12 * 2 * 4 * 8 * 64

    moe = models.build_model(models.config_from_hf(dict(
        model_type="qwen3_moe", vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=2)))
    experts = sum(p.numel() for name, p in moe.named_parameters() if ".experts." in name)
    everything = sum(p.numel() for name, p in moe.named_parameters() if "embed_tokens" not in name)
    active = everything - experts + experts * 2 / 8
    assert metrics.flops_per_token(moe, 64) == 6 * active + 12 * 2 * 4 * 8 * 64


def test_timer_leaves_paused_time_out():
    timer = metrics.Timer()
    with timer.paused():
        time.sleep(0.2)
    assert timer.lap() < 0.1
