"""Mistral 7B v0.1 to v0.3: the Llama architecture plus an optional sliding attention window.

Mistral's decoder is Llama's (RMSNorm, RoPE, grouped-query attention, SwiGLU) with one difference: with
`sliding_window` set, token i attends only to tokens i - sliding_window + 1 .. i. Rather than copy ~200 identical
lines, this file reuses the modules of models/llama.py and only adds the config that keeps the window
(v0.1 has 4096; v0.2 and v0.3 set it to null, i.e. full causal attention). The window itself is applied by
models/attention.py, which every backend implements.

Reference: Mistral 7B (Jiang et al., 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.llama import LlamaConfig, LlamaForCausalLM


# config.json key -> the value transformers' MistralConfig takes when the key is left out (None: derived, as in
# llama.py). Mistral has no attention_bias / mlp_bias: transformers builds its projections without biases whatever
# config.json says, and so does this.
HF_DEFAULTS = {
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "sliding_window": 4096, "rope_theta": 10000.0, "rope_scaling": None,
    },
}


@dataclass
class MistralConfig(LlamaConfig):
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    max_position_embeddings: int = 131072
    model_type: str = "mistral"

    hf_defaults = HF_DEFAULTS["mistral"]
    nullable_hf_keys = frozenset({"num_key_value_heads", "sliding_window"})  # sliding_window null: full causal

    def __post_init__(self):
        super().__post_init__()
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config.json: sliding_window must be a positive int or null, got {self.sliding_window}")


class MistralForCausalLM(LlamaForCausalLM):
    """Same modules and parameter names as LlamaForCausalLM; the config carries the sliding window."""
