"""Qwen2-MoE and Qwen3-MoE in one file: config, RMSNorm, RoPE, attention, the sparse mixture-of-experts MLP, the model.

Both are Llama-style decoders whose MLP is (in most layers) a mixture of experts: a linear router scores the
`num_experts` SwiGLU experts for every token, the top `num_experts_per_tok` are run and their outputs summed,
weighted by the router's softmax probabilities (renormalised over the chosen experts when `norm_topk_prob`).
The two differ in:
- Qwen2-MoE: biases on q/k/v, and a *shared expert* every token goes through, scaled by a sigmoid gate;
  `decoder_sparse_step` / `mlp_only_layers` choose which layers are sparse (the others have a dense MLP).
- Qwen3-MoE: RMSNorm on each query and key head before RoPE (as Qwen3), no shared expert, no q/k/v bias.

Experts are stored stacked, `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I), as transformers 5 stores them, and
run dropless: every token's K (token, expert) slots are sorted by expert, the sorted rows go through two grouped GEMMs
(`torch._grouped_mm`), and the results are scaled by the routing weights and summed back into token order. Nothing in
a MoE layer's forward or backward reads a value back to the host, so a decoder block compiles into one graph. Where
torch._grouped_mm cannot run (device, dtype, unaligned sizes) a padded batched matmul takes over, chosen once when the
model is built; it reads the busiest expert's token count back to the host. Checkpoints keep one tensor per expert;
`EXPERT_KEYS` is the one table between the two layouts, used on load (`param_for_hf_key`) and on save
(`hf_state_dict`). With `fuse_projections`, q/k/v and the gate/up of the dense MLPs and the shared expert are stacked
too, into `qkv_proj` and `gate_up_proj` (models/fusion.py maps those, after these hooks).

Router losses, each over all routed tokens of all sparse layers, added up in `model.aux_loss` after each forward:
- load balancing (Switch Transformer, Fedus et al., 2021, eqs. 4-6, as transformers computes it): f_e = share of
  top-k slots that went to expert e, P_e = mean router probability of e, loss = E * sum_e f_e * P_e, weighted by
  `router_aux_loss_coef`;
- router z-loss (ST-MoE, Zoph et al., 2022, eq. 5, as transformers' Switch Transformers computes it): the mean of
  logsumexp(router logits)^2, which keeps the logits small; weighted by `router_z_loss_coef` (0: off, as in
  transformers' Qwen MoE).
`model.tokens_per_expert` keeps the routed slots per layer and expert, so that a collapsing router shows in the logs.

References: Qwen1.5-MoE / Qwen2 technical report (Yang et al., 2024), Qwen3 technical report (Yang et al., 2025),
Switch Transformers (Fedus et al., 2021), GShard (Lepikhin et al., 2020).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import attention, checkpointing
from models.hf_config import check_rope_scaling, read_keys, rope_from_hf
from models.rope_scaling import ROPE_TYPES, rope_frequencies

SUPPORTED_ROPE_TYPES = ROPE_TYPES  # default, linear, llama3, yarn, longrope (models/rope_scaling.py)

# checkpoint name under `model.layers.{i}.mlp.experts.{e}.` -> (stacked parameter, which rows of expert e's slice)
# "first half" / "second half" split gate_up_proj's 2I rows into gate (first I) and up (last I), as transformers 5 does.
EXPERT_KEYS = {
    "gate_proj.weight": ("gate_up_proj", "first half"),  # (I, D) -> gate_up_proj[e, :I]
    "up_proj.weight": ("gate_up_proj", "second half"),  # (I, D) -> gate_up_proj[e, I:]
    "down_proj.weight": ("down_proj", "all"),  # (D, I) -> down_proj[e]
}
_EXPERT_KEY_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+\.weight)$")


# config.json key -> the value transformers' config class for each model type takes when the key is left out.
# None: derived (num_key_value_heads = num_attention_heads when null, head_dim = hidden_size // num_attention_heads, as
# transformers' attention reads it) or empty (mlp_only_layers). Qwen3-MoE's expert count may also be spelled
# num_local_experts (transformers 5 writes that name). Keys not listed are not read.
HF_DEFAULTS = {
    "qwen2_moe": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "use_sliding_window": False,
        "qkv_bias": True, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": None, "router_aux_loss_coef": 0.001,
    },
    "qwen3_moe": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "use_sliding_window": False,
        "attention_bias": False, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": None, "router_aux_loss_coef": 0.001,
    },
}
NULLABLE_HF_KEYS = frozenset({"num_key_value_heads"})  # null: as many as query heads


@dataclass
class QwenMoeConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632  # dense MLP layers (mlp_only_layers, decoder_sparse_step)
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v (Qwen2-MoE: true)
    o_bias: bool = False  # bias on o_proj (Qwen3-MoE's attention_bias)
    qk_norm: bool = False  # RMSNorm per query/key head (Qwen3-MoE)
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen3-MoE)
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0  # not a transformers Qwen option: set by training (`model.router_z_loss_coef`)
    initializer_range: float = 0.02
    attn_implementation: str = "auto"
    fuse_projections: bool = False  # qkv_proj and gate_up_proj, one GEMM each (models/fusion.py); not in config.json
    model_type: str = "qwen2_moe"
    hf_config: dict = field(default_factory=dict, repr=False)

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
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})"
            )
        check_rope_scaling(self.rope_scaling, SUPPORTED_ROPE_TYPES, self.model_type, self.head_dim)

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` has the mixture of experts (else a dense MLP), by transformers' rule."""
        every_step = (layer + 1) % self.decoder_sparse_step == 0
        return layer not in self.mlp_only_layers and self.num_experts > 0 and every_step

    @classmethod
    def from_hf(cls, hf: dict) -> "QwenMoeConfig":
        """Build from a qwen2_moe or qwen3_moe config.json as transformers reads it (its defaults for that model type
        for keys left out), refusing unimplemented settings that change the math."""
        model_type = hf.get("model_type")
        if model_type not in HF_DEFAULTS:
            raise ValueError(f"model_type {model_type!r} is not a Qwen MoE (qwen2_moe, qwen3_moe)")
        spelled = hf
        if hf.get("num_experts") is None and hf.get("num_local_experts") is not None:
            spelled = {**hf, "num_experts": hf["num_local_experts"]}  # transformers 5's name for Qwen3-MoE's count
        values = read_keys(spelled, HF_DEFAULTS[model_type], NULLABLE_HF_KEYS)
        act = values.pop("hidden_act")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported by {model_type} (only 'silu')")
        if values.pop("use_sliding_window"):
            raise ValueError(
                f"config.json: use_sliding_window = true is not supported for {model_type} (released checkpoints set "
                "it false); set it to false to train with full causal attention"
            )
        values["rope_theta"], values["rope_scaling"] = rope_from_hf(hf, values["rope_theta"])
        values["mlp_only_layers"] = values["mlp_only_layers"] or []
        if model_type == "qwen2_moe":  # biases on q/k/v unless qkv_bias = false, none on o_proj; a shared expert
            values.update(o_bias=False, qk_norm=False)
        else:  # Qwen3-MoE: attention_bias on all four projections, q/k norms, no shared expert
            bias = values.pop("attention_bias")
            values.update(qkv_bias=bias, o_bias=bias, qk_norm=True, shared_expert_intermediate_size=0)
        return cls(**values, model_type=model_type, hf_config=dict(hf))


