"""Pure RoPE math: rotary geometry, baseline factor vectors (PI, NTK, YaRN), mscale, cos/sin tables.

Every formula here computes exactly what transformers' `modeling_rope_utils` computes for the same
parameters (fp32 angles), so factors searched with these tables are the factors that run after export.
A factor vector has one entry per rotary pair: `theta'_i = theta_i / factors[i]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE geometry of a model: what every factor vector is relative to."""

    base: float  # rope_theta
    rotary_dim: int  # rotated dims per head (head_dim * partial_rotary_factor)
    original_length: int  # context the model was trained on

    @property
    def num_factors(self) -> int:
        return self.rotary_dim // 2

    def scale(self, target_length: int) -> float:
        return target_length / self.original_length


def base_inv_freq(spec: RopeSpec) -> torch.Tensor:
    """theta_i = base^(-2i/d), as transformers' default RoPE computes it.  # (d/2,) fp32"""
    exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64).float() / spec.rotary_dim
    return 1.0 / (spec.base**exponents)


def scaled_inv_freq(spec: RopeSpec, factors: torch.Tensor) -> torch.Tensor:
    """theta_i / factors_i with transformers' longrope arithmetic (bit-identical).  # (d/2,) fp32"""
    factors = torch.as_tensor(factors, dtype=torch.float32)
    exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64).float() / spec.rotary_dim
    return 1.0 / (factors * spec.base**exponents)


def critical_pair(spec: RopeSpec) -> int:
    """LongRoPE2's theoretical critical dimension, in rotary pairs: the first pair whose period 2 pi base^(2i/d)
    exceeds the original window, ceil((d/2) log_base(L / 2 pi)). Pairs from it on never completed a rotation in
    training. Llama-2-7B: 46 of 64; Llama-3-8B: 35 of 64; Phi-3-mini: 34 of 48."""
    pairs = spec.num_factors * math.log(spec.original_length / (2 * math.pi)) / math.log(spec.base)
    return min(max(math.ceil(pairs), 0), spec.num_factors)


def longrope_mscale(scale: float, original_length: int) -> float:
    """LongRoPE's attention temperature sqrt(1 + ln s / ln L); transformers' default `attention_factor`."""
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_length))


def yarn_mscale(scale: float) -> float:
    """YaRN's attention temperature 0.1 ln s + 1."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * math.log(scale) + 1.0


# --- baselines as per-dimension factor vectors -------------------------------------------------------


def pi_factors(spec: RopeSpec, scale: float) -> torch.Tensor:
    """Position Interpolation: every dimension divided by s.  # (d/2,)"""
    return torch.full((spec.num_factors,), float(scale), dtype=torch.float64)


def ntk_factors(spec: RopeSpec, scale: float) -> torch.Tensor:
    """NTK-aware: base' = base * s^(d/(d-2)), i.e. lambda_i = s^(2i/(d-2)).  # (d/2,)"""
    d = spec.rotary_dim
    i = torch.arange(spec.num_factors, dtype=torch.float64)
    return float(scale) ** (2.0 * i / (d - 2))


def yarn_ramp(spec: RopeSpec, beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN's interpolation weight per pair (0: keep, 1: interpolate fully), as transformers computes it.

    Pairs that rotate more than beta_fast times inside the original window are kept; fewer than beta_slow
    times are interpolated by s; a linear ramp over pair index in between (floor/ceil truncation).  # (d/2,)
    """
    d, base, length = spec.rotary_dim, spec.base, spec.original_length

    def pair_index(num_rotations: float) -> float:
        return (d * math.log(length / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = (torch.arange(spec.num_factors, dtype=torch.float64) - low) / (high - low)
    return ramp.clamp(0.0, 1.0)


def yarn_factors(spec: RopeSpec, scale: float, beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN (NTK-by-parts) as factors: inv_freq = theta * ((1 - r) + r / s) => lambda = 1 / ((1 - r) + r / s)."""
    ramp = yarn_ramp(spec, beta_fast, beta_slow)
    return 1.0 / ((1.0 - ramp) + ramp / float(scale))


# The YaRN family around its published (beta_fast 32, beta_slow 1): the ramp's fast end moved an octave of rotations
# either way, its slow end one or two octaves later or one earlier. LongRoPE's winners look like such a ramp moved and
# reshaped, so the family spreads the initial population along the direction the search moves in (search.seeds:
# yarn-family). In a short window the fast end sits at pair 0 for every beta_fast and the variants collapse to fewer.
YARN_FAMILY = tuple((fast, slow) for fast in (16.0, 32.0, 64.0) for slow in (0.25, 0.5, 1.0, 2.0)
                    if (fast, slow) != (32.0, 1.0))


def yarn_family(spec: RopeSpec, scale: float) -> dict[str, torch.Tensor]:
    """The YARN_FAMILY variants by name, e.g. "yarn@16,0.5" (beta_fast 16, beta_slow 0.5).  # each (d/2,)"""
    return {f"yarn@{fast:g},{slow:g}": yarn_factors(spec, scale, fast, slow) for fast, slow in YARN_FAMILY}


def none_factors(spec: RopeSpec, scale: float) -> torch.Tensor:
    """No rescaling: the model's original RoPE extrapolated past its window.  # (d/2,)"""
    return torch.ones(spec.num_factors, dtype=torch.float64)


BaselineFn = Callable[[RopeSpec, float], torch.Tensor]

# Seeds of the initial population and the comparison methods of `longrope eval`.
BASELINES: dict[str, BaselineFn] = {
    "pi": pi_factors,
    "ntk": ntk_factors,
    "yarn": yarn_factors,
}

# The attention temperature each method is run with (LongRoPE's own for the searched factors).
BASELINE_MSCALE: dict[str, Callable[[float, int], float]] = {
    "none": lambda scale, length: 1.0,
    "pi": lambda scale, length: 1.0,
    "ntk": lambda scale, length: 1.0,
    "yarn": lambda scale, length: yarn_mscale(scale),
}


def baseline(name: str) -> BaselineFn:
    """Look up a baseline by name; an unknown name lists the valid ones."""
    table = {"none": none_factors, **BASELINES}
    if name not in table:
        raise KeyError(f"unknown RoPE method {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


# --- cos/sin tables -----------------------------------------------------------------------------------


def rope_angles(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, original_inv_freq: torch.Tensor, n_hat: int
) -> torch.Tensor:
    """Rotation angles with LongRoPE's per-token rule: positions < n_hat keep the original frequencies.

    position_ids: (b, L) integer; inv_freq, original_inv_freq: (d/2,) fp32 -> (b, L, d/2) fp32.
    Same arithmetic as transformers (`position * inv_freq` in fp32), so n_hat = 0 is bit-identical.
    """
    positions = position_ids[..., None].float()  # (b, L, 1)
    angles = positions * inv_freq.to(device=position_ids.device, dtype=torch.float)
    if n_hat > 0:
        original = positions * original_inv_freq.to(device=position_ids.device, dtype=torch.float)
        angles = torch.where(positions < n_hat, original, angles)
    return angles


def cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    original_inv_freq: torch.Tensor,
    n_hat: int = 0,
    mscale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) in the layout HF attention consumes: (b, L, d), halves duplicated, times mscale.

    mscale applies to every position (it is a temperature on attention logits, not a rotation).
    """
    angles = rope_angles(position_ids, inv_freq, original_inv_freq, n_hat)
    emb = torch.cat((angles, angles), dim=-1)  # (b, L, d)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)
