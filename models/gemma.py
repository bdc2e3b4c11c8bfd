"""Gemma 2 and Gemma 3 (text) in one file: config, RMSNorm, RoPE, attention, GeGLU MLP, the model.

Gemma's decoder differs from Llama's in a handful of places, each marked in the code:
- the token embedding is multiplied by sqrt(hidden_size) (rounded to the weight dtype, as the reference does);
- RMSNorm scales by (1 + weight), computed in fp32, and each layer has four of them: before and after attention,
  before and after the MLP (the "post" norms normalise the branch output before it joins the residual stream);
- the MLP is GeGLU with the tanh approximation of GELU: down(gelu_tanh(gate(x)) * up(x));
- attention scores are scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- local layers attend within a sliding window, global layers to the whole causal prefix: Gemma 2 alternates
  (local, global, ...); Gemma 3 reads `layer_types` (five local layers per global one in released models);
- Gemma 2 soft-caps attention logits and final logits: s -> cap * tanh(s / cap);
- Gemma 3 normalises each query and key head (RMSNorm), and gives local layers their own RoPE base (10k) while the
  global layers use base 1M with optional linear RoPE scaling for long contexts;
- the LM head is tied to the embedding.

`final_logit_softcapping` is part of the logits: a loss that consumes `return_hidden=True` must apply
`softcap_logits` after the LM head, as `forward` does.

References: Gemma 2 (Gemma Team, 2024), Gemma 3 technical report (Gemma Team, 2025), GLU variants (Shazeer, 2020),
RoFormer (Su et al., 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import attention, checkpointing
from models.hf_config import check_rope_scaling, read_keys, rope_from_hf, rope_scaling_of
from models.rope_scaling import ROPE_TYPES, rope_frequencies

SUPPORTED_ROPE_TYPES = ROPE_TYPES  # for the global layers (models/rope_scaling.py)
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")  # both spell tanh-approximated GELU


# config.json key -> the value transformers' Gemma2Config / Gemma3TextConfig takes when the key is left out. None:
# derived (layer_types from the layer pattern: every 2nd layer global for Gemma 2, every sliding_window_pattern-th for
# Gemma 3) or off (softcapping, rope scaling). Gemma 3's rope_theta is the global layers' base, rope_local_base_freq the
# sliding layers'. Keys not listed are not read.
HF_DEFAULTS = {
    "gemma2": {
        "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096, "layer_types": None,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "use_bidirectional_attention": None,
        "rope_theta": 10000.0, "rope_scaling": None,
    },
    "gemma3_text": {
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096, "layer_types": None,
        "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "use_bidirectional_attention": False, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": None,
    },
}
# null where the default is a value: no softcapping, no window (an error if layers slide), causal attention
NULLABLE_HF_KEYS = frozenset({"final_logit_softcapping", "attn_logit_softcapping", "sliding_window",
                              "use_bidirectional_attention"})


@dataclass
class GemmaConfig:
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] = field(default_factory=list)  # "sliding_attention" | "full_attention" per layer
    attn_logit_softcapping: float | None = None  # Gemma 2: 50.0
    final_logit_softcapping: float | None = None  # Gemma 2: 30.0
    qk_norm: bool = False  # Gemma 3
    rope_theta: float = 10000.0  # global (full attention) layers
    rope_scaling: dict | None = None  # global layers only, e.g. {"rope_type": "linear", "factor": 8.0}
    rope_local_theta: float | None = None  # sliding layers' base (Gemma 3); None: the global rope for every layer
    initializer_range: float = 0.02
    attn_implementation: str = "auto"
    fuse_projections: bool = False  # qkv_proj and gate_up_proj, one GEMM each (models/fusion.py); not in config.json
    model_type: str = "gemma2"
    hf_key_prefix: str = ""  # "language_model." when read from a Gemma 3 image-text checkpoint (model_type gemma3)
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.layer_types:  # Gemma 2's pattern: local, global, local, ...
            self.layer_types = [alternating_layer_type(i, 2) for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"layer_types: {sorted(unknown)} unknown; use 'sliding_attention' or 'full_attention'")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        check_rope_scaling(self.rope_scaling, SUPPORTED_ROPE_TYPES, self.model_type, self.head_dim)

    @classmethod
    def from_hf(cls, hf: dict) -> "GemmaConfig":
        """Build from a gemma2 or gemma3_text config.json (or gemma3's text_config) as transformers reads it (its
        defaults for that model type for keys left out), refusing unsupported settings."""
        model_type = hf.get("model_type")
        if model_type == "gemma3":
            return cls.from_hf_image_text(hf)
        if model_type not in HF_DEFAULTS:
            raise ValueError(f"model_type {model_type!r} is not a Gemma 2 / Gemma 3 text model (gemma2, gemma3_text)")
        values = read_keys(hf, HF_DEFAULTS[model_type], NULLABLE_HF_KEYS)
        act = values.pop("hidden_activation")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"config.json: hidden_activation {act!r} is not supported by {model_type} (only 'gelu_pytorch_tanh')"
            )
        if values.pop("use_bidirectional_attention"):
            raise ValueError(
                "config.json: use_bidirectional_attention = true (an embedding model) is not supported; "
                "nanotune trains causal language models"
            )
        if model_type == "gemma2":
            values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, values["rope_theta"])
            pattern = 2
        else:
            # Gemma 3 ignores attn_logit_softcapping (transformers' Gemma 3 attention never applies it); so do we.
            values["attn_logit_softcapping"] = None
            values["qk_norm"] = True
            values.update(gemma3_ropes_from_hf(hf, values["rope_theta"], values.pop("rope_local_base_freq")))
            pattern = values.pop("sliding_window_pattern")  # older config.json files: the period, not layer_types
        implied = [alternating_layer_type(i, pattern) for i in range(values["num_hidden_layers"])]
        values["layer_types"] = values["layer_types"] or implied
        return cls(**values, model_type=model_type, hf_config=dict(hf))

    @classmethod
    def from_hf_image_text(cls, hf: dict) -> "GemmaConfig":
        """The text model of a Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration, model_type gemma3).

        Its tensors are read from `language_model.model.*` (the vision tower and projector are not used); saving
        writes a text-only gemma3_text checkpoint (Gemma3ForCausalLM) that transformers loads as such.
        """
        text = {"model_type": "gemma3_text", **(hf.get("text_config") or {})}
        text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
        text["architectures"] = ["Gemma3ForCausalLM"]
        config = cls.from_hf(text)
        config.hf_key_prefix = "language_model."
        return config


def alternating_layer_type(layer: int, period: int) -> str:
    """Every `period`-th layer (1-based) global, the others local: transformers' rule without layer_types."""
    return "sliding_attention" if (layer + 1) % period else "full_attention"


