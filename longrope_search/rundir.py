"""The run directory: the names of its files, which settings a resume may change, local paths made absolute,
and how a folder of stages is told apart from a run.

A run (runs/<name>/) holds config.resolved.yaml, state/, log.jsonl, factors.json and, after `longrope eval`
and `longrope plot`, eval.json and plots/; a folder of stages holds stages.yaml and one run per stage.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from longrope_search.config import Config, apply_overrides, from_dict, read_yaml
from longrope_search.errors import CheckpointError, ConfigError
from longrope_search.files import LOCK_FILE, TEMP_SUFFIX, atomic_write_bytes, atomic_write_text, folder_lock, make_dirs

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
# A fine-tune's folder is a Hugging Face model directory once it is done, with these beside the model's files:
FINETUNE_FILE = "finetune.json"  # the fine-tune's result, written last: a folder with it is finished
START_DIR = "start"  # the run exported as `longrope export` writes it: the model training starts from
CHECKPOINTS_DIR = "checkpoints"  # the trainer's checkpoints (checkpoint-N), what --resume continues from

# A start that fails removes what it wrote; one killed before any work (kill -9 while the model loads) leaves at
# most these files behind, with no work in the log, and a new start may reuse the folder (`unstarted`).
FAILED_START = {CONFIG_FILE, LOG_FILE, EXPORT_FACTORS_FILE}
START_EVENTS = ("start", "resume")  # log lines that record no work


# --- names ----------------------------------------------------------------------------------------------


def model_slug(config: Config) -> str:
    """The model name as a folder name: builtin:tiny -> tiny, meta-llama/Llama-2-7b-hf -> meta-llama-Llama-2-7b-hf."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", config.model.name.removeprefix("builtin:")).strip("-")


def default_run_dir(config: Config) -> Path:
    s = config.search
    return Path("runs") / f"{model_slug(config)}-{s.target_or_default}{'-short' if s.short else ''}"


def default_stages_dir(config: Config) -> Path:
    return Path("runs") / f"{model_slug(config)}-stages"


def entries(folder: Path) -> set[str]:
    """The names in a folder, less the lock file and the temp files a kill left behind: what a user put there, or a
    run's own files."""
    return {p.name for p in folder.iterdir()
            if p.name != LOCK_FILE and not (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))}


