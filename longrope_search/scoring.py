"""Scoring with a memory: each job (a key and what the model runs with) is scored once, spread over the ranks
under torchrun, and every new score is appended to log.jsonl as it arrives, which is what a resume reads back.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from longrope_search import checkpoint, distributed
from longrope_search.evolution import Candidate
from longrope_search.fitness import Evaluator, FitnessResult, Race, Screen
from longrope_search.progress import SILENT, Reporter
from longrope_search.search_setup import SearchSetup

# (key, factors, n_hat, mscale): what `Evaluator.score` takes
Job = tuple[str, Any, int, float]
# candidates (and the candidate they must beat to become parents, or None; full=True: no screening) -> their results
ScoreFn = Callable[..., list[FitnessResult]]


def eval_record(key: str, result: FitnessResult) -> dict[str, Any]:
    """A score's line in log.jsonl: what a resume reads back (the last line of a key wins)."""
    record = {"event": "eval", "key": key, "ppl": result.ppl, "seconds": round(result.seconds, 4),
              "tokens": result.forward_tokens, "nlls": result.nlls}
    if result.parts:
        record["parts"] = result.parts
    if result.rejected:
        record["rejected"] = True
    if result.screened:
        record["screened"] = True
    if result.error:
        record["error"] = result.error
    return record


def score_logged(
    evaluator: Evaluator, jobs: Sequence[Job], log_path: Any, reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS, race: Race | None = None, upto: int | None = None,
) -> list[FitnessResult]:
    """The result of each job: keys already scored are reused, the rest are spread over the ranks (each stopped early
    once it loses `race`; on the first `upto` samples only, or continued from there) and logged to log.jsonl as they
    arrive (rank 0 writes). Every rank caches every result, so all ranks agree on what is left to score next."""
    fresh = list({job[0]: job for job in jobs if evaluator.needs(job[0], upto)}.values())
    for key, *_ in jobs:
        if not evaluator.needs(key, upto):
            reporter.evaluated(evaluator.results[key].ppl, True)

    def log(i: int, result: FitnessResult) -> None:
        checkpoint.append_log(log_path, eval_record(fresh[i][0], result))
        reporter.evaluated(result.ppl, False)

    def run(job: Job) -> FitnessResult:
        return evaluator.score(*job, race=race, upto=upto)

    results = distributed.map_candidates(run, fresh, ctx, log)
    for job, result in zip(fresh, results):
        evaluator.results[job[0]] = result
    return [evaluator.results[key] for key, *_ in jobs]


def logged_scorer(
    evaluator: Evaluator, setup: SearchSetup, log_path: Any, reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> ScoreFn:
    """The search's score function: candidates -> results under the setup's composition and attention factor. With
    search.race_margin > 0 and a `bar` (the worst current parent), a candidate stops once it cannot become a parent.
    With search.screen_windows (a Screen), a batch is scored in two rounds: all on the first windows, the promising
    ones on the rest; `full=True` scores every candidate on every window (the seeds)."""
    s = setup.config.search
    windows = evaluator.samples.shape[0]
    screen = Screen(s.screen_windows, s.screen_keep) if 0 < s.screen_windows < windows else None

    def score(candidates: Sequence[Candidate], bar: Candidate | None = None, full: bool = False) -> list[FitnessResult]:
        jobs = [(c.key, setup.factors(c.genes), c.n_hat, setup.mscale_of(c)) for c in candidates]
        nlls = evaluator.results[bar.key].nlls if bar is not None and bar.key in evaluator.results else []
        complete = len(nlls) == windows and not evaluator.results[bar.key].rejected
        race = Race(tuple(nlls), s.race_margin) if s.race_margin > 0 and complete else None
        if screen is None or full or len(jobs) < 2:
            return score_logged(evaluator, jobs, log_path, reporter, ctx, race)
        # round 1, every candidate on the first windows (a candidate already further along keeps its result)
        first = score_logged(evaluator, jobs, log_path, SILENT, ctx, upto=screen.windows)
        promoted = screen.promoted({key: result.nlls for (key, *_), result in zip(jobs, first)})
        # round 2, the promoted ones on every window, racing the bar from where round 1 stopped
        score_logged(evaluator, [job for job in jobs if job[0] in promoted], log_path, reporter, ctx, race)
        for key, *_ in jobs:
            if key not in promoted:
                reporter.evaluated(evaluator.results[key].ppl, False)
        return [evaluator.results[key] for key, *_ in jobs]

    return score
