"""Search state on disk: one atomic JSON file per generation, newest complete one wins on resume.

A state holds everything the loop needs to continue exactly where it stopped: the scored population,
every evaluation so far, the RNG state after the generation, and the run's identity (fingerprint).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from longrope_search.errors import CheckpointError
from longrope_search.evolution import Candidate
from longrope_search.files import append_line, atomic_write_text, end_with_newline, json_text, make_dirs, remove_temps
from longrope_search.rundir import CONFIG_FILE, FACTORS_FILE, LOG_FILE, STATE_DIR

KEEP_STATES = 3  # older generations are deleted; more than one survives a torn newest file


@dataclass
class Evaluation:
    candidate: Candidate
    ppl: float  # inf when the loss was not finite; a rejected candidate's partial score
    generation: int
    origin: str  # pi | ntk | yarn | init | mutation | crossover
    rejected: bool = False  # stopped early (race_margin, screen_windows): never a parent, never the winner
    tokens: int = 0  # forward tokens its score cost (0 when it was scored before, e.g. in an earlier stage)

    @property
    def selection_score(self) -> float:
        """What selection compares: the PPL, or inf for a rejected candidate."""
        return math.inf if self.rejected else self.ppl


@dataclass
class SearchState:
    generation: int  # last completed generation; 0 is the initial population
    population: list[tuple[Candidate, float]]  # scored members of the current generation
    history: list[Evaluation]  # every evaluated candidate, in evaluation order
    rng_state: dict[str, Any]  # numpy bit_generator.state after this generation
    fingerprint: dict[str, Any]  # run identity; a resume with another identity is refused
    seconds: float = 0.0  # search time spent so far (excluding model load)
    notes: list[str] = field(default_factory=list)  # budget changes and other events, for the record
    validation: list[tuple[int, str, float]] = field(default_factory=list)  # (generation, best-so-far key, its PPL)

    @property
    def forward_tokens(self) -> int:
        """The tokens every evaluation so far ran through the model: the search's work."""
        return sum(e.tokens for e in self.history)

    def best(self) -> Evaluation:
        return min(self.history, key=lambda e: (not math.isfinite(e.selection_score), e.selection_score,
                                                e.candidate.key))

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
            {**e.candidate.to_json(), "ppl": ppl_to_json(e.ppl), "generation": e.generation, "origin": e.origin,
             "tokens": e.tokens, **({"rejected": True} if e.rejected else {})}
            for e in state.history
        ],
        "rng_state": state.rng_state,
        "fingerprint": state.fingerprint,
        "seconds": state.seconds,
        "notes": state.notes,
        "validation": [[g, key, ppl_to_json(ppl)] for g, key, ppl in state.validation],
    }


def state_from_json(doc: dict[str, Any]) -> SearchState:
    return SearchState(
        generation=int(doc["generation"]),
        population=[(Candidate.from_json(m), ppl_from_json(m["ppl"])) for m in doc["population"]],
        history=[
            Evaluation(Candidate.from_json(e), ppl_from_json(e["ppl"]), int(e["generation"]), str(e["origin"]),
                       bool(e.get("rejected", False)), int(e.get("tokens", 0)))
            for e in doc["history"]
        ],
        rng_state=dict(doc["rng_state"]),
        fingerprint=dict(doc["fingerprint"]),
        seconds=float(doc.get("seconds", 0.0)),
        notes=list(doc.get("notes", [])),
        validation=[(int(g), str(key), ppl_from_json(ppl)) for g, key, ppl in doc.get("validation", [])],
    )


def state_path(run_dir: Path, generation: int) -> Path:
    return run_dir / STATE_DIR / f"gen_{generation:05d}.json"


def save_state(run_dir: Path, state: SearchState) -> Path:
    path = state_path(run_dir, state.generation)
    atomic_write_text(path, json_text(state_to_json(state)) + "\n")
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
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            warnings.append(f"{path.name} is damaged ({type(exc).__name__}); using the generation before it")
    if missing_ok:
        return None, warnings
    raise CheckpointError(
        f"no readable checkpoint in {run_dir / STATE_DIR}; the files are damaged: start a new search with --config."
    )


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _well_typed(record: dict[str, Any]) -> bool:
    """A record whose fields have the types resume reads; anything else is treated like a torn line."""
    event = record.get("event")
    if not isinstance(event, str):
        return False
    if event == "eval":
        nlls = record.get("nlls", [])
        return (isinstance(record.get("key"), str) and _number(record.get("ppl"))
                and isinstance(nlls, list) and all(_number(v) for v in nlls)
                and isinstance(record.get("rejected", False), bool) and isinstance(record.get("tokens", 0), int))
    if event == "generation":
        return isinstance(record.get("generation"), int) and not isinstance(record.get("generation"), bool)
    if event == "start":
        return isinstance(record.get("fingerprint"), dict)
    if event == "attention_fit":
        return isinstance(record.get("fit"), dict)
    return True


