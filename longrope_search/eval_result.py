"""eval.json: the result of `longrope eval` (scores per method per length), its one reader and writer, the merge
that keeps earlier lengths, and the tables the CLI prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.table import Table
from rich.text import Text

from longrope_search.config import format_length
from longrope_search.errors import CheckpointError
from longrope_search.files import atomic_write_text, json_text
from longrope_search.methods import FIXED_MARK, is_fixed


NEEDLE_VARIANTS = {"single": "one needle", "multikey": "several keys, one asked"}
Accuracy = dict[str, dict[str, dict[int, dict[float, float]]]]  # variant -> method -> length -> depth -> accuracy


@dataclass
class EvalResult:
    """Scores per method per length. JSON schema (read by the plotter, keep it stable):
    {"lengths": [int], "ppl": {method: {"<length>": float | null}}, "passkey": {method: {"<length>": float}},
     (method: none, pi, ntk, yarn rescaled to each length; pi@8x, ntk@8x, yarn@8x fixed at the factors' target;
     longrope, or a baseline file's METHOD@TARGET; see methods.methods_for)
     "samples": int, "model": str, "factors": str | null,
     "needle": {variant: {method: {"<length>": {"<depth>": float}}}}, "needle_trials": int,
     "heldout": bool, "not_heldout": str};
    null ppl = not finite, empty passkey = not measured; "needle" and "needle_trials" only once measured.
    "heldout": the documents exclude every one the search scored or validated on (missing in older files: true);
    "not_heldout" says why not, when false.
    """

    lengths: list[int]
    ppl: dict[str, dict[int, float]]
    samples: int
    model: str
    factors: str | None = None
    passkey: dict[str, dict[int, float]] = field(default_factory=dict)
    needle: Accuracy = field(default_factory=dict)
    needle_trials: int = 0  # prompts per (length, depth) cell
    heldout: bool = True  # no document the search decided with (see evaluate.flag_inputs)
    not_heldout: str | None = None  # why the documents are not held out from the search
    # what the numbers depend on (evaluate.measured: the model's config, the factors' content, the corpus), whatever
    # path the run was reached by; None in files of earlier versions
    measured: str | None = None
    merge_note: str | None = None  # what saving over an earlier eval.json kept and replaced (not saved)

    def to_json(self) -> dict[str, Any]:
        def table(scores: dict[str, dict[int, float]]) -> dict[str, dict[str, float | None]]:
            return {m: {str(n): (v if math.isfinite(v) else None) for n, v in row.items()} for m, row in scores.items()}

        doc = {"lengths": list(self.lengths), "ppl": table(self.ppl), "passkey": table(self.passkey),
               "samples": self.samples, "model": self.model, "factors": self.factors, "heldout": self.heldout}
        if self.not_heldout is not None:
            doc["not_heldout"] = self.not_heldout
        if self.measured is not None:
            doc["measured"] = self.measured
        if self.needle:
            doc["needle"] = {variant: {m: {str(n): {f"{d:g}": a for d, a in cells.items()} for n, cells in rows.items()}
                                       for m, rows in methods.items()} for variant, methods in self.needle.items()}
            doc["needle_trials"] = self.needle_trials
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "EvalResult":
        """Lengths may be strings (JSON) or ints; null scores are inf. Missing metadata reads as unknown."""

        def table(scores: dict[str, dict[str, float | None]] | None) -> dict[str, dict[int, float]]:
            return {str(m): {int(n): (math.inf if v is None else float(v)) for n, v in row.items()}
                    for m, row in (scores or {}).items()}

        ppl, passkey = table(doc["ppl"]), table(doc.get("passkey"))
        needle = {str(variant): {str(m): {int(n): {float(d): float(a) for d, a in cells.items()}
                                          for n, cells in rows.items()} for m, rows in methods.items()}
                  for variant, methods in (doc.get("needle") or {}).items()}
        lengths = doc.get("lengths") or sorted({n for t in (ppl, passkey) for row in t.values() for n in row})
        return cls(lengths=[int(n) for n in lengths], ppl=ppl, samples=int(doc.get("samples", 0)),
                   model=str(doc.get("model", "")), factors=doc.get("factors"), passkey=passkey, needle=needle,
                   needle_trials=int(doc.get("needle_trials", 0)), heldout=bool(doc.get("heldout", True)),
                   not_heldout=doc.get("not_heldout"), measured=doc.get("measured"))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json_text(self.to_json(), indent=2) + "\n")

    def merged_into(self, path: Path) -> "EvalResult":
        """This result on top of an earlier eval.json of the same measurement (the same `measured`, or for files
        without one the same model and factors path), so a quick run never erases a long one: every length, method
        and needle table the new call did not measure is kept. `merge_note` says what was kept or replaced."""
        try:
            old = read_eval(path)
        except CheckpointError:
            old = None
        if old is None:
            return self
        same = (old.measured == self.measured if old.measured is not None and self.measured is not None
                else (old.model, old.factors) == (self.model, self.factors))
        if not same or (old.samples, old.heldout) != (self.samples, self.heldout):
            return dataclasses.replace(self, merge_note=f"{path} held another measurement (other factors, model, "
                                       "documents or sample count): replaced")
        merged = {name: _merged(getattr(old, name), getattr(self, name)) for name in ("ppl", "passkey")}
        needle, trials = self.needle, self.needle_trials
        if not needle or old.needle_trials == trials:  # cells of other trial counts do not compare
            needle = {v: _merged(old.needle.get(v, {}), self.needle.get(v, {})) for v in {*old.needle, *self.needle}}
            trials = trials or old.needle_trials
        kept = [format_length(n) for n in old.lengths if n not in self.lengths]
        tables = sorted(v for v in needle if v not in self.needle)
        note = (f"kept from the earlier {path.name}: " + "; ".join(
            part for part in (f"lengths {', '.join(kept)}" if kept else "",
                              f"needle tables {', '.join(tables)}" if tables else "") if part)
                if kept or tables else None)
        return EvalResult(sorted(set(old.lengths) | set(self.lengths)), merged["ppl"], self.samples, self.model,
                          self.factors, merged["passkey"], needle, trials, self.heldout, self.not_heldout,
                          self.measured, note)


def _merged(old: dict[str, dict[int, Any]], new: dict[str, dict[int, Any]]) -> dict[str, dict[int, Any]]:
    """method -> length -> score: the new scores over the old ones, old lengths and methods kept."""
    out = {m: {**old.get(m, {}), **row} for m, row in new.items()}
    for m, row in old.items():
        out.setdefault(m, row)
    return out


def length_label(length: int, original_length: int | None = None) -> str:
    """4096 -> '4k'; with the window known, '32k (8x)'."""
    text = format_length(length)
    return f"{text} ({length / original_length:g}x)" if original_length else text


def render_tables(result: EvalResult, original_length: int | None = None) -> list[Any]:
    """Rich tables, rows = methods, columns = lengths; the best per column bold and starred (ties all starred)."""
    def build(title: str, scores: dict[str, dict[int, float]], better: Callable[..., float], fmt: str) -> Any:
        fixed = next((m for m in scores if is_fixed(m)), None)
        caption = "* best per length" + (
            f"; pi, ntk, yarn: rescaled to each length (their best there); {FIXED_MARK}{fixed.split(FIXED_MARK)[1]}: "
            "fixed at the target, as deployed (like longrope)" if fixed else "")
        table = Table(title=title, caption=caption)
        table.add_column("method")
        lengths = [n for n in result.lengths if any(n in row for row in scores.values())]  # a merge may lack some
        for n in lengths:
            table.add_column(length_label(n, original_length), justify="right")
        best = {n: better(row[n] for row in scores.values() if n in row) for n in lengths}
        for method, row in scores.items():
            cells = []
            for n in lengths:
                if n not in row:
                    cells.append(Text("-"))
                    continue
                top = math.isclose(row[n], best[n], rel_tol=1e-9)  # equal infinities count as a tie
                cells.append(Text(format(row[n], fmt) + ("*" if top else " "), style="bold green" if top else ""))
            table.add_row(method, *cells)
        return table

    which = (f"{result.samples} held-out samples" if result.heldout else
             f"{result.samples} samples NOT held out from the search ({result.not_heldout or 'documents unknown'})")
    tables = [build(f"perplexity on {which}, lower is better", result.ppl, min, ",.3f")]
    if result.passkey:
        tables.append(build("passkey retrieval accuracy, higher is better", result.passkey, max, ".2f"))
    for variant, methods in result.needle.items():
        depths = sorted({d for rows in methods.values() for cells in rows.values() for d in cells})
        means = {m: {n: sum(cells.values()) / len(cells) for n, cells in rows.items()} for m, rows in methods.items()}
        tables.append(build(f"needle retrieval ({NEEDLE_VARIANTS.get(variant, variant)}), exact answers over "
                            f"{result.needle_trials} prompts x {len(depths)} depths ({', '.join(f'{d:.0%}' for d in depths)})"
                            ", higher is better", means, max, ".0%"))
    return tables


def read_eval(path: Path) -> EvalResult | None:
    """The eval.json at `path`; None when there is none. Length keys may be strings (JSON) or ints."""
    if not path.is_file():
        return None
    try:
        return EvalResult.from_json(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is damaged or not in the `longrope eval` format ({type(exc).__name__}); re-run `longrope eval`."
        ) from exc