# ------------------------------------------------------------------------------------------ norm, rope, attention


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


class RotaryEmbedding(nn.Module):
    def __init__(self, config: QwenMoeConfig):
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
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Rope(nn.Module):
    """Applies `apply_rope` to q and k: a module of its own so that nanotune.kernels.apply_kernels can swap in the
    Triton kernel (both heads in one launch) without touching the attention's forward. No parameters."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class Attention(nn.Module):
    def __init__(self, config: QwenMoeConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )  # fmt: skip
        D, bias = config.hidden_size, config.qkv_bias
        # output features of q, k and v: the three projections, or their weights stacked in one (models/fusion.py)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        if config.fuse_projections:
            self.qkv_proj = nn.Linear(D, sum(self.qkv_sizes), bias=bias)
        else:
            self.q_proj = nn.Linear(D, self.qkv_sizes[0], bias=bias)
            self.k_proj = nn.Linear(D, self.qkv_sizes[1], bias=bias)
            self.v_proj = nn.Linear(D, self.qkv_sizes[2], bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=config.o_bias)
        self.rope = Rope()  # q and k rotated by position (apply_kernels may swap in the Triton kernel)
        if config.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by all heads
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
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        y = attention.attend(q, k, v, ctx)  # (B, Hq, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, Hq * hd) -> (B, T, D)


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x)). The dense layers and Qwen2-MoE's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, fused: bool = False):
        super().__init__()
        if fused:  # gate and up stacked: one GEMM (models/fusion.py)
            self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, I) each, views of one (N, 2I) product
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


# ------------------------------------------------------------------------------------------------ mixture of experts


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch has torch._grouped_mm for this device and dtype, forward and backward (probed once).

    On "meta": whether torch.compile can trace it (compile runs the meta kernel, which in torch 2.13 takes bf16 only,
    while the CPU kernel also runs fp32)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad():  # the first call may come from a no_grad forward
            # fixed values, not torch.randn: the probe must not move the global random state
            x = torch.ones(6, 16, device=device_type, dtype=dtype, requires_grad=True)
            w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 6], device=device_type, dtype=torch.int32)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)  # (6, 16)
            # a dense upstream gradient: an expanded one (from a bare .sum()) has zero strides that it refuses
            (y.float() * torch.arange(y.numel(), device=device_type).view(y.shape)).sum().backward()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def grouped_matmul(x_MK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor, use_grouped_mm: bool):
    """Rows of x sorted by group (counts_E[e] rows for group e) times their group's weight: x[rows of e] @ w[e].T.

    x (M, K), w (E, N, K) as stored (a Linear's (out, in) per expert) -> (M, N).
    """
    if use_grouped_mm:
        offs = torch.cumsum(counts_E, 0).to(torch.int32)  # (E,) end row of each group, no host sync
        return torch._grouped_mm(x_MK, w_ENK.transpose(-2, -1), offs=offs)
    # fallback: scatter rows into an (E, C, K) buffer padded to the busiest group's C rows, one batched matmul.
    # Reading C costs a host sync (and a graph break under torch.compile) and E*C rows of compute; it is chosen once,
    # when the model is built, where torch._grouped_mm is missing, refuses the dtype or the sizes are not aligned.
    E, M = w_ENK.shape[0], x_MK.shape[0]
    starts = torch.cumsum(counts_E, 0) - counts_E  # (E,) first row of each group
    group = torch.repeat_interleave(torch.arange(E, device=x_MK.device), counts_E, output_size=M)  # (M,)
    slot = torch.arange(M, device=x_MK.device) - starts[group]  # (M,) row within its group
    capacity = int(counts_E.max()) if M else 0
    padded = x_MK.new_zeros(E, capacity, x_MK.shape[1])  # (E, C, K)
    padded[group, slot] = x_MK
    out = torch.bmm(padded, w_ENK.transpose(1, 2))  # (E, C, N)
    return out[group, slot]  # (M, N)


def sort_by_expert(expert_NK: torch.Tensor, num_experts: int):
    """Dropless dispatch order: each token's K (token, expert) slots grouped by expert, all on the device.

    -> order (N*K,) slot indices n*K + k sorted by expert (stable: tokens keep their order within an expert),
       token (N*K,) the token each sorted slot reads, counts (E,) slots per expert.
    """
    K = expert_NK.shape[1]
    flat_expert = expert_NK.flatten()  # (N*K,) slot n*K + k
    order = torch.argsort(flat_expert, stable=True)  # (N*K,)
    # (E,) slots per expert on the device (not bincount: its output size depends on the data)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_NK.device).index_add_(
        0, flat_expert, torch.ones_like(flat_expert)
    )
    return order, order // K, counts


def combine(h_MD: torch.Tensor, order: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """Un-permute: rows in expert order (N*K, D) -> each token's sum of its K rows times their routing weights, (N, D).

    The rows go back to slot order n*K + k (a copy to distinct places, whose backward is a gather) and one batched
    (1, K) x (K, D) product per token weights and sums them: no atomic adds, so the result and its gradient are the same
    in every run on a GPU, unlike a scatter-add into the tokens.
    """
    N, K = weight_NK.shape
    h_slots = h_MD.new_empty(h_MD.shape).index_copy(0, order, h_MD)  # (N*K, D): row n*K + k is token n's k-th expert
    return torch.bmm(weight_NK.to(h_MD.dtype)[:, None, :], h_slots.view(N, K, -1)).squeeze(1)  # (N, D)


class Experts(nn.Module):
    """`num_experts` SwiGLU MLPs stacked into two tensors, computed as grouped GEMMs over tokens sorted by expert.

    `project` is the one product of the sorted rows with a stacked weight; LoRA on the experts and NF4 experts
    (nanotune/lora_experts.py) are subclasses swapped in from outside that change only it.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, D, I = num_experts, hidden_size, intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # per expert: [gate_proj; up_proj] weights
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        # torch._grouped_mm or the padded-bmm fallback: decided once, by `choose_kernel`, when the weights are
        # materialised (never per forward: the probe would sync, and break a compiled graph)
        self.use_grouped_mm: bool | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.down_proj.dtype

    def matmul_sizes(self) -> tuple[int, ...]:
        """The inner dimensions of the products: torch._grouped_mm needs each to be a multiple of 16 bytes."""
        return tuple(self.down_proj.shape[1:])  # (D, I)

    def choose_kernel(self, device: torch.device | str) -> None:
        """torch._grouped_mm where it works for the device and dtype, eagerly and under torch.compile, and the sizes
        are aligned; else the fallback (so fp32 on CPU takes the fallback: torch 2.13 compiles bf16 only)."""
        dtype = self.compute_dtype
        aligned = all(n * dtype.itemsize % 16 == 0 for n in self.matmul_sizes())
        works = grouped_mm_works(torch.device(device).type, dtype) and grouped_mm_works("meta", dtype)
        self.use_grouped_mm = aligned and works

    def materialize_after_load(self, device) -> None:
        self.choose_kernel(device)

    def project(self, name: str, x_MK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (M, in) times their expert's stacked weight `name` (E, out, in) -> (M, out)."""
        return grouped_matmul(x_MK, getattr(self, name), counts_E, self.use_grouped_mm)

    def forward(self, x_ND: torch.Tensor, expert_NK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
        """x (N, D); each token's K chosen experts and their weights (N, K) -> sum_k weight * expert_k(x), (N, D)."""
        if self.use_grouped_mm is None:  # a module built by hand, not by the loader: decide now, once
            self.choose_kernel(x_ND.device)
        order, token, counts = sort_by_expert(expert_NK, self.num_experts)  # (N*K,), (N*K,), (E,)
        h = self.project("gate_up_proj", x_ND[token], counts)  # (N*K, 2I): rows permuted into expert order
        gate, up = h.chunk(2, dim=-1)
        h = self.project("down_proj", F.silu(gate) * up, counts)  # (N*K, D)
        return combine(h, order, weight_NK).to(x_ND.dtype)  # (N, D)


class RouterStats(NamedTuple):
    """One sparse layer's routing statistics for one forward, all on the device (fp32; padding tokens left out)."""

    tokens_per_expert: torch.Tensor  # (E,) top-k slots routed to each expert
    prob_sum: torch.Tensor  # (E,) router probabilities summed over the tokens
    z_sum: torch.Tensor  # () sum over the tokens of logsumexp(router logits) ** 2


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert). Returns the output and the routing statistics."""

    def __init__(self, config: QwenMoeConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size,
                                     config.fuse_projections)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, token_weight_N: torch.Tensor | None) -> tuple[torch.Tensor, RouterStats]:
        """x (B, T, D) -> (B, T, D), and this layer's RouterStats."""
        B, T, D = x.shape
        x_ND = x.reshape(B * T, D)
        logits = self.gate(x_ND)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        top_p, top_e = torch.topk(probs, self.config.num_experts_per_tok, dim=-1)  # (N, K) each
        if self.config.norm_topk_prob:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        out = self.experts(x_ND, top_e, top_p.to(x.dtype))  # (N, D)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)

        # statistics for the router losses and the logs; a token's weight is 0 for padding, else 1
        E = probs.shape[1]
        w_N = torch.ones_like(probs[:, 0]) if token_weight_N is None else token_weight_N  # (N,)
        tokens = torch.zeros(E, dtype=torch.float32, device=x.device).index_add_(
            0, top_e.flatten(), w_N.repeat_interleave(top_e.shape[1])
        )  # (E,)
        # the z-loss statistic only when the z-loss is on: else its graph would hang beside the loss, never used
        z_sum = probs.new_zeros(())
        if self.config.router_z_loss_coef:
            z_sum = (torch.logsumexp(logits.float(), dim=-1).square() * w_N).sum()  # ()
        return out.view(B, T, D), RouterStats(tokens, (probs * w_N[:, None]).sum(0), z_sum)


def _sum_over_group(stats: list[RouterStats], num_tokens, group, device):
    """Routing statistics summed over a process group, differentiably (the backward sums the gradients back)."""
    from torch.distributed.nn.functional import all_reduce

    summed = [RouterStats(*(all_reduce(t, group=group) for t in s)) for s in stats]
    count = all_reduce(torch.as_tensor(num_tokens, dtype=torch.float32, device=device).detach(), group=group)
    return summed, count


def load_balancing_loss(stats: list[RouterStats], num_tokens: torch.Tensor | float, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e over all sparse layers together (transformers' `load_balancing_loss_func`).

    num_tokens: counted tokens per layer. f_e = slots routed to e / routed rows, P_e = probability mass of e / routed
    rows, both summed over the layers.
    """
    rows = num_tokens * len(stats)
    f = torch.stack([s.tokens_per_expert for s in stats]).sum(0) / rows  # (E,)
    P = torch.stack([s.prob_sum for s in stats]).sum(0) / rows  # (E,)
    return num_experts * torch.sum(f * P)


def router_z_loss(stats: list[RouterStats], num_tokens: torch.Tensor | float) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al., 2022, eq. 5): the mean over tokens (and sparse layers) of
    logsumexp(router logits)^2, as transformers' `router_z_loss_func` computes it over all layers' logits."""
    return torch.stack([s.z_sum for s in stats]).sum() / (num_tokens * len(stats))


# --------------------------------------------------------------------------------------------------------- model


class DecoderLayer(nn.Module):
    def __init__(self, config: QwenMoeConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_sparse(layer):
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.fuse_projections)

    def forward(self, x, cos, sin, ctx, token_weight_N=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (x, the (2, E) routing statistics of a sparse layer, or None for a dense one)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoeBlock):
            h, stats = self.mlp(h, token_weight_N)
            return x + h, stats
        return x + self.mlp(h), None


class QwenMoeModel(nn.Module):
    def __init__(self, config: QwenMoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


# Tensor-parallel plan, applied from outside by nanotune/parallel.py: module-name pattern (`*` = a layer index) ->
# colwise (split output features) | rowwise (split input features, outputs all-reduced) | heads_norm (Qwen3's q/k
# norms over head_dim, run on each process's (B, T, local heads, hd)). Attention and the dense MLPs only: the experts,
# the router and Qwen2-MoE's shared expert stay whole on every tensor-parallel process (expert parallelism is apart).
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


class QwenMoeForCausalLM(nn.Module):
    tp_plan = TP_PLAN

    def __init__(self, config: QwenMoeConfig):
        super().__init__()
        self.config = config
        self.model = QwenMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.aux_loss: torch.Tensor | None = None  # set by every forward, see there
        self.tokens_per_expert: torch.Tensor | None = None  # likewise
        # expert parallelism (nanotune/expert_parallel.py): the process group whose tokens the router losses cover
        self.router_group = None
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
        aux_loss_mask: torch.Tensor | None = None,
        packed: bool | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or the final hidden states (B, T, D) with return_hidden.

        Packed rows are given as cu_seqlens or by position_ids restarting at 0 (`packed`: the loader's True / False, no
        look at the data; None finds out, see models/attention.py); attention never crosses documents. Also sets, on
        the device and without a host sync:
        - `self.aux_loss`: router_aux_loss_coef * the load-balancing loss + router_z_loss_coef * the router z-loss,
          over every token of the batch (the router sees one token at a time, so packing does not change them);
          tokens where the optional `aux_loss_mask` (B, T) is False or 0 (padding) are left out, like transformers'
          `attention_mask`;
        - `self.tokens_per_expert`: (sparse layers, E) top-k slots routed to each expert (detached), for the logs.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        ctx = attention.build_context(
            self.config.attn_implementation, (B, T), input_ids.device, position_ids, cu_seqlens, max_seqlen,
            packed=packed,
        )
        token_weight_N = None if aux_loss_mask is None else aux_loss_mask.reshape(B * T).to(torch.float32)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (B, T, head_dim) each
        stats = []
        mode = self.activation_checkpointing if self.training else "none"  # no backward follows in eval
        for layer in self.model.layers:  # a model built by hand: probe torch._grouped_mm here, not in a checkpoint
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None and experts.use_grouped_mm is None:
                experts.choose_kernel(x.device)
        for i, layer in enumerate(self.model.layers):
            run = checkpointing.checkpointed(layer, i, mode, self.activation_checkpointing_k)
            x, layer_stats = run(x, cos, sin, ctx, token_weight_N)
            if layer_stats is not None:
                stats.append(layer_stats)
        if stats:
            num_tokens = B * T if token_weight_N is None else token_weight_N.sum()
            if self.router_group is not None:  # the statistics of every process's tokens, as one process sees them
                stats, num_tokens = _sum_over_group(stats, num_tokens, self.router_group, input_ids.device)
            balance = load_balancing_loss(stats, num_tokens, self.config.num_experts)
            self.aux_loss = self.config.router_aux_loss_coef * balance
            if self.config.router_z_loss_coef:
                self.aux_loss = self.aux_loss + self.config.router_z_loss_coef * router_z_loss(stats, num_tokens)
            self.tokens_per_expert = torch.stack([s.tokens_per_expert for s in stats]).detach()  # (layers, E)
        else:  # every layer dense
            self.aux_loss = torch.zeros((), device=input_ids.device)
            self.tokens_per_expert = None
        x = self.model.norm(x)  # (B, T, D)
        return x if return_hidden else self.lm_head(x)

    # ------------------------------------------------------------------------------ checkpoint key map (EXPERT_KEYS)

    def param_for_hf_key(self, key: str) -> tuple[str, object]:
        """Checkpoint key -> (parameter name, index into it); per-expert keys land in a slice of a stacked tensor."""
        match = _EXPERT_KEY_RE.match(key)
        if match is None or match.group(3) not in EXPERT_KEYS:
            return key, None
        prefix, expert, local = match.group(1), int(match.group(2)), match.group(3)
        param, rows = EXPERT_KEYS[local]
        return f"{prefix}.{param}", (expert, self._rows(rows))

    def expected_hf_keys(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint key the model reads, with its shape (experts one by one, as checkpoints hold them)."""
        shapes = {}
        for name, param in self.named_parameters(remove_duplicate=True):
            prefix, _, local = name.rpartition(".")
            hf_shape = getattr(param, "hf_shape", param.shape)  # what a quantised tensor stands for
            if hf_shape is None:  # made by its module while loading (NF4 block scales): no checkpoint holds it
                continue
            if isinstance(self.get_submodule(prefix), Experts):
                E, out, inner = hf_shape
                for expert in range(E):
                    for hf_local, (stacked, rows) in EXPERT_KEYS.items():
                        if stacked == local:
                            num_rows = len(range(out)[self._rows(rows)])
                            shapes[f"{prefix}.{expert}.{hf_local}"] = (num_rows, inner)
            elif ".lora_" not in name:  # adapters are not in base checkpoints
                shapes[name] = tuple(hf_shape)
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        return shapes

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under their checkpoint names: stacked experts split back into one tensor per expert."""
        out = {}
        for name, tensor in self.state_dict().items():
            prefix, _, local = name.rpartition(".")
            if prefix and isinstance(self.get_submodule(prefix), Experts):
                for expert in range(tensor.shape[0]):
                    for hf_local, (stacked, rows) in EXPERT_KEYS.items():
                        if stacked == local:  # copied: safetensors refuses tensors that share storage
                            out[f"{prefix}.{expert}.{hf_local}"] = tensor[expert, self._rows(rows)].to("cpu", copy=True)
            else:
                out[name] = tensor
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def _rows(self, rows: str) -> slice:
        I = self.config.moe_intermediate_size
        return {"first half": slice(0, I), "second half": slice(I, 2 * I), "all": slice(None)}[rows]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch (transformers' scheme: normal(0, initializer_range), norms at 1)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
                module.choose_kernel(module.down_proj.device)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, RotaryEmbedding):
                module.materialize_after_load(module.inv_freq.device)
