"""The factor CSVs of the LongRoPE authors' code (microsoft/LongRoPE): one rescale factor per rotary pair, one per
line (`np.savetxt(..., delimiter='\\n')`, read back with `np.loadtxt(..., delimiter=',')`), or one row per layer.
A factor there divides a pair's frequency, as here. Searches done there move over (`search.init_factors: FILE.csv`),
and searches done here move back (`longrope export RUN --format longrope-csv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from longrope_search.errors import ConfigError, ExportError
from longrope_search.factors import FactorsFile, load_factors
from longrope_search.files import atomic_write_text, make_dirs

CSV_SUFFIX = ".csv"
LONG_CSV = "result_final.csv"  # the name the reference search gives its final factors (its scripts point there)
SHORT_CSV = "result_short.csv"  # the short set, when the run has one (the reference code keeps it in a second file)


@dataclass
class CsvExport:
    out: Path
    files: list[Path]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"out": str(self.out), "files": [str(p) for p in self.files], "notes": self.notes}


def is_csv(path: str | Path) -> bool:
    return str(path).lower().endswith(CSV_SUFFIX)


def read_csv(path: str | Path, pairs: int) -> list[float]:
    """The factors of a reference-code CSV for a model with `pairs` rotary pairs: one number per line or per comma,
    or one row per layer when every row is the same (this tool searches one set for all layers)."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the factor CSV {path} ({exc.__class__.__name__}); pass a readable text file.") from None
    try:
        rows = [[float(x) for x in line.split(",") if x.strip()] for line in lines]
    except ValueError:
        raise ConfigError(f"{path} holds something other than numbers; a factor CSV has one rescale factor per line "
                          "(or per comma).") from None
    values = [x for row in rows for x in row]
    if len(rows) > 1 and all(len(row) == pairs for row in rows):  # one row per layer
        if any(row != rows[0] for row in rows):
            raise ConfigError(f"{path} holds a different factor set per layer ({len(rows)} rows); this tool searches "
                              "one set for all layers: pass a single row.")
        values = rows[0]
    if len(values) != pairs:
        raise ConfigError(f"{path} holds {len(values)} factors but the model has {pairs} rotary pairs; pass the CSV "
                          "of a search on this model.")
    if not all(math.isfinite(x) and x > 0 for x in values):
        raise ConfigError(f"{path} holds factors that are not finite positive numbers; a rescale factor divides a "
                          "pair's frequency and must be > 0.")
    return values


def _csv_text(factors: list[float]) -> str:
    return "".join(f"{x:.18e}\n" for x in factors)  # np.savetxt's default format, one per line


def export_csv(source: str | Path, out: Path, force: bool = False) -> CsvExport:
    """The run's long factors (and short set) as reference-code CSVs in the folder `out`, with notes on what those
    files cannot hold (the attention factor and n_hat are settings of the reference code's RoPE there)."""
    ff: FactorsFile = load_factors(source)
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; with --format longrope-csv, --out is the folder the CSVs go in.")
    targets = [(LONG_CSV, ff.factors)] + ([(SHORT_CSV, ff.short_factors)] if ff.short_factors is not None else [])
    taken = [out / name for name, _ in targets if (out / name).exists()]
    if taken and not force:
        raise ExportError(f"{taken[0]} exists; choose another --out, or pass --force to overwrite the CSVs.")
    make_dirs(out)
    for name, factors in targets:
        atomic_write_text(out / name, _csv_text(list(factors)))
    stale = out / SHORT_CSV
    if ff.short_factors is None and stale.is_file() and not stale.is_symlink():
        stale.unlink()  # an earlier export's short set would read as this run's
    notes = [f"{LONG_CSV}: the factors for inputs past the {ff.rope.original_length}-token window (target "
             f"{ff.target_length} tokens); point the reference code's LONGROPE_RESCALE_FACTOR at it."]
    if ff.short_factors is not None:
        notes.append(f"{SHORT_CSV}: the short set, for inputs within the window.")
    notes.append(f"not in the CSVs: the attention factor (mscale {ff.mscale:.6g}; the reference code derives its own "
                 "from its magnitude scaling policy)" + (f" and n_hat {ff.n_hat} (its longrope_mixed start_token_idx)"
                                                         if ff.n_hat else "") + ".")
    return CsvExport(out, [out / name for name, _ in targets], notes)
