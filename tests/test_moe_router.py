"""The routers' losses and statistics: the z-loss against transformers' definition (Switch Transformers' ST-MoE
z-loss), tokens per expert against the routing transformers does, the [model] coefficients and metrics.jsonl."""

from __future__ import annotations

import pytest
import torch

import models
from nanotune.config import ConfigError
from tests.test_models_qwen_moe import VOCAB, write_checkpoint
from tests.test_train import metrics, run  # noqa: F401  (the trainer fixture)

transformers = pytest.importorskip("transformers")
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func  # noqa: E402


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_z_loss_tokens_per_expert_and_their_gradient_equal_transformers(tmp_path, family):
    reference = write_checkpoint(tmp_path / "m", family, mlp_only_layers=[1])
    model = models.from_pretrained(tmp_path / "m")
    aux_coef, z_coef = reference.config.router_aux_loss_coef, 0.25
    model.config.router_z_loss_coef = z_coef
    ids = torch.randint(0, VOCAB, (2, 20))

    out = reference(ids, output_router_logits=True)
    router_logits = torch.stack(out.router_logits)  # (sparse layers, N, E)
    z_theirs = router_z_loss_func(router_logits)
    model(ids)
    torch.testing.assert_close(model.aux_loss, aux_coef * out.aux_loss + z_coef * z_theirs, rtol=1e-5, atol=1e-7)
    assert z_theirs > 0.1  # large enough that a missing z-loss term would fail the comparison

    top = torch.topk(router_logits, reference.config.num_experts_per_tok, dim=-1).indices  # (L, N, K)
    theirs = torch.stack([torch.bincount(t.flatten(), minlength=reference.config.num_experts) for t in top])
    torch.testing.assert_close(model.tokens_per_expert, theirs.float())
    assert not model.tokens_per_expert.requires_grad

    # the z-loss alone: its gradient reaches the routers as transformers' does
    model.config.router_aux_loss_coef = 0.0
    model(ids)
    model.aux_loss.backward()
    (z_coef * z_theirs).backward()
    for i in (0, 2):
        ours, theirs = model.model.layers[i].mlp.gate.weight.grad, reference.model.layers[i].mlp.gate.weight.grad
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_padding_is_left_out_of_the_z_loss_and_the_counts(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen3_moe")
    model = models.from_pretrained(tmp_path / "m")
    model.config.router_aux_loss_coef, model.config.router_z_loss_coef = 0.0, 1.0
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 9:] = False
    with torch.no_grad():
        model(ids, aux_loss_mask=mask)
        masked = model.aux_loss.clone(), model.tokens_per_expert.clone()
        # the same tokens alone: the first row, and the second row's first 9 (causal attention: padding unseen)
        model(ids[:1])
        z_a, count_a = model.aux_loss * 16, model.tokens_per_expert
        model(ids[1:, :9])
        z_b, count_b = model.aux_loss * 9, model.tokens_per_expert
    torch.testing.assert_close(masked[0], (z_a + z_b) / 25)
    torch.testing.assert_close(masked[1], count_a + count_b)


def test_router_coefficients_come_from_the_model_section(run, tmp_path):  # noqa: F811
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    path = f"--model.path={tmp_path / 'moe'}"
    plain = [r for r in metrics(run(path, "--train.max_steps=2")) if "loss" in r]
    # no load balancing, only the z-loss: a different aux loss, the same routing on the first step
    z_only = [r for r in metrics(run(path, "--train.max_steps=2", "--model.router_aux_loss_coef=0",
                                     "--model.router_z_loss_coef=0.5")) if "loss" in r]
    assert all(r["aux_loss"] > 0 for r in plain + z_only)
    assert abs(plain[0]["aux_loss"] - z_only[0]["aux_loss"]) > 1e-3
    assert z_only[0]["tokens_per_expert"] == plain[0]["tokens_per_expert"]
    for r in plain + z_only:  # per sparse layer: min <= mean <= max over the 4 experts; a mean of 2 of 4 per token
        load = r["tokens_per_expert"]
        assert len(load["min"]) == len(load["max"]) == len(load["mean"]) == 2
        assert all(lo <= m <= hi for lo, m, hi in zip(load["min"], load["mean"], load["max"]))
        assert load["mean"][0] > 0 and r["expert_load_max"] >= 1.0

    with pytest.raises(ConfigError, match="model.router_aux_loss_coef / model.router_z_loss_coef apply to"):
        run("--model.router_z_loss_coef=0.1")  # the default llama-tiny: no router
    with pytest.raises(ConfigError, match="model.router_z_loss_coef must be at least 0"):
        run(path, "--model.router_z_loss_coef=-1")
