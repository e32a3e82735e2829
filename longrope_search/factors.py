"""The factors file: what a search produces and what `export`, `eval` and `runtime.apply` consume.

One JSON document per run (`runs/<name>/factors.json`), validated on load so a hand-edited or truncated
file fails with one clear line instead of a traceback deep inside export. Its records (how the factors were
found, the prior stage, the attention-factor fit) are dataclasses; the JSON keeps their field names.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers

from longrope_search import __version__
from longrope_search.errors import ExportError, GeometryError
from longrope_search.files import atomic_write_text, json_text
from longrope_search.rope import BASELINES, RopeSpec
from longrope_search.rundir import FACTORS_FILE, not_a_run

FORMAT = "longrope-factors/2"  # /2: the scores under "scores" (/1 kept them, the needle share too, under "ppl")
OLD_FORMAT = "longrope-factors/1"  # still read
LONGROPE = "longrope"  # FactorsFile.method of searched factors
STATIC_METHODS = tuple(BASELINES)  # pi, ntk, yarn: the baselines a factors file can also hold (eval, finetune --factors, export)


def number(value: Any) -> float:
    """A float written by `files.json_text`: null stands for a non-finite value (a PPL whose loss overflowed)."""
    return math.inf if value is None else float(value)


@dataclass(frozen=True)
class ScoreColumn:
    """One score a search reports for each method: its key in factors.json, its heading in tables, its format."""

    key: str
    label: str
    format: str

    def show(self, value: float | None) -> str:
        return "-" if value is None else f"{value:{self.format}}"


# The search's comparison, in table order: the fitness on the search, validation and held-out samples; the plain
# perplexity of the held-out windows when the fitness weighs needles; the share of held-out needles answered exactly.
SCORE_COLUMNS = (
    ScoreColumn("search", "search samples", ".4f"),
    ScoreColumn("validation", "validation samples", ".4f"),
    ScoreColumn("heldout", "held-out samples", ".4f"),
    ScoreColumn("heldout_ppl", "held-out perplexity", ".4f"),
    ScoreColumn("needle", "held-out needles found", ".0%"),
)
COLUMN = {c.key: c for c in SCORE_COLUMNS}


@dataclass(frozen=True)
class Scores:
    """One method's scores at the searched length (a PPL, lower is better; `needle` a share, higher is better);
    None where not measured."""

    search: float | None = None
    validation: float | None = None
    heldout: float | None = None
    heldout_ppl: float | None = None
    needle: float | None = None

    def get(self, key: str) -> float | None:
        return getattr(self, key)

    @property
    def measured(self) -> tuple[ScoreColumn, ...]:
        return tuple(c for c in SCORE_COLUMNS if self.get(c.key) is not None)

    @property
    def heldout_text(self) -> float | None:
        """The held-out text's plain perplexity: heldout_ppl when the fitness weighs needles, else heldout."""
        return self.heldout if self.heldout_ppl is None else self.heldout_ppl

    @property
    def ranking(self) -> float:
        """What runs are compared by: the held-out fitness when measured, else the search's; inf when neither is."""
        value = self.search if self.heldout is None else self.heldout
        return value if value is not None and math.isfinite(value) else math.inf

    def to_json(self) -> dict[str, float]:
        return {c.key: self.get(c.key) for c in self.measured}

    @classmethod
    def from_json(cls, doc: Any) -> "Scores":
        """Null read back as inf (a PPL whose loss overflowed); an unknown key is a malformed file (ValueError)."""
        return cls(**{str(k): number(v) for k, v in dict(doc).items()})


def measured_columns(rows: dict[str, Scores]) -> list[ScoreColumn]:
    """The columns a table of these rows shows: those measured for at least one row."""
    return [c for c in SCORE_COLUMNS if any(row.get(c.key) is not None for row in rows.values())]


@dataclass(frozen=True)
class PriorRecord:
    """The previous stage a progressive search built on."""

    source: str  # "run DIR" or "model NAME"
    target_length: int
    factors: list[float]
    mscale: float


@dataclass(frozen=True)
class PplPair:
    """The long set's PPL at its target with its own attention factor and with the fitted one."""

    long_mscale: float
    mscale: float


