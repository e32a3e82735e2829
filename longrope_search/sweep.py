"""A sweep of LongRoPE2's critical dimension: `search.critical_dim: [27, 29, 31, 34]` runs one search per value,
each in <out>/cd-<N> (a normal run: checkpoints, resume, export), and keeps the one with the best held-out fitness
(sweep.json). Running the command again, or `longrope search --resume OUT`, keeps finished searches and resumes an
interrupted one; only budget settings may change between runs, as for stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from longrope_search import distributed
from longrope_search.config import Config, apply_overrides, from_dict, read_yaml
from longrope_search.errors import ConfigError
from longrope_search.files import atomic_write_text, json_text
from longrope_search.model import LoadOptions, load_model_config, rope_spec
from longrope_search.progress import SILENT, Reporter
from longrope_search.search_setup import critical_dim
from longrope_search.rundir import SWEEP_FILE, SWEEP_RESULT, Claim, absolute_paths, claimed, default_run_dir
from longrope_search.stages import Stage, StageResult, check_root, check_settings, relocate, run_planned, status_and_changes


@dataclass
class SweepResult:
    root: Path
    results: list[StageResult]  # one per critical dimension, in ascending order
    best: StageResult

    def to_json(self) -> dict:
        return {
            "critical_dims": [r.stage.config.search.critical_dim for r in self.results],
            "fitness": {r.stage.name: {k: r.final.scores.get(k) for k in ("search", "heldout")} for r in self.results},
            "best": self.best.stage.config.search.critical_dim, "run": str(self.best.stage.run_dir),
            "chosen_by": "search" if self.best.final.scores.heldout is None else "heldout",
        }


def sweep_config(root: Path) -> Config:
    """The config a sweep folder last ran with (sweep.yaml)."""
    return from_dict(read_yaml(root / SWEEP_FILE), source=str(root / SWEEP_FILE))


def plan_sweep(config: Config, root: Path) -> list[Stage]:
    """One search per critical dimension, in <root>/cd-<N>; the others' settings as the config has them."""
    stages = []
    for value in config.search.sweep:
        run_dir = root / f"cd-{value}"
        one = config.model_copy(update={
            "search": config.search.model_copy(update={"critical_dim": value}),
            "output": config.output.model_copy(update={"dir": str(run_dir)}),
        })
        stages.append(Stage(f"cd-{value}", one, run_dir, chained=False))
    return stages


def check_values(stages: list[Stage]) -> None:
    """Every critical dimension of the sweep fits the model's rotary pairs; all that do not, in one line."""
    first = stages[0].config
    spec = rope_spec(load_model_config(first.model.name, LoadOptions.of(first.model)))
    if first.model.original_length is not None:
        spec = dataclasses.replace(spec, original_length=first.model.original_length)
    problems = []
    for stage in stages:
        try:
            critical_dim(stage.config, spec)
        except ConfigError as exc:
            problems.append(str(exc).rstrip("."))
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def run_sweep(
    config: Config | None, root: Path | None, overrides: list[str], reporter: Reporter = SILENT,
    ctx: distributed.Context = distributed.SINGLE_PROCESS,
) -> SweepResult:
    """Run, resume or keep the search of every critical dimension, then pick the best. `config` None: continue the
    sweep in `root` (`--resume`), with `overrides` limited to budget settings."""

    with contextlib.ExitStack() as stack:  # rank 0 holds the folder's lock until the last search ends

        def prepare() -> tuple[Path, list[Stage], list[tuple[str, list[str]]], Claim]:
            if config is None and root is None:
                raise ConfigError("--resume needs the sweep's folder, e.g. --resume runs/tiny-8x.")
            base = config if config is not None else sweep_config(root)
            folder = (root or Path(base.output.dir or default_run_dir(base))).absolute()
            check_root(folder, SWEEP_FILE, "a critical-dimension sweep")
            # a new command's overrides are in `config` already; a resume's apply to the saved one
            wanted = absolute_paths(base if config is not None else _with(base, overrides))
            stages = plan_sweep(wanted, folder)
            check_values(stages)  # every value against the model, before the first search runs
            what = [status_and_changes(stage) for stage in stages]  # refuses all but budget changes to a search on disk
            check_settings(stages, what, ctx.world_size)
            claim = stack.enter_context(claimed(folder, create=True))
            for stage, (state, changes) in zip(stages, what):
                if state == "unfinished" or changes:
                    relocate(stage)
            claim.write_text(SWEEP_FILE, wanted.to_yaml())  # what a resume runs again
            return folder, stages, what, claim

        folder, stages, what, claim = distributed.run_on_main(prepare, ctx)
        try:
            results = run_planned(stages, what, reporter, ctx)
        finally:
            if ctx.is_main and any(stage.run_dir.is_dir() for stage in stages):
                claim.keep()  # a search ran: the folder is the sweep's now; a failed first start leaves none
        result = SweepResult(folder, results, min(results, key=lambda r: (r.final.scores.ranking, r.stage.name)))
        if ctx.is_main:
            atomic_write_text(folder / SWEEP_RESULT, json_text(result.to_json(), indent=2) + "\n")
        return result


def _with(config: Config, overrides: list[str]) -> Config:
    """`--set` on a sweep's config (the searches refuse anything but budget changes when they resume)."""
    return from_dict(apply_overrides(config.model_dump(mode="json"), overrides), source="--set")
