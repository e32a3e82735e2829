"""The run directory: the names of its files, which settings a resume may change, local paths made absolute,
and how a folder of stages is told apart from a run.

A run (runs/<name>/) holds config.resolved.yaml, state/, log.jsonl, factors.json and, after `longrope eval`
and `longrope plot`, eval.json and plots/; a folder of stages holds stages.yaml and one run per stage.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from longrope_search.config import Config, apply_overrides, from_dict, read_yaml
from longrope_search.errors import CheckpointError, ConfigError
from longrope_search.files import atomic_write_text

CONFIG_FILE = "config.resolved.yaml"  # exactly what ran, written before the model loads
STATE_DIR = "state"  # gen_NNNNN.json: the search state after each generation
LOG_FILE = "log.jsonl"  # one line per evaluation and per generation: the audit trail and the resume cache
FACTORS_FILE = "factors.json"  # the best factors so far
EVAL_FILE = "eval.json"  # `longrope eval` results
PLOTS_DIR = "plots"  # `longrope plot` figures
PIPELINE_FILE = "stages.yaml"  # in a stages folder: the config the stages came from, so --resume can rerun them
SWEEP_FILE = "sweep.yaml"  # in a critical-dimension sweep's folder: the config it came from
SWEEP_RESULT = "sweep.json"  # ... and which of its searches won
EXPORT_FACTORS_FILE = "longrope.json"  # in an exported model directory: the factors file it was made from

# A start that failed before any evaluation (model or corpus refused) leaves only this file behind.
FAILED_START = {CONFIG_FILE}


# --- names ----------------------------------------------------------------------------------------------


def model_slug(config: Config) -> str:
    """The model name as a folder name: builtin:tiny -> tiny, meta-llama/Llama-2-7b-hf -> meta-llama-Llama-2-7b-hf."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", config.model.name.removeprefix("builtin:")).strip("-")


def default_run_dir(config: Config) -> Path:
    s = config.search
    return Path("runs") / f"{model_slug(config)}-{s.target_or_default}{'-short' if s.short else ''}"


def default_stages_dir(config: Config) -> Path:
    return Path("runs") / f"{model_slug(config)}-stages"


def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - FAILED_START):
        raise CheckpointError(
            f"{run_dir} already exists and is not empty; resume it with `longrope search --resume {run_dir}` "
            "or choose another --out."
        )


# --- stages folders -------------------------------------------------------------------------------------


def is_pipeline(path: Path) -> bool:
    return (path / PIPELINE_FILE).is_file()


def is_sweep(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def not_a_run(path: Path) -> str | None:
    """For commands that take one run: the message when `path` is a stages or sweep folder instead, else None."""
    if is_sweep(path):
        try:
            best = str(json.loads((path / SWEEP_RESULT).read_text())["run"])
            return f"{path} holds a critical-dimension sweep; pass one search's folder, e.g. {best} (the best)."
        except (OSError, ValueError, KeyError, TypeError):
            return f"{path} holds a critical-dimension sweep (not finished); pass one search's folder, e.g. {path}/cd-N."
    if not is_pipeline(path):
        return None
    try:
        last = str(read_yaml(path / PIPELINE_FILE)["stages"][-1]["name"])
    except (ConfigError, KeyError, IndexError, TypeError):
        last = "<stage>"
    return f"{path} holds the stages of a progressive search; pass one stage's folder, e.g. {path / last} (the last)."


# --- what a resume may change ---------------------------------------------------------------------------

MEMORY_KEYS = ("chunk_size", "mlp_chunk", "context_parallel")  # change memory use and speed, not scores
BUDGET_KEYS = ("generations", "population", "parents", "mutations", "crossovers", "mutation_prob", *MEMORY_KEYS)
POPULATION_DONE = ("search.population sizes generation 0 only, and this run has finished it; later generations are "
                   "parents + mutations + crossovers, so change those instead.")

Change = Literal["memory", "budget", "identity"]


def resume_change(section: str, key: str, generation_zero_done: bool) -> Change:
    """How a resume treats a changed setting: "memory" (speed and memory only), "budget" (how much is searched),
    or "identity" (it changes what a score means: refused). search.population once generation 0 is done is
    refused with its own reason."""
    if section != "search" or key not in BUDGET_KEYS:
        return "identity"
    if key == "population" and generation_zero_done:
        raise ConfigError(POPULATION_DONE)
    return "memory" if key in MEMORY_KEYS else "budget"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The saved config.resolved.yaml of a run, refusing a stages folder or a folder that is not a run."""
    if message := not_a_run(run_dir):
        raise CheckpointError(message)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a longrope run (no {CONFIG_FILE}); pass the folder a search wrote.")
    return read_yaml(path)


def config_for_resume(run_dir: Path, overrides: list[str], generation_zero_done: bool = False
                      ) -> tuple[Config, list[str]]:
    """The run's saved config with budget overrides (`search.generations=60`) applied, and a note per change;
    any other override is refused."""
    saved = read_run_config(run_dir)
    for item in overrides:
        key = item.partition("=")[0].strip()
        section, _, name = key.partition(".")
        if resume_change(section, name, False) == "identity":
            raise ConfigError(
                f"{key} cannot change when resuming (it changes what a score means); start a new run with --out, "
                f"or change only {', '.join('search.' + k for k in BUDGET_KEYS)}."
            )
    updated = apply_overrides(saved, overrides)
    notes = []
    for name, value in updated.get("search", {}).items():
        before = saved.get("search", {}).get(name)
        if before != value:
            resume_change("search", name, generation_zero_done)  # population after generation 0: refused
            notes.append(f"search.{name}: {before} -> {value}")
    return from_dict(updated, source=str(run_dir / CONFIG_FILE)), notes


def write_resolved_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())


# --- absolute paths -------------------------------------------------------------------------------------


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


def absolute_raw_paths(sections: dict[str, Any]) -> None:
    """The same for a raw YAML mapping (a stages file), in place."""
    for section, key, local in PATH_FIELDS:
        if isinstance(sections.get(section), dict) and key in sections[section]:
            sections[section][key] = absolute(sections[section][key], local)
