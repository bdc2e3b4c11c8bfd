"""RoPE scaling (linear, llama3, yarn, longrope) against transformers, in both config.json spellings, for each family;
`[model] overrides` merged into config.json, checked key by key, and saved in final/config.json."""

from __future__ import annotations

import json

import pytest
import torch

import models
from models import CheckpointError
from tests.conftest import write_hf_checkpoint
from tests.test_train import run  # noqa: F401  (the fixture)

transformers = pytest.importorskip("transformers")

VOCAB, HEAD_DIM, ORIGINAL = 96, 16, 32
ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL, "mscale": 0.7,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ORIGINAL,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.0 + 0.7 * i for i in range(HEAD_DIM // 2)]},
}
THETA = 50_000.0


def classic_spelling(folder, rope: dict) -> None:
    """Rewrite config.json in transformers 4's spelling: top-level rope_theta, rope_scaling with `type`."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    scaling = {k: v for k, v in rope.items() if k != "rope_type"}
    config.update(rope_theta=THETA, rope_scaling={"type": rope["rope_type"], **scaling})
    (folder / "config.json").write_text(json.dumps(config))


def max_logit_diff(ours, theirs, ids):
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def ids_around_original():
    """One batch within the original context and one beyond it (longrope's short and long factors)."""
    return [torch.randint(0, VOCAB, (2, ORIGINAL - 4)), torch.randint(0, VOCAB, (2, 3 * ORIGINAL))]


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_llama_rope_scaling_logits_match_transformers_in_both_spellings(tmp_path, rope):
    rope_parameters = {"rope_theta": THETA, **ROPES[rope]}
    reference = write_hf_checkpoint(tmp_path / "m", "llama", rope_parameters=rope_parameters, head_dim=HEAD_DIM)
    for spelling in ("transformers5", "transformers4"):  # as saved (rope_parameters), then rope_theta + rope_scaling
        if spelling == "transformers4":
            classic_spelling(tmp_path / "m", ROPES[rope])
        model = models.from_pretrained(tmp_path / "m")
        assert model.config.rope_scaling["rope_type"] == ROPES[rope]["rope_type"]
        for ids in ids_around_original():
            assert max_logit_diff(model, reference, ids) <= 1e-4, spelling


def test_rope_scaling_changes_the_logits(tmp_path):
    """The parity above can fail: a yarn model read as plain RoPE is far from transformers."""
    reference = write_hf_checkpoint(tmp_path / "m", "llama", rope_parameters={"rope_theta": THETA, **ROPES["yarn"]},
                                    head_dim=HEAD_DIM)
    plain = models.from_pretrained(tmp_path / "m", overrides={"rope_scaling": {"rope_type": "default"}})
    assert plain.config.rope_scaling is None
    assert max_logit_diff(plain, reference, ids_around_original()[1]) > 1e-3  # parity is 1e-4


@pytest.mark.parametrize("rope", ["yarn", "longrope"])
def test_gemma3_and_qwen3_moe_rope_scaling_logits_match_transformers(tmp_path, rope):
    from tests.test_models_gemma import write_checkpoint as write_gemma
    from tests.test_models_qwen_moe import write_checkpoint as write_qwen

    gemma_rope = {"full_attention": {"rope_theta": THETA, **ROPES[rope]},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}}
    reference = write_gemma(tmp_path / "gemma", "gemma3", rope_parameters=gemma_rope)
    model = models.from_pretrained(tmp_path / "gemma", attn_implementation="eager")
    for ids in ids_around_original():
        assert max_logit_diff(model, reference, ids) <= 1e-4

    reference = write_qwen(tmp_path / "qwen", "qwen3_moe", head_dim=HEAD_DIM,
                           rope_parameters={"rope_theta": THETA, **ROPES[rope]})
    classic_spelling(tmp_path / "qwen", ROPES[rope])
    model = models.from_pretrained(tmp_path / "qwen")
    for ids in ids_around_original():
        assert max_logit_diff(model, reference, ids) <= 1e-4


