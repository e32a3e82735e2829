"""Progressive extension as one config: stages run in order, each building on the previous one's factors.

A config with a `stages` list (see configs/llama2-7b-2048k.yaml) runs every stage in its own run directory,
<output.dir>/<stage name>, with the shared sections merged under the stage's overrides. A stage that does
not set search.init_from builds on the previous stage's run, so factors compose (lambda_2 * lambda_1) and
a closing `short: true` stage readjusts the composed set. A stage that sets `finetune` fine-tunes the model with
the previous search stage's factors (finetune.py) into its folder; the stages after it run on that model (their
model.name, unless they set their own), and the search right after it builds on the factors the model carries.
Running the same command again continues: a finished stage is kept, an interrupted one resumes, a new one starts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from longrope_search import checkpoint, distributed, export
from longrope_search.config import Config, parse_length, read_yaml
from longrope_search.stages_file import ExportStage, load_stages, stage_kind, stages_with_overrides
from longrope_search.errors import CheckpointError, ConfigError, LongRopeError
from longrope_search.factors import FactorsFile, load_factors
from longrope_search.files import atomic_write_text
from longrope_search.finetune_result import FinetuneResult, is_trained, load_result
from longrope_search.model import LoadOptions, load_model_config, rope_spec
from longrope_search.progress import SILENT, Reporter
from longrope_search.rundir import (
    CONFIG_FILE, EXPORT_FACTORS_FILE, FACTORS_FILE, FINETUNE_RESUME_KEYS, PIPELINE_FILE,
    Claim, absolute_paths, absolute_raw_paths, claimed, default_stages_dir, entries, resume_change, unstarted,
)
from longrope_search.search_run import run_search


@dataclass
class Stage:
    name: str
    config: Config  # complete: init_from chained, paths absolute
    run_dir: Path
    chained: bool  # init_from (a finetune stage: finetune.run) is the previous stage's folder, set by the pipeline
    kind: str = "search"  # search | finetune | export
    model_from: Path | None = None  # the finetune stage whose model this stage runs (model.name set by the pipeline)
    export: ExportStage | None = None  # an export stage's settings
    source: Path | None = None  # an export stage's run (the last search stage before it), for factors: run

    @property
    def builds_on(self) -> list[Path]:
        """The stage folders whose results this stage uses: its factors' run, and the fine-tuned model it runs."""
        source = {"finetune": self.config.finetune.run, "search": self.config.search.init_from,
                  "export": self.source}[self.kind]
        return [Path(p) for p in (source, self.model_from) if p]


@dataclass
class StageResult:
    stage: Stage
    final: FactorsFile  # a finetune stage: the factors its model carries
    status: str  # "searched", "resumed" or "kept"; a finetune stage: "fine-tuned", "resumed" or "kept"
    trained: FinetuneResult | None = None  # a finetune stage's


def plan_stages(path: Path, overrides: list[str], root: Path | None) -> tuple[Path, list[Stage]]:
    """Each stage's full config and run directory; the pipeline folder is --out, output.dir or runs/<model>-stages."""
    shared, configs = load_stages(path, overrides)
    raw_stages = read_yaml(path)["stages"]
    explicit = _explicit_init_from(raw_stages)
    root = (root or Path(shared.output.dir or default_stages_dir(shared))).absolute()
    stages: list[Stage] = []
    tuned: Path | None = None  # the newest finetune stage's folder: the model of the stages after it
    searched: Path | None = None  # the newest search stage's folder: what an export stage writes
    for i, (name, config) in enumerate(configs):
        run_dir = root / name
        kind = stage_kind(raw_stages[i])
        model_from = tuned if tuned is not None and not _explicit_model(raw_stages[i]) else None
        updates: dict[str, Any] = {"output": config.output.model_copy(update={"dir": str(run_dir)})}
        if model_from is not None:
            updates["model"] = config.model.model_copy(update={"name": str(model_from)})
        if kind == "export":
            settings = ExportStage.model_validate(raw_stages[i]["export"])
            source = searched if settings.factors == "run" else None
            stages.append(Stage(name, absolute_paths(config.model_copy(update=updates)), run_dir, source is not None,
                                kind, model_from, settings, source))
            continue
        if kind == "finetune" and config.finetune.factors != "run":  # a baseline: nothing before it to train
            chained = False
            tuned = run_dir
        elif kind == "finetune":  # trains the factors of the (search) stage before
            chained = True
            updates["finetune"] = config.finetune.model_copy(update={"run": str(stages[-1].run_dir)})
            tuned = run_dir
        else:  # right after a fine-tune, the model carries the factors: nothing to chain
            chained = i > 0 and not explicit[i] and stages[-1].kind == "search"
            if chained:
                updates["search"] = config.search.model_copy(update={"init_from": str(stages[-1].run_dir)})
            searched = run_dir
        stages.append(Stage(name, absolute_paths(config.model_copy(update=updates)), run_dir, chained, kind, model_from))
    return root, stages


