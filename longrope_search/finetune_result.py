"""A fine-tune's result, DIR/finetune.json: what was trained, on what, and how the written model checked out. It is
written last, so a folder holding it is a finished fine-tune.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from longrope_search.errors import CheckpointError
from longrope_search.files import atomic_write_text, json_text
from longrope_search.rundir import FINETUNE_FILE


@dataclass
class FinetuneResult:
    """DIR/finetune.json: what was trained, on what, and how the written model checked out."""

    run: str  # the search run whose factors the model trained with
    model: str  # the model trained (the run's, or model.name)
    out: str
    method: str  # full | lora
    target_length: int  # the factors' target
    length: int  # tokens of a long row
    short_length: int  # tokens of a short row
    steps: int
    tokens: int  # trained tokens (every row of every step)
    short_share: float  # the share of blocks that were short rows
    long_rows_share: float  # of the long rows, the share whose longest document ran the long factors
    losses: list[float] = field(default_factory=list)  # the training loss of each step
    seconds: float = 0.0  # training time (a resumed fine-tune adds its runs' times)
    max_abs_diff: float | None = None  # export's reload check: long factors, at verify_length tokens
    short_max_abs_diff: float | None = None  # ... and inside the original window
    verify_length: int | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: str = FINETUNE_FILE) -> "FinetuneResult":
        try:
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in doc.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{source} is missing a field ({exc}); the file is damaged.") from None

    def save(self, path: Path) -> None:
        atomic_write_text(path, json_text(self.to_json(), indent=2) + "\n")


def load_result(folder: Path) -> FinetuneResult:
    path = Path(folder) / FINETUNE_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({type(exc).__name__}); the fine-tune's result is missing or "
                              "damaged.") from None
    return FinetuneResult.from_json(doc, str(path))


def is_trained(folder: Path) -> bool:
    return (Path(folder) / FINETUNE_FILE).is_file()
