"""The generation loop: evolve, score the new candidates, checkpoint, repeat; then validate the winner.

Reads a validated Config, writes runs/<name>/ (config.resolved.yaml, state/, log.jsonl, factors.json).
Resuming continues from the newest complete state and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from longrope_search import __version__, checkpoint, context_parallel, distributed, evolution, rope
from longrope_search.checkpoint import Evaluation, SearchState
from longrope_search.config import Config, apply_overrides, from_dict, parse_length, read_yaml
from longrope_search.errors import CheckpointError, ConfigError, DataError
from longrope_search.evolution import Candidate, SearchSpace
from longrope_search.factors import FactorsFile
from longrope_search.files import atomic_write_text
from longrope_search.rope import RopeSpec

# Settings that may change on resume: they change how much is searched, not what a score means.
MEMORY_KEYS = ("chunk_size", "mlp_chunk", "context_parallel")  # change memory use and speed, not scores
BUDGET_KEYS = ("generations", "population", "parents", "mutations", "crossovers", "mutation_prob", *MEMORY_KEYS)
POPULATION_DONE = ("search.population sizes generation 0 only, and this run has finished it; later generations are "
                   "parents + mutations + crossovers, so change those instead.")


@dataclass(frozen=True)
class Prior:
    """Long factors the model already runs with: a previous stage of a progressive extension."""

    factors: np.ndarray  # (d/2,)
    target_length: int
    mscale: float
    n_hat: int
    source: str  # where they came from, for messages and factors.json
    short_factors: list[float] | None = None  # a short set searched earlier; kept through later stages


@dataclass
class Plan:
    """Everything derived from the config and the model's geometry before anything heavy is loaded."""

    config: Config
    spec: RopeSpec
    target_length: int  # the length candidates are scored at
    space: SearchSpace
    mscale: float
    prior: Prior | None = None
    short: bool = False
    attention_fit: dict[str, Any] | None = None  # short search: how the shared mscale was lowered (fit_attention)

    @functools.cached_property
    def seeds(self) -> dict[str, np.ndarray]:
        """Named seed vectors of the initial population (computed once: init_factors is a file read)."""
        return seed_vectors(self)

    @property
    def scale(self) -> float:
        return self.spec.scale(self.target_length)

    @property
    def fits_mscale(self) -> bool:
        """Short search with mscale auto: lower the shared attention factor before searching the short set."""
        s = self.config.search
        return self.short and s.mscale == "auto" and s.long_tolerance > 0 and self.prior.mscale > 1.0

    @property
    def seed_spec(self) -> RopeSpec:
        """Geometry the seeds are computed in: a later stage starts from the previous stage's window."""
        if self.prior is not None and not self.short:
            return RopeSpec(self.spec.base, self.spec.rotary_dim, self.prior.target_length)
        return self.spec

    @property
    def seed_scale(self) -> float:
        if self.short:
            return self.space.max_factor / 1.25  # the mildest set that still spans the space
        if self.prior is not None:
            return self.target_length / self.prior.target_length
        return self.scale

    def factors(self, genes: Sequence[int]) -> np.ndarray:
        """What the model runs with for a candidate: stage factors composed with the prior's (long mode)."""
        stage = self.space.factors(genes)  # (d/2,)
        if self.prior is not None and not self.short:
            return stage * self.prior.factors  # lambda_total = lambda_stage2 * lambda_stage1
        return stage

    def comparisons(self) -> dict[str, tuple[np.ndarray, float]]:
        """Reference methods scored beside the winner: name -> (factors, mscale)."""
        if self.short:
            ones = np.ones(self.spec.num_factors)
            out = {
                "none": (ones, 1.0),  # the unmodified model
                "ones": (ones, self.prior.mscale),  # an export without a short set: factors 1, the long mscale
                "long": (self.prior.factors, self.prior.mscale),  # the long set used for short inputs too
            }
            if self.mscale != self.prior.mscale:
                out["ones_fitted"] = (ones, self.mscale)  # what lowering the mscale alone achieves
            return out
        out = {}
        for name in ("none", *rope.BASELINES):
            factors = rope.baseline(name)(self.spec, self.scale).numpy()
            out[name] = (factors, rope.BASELINE_MSCALE[name](self.scale, self.spec.original_length))
        if self.prior is not None:
            out["prior"] = (self.prior.factors, self.prior.mscale)  # the previous stage, extrapolated
        return out


