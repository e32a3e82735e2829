"""The attention-factor fit of a short-context search.

transformers and vLLM multiply short inputs by the long set's attention factor (mscale) too, which keeps a
short set from matching the unmodified model (mscale 1). Lowering it helps short inputs and, past some point,
hurts long ones; `fit_attention` finds the lowest value on a 0.01 grid at which the long set stays within
search.long_tolerance of its own PPL.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from longrope_search import distributed
from longrope_search.factors import AttentionFit, PplPair
from longrope_search.fitness import Evaluator
from longrope_search.progress import SILENT, Reporter
from longrope_search.scoring import score_logged

MSCALE_GRID = 0.01  # resolution of the attention-factor fit


def attention_grid(long_mscale: float) -> list[float]:
    """The mscale values the fit may pick: 1.0, 1.01, ... and the long set's own, ascending."""
    steps = int(np.ceil((long_mscale - 1.0) / MSCALE_GRID - 1e-9))
    return [round(1.0 + i * MSCALE_GRID, 6) for i in range(steps)] + [long_mscale]


def attention_key(mscale: float) -> str:
    """The log key of the long set scored under `mscale` (a resume reuses it)."""
    return f"attention:{mscale:.6g}"


def fit_attention(
    setup: Any, evaluator: Evaluator, log_path: Any, reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> AttentionFit:
    """The lowest attention factor at which the long set stays within long_tolerance of its PPL.

    Scans the grid from 1.0 to the long set's mscale on the search samples at the long target (`evaluator`),
    bisecting (a wider split under torchrun: one value per worker and round). Every score is logged, so a
    resume re-scores nothing. `setup` needs `.prior` and `.config.search.long_tolerance`.
    """
    prior = setup.prior
    tolerance = setup.config.search.long_tolerance
    grid = attention_grid(prior.mscale)

    def ppls(indices: Sequence[int]) -> list[float]:
        jobs = [(attention_key(grid[i]), prior.factors, prior.n_hat, grid[i]) for i in indices]
        return [result.ppl for result in score_logged(evaluator, jobs, log_path, reporter, ctx)]

    reference, at_one = ppls([len(grid) - 1, 0])
    limit = reference * (1.0 + tolerance)
    checked = {grid[-1]: reference, grid[0]: at_one}
    # grid[hi] is within the limit, grid[lo] is not (lo == -1: 1.0 itself is within it)
    lo, hi = (-1, 0) if at_one <= limit else (0, len(grid) - 1)
    while hi - lo > 1:
        count = min(ctx.workers, hi - lo - 1)
        probe = sorted({lo + (hi - lo) * (k + 1) // (count + 1) for k in range(count)})
        for i, ppl in zip(probe, ppls(probe)):
            checked[grid[i]] = ppl
        passing = [i for i in probe if checked[grid[i]] <= limit]
        hi = min(passing, default=hi)
        lo = max((i for i in probe if i < hi), default=lo)
    return AttentionFit(
        mscale=grid[hi], long_mscale=prior.mscale, length=prior.target_length, tolerance=tolerance,
        search=PplPair(long_mscale=reference, mscale=checked[grid[hi]]),
        checked={f"{m:.6g}": ppl for m, ppl in sorted(checked.items())},
    )


def long_heldout(fit: AttentionFit, prior: Any, evaluator: Evaluator,
                 ctx: distributed.Context = distributed.SINGLE_PROCESS) -> PplPair:
    """The long set's held-out PPL at its target with its own mscale and with the fitted one (`evaluator` holds the
    held-out samples at the long length)."""
    values = [fit.long_mscale, fit.mscale]
    ppls = distributed.map_candidates(
        lambda m: evaluator.score(attention_key(m), prior.factors, prior.n_hat, m).ppl, values, ctx)
    return PplPair(long_mscale=ppls[0], mscale=ppls[1])
