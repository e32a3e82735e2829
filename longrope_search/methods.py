"""The RoPE methods `longrope eval` compares at a length: none, PI, NTK and YaRN for that length's scale, and the
searched factors run as a served model runs them (long set past the original window, short set inside it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from longrope_search import rope
from longrope_search.factors import FactorsFile, check_geometry
from longrope_search.rope import RopeSpec

LONGROPE = "longrope"
METHODS = ("none", *rope.BASELINES, LONGROPE)  # table row order


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


def methods_for(spec: RopeSpec, length: int, ff: FactorsFile | None) -> list[Method]:
    """none, pi, ntk, yarn at scale s = length / original (each with its own mscale), then the searched factors.

    At length <= original the baselines reduce to factors 1 and mscale 1 (nothing to stretch). "longrope" runs like
    the exported model in transformers (and `runtime.apply`): the long factors with the file's n_hat and mscale
    whenever length > original, at any length, not only the target; otherwise the short factors (all 1.0 when
    the search kept none) with n_hat 0 and the SAME mscale, because transformers applies `attention_factor` to
    both sets. So at length <= original, longrope differs from none by its mscale alone. n_hat > 0 is kept as
    searched; an exported config.json cannot express it (export --drop-n-hat runs without it).
    """
    scale = max(spec.scale(length), 1.0)
    methods = []
    for name in METHODS[:-1]:
        factors = rope.baseline(name)(spec, scale)  # (d/2,)
        mscale = rope.BASELINE_MSCALE[name](scale, spec.original_length)
        methods.append(Method(name, tuple(float(x) for x in factors), 0, float(mscale)))
    if ff is not None:
        check_geometry(ff.rope, spec, "the factors file", "the model", "evaluate them on the searched model.")
        if length > ff.rope.original_length:
            methods.append(Method(LONGROPE, tuple(ff.factors), ff.n_hat, ff.mscale))
        else:
            methods.append(Method(LONGROPE, tuple(ff.short_or_ones), 0, ff.mscale))
    return methods


def unique_lengths(lengths: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(n) for n in lengths))