def resolve_prior(config: Config, model_config: Any, spec: RopeSpec) -> Prior | None:
    """The factors this search builds on: search.init_from, or else those the model carries (rope_type longrope).

    init_from wins over carried factors: a fine-tuned stage-1 model carries stage 1, while its short
    readjustment must build on the composed stage-2 factors of a later run.
    """
    from longrope_search.factors import load_factors
    from longrope_search.model import carried_factors

    carried = carried_factors(model_config)
    prior = None
    if config.search.init_from:
        ff = load_factors(config.search.init_from)
        if (ff.rope.base, ff.rope.rotary_dim) != (spec.base, spec.rotary_dim):
            raise ConfigError(
                f"search.init_from {config.search.init_from} was searched for rope_theta {ff.rope.base:g} / "
                f"rotary_dim {ff.rope.rotary_dim}, the model has {spec.base:g} / {spec.rotary_dim}; use a run of this model."
            )
        prior = Prior(np.asarray(ff.factors), ff.target_length, ff.mscale, ff.n_hat, f"run {config.search.init_from}",
                      ff.short_factors)
    elif carried is not None:
        params = model_config.rope_parameters
        target = int(model_config.max_position_embeddings)
        mscale = params.get("attention_factor") or rope.longrope_mscale(target / spec.original_length, spec.original_length)
        short = params.get("short_factor")
        prior = Prior(np.asarray(carried), target, float(mscale), 0, f"model {config.model.name}",
                      None if short is None or all(x == 1.0 for x in short) else [float(x) for x in short])
    if config.search.short and prior is None:
        raise ConfigError(
            "short readjustment needs the long factors it complements: set search.init_from (--init-from) to the "
            "long run, or search on a LongRoPE-extended model."
        )
    return prior


def carried_mismatch(config: Config, model_config: Any, prior: Prior | None) -> str | None:
    """A warning when a long stage composes onto init_from's factors while the model carries other ones.

    A model fine-tuned on stage 1's export carries stage 1's factors; if init_from's differ (stage 1 was
    searched further after the fine-tune), the new stage would compose onto factors the model never saw.
    A short search legitimately differs (it builds on the later, composed set).
    """
    from longrope_search.model import carried_factors

    carried = carried_factors(model_config)
    if carried is None or prior is None or config.search.short or not config.search.init_from:
        return None
    if len(carried) != len(prior.factors):
        return None  # resolve_prior's geometry check names this
    gap = float(np.max(np.abs(np.asarray(carried) / prior.factors - 1.0)))
    if gap <= 1e-6:
        return None
    return (f"{config.model.name} carries LongRoPE factors that differ from search.init_from's (by up to {gap:.1%}); "
            "this search composes onto init_from's. If the model was fine-tuned with its own factors, build on "
            "those instead: drop search.init_from.")


def make_plan(config: Config, spec: RopeSpec, prior: Prior | None = None) -> Plan:
    s = config.search
    if config.model.original_length is not None:
        spec = RopeSpec(spec.base, spec.rotary_dim, config.model.original_length)
    if s.short:
        return _short_plan(config, spec, prior)
    target = parse_length(s.target or "8x", spec.original_length)
    floor = prior.target_length if prior is not None else spec.original_length
    if target <= floor:
        what = f"the previous stage's target ({floor} tokens)" if prior else f"the model's original window ({floor} tokens)"
        raise ConfigError(
            f"target {s.target} ({target} tokens) is not longer than {what}; set search.target above it, "
            f"e.g. {floor * 8}."
        )
    stage_scale = target / floor
    # n_hat positions keep the original rotation; values at or beyond the window would mean "no scaling".
    n_hat = tuple(v for v in s.n_hat if v < spec.original_length) or (0,)
    space = SearchSpace(
        num_factors=spec.num_factors, max_factor=s.max_factor or 1.25 * stage_scale, step=s.step,
        monotonic=s.monotonic, n_hat_choices=n_hat,
    )
    scale = target / spec.original_length
    mscale = rope.longrope_mscale(scale, spec.original_length) if s.mscale == "auto" else float(s.mscale)
    return Plan(config, spec, target, space, mscale, prior)