def gemma3_ropes_from_hf(hf: dict, theta: float, local_theta: float) -> dict:
    """Gemma 3: global layers (rope_theta, rope_scaling) and local layers (their own base, never scaled).

    transformers 5 writes rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}; older files have
    rope_theta, rope_local_base_freq and rope_scaling (for the global layers) at the top level. `theta` and
    `local_theta` are the top-level values or their defaults.
    """
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(hf.get("rope_scaling") or params), {}
    if rope_scaling_of(local) is not None:
        raise ValueError(f"config.json: rope scaling on sliding_attention layers ({local}) is not supported")
    scaling = rope_scaling_of(full, hf.get("original_max_position_embeddings"))
    return dict(rope_theta=float(full.get("rope_theta", theta)), rope_scaling=scaling,
                rope_local_theta=float(local.get("rope_theta", local_theta)))


# ------------------------------------------------------------------------------------------ norm, rope, attention


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, then cast back (weights start at 0, i.e. scale 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_position_embeddings = max_position_embeddings
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.rope = rope_frequencies(head_dim, theta, scaling, max_position_embeddings)  # on the construction device

    def materialize_after_load(self, device) -> None:
        """The frequencies are derived, not stored in checkpoints: compute them on the final device."""
        self.rope = rope_frequencies(self.head_dim, self.theta, self.scaling, self.max_position_embeddings).to(device)
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
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Rope(nn.Module):
    """Applies `apply_rope` to q and k: a module of its own so that nanotune.kernels.apply_kernels can swap in the
    Triton kernel (both heads in one launch) without touching the attention's forward. No parameters."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): smoothly bounds x to (-cap, cap); the identity for cap None."""
    return x if cap is None else cap * torch.tanh(x / cap)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )  # fmt: skip
        self.is_local = config.layer_types[layer] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_local else None
        self.softcap = config.attn_logit_softcapping
        self.scale = config.query_pre_attn_scalar**-0.5  # not head_dim ** -0.5
        D, bias = config.hidden_size, config.attention_bias
        # output features of q, k and v: the three projections, or their weights stacked in one (models/fusion.py)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        if config.fuse_projections:
            self.qkv_proj = nn.Linear(D, sum(self.qkv_sizes), bias=bias)
        else:
            self.q_proj = nn.Linear(D, self.qkv_sizes[0], bias=bias)
            self.k_proj = nn.Linear(D, self.qkv_sizes[1], bias=bias)
            self.v_proj = nn.Linear(D, self.qkv_sizes[2], bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)
        self.rope = Rope()  # q and k rotated by position (apply_kernels may swap in the Triton kernel)
        if config.qk_norm:  # Gemma 3: RMSNorm over each head's head_dim, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: attention.AttentionContext):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):  # one GEMM, (B, T, (Hq + 2 Hkv) * hd), split into views
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # head counts come from the shapes: under tensor parallelism each process holds only some of the heads
        q = q.view(B, T, -1, self.head_dim)  # (B, T, Hq, hd)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        y = attention.attend(q, k, v, ctx, sliding_window=self.sliding_window, softcap=self.softcap, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, Hq * hd) -> (B, T, D)


