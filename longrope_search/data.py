"""Seeded sampling of long token windows from a corpus (`corpus.py` reads it), and the fine-tune's token stream.

Samples are cached on disk under a key of tokenizer, corpus identity and sampling settings, so a
repeated or resumed search never tokenises again; their fingerprint ties checkpoints to the exact ids. The token
stream is cached the same way and read back in pieces.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from longrope_search.corpus import CorpusSpec, corpus_identity, default_cache_dir, describe, load_texts
from longrope_search.errors import ConfigError, DataError, first_line

CACHE_FORMAT = 1  # bump when the sampling rule changes, so old cache files are never reused
_BLOCK_CHARS = 4_000_000  # grow the tokenising block while a block holds fewer characters than this


@dataclass
class Samples:
    """Token windows for the search and a held-out set drawn from other documents."""

    search: torch.Tensor  # (n, L) int64
    heldout: torch.Tensor  # (m, L) int64
    length: int
    fingerprint: str  # hash of the search ids: the only tokens a search score depends on
    search_docs: list[int]  # corpus row indices that fed each set, in sampling order
    heldout_docs: list[int]


# --- corpus sources -----------------------------------------------------------------------------------


# --- cache identity -----------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides token ids: the serialised fast tokenizer (or vocab) and bos/eos."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{type(tokenizer).__name__}|{tokenizer.bos_token_id}|{tokenizer.eos_token_id}"
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir / "samples" / f"{digest[:32]}.pt"


def ids_fingerprint(ids: torch.Tensor) -> str:
    """Short sha256 of a (n, L) id tensor, shape included."""
    array = np.ascontiguousarray(ids.numpy().astype("<i8"))
    return hashlib.sha256(str(tuple(ids.shape)).encode() + array.tobytes()).hexdigest()[:16]


def _read_cache(path: Path, n_search: int, n_heldout: int, length: int) -> Samples | None:
    """The cached samples, or None when the file is missing, unreadable or does not match."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        samples = Samples(
            search=blob["search"], heldout=blob["heldout"], length=int(blob["length"]),
            fingerprint=str(blob["fingerprint"]), search_docs=list(blob["search_docs"]),
            heldout_docs=list(blob["heldout_docs"]),
        )
    except Exception:  # any damage (truncated zip, pickle error, missing key) means: rebuild
        return None
    shapes_ok = samples.search.shape == (n_search, length) and samples.heldout.shape == (n_heldout, length)
    if not shapes_ok or samples.length != length or ids_fingerprint(samples.search) != samples.fingerprint:
        return None
    return samples


