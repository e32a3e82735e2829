"""One search run in named phases: open the run directory, set up, load, check identity, check that the needles can
be found (the joint fitness), fit the attention factor (short searches), run the loop (`search.Search`), compare the
winner with the reference methods.

Writes runs/<name>/ (see rundir.py). A resume continues from the newest complete state and gives the same
result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longrope_search import checkpoint, context_parallel, data, distributed, evolution
from longrope_search.attention import fit_attention, long_heldout
from longrope_search.checkpoint import SearchState
from longrope_search.comparison import SEARCH_BEST, NeedleCheck, compare_methods
from longrope_search.config import Config
from longrope_search.corpus import CorpusSpec
from longrope_search.errors import CheckpointError, ConfigError, DataError
from longrope_search.factors import AttentionFit, FactorsFile, load_factors
from longrope_search.fitness import Evaluator
from longrope_search.model import LoadOptions, load_model_config, load_model, rope_spec
from longrope_search.progress import SILENT, Reporter
from longrope_search.rundir import (
    CONFIG_FILE,
    FACTORS_FILE,
    LOG_FILE,
    STATE_DIR,
    Claim,
    absolute_paths,
    check_new_run_dir,
    claimed,
    config_for_resume,
    default_run_dir,
    write_resolved_config,
)
from longrope_search.needle import answers_found
from longrope_search.sample_sets import SampleSets, reweighed, sample_sets
from longrope_search.scoring import eval_record, logged_scorer
from longrope_search.identity import RunIdentity, run_identity
from longrope_search.search_setup import SearchSetup, carried_mismatch, make_setup, resolve_prior
from longrope_search.validation import Validator
from longrope_search.search import Search


@dataclass
class OpenedRun:
    """All a search reads of its run directory (on rank 0; sent to the other ranks)."""

    config: Config
    run_dir: Path
    resumed: bool = False
    state: SearchState | None = None  # newest readable checkpoint
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # budget changes made on resume
    logged: dict[str, float] = field(default_factory=dict)  # every score in log.jsonl
    identity: RunIdentity | None = None  # what a resume must match (state, or the log's start record)
    attention_fit: AttentionFit | None = None  # a short search's fitted mscale, logged once it was found
    generations: dict[int, dict[str, Any]] = field(default_factory=dict)  # the "generation" lines in log.jsonl
    claim: Claim | None = None  # rank 0: what this command added to the folder, undone if it fails before the start
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> its eval line (per-sample NLLs, ...)
    needles_checked: bool = False  # log.jsonl records the chance check's decision (check_needles logs it once)
    finished: bool = False  # a resume of a finished run with nothing changed: there is nothing to do


@dataclass
class Loaded:
    """What every rank holds once the weights and samples are in memory."""

    model: Any
    tokenizer: Any
    sets: SampleSets  # search, validation and held-out samples
    long_samples: data.Samples | None  # a short search's long-set samples, for the attention fit
    identity: RunIdentity
    evaluator: Evaluator  # the search samples, scored by the search's fitness


def open_run(config: Config | None, run_dir: Path | None, resume: bool, overrides: list[str] | None,
             stack: contextlib.ExitStack | None = None) -> OpenedRun:
    """Phase 1 (rank 0): a new run's folder checked, or a resumed run's config, state and logged scores read. With
    `stack`, the folder is locked for as long as the stack is open (a new one made first, removed if the start
    fails)."""
    if not resume:
        if config is None:
            raise ConfigError("pass --config with a YAML file (see configs/) or --resume with a run directory.")
        run_dir = run_dir or Path(config.output.dir or default_run_dir(config))
        # the lock first: a command already working there is named, and none can start there while this one checks
        claim = stack.enter_context(claimed(run_dir, create=True)) if stack is not None else None
        check_new_run_dir(run_dir)
        if claim is not None:
            claim.write_text(LOG_FILE, "")  # a log a killed start left (no work in it) begins again
        return OpenedRun(absolute_paths(config), run_dir, claim=claim)
    if run_dir is None:
        raise ConfigError("--resume needs the run directory to continue, e.g. --resume runs/tiny-8x.")
    claim = None
    if stack is not None and (run_dir / CONFIG_FILE).is_file():  # not a run: config_for_resume says so
        claim = stack.enter_context(claimed(run_dir, create=False))
    generation_zero_done = checkpoint.has_state(run_dir)
    config, notes = config_for_resume(run_dir, overrides or [], generation_zero_done)
    # scores logged after the last checkpoint too: resume reuses them instead of recomputing
    log = checkpoint.read_log(run_dir / LOG_FILE)
    warnings = [log.warning] if log.warning else []
    fit = None
    if "attention_fit" in log.newest:
        try:
            fit = AttentionFit.from_json(log.newest["attention_fit"]["fit"])
        except (KeyError, TypeError, ValueError, AttributeError):
            warnings.append(f"the attention_fit record in {LOG_FILE} is unreadable; the attention factor is fitted "
                            "again (from the logged scores)")
    state, damaged = (None, []) if not generation_zero_done else checkpoint.load_state(run_dir, missing_ok=True)
    warnings = [*damaged, *warnings]
    if state is None:
        # stopped during generation 0 (or inside the first checkpoint write), or every checkpoint is damaged: the
        # search replays from generation 0; every logged evaluation is reused, so it scores only what is missing
        warnings.append(f"no generation had finished; generation 0 starts again with {len(log.scores)} logged "
                        "evaluations" if not generation_zero_done else f"no checkpoint is readable; the search "
                        f"replays from generation 0 with {len(log.scores)} logged evaluations")
        start = None if log.start_identity is None else RunIdentity.from_json(log.start_identity)
        return OpenedRun(config, run_dir, True, None, warnings, notes, log.scores, start, fit,
                         log.generations, claim, log.details, "needle_check" in log.newest)
    newest = max(log.generations, default=-1)
    if newest > state.generation and not checkpoint.state_path(run_dir, newest).exists():
        warnings.append(f"{STATE_DIR}/{checkpoint.state_path(run_dir, newest).name} is missing although {LOG_FILE} "
                        f"records generation {newest}; resuming from generation {state.generation} (later "
                        "generations run again from the logged scores)")
    # nothing to do: done, nothing changed and no checkpoint to repair (a damaged one is replayed from the log)
    finished = log.phase == "done" and (run_dir / FACTORS_FILE).is_file() and not notes and not warnings
    saved = RunIdentity.from_json(state.fingerprint)
    return OpenedRun(config, run_dir, True, state, warnings, notes, log.scores, saved, fit,
                     log.generations, claim, log.details, "needle_check" in log.newest, finished)


def set_up(config: Config) -> tuple[Any, SearchSetup]:
    """Phase 2 (every rank): the model's config and the search setup; a bad target or init file fails here."""
    model_config = load_model_config(config.model.name, LoadOptions.of(config.model))
    spec = rope_spec(model_config)
    return model_config, make_setup(config, spec, resolve_prior(config, model_config, spec))