def _explicit_init_from(raw_stages: list[Any]) -> list[bool]:
    """Which stages set search.init_from themselves (the others chain to the stage before)."""
    return [isinstance(s, dict) and isinstance(s.get("search"), dict) and "init_from" in s["search"]
            for s in raw_stages]


def _explicit_model(stage: Any) -> bool:
    """The stage names its own model (the stages after a fine-tune run on the fine-tuned model otherwise)."""
    return isinstance(stage, dict) and isinstance(stage.get("model"), dict) and "name" in stage["model"]


def status(stage: Stage) -> str:
    run_dir = stage.run_dir
    if unstarted(run_dir):
        return "new"
    if stage.kind == "export":
        return "finished" if _exported(stage) == _export_record(stage) else "unfinished"
    if stage.kind == "finetune":
        return "finished" if is_trained(run_dir) else "unfinished"
    return "finished" if checkpoint.search_finished(run_dir) else "unfinished"


def _set_by_pipeline(stage: Stage, section: str, key: str) -> bool:
    """A setting the pipeline gives the stage from where its folders are now (they may have moved)."""
    return ((stage.chained and (section, key) in (("search", "init_from"), ("finetune", "run")))
            or (stage.model_from is not None and (section, key) == ("model", "name")))


def _finetune_changes(stage: Stage, saved: dict[str, Any], state: str) -> list[str]:
    """`finetune.KEY=VALUE` for the settings a fine-tune's resume may change; refuses the others."""
    now = stage.config.model_dump(mode="json")
    changed = []
    for section in ("model", "finetune"):  # data and search come from the run it trains
        for key, value in now[section].items():
            before = saved.get(section, {}).get(key)
            if before == value or _set_by_pipeline(stage, section, key):
                continue
            if section == "model" or key not in FINETUNE_RESUME_KEYS:
                raise ConfigError(
                    f"stage {stage.name} in {stage.run_dir} was fine-tuned with {section}.{key} = {before!r}, the "
                    f"config now says {value!r}; restore it, or write the stages to a new output.dir (only "
                    f"{', '.join('finetune.' + k for k in FINETUNE_RESUME_KEYS)} may change between runs)."
                )
            changed.append(f"finetune.{key}={value}")
    return changed if state != "finished" else []


def budget_changes(stage: Stage, state: str) -> list[str]:
    """`search.KEY=VALUE` for the budget keys a resume of the stage applies; refuses any other change.

    Where the stage runs (output.dir, a chained init_from) may differ: the folder may have been moved. A
    finished stage ignores settings that change only memory use; it is kept as it is.
    """
    if stage.kind == "export":
        return []  # an export is written again whenever it is not exactly what the stage asks for
    saved = read_yaml(stage.run_dir / CONFIG_FILE)
    if stage.kind == "finetune":
        return _finetune_changes(stage, saved, state)
    now = stage.config.model_dump(mode="json")
    changed, memory = [], []
    for section, values in now.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key)
            if before == value or section in ("output", "finetune") or _set_by_pipeline(stage, section, key):
                continue
            try:
                kind = resume_change(section, key, checkpoint.has_state(stage.run_dir))
            except ConfigError as exc:
                raise ConfigError(f"stage {stage.name}: {exc}") from None
            if kind == "identity":
                raise ConfigError(
                    f"stage {stage.name} in {stage.run_dir} was run with {section}.{key} = {before!r}, the config now "
                    f"says {value!r}; restore it, or write the stages to a new output.dir (only search budget "
                    "settings may change between runs)."
                )
            (memory if kind == "memory" else changed).append(f"search.{key}={value}")
    # a finished stage is kept when only memory settings changed; once it resumes, they apply too
    return changed + memory if changed or state != "finished" else []