@dataclass(frozen=True)
class AttentionFit:
    """How a short search lowered the attention factor that runtimes apply to short and long inputs alike."""

    mscale: float  # the fitted value, used for both sets from now on
    long_mscale: float  # the long set's own
    length: int  # the long target the long set was scored at
    tolerance: float  # search.long_tolerance
    search: PplPair  # on the search samples
    checked: dict[str, float]  # every mscale scored -> the long set's PPL
    heldout: PplPair | None = None  # on held-out samples, once the search is done

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if self.heldout is None:
            del doc["heldout"]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "AttentionFit":
        heldout = doc.get("heldout")
        def pair(values: dict[str, Any]) -> PplPair:
            return PplPair(number(values["long_mscale"]), number(values["mscale"]))

        return cls(float(doc["mscale"]), float(doc["long_mscale"]), int(doc["length"]), float(doc["tolerance"]),
                   pair(doc["search"]), {str(k): number(v) for k, v in doc["checked"].items()},
                   None if heldout is None else pair(heldout))

    def describe(self) -> str:
        before, after = self.search.long_mscale, self.search.mscale
        return (f"attention factor {self.long_mscale:.4f} -> {self.mscale:.4f} for short inputs: the long set's PPL at "
                f"{self.length} tokens {before:.4f} -> {after:.4f} ({after / before - 1:+.2%}, tolerance "
                f"{self.tolerance:.0%}); {len(self.checked)} values scored")


@dataclass(frozen=True)
class SearchRecord:
    """How the factors were found: budget spent, settings, where the winner came from."""

    generations: int = 0
    evaluations: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # the config's search section as it ran
    samples: int = 0  # data.samples
    best_key: str = ""
    best_origin: str = ""  # pi | ntk | yarn | init | mutation | crossover
    best_generation: int = 0
    scored_length: int | None = None  # the length candidates were scored at (the short window for --short)
    mode: str = "long"  # long | short
    forward_tokens: int = 0  # tokens every evaluation ran through the model: the search's work
    seconds: float = 0.0  # time spent scoring (wall clock; a resumed run adds its runs' times)
    rejected: int = 0  # candidates stopped early (search.race_margin, search.screen_windows)
    validation: list[list[Any]] = field(default_factory=list)  # [generation, best-so-far key, validation PPL]
    selected_by: str = "search"  # search: the best search score; validation: the best of the top on validation
    stopped_early: int | None = None  # the generation the search stopped at when validation stopped improving
    saved_evaluations: int = 0  # evaluations of the budget that early stopping left out
    prior: PriorRecord | None = None
    attention_fit: AttentionFit | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("prior", "attention_fit")}
        if self.prior is not None:
            doc["prior"] = asdict(self.prior)
        if self.attention_fit is not None:
            doc["attention_fit"] = self.attention_fit.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "SearchRecord":
        known = {f.name for f in fields(cls)} - {"prior", "attention_fit"}
        plain = {k: v for k, v in doc.items() if k in known}
        prior = doc.get("prior")
        fit = doc.get("attention_fit")
        return cls(**plain, prior=None if prior is None else PriorRecord(**prior),
                   attention_fit=None if fit is None else AttentionFit.from_json(fit))