def announce(opened: OpenedRun, setup: SearchSetup, model_config: Any, reporter: Reporter,
             ctx: distributed.Context) -> None:
    """Phase 3: warnings, and a new run's config.resolved.yaml: exactly what runs, before the model loads."""
    mismatch = carried_mismatch(opened.config, model_config, setup.prior)
    if mismatch:
        reporter.warn(mismatch)
    if ctx.is_main and not opened.resumed:
        write_resolved_config(opened.run_dir, opened.config, opened.claim)
    for warning in opened.warnings:
        reporter.warn(warning)


def load(setup: SearchSetup, model_config: Any, ctx: distributed.Context, reporter: Reporter = SILENT) -> Loaded:
    """Phase 4 (every rank): weights, samples and the run's identity."""
    config = setup.config
    reporter.phase(f"loading {config.model.name} (a hub download shows its own progress bars)")
    device = None if config.model.device == "auto" else config.model.device
    if ctx.device is not None and (device is None or device.startswith("cuda")):
        device = ctx.device  # one GPU per rank under torchrun
    if config.model.device_map is not None and ctx.world_size > 1:
        raise ConfigError(f"model.device_map {config.model.device_map!r} shards one model over the GPUs, but under "
                          "torchrun each process loads its own; drop model.device_map, or run one process.")
    model, tokenizer = load_model(config.model.name, device=device, dtype=config.model.dtype,
                                  mlp_chunk=config.search.mlp_chunk, options=LoadOptions.of(config.model))
    d = config.data
    reporter.phase(f"reading {d.source} and tokenising {d.samples} search, {d.heldout_samples} held-out and "
                   f"{d.validation_samples} validation windows of {setup.target_length} tokens (cached after the "
                   "first time)")
    sets = sample_sets(tokenizer, config, setup.target_length)
    corpus = CorpusSpec.of(d)
    long_samples = None
    if setup.fits_mscale:  # the long set's own length, for the attention-factor fit
        try:
            long_samples = data.build_samples(tokenizer, corpus, setup.prior.target_length, d.samples,
                                              d.heldout_samples, d.seed, d.cache_dir)
        except DataError as exc:
            raise DataError(f"{exc} (the short search checks the long set at {setup.prior.target_length} tokens "
                            "before lowering its attention factor; or set search.mscale: keep)") from None
    evaluator = context_parallel.make_evaluator(model, sets.search.ids, ctx, config.search.chunk_size,
                                                sets.search.targets, sets.search.joint)
    ident = run_identity(setup, model_config, tokenizer, sets, long_samples)
    return Loaded(model, tokenizer, sets, long_samples, ident, evaluator)


