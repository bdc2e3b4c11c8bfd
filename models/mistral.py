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


@dataclass
class MistralConfig(LlamaConfig):
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    max_position_embeddings: int = 32768
    model_type: str = "mistral"

    IGNORED_HF_KEYS = set()  # sliding_window is read

    def __post_init__(self):
        super().__post_init__()
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"config.json: sliding_window must be a positive int or null, got {self.sliding_window}")

    @classmethod
    def from_hf(cls, hf: dict) -> "MistralConfig":
        config = super().from_hf(hf)
        config.sliding_window = hf.get("sliding_window")  # null in the file means no window, not the default
        return config


class MistralForCausalLM(LlamaForCausalLM):
    """Same modules and parameter names as LlamaForCausalLM; the config carries the sliding window."""
