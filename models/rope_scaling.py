"""RoPE frequencies for each scaling type, as transformers computes them: the one piece every family shares.

Rotary embeddings rotate each pair of head dimensions i by the angle position * inv_freq[i], with
inv_freq[i] = theta^(-2i / head_dim). A model trained at context L can be stretched to a longer context by changing
these frequencies (and, for some types, by scaling cos / sin by an attention factor):

- `linear` (position interpolation, Chen et al., 2023): every frequency divided by `factor`.
- `llama3` (Llama 3.1): high frequencies kept, low ones divided by `factor`, a smooth ramp in between.
- `yarn` (Peng et al., 2023, "YaRN"): per dimension, a ramp between the original frequency (dimensions that turn many
  times within the original context) and the interpolated one (dimensions that turn less than once), and cos / sin
  multiplied by 0.1 ln(factor) + 1 (or the `attention_factor` given).
- `longrope` (Ding et al., 2024, "LongRoPE"; Phi-3): a learned divisor per dimension, `short_factor` while the longest
  position fits the original context and `long_factor` beyond it; cos / sin multiplied by
  sqrt(1 + ln(factor) / ln(original context)).

Dynamic NTK changes the frequencies with the length of the text being generated: an inference-time method, refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# keys each rope type needs inside rope_scaling / rope_parameters; without them the frequencies are undefined
REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(REQUIRED_KEYS)


@dataclass
class RopeFrequencies:
    inv_freq: torch.Tensor  # (head_dim / 2,)
    attention_factor: float = 1.0  # cos and sin are multiplied by it (yarn, longrope)
    # longrope: the frequencies used once a position reaches original_context (inv_freq is then the short ones)
    long_inv_freq: torch.Tensor | None = None
    original_context: int | None = None

    def to(self, device) -> "RopeFrequencies":
        long = None if self.long_inv_freq is None else self.long_inv_freq.to(device)
        return RopeFrequencies(self.inv_freq.to(device), self.attention_factor, long, self.original_context)

    def inv_freq_for(self, inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`inv_freq` (the module's buffer), or longrope's long frequencies once a position reaches the original
        context (picked on the device, without a host sync, as transformers picks them)."""
        if self.long_inv_freq is None:
            return inv_freq
        return torch.where(position_ids.max() >= self.original_context, self.long_inv_freq, inv_freq)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None,
                     max_position_embeddings: int | None = None) -> RopeFrequencies:
    """The rotary frequencies of one rope: plain, or scaled as `scaling["rope_type"]` says."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (head_dim / 2,)
    inv_freq = 1.0 / theta ** exponent
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return RopeFrequencies(inv_freq)
    if kind == "linear":
        return RopeFrequencies(inv_freq / scaling["factor"])
    if kind == "llama3":
        return RopeFrequencies(_llama3(inv_freq, scaling))
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    if kind == "longrope":
        return _longrope(theta ** exponent, scaling, max_position_embeddings)
    raise ValueError(f"rope_type {kind!r}: nanotune implements {ROPE_TYPES}")


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # wavelengths longer than old_context / low: divided by factor; shorter than old_context / high: kept
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, scaling: dict) -> RopeFrequencies:
    factor = scaling["factor"]
    old_context = scaling["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def dim_turning(num_rotations: float) -> float:
        """The (fractional) dimension index whose pair turns `num_rotations` times over the original context."""
        return head_dim * math.log(old_context / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    # dimensions below `low` turn more than beta_fast times over the original context: keep them (extrapolate);
    # above `high` they turn less than beta_slow times: interpolate them by `factor`; a linear ramp in between
    low, high = dim_turning(scaling.get("beta_fast") or 32), dim_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (head_dim / 2,)
    base_freq = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated, interpolated = 1.0 / base_freq, 1.0 / (factor * base_freq)
    keep = 1 - ramp  # 1: the original frequency, 0: the interpolated one
    return RopeFrequencies(interpolated * (1 - keep) + extrapolated * keep, float(attention_factor))


def _longrope(base_freq: torch.Tensor, scaling: dict, max_position_embeddings: int | None) -> RopeFrequencies:
    old_context = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:  # Phi-3 leaves it out: the stretch from the original context to max_position_embeddings
        factor = max_position_embeddings / old_context
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_context))
    short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    long = torch.tensor(scaling["long_factor"], dtype=torch.float32)
    return RopeFrequencies(1.0 / (short * base_freq), float(attention_factor), 1.0 / (long * base_freq), old_context)


def check_frequencies_shape(scaling: dict | None, head_dim: int) -> None:
    """longrope's per-dimension factors must have one entry per rotated pair (head_dim / 2)."""
    if (scaling or {}).get("rope_type") != "longrope":
        return
    for key in ("short_factor", "long_factor"):
        value = scaling[key]
        if not isinstance(value, list) or len(value) != head_dim // 2:
            raise ValueError(f"config.json: rope_scaling {key} must be a list of head_dim / 2 = {head_dim // 2} "
                             f"numbers, got {value!r}")