def _write_cache(path: Path, samples: Samples) -> None:
    blob = {
        "format": CACHE_FORMAT, "search": samples.search, "heldout": samples.heldout, "length": samples.length,
        "fingerprint": samples.fingerprint, "search_docs": samples.search_docs, "heldout_docs": samples.heldout_docs,
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise DataError(
            f"cannot write the sample cache in {path.parent} ({first_line(exc)}); "
            "set LONGROPE_CACHE (or cache_dir) to a writable directory."
        ) from exc


# --- sampling -----------------------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than model_max_length are the point here, not a mistake
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def _documents(ds: Any, tokenizer: Any, order: np.ndarray) -> Iterator[tuple[int, list[int]]]:
    """(row, token ids) in `order`, tokenised lazily in growing blocks so a huge corpus stops early."""
    pos, block = 0, 16
    while pos < len(order):
        rows = [int(r) for r in order[pos : pos + block]]
        pos += len(rows)
        texts = [t or "" for t in ds[rows]["text"]]
        yield from zip(rows, _encode(tokenizer, texts))
        if sum(len(t) for t in texts) < _BLOCK_CHARS:
            block = min(block * 2, 4096)


def _pick_documents(
    docs: Iterator[tuple[int, list[int]]], take: int, n_search: int, n_heldout: int, spec: CorpusSpec
) -> tuple[list[int], list[list[int]]]:
    """The first n_search + n_heldout documents with >= take tokens, each cut to its first `take` tokens."""
    need = n_search + n_heldout
    rows: list[int] = []
    windows: list[list[int]] = []
    qualifying, longest = 0, 0
    for row, ids in docs:
        longest = max(longest, len(ids))
        if len(ids) >= take:
            qualifying += 1
            rows.append(row)
            windows.append(ids[:take])
            if qualifying == need:
                return rows, windows
    raise DataError(
        f"{describe(spec)} has {qualifying} documents of at least {take} tokens but {need} are needed "
        f"({n_search} search + {n_heldout} held-out), and its longest document has {longest} tokens; "
        "use another split or corpus, set concatenate: true, choose a shorter target length, or ask for fewer samples."
    )


def _cut_stream(
    docs: Iterator[tuple[int, list[int]]], take: int, counts: tuple[int, int], sep: list[int], spec: CorpusSpec
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per set: documents joined with `sep` and cut into windows of `take`; a new set starts on a new document."""
    set_rows: list[list[int]] = []
    set_windows: list[list[list[int]]] = []
    total = 0
    for count in counts:
        stream: list[int] = []
        rows: list[int] = []
        while len(stream) < count * take:
            row, ids = next(docs, (None, None))
            if row is None:
                made = sum(len(w) for w in set_windows) + len(stream) // take
                raise DataError(
                    f"{describe(spec)} yields only {made} windows of {take} tokens when concatenated but "
                    f"{sum(counts)} are needed ({counts[0]} search + {counts[1]} held-out) from its "
                    f"{total + len(stream)} tokens; use a larger corpus or split, a shorter target length, or fewer samples."
                )
            if ids:
                rows.append(row)
                stream.extend(ids + sep)
        # the rest of the last document is dropped so the next set shares no document with this one
        total += len(stream)
        set_rows.append(rows)
        set_windows.append([stream[i * take : (i + 1) * take] for i in range(count)])
    return set_rows, set_windows


def _sample(
    tokenizer: Any, spec: CorpusSpec, length: int, n_search: int, n_heldout: int, seed: int
) -> Samples:
    ds = load_texts(spec)
    order = np.random.default_rng(seed).permutation(len(ds))  # (N,) document order for this seed
    docs = _documents(ds, tokenizer, order)
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None else []
    take = length - len(prefix)
    if spec.concatenate:
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        (search_rows, heldout_rows), (search_w, heldout_w) = _cut_stream(
            docs, take, (n_search, n_heldout), sep, spec
        )
    else:
        rows, windows = _pick_documents(docs, take, n_search, n_heldout, spec)
        search_rows, heldout_rows = rows[:n_search], rows[n_search:]
        search_w, heldout_w = windows[:n_search], windows[n_search:]

    def stack(windows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([prefix + w for w in windows], dtype=torch.long).reshape(len(windows), length)

    search = stack(search_w)  # (n, L)
    return Samples(
        search=search, heldout=stack(heldout_w), length=length, fingerprint=ids_fingerprint(search),
        search_docs=search_rows, heldout_docs=heldout_rows,
    )


def build_samples(
    tokenizer: Any,
    spec: CorpusSpec,
    length: int,
    n_search: int,
    n_heldout: int,
    seed: int,
    cache_dir: str | Path | None = None,
) -> Samples:
    """Seeded windows of `length` tokens: [bos] + the first length-1 tokens of a document.

    Documents are shuffled with the seed; the first n_search with at least length-1 tokens form the
    search set and the next n_heldout the held-out set, so the two never share a document. A tokenizer
    without a bos token gives the first `length` tokens instead. With `spec.concatenate`, documents are
    joined with EOS into one stream per set and cut into consecutive windows. The result is cached
    under `cache_dir` (default $LONGROPE_CACHE or ~/.cache/longrope).
    """
    if length < 2 or n_search < 1 or n_heldout < 0:
        raise ConfigError(
            f"cannot sample {n_search} search and {n_heldout} held-out windows of {length} tokens; "
            "use length >= 2, n_search >= 1 and n_heldout >= 0."
        )
    key = {
        "format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "corpus": corpus_identity(spec),
        "length": length, "n_search": n_search, "n_heldout": n_heldout, "seed": seed,
    }
    path = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    cached = _read_cache(path, n_search, n_heldout, length)
    if cached is not None:
        return cached
    samples = _sample(tokenizer, spec, length, n_search, n_heldout, seed)
    _write_cache(path, samples)
    return samples


# --- training streams ---------------------------------------------------------------------------------

STREAM_FORMAT = 1  # bump when the stream layout changes
_FLUSH_TOKENS = 1 << 20  # write the stream to disk in pieces of about this many tokens


@dataclass
class TokenStream:
    """A training corpus as one stream of token ids: each document bookended, [bos] + its tokens + [eos] (the LongRoPE
    paper's fine-tuning segments), documents in a seeded order. Memory-mapped from the cache, so a corpus larger than
    memory streams from disk."""

    ids: np.ndarray  # (N,) int32
    bounds: np.ndarray  # (D+1,) int64: document d is ids[bounds[d]:bounds[d+1]]
    corpus_documents: int  # rows of the corpus

    @property
    def documents(self) -> int:
        return len(self.bounds) - 1

    @property
    def longest(self) -> int:
        """Tokens of the longest document, bookends included."""
        return int(np.diff(self.bounds).max()) if self.documents else 0


def _stream_paths(cache_dir: Path, key: dict) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_dir / "streams"
    return folder / f"{digest}.ids.bin", folder / f"{digest}.bounds.npy"


def _read_stream(ids_path: Path, bounds_path: Path) -> TokenStream | None:
    """The cached stream, or None when it is missing or damaged (the bounds file, written last, names its size)."""
    try:
        blob = np.load(bounds_path, allow_pickle=False)
        bounds, rows = blob[:-1], int(blob[-1])
        if ids_path.stat().st_size != 4 * int(bounds[-1]):
            return None
        ids = np.memmap(ids_path, dtype="<i4", mode="r") if bounds[-1] else np.zeros(0, dtype="<i4")
    except (OSError, ValueError, IndexError):
        return None
    return TokenStream(ids, bounds, rows)


def _temp_in(folder: Path, suffix: str) -> tuple[Any, str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=folder, suffix=suffix, delete=False)
    except OSError as exc:
        raise DataError(f"cannot write the token stream in {folder} ({first_line(exc)}); set LONGROPE_CACHE (or "
                        "cache_dir) to a writable directory.") from exc
    return handle, handle.name


def token_stream(tokenizer: Any, spec: CorpusSpec, tokens: int, seed: int = 0,
                 cache_dir: str | Path | None = None) -> TokenStream:
    """At least `tokens` tokens of bookended documents in `seed`'s order (whole documents: the last one may overshoot).

    A corpus whose documents hold fewer tokens in all is refused with one line naming both counts. Cached under
    `cache_dir` (default $LONGROPE_CACHE or ~/.cache/longrope), keyed by tokenizer, corpus identity, seed and count.
    """
    if tokens < 1:
        raise ConfigError(f"a training stream of {tokens} tokens is empty; ask for at least 1 token.")
    key = {"format": STREAM_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "corpus": corpus_identity(spec),
           "tokens": tokens, "seed": seed}
    ids_path, bounds_path = _stream_paths(Path(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    cached = _read_stream(ids_path, bounds_path) if bounds_path.is_file() else None
    if cached is not None:
        return cached
    ds = load_texts(spec)
    order = np.random.default_rng(seed).permutation(len(ds))  # (D,) document order for this seed
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bounds, pending, written = [0], [], 0
    handle, tmp = _temp_in(ids_path.parent, ".tmp")
    try:
        with handle:
            for _, ids in _documents(ds, tokenizer, order):
                if not ids:
                    continue
                pending.append(np.asarray(head + ids + tail, dtype="<i4"))
                bounds.append(bounds[-1] + len(pending[-1]))
                if bounds[-1] - written >= _FLUSH_TOKENS or bounds[-1] >= tokens:
                    handle.write(np.concatenate(pending).tobytes())
                    written, pending = bounds[-1], []
                if bounds[-1] >= tokens:
                    break
            if bounds[-1] < tokens:
                raise DataError(
                    f"{describe(spec)} holds {bounds[-1]} tokens in {len(bounds) - 1} documents (with bos/eos), but "
                    f"the fine-tune needs {tokens} (steps x batch_tokens); use a larger corpus or split, or lower "
                    "finetune.steps or finetune.batch_tokens."
                )
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, ids_path)
        bounds_handle, bounds_tmp = _temp_in(bounds_path.parent, ".npy.tmp")
        with bounds_handle:
            np.save(bounds_handle, np.asarray(bounds + [len(ds)], dtype=np.int64))  # the corpus rows ride last
            bounds_handle.flush()
            os.fsync(bounds_handle.fileno())
        os.replace(bounds_tmp, bounds_path)  # written last: a complete stream is one whose bounds exist
    except OSError as exc:
        raise DataError(f"cannot write the token stream in {ids_path.parent} ({first_line(exc)}); set LONGROPE_CACHE "
                        "(or cache_dir) to a writable directory.") from exc
    finally:
        for leftover in (tmp, locals().get("bounds_tmp")):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)
    stream = _read_stream(ids_path, bounds_path)
    if stream is None:
        raise DataError(f"the token stream just written to {ids_path} cannot be read back; check the disk.")
    return stream
