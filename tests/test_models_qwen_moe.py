"""Qwen2-MoE and Qwen3-MoE against transformers on tiny random checkpoints: logits, router auxiliary loss, packing,
the grouped expert matmul against a per-expert loop, saving in the per-expert checkpoint layout."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models import CheckpointError
from models.qwen_moe import grouped_matmul, grouped_mm_works

transformers = pytest.importorskip("transformers")

VOCAB = 96
# hidden 32 and expert width 16: rows of 128 and 64 bytes in fp32, aligned for torch._grouped_mm
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
            max_position_embeddings=256, tie_word_embeddings=False, router_aux_loss_coef=0.02)


def write_checkpoint(folder, family="qwen2_moe", seed=0, **overrides):
    """A random transformers Qwen MoE saved to `folder` (fp32, eager attention); returns the transformers model."""
    torch.manual_seed(seed)
    if family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**{**BASE, "shared_expert_intermediate_size": 24, **overrides})
    else:
        config = transformers.Qwen3MoeConfig(**{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"  # the plain per-expert loop as oracle
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):  # HF leaves them at 1 / 0: test them too
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):  # decisive routing: no near-ties that rounding could flip
                p.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    return model


def max_logit_diff(ours, theirs, ids, **kwargs):
    with torch.no_grad():
        return (ours(ids, **kwargs) - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(norm_topk_prob=True),
        dict(decoder_sparse_step=2),  # layer 1 sparse, layers 0 and 2 dense
        dict(mlp_only_layers=[0, 2], tie_word_embeddings=True),
        dict(qkv_bias=False, num_experts_per_tok=3, head_dim=16),
    ],
    ids=["plain", "norm_topk", "sparse_step", "mlp_only-tied", "nobias-top3-head_dim"],
)
def test_qwen2_moe_logits_match_transformers(tmp_path, overrides):
    reference = write_checkpoint(tmp_path / "m", "qwen2_moe", **overrides)
    model = models.from_pretrained(tmp_path / "m")
    sparse = [type(layer.mlp).__name__ for layer in model.model.layers]
    theirs = [type(layer.mlp).__name__.removeprefix("Qwen2Moe") for layer in reference.model.layers]
    assert sparse == [{"MLP": "MLP", "SparseMoeBlock": "SparseMoeBlock"}[t] for t in theirs]
    assert max_logit_diff(model, reference, torch.randint(0, VOCAB, (2, 24))) <= 1e-4


@pytest.mark.parametrize("overrides", [dict(), dict(norm_topk_prob=True, head_dim=16, attention_bias=True)],
                         ids=["plain", "norm_topk-head_dim-bias"])
def test_qwen3_moe_logits_match_transformers(tmp_path, overrides):
    reference = write_checkpoint(tmp_path / "m", "qwen3_moe", **overrides)
    model = models.from_pretrained(tmp_path / "m")
    assert hasattr(model.model.layers[0].self_attn, "q_norm")
    assert not hasattr(model.model.layers[0].mlp, "shared_expert")
    assert max_logit_diff(model, reference, torch.randint(0, VOCAB, (2, 24))) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_router_aux_loss_and_its_gradient_equal_transformers(tmp_path, family):
    reference = write_checkpoint(tmp_path / "m", family, decoder_sparse_step=1, mlp_only_layers=[1])
    model = models.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 20))
    coef = reference.config.router_aux_loss_coef

    out = reference(ids, output_router_logits=True)
    model(ids)
    torch.testing.assert_close(model.aux_loss, coef * out.aux_loss, rtol=1e-5, atol=1e-7)
    assert model.aux_loss.item() > 0

    # gradient of the auxiliary loss alone reaches the routers exactly as in transformers
    (coef * out.aux_loss).backward()
    model.aux_loss.backward()
    for i in (0, 2):
        ours = model.model.layers[i].mlp.gate.weight.grad
        theirs = reference.model.layers[i].mlp.gate.weight.grad
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-8)


def test_aux_loss_mask_equals_transformers_attention_mask(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "qwen2_moe")
    model = models.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # right padding: earlier tokens are unaffected by it under causal attention
    with torch.no_grad():
        out = reference(ids, attention_mask=mask, output_router_logits=True)
        model(ids, aux_loss_mask=mask.bool())
        masked = model.aux_loss.clone()
        model(ids)
    torch.testing.assert_close(masked, reference.config.router_aux_loss_coef * out.aux_loss, rtol=1e-5, atol=1e-7)
    assert (masked - model.aux_loss).abs() > 1e-6  # the mask really left tokens out


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_packed_row_equals_separate_documents(tmp_path, family):
    write_checkpoint(tmp_path / "m", family)
    model = models.from_pretrained(tmp_path / "m")
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (9, 14, 5)]
    packed = torch.cat(docs, dim=1)  # (1, 28)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids)
        packed_aux = model.aux_loss.clone()
        separate = torch.cat([model(d) for d in docs], dim=1)
        # the aux loss is a statistic over all tokens: the same as the documents as one right-padded batch
        padded = torch.zeros(3, 14, dtype=torch.long)
        mask = torch.zeros(3, 14, dtype=torch.bool)
        for row, d in enumerate(docs):
            padded[row, : d.shape[1]], mask[row, : d.shape[1]] = d[0], True
        model(padded, aux_loss_mask=mask)
    assert (packed_logits - separate).abs().max().item() <= 1e-5
    torch.testing.assert_close(packed_aux, model.aux_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_saved_model_has_per_expert_keys_and_loads_in_transformers(tmp_path, family):
    from safetensors import safe_open

    write_checkpoint(tmp_path / "m", family, tie_word_embeddings=family == "qwen3_moe")
    model = models.from_pretrained(tmp_path / "m")
    with torch.no_grad():  # make the experts differ from the checkpoint, so a stale copy would be caught
        model.model.layers[1].mlp.experts.down_proj.mul_(1.5)
    models.save_pretrained(model, tmp_path / "saved")
    keys = {}
    for folder in ("m", "saved"):
        with safe_open(tmp_path / folder / "model.safetensors", "pt") as f:
            keys[folder] = set(f.keys())
    assert keys["saved"] == keys["m"]
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in keys["saved"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert max_logit_diff(model, loaded, torch.randint(0, VOCAB, (2, 16))) <= 1e-4


def test_training_step_reaches_experts_router_and_shared_expert(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen2_moe")
    model = models.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 12))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    (loss + model.aux_loss).backward()
    moe = model.model.layers[0].mlp
    for p in (moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj, moe.shared_expert_gate.weight):
        assert p.grad is not None and p.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------- grouped expert matmul


def loop_reference(x, w, counts):
    """The plain per-group loop that the grouped matmul replaces."""
    rows = torch.split(x, counts.tolist())
    return torch.cat([r @ w[e].T for e, r in enumerate(rows)])


@pytest.mark.parametrize("use_grouped_mm", [False, True], ids=["padded-bmm", "grouped_mm"])
def test_grouped_matmul_equals_per_expert_loop_with_gradients(use_grouped_mm):
    if use_grouped_mm and not grouped_mm_works("cpu", torch.float32):
        pytest.skip("torch._grouped_mm is not available for CPU fp32 in this torch")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])  # empty groups included
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 8, 16, requires_grad=True)
    ours = grouped_matmul(x, w, counts, use_grouped_mm)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    theirs = loop_reference(x2, w2, counts)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_the_kernel_is_chosen_once_when_the_model_is_built(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen3_moe")
    write_checkpoint(tmp_path / "narrow", "qwen3_moe", moe_intermediate_size=4)
    chosen = {}
    for name, folder, dtype in [("bf16", "m", torch.bfloat16), ("fp32", "m", torch.float32),
                                ("bf16-narrow", "narrow", torch.bfloat16)]:
        model = models.from_pretrained(tmp_path / folder, dtype=dtype)
        chosen[name] = {layer.mlp.experts.use_grouped_mm for layer in model.model.layers}
    compiles_bf16 = grouped_mm_works("cpu", torch.bfloat16) and grouped_mm_works("meta", torch.bfloat16)
    compiles_fp32 = grouped_mm_works("cpu", torch.float32) and grouped_mm_works("meta", torch.float32)
    # an expert width of 4 bf16 values (8 bytes) is refused by torch._grouped_mm: the padded path takes over
    assert chosen == {"bf16": {compiles_bf16}, "fp32": {compiles_fp32}, "bf16-narrow": {False}}


def test_combine_equals_the_scatter_add_of_weighted_rows_with_gradients():
    from models.qwen_moe import combine, sort_by_expert

    gen = torch.Generator().manual_seed(0)
    expert_NK = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(7)])  # (7, 3): K distinct experts
    order, token, _ = sort_by_expert(expert_NK, 6)
    h = torch.randn(21, 16, generator=gen, requires_grad=True)
    w = torch.rand(7, 3, generator=gen, requires_grad=True)
    ours = combine(h, order, w)  # (7, 16)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    theirs = torch.zeros(7, 16).index_add_(0, token, h2 * w2.flatten()[order, None])
    torch.testing.assert_close(ours, theirs)
    g = torch.randn(7, 16, generator=gen)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_model_runs_the_fallback_for_unaligned_expert_width(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "qwen3_moe", moe_intermediate_size=6)
    model = models.from_pretrained(tmp_path / "m")
    assert model.model.layers[0].mlp.experts.use_grouped_mm is False
    assert max_logit_diff(model, reference, torch.randint(0, VOCAB, (2, 16))) <= 1e-4


# ------------------------------------------------------------------------------------------------------- errors


def test_sliding_window_and_activation_are_refused_with_the_key_named(tmp_path):
    write_checkpoint(tmp_path / "m", "qwen2_moe")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        models.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu' is not supported"):
        models.from_pretrained(tmp_path / "m")


def test_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_checkpoint(tmp_path / "m", "qwen3_moe")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors.pop("model.layers.2.mlp.experts.4.gate_proj.weight")
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['model.layers.2.mlp.experts.4.gate_proj.weight'\]"):
        models.from_pretrained(tmp_path / "m")


def test_grouped_mm_path_equals_the_padded_path_in_the_model(tmp_path):
    if not grouped_mm_works("cpu", torch.float32):
        pytest.skip("torch._grouped_mm is not available for CPU fp32 in this torch")
    write_checkpoint(tmp_path / "m", "qwen2_moe")
    model = models.from_pretrained(tmp_path / "m")
    experts = [layer.mlp.experts for layer in model.model.layers]
    ids = torch.randint(0, VOCAB, (2, 16))
    results = []
    for use_grouped_mm in (True, False):
        for e in experts:
            e.use_grouped_mm = use_grouped_mm
        model.zero_grad()
        logits = model(ids)
        (logits.square().mean() + model.aux_loss).backward()
        results.append((logits.detach(), experts[0].gate_up_proj.grad.clone(), experts[2].down_proj.grad.clone()))
    for grouped, padded in zip(*results):
        torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-6)


def test_bf16_forward_and_backward_stay_in_bf16(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "qwen3_moe")
    model = models.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, VOCAB, (2, 16))
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    (logits.float().square().mean() + model.aux_loss).backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.dtype == torch.bfloat16
    with torch.no_grad():  # close to the fp32 reference; the decisive routers keep rounding from flipping experts
        assert (logits.float() - reference(ids).logits).abs().max().item() <= 5e-2