def log_records(log_path: Path, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records of log.jsonl in order; a torn line (killed mid-write) or one with wrong types (edited by hand) is
    skipped, its line number added to `skipped`."""
    if not log_path.is_file():
        return
    for number, line in enumerate(log_path.read_bytes().decode(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and _well_typed(record):
            yield record
        elif skipped is not None and line.strip():
            skipped.append(number)


@dataclass
class LogSummary:
    """What resume and the stages runner read back from log.jsonl, in one pass."""

    scores: dict[str, float]  # key -> PPL of every logged evaluation, also those after the last checkpoint
    newest: dict[str, dict[str, Any]]  # event -> its newest record (start, attention_fit, ...)
    phase: str | None  # the last of start / resume / done
    generations: dict[int, dict[str, Any]] = field(default_factory=dict)  # generation -> its newest "generation" line
    skipped: list[int] = field(default_factory=list)  # numbers of the lines that could not be read
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> its eval line (nlls, rejected, tokens)

    @property
    def warning(self) -> str | None:
        """One line about the skipped lines, if any."""
        if not self.skipped:
            return None
        shown = ", ".join(map(str, self.skipped[:5])) + (", ..." if len(self.skipped) > 5 else "")
        return (f"{LOG_FILE}: {len(self.skipped)} unreadable line(s) skipped (line {shown}: torn by a kill or edited); "
                "an evaluation they held is scored again if needed")

    @property
    def start_identity(self) -> dict[str, Any] | None:
        """The identity logged when the search started: what a resume before generation 0 compares with."""
        return self.newest.get("start", {}).get("fingerprint")


def read_log(log_path: Path) -> LogSummary:
    """A kill between two checkpoints loses no finished evaluation: resume reuses the logged scores."""
    summary = LogSummary({}, {}, None)
    for record in log_records(log_path, summary.skipped):
        event = record["event"]
        if event == "eval":
            summary.scores[record["key"]] = ppl_from_json(record.get("ppl"))
            summary.details[record["key"]] = record
        elif event == "generation":
            summary.generations[record["generation"]] = record
        summary.newest[event] = record
        if event in ("start", "resume", "done"):
            summary.phase = event
    return summary


def generation_record(state: SearchState) -> dict[str, Any]:
    """The log line of a finished generation."""
    best = state.best()
    return {"event": "generation", "generation": state.generation, "evaluations": len(state.history),
            "best_ppl": ppl_to_json(best.ppl), "best_key": best.candidate.key, "seconds": round(state.seconds, 3),
            "forward_tokens": state.forward_tokens, "rejected": sum(e.rejected for e in state.history)}


def same_generation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two generation lines that say the same (the time spent aside): a replayed generation is not logged twice."""
    return all(a.get(k) == b.get(k) for k in ("generation", "evaluations", "best_ppl", "best_key"))


def has_state(run_dir: Path) -> bool:
    return any((run_dir / STATE_DIR).glob("gen_*.json"))


def search_finished(run_dir: Path) -> bool:
    """True when the run's last start or resume was followed by its `done` record (factors.json final)."""
    return read_log(run_dir / LOG_FILE).phase == "done" and (run_dir / FACTORS_FILE).is_file()


def unfinished_note(run_dir: Path) -> list[str]:
    """A note when `run_dir` is a search that has not finished (still running, or stopped): its factors.json holds
    the best so far, not the compared winner."""
    if not (run_dir / LOG_FILE).is_file() or not (run_dir / STATE_DIR).is_dir():
        return []
    log = read_log(run_dir / LOG_FILE)
    if log.phase == "done" and (run_dir / FACTORS_FILE).is_file():  # search_finished, from the one read
        return []
    generation = max(log.generations, default=0)
    return [f"{run_dir} has not finished its search (it is still running, or was stopped): these are its best factors "
            f"after generation {generation}, not yet compared or validated; use them again once it ends (`longrope "
            f"search --resume {run_dir}` finishes a stopped one)."]


def append_log(log_path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed: the log is an audit trail and the resume cache. Never through a symbolic link.
    Each line gets "time", when it was written (ISO-8601 UTC), for the audit trail only: no reader uses it."""
    make_dirs(log_path.parent)
    stamped = {**record, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    append_line(log_path, json_text(stamped) + "\n")


def ensure_log_line_end(log_path: Path) -> None:
    """A kill mid-write leaves a torn last line; start the next record on a fresh line."""
    end_with_newline(log_path)


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """The temp files of the search's own atomic writes that a kill left in the run folder."""
    removed = remove_temps(run_dir, CONFIG_FILE) + remove_temps(run_dir, FACTORS_FILE)
    if (run_dir / STATE_DIR).is_dir():
        removed += remove_temps(run_dir / STATE_DIR, "gen_*.json")
    return removed
