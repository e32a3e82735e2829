"""The model and corpus shipped inside the package, so LongRoPE runs with no GPU and no network.

Owns the registries of built-in names (`builtin:tiny`, `builtin:cpython`) and their paths on disk.
"""

from __future__ import annotations

from pathlib import Path

from longrope_search.errors import DataError, ModelError

ROOT = Path(__file__).resolve().parent
PREFIX = "builtin:"

# name -> directory (relative to ROOT) holding a Hugging Face model and its tokenizer
MODELS = {"tiny": "tiny-llama-cpython"}
# name -> JSON-lines file (relative to ROOT) with "text" and "source" fields
CORPORA = {"cpython": "corpus/cpython_heldout.jsonl.gz"}


def is_builtin(spec: str) -> bool:
    """True for specs written `builtin:<name>`; bare names are not claimed, they may be local paths."""
    return spec.startswith(PREFIX)


def _name(spec: str) -> str:
    return spec[len(PREFIX) :] if is_builtin(spec) else spec


def _resolve(spec: str, table: dict[str, str], error: type[Exception], kind: str) -> Path:
    name = _name(spec)
    if name not in table:
        valid = ", ".join(PREFIX + n for n in table)
        raise error(f"Unknown built-in {kind} {spec!r}; use one of: {valid}.")
    return ROOT / table[name]


def resolve_model(spec: str) -> Path:
    """Directory of the built-in model named by `builtin:tiny` or `tiny`."""
    return _resolve(spec, MODELS, ModelError, "model")


def resolve_corpus(spec: str) -> Path:
    """Path of the built-in corpus named by `builtin:cpython` or `cpython`."""
    return _resolve(spec, CORPORA, DataError, "corpus")