def _short_plan(config: Config, spec: RopeSpec, prior: Prior) -> Plan:
    s = config.search
    target = parse_length(s.target or "1x", spec.original_length)
    if target > spec.original_length:
        raise ConfigError(
            f"a short-context search scores inputs that fit the original window ({spec.original_length} tokens), "
            f"but target is {target}; set search.target to 1x or less."
        )
    prior_scale = prior.target_length / spec.original_length
    # milder than the long set: the paper readjusts with a lower maximum factor
    space = SearchSpace(
        num_factors=spec.num_factors, max_factor=s.max_factor or max(1.0 + s.step, min(2.0, prior_scale)),
        step=s.step, monotonic=s.monotonic, n_hat_choices=(0,),  # no runtime applies n_hat to short inputs
    )
    # transformers and vLLM apply the long set's attention factor to short inputs too; with auto it is
    # lowered by fit_attention once the model is loaded
    mscale = prior.mscale if s.mscale in ("auto", "keep") else float(s.mscale)
    return Plan(config, spec, target, space, mscale, prior, short=True)


def model_slug(config: Config) -> str:
    """The model name as a folder name: builtin:tiny -> tiny, meta-llama/Llama-2-7b-hf -> meta-llama-Llama-2-7b-hf."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", config.model.name.removeprefix("builtin:")).strip("-")


def default_run_dir(config: Config) -> Path:
    target = config.search.target or ("1x" if config.search.short else "8x")
    return Path("runs") / f"{model_slug(config)}-{target}{'-short' if config.search.short else ''}"


def seed_vectors(plan: Plan) -> dict[str, np.ndarray]:
    spec, scale = plan.seed_spec, plan.seed_scale
    seeds = {name: rope.baseline(name)(spec, scale).numpy() for name in plan.config.search.seeds}
    if plan.short:
        seeds.setdefault("none", np.ones(spec.num_factors))  # "keep the original RoPE" is the natural start
    if plan.config.search.init_factors:
        from longrope_search.factors import load_factors

        init = load_factors(plan.config.search.init_factors)
        if len(init.factors) != plan.spec.num_factors:
            raise ConfigError(
                f"search.init_factors has {len(init.factors)} factors, the model needs {plan.spec.num_factors}; "
                "use a factors file searched on the same model."
            )
        # the space holds this stage's factors: a later stage divides out the prior, a short search seeds its set
        if plan.short:
            seeds["init"] = np.asarray(init.short_or_ones, dtype=np.float64)
        elif plan.prior is not None:
            seeds["init"] = np.asarray(init.factors, dtype=np.float64) / plan.prior.factors
        else:
            seeds["init"] = np.asarray(init.factors, dtype=np.float64)
    return seeds


def fingerprint(plan: Plan, model_id: str, data_fingerprint: str, tokenizer_fingerprint: str) -> dict[str, Any]:
    space = plan.space
    return {
        "model": model_id,
        "target_length": plan.target_length,
        "original_length": plan.spec.original_length,
        "rotary_dim": plan.spec.rotary_dim,
        "rope_base": plan.spec.base,
        "data": data_fingerprint,
        "tokenizer": tokenizer_fingerprint,
        "space": [space.max_factor, space.min_factor, space.step, space.monotonic, list(space.n_hat_choices)],
        "mscale": ["fit", plan.prior.mscale, plan.config.search.long_tolerance] if plan.fits_mscale else plan.mscale,
        "seeds": sorted(plan.seeds),
        "prior": None if plan.prior is None else [float(x) for x in plan.prior.factors],
        "short": plan.short,
    }


def model_identity(name: str, model_config: Any) -> str:
    """The model name plus a hash of its config: a different checkpoint under the same path is caught."""
    digest = hashlib.sha256(model_config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return f"{name}@{digest}"


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"longrope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# --- the loop -----------------------------------------------------------------------------------------


ScoreFn = Callable[[Sequence[Candidate]], list[float]]


class Search:
    """One search run. `score` maps candidates to PPLs (single process, or sharded over ranks).

    Under torchrun every rank runs the same loop; only the one with `writes` touches the run directory.
    """

    def __init__(
        self, plan: Plan, run_dir: Path, score: ScoreFn, identity: dict[str, Any], reporter: Any = None,
        writes: bool = True,
    ):
        self.plan = plan
        self.run_dir = run_dir
        self.score_fn = score
        self.identity = identity
        self.reporter = reporter
        self.writes = writes
        self.log_path = run_dir / "log.jsonl"

    # one place that evaluates: logs every score as soon as it exists (the resume cache)
    def _evaluate(self, state: SearchState, batch: list[tuple[Candidate, str]], generation: int) -> list[float]:
        started = time.perf_counter()
        scores = self.score_fn([c for c, _ in batch])
        state.seconds += time.perf_counter() - started
        for (cand, origin), ppl in zip(batch, scores):
            state.history.append(Evaluation(cand, ppl, generation, origin))
        return scores

    def _log_generation(self, state: SearchState) -> None:
        best = state.best()
        checkpoint.append_log(self.log_path, {
            "event": "generation", "generation": state.generation, "evaluations": len(state.history),
            "best_ppl": checkpoint.ppl_to_json(best.ppl), "best_key": best.candidate.key, "seconds": round(state.seconds, 3),
        })

    def initial(self) -> SearchState:
        s = self.plan.config.search
        rng = np.random.default_rng(s.seed)
        seeds = self.plan.seeds
        named = evolution.seed_candidates(self.plan.space, seeds)
        population = evolution.initial_population(self.plan.space, seeds, s.population, rng, s.mutation_prob)
        origin = {c.key: name for name, c in reversed(list(named.items()))}
        state = SearchState(0, [], [], {}, self.identity)
        batch = [(c, origin.get(c.key, "mutation")) for c in population]
        scores = self._evaluate(state, batch, 0)
        state.population = list(zip(population, scores))
        state.rng_state = rng.bit_generator.state
        return state

    def step(self, state: SearchState) -> SearchState:
        s = self.plan.config.search
        rng = np.random.default_rng()
        rng.bit_generator.state = state.rng_state
        parents = evolution.select(state.population, s.parents)
        batch = evolution.labelled_generation(
            parents, self.plan.space, rng, s.mutations, s.crossovers, s.mutation_prob, state.seen()
        )
        children = [c for c, _ in batch]
        generation = state.generation + 1
        scores = self._evaluate(state, batch, generation)
        scored = dict((c.key, (c, p)) for c, p in state.population)
        state.population = [scored[p.key] for p in parents] + list(zip(children, scores))
        state.generation = generation
        state.rng_state = rng.bit_generator.state
        if len(children) < s.mutations + s.crossovers:
            state.notes.append(f"generation {generation}: only {len(children)} new candidates (space nearly exhausted)")
        return state

    def run(self, state: SearchState | None) -> SearchState:
        if state is None:
            state = self.initial()
            self._checkpoint(state)
        while state.generation < self.plan.config.search.generations:
            state = self.step(state)
            self._checkpoint(state)
        return state

    def _checkpoint(self, state: SearchState) -> None:
        if self.writes:
            checkpoint.save_state(self.run_dir, state)
            self._log_generation(state)
            self.write_factors(state)
        if self.reporter is not None:
            self.reporter.generation(state)

    def write_factors(self, state: SearchState, extra: dict[str, Any] | None = None) -> FactorsFile:
        best = state.best()
        plan = self.plan
        searched = [round(float(x), 10) for x in plan.factors(best.candidate.genes)]
        info = {
            "generations": state.generation, "evaluations": len(state.history),
            "settings": plan.config.search.model_dump(mode="json"), "samples": plan.config.data.samples,
            "best_key": best.candidate.key, "best_origin": best.origin, "best_generation": best.generation,
            "scored_length": plan.target_length, "mode": "short" if plan.short else "long",
        }
        if plan.prior is not None:
            info["prior"] = {"source": plan.prior.source, "target_length": plan.prior.target_length,
                             "factors": [float(x) for x in plan.prior.factors], "mscale": plan.prior.mscale}
        if plan.attention_fit is not None:
            info["attention_fit"] = {**plan.attention_fit, **(extra or {}).get("attention_fit", {})}
        if plan.short:  # the long set stays; the searched set becomes the short one
            ff = FactorsFile(
                model=plan.config.model.name, rope=plan.spec, target_length=plan.prior.target_length,
                factors=[float(x) for x in plan.prior.factors], n_hat=plan.prior.n_hat, mscale=plan.mscale,
                short_factors=searched, ppl={"search": best.ppl}, search=info, versions=versions(),
            )
        else:
            ff = FactorsFile(
                model=plan.config.model.name, rope=plan.spec, target_length=plan.target_length, factors=searched,
                n_hat=best.candidate.n_hat, mscale=plan.mscale, ppl={"search": best.ppl}, search=info,
                versions=versions(), short_factors=plan.prior.short_factors if plan.prior is not None else None,
            )
        if extra:
            ff.ppl.update(extra.get("ppl", {}))
            ff.baselines = extra.get("baselines", {})
        if self.writes:
            ff.save(self.run_dir / "factors.json")
        return ff


# --- run directory --------------------------------------------------------------------------------------


# A start that failed before any evaluation (model or corpus refused) leaves only this file behind.
FAILED_START = {"config.resolved.yaml"}


def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - FAILED_START):
        raise CheckpointError(
            f"{run_dir} already exists and is not empty; resume it with `longrope search --resume {run_dir}` "
            "or choose another --out."
        )


def resolved_config_for_resume(run_dir: Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """The run's saved config with budget overrides (`search.generations=60`) applied; others are refused."""
    from longrope_search.stages import not_a_run

    path = run_dir / "config.resolved.yaml"
    if message := not_a_run(run_dir):
        raise CheckpointError(message)
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a longrope run (no config.resolved.yaml); pass the folder a search wrote.")
    saved = read_yaml(path)
    for item in overrides:
        key = item.partition("=")[0].strip()
        section, _, name = key.partition(".")
        if section != "search" or name not in BUDGET_KEYS:
            raise ConfigError(
                f"{key} cannot change when resuming (it changes what a score means); start a new run with --out, "
                f"or change only {', '.join('search.' + k for k in BUDGET_KEYS)}."
            )
    updated = apply_overrides(saved, overrides)
    notes = [f"search.{name}: {saved.get('search', {}).get(name)} -> {value}"
             for name, value in updated.get("search", {}).items()
             if saved.get("search", {}).get(name) != value]
    return from_dict(updated, source=str(path)), notes


