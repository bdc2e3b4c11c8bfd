"""Activation checkpointing modes (models/checkpointing.py): every mode gives the gradients of `none`, and `selective`
keeps fewer bytes than `none` and more than `full` (scripts/activation_memory.py's count, here on tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models import checkpointing
from scripts import activation_memory
from scripts.bench import GEMMA3_1B, LLAMA_1B, QWEN3_MOE, TINY_OVERRIDES, TINY_SHAPE

FAMILIES = {"llama": LLAMA_1B, "gemma": GEMMA3_1B, "qwen_moe": QWEN3_MOE}


def tiny_hf(family: str) -> dict:
    """The workload's config at tiny shapes, with 4 layers so that every_k (k=2) has recomputed and stored layers."""
    hf = FAMILIES[family]
    hf = {**hf, **TINY_SHAPE, **TINY_OVERRIDES.get(hf["model_type"], {}), "num_hidden_layers": 4}
    if "layer_types" in hf:  # Gemma: local, global, local, global
        hf["layer_types"] = ["sliding_attention", "full_attention"] * 2
    return hf


def tiny_model(family: str) -> torch.nn.Module:
    config = models.config_from_hf(tiny_hf(family))
    config.attn_implementation = "sdpa"
    model = models.build_model(config, "meta", torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "materialize_after_load"):
            module.materialize_after_load(torch.device("cpu"))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.train()


def gradients(model, mode, input_ids, labels) -> dict[str, torch.Tensor]:
    """Parameter gradients of one forward and backward under `mode`, as if it were the process's first."""
    from models.qwen_moe import grouped_mm_works

    grouped_mm_works.cache_clear()  # the MoE's one-time probe of torch._grouped_mm then runs inside this forward
    model.activation_checkpointing, model.activation_checkpointing_k = mode, 2
    model.zero_grad(set_to_none=True)
    logits = model(input_ids)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    if getattr(model, "aux_loss", None) is not None:
        loss = loss + model.aux_loss
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_mode_gives_the_gradients_of_none(family):
    """fp32 on CPU, bitwise: a recompute runs the same ops on the same inputs, and `selective` hands the backward the
    very tensors the first forward made, so no rounding may differ."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 24), generator=g)
    labels = torch.randint(0, 256, (2, 24), generator=g)
    reference = gradients(model, "none", input_ids, labels)
    for mode in ("selective", "every_k", "full", True):  # True: the old boolean switch, meaning full
        grads = gradients(model, mode, input_ids, labels)
        for name, grad in reference.items():
            assert torch.equal(grads[name], grad), f"{family}, {mode}: {name}"


def test_selective_with_lora_gives_the_gradients_of_none():
    """LoRA adds its update into the base matmul's output in place, inside an autograd Function: selective must not
    keep that output (torch refuses a kept tensor that was mutated), and the gradients stay bitwise those of none."""
    from nanotune.lora import apply_lora

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=4,
               alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the update a value so that it reaches the outputs
            p.data.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 24), generator=g)
    labels = torch.randint(0, 256, (2, 24), generator=g)
    reference = gradients(model, "none", input_ids, labels)
    grads = gradients(model, "selective", input_ids, labels)
    assert reference.keys() == grads.keys() and reference
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_selective_keeps_fewer_bytes_than_none_and_more_than_full(family):
    """The count of scripts/activation_memory.py on tiny shapes: none > selective > full, and full keeps only the
    layer's output. (The MoE layer cannot run on the meta device: its routing reads token counts per expert.)"""
    hf, batch, seq_len = tiny_hf(family), 2, 32
    kept = {mode: activation_memory.layer_saved_bytes(hf, batch, seq_len, mode, torch.float32)
            for mode in ("none", "selective", "full")}
    assert kept["none"] > kept["selective"] > kept["full"], kept
    output = batch * seq_len * hf["hidden_size"] * 4  # (B, T, D) fp32: the next layer's checkpoint input
    logsumexp = batch * hf["num_attention_heads"] * seq_len * 4  # added for flash attention
    assert kept["full"] == output + logsumexp


def test_modes_and_the_old_boolean_switch():
    assert checkpointing.normalize_mode(True) == "full" and checkpointing.normalize_mode(False) == "none"
    with pytest.raises(ValueError, match="selective"):
        checkpointing.normalize_mode("partial")
    layer = torch.nn.Linear(2, 2)
    assert checkpointing.checkpointed(layer, 1, "every_k", 2) is layer  # odd layers store under k = 2
    assert checkpointing.checkpointed(layer, 2, "every_k", 2) is not layer


def test_config_accepts_the_modes_and_refuses_others():
    from nanotune.config import Config, ConfigError
    from nanotune.train import check_config

    cfg = Config()
    cfg.train.max_steps = 1
    for mode in checkpointing.MODES:
        cfg.train.activation_checkpointing = mode
        check_config(cfg)
    cfg.train.activation_checkpointing = "partial"
    with pytest.raises(ConfigError, match="selective"):
        check_config(cfg)
    cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_k = "every_k", 0
    with pytest.raises(ConfigError, match="activation_checkpointing_k"):
        check_config(cfg)
