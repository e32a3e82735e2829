"""Generalisation during a search: the best-so-far scored on the validation samples (documents the fitness never
sees) every `search.validate_every` generations, the search stopped once that score has not improved for
`search.patience` generations, and the final winner chosen as the validation best among the `search.select_top`
best candidates by search score. The held-out samples stay out of every decision: they give the number reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from longrope_search import distributed
from longrope_search.checkpoint import Evaluation, SearchState
from longrope_search.evolution import Candidate
from longrope_search.fitness import Evaluator
from longrope_search.progress import SILENT, Reporter
from longrope_search.scoring import score_logged
from longrope_search.search_setup import SearchSetup

KEY_PREFIX = "validation|"  # log keys of validation scores (the search's own keys score other samples)
GAP_WINDOW = 3  # validated generations the generalisation-gap warning looks back over
GAP_RISE = 0.005  # the warning fires when the search score fell by more than this while validation rose by more


@dataclass
class Validator:
    """Scores candidates on the validation samples: each key once, logged, spread over the ranks."""

    setup: SearchSetup
    evaluator: Evaluator
    log_path: Any
    ctx: distributed.Context = distributed.SINGLE_PROCESS
    reporter: Reporter = SILENT
    warned: bool = False

    def score(self, candidates: list[Candidate]) -> list[float]:
        jobs = [(KEY_PREFIX + c.key, self.setup.factors(c.genes), c.n_hat, self.setup.mscale_of(c)) for c in candidates]
        return [r.ppl for r in score_logged(self.evaluator, jobs, self.log_path, SILENT, self.ctx)]

    def after_generation(self, state: SearchState) -> None:
        """Score the best-so-far when this generation is validated; warn once when generalisation gets worse."""
        every = self.setup.config.search.validate_every
        if not every or (state.generation % every and state.generation != self.setup.config.search.generations):
            return
        best = state.best()
        if state.validation and state.validation[-1][0] == state.generation:
            return  # a replayed generation: already validated
        state.validation.append((state.generation, best.candidate.key, self.score([best.candidate])[0]))
        self._gap_warning(state)

    def _gap_warning(self, state: SearchState) -> None:
        if self.warned or len(state.validation) <= GAP_WINDOW:
            return
        (_, old_key, old_val), (_, new_key, new_val) = state.validation[-GAP_WINDOW - 1], state.validation[-1]
        search = {e.candidate.key: e.ppl for e in state.history}
        fell = 1 - search[new_key] / search[old_key]
        rose = new_val / old_val - 1
        if fell > GAP_RISE and rose > GAP_RISE:
            self.warned = True
            self.reporter.warn(
                f"over the last {GAP_WINDOW} validated generations the search score fell {fell:.1%} while the "
                f"validation score rose {rose:.1%}: the factors fit the {self.setup.config.data.samples} search "
                "samples, not long text; raise data.samples (or set search.patience to stop early)."
            )

    def select(self, state: SearchState) -> tuple[Evaluation, float]:
        """The winner: the validation best among the search.select_top best distinct candidates by search score
        (ties: the better search score), with its validation PPL."""
        ranked = sorted((e for e in state.history if not e.rejected and math.isfinite(e.ppl)),
                        key=lambda e: (e.ppl, e.candidate.key))
        top, seen = [], set()
        for e in ranked:
            if e.candidate.key not in seen:
                top.append(e)
                seen.add(e.candidate.key)
            if len(top) == self.setup.config.search.select_top:
                break
        if not top:
            return state.best(), math.inf
        scores = self.score([e.candidate for e in top])
        i = min(range(len(top)), key=lambda j: (scores[j], j))
        return top[i], scores[i]


def stalled(state: SearchState, patience: int) -> bool:
    """Early stopping: the best validation score has not improved over the last `patience` validations."""
    if not patience or len(state.validation) <= patience:
        return False
    scores = [v for _, _, v in state.validation]
    return min(scores[-patience:]) >= min(scores[:-patience])