def check_identity(opened: OpenedRun, ident: RunIdentity, ctx: distributed.Context) -> None:
    """Phase 5: every rank loaded the same thing, and a resume continues the same search."""
    identities = distributed.gather_objects(ident.to_json(), ctx)
    for rank, other in enumerate(identities):
        differing = sorted(k for k in set(other) | set(identities[0]) if other.get(k) != identities[0].get(k))
        if differing:  # the same on every rank, so every rank raises
            raise ConfigError(
                f"rank {rank} differs from rank 0 in {', '.join(differing)}; give every node the same model "
                "and data files."
            )
    if opened.identity is not None:
        differences = ident.differences(opened.identity)
        if differences:
            raise CheckpointError(
                f"{opened.run_dir} was searched with a different setup ({'; '.join(differences)}); "
                "resume with the original model and data, or start a new run with --out."
            )


def record_start(opened: OpenedRun, loaded: Loaded, ctx: distributed.Context) -> None:
    """Phase 6: a resume's budget changes and logged scores taken in; the start or resume logged. From here on the run
    exists: a later failure leaves it to be resumed."""
    log_path = opened.run_dir / LOG_FILE
    if ctx.is_main:
        checkpoint.remove_stale_temps(opened.run_dir)  # what a kill left half-written
    if opened.resumed:
        if ctx.is_main and opened.notes:  # budget changes, recorded once the resume is known to be valid
            write_resolved_config(opened.run_dir, opened.config, opened.claim)
        loaded.evaluator.preload(opened.logged, opened.details)
        if opened.state is not None:
            opened.state.notes.extend(opened.notes)
        if ctx.is_main:
            checkpoint.ensure_log_line_end(log_path)
            state = opened.state
            if state is not None and state.generation not in opened.generations:
                # killed between the checkpoint and its log line: the line an uninterrupted run has there
                record = checkpoint.generation_record(state)
                checkpoint.append_log(log_path, record)
                opened.generations[state.generation] = record
            generation = state.generation if state is not None else None
            checkpoint.append_log(log_path, {"event": "resume", "generation": generation, "changes": opened.notes})
    if opened.state is None and opened.identity is None and ctx.is_main:  # a replay of generation 0 has one already
        checkpoint.append_log(log_path, {"event": "start", "fingerprint": loaded.identity.to_json()})
    if opened.claim is not None:
        opened.claim.keep()


