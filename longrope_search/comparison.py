"""The final comparison of a search: the winner and each reference method (PI, NTK, YaRN, none, and for later
stages the prior; for a short search the unmodified model and the long set) on the search and held-out samples:
the fitness, the plain perplexity when the fitness is the needle's, and needle retrieval on held-out documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from longrope_search import distributed
from longrope_search.evolution import Candidate
from longrope_search.factors import PplPair, Scores
from longrope_search.fitness import Evaluator
from longrope_search.model import install_rope
from longrope_search.needle import NeedleSample, greedy_answer, is_retrieved
from longrope_search.search_setup import SearchSetup

# The columns the comparison measures (factors.SCORE_COLUMNS names them): the fitness on the search and held-out
# samples and the held-out text's plain perplexity, each by its evaluator; "needle" by greedy retrieval.
SCORED = ("search", "heldout", "heldout_ppl")
SEARCH_BEST = "search best"  # the row of the best search score, when validation chose another winner
NEEDLE = "needle"


@dataclass
class Comparison:
    """The winner's scores (its search score is the search's own), and each reference method's."""

    scores: Scores = field(default_factory=Scores)
    baselines: dict[str, Scores] = field(default_factory=dict)
    long_heldout: PplPair | None = None  # a short search: the long set's held-out PPL before and after the fit


@dataclass
class NeedleCheck:
    """Greedy retrieval of a needle in each held-out sample: what the comparison's "needle" column measures."""

    model: Any
    tokenizer: Any
    samples: Sequence[NeedleSample]

    def accuracy(self, factors: Any, n_hat: int, mscale: float) -> float:
        install_rope(self.model, factors, n_hat, mscale)
        return sum(is_retrieved(s, greedy_answer(self.model, self.tokenizer, s)) for s in self.samples) / len(self.samples)


def compare_methods(
    setup: SearchSetup, best: Candidate, evaluators: dict[str, Evaluator], needles: NeedleCheck | None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS, others: dict[str, Candidate] | None = None,
) -> Comparison:
    """Every column (the keys of `evaluators`, and NEEDLE when `needles` is given) for the winner and each reference
    method with its own mscale, spread over the ranks like the search's own evaluations. The winner's score on the
    search samples is already known. `others` adds rows for further searched candidates (the search's own best when
    validation chose another)."""
    # (baseline name or None for the winner, column, key, factors, n_hat, mscale)
    jobs: list[tuple[str | None, str, str, Any, int, float]] = []
    winner = (best.key, setup.factors(best.genes), best.n_hat, setup.mscale_of(best))
    columns = [c for c in SCORED if c in evaluators] + ([NEEDLE] if needles is not None else [])
    jobs += [(None, column, *winner) for column in columns if column != "search"]
    for name, (factors, mscale) in setup.comparisons().items():
        jobs += [(name, column, f"baseline:{name}", factors, 0, mscale) for column in columns]
    for name, c in (others or {}).items():
        jobs += [(name, column, c.key, setup.factors(c.genes), c.n_hat, setup.mscale_of(c)) for column in columns]

    def run(job: tuple[str | None, str, str, Any, int, float]) -> float:
        _, column, key, factors, n_hat, mscale = job
        if column == NEEDLE:
            return needles.accuracy(factors, n_hat, mscale)
        return evaluators[column].score(key, factors, n_hat, mscale).ppl

    rows: dict[str | None, dict[str, float]] = {None: {}}
    for (name, column, *_), value in zip(jobs, distributed.map_candidates(run, jobs, ctx)):
        rows.setdefault(name, {})[column] = value
    winner_row = rows.pop(None)
    return Comparison(Scores(**winner_row), {name: Scores(**row) for name, row in rows.items()})
