"""config.json read as transformers reads it: each family's table of defaults against transformers' config classes key
by key, and every key left out of a real-looking config.json (in the transformers 4 and 5 spellings) read to the same
value transformers reads."""

from __future__ import annotations

import pytest

import models
from models import CheckpointError, gemma, llama, mistral, qwen_moe

transformers = pytest.importorskip("transformers")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

TABLES = {**llama.HF_DEFAULTS, **mistral.HF_DEFAULTS, **qwen_moe.HF_DEFAULTS, **gemma.HF_DEFAULTS}

# keys nanotune checks but does not store: it implements one setting, and transformers' default must be among them
ACCEPTED = {"hidden_act": {"silu"}, "hidden_activation": {"gelu_pytorch_tanh", "gelu_tanh"},
            "use_sliding_window": {False}, "use_bidirectional_attention": {None, False}}

# Real-looking config.json files (shapes of released models; values mostly unlike transformers' defaults, so that
# leaving a key out changes something), in transformers 4's spelling: rope_theta / rope_scaling at the top level.
REAL = {
    "llama": dict(  # Llama 3.2 1B
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu", max_position_embeddings=131072,
        initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "mistral": dict(  # Mistral 7B v0.3
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=32768,
        initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None, rope_theta=1e6,
    ),
    "qwen2_moe": dict(  # Qwen1.5-MoE-A2.7B, with a few settings changed
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=8192,
        initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e6,
        use_sliding_window=False, qkv_bias=False, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1024,
        shared_expert_intermediate_size=4096, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[0],
        router_aux_loss_coef=0.01, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "qwen3_moe": dict(  # Qwen3-30B-A3B
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu", max_position_embeddings=40960,
        initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1e6, attention_bias=True,
        use_sliding_window=False, num_experts=96, num_experts_per_tok=6, moe_intermediate_size=768,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], router_aux_loss_coef=0.001,
    ),
    "gemma2": dict(  # Gemma 2 9B, with a few settings changed
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=224, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192, initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, query_pre_attn_scalar=224, sliding_window=2048, final_logit_softcapping=20.0,
        attn_logit_softcapping=40.0, rope_theta=20000.0,
    ),
    "gemma3_text": dict(  # the text model of Gemma 3 4B
        model_type="gemma3_text", vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=5,
        final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=2e6, rope_local_base_freq=20000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}


def transformers_5_spelling(hf: dict) -> dict:
    """The same config.json as transformers 5 writes it: rope settings in `rope_parameters`, Qwen3-MoE's expert count
    as num_local_experts."""
    hf = dict(hf)
    scaling = hf.pop("rope_scaling", None) or {"rope_type": "default"}
    rope = {**scaling, "rope_theta": hf.pop("rope_theta")}
    if hf["model_type"] == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": hf.pop("rope_local_base_freq")}
        rope = {"full_attention": rope, "sliding_attention": local}
    if hf["model_type"] == "qwen3_moe":
        hf["num_local_experts"] = hf.pop("num_experts")
    return {**hf, "rope_parameters": rope}


def theirs(config, model_type: str, key: str):
    """The value transformers' config holds for a config.json key, as transformers' model code reads it."""
    rope = config.rope_parameters
    if model_type == "gemma3_text":
        if key == "rope_local_base_freq":
            return rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    if key == "rope_theta":
        return rope["rope_theta"]
    if key == "rope_scaling":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
        return None if scaling["rope_type"] == "default" else scaling
    if key == "head_dim":  # Qwen-MoE configs have no head_dim field; their attention falls back to this
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if key == "sliding_window_pattern":  # what the pattern decides
        return config.layer_types
    if key == "mlp_only_layers":
        return list(config.mlp_only_layers)
    return getattr(config, key)


def ours(config, model_type: str, key: str):
    """The value nanotune's config holds for a config.json key."""
    if key == "rope_local_base_freq":
        return config.rope_local_theta
    if key == "sliding_window_pattern":
        return config.layer_types
    if key == "attention_bias" and model_type == "qwen3_moe":  # one switch for all four projections
        assert config.qkv_bias == config.o_bias
        return config.o_bias
    return getattr(config, key)


def assert_read_alike(hf: dict, model_type: str):
    """nanotune reads every key of its table from `hf` to the value transformers reads (or both refuse the file)."""
    try:
        reference = CONFIG_MAPPING[model_type].from_dict(dict(hf))  # what from_pretrained does with config.json
    except Exception as e:  # e.g. layer_types no longer matching num_hidden_layers
        with pytest.raises(CheckpointError):
            models.config_from_hf(hf)
        return f"both refuse: {type(e).__name__}"
    config = models.config_from_hf(hf)
    for key in TABLES[model_type]:
        expected = theirs(reference, model_type, key)
        if key in ACCEPTED:
            assert expected in ACCEPTED[key], (key, expected)
        else:
            assert ours(config, model_type, key) == expected, (key, ours(config, model_type, key), expected)


def test_every_model_type_has_a_table():
    assert set(TABLES) | {"gemma3"} == set(models.FAMILIES)  # gemma3 reads its text_config as gemma3_text


@pytest.mark.parametrize("model_type", sorted(TABLES))
def test_table_of_defaults_equals_transformers_config_class(model_type):
    """Each default in the table is the one transformers' config class has, and an empty config.json reads alike."""
    reference = CONFIG_MAPPING[model_type]()
    for key, default in TABLES[model_type].items():
        if default is None:  # derived from other keys, or off: checked through the resolved value below
            continue
        if key in ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern"):
            expected = theirs(reference, model_type, key)
            if key == "sliding_window_pattern":
                expected = reference.layer_types.index("full_attention") + 1  # the period of the pattern
        else:
            expected = getattr(reference, key)
        assert default == expected, f"{model_type}.{key}: table {default!r}, transformers {expected!r}"
    assert_read_alike({"model_type": model_type}, model_type)


def test_gemma3_image_text_reads_text_config_defaults():
    reference = CONFIG_MAPPING["gemma3"]().text_config
    config = models.config_from_hf({"model_type": "gemma3", "text_config": {}})
    for key in TABLES["gemma3_text"]:
        if key not in ACCEPTED:
            assert ours(config, "gemma3_text", key) == theirs(reference, "gemma3_text", key), key


@pytest.mark.parametrize("spelling", ["transformers4", "transformers5"])
@pytest.mark.parametrize("model_type", sorted(REAL))
def test_each_key_left_out_reads_as_transformers_reads_it(model_type, spelling):
    full = REAL[model_type] if spelling == "transformers4" else transformers_5_spelling(REAL[model_type])
    assert_read_alike(full, model_type)
    refused = []
    for key in sorted(set(full) - {"model_type"}):
        outcome = assert_read_alike({k: v for k, v in full.items() if k != key}, model_type)
        if outcome:
            refused.append((key, outcome))
    assert not refused, f"leaving out a key made transformers refuse the file (a weak test case): {refused}"


def test_llama3_rope_without_original_context_is_refused_while_reading_the_config():
    """transformers 5 would quietly use max_position_embeddings (4 or 16 times the real value) and transformers 4
    raised a bare KeyError; nanotune names the key before anything else is done."""
    for spelling in (REAL["llama"], transformers_5_spelling(REAL["llama"])):
        hf = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spelling.items()}
        rope = hf.get("rope_scaling") or hf["rope_parameters"]
        del rope["original_max_position_embeddings"]
        with pytest.raises(CheckpointError, match=r"^config.json \(llama\): rope_scaling \(or rope_parameters\) of "
                                                  r"rope_type 'llama3' has no original_max_position_embeddings"):
            models.config_from_hf(hf)
    linear = {"model_type": "qwen3_moe", "rope_parameters": {"rope_type": "linear", "rope_theta": 1e6}}
    with pytest.raises(CheckpointError, match=r"rope_type 'linear' has no factor"):
        models.config_from_hf(linear)


def test_a_null_where_transformers_needs_a_value_is_named():
    with pytest.raises(CheckpointError, match=r"config.json \(mistral\): vocab_size is null; .*default for mistral, "
                                              r"32000"):
        models.config_from_hf({**REAL["mistral"], "vocab_size": None})
    # where null means something, it is read as transformers reads it: derived, or off
    assert models.config_from_hf({**REAL["llama"], "num_key_value_heads": None}).num_key_value_heads == 32
    assert models.config_from_hf({**REAL["gemma2"], "final_logit_softcapping": None}).final_logit_softcapping is None