def check_needles(setup: SearchSetup, opened: OpenedRun, loaded: Loaded, reporter: Reporter,
                  ctx: distributed.Context) -> tuple[SearchSetup, Loaded]:
    """Phase 7 (the joint fitness with search.needle_check): the seeds are scored first (generation 0 reuses the
    scores); when none finds the hidden numbers better than chance, the model retrieves nothing at this length and
    the answers' loss is noise, so they weigh 0 from here on (the scores so far recombined from their parts). A
    resume decides the same from the same logged parts."""
    s = setup.config.search
    joint = loaded.sets.search.joint
    if joint is None or not s.needle_check or s.needle_weight == 0:
        return setup, loaded
    log_path = opened.run_dir / LOG_FILE
    seeds = evolution.distinct_seeds(setup.space, setup.seeds)
    reporter.phase(f"scoring the {len(seeds)} seeds: do they find the hidden numbers better than chance?")
    results = logged_scorer(loaded.evaluator, setup, log_path, SILENT, ctx)(seeds, full=True)
    if any(r.parts and answers_found(r.parts["answer"], joint.answer_rows, s.needles) for r in results):
        return setup, loaded
    reporter.note("no seed finds the hidden numbers better than chance at this length: the search scores the text "
                  "around them alone (the answers weigh 0; search.needle_check)")
    sets = reweighed(loaded.sets, 0.0)
    loaded.evaluator.reweigh(sets.search.joint)
    if ctx.is_main and not opened.needles_checked:  # once: the seeds' lines again under the new weight (a key's
        for seed in seeds:                             # last line is its score), then the decision
            checkpoint.append_log(log_path, eval_record(seed.key, loaded.evaluator.results[seed.key]))
        checkpoint.append_log(log_path, {"event": "needle_check", "needle_weight": 0.0})
    config = setup.config.model_copy(update={"search": s.model_copy(update={"needle_weight": 0.0})})
    return dataclasses.replace(setup, config=config), dataclasses.replace(loaded, sets=sets)


def fit(setup: SearchSetup, opened: OpenedRun, loaded: Loaded, reporter: Reporter,
        ctx: distributed.Context) -> SearchSetup:
    """Phase 8 (short searches with mscale auto): the setup under the lowest attention factor the long set allows."""
    if loaded.long_samples is None:
        return setup
    log_path = opened.run_dir / LOG_FILE
    attention = opened.attention_fit
    if attention is None:
        long_eval = context_parallel.make_evaluator(loaded.model, loaded.long_samples.search, ctx,
                                                    setup.config.search.chunk_size)
        long_eval.preload(opened.logged, opened.details)
        reporter.note(f"lowering the attention factor for short inputs: scoring the long set at "
                      f"{setup.prior.target_length} tokens for mscale values in [1, {setup.prior.mscale:.4f}]")
        attention = fit_attention(setup, long_eval, log_path, SILENT, ctx)
        if ctx.is_main:  # a resume reuses the result, whatever its ranks (the probes depend on their number)
            checkpoint.append_log(log_path, {"event": "attention_fit", "fit": attention.to_json()})
    reporter.note(attention.describe())
    return setup.with_attention_fit(attention)


def validator(setup: SearchSetup, opened: OpenedRun, loaded: Loaded, reporter: Reporter,
              ctx: distributed.Context) -> Validator | None:
    """Phase 9: what scores the validation samples (None without any); a resume reuses the logged scores."""
    if loaded.sets.validation is None:
        return None
    sets = loaded.sets
    evaluator = context_parallel.make_evaluator(loaded.model, sets.validation.ids, ctx, setup.config.search.chunk_size,
                                                sets.validation.targets, sets.validation.joint)
    evaluator.preload(opened.logged, opened.details)
    return Validator(setup, evaluator, opened.run_dir / LOG_FILE, ctx, reporter)


