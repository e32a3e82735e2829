"""The rope keys of an exported config.json: what makes transformers (4.5x and 5.x) and vLLM run searched factors as
rope type "longrope", or a baseline (YaRN, PI, NTK) at a fixed target as their own rope types; what such a config
cannot carry; and which rope type a loaded config runs.
"""

from __future__ import annotations

import math
from typing import Any

from longrope_search.factors import LONGROPE, FactorsFile
from longrope_search.rope import longrope_mscale

# An mscale this close to transformers' default needs no explicit `attention_factor` (keeps Phi-3's strict form).
MSCALE_RTOL = 1e-6


def needs_attention_factor(ff: FactorsFile) -> bool:
    """True when the searched mscale is not the one transformers and vLLM derive from target/original."""
    default = longrope_mscale(ff.scale, ff.rope.original_length)
    return not math.isclose(ff.mscale, default, rel_tol=MSCALE_RTOL)


def hf_rope_config(ff: FactorsFile, model_type: str, partial_rotary_factor: float | None = None) -> dict[str, Any]:
    """The config.json keys that make a transformers 4.5x / 5.x or vLLM model run these factors as longrope.

    `rope_scaling` is what 4.5x and vLLM read, and what 5.x prefers over `rope_parameters` when both are present;
    `rope_parameters` mirrors it in 5.x's standardised form so a reader of the new key sees the same RoPE.
    Top-level `original_max_position_embeddings` is required: 4.5x takes the window from there, not from
    `rope_scaling`, and without it would fall back to `max_position_embeddings` (never switching to long factors).
    """
    if ff.method != LONGROPE:
        return _method_rope_config(ff, partial_rotary_factor)
    original = ff.rope.original_length
    long_factor = [float(x) for x in ff.factors]
    short_factor = [float(x) for x in ff.short_or_ones]
    full = {
        "rope_type": "longrope",
        "long_factor": long_factor,
        "short_factor": short_factor,
        "factor": ff.scale,
        "original_max_position_embeddings": original,
    }
    if needs_attention_factor(ff):
        full["attention_factor"] = ff.mscale
        # vLLM ignores attention_factor; it takes these instead and otherwise derives the default sqrt formula
        full["short_mscale"] = full["long_mscale"] = ff.mscale
    if model_type == "phi3" and "attention_factor" not in full:
        # transformers 4.x Phi3Config rejects rope_scaling unless it has exactly these three keys
        rope_scaling: dict[str, Any] = {"type": "longrope", "short_factor": short_factor, "long_factor": long_factor}
    else:
        rope_scaling = dict(full)
    rope_parameters = {**full, "rope_theta": ff.rope.base}
    updates: dict[str, Any] = {
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "rope_theta": ff.rope.base,
        "original_max_position_embeddings": original,
        "max_position_embeddings": ff.target_length,
    }
    if partial_rotary_factor is not None:
        rope_parameters["partial_rotary_factor"] = partial_rotary_factor
        # 5.x reads rope_scaling first and 4.x never reads rope_parameters: the top level is the one both see
        updates["partial_rotary_factor"] = partial_rotary_factor
    return updates


# transformers' rope_type for each baseline a factors file can hold; ntk runs as plain RoPE with a larger rope_theta
METHOD_ROPE_TYPES = {LONGROPE: "longrope", "yarn": "yarn", "pi": "linear", "ntk": "default"}


def _method_rope_config(ff: FactorsFile, partial_rotary_factor: float | None) -> dict[str, Any]:
    """config.json keys for a baseline at ff.target_length as transformers (4.5x and 5.x) runs it: rope_type yarn
    (its default beta_fast 32, beta_slow 1 and attention factor 0.1 ln s + 1), linear, or NTK-aware as rope_theta
    base * s^(d/(d-2)) with no rope scaling."""
    original, scale = ff.rope.original_length, ff.scale
    theta = ff.rope.base * scale ** (ff.rope.rotary_dim / (ff.rope.rotary_dim - 2)) if ff.method == "ntk" else ff.rope.base
    scaling: dict[str, Any] | None = {"rope_type": METHOD_ROPE_TYPES[ff.method], "factor": scale}
    if ff.method == "yarn":
        scaling = {**scaling, "original_max_position_embeddings": original, "beta_fast": 32.0, "beta_slow": 1.0}
    elif ff.method == "ntk":
        scaling = None
    parameters = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
    updates: dict[str, Any] = {"rope_scaling": scaling, "rope_parameters": parameters, "rope_theta": theta,
                               "original_max_position_embeddings": original, "max_position_embeddings": ff.target_length}
    if partial_rotary_factor is not None:
        parameters["partial_rotary_factor"] = partial_rotary_factor
        updates["partial_rotary_factor"] = partial_rotary_factor
    return updates


def partial_rotary_factor(config_doc: dict[str, Any]) -> float | None:
    """SRC's partial rotary factor wherever its config.json keeps it (5.x may keep it inside rope_parameters)."""
    if config_doc.get("partial_rotary_factor") is not None:
        return float(config_doc["partial_rotary_factor"])
    params = config_doc.get("rope_parameters")
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return None


def compatibility_notes(ff: FactorsFile, model_type: str) -> list[str]:
    """What the exported config cannot carry, or carries with a different meaning than the search used."""
    if ff.method != LONGROPE:
        return [f"{ff.method} at {ff.target_length} tokens runs at every length, inside the original window too "
                f"(attention factor {ff.mscale:.6g}): transformers has no short set for it."]
    notes = []
    if needs_attention_factor(ff):
        default = longrope_mscale(ff.scale, ff.rope.original_length)
        notes.append(
            f"mscale {ff.mscale:.6g} differs from the default {default:.6g}: written as attention_factor "
            "(transformers) and short_mscale/long_mscale (vLLM); other runtimes use the default."
        )
        if model_type == "phi3":
            notes.append(
                "Phi-3 with a custom attention_factor cannot use the strict 3-key rope_scaling, so transformers "
                "4.x will refuse this config.json (5.x and vLLM load it); search with mscale: auto to avoid this."
            )
    if ff.mscale != 1.0:
        notes.append(
            f"transformers and vLLM apply the attention factor {ff.mscale:.6g} inside the original window too, so "
            "the exported model differs from the original one on short inputs even where the short factors are 1.0."
        )
    return notes


def loaded_rope_type(config: Any) -> str | None:
    """The rope type transformers runs a loaded config with: 5.x's rope_parameters, 4.x's rope_scaling."""
    for key in ("rope_parameters", "rope_scaling"):
        params = getattr(config, key, None)
        if isinstance(params, dict) and (params.get("rope_type") or params.get("type")):
            return params.get("rope_type") or params.get("type")
    return None
