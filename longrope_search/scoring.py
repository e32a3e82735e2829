"""Scoring with a memory: each job (a key and what the model runs with) is scored once, spread over the ranks
under torchrun, and every new score is appended to log.jsonl as it arrives, which is what a resume reads back.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from longrope_search import checkpoint, distributed
from longrope_search.evolution import Candidate
from longrope_search.fitness import Evaluator, FitnessResult
from longrope_search.progress import SILENT, Reporter
from longrope_search.search_setup import SearchSetup

# (key, factors, n_hat, mscale): what `Evaluator.score` takes
Job = tuple[str, Any, int, float]
ScoreFn = Callable[[Sequence[Candidate]], list[float]]


def score_logged(
    evaluator: Evaluator, jobs: Sequence[Job], log_path: Any, reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> list[float]:
    """PPL of each job: keys already scored are reused, the rest are spread over the ranks and logged to
    log.jsonl as they arrive (rank 0 writes). Every rank caches every score, so all ranks agree on what is
    left to score next."""
    fresh = list({job[0]: job for job in jobs if job[0] not in evaluator.results}.values())
    for key, *_ in jobs:
        if key in evaluator.results:
            reporter.evaluated(evaluator.results[key].ppl, True)

    def log(i: int, result: FitnessResult) -> None:
        record = {"event": "eval", "key": fresh[i][0], "ppl": checkpoint.ppl_to_json(result.ppl),
                  "seconds": round(result.seconds, 4)}
        if result.error:
            record["error"] = result.error
        checkpoint.append_log(log_path, record)
        reporter.evaluated(result.ppl, False)

    results = distributed.map_candidates(lambda job: evaluator.score(*job), fresh, ctx, log)
    for job, result in zip(fresh, results):
        evaluator.results[job[0]] = result
    return [evaluator.results[key].ppl for key, *_ in jobs]


def logged_scorer(
    evaluator: Evaluator, setup: SearchSetup, log_path: Any, reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> ScoreFn:
    """The search's score function: candidates -> PPLs under the setup's composition and attention factor."""

    def score(candidates: Sequence[Candidate]) -> list[float]:
        jobs = [(c.key, setup.factors(c.genes), c.n_hat, setup.mscale_of(c)) for c in candidates]
        return score_logged(evaluator, jobs, log_path, reporter, ctx)

    return score
