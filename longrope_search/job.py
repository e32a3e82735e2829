"""One `longrope search` command: a new search, a resume, a config with stages, or a sweep of the critical
dimension (each new or resumed).

`prepare` decides which from the arguments and the files (on rank 0 under torchrun) and refuses combinations
that do not apply, before anything runs; `run` runs it. The run directory is known before the run starts, so
an interrupted command can name the command that continues it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longrope_search import distributed
from longrope_search.config import Config, load_config
from longrope_search.stages_file import has_stages
from longrope_search.errors import ConfigError
from longrope_search.factors import FactorsFile
from longrope_search.progress import SILENT, Reporter
from longrope_search.rundir import CONFIG_FILE, PIPELINE_FILE, default_run_dir, is_pipeline, is_sweep
from longrope_search.search_run import run_search
from longrope_search.stages import StageResult, run_stages
from longrope_search.sweep import SweepResult, run_sweep


@dataclass(frozen=True)
class Job:
    kind: Literal["search", "resume", "stages", "sweep"]
    run_dir: Path | None  # the run (or stages folder); None for stages that go to their config's output.dir
    overrides: list[str]
    config: Config | None = None  # a new single search or sweep
    stages_file: Path | None = None  # stages: the config, or the folder's stages.yaml on resume

    @property
    def resumable(self) -> bool:
        """The folder holds a run (or stages, or a sweep) that `--resume` continues."""
        folder = self.run_dir
        return folder is not None and (is_pipeline(folder) or is_sweep(folder) or (folder / CONFIG_FILE).is_file())

    @property
    def continue_command(self) -> str:
        """How to continue after an interruption: a resume where a run exists, else the command again (a start
        interrupted before it wrote anything)."""
        return f"`longrope search --resume {self.run_dir}`" if self.resumable else "the same command"


@dataclass
class JobResult:
    final: FactorsFile | None  # the last search stage's for stages (None when none searches), the best search's for a sweep
    run_dir: Path  # the run to export
    stages: list[StageResult] = field(default_factory=list)  # stages, or a sweep's searches; empty for one search
    sweep: SweepResult | None = None

    def to_json(self) -> dict[str, Any]:
        """`longrope search --json`: the run to export, its factors file, and each stage's (or search's) outcome."""
        return {"run_dir": str(self.run_dir), "factors": self.final.to_json() if self.final is not None else None,
                "stages": [{"name": r.stage.name, "kind": r.stage.kind, "status": r.status,
                            "run_dir": str(r.stage.run_dir)} for r in self.stages]}


def prepare(config_path: Path | None, resume: Path | None, out: Path | None, overrides: list[str],
            single_options: bool, ctx: distributed.Context = distributed.SINGLE_PROCESS) -> Job:
    """The job the arguments ask for. `single_options`: --target, --init-from or --short was given (they apply to
    a single search only). Rank 0 reads the files: the other nodes may not have them."""
    if resume is not None and config_path is not None:
        raise ConfigError("--resume continues the saved config of the run; drop --config (budget changes go in --set).")
    staged = distributed.run_on_main(
        lambda: is_pipeline(resume) if resume is not None else config_path is not None and has_stages(config_path),
        ctx)
    if staged and single_options:
        raise ConfigError("--target, --init-from and --short apply to a single search; in a config with stages, set "
                          "search.target, search.init_from and search.short per stage.")
    if staged:
        return Job("stages", resume or out, overrides,
                   stages_file=resume / PIPELINE_FILE if resume is not None else config_path)
    if resume is not None:
        return Job("sweep" if distributed.run_on_main(lambda: is_sweep(resume), ctx) else "resume", resume, overrides)
    config = distributed.run_on_main(lambda: load_config(config_path, overrides), ctx)
    kind = "sweep" if config.search.sweep else "search"
    return Job(kind, out or Path(config.output.dir or default_run_dir(config)), overrides, config=config)


def run(job: Job, reporter: Reporter = SILENT, ctx: distributed.Context = distributed.SINGLE_PROCESS) -> JobResult:
    if job.kind == "stages":
        results, _ = run_stages(job.stages_file, job.overrides, job.run_dir, reporter, ctx)
        searched = [r for r in results if r.stage.kind == "search"]  # a baseline's route may search nothing
        return JobResult(searched[-1].final if searched else None, (searched or results)[-1].stage.run_dir, results)
    if job.kind == "sweep":
        sweep = run_sweep(job.config, job.run_dir, job.overrides, reporter, ctx)
        return JobResult(sweep.best.final, sweep.best.stage.run_dir, sweep.results, sweep)
    if job.kind == "resume":
        final, run_dir = run_search(None, job.run_dir, resume=True, overrides=job.overrides, reporter=reporter, ctx=ctx)
    else:
        final, run_dir = run_search(job.config, job.run_dir, reporter=reporter, ctx=ctx)
    return JobResult(final, run_dir)
