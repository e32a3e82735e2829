"""The RoPE methods `longrope eval` compares at a length: none, and PI, NTK and YaRN in two forms, rescaled to that
length ("yarn": the best each can do there) and fixed at the factors' target ("yarn@8x": the configuration one
would deploy for that target, the same at every length, like the searched factors); and the searched factors run as
a served model runs them (long set past the original window, short set inside it). Also a baseline at one target as
a factors file (`method_file`), what `finetune --factors` and `export --factors` install.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from longrope_search import rope
from longrope_search.config import format_length
from longrope_search.errors import ConfigError
from longrope_search.factors import LONGROPE, STATIC_METHODS, FactorsFile, check_geometry, software_versions
from longrope_search.rope import RopeSpec

METHODS = ("none", *rope.BASELINES, LONGROPE)  # table row order (the fixed rows, METHOD@TARGET, before longrope)
FIXED_MARK = "@"  # "yarn@8x": YaRN fixed at the factors' target, at every length


@dataclass(frozen=True)
class Method:
    """One way to run the model at one length: what `install_rope` receives."""

    name: str
    factors: tuple[float, ...]  # (d/2,)
    n_hat: int
    mscale: float

    @property
    def key(self) -> str:
        """Equal keys give equal logits, so a score is computed once per key and length."""
        return json.dumps([self.factors, self.n_hat, self.mscale])


def methods_for(spec: RopeSpec, length: int, ff: FactorsFile | None, only: Sequence[str] | None = None) -> list[Method]:
    """none, pi, ntk, yarn rescaled to s = length / original (each with its own mscale); with a factors file, the
    same three fixed at its target (`fixed_name`: pi@8x, ...) and then the file's own row: "longrope" for searched
    factors, or METHOD@TARGET for a baseline's file (its fixed row is then not repeated).

    At length <= original the rescaled baselines reduce to factors 1 and mscale 1 (nothing to stretch); the fixed
    ones run as transformers runs rope_type linear / yarn / a scaled rope_theta, the same at every length.
    "longrope" runs like the exported model in transformers (and `runtime.apply`): the long factors with the file's
    n_hat and mscale whenever length > original, at any length, not only the target; otherwise the short factors
    (all 1.0 when the search kept none) with n_hat 0 and the SAME mscale, because transformers applies
    `attention_factor` to both sets. So at length <= original, longrope differs from none by its mscale alone.
    n_hat > 0 is kept as searched; an exported config.json cannot express it (export --drop-n-hat runs without it).
    """
    methods = [_baseline(name, spec, max(spec.scale(length), 1.0)) for name in METHODS[:-1]]
    if ff is not None:
        check_geometry(ff.rope, spec, "the factors file", "the model", "evaluate them on the searched model.")
        methods += [_baseline(name, spec, spec.scale(ff.target_length), fixed_name(name, ff))
                    for name in rope.BASELINES if name != ff.method]
        name = file_row(ff)
        if length > ff.rope.original_length:
            methods.append(Method(name, tuple(ff.factors), ff.n_hat, ff.mscale))
        else:
            methods.append(Method(name, tuple(ff.short_or_ones), 0, ff.mscale))
    return [m for m in methods if only is None or m.name in only]


def _baseline(name: str, spec: RopeSpec, scale: float, label: str | None = None) -> Method:
    factors = rope.baseline(name)(spec, scale)  # (d/2,)
    mscale = rope.BASELINE_MSCALE[name](scale, spec.original_length)
    return Method(label or name, tuple(float(x) for x in factors), 0, float(mscale))


def fixed_name(name: str, ff: FactorsFile) -> str:
    """Baseline `name` fixed at the factors' target: yarn@8x (a whole multiple of the window), else yarn@20k."""
    ratio = ff.target_length / ff.rope.original_length
    return f"{name}{FIXED_MARK}{ratio:g}x" if ratio.is_integer() else f"{name}{FIXED_MARK}{format_length(ff.target_length)}"


def file_row(ff: FactorsFile) -> str:
    """The name of the factors file's own row: longrope for searched factors, METHOD@TARGET for a baseline's file."""
    return LONGROPE if ff.method == LONGROPE else fixed_name(ff.method, ff)


def is_fixed(name: str) -> bool:
    """A row that runs one configuration at every length (METHOD@TARGET), as opposed to one rescaled per length."""
    return FIXED_MARK in name


def unique_lengths(lengths: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(n) for n in lengths))


def method_file(name: str, model: str, spec: RopeSpec, target_length: int) -> FactorsFile:
    """Baseline `name` (yarn, pi or ntk) at `target_length` as a factors file: its factors and attention factor at
    that scale for every length, as transformers runs rope_type yarn, linear and an NTK-scaled rope_theta (no
    switch to a short set inside the original window; the short set is the long one)."""
    if name not in STATIC_METHODS:
        raise ConfigError(f"--factors {name!r} is not a RoPE method; use one of {', '.join(STATIC_METHODS)} (or a "
                          "search run's folder for its searched factors).")
    if target_length <= spec.original_length:
        raise ConfigError(f"the target {target_length} does not exceed the original window {spec.original_length}; "
                          f"{name} only extends the context: give a longer --target.")
    scale = spec.scale(target_length)
    factors = [float(x) for x in rope.baseline(name)(spec, scale)]
    mscale = float(rope.BASELINE_MSCALE[name](scale, spec.original_length))
    return FactorsFile(model=model, rope=spec, target_length=target_length, factors=factors, mscale=mscale,
                       short_factors=list(factors), versions=software_versions(), method=name)