def relocate(stage: Stage) -> None:
    """Point a stage's saved config at where the stages folder is now (it may have been moved or copied):
    its output.dir, and init_from when it chains to the stage before. Nothing else in it changes."""
    if stage.kind == "export":
        return  # no config of its own: it is written again when its record differs
    path = stage.run_dir / CONFIG_FILE
    saved = read_yaml(path)
    updated = yaml.safe_load(yaml.safe_dump(saved))
    updated.setdefault("output", {})["dir"] = str(stage.run_dir)
    if stage.chained and stage.kind == "finetune":
        updated.setdefault("finetune", {})["run"] = stage.config.finetune.run
    elif stage.chained:
        updated.setdefault("search", {})["init_from"] = stage.config.search.init_from
    if stage.model_from is not None:
        updated.setdefault("model", {})["name"] = stage.config.model.name
    if updated != saved:
        atomic_write_text(path, yaml.safe_dump(updated, sort_keys=False))


def _target_tokens(config: Config) -> int | None:
    """A long stage's target in tokens; `8x` needs the model's window (None when the model is not readable yet)."""
    target = config.search.target_or_default
    if not str(target).strip().endswith("x"):
        return parse_length(target)
    original = config.model.original_length
    if original is None:
        try:
            original = rope_spec(load_model_config(config.model.name, LoadOptions.of(config.model))).original_length
        except LongRopeError:
            return None  # e.g. a fine-tuned model still to come: the stage checks its target when it starts
    return parse_length(target, original)


def check_settings(stages: list[Stage], what: list[tuple[str, list[str]]], world_size: int) -> None:
    """Mistakes a later stage would only hit after the earlier ones ran for hours, caught up front."""
    previous = None  # (stage, tokens) of the last long stage
    for stage, (state, changes) in zip(stages, what):
        s = stage.config.search
        if stage.kind != "search":
            continue  # the fine-tune checks its own settings when it starts (the run it trains may not exist yet)
        if not (state == "finished" and not changes) and world_size % s.context_parallel:
            raise ConfigError(
                f"stage {stage.name}: search.context_parallel is {s.context_parallel} but torchrun started {world_size} "
                f"process(es); use a divisor of {world_size}, or start a multiple of {s.context_parallel} processes."
            )
        if s.short:
            continue
        tokens = _target_tokens(stage.config)
        if tokens is not None and previous is not None and (stage.chained or stage.model_from) and tokens <= previous[1]:
            raise ConfigError(
                f"stage {stage.name}: target {s.target} ({tokens} tokens) is not longer than stage {previous[0]}'s "
                f"({previous[1]} tokens); each stage must extend the one before it."
            )
        previous = (stage.name, tokens) if tokens is not None else None


def check_chain(stages: list[Stage], what: list[tuple[str, list[str]]]) -> None:
    """Refuse a run that would leave a later stage built on factors its earlier stage no longer has.

    A stage searched or resumed now may change its factors; a later stage already on disk that builds on
    it (directly or through others) would then be stale. A finished stage whose recorded prior differs from
    what its init_from holds now is stale already.
    """
    changing: dict[Path, str] = {}  # run dir -> the stage whose run changes it
    for stage, (state, changes) in zip(stages, what):
        if stage.kind == "export":
            continue  # written again after any stage it builds on changes (run_planned)
        dependency = next((p for p in stage.builds_on if p in changing), None)
        changed = changing.get(dependency) if dependency is not None else None
        if changed is not None and state != "new":
            what = "model" if dependency == stage.model_from else "factors"
            raise ConfigError(
                f"stage {stage.name} was built on the {what} of stage {changed}, which this run would change; "
                f"move {stage.run_dir} aside to {'fine-tune' if stage.kind == 'finetune' else 'search'} it again on "
                f"the new {what}, or leave stage {changed} as it was."
            )
        init = stage.builds_on[0] if stage.builds_on and (stage.kind == "finetune" or stage.config.search.init_from) \
            else None
        if state != "finished" or changes or changed is not None:
            changing[stage.run_dir] = changed or stage.name
        elif stage.kind == "finetune" and init is not None and (init / FACTORS_FILE).is_file():
            trained = load_factors(stage.run_dir / EXPORT_FACTORS_FILE)
            if trained.factors != load_factors(init).factors:
                raise ConfigError(
                    f"stage {stage.name} was fine-tuned with other factors than {init} holds now; move "
                    f"{stage.run_dir} aside to fine-tune it again on the current ones."
                )
        elif init is not None and state == "finished" and (init / FACTORS_FILE).is_file():
            prior = load_factors(stage.run_dir).search.prior
            if prior is not None and prior.factors != load_factors(init).factors:
                raise ConfigError(
                    f"stage {stage.name} was built on other factors than {init} holds now; move {stage.run_dir} "
                    "aside to search it again on the current ones."
                )