def check_folder_path(path: Path) -> None:
    """A folder can be made at `path`: it is not a file, nor under one."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a folder; choose another --out (or output.dir).")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{path} cannot be created: {parent} is a file, not a folder; choose another --out.")
            return


def _logged_work(log: Path) -> bool:
    """The log records work (an evaluation, a generation, a training step): the folder is a run to resume."""
    try:
        lines = log.read_bytes().splitlines() if log.is_file() else []
    except OSError:
        return True  # unreadable: never taken for empty
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn by the kill
        if not isinstance(record, dict) or record.get("event") not in START_EVENTS:
            return True
    return False


def unstarted(folder: Path) -> bool:
    """A folder a new start may take: absent, empty, or holding only what a start that failed or was killed before
    its first piece of work left (its config, a log with no work in it, a baseline's factors file)."""
    return not folder.is_dir() or (entries(folder) <= FAILED_START and not _logged_work(folder / LOG_FILE))


def check_new_run_dir(run_dir: Path) -> None:
    check_folder_path(run_dir)
    if not unstarted(run_dir):
        raise CheckpointError(
            f"{run_dir} already exists and is not empty; resume it with `longrope search --resume {run_dir}` "
            "or choose another --out."
        )


@dataclass
class Claim:
    """What a command adds to a run folder before the run exists (the folder itself, config.resolved.yaml). Undone
    when the command fails before `keep`, so a failed start leaves the disk as it was."""

    folder: Path
    created: list[Path] = field(default_factory=list)  # folders made for the run, outermost first
    previous: dict[str, bytes | None] = field(default_factory=dict)  # file name -> its bytes before (None: absent)
    kept: bool = False

    def write_text(self, name: str, text: str) -> None:
        self.track(name)
        atomic_write_text(self.folder / name, text)

    def track(self, name: str) -> None:
        """`name` is about to be written outside `write_text` (an append, a save): undone like the rest."""
        path = self.folder / name
        if name not in self.previous:
            self.previous[name] = path.read_bytes() if path.is_file() and not path.is_symlink() else None

    def keep(self) -> None:
        """The run exists now (its start or resume is logged): a later failure leaves it to be resumed."""
        self.kept = True

    def undo_files(self) -> None:
        for name, before in self.previous.items():
            with contextlib.suppress(OSError, CheckpointError):
                if before is None:
                    (self.folder / name).unlink(missing_ok=True)
                else:
                    atomic_write_bytes(self.folder / name, before)

    def undo_folders(self) -> None:
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: never anything the command did not make


@contextlib.contextmanager
def claimed(folder: Path, create: bool) -> Iterator[Claim]:
    """Hold `folder` for one command (`files.folder_lock`), making it first when `create`; on an error before
    `Claim.keep`, what the command wrote there is undone and the folders it made are removed."""
    claim = Claim(folder)
    if create:
        check_folder_path(folder)
        claim.created = make_dirs(folder)
    try:
        with folder_lock(folder):
            try:
                yield claim
            except Exception:
                if not claim.kept:
                    claim.undo_files()
                raise
    except Exception:
        if not claim.kept:
            claim.undo_folders()
        raise


# --- stages folders -------------------------------------------------------------------------------------


def is_pipeline(path: Path) -> bool:
    return (path / PIPELINE_FILE).is_file()


def is_sweep(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def is_finetune(path: Path) -> bool:
    """A fine-tune's folder (finished or not): its config trains a run's factors (finetune.run) or a baseline
    (finetune.factors), and it has no search state."""
    try:
        saved = read_yaml(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    except ConfigError:
        return False
    trained = saved.get("finetune") or {}
    return bool(trained.get("run") or trained.get("factors", "run") != "run") and not (path / STATE_DIR).exists()


def not_a_run(path: Path) -> str | None:
    """For commands that take one run: the message when `path` is a stages, sweep or fine-tune folder instead, else
    None."""
    if is_finetune(path):
        return (f"{path} holds a fine-tune (a model), not a search; continue it with `longrope finetune --resume {path}`, "
                f"or measure it with `longrope eval --model {path} --factors {path / EXPORT_FACTORS_FILE} --data ...`.")
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
BUDGET_KEYS = ("generations", "population", "parents", "mutations", "crossovers", "mutation_prob", "race_margin",
               "screen_windows", "screen_keep", *MEMORY_KEYS)
POPULATION_DONE = ("search.population sizes generation 0 only, and this run has finished it; later generations are "
                   "parents + mutations + crossovers, so change those instead.")

Change = Literal["memory", "budget", "identity"]

# A fine-tune's settings that a resume may change: speed, memory and what is kept, never the trained numbers.
FINETUNE_RESUME_KEYS = ("save_every", "keep_checkpoints", "gradient_checkpointing", "report_to")


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
    search = saved.get("search")
    if isinstance(search, dict) and search.get("fitness") == "needle" and "needles" not in search:
        saved = {**saved, "search": {**search, "needles": 1}}  # a needle run from before search.needles: one each
    if isinstance(search, dict) and "screen_windows" not in search:
        saved = {**saved, "search": {**saved["search"], "screen_windows": 0}}  # a run from before screening: none
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


def write_resolved_config(run_dir: Path, config: Config, claim: Claim | None = None) -> None:
    if claim is not None:
        claim.write_text(CONFIG_FILE, config.to_yaml())
    else:
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
               ("search", "init_factors", True), ("finetune", "run", True), ("finetune", "source", False))


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