def test_override_turns_a_plain_checkpoint_into_yarn_and_final_config_loads_in_transformers(tmp_path):
    """The override is what the model computes, and what save_pretrained writes: transformers reads final/config.json
    back as the same yarn model."""
    write_hf_checkpoint(tmp_path / "m", "llama", rope_parameters={"rope_theta": THETA, "rope_type": "default"},
                        head_dim=HEAD_DIM)
    overrides = {"rope_scaling": ROPES["yarn"], "max_position_embeddings": 4 * ORIGINAL}
    model = models.from_pretrained(tmp_path / "m", overrides=overrides)
    assert model.config.rope_theta == THETA and model.config.max_position_embeddings == 4 * ORIGINAL
    models.save_pretrained(model, tmp_path / "final")
    written = json.loads((tmp_path / "final" / "config.json").read_text())
    assert written["rope_scaling"] == ROPES["yarn"] and written["max_position_embeddings"] == 4 * ORIGINAL
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="eager")
    assert reference.config.rope_parameters["rope_type"] == "yarn"
    for ids in ids_around_original():
        assert max_logit_diff(model, reference.eval(), ids) <= 1e-4


def test_rope_theta_override_wins_over_the_one_inside_rope_parameters(tmp_path):
    write_hf_checkpoint(tmp_path / "m", "llama", rope_parameters={"rope_theta": THETA, **ROPES["yarn"]},
                        head_dim=HEAD_DIM)
    model = models.from_pretrained(tmp_path / "m", overrides={"rope_theta": 2 * THETA})
    assert model.config.rope_theta == 2 * THETA and model.config.rope_scaling["rope_type"] == "yarn"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rope_scalng": {"rope_type": "linear", "factor": 2.0}}, r"model.overrides.rope_scalng .*'rope_scaling'\?"),
        ({"max_position_embeddings": "long"}, r"model.overrides.max_position_embeddings = 'long' does not fit"),
        ({"rope_scaling": 4.0}, r"model.overrides.rope_scaling = 4.0 does not fit"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"'yarn' has no original_max_position_embeddings"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, r"'dynamic' \(dynamic NTK\) .* inference-time"),
        ({"rope_scaling": {**ROPES["longrope"], "long_factor": [1.0]}}, r"long_factor must be a list of .* 8 numbers"),
    ],
    ids=["unknown-key", "wrong-type", "not-a-table", "missing-key", "dynamic", "longrope-length"],
)
def test_bad_overrides_are_refused_by_key(tmp_path, overrides, message):
    write_hf_checkpoint(tmp_path / "m", "llama", head_dim=HEAD_DIM)
    with pytest.raises(CheckpointError, match=message):
        models.from_pretrained(tmp_path / "m", overrides=overrides)


def test_flat_rope_override_on_a_per_layer_type_rope_is_refused(tmp_path):
    from tests.test_models_gemma import write_checkpoint as write_gemma

    write_gemma(tmp_path / "gemma", "gemma3")
    with pytest.raises(CheckpointError, match="override rope_parameters with both tables"):
        models.from_pretrained(tmp_path / "gemma", overrides={"rope_scaling": ROPES["yarn"]})


def test_training_run_saves_the_override_in_final_config(run):
    out = run("--train.max_steps=1", '--model.overrides={rope_scaling={rope_type="linear", factor=2.0}, '
              'max_position_embeddings=2048}')
    written = json.loads((out / "final" / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert written["max_position_embeddings"] == 2048
    assert models.from_pretrained(out / "final").config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.slow
def test_longrope_is_refused_under_context_parallelism(run, tmp_path):
    """longrope picks its factors by the batch's longest position, which no context-parallel process sees whole."""
    from tests.test_train import torchrun

    config = run("--train.max_steps=1", "--checkpoint.save_final=false") / "config.toml"
    factors = "[" + ", ".join(["1.0"] * 16) + "]"  # llama-tiny: head_dim 32
    rope = ('{rope_scaling={rope_type="longrope", original_max_position_embeddings=32, '
            f'short_factor={factors}, long_factor={factors}}}}}')
    result = torchrun(config, "--parallel.cp=2", "--parallel.dp_shard=1", f"--model.overrides={rope}",
                      f"--output_dir={tmp_path / 'cp'}", expect_ok=False)
    assert result.returncode != 0
    assert "longrope picks its frequencies by the longest position" in result.stderr + result.stdout