def run_stages(
    path: Path, overrides: list[str], root: Path | None = None, reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> tuple[list[StageResult], Path]:
    """Run, resume or keep every stage in order; returns each stage's result and the pipeline folder.

    Every stage folder already on disk is checked against the config first (only budget settings may
    differ), so a conflicting change fails before anything is written or searched.
    """

    with contextlib.ExitStack() as stack:  # rank 0 holds the folder's lock until the last stage ends

        def prepare() -> tuple[Path, list[Stage], list[tuple[str, list[str]]], Claim]:
            root_dir, stages = plan_stages(path, overrides, root)
            check_root(root_dir)
            what = [status_and_changes(stage) for stage in stages]
            check_settings(stages, what, ctx.world_size)
            check_chain(stages, what)
            # only once every check passed
            claim = stack.enter_context(claimed(root_dir, create=True))
            for stage, (state, changes) in zip(stages, what):
                if state == "unfinished" or changes:
                    relocate(stage)
            write_pipeline(root_dir, path, overrides, claim)
            return root_dir, stages, what, claim

        root, stages, what, claim = distributed.run_on_main(prepare, ctx)
        try:
            return run_planned(stages, what, reporter, ctx), root
        finally:
            if ctx.is_main and any(stage.run_dir.is_dir() for stage in stages):
                claim.keep()  # a stage ran: the folder is the stages' now; a failed first start leaves none


def run_planned(stages: list[Stage], what: list[tuple[str, list[str]]], reporter: Reporter = SILENT,
                ctx: distributed.Context = distributed.SINGLE_PROCESS) -> list[StageResult]:
    """Each stage in order: kept when finished and unchanged, searched when new, resumed (with its budget changes)
    otherwise. An error names the stage and the finished stages it leaves in place."""
    results: list[StageResult] = []
    for stage, (state, changes) in zip(stages, what):
        if stage.kind == "finetune":
            results.append(_run_finetune_stage(stage, state, changes, results, reporter))
            continue
        if stage.kind == "export":
            ran = {r.stage.run_dir for r in results if r.status != "kept"}
            redo = state != "finished" or any(p in ran for p in stage.builds_on)
            results.append(distributed.run_on_main(lambda: _run_export_stage(stage, redo, results, reporter), ctx))
            continue
        try:
            if state == "finished" and not changes:
                final, kind = distributed.run_on_main(lambda: load_factors(stage.run_dir), ctx), "kept"  # rank 0's files
            elif state == "new":
                final, _ = run_search(stage.config, stage.run_dir, reporter=_announce(reporter, stage, "searching"),
                                      ctx=ctx)
                kind = "searched"
            else:
                final, _ = run_search(None, stage.run_dir, resume=True, overrides=changes,
                                      reporter=_announce(reporter, stage, "resuming"), ctx=ctx)
                kind = "resumed"
        except LongRopeError as exc:
            raise stage_failed(stage, exc, results) from exc
        if kind == "kept":
            reporter.note(f"stage {stage.name}: finished earlier, kept ({stage.run_dir})")
        results.append(StageResult(stage, final, kind))
    return results


def stage_failed(stage: Stage, exc: LongRopeError, done: list[StageResult]) -> LongRopeError:
    """The stage's error in one line, naming the stage and the finished stages a rerun keeps."""
    finished = ", ".join(r.stage.name for r in done)
    kept = f"; finished stages ({finished}) are kept" if finished else ""
    return type(exc)(f"stage {stage.name}: {str(exc).rstrip('.')}{kept}; run the same command again once fixed.")


def _run_finetune_stage(stage: Stage, state: str, changes: list[str], done: list[StageResult],
                        reporter: Reporter) -> StageResult:
    """A finetune stage: kept when finished, fine-tuned when new, resumed otherwise."""
    from longrope_search import finetune  # heavy (transformers' Trainer, accelerate): only when a stage fine-tunes

    try:
        if state == "finished" and not changes:
            result, kind = load_result(stage.run_dir), "kept"
            reporter.note(f"stage {stage.name}: finished earlier, kept ({stage.run_dir})")
        elif state == "new":
            reporter.note(f"stage {stage.name}: fine-tuning in {stage.run_dir}")
            result, kind = finetune.run_finetune(finetune.with_run(stage.config), stage.run_dir, reporter=reporter), \
                "fine-tuned"
        else:
            reporter.note(f"stage {stage.name}: resuming the fine-tune in {stage.run_dir}")
            result = finetune.run_finetune(None, stage.run_dir, resume=True, overrides=changes, reporter=reporter)
            kind = "resumed"
        final = load_factors(stage.run_dir / EXPORT_FACTORS_FILE)
    except LongRopeError as exc:
        raise stage_failed(stage, exc, done) from exc
    return StageResult(stage, final, kind, result)


EXPORT_RECORD = "export.json"  # an export stage's record, written last: what it exported, and its check


def _export_record(stage: Stage) -> dict[str, Any]:
    """What an export stage writes: the model, and the search run's factors or the baseline at its target."""
    assert stage.export is not None
    return {"model": stage.config.model.name, "source": str(stage.source) if stage.source else None,
            "factors": stage.export.factors, "target": stage.export.target}


def _exported(stage: Stage) -> dict[str, Any] | None:
    """The record of the export on disk (None when there is none, or it is unreadable: then it is written again)."""
    try:
        doc = json.loads((stage.run_dir / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return {k: doc.get(k) for k in ("model", "source", "factors", "target")} if isinstance(doc, dict) else None


def _run_export_stage(stage: Stage, redo: bool, done: list[StageResult], reporter: Reporter) -> StageResult:
    """An export stage: kept when its record matches and nothing it builds on ran now; else written and checked."""
    settings = stage.export
    assert settings is not None
    if not redo:
        reporter.note(f"stage {stage.name}: exported earlier, kept ({stage.run_dir})")
        return StageResult(stage, load_factors(stage.run_dir / EXPORT_FACTORS_FILE), "kept")
    reporter.note(f"stage {stage.name}: exporting into {stage.run_dir}")
    try:
        (stage.run_dir / EXPORT_RECORD).unlink(missing_ok=True)  # not finished until the new record is written
        if settings.factors == "run":
            report = export.export(stage.source, stage.run_dir, model=stage.config.model.name, force=True,
                                   progress=reporter.note)
        else:
            report = export.export_method(settings.factors, settings.target, stage.config.model.name, stage.run_dir,
                                          force=True, progress=reporter.note)
    except LongRopeError as exc:
        raise stage_failed(stage, exc, done) from exc
    record = {**_export_record(stage), "max_abs_diff": report.max_abs_diff,
              "short_max_abs_diff": report.short_max_abs_diff, "verify_length": report.verify_length}
    atomic_write_text(stage.run_dir / EXPORT_RECORD, json.dumps(record, indent=2) + "\n")
    return StageResult(stage, load_factors(stage.run_dir / EXPORT_FACTORS_FILE), "exported")


def status_and_changes(stage: Stage) -> tuple[str, list[str]]:
    """The stage's state on disk (new, unfinished, finished) and the budget changes a resume of it applies."""
    state = status(stage)
    return state, ([] if state == "new" else budget_changes(stage, state))


def _announce(reporter: Reporter, stage: Stage, verb: str) -> Reporter:
    reporter.note(f"stage {stage.name}: {verb} in {stage.run_dir}")
    return reporter


def check_root(root: Path, marker: str = PIPELINE_FILE, what: str = "a stages folder") -> None:
    """The folder holds run folders and its marker file (stages.yaml) only; anything else is not ours to write into."""
    if root.exists() and (not root.is_dir() or (entries(root) and not (root / marker).is_file())):
        raise CheckpointError(f"{root} exists and is not {what}; choose another --out or output.dir.")


def write_pipeline(root: Path, path: Path, overrides: list[str], claim: Claim | None = None) -> None:
    """stages.yaml: the config with --set applied, which `longrope search --resume ROOT` runs again."""
    raw = stages_with_overrides(read_yaml(path), overrides)
    raw.setdefault("output", {})["dir"] = str(root)
    for sections in (raw, *raw["stages"]):  # absolute, so a resume from another directory finds the same files
        absolute_raw_paths(sections)
    pipeline = root / PIPELINE_FILE
    if pipeline.is_file() and read_yaml(pipeline) == raw:
        return
    if claim is not None:
        claim.write_text(PIPELINE_FILE, yaml.safe_dump(raw, sort_keys=False))
    else:
        atomic_write_text(pipeline, yaml.safe_dump(raw, sort_keys=False))
