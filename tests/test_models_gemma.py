"""Gemma 2 and Gemma 3 (text) against transformers on tiny random checkpoints: logits with softcaps, sliding windows
shorter than the sequence, per-layer RoPE, packing, saving, and the text model of an image-text checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models import CheckpointError, safetensors_io

transformers = pytest.importorskip("transformers")

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
            query_pre_attn_scalar=24)
GEMMA2 = dict(attn_logit_softcapping=1.0, final_logit_softcapping=0.5)  # small caps: they bind on random weights
GEMMA3_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100_000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}}


def randomise_norms(model):
    with torch.no_grad():  # HF leaves Gemma's norms at 0 (a scale of 1): randomise them so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # scores of order 1, not 0.01: softcaps bind
                p.mul_(8.0)


def write_checkpoint(folder, family="gemma2", seed=0, **overrides):
    """A random transformers Gemma saved to `folder` (fp32, eager attention); returns the transformers model."""
    torch.manual_seed(seed)
    if family == "gemma2":
        config = transformers.Gemma2Config(**{**BASE, **GEMMA2, **overrides})
    else:
        config = transformers.Gemma3TextConfig(
            **{**BASE, "layer_types": GEMMA3_LAYERS, "rope_parameters": GEMMA3_ROPE, **overrides}
        )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomise_norms(model)
    model.save_pretrained(folder)
    return model


def max_logit_diff(ours, theirs, ids, **kwargs):
    with torch.no_grad():
        return (ours(ids, **kwargs) - theirs(ids).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------------- Gemma 2


def test_gemma2_logits_match_with_softcaps_and_window_shorter_than_sequence(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "gemma2")
    model = models.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [8, None, 8, None]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, VOCAB, (2, 40))  # 5x the window
    assert max_logit_diff(model, reference, ids) <= 1e-4
    with torch.no_grad():  # the final softcap binds: raw logits exceed it, the model's stay below
        assert model.lm_head(model(ids, return_hidden=True)).abs().max() > 0.5 > model(ids).abs().max()

    # each Gemma-specific piece changes the result: without it the logits differ
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    assert max_logit_diff(model, reference, ids) > 1e-3
    for layer, ref in zip(model.model.layers, reference.model.layers):
        layer.self_attn.sliding_window = ref.self_attn.sliding_window
        layer.self_attn.softcap = None
    assert max_logit_diff(model, reference, ids) > 1e-3


def test_gemma2_auto_attention_picks_a_backend_that_softcaps(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "gemma2")
    model = models.from_pretrained(tmp_path / "m")  # attn_implementation "auto"
    assert max_logit_diff(model, reference, torch.randint(0, VOCAB, (1, 20))) <= 1e-4


def test_gemma2_refuses_a_backend_that_cannot_softcap(tmp_path):
    write_checkpoint(tmp_path / "m", "gemma2")
    model = models.from_pretrained(tmp_path / "m", attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"attn_logit_softcapping.*'sdpa' cannot.*'auto'"):
        model(torch.randint(0, VOCAB, (1, 8)))


def test_gemma2_without_softcap_keys_softcaps_as_transformers_does(tmp_path):
    """A config.json that leaves the softcaps out gets transformers' Gemma 2 defaults (50 and 30), not no softcapping."""
    reference = write_checkpoint(tmp_path / "m", "gemma2", attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    with torch.no_grad():  # logits well beyond 30 (tied head), so that the final softcap changes them
        reference.model.embed_tokens.weight.mul_(400.0)
    reference.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["attn_logit_softcapping"], config["final_logit_softcapping"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    model = models.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert (model.config.attn_logit_softcapping, model.config.final_logit_softcapping) == (50.0, 30.0)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert model.lm_head(model(ids, return_hidden=True)).abs().max() > 40.0  # the cap binds
    assert max_logit_diff(model, reference, ids) <= 1e-4


def test_gemma2_without_layer_types_alternates_local_and_global(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "gemma2", num_hidden_layers=3)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["layer_types"]  # older config.json files: the alternation is implied
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = models.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert max_logit_diff(model, reference, torch.randint(0, VOCAB, (1, 20))) <= 1e-4


# ---------------------------------------------------------------------------------------------------- Gemma 3


def test_gemma3_logits_match_with_local_rope_scaled_global_rope_and_qk_norms(tmp_path):
    reference = write_checkpoint(tmp_path / "m", "gemma3_text")
    model = models.from_pretrained(tmp_path / "m")
    assert [layer.self_attn.is_local for layer in model.model.layers] == [True, False, True, True]
    assert model.config.rope_local_theta == 1_000.0 and model.config.rope_scaling["factor"] == 4.0
    ids = torch.randint(0, VOCAB, (2, 40))
    assert max_logit_diff(model, reference, ids) <= 1e-4
    # the local layers' own base matters
    model.model.rotary_emb_local.theta = 100_000.0
    model.model.rotary_emb_local.materialize_after_load("cpu")
    assert max_logit_diff(model, reference, ids) > 1e-3


def test_gemma3_older_config_keys(tmp_path):
    """rope_theta / rope_local_base_freq / rope_scaling and sliding_window_pattern instead of rope_parameters and
    layer_types, as in config.json files written before transformers 5."""
    reference = write_checkpoint(
        tmp_path / "m", "gemma3_text", num_hidden_layers=3, layer_types=None,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
        sliding_window_pattern=3,
    )  # fmt: skip
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        config.pop(key, None)
    config.update(rope_theta=50_000.0, rope_local_base_freq=500.0, rope_scaling={"type": "linear", "factor": 2.0},
                  sliding_window_pattern=3)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = models.from_pretrained(tmp_path / "m")
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert max_logit_diff(model, reference, torch.randint(0, VOCAB, (2, 24))) <= 1e-4


def test_gemma3_text_model_of_an_image_text_checkpoint(tmp_path):
    """model_type gemma3: the text model's tensors live under language_model.model.*; the vision side is not read."""
    torch.manual_seed(0)
    text = {**BASE, "vocab_size": 300, "layer_types": GEMMA3_LAYERS, "rope_parameters": GEMMA3_ROPE}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomise_norms(reference)
    reference.save_pretrained(tmp_path / "m")

    model_config = models.config_from_hf(models.read_config(tmp_path / "m"))
    model = models.build_model(model_config)
    (file,) = safetensors_io.checkpoint_files(tmp_path / "m")
    header = safetensors_io.read_header(file)
    expected = model.expected_hf_keys()
    assert set(expected) <= set(header)
    assert all(k.startswith(model.ignored_hf_key_prefixes) for k in set(header) - set(expected))
    with open(file, "rb") as f:  # what from_pretrained does once its key check skips the ignored prefixes
        for key in expected:
            models.place(model, key, safetensors_io.read_tensor(f, header[key]), torch.float32, "cpu")
    for module in model.modules():
        if hasattr(module, "materialize_after_load"):
            module.materialize_after_load(torch.device("cpu"))
    model.tie_weights()
    ids = torch.randint(0, 290, (2, 20))
    with torch.no_grad():
        assert (model(ids) - reference(input_ids=ids).logits).abs().max().item() <= 1e-4

    # saved as a text-only Gemma 3 that transformers loads as Gemma3ForCausalLM
    models.save_pretrained(model, tmp_path / "text")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager").eval()
    assert type(loaded).__name__ == "Gemma3ForCausalLM"
    assert max_logit_diff(model, loaded, ids) <= 1e-4


# ------------------------------------------------------------------------------------------- packing and saving


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_packed_row_equals_separate_documents(tmp_path, family):
    write_checkpoint(tmp_path / "m", family)
    model = models.from_pretrained(tmp_path / "m")
    docs = [torch.randint(0, VOCAB, (1, n)) for n in (13, 5, 20)]  # two longer than the window of 8
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids)
        separate = torch.cat([model(d) for d in docs], dim=1)
    assert (packed_logits - separate).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_saved_model_loads_in_transformers_with_same_logits(tmp_path, family):
    write_checkpoint(tmp_path / "m", family)
    model = models.from_pretrained(tmp_path / "m")
    with torch.no_grad():  # differ from the checkpoint, so that a stale copy would be caught
        model.model.layers[1].post_feedforward_layernorm.weight.add_(0.5)
    models.save_pretrained(model, tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    assert max_logit_diff(model, loaded, torch.randint(0, VOCAB, (2, 24))) <= 1e-4


def test_hidden_states_then_softcapped_head_equal_logits(tmp_path):
    write_checkpoint(tmp_path / "m", "gemma2")
    model = models.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 10, 64)
        torch.testing.assert_close(model.softcap_logits(model.lm_head(hidden)), model(ids))


def test_random_init_trains(tmp_path):
    write_checkpoint(tmp_path / "m", "gemma3_text")
    config = models.config_from_hf(models.read_config(tmp_path / "m"))
    model = models.build_model(config, "meta")
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(torch.Generator().manual_seed(0))
    assert all(not layer.input_layernorm.weight.detach().any() for layer in model.model.layers)
    ids = torch.randint(0, VOCAB, (2, 12))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    assert model.model.layers[0].self_attn.q_norm.weight.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
         "rope scaling type 'dynamic' .* inference-time"),
    ],
    ids=["activation", "bidirectional", "dynamic"],
)
def test_unsupported_settings_are_refused(tmp_path, change, message):
    write_checkpoint(tmp_path / "m", "gemma3_text")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        models.from_pretrained(tmp_path / "m")