@dataclass
class FactorsFile:
    model: str  # what the search loaded: local path, hub id or builtin:NAME
    rope: RopeSpec
    target_length: int
    factors: list[float]  # long factors, one per rotary pair (composed over progressive stages)
    n_hat: int = 0
    mscale: float = 1.0
    short_factors: list[float] | None = None  # used when the sequence fits the original window
    scores: Scores = field(default_factory=Scores)  # the factors'
    baselines: dict[str, Scores] = field(default_factory=dict)  # each reference method's (pi, yarn, none, prior, ...)
    search: SearchRecord = field(default_factory=SearchRecord)
    versions: dict[str, str] = field(default_factory=dict)
    # longrope: searched factors (the long set past the original window, the short set inside it); yarn, pi or ntk: a
    # baseline RoPE at target_length as transformers runs it (one set at every length), see methods.method_file
    method: str = LONGROPE

    @property
    def scale(self) -> float:
        return self.target_length / self.rope.original_length

    @property
    def scored_length(self) -> int:
        """The length the search scored at: the target, or the short window for a short readjustment run."""
        return int(self.search.scored_length or self.target_length)

    @property
    def short_or_ones(self) -> list[float]:
        """The short set runtimes use inside the original window (all 1.0 when none was searched)."""
        return self.short_factors if self.short_factors is not None else [1.0] * len(self.factors)

    def to_json(self) -> dict[str, Any]:
        doc = {"format": FORMAT, **asdict(self), "scale": self.scale}
        doc["rope"] = asdict(self.rope)
        doc["scores"] = self.scores.to_json()
        doc["baselines"] = {name: row.to_json() for name, row in self.baselines.items()}
        doc["search"] = self.search.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str = "factors file") -> "FactorsFile":
        if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, OLD_FORMAT):
            raise ExportError(f"{source} is not a longrope factors file (expected \"format\": \"{FORMAT}\").")
        scores = doc.get("scores", {}) if doc["format"] == FORMAT else doc.get("ppl", {})
        try:
            rope = RopeSpec(**doc["rope"])
            out = cls(
                model=str(doc["model"]), rope=rope, target_length=int(doc["target_length"]),
                factors=[float(x) for x in doc["factors"]], n_hat=int(doc.get("n_hat", 0)),
                mscale=float(doc.get("mscale", 1.0)),
                short_factors=None if doc.get("short_factors") is None else [float(x) for x in doc["short_factors"]],
                scores=Scores.from_json(scores),
                baselines={str(k): Scores.from_json(v) for k, v in dict(doc.get("baselines", {})).items()},
                search=SearchRecord.from_json(dict(doc.get("search", {}))), versions=dict(doc.get("versions", {})),
                method=str(doc.get("method", LONGROPE)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportError(f"{source} is missing or has a malformed field ({exc}); re-run the search or fix it.") from exc
        out.validate(source)
        return out

    def validate(self, source: str = "factors file") -> None:
        """Factor count matches the rotary geometry; every factor finite and positive."""
        for name, values in (("factors", self.factors), ("short_factors", self.short_factors)):
            if values is None:
                continue
            if len(values) != self.rope.num_factors:
                raise ExportError(
                    f"{source}: {name} has {len(values)} values but rotary_dim {self.rope.rotary_dim} needs "
                    f"{self.rope.num_factors}; the file does not belong to this model geometry."
                )
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise ExportError(f"{source}: {name} contains non-finite or non-positive values; re-run the search.")
        if self.n_hat < 0 or not math.isfinite(self.mscale) or self.mscale <= 0:
            raise ExportError(f"{source}: n_hat must be >= 0 and mscale finite and positive.")
        if self.method not in (LONGROPE, *STATIC_METHODS):
            raise ExportError(f"{source}: method {self.method!r} is not one of {', '.join((LONGROPE, *STATIC_METHODS))}.")

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json_text(self.to_json(), indent=2) + "\n")  # inf as null, read back as inf


def software_versions() -> dict[str, str]:
    """What produced a factors file: longrope, torch, transformers and Python versions."""
    return {"longrope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_geometry(rope: RopeSpec, spec: RopeSpec, what: str, model: str, fix: str) -> None:
    """Factors searched for `rope` run on a model of geometry `spec`: the same rotary pairs and rope_theta (the window
    may differ: model.original_length overrides it). `what` names the factors, `model` the model, `fix` the remedy."""
    if rope.rotary_dim != spec.rotary_dim:
        raise GeometryError(f"{what} has {rope.num_factors} factors but {model} has {spec.num_factors} rotary pairs "
                            f"(the factors are for rotary_dim {rope.rotary_dim} and the model has rotary_dim "
                            f"{spec.rotary_dim}); {fix}")
    if rope.base != spec.base:
        raise GeometryError(f"{what} was searched for rope_theta {rope.base:g} but {model} has rope_theta "
                            f"{spec.base:g}; {fix}")


def factors_path(path: str | Path) -> Path:
    """The factors.json a run directory holds, or the file itself."""
    path = Path(path)
    return path / FACTORS_FILE if path.is_dir() else path


def load_factors(path: str | Path) -> FactorsFile:
    """A factors.json, or a run directory containing one."""
    path = Path(path)
    if path.is_dir() and (message := not_a_run(path)):
        raise ExportError(message)
    path = factors_path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist; pass a run directory or the factors.json a search wrote.")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc.__class__.__name__}); the file is damaged.") from exc
    return FactorsFile.from_json(doc, source=str(path))
