"""rope.py equals transformers' own RoPE for the same parameters, so what is searched is what runs."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longrope_search import rope
from longrope_search.rope import RopeSpec

ORIGINAL = 256
SPEC = RopeSpec(base=10000.0, rotary_dim=64, original_length=ORIGINAL)


def hf_config(rope_parameters: dict, max_positions: int = ORIGINAL) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": SPEC.base, **rope_parameters},
    )


def searched_like_factors(scale: float) -> torch.Tensor:
    # non-uniform, non-monotonic in places: the shape a search produces, not a formula
    g = torch.Generator().manual_seed(0)
    return (1.0 + torch.rand(SPEC.num_factors, generator=g, dtype=torch.float64) * 1.25 * scale).sort().values


@pytest.mark.parametrize("scale", [2.0, 8.0, 32.0])
def test_pi_equals_transformers_linear(scale):
    hf_inv_freq, hf_attn = ROPE_INIT_FUNCTIONS["linear"](hf_config({"rope_type": "linear", "factor": scale}), None)
    ours = rope.scaled_inv_freq(SPEC, rope.pi_factors(SPEC, scale))
    torch.testing.assert_close(ours, hf_inv_freq, rtol=1e-6, atol=0)
    assert hf_attn == rope.BASELINE_MSCALE["pi"](scale, ORIGINAL) == 1.0


@pytest.mark.parametrize("scale", [2.0, 8.0, 32.0])
def test_yarn_equals_transformers_yarn(scale):
    params = {"rope_type": "yarn", "factor": scale, "original_max_position_embeddings": ORIGINAL}
    hf_inv_freq, hf_attn = ROPE_INIT_FUNCTIONS["yarn"](hf_config(params), None)
    ours = rope.scaled_inv_freq(SPEC, rope.yarn_factors(SPEC, scale))
    torch.testing.assert_close(ours, hf_inv_freq, rtol=1e-6, atol=0)
    assert rope.yarn_mscale(scale) == pytest.approx(hf_attn, rel=1e-12)
    # YaRN keeps the fastest pairs and interpolates the slowest fully
    factors = rope.yarn_factors(SPEC, scale)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(scale)


def test_the_yarn_family_moves_the_ramp_ends_around_yarn():
    spec = RopeSpec(base=10000.0, rotary_dim=128, original_length=4096)  # Llama 2's geometry
    family = rope.yarn_family(spec, 16.0)
    assert len(family) == len(rope.YARN_FAMILY) == 11 and "yarn@32,1" not in family  # the published one is "yarn"
    assert len({tuple(v.tolist()) for v in family.values()}) == 11  # at a 4k window every variant differs
    for name, factors in family.items():
        fast, slow = (float(x) for x in name.removeprefix("yarn@").split(","))
        torch.testing.assert_close(factors, rope.yarn_factors(spec, 16.0, fast, slow))
        assert factors[0] == 1.0 and factors[-1] == pytest.approx(16.0)  # the same ends as YaRN

    def kept(fast, slow=1.0):  # pairs left as they are
        return int((rope.yarn_ramp(spec, fast, slow) == 0).sum())

    def full(slow, fast=32.0):  # pairs interpolated by the whole scale
        return int((rope.yarn_ramp(spec, fast, slow) == 1).sum())

    assert kept(16.0) > kept(32.0) > kept(64.0)  # fewer rotations required: more pairs kept
    assert full(0.25) < full(0.5) < full(1.0) < full(2.0)  # a later slow end: fewer pairs fully interpolated


@pytest.mark.parametrize("scale", [4.0, 32.0])
def test_longrope_inv_freq_and_mscale_equal_transformers(scale):
    long_factor = searched_like_factors(scale).tolist()
    params = {
        "rope_type": "longrope", "long_factor": long_factor, "short_factor": [1.0] * SPEC.num_factors,
        "original_max_position_embeddings": ORIGINAL, "factor": scale,
    }
    hf_inv_freq, hf_attn = ROPE_INIT_FUNCTIONS["longrope"](hf_config(params), None, seq_len=ORIGINAL + 1)
    ours = rope.scaled_inv_freq(SPEC, torch.tensor(long_factor))
    assert torch.equal(ours, hf_inv_freq)  # same arithmetic, bit for bit
    assert rope.longrope_mscale(scale, ORIGINAL) == pytest.approx(hf_attn, rel=1e-12)
    assert rope.longrope_mscale(32.0, 4096) == pytest.approx(1.190, abs=1e-3)  # the paper's number


def test_cos_sin_equal_transformers_rotary_embedding_up_to_64x():
    scale = 64.0
    long_factor = searched_like_factors(scale).tolist()
    params = {
        "rope_type": "longrope", "long_factor": long_factor, "short_factor": [1.0] * SPEC.num_factors,
        "original_max_position_embeddings": ORIGINAL, "factor": scale,
    }
    hf = LlamaRotaryEmbedding(hf_config(params, max_positions=int(ORIGINAL * scale)))
    position_ids = torch.arange(int(ORIGINAL * scale))[None]  # (1, 64 * L): longer than the window -> long factors
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = hf(x, position_ids)
    mscale = rope.longrope_mscale(scale, ORIGINAL)
    ours_cos, ours_sin = rope.cos_sin(
        position_ids, rope.scaled_inv_freq(SPEC, torch.tensor(long_factor)), rope.base_inv_freq(SPEC), 0, mscale
    )
    assert (ours_cos - hf_cos).abs().max().item() <= 1e-6
    assert (ours_sin - hf_sin).abs().max().item() <= 1e-6


def test_n_hat_rows_keep_original_rotation():
    scale, n_hat = 8.0, 12
    position_ids = torch.arange(100)[None]
    original = rope.base_inv_freq(SPEC)
    scaled = rope.scaled_inv_freq(SPEC, rope.pi_factors(SPEC, scale))
    cos, sin = rope.cos_sin(position_ids, scaled, original, n_hat=n_hat, mscale=1.0)
    orig_cos, orig_sin = rope.cos_sin(position_ids, original, original)
    scaled_cos, scaled_sin = rope.cos_sin(position_ids, scaled, original)
    assert torch.equal(cos[:, :n_hat], orig_cos[:, :n_hat]) and torch.equal(sin[:, :n_hat], orig_sin[:, :n_hat])
    assert torch.equal(cos[:, n_hat:], scaled_cos[:, n_hat:]) and torch.equal(sin[:, n_hat:], scaled_sin[:, n_hat:])
    assert not torch.equal(cos[:, 1:n_hat], scaled_cos[:, 1:n_hat])


def test_ntk_matches_base_change():
    scale = 16.0
    d = SPEC.rotary_dim
    new_base = SPEC.base * scale ** (d / (d - 2))
    expected = rope.base_inv_freq(RopeSpec(new_base, d, ORIGINAL))
    torch.testing.assert_close(rope.scaled_inv_freq(SPEC, rope.ntk_factors(SPEC, scale)), expected, rtol=1e-5, atol=0)


def test_baseline_lookup_names_valid_methods():
    assert rope.baseline("yarn") is rope.yarn_factors
    with pytest.raises(KeyError, match="none, ntk, pi, yarn"):
        rope.baseline("dynamic")
    assert math.isclose(rope.longrope_mscale(1.0, 4096), 1.0)
