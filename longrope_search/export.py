"""Export searched factors into a Hugging Face model directory that transformers (4.5x and 5.x) and vLLM load
as rope type "longrope", then reload it and check its logits against the search-time model.

SRC is only ever read: weights are symlinked (or copied), config.json is rewritten in DST from SRC's raw JSON.

Over 450 lines: the refusals, the placed files (weights linked, a tokenizer config both transformers majors read) and
the staged write are one promise, a folder that is whole or absent; config.json's rope keys (`hf_config`), the
reload check (`reload_check`), the model card, the hub and the authors' CSVs are apart.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import transformers

from longrope_search import builtin, checkpoint, hub, methods
from longrope_search.config import canonical_dtype, load_config as load_run_config, parse_length
from longrope_search.corpus import CorpusSpec
from longrope_search.data import build_samples
from longrope_search.errors import CheckpointError, ExportError, LongRopeError, ModelError
from longrope_search.eval_result import read_eval
from longrope_search.factors import FactorsFile, check_geometry, factors_path, load_factors
from longrope_search.files import (
    atomic_copy,
    atomic_write_text,
    folder_lock,
    make_dirs,
    move_into,
    remove_staging,
    remove_temps,
    staging_folder,
    storage_error,
)
from longrope_search.fitness import perplexity
from longrope_search.hf_config import compatibility_notes, hf_rope_config, partial_rotary_factor
from longrope_search.memory import chunk_mlp
from longrope_search.model import (
    DEFAULT_LOAD,
    LoadOptions,
    check_device,
    install_rope,
    load_model_config,
    load_tokenizer,
    resolve_model_path,
    rope_spec,
)
from longrope_search.model_card import CARD_FILE, model_card
from longrope_search.reload_check import LONG_VERIFY_MARGIN, check_verify_settings, checked_length, verify_export
from longrope_search.rundir import (
    CONFIG_FILE,
    EVAL_FILE,
    EXPORT_FACTORS_FILE,
    FINETUNE_FILE,
    LOG_FILE,
    entries,
)

# Files transformers loads weights from; symlinked by default because they are the only big ones.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
# Other frameworks' checkpoints: transformers never reads them, and copying them would double the disk use.
FOREIGN_WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")


# tokenizer_config.json's class as transformers 5 saves it; 4.x knows the same tokenizer as PreTrainedTokenizerFast.
FIVE_ONLY_TOKENIZER_CLASS, PORTABLE_TOKENIZER_CLASS = "TokenizersBackend", "PreTrainedTokenizerFast"
CAUSAL_LM_INPUTS = ("input_ids", "attention_mask")  # what a causal LM's forward and generate() take


@dataclass
class ExportReport:
    out: Path
    max_abs_diff: float | None  # DST vs search-time SRC at verify_length (long factors); None if not verified
    verify_length: int | None
    dropped_n_hat: bool
    notes: list[str] = field(default_factory=list)
    short_max_abs_diff: float | None = None  # same check inside the original window (short factors)
    pushed: str | None = None  # the hub repository's URL after --push-to-hub

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


# --- files ------------------------------------------------------------------------------------------------


def _is_weight(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES)


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


# Written by export itself, never copied from SRC (SRC's own model card describes SRC, not the export); and a
# fine-tuned SRC's record of its training (its config, log and result), which describe SRC and would make the export
# look like a fine-tune's folder.
OWN_FILES = ("config.json", EXPORT_FACTORS_FILE, CARD_FILE, CONFIG_FILE, LOG_FILE, FINETUNE_FILE)


def _placed(src: Path) -> list[Path]:
    """SRC's top-level files that export places in DST (copied, or weights linked)."""
    return [path for path in sorted(src.iterdir())
            if not (path.name.startswith(".") or path.name in OWN_FILES or path.is_dir()
                    or path.name.endswith(FOREIGN_WEIGHT_SUFFIXES))]


