"""Where a corpus's documents come from: the embedded corpora, local files (text, JSON lines, parquet, compressed or
not; a file, folder or glob) and hub datasets, read as one "text" column; which sources name the same documents,
and what names a corpus without reading it.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from longrope_search import builtin
from longrope_search.errors import DataError, first_line
from longrope_search.files import unreadable

# suffix (after any compression suffix) -> `datasets` packaged builder
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


COMPRESSIONS = (".gz", ".bz2", ".xz")


@dataclass(frozen=True)
class CorpusSpec:
    """Where the text comes from: "builtin:NAME", "hub:NAME", or a local file, directory or glob."""

    source: str
    hub_config: str | None = None
    revision: str | None = None  # hub only: the dataset commit, tag or branch (None: the newest)
    split: str = "validation"  # hub only
    text_field: str = "text"  # json / jsonl / parquet / hub; a .txt file is one document
    concatenate: bool = False  # join documents with EOS and cut windows (corpora of short documents)

    @classmethod
    def of(cls, section: Any) -> "CorpusSpec":
        """From a config's data section (anything with these attribute names)."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def local_files(source: str) -> list[Path]:
    """The files a local source names: one file, every supported file under a directory, or a glob."""
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        files = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"no file matches the corpus glob {source!r}; check the pattern and the directory.")
        return files
    path = Path(expanded)
    if path.is_dir():
        if problem := unreadable([path, *(p for p in path.rglob("*") if p.is_dir() or _suffix(p) in BUILDERS)]):
            raise DataError(f"{problem}; make the corpus readable by this user (chmod -R a+rX {source}) or copy it.")
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in BUILDERS)
        if not files:
            raise DataError(
                f"corpus directory {source} holds no {', '.join(BUILDERS)} files; point the source at the data files."
            )
        return files
    if not path.is_file():
        raise DataError(f"corpus file {source} does not exist; fix the path, or use hub:NAME for a hub dataset.")
    if problem := unreadable([path]):
        raise DataError(f"{problem}; make the corpus readable by this user (chmod a+r {source}) or copy it.")
    return [path]


def _builder(files: list[Path], source: str) -> str:
    builders = {BUILDERS.get(_suffix(p)) for p in files}
    if None in builders:
        odd = next(p for p in files if _suffix(p) not in BUILDERS)
        raise DataError(
            f"corpus file {odd} has an unsupported type; use {', '.join(BUILDERS)} files (optionally .gz)."
        )
    if len(builders) > 1:
        raise DataError(
            f"corpus {source!r} mixes file types ({', '.join(sorted(builders))}); use one type per corpus."
        )
    return builders.pop()


def _load_hub(spec: CorpusSpec) -> Any:
    from datasets import load_dataset  # heavy (about a second): imported only when a corpus is read
    from datasets.exceptions import DatasetsError

    name = spec.source.removeprefix("hub:")
    try:
        return load_dataset(name, spec.hub_config, split=spec.split, revision=spec.revision)
    except (DatasetsError, FileNotFoundError, ValueError, ConnectionError) as exc:
        raise DataError(
            f"cannot load hub dataset {name!r} (config {spec.hub_config!r}, split {spec.split!r}, revision "
            f"{spec.revision!r}: {first_line(exc)}); check the name, hub_config, split and revision, and that the hub "
            "is reachable."
        ) from exc


def _load_local(files: list[Path], spec: CorpusSpec) -> Any:
    import datasets  # heavy (about a second): imported only when a corpus is read
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    builder = _builder(files, spec.source)
    options = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # reading local files is no download: the caller's phase line says what runs
    try:
        return load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except (DatasetsError, ValueError, OSError) as exc:
        raise DataError(
            f"cannot read corpus {spec.source!r} as {builder} ({first_line(exc)}); check the files are valid {builder}."
        ) from exc
    finally:
        if shown:
            datasets.enable_progress_bars()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LONGROPE_CACHE") or Path.home() / ".cache" / "longrope")


def _builtin_path(source: str) -> Path:
    if builtin.is_generated(source):  # builtin:cpython-train: written into the cache on first use
        return builtin.generated_corpus(source, default_cache_dir())
    path = Path(builtin.resolve_corpus(source))
    if not path.is_file():
        raise DataError(f"the built-in corpus file {path} is missing; reinstall longrope to restore it.")
    return path


def corpus_files(spec: CorpusSpec) -> list[Path]:
    if spec.source.startswith("builtin:"):
        return [_builtin_path(spec.source)]
    return local_files(spec.source)


def load_texts(spec: CorpusSpec) -> Any:
    """The corpus as a `datasets.Dataset` with one column, "text" (one row per document)."""
    if spec.source.startswith("hub:"):
        ds = _load_hub(spec)
        field = spec.text_field
    else:
        files = corpus_files(spec)
        ds = _load_local(files, spec)
        field = "text" if _builder(files, spec.source) == "text" else spec.text_field
    if field not in ds.column_names:
        raise DataError(
            f"corpus {spec.source!r} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
            "set text_field to the one holding the documents."
        )
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def same_documents(a: CorpusSpec, b: CorpusSpec) -> bool:
    """Both sources name the same corpus: the same builtin or hub dataset, or the same local files in the same order
    (a folder and a glob that match the same files count as one). Config, split and revision are not compared:
    a command-line source carries none of them."""
    hub_like = ("hub:", "builtin:")
    if a.source.startswith(hub_like) or b.source.startswith(hub_like):
        return a.source == b.source
    try:
        return [p.resolve() for p in local_files(a.source)] == [p.resolve() for p in local_files(b.source)]
    except (DataError, OSError):
        return False


def corpus_identity(spec: CorpusSpec) -> dict:
    """What names the corpus without reading it: hub name/config/split, or local paths, sizes, mtimes."""
    if spec.source.startswith("hub:"):
        where: Any = {"hub": spec.source, "config": spec.hub_config, "split": spec.split, "revision": spec.revision}
    else:
        where = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in corpus_files(spec)]
    return {"source": where, "text_field": spec.text_field, "concatenate": spec.concatenate}


def describe(spec: CorpusSpec) -> str:
    return f"corpus {spec.source!r}" + (f" (split {spec.split!r})" if spec.source.startswith("hub:") else "")