def absolute(value: str | None, local: bool = False) -> str | None:
    """A local path made absolute; builtin:, hub: and hub ids (org/name with no local counterpart) unchanged.

    local: the field is always a local path (init_from, init_factors), even when it does not exist yet
    (a stage folder the pipeline has still to write).
    """
    if not isinstance(value, str) or not value or (not local and value.startswith(("builtin:", "hub:"))):
        return value
    path = Path(value).expanduser()
    # globs keep their pattern
    if local or path.exists() or any(ch in value for ch in "*?[") or value.startswith((".", "/", "~")):
        return str(path.absolute())
    return value


# The config fields that hold paths, as (section, key, always local).
PATH_FIELDS = (("model", "name", False), ("data", "source", False), ("search", "init_from", True),
               ("search", "init_factors", True))


def absolute_paths(config: Config) -> Config:
    """Local paths made absolute, so a resume or eval from another directory reads the same files."""
    updates: dict[str, dict[str, Any]] = {}
    for section, key, local in PATH_FIELDS:
        updates.setdefault(section, {})[key] = absolute(getattr(getattr(config, section), key), local)
    return config.model_copy(update={name: getattr(config, name).model_copy(update=values)
                                     for name, values in updates.items()})


def write_resolved_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(run_dir / "config.resolved.yaml", config.to_yaml())


