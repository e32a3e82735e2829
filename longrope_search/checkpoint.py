"""Search state on disk: one atomic JSON file per generation, newest complete one wins on resume.

A state holds everything the loop needs to continue exactly where it stopped: the scored population,
every evaluation so far, the RNG state after the generation, and the run's identity (fingerprint).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from longrope_search.errors import CheckpointError
from longrope_search.evolution import Candidate
from longrope_search.files import atomic_write_text
from longrope_search.rundir import FACTORS_FILE, LOG_FILE, STATE_DIR

KEEP_STATES = 3  # older generations are deleted; more than one survives a torn newest file


@dataclass
class Evaluation:
    candidate: Candidate
    ppl: float  # inf when the loss was not finite
    generation: int
    origin: str  # pi | ntk | yarn | init | mutation | crossover


@dataclass
class SearchState:
    generation: int  # last completed generation; 0 is the initial population
    population: list[tuple[Candidate, float]]  # scored members of the current generation
    history: list[Evaluation]  # every evaluated candidate, in evaluation order
    rng_state: dict[str, Any]  # numpy bit_generator.state after this generation
    fingerprint: dict[str, Any]  # run identity; a resume with another identity is refused
    seconds: float = 0.0  # search time spent so far (excluding model load)
    notes: list[str] = field(default_factory=list)  # budget changes and other events, for the record

    def best(self) -> Evaluation:
        return min(self.history, key=lambda e: (not math.isfinite(e.ppl), e.ppl, e.candidate.key))

    def seen(self) -> set[str]:
        return {e.candidate.key for e in self.history}


def ppl_to_json(ppl: float) -> float | None:
    return ppl if math.isfinite(ppl) else None  # JSON has no inf


def ppl_from_json(value: float | None) -> float:
    return math.inf if value is None else float(value)


def state_to_json(state: SearchState) -> dict[str, Any]:
    return {
        "generation": state.generation,
        "population": [{**c.to_json(), "ppl": ppl_to_json(p)} for c, p in state.population],
        "history": [
            {**e.candidate.to_json(), "ppl": ppl_to_json(e.ppl), "generation": e.generation, "origin": e.origin}
            for e in state.history
        ],
        "rng_state": state.rng_state,
        "fingerprint": state.fingerprint,
        "seconds": state.seconds,
        "notes": state.notes,
    }


def state_from_json(doc: dict[str, Any]) -> SearchState:
    return SearchState(
        generation=int(doc["generation"]),
        population=[(Candidate.from_json(m), ppl_from_json(m["ppl"])) for m in doc["population"]],
        history=[
            Evaluation(Candidate.from_json(e), ppl_from_json(e["ppl"]), int(e["generation"]), str(e["origin"]))
            for e in doc["history"]
        ],
        rng_state=dict(doc["rng_state"]),
        fingerprint=dict(doc["fingerprint"]),
        seconds=float(doc.get("seconds", 0.0)),
        notes=list(doc.get("notes", [])),
    )


def state_path(run_dir: Path, generation: int) -> Path:
    return run_dir / STATE_DIR / f"gen_{generation:05d}.json"


def save_state(run_dir: Path, state: SearchState) -> Path:
    path = state_path(run_dir, state.generation)
    atomic_write_text(path, json.dumps(state_to_json(state)) + "\n")
    for old in sorted(path.parent.glob("gen_*.json"))[:-KEEP_STATES]:
        old.unlink(missing_ok=True)
    return path


def load_state(run_dir: Path, missing_ok: bool = False) -> tuple[SearchState | None, list[str]]:
    """The newest readable state, and a warning for each newer file that was damaged. With `missing_ok`, None (and
    the warnings) when no state file is readable, for a caller that can replay the search from its log."""
    if not (run_dir / STATE_DIR).is_dir():
        raise CheckpointError(
            f"{run_dir} has no search state (no state/ folder); start a new search with --config instead of --resume."
        )
    warnings: list[str] = []
    for path in sorted((run_dir / STATE_DIR).glob("gen_*.json"), reverse=True):
        try:
            return state_from_json(json.loads(path.read_text())), warnings
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.append(f"{path.name} is damaged ({type(exc).__name__}); using the generation before it")
    if missing_ok:
        return None, warnings
    raise CheckpointError(
        f"no readable checkpoint in {run_dir / STATE_DIR}; the files are damaged: start a new search with --config."
    )


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the identity fields that differ, with both values."""
    return [
        f"{key}: checkpoint has {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def log_records(log_path: Path) -> Iterator[dict[str, Any]]:
    """The records of log.jsonl in order; a torn line (killed mid-write) is skipped."""
    if not log_path.is_file():
        return
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


@dataclass
class LogSummary:
    """What resume and the stages runner read back from log.jsonl, in one pass."""

    scores: dict[str, float]  # key -> PPL of every logged evaluation, also those after the last checkpoint
    newest: dict[str, dict[str, Any]]  # event -> its newest record (start, attention_fit, ...)
    phase: str | None  # the last of start / resume / done

    @property
    def start_identity(self) -> dict[str, Any] | None:
        """The identity logged when the search started: what a resume before generation 0 compares with."""
        return self.newest.get("start", {}).get("fingerprint")


def read_log(log_path: Path) -> LogSummary:
    """A kill between two checkpoints loses no finished evaluation: resume reuses the logged scores."""
    summary = LogSummary({}, {}, None)
    for record in log_records(log_path):
        event = record.get("event")
        if event == "eval" and "key" in record:
            summary.scores[record["key"]] = ppl_from_json(record.get("ppl"))
        summary.newest[str(event)] = record
        if event in ("start", "resume", "done"):
            summary.phase = event
    return summary


def has_state(run_dir: Path) -> bool:
    return any((run_dir / STATE_DIR).glob("gen_*.json"))


def is_finished(run_dir: Path) -> bool:
    """True when the run's last start or resume was followed by its `done` record (factors.json final)."""
    return read_log(run_dir / LOG_FILE).phase == "done" and (run_dir / FACTORS_FILE).is_file()


def append_log(log_path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed: the log is an audit trail and the resume cache."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def ensure_log_line_end(log_path: Path) -> None:
    """A kill mid-write leaves a torn last line; start the next record on a fresh line."""
    if log_path.is_file() and log_path.stat().st_size:
        with log_path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