def compare(search: Search, state: SearchState, loaded: Loaded, ctx: distributed.Context,
            reporter: Reporter = SILENT) -> FactorsFile:
    """Phase 10: the winner against the reference methods on search and held-out samples (fitness, plain PPL, needle
    retrieval); the final factors.json."""
    setup, chunk = search.setup, search.setup.config.search.chunk_size
    reporter.phase(f"comparing the winner with {', '.join(setup.comparisons())} on {loaded.sets.heldout.count} "
                   f"held-out samples of {setup.target_length} tokens")
    evaluators = {"search": loaded.evaluator}
    needles = None
    sets = loaded.sets
    if sets.heldout.count:
        evaluators["heldout"] = context_parallel.make_evaluator(loaded.model, sets.heldout.ids, ctx, chunk,
                                                                sets.heldout.targets, sets.heldout.joint)
        if sets.heldout.targets is not None:  # a fitness on needle windows: the plain perplexity too
            evaluators["heldout_ppl"] = context_parallel.make_evaluator(loaded.model, sets.heldout_plain, ctx, chunk)
    if sets.heldout_needles and ctx.cp is None:  # greedy decoding runs on one rank: not under context parallelism
        needles = NeedleCheck(loaded.model, loaded.tokenizer, sets.heldout_needles)
    winner, validation = state.best(), None
    if search.validator is not None:
        winner, validation = search.validator.select(state)
    # when validation chose another candidate, the search's own best is reported beside it: what selection changed
    others = {} if winner.candidate.key == state.best().candidate.key else {SEARCH_BEST: state.best().candidate}
    comparison = compare_methods(setup, winner.candidate, evaluators, needles, ctx, others)
    if validation is not None:
        comparison.scores = dataclasses.replace(comparison.scores, validation=validation)
    if loaded.long_samples is not None and loaded.long_samples.heldout.shape[0] > 0:
        long_eval = context_parallel.make_evaluator(loaded.model, loaded.long_samples.heldout, ctx, chunk)
        comparison.long_heldout = long_heldout(setup.attention_fit, setup.prior, long_eval, ctx)
    final = search.write_factors(state, comparison, winner)
    if ctx.is_main:
        checkpoint.append_log(search.log_path, {"event": "done", "generation": state.generation,
                                                   "scores": final.scores.to_json()})
    return final


def run_search(
    config: Config | None,
    run_dir: Path | None,
    resume: bool = False,
    overrides: list[str] | None = None,
    reporter: Reporter | None = None,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> tuple[FactorsFile, Path]:
    """Start or resume a search; returns the final factors file and the run directory.

    Every check that can fail on user input runs before anything is written or any weights load.
    Under torchrun (`ctx` from `distributed.init_from_env`) every rank loads the model and data and scores
    its share of each batch; rank 0 alone reads and writes the run directory and reports progress.
    """
    reporter = reporter if reporter is not None and ctx.is_main else SILENT
    with contextlib.ExitStack() as stack:  # rank 0 holds the run folder's lock until the search ends
        # rank 0's files only: the other nodes may not share its filesystem
        opened = distributed.run_on_main(functools.partial(open_run, config, run_dir, resume, overrides, stack), ctx)
        if opened.finished:  # its result stands, and the log gains no second `done`
            reporter.note(f"{opened.run_dir} is finished; nothing to resume (--set search.generations=N searches on)")
            return distributed.run_on_main(lambda: load_factors(opened.run_dir / FACTORS_FILE), ctx), opened.run_dir
        reporter.phase(f"reading the config of {opened.config.model.name}")
        model_config, setup = distributed.run_everywhere(functools.partial(set_up, opened.config), ctx)
        # ranks split into groups that score one sample together (size 1: ctx unchanged); same on every rank
        ctx = distributed.cp_groups(ctx, opened.config.search.context_parallel)
        announce(opened, setup, model_config, reporter, ctx)
        loaded = distributed.run_everywhere(functools.partial(load, setup, model_config, ctx, reporter), ctx)
        check_identity(opened, loaded.identity, ctx)
        record_start(opened, loaded, ctx)
        setup, loaded = check_needles(setup, opened, loaded, reporter, ctx)
        scored = fit(setup, opened, loaded, reporter, ctx)  # a new setup; the identity keeps the configured one
        reporter.start(scored, opened.state)
        scorer = logged_scorer(loaded.evaluator, scored, opened.run_dir / LOG_FILE, reporter, ctx)
        search = Search(scored, opened.run_dir, scorer, loaded.identity, reporter, writes=ctx.is_main,
                        logged=opened.generations, validator=validator(scored, opened, loaded, reporter, ctx))
        state = search.run(opened.state)
        final = compare(search, state, loaded, ctx, reporter)
        reporter.stop()
        return final, opened.run_dir