class MLP(nn.Module):
    """GeGLU (Shazeer, 2020) with tanh-approximated GELU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        if config.fuse_projections:  # gate and up stacked: one GEMM (models/fusion.py)
            self.gate_up_proj = nn.Linear(D, 2 * F_, bias=False)
        else:
            self.gate_proj = nn.Linear(D, F_, bias=False)
            self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, F) each, views of one (B, T, 2F) product
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(D, eps)  # on the attention output, before the residual add
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(D, eps)  # on the MLP output, before the residual add

    def forward(self, x, cos, sin, ctx):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings)  # global layers
        if config.rope_local_theta is not None:  # Gemma 3: sliding layers have their own base, never scaled
            self.rotary_emb_local = RotaryEmbedding(config.head_dim, config.rope_local_theta, None)


# Tensor-parallel plan, applied from outside by nanotune/parallel.py: module-name pattern (`*` = a layer index) ->
# colwise (split output features) | rowwise (split input features, outputs all-reduced) | heads_norm (Gemma 3's
# q/k norms over head_dim, run on each process's (B, T, local heads, hd), their gradient summed over processes).
TP_PLAN = {
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.q_norm": "heads_norm",
    "model.layers.*.self_attn.k_norm": "heads_norm",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
}


class GemmaForCausalLM(nn.Module):
    tp_plan = TP_PLAN

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # none | selective | full | every_k (see models/checkpointing.py); True / False still mean full / none
        self.activation_checkpointing: str | bool = "none"
        self.activation_checkpointing_k = 1  # every_k: layers 0, k, 2k, ... recompute fully

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head (again after `to_empty`, which unties parameters)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def softcap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final-logit softcap (identity when final_logit_softcapping is None): apply after the LM head."""
        return softcap(logits, self.config.final_logit_softcapping)

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

        Packed rows are given as cu_seqlens or by position_ids restarting at 0 (`packed`: the loader's True / False, no
        look at the data; None finds out, see models/attention.py); attention never crosses documents, and sliding windows count positions within the row (a window never reaches another document).
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = attention.build_context(
            self.config.attn_implementation, (B, T), input_ids.device, position_ids, cu_seqlens, max_seqlen,
            packed=packed,
        )
        self._check_softcap_support(ctx)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)  # the scale rounded to the dtype, as HF
        rope_global = self.model.rotary_emb(position_ids, x.dtype)  # (cos, sin), each (B, T, head_dim)
        rope_local = rope_global
        if hasattr(self.model, "rotary_emb_local"):
            rope_local = self.model.rotary_emb_local(position_ids, x.dtype)
        mode = self.activation_checkpointing if self.training else "none"  # no backward follows in eval
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope_local if layer.self_attn.is_local else rope_global
            x = checkpointing.checkpointed(layer, i, mode, self.activation_checkpointing_k)(x, cos, sin, ctx)
        x = self.model.norm(x)  # (B, T, D)
        return x if return_hidden else self.softcap_logits(self.lm_head(x))

    # ------------------------------------------------------- checkpoint keys: the identity, or under a Gemma 3 prefix

    @property
    def ignored_hf_key_prefixes(self) -> tuple[str, ...]:
        """Checkpoint tensors that are not part of this text model (a Gemma 3 image-text checkpoint's vision side)."""
        return ("vision_tower.", "multi_modal_projector.") if self.config.hf_key_prefix else ()

    def expected_hf_keys(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint key the model reads, with its shape: parameter names under `hf_key_prefix`."""
        shapes = {}
        for name, param in self.named_parameters(remove_duplicate=True):
            if ".lora_" in name or name.endswith("lora_magnitude_vector") or getattr(param, "hf_shape", ()) is None:
                continue  # adapters are not in base checkpoints, nor tensors made while loading (NF4 block scales)
            shapes[self.config.hf_key_prefix + name] = tuple(getattr(param, "hf_shape", param.shape))
        if self.config.tie_word_embeddings:
            shapes.pop(self.config.hf_key_prefix + "lm_head.weight", None)
        return shapes

    def param_for_hf_key(self, key: str) -> tuple[str, None]:
        return key.removeprefix(self.config.hf_key_prefix), None

    def _check_softcap_support(self, ctx: attention.AttentionContext) -> None:
        """Refuse, before any layer runs, an explicit backend that cannot softcap ("auto" picks one that can)."""
        if self.config.attn_logit_softcapping is None or ctx.auto:
            return
        if not attention.CAPABILITIES.get(ctx.implementation, {}).get("softcap", False):
            able = [name for name, caps in attention.CAPABILITIES.items() if caps.get("softcap")]
            raise ValueError(
                f"{self.config.model_type} soft-caps attention logits (attn_logit_softcapping = "
                f"{self.config.attn_logit_softcapping}), which attention.implementation = {ctx.implementation!r} "
                f"cannot do; use 'auto' or one of {able}"
            )

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: normal(0, initializer_range); norms at 0, i.e. a scale of 1."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()
            elif isinstance(module, RotaryEmbedding):
                module.materialize_after_load(module.inv_freq.device)
