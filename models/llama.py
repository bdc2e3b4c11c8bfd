"""Llama 2 / 3 / 3.1 / 3.2 in one file: config, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, the model.

Parameter names follow the HF checkpoint layout (`model.layers.0.self_attn.q_proj.weight`), so loading and saving are
the identity map; with `fuse_projections` q/k/v and gate/up are stacked into `qkv_proj` and `gate_up_proj`, and
models/fusion.py maps them to and from the checkpoint's tensors. The model is written for one device; LoRA, FP8 and
sharding are applied from outside.

    model = LlamaForCausalLM(LlamaConfig.from_hf(json.load(open("config.json"))))   # usually on the meta device
    logits = model(input_ids)                                # (B, T) -> (B, T, vocab)
    hidden = model(input_ids, return_hidden=True)            # (B, T, D) after the final norm, for fused losses

References: Llama 2 (Touvron et al., 2023), RoFormer (Su et al., 2021) for rotary embeddings, GQA (Ainslie et al., 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import attention, checkpointing
from models.hf_config import check_rope_scaling, read_keys, rope_from_hf
from models.rope_scaling import ROPE_TYPES, rope_frequencies

SUPPORTED_ROPE_TYPES = ROPE_TYPES  # default, linear, llama3, yarn, longrope (models/rope_scaling.py)

# config.json key -> the value transformers' LlamaConfig takes when the key is left out. None: derived in __post_init__
# as transformers derives it (num_key_value_heads = num_attention_heads, head_dim = hidden_size // num_attention_heads),
# or off (rope_scaling). Keys not listed are not read (pretraining_tp only split matmuls in old HF code: same math).
HF_DEFAULTS = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "rope_theta": 10000.0, "rope_scaling": None,
    },
}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn" | "longrope", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral only; Llama leaves it None
    initializer_range: float = 0.02
    attn_implementation: str = "auto"  # see models/attention.py
    fuse_projections: bool = False  # qkv_proj and gate_up_proj, one GEMM each (models/fusion.py); not in config.json
    model_type: str = "llama"
    hf_config: dict = field(default_factory=dict, repr=False)  # the original config.json, written back on save

    # class attributes, not fields: the table from_hf reads (MistralConfig has its own) and the keys whose null
    # means "derive it", as when the key is left out
    hf_defaults = HF_DEFAULTS["llama"]
    nullable_hf_keys = frozenset({"num_key_value_heads"})

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        check_rope_scaling(self.rope_scaling, SUPPORTED_ROPE_TYPES, self.model_type, self.head_dim)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from an HF config.json dict as transformers reads it (its defaults for keys left out), refusing
        settings that would change the math but are not implemented."""
        values = read_keys(hf, cls.hf_defaults, cls.nullable_hf_keys)
        act = values.pop("hidden_act")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported by {cls.__name__} (only 'silu')")
        values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, values["rope_theta"])
        return cls(**values, hf_config=dict(hf))


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.rope = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                                     config.max_position_embeddings)  # on the device of construction (meta, often)

    def materialize_after_load(self, device) -> None:
        """The frequencies are derived, not stored in checkpoints: compute them on the final device."""
        c = self.config
        self.rope = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings).to(device)
        self.inv_freq = self.rope.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.rope.inv_freq_for(self.inv_freq, position_ids), self.rope.attention_factor
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2), fp32 for long contexts
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D). Rotates the two halves of each head (the HF layout)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Rope(nn.Module):
    """Applies `apply_rope` to q and k: a module of its own so that nanotune.kernels.apply_kernels can swap in the
    Triton kernel (both heads in one launch) without touching the attention's forward. No parameters."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # normalise in fp32 whatever the parameter dtype
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        bias = config.attention_bias
        # output features of q, k and v: the three projections, or their weights stacked in one (models/fusion.py)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        if config.fuse_projections:
            self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=bias)
        else:
            self.q_proj = nn.Linear(config.hidden_size, self.qkv_sizes[0], bias=bias)
            self.k_proj = nn.Linear(config.hidden_size, self.qkv_sizes[1], bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, self.qkv_sizes[2], bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=bias)
        self.rope = Rope()  # q and k rotated by position (apply_kernels may swap in the Triton kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: attention.AttentionContext):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):  # one GEMM, (B, T, (Hq + 2 Hkv) * hd), split into views
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # head counts come from the shapes: under tensor parallelism each process holds only some of the heads
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = self.rope(q, k, cos, sin)
        y = attention.attend(q, k, v, ctx, sliding_window=self.config.sliding_window)  # (B, Hq, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, Hq * hd) -> (B, T, D)


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        D, F_, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        if config.fuse_projections:  # gate and up stacked: one GEMM (models/fusion.py)
            self.gate_up_proj = nn.Linear(D, 2 * F_, bias=bias)
        else:
            self.gate_proj = nn.Linear(D, F_, bias=bias)
            self.up_proj = nn.Linear(D, F_, bias=bias)
        self.down_proj = nn.Linear(F_, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each, views of one (B, T, 2F) product
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


# Tensor-parallel plan, applied from outside by nanotune/parallel.py: module-name pattern (`*` = a layer index) ->
# colwise (split output features: whole heads, MLP columns) | rowwise (split input features, outputs all-reduced).
TP_PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


class LlamaForCausalLM(nn.Module):
    tp_plan = TP_PLAN

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # none | selective | full | every_k (see models/checkpointing.py); True / False still mean full / none
        self.activation_checkpointing: str | bool = "none"
        self.activation_checkpointing_k = 1  # every_k: layers 0, k, 2k, ... recompute fully

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head (again after `to_empty`, which unties parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        return_hidden: bool = False,
        packed: bool | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or the final hidden states (B, T, D) with return_hidden.

        Packed rows (several documents per row) are given as cu_seqlens over the flattened B*T tokens, or by
        position_ids restarting at 0; attention never crosses documents. `packed` (the loader's True / False) says
        whether to look for documents at all, without reading the device: a forward torch.compile captures whole.
        None finds out from the data (see models/attention.py).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = attention.build_context(
            self.config.attn_implementation, (B, T), input_ids.device, position_ids, cu_seqlens, max_seqlen,
            packed=packed,
        )
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (B, T, head_dim) each
        mode = self.activation_checkpointing if self.training else "none"  # no backward follows in eval
        for i, layer in enumerate(self.model.layers):
            x = checkpointing.checkpointed(layer, i, mode, self.activation_checkpointing_k)(x, cos, sin, ctx)
        x = self.model.norm(x)  # (B, T, D)
        return x if return_hidden else self.lm_head(x)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch (HF's scheme: normal(0, initializer_range), norms at 1)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, RotaryEmbedding):
                module.materialize_after_load(module.inv_freq.device)