def must_copy_weights(src: Path) -> bool:
    """SRC lives inside the installed package (the built-in model) or a Python environment: a `pip uninstall` or
    upgrade would break links into it, so its weights are copied."""
    roots = [builtin.ROOT, *(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib"))]
    return any(_is_within(src.resolve(), root.resolve()) for root in roots)


def _portable_tokenizer_config(path: Path, target: Path) -> list[str]:
    """Copy tokenizer_config.json so 4.x and 5.x load and call the tokenizer alike: a 5.x-only tokenizer class
    written as the class both load (the same fast tokenizer from tokenizer.json), and for that generic class the
    inputs a causal LM takes (its default adds token_type_ids, which generate() in 4.x refuses). The notes of what
    was rewritten; none when copied as it was."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = None
    updates: dict[str, Any] = {}
    notes = []
    if isinstance(doc, dict) and doc.get("tokenizer_class") == FIVE_ONLY_TOKENIZER_CLASS \
            and (path.parent / "tokenizer.json").is_file():
        updates["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        notes.append(f"tokenizer_config.json: tokenizer_class {FIVE_ONLY_TOKENIZER_CLASS} (transformers 5 only) "
                     f"written as {PORTABLE_TOKENIZER_CLASS}, which 4.x and 5.x load alike.")
    if isinstance(doc, dict) and "model_input_names" not in doc \
            and updates.get("tokenizer_class", doc.get("tokenizer_class")) == PORTABLE_TOKENIZER_CLASS:
        updates["model_input_names"] = list(CAUSAL_LM_INPUTS)
        notes.append("tokenizer_config.json: model_input_names set to input_ids and attention_mask (without them "
                     f"{PORTABLE_TOKENIZER_CLASS} also returns token_type_ids, which generate() refuses).")
    if not updates:
        atomic_copy(path, target)
        return []
    atomic_write_text(target, json.dumps({**doc, **updates}, indent=2) + "\n")
    return notes


def _place_files(src: Path, out: Path, copy_weights: bool, weights: bool = True) -> list[str]:
    """Copy SRC's small top-level files, link or copy its weights (none when `weights` is False: they are in `out`
    already); returns notes on what was skipped."""
    placed = [path for path in _placed(src) if weights or not _is_weight(path)]
    skipped = [path.name + ("/" if path.is_dir() else "") for path in sorted(src.iterdir())
               if path not in placed and not path.name.startswith(".") and path.name not in OWN_FILES
               and (weights or not _is_weight(path))]
    notes = []
    if not weights:
        copy_weights = True  # no link into SRC is made, so none needs a note
    elif not copy_weights and must_copy_weights(src):
        copy_weights = True
        notes.append(f"weights copied: {src} is inside the installed package or a Python environment, which an "
                     "upgrade or uninstall would remove.")
    for path in placed:
        target = out / path.name
        if path.name == "tokenizer_config.json":
            notes.extend(_portable_tokenizer_config(path, target))
            continue
        if _is_weight(path) and not copy_weights:
            try:
                if target.is_symlink() or target.exists():
                    target.unlink()  # a file or a link itself, never what a link points to
                target.symlink_to(path.absolute())
            except OSError as exc:
                raise storage_error(exc, target) from None
        else:
            atomic_copy(path, target)  # replaces a link at target instead of writing through it
    if skipped:
        notes.append(f"not copied (transformers does not load them): {', '.join(skipped)}")
    if not copy_weights:
        notes.append(f"weights are symlinks into {src}; keep it in place, or export again with --copy-weights for a "
                     "self-contained directory.")
    return notes


def _remove_stale_weights(out: Path) -> None:
    """With force: weights of a previous export would be mixed with the new ones (shard names differ).

    Only a previous export's weights go: its symlinks, or copies when it left a longrope.json. Real
    weights in a directory that is not an export (a mistyped --out) are never deleted.
    """
    previous_export = (out / EXPORT_FACTORS_FILE).is_file()
    for path in out.iterdir():
        if _is_weight(path) and (path.is_symlink() or (previous_export and path.is_file())):
            path.unlink()


# --- refusals ---------------------------------------------------------------------------------------------


def _source_model_dir(name: str, options: LoadOptions = DEFAULT_LOAD) -> Path:
    """SRC as a local folder: a directory, builtin:NAME, or a hub id downloaded (huggingface_hub's cache)."""
    try:
        src = Path(resolve_model_path(name))
    except ModelError as exc:
        raise ExportError(str(exc)) from None
    if not src.is_dir():
        src = hub.download_model(name, options.revision)
    if not (src / "config.json").is_file():
        raise ExportError(f"{src} has no config.json; pass the directory of a Hugging Face model with --model.")
    return src.resolve()


def _check_geometry(ff: FactorsFile, config: Any, src: Path) -> None:
    spec = rope_spec(config)
    check_geometry(ff.rope, spec, "the factors file", str(src),
                   "export onto the model the search ran on (or one with the same geometry) with --model.")
    # a search may set a shorter window than the config declares (model.original_length, e.g. Mistral v0.1)
    if ff.rope.original_length > spec.original_length:
        raise ExportError(
            f"the factors were searched for rope_theta {ff.rope.base:g} and window {ff.rope.original_length} but "
            f"{src} has rope_theta {spec.base:g} and window {spec.original_length}; export onto the searched model."
        )
    if ff.target_length <= ff.rope.original_length:
        raise ExportError(
            f"target_length {ff.target_length} does not exceed the original window {ff.rope.original_length}; "
            "longrope only extends the context, re-run the search with a longer --target."
        )


def _check_destination(out: Path, src: Path, force: bool) -> None:
    if _is_within(out, src) or _is_within(src, out):
        raise ExportError(f"--out {out} overlaps the source model {src}; choose a directory outside it.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; choose a directory path.")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"--out {out} cannot be created: {parent} is a file; choose a directory path.")
            break
    if out.is_dir() and entries(out) and not force:
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory or pass --force to overwrite.")
    if out.is_dir():
        for name in [*OWN_FILES, *(p.name for p in _placed(src))]:
            if (out / name).is_dir() and not (out / name).is_symlink():
                raise ExportError(f"--out {out} holds a folder {name}/ where export writes the file {name}; move it "
                                  "aside or choose another --out.")


# --- the n_hat measurement ---------------------------------------------------------------------------------


def n_hat_cost(run_dir: Path, src: Path, model: Any, ff: FactorsFile) -> tuple[float, float] | None:
    """Search-sample PPL with the searched n_hat and without it, when the run's corpus is known.

    `model` is SRC already loaded (by the verification); only its tokenizer is loaded here.
    """
    resolved = run_dir / CONFIG_FILE
    if not resolved.is_file():
        return None
    config = load_run_config(resolved)
    d = config.data
    tokenizer = load_tokenizer(str(src))
    samples = build_samples(tokenizer, CorpusSpec.of(d), ff.target_length, d.samples, d.heldout_samples, d.seed,
                            d.cache_dir)
    if config.search.mlp_chunk:
        chunk_mlp(model, config.search.mlp_chunk)
    ppls = []
    for n_hat in (ff.n_hat, 0):
        install_rope(model, ff.factors, n_hat=n_hat, mscale=ff.mscale)
        ppls.append(perplexity(model, samples.search, config.search.chunk_size).ppl)
    return ppls[0], ppls[1]


# --- export -----------------------------------------------------------------------------------------------


def _n_hat_note(run_dir: Path, src: Path, ref: Any, ff: FactorsFile) -> list[str]:
    """What dropping n_hat costs on the search samples, measured after the export is in place: a measurement that
    fails (the run's corpus gone) becomes a note, never a failed export."""
    try:
        cost = n_hat_cost(run_dir, src, ref, ff)
    except LongRopeError as exc:
        return [f"the cost of dropping n_hat={ff.n_hat} could not be measured ({exc})"]
    if cost is None:
        return []
    kept, dropped = cost
    return [f"dropping n_hat={ff.n_hat} changes the search-sample PPL at {ff.target_length} tokens from {kept:.4f} "
            f"to {dropped:.4f} ({100 * (dropped / kept - 1):+.2f}%)"]


def export(
    source: str | Path,
    out: Path,
    model: str | None = None,
    copy_weights: bool = False,
    force: bool = False,
    drop_n_hat: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
    verify_length: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
    revision: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: Any = None,
) -> ExportReport:
    """Write a Hugging Face model directory at `out` that runs the searched factors as rope type longrope, with a
    model card (README.md) of its own; optionally upload it to the hub repository `push_to_hub`. The files are
    written and checked in a hidden folder inside `out` and moved into place only when the check passes: a failed
    or killed export leaves `out` as it was (the next export removes what a kill left).

    source: a run directory or factors.json; model: the model to export onto (default: the one searched), a local
    folder, builtin:NAME or a hub id (downloaded with huggingface_hub; `revision` pins it, default: the run's
    model.revision). device_map (e.g. auto) shards the check's models over the GPUs. progress: called with a line
    per phase. Every refusal happens before anything is written.
    """
    phase = progress if progress is not None else (lambda line: None)
    dtype = canonical_dtype(dtype, "--dtype")
    check_verify_settings(tolerance, dtype, device if verify else None, device_map)
    ff = load_factors(source)  # a run directory (not a stages folder) or a factors.json
    source_file = factors_path(source)
    if ff.n_hat > 0 and not drop_n_hat:
        raise ExportError(
            f"the factors were searched with n_hat={ff.n_hat}, which no runtime (transformers, vLLM, llama.cpp) can "
            "express in a config; re-run with --drop-n-hat, or use longrope_search.runtime.apply in Python."
        )
    phase(f"finding {model or ff.model} (a hub model downloads with its own progress bars)")
    src, config, options = source_model(ff, source_file, model, revision)
    out = Path(out).expanduser().absolute()
    _check_destination(out.resolve(), src, force)
    length = checked_length(ff, config, verify_length, dtype, device if device_map is None else None) if verify else 0

    phase(f"writing {out}")
    with _claimed(out, src, force), _staged(out, force) as folder:
        notes = _write(ff, source_file, src, folder, config.model_type, copy_weights, push_to_hub or str(out))
        notes += checkpoint.unfinished_note(source_file.parent)
        report = ExportReport(out=out, max_abs_diff=None, verify_length=None, dropped_n_hat=ff.n_hat > 0, notes=notes)
        ref = None
        if verify:
            phase(f"checking {out}: reloading it with plain transformers and comparing logits with the searched model")
            ref = _verified(report, folder, src, ff, length, tolerance, device, dtype, device_map, options)
    if ref is not None and ff.n_hat > 0:
        notes += _n_hat_note(source_file.parent, src, ref, ff)
    if push_to_hub is not None:
        phase(f"uploading {out} to {push_to_hub}")
        report.pushed = hub.push_folder(out, push_to_hub, private)
    return report


def export_method(method: str, target: str | int, model: str, out: Path, force: bool = False, device: str = "cpu",
                  progress: Any = None) -> ExportReport:
    """`model` (a plain model, or one a fine-tune extended with a baseline) exported with baseline `method` (yarn,
    pi, ntk) at `target` as transformers runs it, checked like a search's export: the end of a baseline's route."""
    check_device(device)
    src = _source_model_dir(model)
    config = load_model_config(str(src))
    spec = rope_spec(config)
    ff = methods.method_file(method, model, spec, parse_length(target, spec.original_length))
    out = Path(out).expanduser().absolute()
    _check_destination(out.resolve(), src, force)
    if progress is not None:
        progress(f"writing {out}")
    with _claimed(out, src, force), _staged(out, force) as folder:
        ff.save(folder / EXPORT_FACTORS_FILE)  # the factors file _write records: written first, read back unchanged
        notes = _write(ff, folder / EXPORT_FACTORS_FILE, src, folder, config.model_type, False, str(out))
        report = ExportReport(out=out, max_abs_diff=None, verify_length=None, dropped_n_hat=False, notes=notes)
        _verified(report, folder, src, ff, spec.original_length + LONG_VERIFY_MARGIN, 1e-4, device, "float32")
    return report


@contextlib.contextmanager
def _claimed(out: Path, src: Path, force: bool) -> Iterator[None]:
    """`out` made (with its parents) and locked for the block, the lock file inside it (so an existing `out` needs no
    write access to its parent, and the lock a kill leaves is ignored like a run folder's): a second export into `out`
    is refused while this one runs, and the destination is checked again under the lock (an export that ended
    meanwhile filled it). The folders made are removed again when the block fails."""
    created = make_dirs(out)
    try:
        with folder_lock(out):
            _check_destination(out.resolve(), src, force)
            yield
    except BaseException:
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


@contextlib.contextmanager
def _staged(out: Path, force: bool) -> Iterator[Path]:
    """A private folder for the block to write and check the export in (inside `out`, which `_claimed` made: on its
    disk even behind a link, whatever its parent allows), moved into `out` when the block succeeds (temp
    files a kill left there removed; with --force, the previous export's weights too) and deleted when it fails.
    Staging folders a killed export left for `out` go first (under `_claimed`'s lock, never a running export's)."""
    remove_staging(out)
    folder = staging_folder(out, inside=True)  # `_claimed` made `out`: on its disk, whatever its parent allows
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if out.is_dir():
        remove_temps(out)  # what a kill of an older version's export left
        if force:
            _remove_stale_weights(out)
    move_into(folder, out, last=EXPORT_FACTORS_FILE)


def source_model(ff: FactorsFile, source_file: Path, model: str | None = None, revision: str | None = None,
                 options: LoadOptions | None = None) -> tuple[Path, Any, LoadOptions]:
    """SRC of an export of `ff` (read from `source_file`) as a local folder, its config and how it loads (`options`,
    else the run's when SRC is the searched model); refuses a model of another geometry or factors that do not
    extend its window."""
    options = options or _run_options(source_file, model, revision)
    src = _source_model_dir(model or ff.model, options)
    config = load_model_config(str(src), options)
    _check_geometry(ff, config, src)
    return src, config, options


def write_files(ff: FactorsFile, source_file: Path, src: Path, out: Path, model_type: str, copy_weights: bool = False,
                weights: bool = True) -> list[str]:
    """What `export` writes into `out` before its check, with the same refusals of `out` (not empty, over SRC, a
    folder where a file goes): SRC's files with weights linked or copied, or with `weights` False none (a fine-tune
    saved its own there), config.json with the longrope keys, longrope.json and the model card. Returns the notes."""
    out = Path(out).expanduser().absolute()
    _check_destination(out.resolve(), src, force=not weights)
    make_dirs(out)
    return _write(ff, source_file, src, out, model_type, copy_weights, str(out), weights=weights)


def _run_options(source_file: Path, model: str | None, revision: str | None) -> LoadOptions:
    """How SRC loads: the run's model section (revision, remote code) when SRC is the searched model; --revision
    over it."""
    options = DEFAULT_LOAD
    resolved = source_file.parent / CONFIG_FILE
    if model is None and resolved.is_file():
        options = LoadOptions.of(load_run_config(resolved).model)
    if revision is not None:
        options = LoadOptions(revision, options.trust_remote_code, options.attn_implementation, options.device_map)
    return options


def _write(ff: FactorsFile, source_file: Path, src: Path, out: Path, model_type: str, copy_weights: bool,
           name: str, weights: bool = True) -> list[str]:
    """DST's files into the folder `out`: SRC's (weights linked or copied; none with `weights` False), config.json
    with the longrope keys, longrope.json, the model card (naming the model `name`); the notes."""
    config_doc = json.loads((src / "config.json").read_text())
    model_type = str(config_doc.get("model_type", model_type))
    config_doc.update(hf_rope_config(ff, model_type, partial_rotary_factor(config_doc)))
    config_doc["transformers_version"] = transformers.__version__  # what wrote this config, not SRC's
    notes = _place_files(src, out, copy_weights, weights)
    atomic_write_text(out / "config.json", json.dumps(config_doc, indent=2) + "\n")
    atomic_write_text(out / EXPORT_FACTORS_FILE, source_file.read_text())  # provenance; runtime.apply reads it
    atomic_write_text(out / CARD_FILE, model_card(ff, name, _measured(source_file.parent)))
    notes += compatibility_notes(ff, model_type)
    if ff.n_hat > 0:
        notes.append(f"n_hat={ff.n_hat} dropped: the exported model runs the factors with n_hat=0 (the searched PPL used "
                     f"n_hat={ff.n_hat}); {EXPORT_FACTORS_FILE} keeps it for longrope_search.runtime.apply.")
    return notes


def _measured(run_dir: Path) -> Any:
    """The run's eval.json for the model card, when there is a readable one."""
    try:
        return read_eval(run_dir / EVAL_FILE)
    except CheckpointError:
        return None


def _verified(report: ExportReport, folder: Path, src: Path, ff: FactorsFile, length: int, tolerance: float,
              device: str, dtype: str, device_map: str | None = None, options: LoadOptions = DEFAULT_LOAD) -> Any:
    """Run the reload check of the export written in `folder` into `report`; raise when its logits differ; the loaded
    SRC model for later use."""
    out = report.out
    long_diff, short_diff, ref = verify_export(folder, src, ff, n_hat=0, length=length, device=device, dtype=dtype,
                                               device_map=device_map, options=options)
    report.max_abs_diff, report.short_max_abs_diff, report.verify_length = long_diff, short_diff, length
    worst = max(long_diff, short_diff)
    if not worst <= tolerance:  # also catches NaN
        raise ExportError(
            f"verification failed: the export for {out} (not kept) differs from the search-time model by {worst:.3g} in logits "
            f"(tolerance {tolerance:g}; long {long_diff:.3g} at {length} tokens, short {short_diff:.3g}); "
            + ("do not use it, and report this with your transformers version." if dtype == "float32" else
               f"in {dtype} this may be rounding: check again with --dtype float32 before using it.")
        )
    return ref
