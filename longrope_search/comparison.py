"""The final comparison of a search: the winner and each reference method (PI, NTK, YaRN, none, and for later
stages the prior; for a short search the unmodified model and the long set) on the search and held-out samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longrope_search import distributed
from longrope_search.evolution import Candidate
from longrope_search.factors import PplPair
from longrope_search.fitness import Evaluator
from longrope_search.search_setup import SearchSetup


@dataclass
class Comparison:
    """PPLs by sample set ("search", "heldout"): the winner's, and each reference method's."""

    ppl: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    long_heldout: PplPair | None = None  # a short search: the long set's held-out PPL before and after the fit


def compare_methods(
    setup: SearchSetup, best: Candidate, search_eval: Evaluator, heldout_eval: Evaluator | None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> Comparison:
    """PPL of the winner and of each reference method (with its own mscale) on the search and held-out samples,
    spread over the ranks like the search's own evaluations. The winner's search PPL is already known."""
    evaluators = {"search": search_eval} if heldout_eval is None else {"search": search_eval, "heldout": heldout_eval}
    # (baseline name or None for the winner, samples, key, factors, n_hat, mscale)
    jobs: list[tuple[str | None, str, str, Any, int, float]] = []
    if heldout_eval is not None:
        jobs.append((None, "heldout", best.key, setup.factors(best.genes), best.n_hat, setup.mscale))
    for name, (factors, mscale) in setup.comparisons().items():
        jobs += [(name, split, f"baseline:{name}", factors, 0, mscale) for split in evaluators]
    ppls = distributed.map_candidates(lambda job: evaluators[job[1]].score(*job[2:]).ppl, jobs, ctx)
    result = Comparison()
    for (name, split, *_), ppl in zip(jobs, ppls):
        if name is None:
            result.ppl[split] = ppl
        else:
            result.baselines.setdefault(name, {})[split] = ppl
    return result
