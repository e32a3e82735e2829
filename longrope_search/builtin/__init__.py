"""The model and corpora shipped inside the package, so LongRoPE runs with no GPU and no network.

Owns the registries of built-in names (`builtin:tiny`, `builtin:tiny-qwen2`, `builtin:cpython`,
`builtin:cpython-train`) and their paths on disk, and the rule that splits the standard library into the tiny
models' training files and the held-out ones.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import sysconfig
from pathlib import Path

from longrope_search.errors import DataError, ModelError
from longrope_search.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parent
PREFIX = "builtin:"

# name -> directory (relative to ROOT) holding a Hugging Face model and its tokenizer
MODELS = {"tiny": "tiny-llama-cpython", "tiny-qwen2": "tiny-qwen2-cpython"}
# name -> JSON-lines file (relative to ROOT) with "text" and "source" fields
CORPORA = {"cpython": "corpus/cpython_heldout.jsonl.gz"}
# name -> what a corpus generated on first use holds (written into the cache directory, never shipped)
GENERATED = {"cpython-train": "the running interpreter's standard-library files outside the held-out split"}

# Share of the standard library's files (by a hash of their path) kept out of the tiny model's training; builtin:cpython
# is cut from them, builtin:cpython-train is all the others.
HELDOUT_PERCENT = 15


def is_heldout(rel: str, percent: int = HELDOUT_PERCENT) -> bool:
    """True for a standard-library file (its path relative to the stdlib, posix form) in the held-out split.

    A hash of the path, not of the content, so the split is the same on every Python version; the one rule behind
    scripts/train_tiny_model.py's training data, builtin:cpython and builtin:cpython-train.
    """
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100 < percent


def is_builtin(spec: str) -> bool:
    """True for specs written `builtin:<name>`; bare names are not claimed, they may be local paths."""
    return spec.startswith(PREFIX)


def _name(spec: str) -> str:
    return spec[len(PREFIX) :] if is_builtin(spec) else spec


def _resolve(spec: str, table: dict[str, str], error: type[Exception], kind: str) -> Path:
    name = _name(spec)
    if name not in table:
        valid = ", ".join(PREFIX + n for n in (*table, *(GENERATED if table is CORPORA else ())))
        raise error(f"Unknown built-in {kind} {spec!r}; use one of: {valid}.")
    return ROOT / table[name]


def resolve_model(spec: str) -> Path:
    """Directory of the built-in model named by `builtin:tiny` or `tiny`."""
    return _resolve(spec, MODELS, ModelError, "model")


def resolve_corpus(spec: str) -> Path:
    """Path of the built-in corpus named by `builtin:cpython` or `cpython`."""
    return _resolve(spec, CORPORA, DataError, "corpus")


def is_generated(spec: str) -> bool:
    """True for a built-in corpus made on first use (`builtin:cpython-train`)."""
    return _name(spec) in GENERATED


def stdlib_training_files(stdlib: Path, percent: int = HELDOUT_PERCENT) -> list[str]:
    """Sorted relative paths of the stdlib's .py files outside the held-out split (no site-packages, no generated
    _sysconfigdata; test packages included, as the tiny model was trained)."""
    rels = []
    for path in stdlib.rglob("*.py"):
        parts = path.relative_to(stdlib).parts
        if parts[0] == "site-packages" or parts[0].startswith("_sysconfigdata"):
            continue
        rel = "/".join(parts)
        if not is_heldout(rel, percent):
            rels.append(rel)
    return sorted(rels)


def generated_corpus(spec: str, cache_dir: Path) -> Path:
    """The file of a generated corpus, written into `cache_dir` on first use (the same bytes every time for one
    interpreter: files in path order, a gzip header without name or time).

    builtin:cpython-train holds the running interpreter's standard-library files that are not held out: the tiny
    model's own training distribution, and never a document of builtin:cpython, which searches and evals score on.
    """
    if not is_generated(spec):
        raise DataError(f"Unknown generated corpus {spec!r}; use one of: {', '.join(PREFIX + n for n in GENERATED)}.")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = Path(cache_dir) / "builtin" / f"{_name(spec)}-{platform.python_version()}.jsonl.gz"
    if path.is_file():
        return path
    lines = []
    for rel in stdlib_training_files(stdlib):
        try:
            text = (stdlib / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        if text.strip():
            lines.append(json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n")
    if not lines:
        raise DataError(f"{spec} found no standard-library files under {stdlib}; this Python installation has no "
                        "stdlib sources, so use another corpus for finetune.source.")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write("".join(lines).encode("utf-8"))
    atomic_write_bytes(path, buffer.getvalue())
    return path
