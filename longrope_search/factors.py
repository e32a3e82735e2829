"""The factors file: what a search produces and what `export`, `eval` and `runtime.apply` consume.

One JSON document per run (`runs/<name>/factors.json`), validated on load so a hand-edited or truncated
file fails with one clear line instead of a traceback deep inside export.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longrope_search.errors import ExportError
from longrope_search.files import atomic_write_text
from longrope_search.rope import RopeSpec

FORMAT = "longrope-factors/1"


@dataclass
class FactorsFile:
    model: str  # what the search loaded: local path, hub id or builtin:NAME
    rope: RopeSpec
    target_length: int
    factors: list[float]  # long factors, one per rotary pair (composed over progressive stages)
    n_hat: int = 0
    mscale: float = 1.0
    short_factors: list[float] | None = None  # used when the sequence fits the original window
    ppl: dict[str, float] = field(default_factory=dict)  # {"search": .., "heldout": ..}
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> {"search": .., "heldout": ..}
    search: dict[str, Any] = field(default_factory=dict)  # settings, evaluations, generations, seconds
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.target_length / self.rope.original_length

    @property
    def scored_length(self) -> int:
        """The length the search scored at: the target, or the short window for a short readjustment run."""
        return int(self.search.get("scored_length", self.target_length))

    @property
    def short_or_ones(self) -> list[float]:
        """The short set runtimes use inside the original window (all 1.0 when none was searched)."""
        return self.short_factors if self.short_factors is not None else [1.0] * len(self.factors)

    def to_json(self) -> dict[str, Any]:
        doc = {"format": FORMAT, **asdict(self), "scale": self.scale}
        doc["rope"] = asdict(self.rope)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str = "factors file") -> "FactorsFile":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ExportError(f"{source} is not a longrope factors file (expected \"format\": \"{FORMAT}\").")
        try:
            rope = RopeSpec(**doc["rope"])
            out = cls(
                model=str(doc["model"]), rope=rope, target_length=int(doc["target_length"]),
                factors=[float(x) for x in doc["factors"]], n_hat=int(doc.get("n_hat", 0)),
                mscale=float(doc.get("mscale", 1.0)),
                short_factors=None if doc.get("short_factors") is None else [float(x) for x in doc["short_factors"]],
                ppl=dict(doc.get("ppl", {})), baselines=dict(doc.get("baselines", {})),
                search=dict(doc.get("search", {})), versions=dict(doc.get("versions", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
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

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")


def load_factors(path: str | Path) -> FactorsFile:
    """A factors.json, or a run directory containing one."""
    path = Path(path)
    if path.is_dir():
        from longrope_search.stages import not_a_run

        if message := not_a_run(path):
            raise ExportError(message)
        path = path / "factors.json"
    if not path.is_file():
        raise ExportError(f"{path} does not exist; pass a run directory or the factors.json a search wrote.")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc.__class__.__name__}); the file is damaged.") from exc
    return FactorsFile.from_json(doc, source=str(path))
