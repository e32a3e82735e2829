"""A search's identity: what a resume must find again (the model and its weights, the windows and their needles,
the tokenizer and everything that decides a score), built in one place and compared field by field.

The checkpoint and log.jsonl's start line keep it as JSON (`RunIdentity.to_json`); optional fields are written
only when set, so the identity of a run from an earlier version reads back equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from longrope_search import data
from longrope_search.errors import LongRopeError
from longrope_search.model import resolve_model_path
from longrope_search.sample_sets import SampleSets
from longrope_search.search_setup import SearchSetup

# Fields added after runs were already on disk: a checkpoint without one is compared on the others only.
ADDED = ("weights",)


@dataclass(frozen=True)
class RunIdentity:
    # every field optional, as the checkpoints of earlier versions may lack any (a missing one then differs)
    model: str | None = None  # name@hash of its config: another checkpoint under the same path is caught
    target_length: int | None = None
    original_length: int | None = None
    rotary_dim: int | None = None
    rope_base: float | None = None
    data: str | None = None  # the search windows' fingerprint
    tokenizer: str | None = None
    space: list[Any] | None = None  # [max_factor, min_factor, step, monotonic, n_hat choices]
    mscale: Any = None  # the attention factor, or ["fit", the prior's, long_tolerance] for a short search that fits it
    seeds: list[str] | None = None
    prior: list[float] | None = None  # always written, None for a first stage
    short: bool | None = None
    # only when they apply (so the identity of runs that never had them stays the same):
    weights: dict[str, str] | None = None  # weight file -> "SIZE:HASH", when the files are found
    critical_dim: int | None = None
    mscale_search: list[Any] | None = None  # [lowest, highest, start] of a searched attention factor
    fitness: str | None = None  # needle or joint (ppl is left out)
    needles_per_window: int | None = None
    needle_weight: float | None = None  # the joint fitness's
    needles: str | None = None  # the search windows with their needles
    validation: str | None = None  # the validation windows
    long_data: str | None = None  # a short search's long-set windows (the attention fit)
    other: dict[str, Any] = field(default_factory=dict)  # fields of a checkpoint this version does not know

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        return {k: v for k, v in doc.items() if v is not None or k == "prior"} | self.other

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RunIdentity":
        known = {f.name for f in fields(cls)} - {"other"}
        return cls(**{k: v for k, v in doc.items() if k in known},
                   other={k: v for k, v in doc.items() if k not in known})

    def differences(self, saved: "RunIdentity") -> list[str]:
        """The fields that differ from the identity a checkpoint saved, with both values (for a mapping, the
        entries that differ); a field added since the checkpoint was written is not compared."""
        before_doc, now_doc = saved.to_json(), self.to_json()
        out = []
        for key in sorted(set(before_doc) | set(now_doc)):
            before, now = before_doc.get(key), now_doc.get(key)
            if before == now or (key in ADDED and key not in before_doc):
                continue
            if isinstance(before, dict) and isinstance(now, dict):
                out += [f"{key} {name}: checkpoint has {before.get(name)!r}, now {now.get(name)!r}"
                        for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
            else:
                out.append(f"{key}: checkpoint has {before!r}, now {now!r}")
        return out


def run_identity(setup: SearchSetup, model_config: Any, tokenizer: Any, sets: SampleSets,
                 long_samples: data.Samples | None = None) -> RunIdentity:
    """The identity of a search with this setup on these samples (and a short search's long-set samples)."""
    space, s = setup.space, setup.config.search
    needle = s.fitness != "ppl"
    return RunIdentity(
        model=model_identity(setup.config.model.name, model_config),
        target_length=setup.target_length, original_length=setup.spec.original_length,
        rotary_dim=setup.spec.rotary_dim, rope_base=setup.spec.base,
        data=sets.windows.fingerprint, tokenizer=data.tokenizer_fingerprint(tokenizer),
        space=[space.max_factor, space.min_factor, space.step, space.monotonic, list(space.n_hat_choices)],
        mscale=["fit", setup.prior.mscale, s.long_tolerance] if setup.fits_mscale else setup.mscale,
        seeds=sorted(setup.seeds), prior=None if setup.prior is None else [float(x) for x in setup.prior.factors],
        short=setup.short, weights=weights_identity(setup.config.model.name), critical_dim=setup.critical_dim,
        mscale_search=([space.mscale_choices[0], space.mscale_choices[-1], space.mscale_start]
                       if space.mscale_choices else None),
        fitness=s.fitness if needle else None, needles_per_window=s.needles if needle else None,
        needle_weight=s.needle_weight if s.fitness == "joint" else None,
        needles=data.ids_fingerprint(sets.search.ids) if needle else None,
        validation=None if sets.validation is None else data.ids_fingerprint(sets.validation.ids),
        long_data=None if long_samples is None else long_samples.fingerprint,
    )


def model_identity(name: str, model_config: Any) -> str:
    """The model name plus a hash of its config: a different checkpoint under the same path is caught."""
    digest = hashlib.sha256(model_config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return f"{name}@{digest}"


WEIGHT_SUFFIXES = (".safetensors", ".bin")  # the files transformers loads weights from
SAMPLE_BYTES = 64 * 1024  # one read of a weight file's fingerprint
SAMPLES_PER_FILE = 64  # evenly spread, first and last bytes included: 4 MiB read per file, whatever its size


def file_fingerprint(path: Path) -> str:
    """"SIZE:HASH" of a file from a strided sample of its bytes (all of them up to 4 MiB): new weights written over
    old ones change every tensor, so any sample catches them, at the cost of a few reads instead of the whole file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= SAMPLE_BYTES * SAMPLES_PER_FILE:
            digest.update(f.read())
        else:
            last = size - SAMPLE_BYTES
            for i in range(SAMPLES_PER_FILE):
                f.seek(last * i // (SAMPLES_PER_FILE - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return f"{size}:{digest.hexdigest()[:16]}"


def _weights_folder(name: str) -> Path | None:
    """Where the model's weight files are: its local directory, or the hub cache's snapshot of a hub id."""
    try:
        local = Path(resolve_model_path(name))
    except LongRopeError:  # no folder, no weights identity: the config hash still applies
        return None
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or not a hub id)
        return None


def weights_identity(name: str) -> dict[str, str] | None:
    """Weight file name -> "SIZE:HASH" (`file_fingerprint`), so weights replaced at the same path are noticed; None
    when the files cannot be found (the model's config hash is then the only check)."""
    folder = _weights_folder(name)
    if folder is None:
        return None
    files = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())
    try:
        return {p.name: file_fingerprint(p) for p in files} or None
    except OSError:
        return None