def ensure_log_line_end(log_path: Path) -> None:
    """A kill mid-write leaves a torn last line; start the next record on a fresh line."""
    if log_path.is_file() and log_path.stat().st_size:
        with log_path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


# --- orchestration --------------------------------------------------------------------------------------


def logged_scorer(
    evaluator: Any, plan: Plan, log_path: Path, reporter: Any = None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> ScoreFn:
    """Score the candidates not scored yet, spread over the ranks; rank 0 logs each new score as it arrives.

    Every rank caches every score, so all ranks agree on what is left to score in the next batch.
    """

    def score(candidates: Sequence[Candidate]) -> list[float]:
        jobs = [(c.key, plan.factors(c.genes), c.n_hat, plan.mscale) for c in candidates]
        return score_logged(evaluator, jobs, log_path, reporter, ctx)

    return score


def score_logged(
    evaluator: Any, jobs: Sequence[tuple[str, Any, int, float]], log_path: Path, reporter: Any = None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> list[float]:
    """PPL of each (key, factors, n_hat, mscale): keys already scored are reused, the rest are spread over
    the ranks and logged to log.jsonl as they arrive (what a resume reads back)."""
    fresh = list({job[0]: job for job in jobs if job[0] not in evaluator.results}.values())
    if reporter is not None:
        for key, *_ in jobs:
            if key in evaluator.results:
                reporter.evaluated(evaluator.results[key].ppl, True)

    def log(i: int, result: Any) -> None:
        record = {"event": "eval", "key": fresh[i][0], "ppl": checkpoint.ppl_to_json(result.ppl),
                  "seconds": round(result.seconds, 4)}
        if result.error:
            record["error"] = result.error
        checkpoint.append_log(log_path, record)
        if reporter is not None:
            reporter.evaluated(result.ppl, False)

    results = distributed.map_candidates(lambda job: evaluator.score(*job), fresh, ctx, log)
    for job, result in zip(fresh, results):
        evaluator.results[job[0]] = result
    return [evaluator.results[key].ppl for key, *_ in jobs]


MSCALE_GRID = 0.01  # resolution of the attention-factor fit


def attention_grid(long_mscale: float) -> list[float]:
    """The mscale values the fit may pick: 1.0, 1.01, ... and the long set's own, ascending."""
    steps = int(np.ceil((long_mscale - 1.0) / MSCALE_GRID - 1e-9))
    return [round(1.0 + i * MSCALE_GRID, 6) for i in range(steps)] + [long_mscale]


def fit_attention(
    plan: Plan, evaluator: Any, log_path: Path, reporter: Any = None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> dict[str, Any]:
    """The lowest attention factor (mscale) at which the long set stays within long_tolerance of its PPL.

    transformers and vLLM multiply short inputs by the long set's mscale too, which keeps a short set from
    matching the unmodified model (mscale 1). Lowering it helps short inputs and, past some point, hurts
    long ones; this scans a grid from 1.0 to the long set's mscale on the search samples at the long
    target (`evaluator`), bisecting (a wider split under torchrun: one value per worker and round) for the
    lowest value within tolerance of the long set's own. Every score is logged, so a resume re-scores nothing.
    """
    prior = plan.prior
    grid = attention_grid(prior.mscale)

    def ppls(indices: Sequence[int]) -> list[float]:
        jobs = [(f"attention:{grid[i]:.6g}", prior.factors, prior.n_hat, grid[i]) for i in indices]
        return score_logged(evaluator, jobs, log_path, reporter, ctx)

    reference, at_one = ppls([len(grid) - 1, 0])
    limit = reference * (1.0 + plan.config.search.long_tolerance)
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
    return {
        "mscale": grid[hi], "long_mscale": prior.mscale, "length": prior.target_length,
        "tolerance": plan.config.search.long_tolerance,
        "search": {"long_mscale": reference, "mscale": checked[grid[hi]]},
        "checked": {f"{m:.6g}": ppl for m, ppl in sorted(checked.items())},
    }


def compare_methods(
    plan: Plan, best: Candidate, search_eval: Any, heldout_eval: Any | None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> dict[str, Any]:
    """PPL of the winner and of each baseline (with its own mscale) on the search and held-out samples.

    The evaluations are spread over the ranks like the search's own.
    """
    evaluators = {"search": search_eval} if heldout_eval is None else {"search": search_eval, "heldout": heldout_eval}
    # (baseline name or None for the winner, samples, key, factors, n_hat, mscale)
    jobs: list[tuple[str | None, str, str, Any, int, float]] = []
    if heldout_eval is not None:  # the winner's search PPL is already known
        jobs.append((None, "heldout", best.key, plan.factors(best.genes), best.n_hat, plan.mscale))
    for name, (factors, mscale) in plan.comparisons().items():
        jobs += [(name, split, f"baseline:{name}", factors, 0, mscale) for split in evaluators]
    ppls = distributed.map_candidates(lambda job: evaluators[job[1]].score(*job[2:]).ppl, jobs, ctx)
    results: dict[str, Any] = {"ppl": {}, "baselines": {}}
    for (name, split, *_), ppl in zip(jobs, ppls):
        if name is None:
            results["ppl"][split] = ppl
        else:
            results["baselines"].setdefault(name, {})[split] = ppl
    return results


def long_heldout(plan: Plan, model: Any, heldout: Any, ctx: distributed.Context) -> dict[str, float]:
    """The long set's held-out PPL at its target with its own mscale and with the fitted one."""
    evaluator = context_parallel.make_evaluator(model, heldout, ctx, plan.config.search.chunk_size)
    prior = plan.prior
    jobs = {"long_mscale": prior.mscale, "mscale": plan.mscale}
    ppls = distributed.map_candidates(
        lambda m: evaluator.score(f"attention:{m:.6g}", prior.factors, prior.n_hat, m).ppl, list(jobs.values()), ctx)
    return dict(zip(jobs, ppls))


def describe_attention_fit(fit: dict[str, Any]) -> str:
    before, after = fit["search"]["long_mscale"], fit["search"]["mscale"]
    return (f"attention factor {fit['long_mscale']:.4f} -> {fit['mscale']:.4f} for short inputs: the long set's PPL at "
            f"{fit['length']} tokens {before:.4f} -> {after:.4f} ({after / before - 1:+.2%}, tolerance "
            f"{fit['tolerance']:.0%}); {len(fit['checked'])} values scored")


@dataclass
class OpenedRun:
    """All a search reads of its run directory (on rank 0; sent to the other ranks)."""

    config: Config
    run_dir: Path
    state: SearchState | None = None  # newest readable checkpoint
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # budget changes made on resume
    logged: dict[str, float] = field(default_factory=dict)  # every score in log.jsonl
    identity: dict[str, Any] | None = None  # what a resume must match (state, or the log's start record)
    attention_fit: dict[str, Any] | None = None  # a short search's fitted mscale, logged once it was found


def open_run(config: Config | None, run_dir: Path | None, resume: bool, overrides: list[str] | None) -> OpenedRun:
    if resume:
        if run_dir is None:
            raise ConfigError("--resume needs the run directory to continue, e.g. --resume runs/tiny-8x.")
        config, notes = resolved_config_for_resume(run_dir, overrides or [])
        # scores logged after the last checkpoint too: resume reuses them instead of recomputing
        log_path = run_dir / "log.jsonl"
        log = checkpoint.read_log(log_path)
        logged, fit = log.scores, log.newest.get("attention_fit", {}).get("fit")
        if not (run_dir / "state").exists():
            # stopped during generation 0: start it again, reusing every evaluation already logged
            warning = f"no generation had finished; generation 0 starts again with {len(logged)} logged evaluations"
            return OpenedRun(config, run_dir, None, [warning], notes, logged, log.start_identity, fit)
        if any(note.startswith("search.population:") for note in notes):
            raise ConfigError(POPULATION_DONE)
        state, warnings = checkpoint.load_state(run_dir)
        return OpenedRun(config, run_dir, state, warnings, notes, logged, state.fingerprint, fit)
    if config is None:
        raise ConfigError("pass --config with a YAML file (see configs/) or --resume with a run directory.")
    run_dir = run_dir or Path(config.output.dir or default_run_dir(config))
    check_new_run_dir(run_dir)
    return OpenedRun(absolute_paths(config), run_dir)


def run_search(
    config: Config | None,
    run_dir: Path | None,
    resume: bool = False,
    overrides: list[str] | None = None,
    reporter: Any = None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> tuple[FactorsFile, Path]:
    """Start or resume a search; returns the final factors file and the run directory.

    Every check that can fail on user input runs before anything is written or any weights load.
    Under torchrun (`ctx` from `distributed.init_from_env`) every rank loads the model and data and scores
    its share of each batch; rank 0 alone reads and writes the run directory and reports progress.
    """
    from longrope_search import data
    from longrope_search.model import load_config, load_model, rope_spec

    reporter = reporter if ctx.is_main else None
    # rank 0's files only: the other nodes may not share its filesystem
    opened = distributed.run_on_main(functools.partial(open_run, config, run_dir, resume, overrides), ctx)
    config, run_dir, saved_state = opened.config, opened.run_dir, opened.state

    def plan_run() -> tuple[Any, Plan]:
        model_config = load_config(config.model.name)
        spec = rope_spec(model_config)
        plan = make_plan(config, spec, resolve_prior(config, model_config, spec))
        plan.seeds  # a bad init_factors file fails here, before anything is written
        return model_config, plan

    model_config, plan = distributed.run_everywhere(plan_run, ctx)
    mismatch = carried_mismatch(config, model_config, plan.prior)
    if mismatch and reporter is not None:
        reporter.warn(mismatch)
    # ranks split into groups that score one sample together (size 1: ctx unchanged); same on every rank
    ctx = distributed.cp_groups(ctx, config.search.context_parallel)
    if ctx.is_main and not resume:
        write_resolved_config(run_dir, config)  # exactly what runs, before the model loads
    if reporter is not None:
        for w in opened.warnings:
            reporter.warn(w)

    def load() -> tuple[Any, Any, Any, dict[str, Any], Any]:
        device = None if config.model.device == "auto" else config.model.device
        if ctx.device is not None and (device is None or device.startswith("cuda")):
            device = ctx.device  # one GPU per rank under torchrun
        model, tokenizer = load_model(config.model.name, device=device, dtype=config.model.dtype,
                                      mlp_chunk=config.search.mlp_chunk)
        d = config.data
        corpus = data.CorpusSpec.of(d)
        samples = data.build_samples(
            tokenizer, corpus, plan.target_length, d.samples, d.heldout_samples, d.seed, d.cache_dir
        )
        identity = fingerprint(plan, model_identity(config.model.name, model_config), samples.fingerprint,
                               data.tokenizer_fingerprint(tokenizer))
        long_samples = None
        if plan.fits_mscale:  # the long set's own length, for the attention-factor fit
            try:
                long_samples = data.build_samples(tokenizer, corpus, plan.prior.target_length, d.samples,
                                                  d.heldout_samples, d.seed, d.cache_dir)
            except DataError as exc:
                raise DataError(f"{exc} (the short search checks the long set at {plan.prior.target_length} tokens "
                                "before lowering its attention factor; or set search.mscale: keep)") from None
            identity["long_data"] = long_samples.fingerprint
        evaluator = context_parallel.make_evaluator(model, samples.search, ctx, config.search.chunk_size)
        return model, samples, long_samples, identity, evaluator

    model, samples, long_samples, identity, evaluator = distributed.run_everywhere(load, ctx)
    identities = distributed.gather_objects(identity, ctx)
    for rank, other in enumerate(identities):
        differing = sorted(k for k in set(other) | set(identities[0]) if other.get(k) != identities[0].get(k))
        if differing:  # the same on every rank, so every rank raises
            raise ConfigError(
                f"rank {rank} differs from rank 0 in {', '.join(differing)}; give every node the same model "
                "and data files."
            )

    log_path = run_dir / "log.jsonl"
    if opened.identity is not None:
        differences = checkpoint.identity_differences(opened.identity, identity)
        if differences:
            raise CheckpointError(
                f"{run_dir} was searched with a different setup ({'; '.join(differences)}); "
                "resume with the original model and data, or start a new run with --out."
            )
    if resume:
        if ctx.is_main and opened.notes:  # budget changes, recorded once the resume is known to be valid
            write_resolved_config(run_dir, config)
        evaluator.preload(opened.logged)
        if saved_state is not None:
            saved_state.notes.extend(opened.notes)
        if ctx.is_main:
            ensure_log_line_end(log_path)
            generation = saved_state.generation if saved_state is not None else None
            checkpoint.append_log(log_path, {"event": "resume", "generation": generation, "changes": opened.notes})
    if saved_state is None and ctx.is_main:
        checkpoint.append_log(log_path, {"event": "start", "fingerprint": identity})

    long_eval = None
    if long_samples is not None:
        long_eval = context_parallel.make_evaluator(model, long_samples.search, ctx, config.search.chunk_size)
        long_eval.preload(opened.logged)
        if opened.attention_fit is None:
            if reporter is not None:
                reporter.note(f"lowering the attention factor for short inputs: scoring the long set at "
                              f"{plan.prior.target_length} tokens for mscale values in [1, {plan.prior.mscale:.4f}]")
            plan.attention_fit = fit_attention(plan, long_eval, log_path, None, ctx)
            if ctx.is_main:  # a resume reuses the result, whatever its ranks (the probes depend on their number)
                checkpoint.append_log(log_path, {"event": "attention_fit", "fit": plan.attention_fit})
        else:
            plan.attention_fit = opened.attention_fit
        plan.mscale = plan.attention_fit["mscale"]
        if reporter is not None:
            reporter.note(describe_attention_fit(plan.attention_fit))
    if reporter is not None:
        reporter.start(plan, saved_state)
    scorer = logged_scorer(evaluator, plan, log_path, reporter, ctx)
    search = Search(plan, run_dir, scorer, identity, reporter, writes=ctx.is_main)
    state = search.run(saved_state)

    heldout_eval = None
    if samples.heldout.shape[0] > 0:
        heldout_eval = context_parallel.make_evaluator(model, samples.heldout, ctx, config.search.chunk_size)
    best = state.best().candidate
    results = compare_methods(plan, best, evaluator, heldout_eval, ctx)
    if long_eval is not None and long_samples.heldout.shape[0] > 0:
        results["attention_fit"] = {"heldout": long_heldout(plan, model, long_samples.heldout, ctx)}
    final = search.write_factors(state, results)
    if ctx.is_main:
        checkpoint.append_log(log_path, {"event": "done", "generation": state.generation, "ppl": final.ppl})
    return final, run_dir
