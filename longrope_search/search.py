"""The generation loop: `Search.step` evolves the population, scores the new candidates (racing and screening
them), selects, checkpoints and logs; `Search.run` repeats it until the budget or validation stops it, and
`write_factors` turns the best into factors.json. `search_run.py` drives one search around it.

A resume continues from the newest complete state and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from longrope_search import checkpoint, evolution
from longrope_search.checkpoint import Evaluation, SearchState
from longrope_search.comparison import Comparison
from longrope_search.factors import FactorsFile, Scores, SearchRecord, software_versions
from longrope_search.identity import RunIdentity
from longrope_search.progress import SILENT, Reporter
from longrope_search.rundir import FACTORS_FILE, LOG_FILE
from longrope_search.scoring import ScoreFn
from longrope_search.search_setup import SearchSetup
from longrope_search.validation import Validator, stalled

class Search:
    """One search run. `score` maps candidates to PPLs (single process, or sharded over ranks).

    Under torchrun every rank runs the same loop; only the one with `writes` touches the run directory. `identity`
    None: a search in memory (`writes` False) that no resume will check.
    """

    def __init__(
        self, setup: SearchSetup, run_dir: Path, score: ScoreFn, identity: RunIdentity | None,
        reporter: Reporter = SILENT, writes: bool = True, logged: dict[int, dict[str, Any]] | None = None,
        validator: Validator | None = None,
    ):
        self.setup = setup
        self.validator = validator  # None: no validation samples
        self.run_dir = run_dir
        self.score_fn = score
        self.identity = identity
        self.reporter = reporter
        self.writes = writes
        self.log_path = run_dir / LOG_FILE
        self.logged = dict(logged or {})  # generation -> its line already in log.jsonl (a resume replays it unlogged)

    # one place that evaluates: logs every score as soon as it exists (the resume cache)
    def _evaluate(self, state: SearchState, batch: list[tuple[evolution.Candidate, str]], generation: int,
                  bar: evolution.Candidate | None = None, full: bool = False) -> list[float]:
        """Scores of `batch` for selection (inf for a candidate stopped early: against `bar`, or by the screen unless
        `full`), recorded in history."""
        started = time.perf_counter()
        results = self.score_fn([c for c, _ in batch], bar, full=full)
        state.seconds += time.perf_counter() - started
        for (cand, origin), result in zip(batch, results):
            state.history.append(Evaluation(cand, result.ppl, generation, origin, result.rejected, result.forward_tokens))
        return [state.history[-len(batch) + i].selection_score for i in range(len(batch))]

    def _log_generation(self, state: SearchState) -> None:
        record = checkpoint.generation_record(state)
        logged = self.logged.get(state.generation)
        if logged is None or not checkpoint.same_generation(logged, record):
            checkpoint.append_log(self.log_path, record)
            self.logged[state.generation] = record

    def initial(self) -> SearchState:
        s = self.setup.config.search
        rng = np.random.default_rng(s.seed)
        seeds = self.setup.seeds
        named = evolution.seed_candidates(self.setup.space, seeds)
        origin = {c.key: name for name, c in reversed(list(named.items()))}
        state = SearchState(0, [], [], {}, {} if self.identity is None else self.identity.to_json())
        # the seeds first, each on every window; then mutants of all of them (seed_margin null: the paper), or only
        # of those competitive with the best, which alone stay in the population
        distinct = evolution.distinct_seeds(self.setup.space, seeds)
        scored = dict(zip([c.key for c in distinct],
                          self._evaluate(state, [(c, origin[c.key]) for c in distinct], 0, full=True)))
        breed = None if s.seed_margin is None else evolution.competitive_seeds(
            {n: scored[c.key] for n, c in named.items()}, s.seed_margin)
        population = evolution.initial_population(self.setup.space, seeds, s.population, rng, s.mutation_prob, breed)
        batch = [(c, origin.get(c.key, "mutation")) for c in population if c.key not in scored]
        scored.update(zip([c.key for c, _ in batch], self._evaluate(state, batch, 0)))
        state.population = [(c, scored[c.key]) for c in population]
        state.rng_state = rng.bit_generator.state
        return state

    def step(self, state: SearchState) -> SearchState:
        s = self.setup.config.search
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        parents = evolution.select(state.population, s.parents)
        batch = evolution.labelled_generation(
            parents, self.setup.space, rng, s.mutations, s.crossovers, s.mutation_prob, state.seen()
        )
        children = [c for c, _ in batch]
        generation = state.generation + 1
        # early rejection: a child worse than the worst parent can never become one
        bar = parents[-1] if len(parents) == s.parents else None
        scores = self._evaluate(state, batch, generation, bar)
        scored = dict((c.key, (c, p)) for c, p in state.population)
        state.population = [scored[p.key] for p in parents] + list(zip(children, scores))
        state.generation = generation
        state.rng_state = rng.bit_generator.state
        if len(children) < s.mutations + s.crossovers:
            state.notes.append(f"generation {generation}: only {len(children)} new candidates (space nearly exhausted)")
        return state

    def run(self, state: SearchState | None) -> SearchState:
        s = self.setup.config.search
        if state is None:
            state = self.initial()
            self._checkpoint(state)
        while state.generation < s.generations and not stalled(state, s.patience):
            state = self.step(state)
            self._checkpoint(state)
        return state

    def _checkpoint(self, state: SearchState) -> None:
        if self.validator is not None:  # part of the state: a resume after this generation knows its validation
            self.validator.after_generation(state)
        if self.writes:
            checkpoint.save_state(self.run_dir, state)
            self._log_generation(state)
            self.write_factors(state)
        self.reporter.generation(state)

    def write_factors(self, state: SearchState, comparison: Comparison | None = None,
                      winner: Evaluation | None = None) -> FactorsFile:
        """factors.json: the winner (`winner`, default the best search score so far) with the run's record."""
        best = winner or state.best()
        setup = self.setup
        s = setup.config.search
        searched = [round(float(x), 10) for x in setup.factors(best.candidate.genes)]
        fit = setup.attention_fit
        mscale = setup.mscale_of(best.candidate)
        if fit is not None and comparison is not None and comparison.long_heldout is not None:
            fit = dataclasses.replace(fit, heldout=comparison.long_heldout)
        record = SearchRecord(
            generations=state.generation, evaluations=len(state.history),
            settings=setup.config.search.model_dump(mode="json"), samples=setup.config.data.samples,
            best_key=best.candidate.key, best_origin=best.origin, best_generation=best.generation,
            scored_length=setup.target_length, mode="short" if setup.short else "long",
            forward_tokens=state.forward_tokens, seconds=round(state.seconds, 3),
            rejected=sum(e.rejected for e in state.history),
            validation=[[g, key, ppl] for g, key, ppl in state.validation],
            selected_by="validation" if winner is not None and self.validator is not None else "search",
            stopped_early=state.generation if state.generation < s.generations else None,
            saved_evaluations=(s.generations - state.generation) * (s.mutations + s.crossovers),
            prior=None if setup.prior is None else setup.prior.record(), attention_fit=fit,
        )
        common = dict(model=setup.config.model.name, rope=setup.spec, mscale=mscale, scores=Scores(search=best.ppl),
                      search=record, versions=software_versions())
        if setup.short:  # the long set stays; the searched set becomes the short one
            ff = FactorsFile(target_length=setup.prior.target_length, factors=[float(x) for x in setup.prior.factors],
                             n_hat=setup.prior.n_hat, short_factors=searched, **common)
        else:
            ff = FactorsFile(target_length=setup.target_length, factors=searched, n_hat=best.candidate.n_hat,
                             short_factors=setup.prior.short_factors if setup.prior is not None else None, **common)
        if comparison is not None:
            ff.scores = dataclasses.replace(comparison.scores, search=best.ppl)
            ff.baselines = comparison.baselines
        if self.writes:
            ff.save(self.run_dir / FACTORS_FILE)
        return ff
