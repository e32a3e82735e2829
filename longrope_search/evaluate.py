"""`longrope eval`: perplexity on held-out windows and passkey retrieval, per method (none, PI, NTK, YaRN, the
searched factors) per length, rendered as a table and written as `RUN/eval.json` for plotting.

Each method runs as a served model would run it: see `methods.methods_for` for what "longrope" means at each length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from longrope_search import checkpoint
from longrope_search.config import DEFAULT_CHUNK_SIZE, DEFAULT_MLP_CHUNK, parse_length
from longrope_search.corpus import CorpusSpec, same_documents
from longrope_search.data import build_samples
from longrope_search.errors import ConfigError, DataError
from longrope_search.eval_result import EvalResult
from longrope_search.factors import FactorsFile, check_geometry, factors_path, load_factors
from longrope_search.fitness import Evaluator
from longrope_search.files import check_writable
from longrope_search.identity import RunIdentity
from longrope_search.methods import methods_for, unique_lengths
from longrope_search.model import DEFAULT_LOAD, LoadOptions, load_model_config, load_model, rope_spec
from longrope_search.passkey import passkey, passkey_prompt
from longrope_search.progress import Countdown
from longrope_search.retrieval import NeedleSettings, cell_samples, draw_trials, needle_accuracy
from longrope_search.rope import RopeSpec
from longrope_search.rundir import CONFIG_FILE, EVAL_FILE, FACTORS_FILE, STATE_DIR, config_for_resume
from longrope_search.sample_sets import draw_split

DEFAULT_SAMPLES = 8  # held-out windows per length when the run kept none

Progress = Callable[[str], None]


# --- held-out windows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSampling:
    """How a run drew its search windows (its data section and target): the documents evaluation must avoid."""

    target_length: int
    samples: int  # data.samples
    heldout_samples: int  # data.heldout_samples (part of the sample cache key)
    seed: int  # data.seed
    fingerprint: str | None = None  # the search windows' hash from the run's state; catches a changed corpus
    validation_samples: int = 0  # data.validation_samples: drawn after the held-out documents, also excluded


def heldout_windows(
    tokenizer: Any,
    corpus: CorpusSpec,
    length: int,
    n: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    exclude: RunSampling | Sequence[RunSampling] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """n windows of `length` tokens (n, length) and the corpus rows they come from, none of them a document the run
    searched or validated on.

    Why the run's own `.heldout` at another length is not enough: which documents are long enough depends on the
    length, so at a shorter length a short document can join the search set and push one of the run's search
    documents into the held-out set. Instead the run's search documents are re-derived at its target length (the
    sample cache usually holds them) and excluded by row, with the run's seed:
    - separate documents: draw `samples + n + validation_samples` windows at this length and keep the first n from
      other documents. At most `samples + validation_samples` of them are excluded, so n always remain;
    - concatenated documents (one stream per set): grow the search stream at this length until it holds at least as
      many tokens as the run's did; it then covers every document the run searched on (same order), and the
      held-out stream starts on a later document.
    Without a run (`exclude` None) the first n documents in `seed`'s order are used. Several runs of one data seed
    (the stages of a route; separate documents only): the documents any of them decided with are excluded.
    """
    if n < 1:
        raise ConfigError(f"cannot evaluate on {n} samples; pass --samples 1 or more.")
    if exclude is None:
        drawn = build_samples(tokenizer, corpus, length, n, 0, seed, cache_dir)
        return drawn.search, drawn.search_docs
    runs = [exclude] if isinstance(exclude, RunSampling) else list(exclude)
    if len(runs) > 1 and (corpus.concatenate or len({r.seed for r in runs}) > 1):
        raise ConfigError("held-out windows of several runs need separate documents and one data.seed.")
    used: set[int] = set()
    for one in runs:
        used |= _decided_with(tokenizer, corpus, one, cache_dir)
    exclude = runs[0]
    if corpus.concatenate:
        bos = 1 if tokenizer.bos_token_id is not None else 0  # windows are [bos] + length-1 stream tokens
        streams = math.ceil(exclude.samples * (exclude.target_length - bos) / (length - bos))
        drawn = build_samples(tokenizer, corpus, length, streams, n, exclude.seed, cache_dir)
        return drawn.heldout, drawn.heldout_docs
    others = sum(r.samples + r.validation_samples for r in runs[1:])
    drawn = build_samples(tokenizer, corpus, length, exclude.samples, n + exclude.validation_samples + others,
                          exclude.seed, cache_dir)
    rows = drawn.search_docs + drawn.heldout_docs
    windows = torch.cat([drawn.search, drawn.heldout])  # (samples + n + validation, length)
    keep = [i for i, row in enumerate(rows) if row not in used][:n]
    return windows[keep], [rows[i] for i in keep]


def _decided_with(tokenizer: Any, corpus: CorpusSpec, run: RunSampling, cache_dir: str | Path | None) -> set[int]:
    """The documents a run decided with: its search documents and its validation documents (after the held-out
    ones); a corpus whose search windows changed since the run is refused."""
    split = draw_split(tokenizer, corpus, run.target_length, run.samples, run.heldout_samples, run.validation_samples,
                       run.seed, cache_dir)
    if run.fingerprint is not None and split.windows.fingerprint != run.fingerprint:
        raise DataError(
            f"the corpus {corpus.source!r} or tokenizer changed since the search (its search windows differ), so "
            "held-out documents cannot be told apart; restore them, or evaluate on another corpus with --model, "
            "--factors and --data (its documents are then not held out from the search)."
        )
    return split.decided_docs


# --- perplexity ---------------------------------------------------------------------------------------


def eval_ppl(
    model: Any,
    tokenizer: Any,
    spec: RopeSpec,
    corpus: CorpusSpec,
    lengths: Sequence[int],
    ff: FactorsFile | None,
    samples: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude: RunSampling | Sequence[RunSampling] | None = None,
    progress: Progress | None = None,
    only: Sequence[str] | None = None,
) -> EvalResult:
    """Perplexity of every method at every length on `samples` held-out windows (see `heldout_windows`).

    Methods with identical factors, n_hat and mscale (all of them but longrope at length <= original) are scored
    once per length, so they report exactly the same number. `seed` orders the documents only without a run.
    `only`: these methods by name (default all).
    """
    plan = {length: methods_for(spec, length, ff, only) for length in unique_lengths(lengths)}
    count = Countdown(sum(len(methods) for methods in plan.values()))
    ppl: dict[str, dict[int, float]] = {}
    for i, (length, methods) in enumerate(plan.items(), 1):
        if progress is not None:
            progress(f"length {i} of {len(plan)}: reading and tokenising {samples} windows of {length} tokens")
        ids, _ = heldout_windows(tokenizer, corpus, length, samples, seed, cache_dir, exclude)  # (samples, length)
        evaluator = Evaluator(model, ids, chunk_size=chunk_size)
        for method in methods:
            if progress is not None:
                progress(f"perplexity of {method.name} at {length} tokens ({count.next()})")
            ppl.setdefault(method.name, {})[length] = evaluator.score(
                method.key, method.factors, method.n_hat, method.mscale
            ).ppl
    return EvalResult(lengths=list(plan), ppl=ppl, samples=samples,
                      model=ff.model if ff is not None else str(getattr(model, "name_or_path", "")))


# --- orchestration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalInputs:
    """What an evaluation reads: from a run directory, or from --model, --factors and --data."""

    model: str
    factors: FactorsFile
    factors_file: Path
    corpus: CorpusSpec
    samples: int
    exclude: RunSampling | None  # the run's search documents, never evaluated on
    device: str | None
    dtype: str | None
    cache_dir: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    mlp_chunk: int = DEFAULT_MLP_CHUNK
    options: LoadOptions = DEFAULT_LOAD  # how from_pretrained is called (revision, remote code, attention, device map)
    # why the documents may include ones the search decided with (None: they are held out, `exclude` says from what)
    not_heldout: str | None = None


def run_inputs(run_dir: Path, model: str | None, samples: int | None, device: str | None, dtype: str | None,
               device_map: str | None = None) -> EvalInputs:
    """The run's model, factors and corpus; its search and validation documents excluded."""
    config, _ = config_for_resume(run_dir, [])
    ff = load_factors(run_dir)
    d = config.data
    fingerprint = None
    if (run_dir / STATE_DIR).is_dir():
        fingerprint = RunIdentity.from_json(checkpoint.load_state(run_dir)[0].fingerprint).data
    return EvalInputs(
        model=model or config.model.name, factors=ff, factors_file=factors_path(run_dir), corpus=CorpusSpec.of(d),
        samples=(d.heldout_samples or DEFAULT_SAMPLES) if samples is None else samples,
        exclude=RunSampling(ff.scored_length, d.samples, d.heldout_samples, d.seed, fingerprint, d.validation_samples),
        device=device or (None if config.model.device == "auto" else config.model.device),
        dtype=dtype or config.model.dtype, cache_dir=d.cache_dir, chunk_size=config.search.chunk_size,
        mlp_chunk=config.search.mlp_chunk,
        options=dataclasses.replace(LoadOptions.of(config.model), **({"device_map": device_map} if device_map else {})),
    )


def factors_run(factors: str | Path) -> Path | None:
    """The run directory a factors file belongs to (a run directory, or the factors.json inside one), else None."""
    path = Path(factors)
    folder = path if path.is_dir() else path.parent if path.name == FACTORS_FILE else None
    return folder if folder is not None and (folder / CONFIG_FILE).is_file() else None


def flag_inputs(model: str | None, factors: str | Path | None, data: str | None, samples: int | None,
                device: str | None, dtype: str | None, device_map: str | None = None) -> EvalInputs:
    """--model, --factors and --data. When the factors come from a run and --data is that run's corpus, the run's
    search and validation documents are excluded exactly as `longrope eval RUN` does; otherwise the documents are
    not held out from the search, and the result says so."""
    if model is None or factors is None:
        raise ConfigError("pass a run directory, or --model with --factors (a run directory or factors.json).")
    if data is None:
        raise ConfigError("pass --data with the corpus to measure perplexity on: builtin:NAME, hub:NAME or a path.")
    options = LoadOptions(device_map=device_map)
    run = factors_run(factors)
    if run is not None:
        inputs = run_inputs(run, None, samples, device, dtype, device_map)
        if same_documents(inputs.corpus, CorpusSpec(data)):
            # the run's corpus under the run's settings; the model is --model (loaded as the run loaded it when it is
            # the run's own model: its revision and remote-code setting)
            return dataclasses.replace(inputs, model=model, device=device, dtype=dtype,
                                       options=inputs.options if model == inputs.model else options,
                                       samples=DEFAULT_SAMPLES if samples is None else samples)
        why = f"{data} is not the corpus the factors were searched on ({inputs.corpus.source})"
    else:
        why = f"{factors} is not inside a run directory, so its search documents are unknown"
    return EvalInputs(model=model, factors=load_factors(factors), factors_file=factors_path(factors),
                      corpus=CorpusSpec(data), samples=DEFAULT_SAMPLES if samples is None else samples, exclude=None,
                      device=device, dtype=dtype, options=options, not_heldout=why)


def needle_fillers(tokenizer: Any, inputs: EvalInputs, longest: int, shortest: int, settings: NeedleSettings,
                   seed: int) -> list[list[int]]:
    """One held-out document per needle trial (token ids without bos, at least `longest` long); a length too short
    for the needle prompts fails here, before any scoring."""
    windows, _ = heldout_windows(tokenizer, inputs.corpus, longest, settings.trials, seed, inputs.cache_dir,
                                 inputs.exclude)  # (trials, longest): [bos] + the document's first tokens
    skip = 1 if tokenizer.bos_token_id is not None else 0
    fillers = [row[skip:].tolist() for row in windows]
    for variant in ("single", "multikey"):
        cell_samples(tokenizer, fillers[:1], shortest, 0.5, draw_trials(settings, variant)[:1])
    return fillers


def checked_inputs(lengths: Sequence[str | int], run_dir: Path | None, model: str | None,
                   factors: str | Path | None, data: str | None, samples: int | None, passkey_trials: int,
                   needle: NeedleSettings | None, placement: tuple[str | None, str | None, str | None],
                   progress: Progress | None, load: dict[str, Any] | None = None,
                   output: Path | None = None) -> tuple[EvalInputs, list[int]]:
    """What `evaluate` will run on and its lengths in tokens, after every check that needs no weights (the model's
    config only): a mistake is one error before a long load. placement: (device, dtype, device_map); load: how
    from_pretrained is called (LoadOptions fields), over the run's; output: where the result will be written."""
    if not lengths:
        raise ConfigError("no lengths to evaluate; pass --lengths, e.g. --lengths 1x,8x,16x or 4k,32k.")
    if run_dir is not None and (factors is not None or data is not None):
        raise ConfigError(
            "RUN_DIR evaluates the run's factors on its own corpus; to use other factors or data, drop RUN_DIR and "
            "pass --model, --factors (a run directory or factors.json) and --data."
        )
    inputs = (run_inputs(run_dir, model, samples, *placement) if run_dir is not None
              else flag_inputs(model, factors, data, samples, *placement))
    if load:
        inputs = dataclasses.replace(inputs, options=dataclasses.replace(inputs.options, **load))
    if inputs.samples < 1:
        raise ConfigError(f"cannot evaluate on {inputs.samples} samples; pass --samples 1 or more.")
    if passkey_trials < 0:
        raise ConfigError(f"cannot run {passkey_trials} passkey trials; pass --trials 1 or more.")
    if needle is not None:
        needle.check()
    if output is not None:
        check_writable(output)  # a result that cannot be saved is refused before it is computed
    if progress is not None:
        progress(f"reading the config of {inputs.model}")
    check_geometry(inputs.factors.rope, rope_spec(load_model_config(inputs.model, inputs.options)),
                   str(inputs.factors_file), inputs.model, "evaluate them on the searched model.")
    return inputs, [parse_length(n, inputs.factors.rope.original_length) for n in lengths]


def evaluate(
    lengths: Sequence[str | int],
    run_dir: str | Path | None = None,
    model: str | None = None,
    factors: str | Path | None = None,
    data: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    passkey_trials: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
    needle: NeedleSettings | None = None,
    device_map: str | None = None,
    load: dict[str, Any] | None = None,
    output: str | Path | None = None,
) -> EvalResult:
    """`longrope eval`: a run directory (model, corpus and factors from it; writes RUN/eval.json), or
    --model with --factors and --data. `output`: the eval.json to write (and merge into) instead; `load`: how the
    model loads (revision, trust_remote_code, attn_implementation), over the run's. Input checks run before the weights load (passkey lengths, which need the
    tokenizer, right after), so a mistake never costs a long evaluation.

    Lengths may be relative ('8x' of the factors' original window) or absolute ('16k'). passkey_trials 0 skips
    passkey retrieval. samples defaults to the run's data.heldout_samples (or DEFAULT_SAMPLES). seed picks the
    passkey trials, and the documents without a run (a run's held-out windows follow its own data.seed).
    needle: measure needle retrieval with these settings (retrieval.py) on held-out documents too.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    output = Path(output) if output is not None else run_dir / EVAL_FILE if run_dir is not None else None
    inputs, resolved = checked_inputs(lengths, run_dir, model, factors, data, samples, passkey_trials, needle,
                                      (device, dtype, device_map), progress, load, output)
    ff, spec = inputs.factors, inputs.factors.rope  # the spec carries a window override the model's config lacks

    if progress is not None:
        progress(f"loading {inputs.model} (downloads, if any, show their own progress)")
    loaded, tokenizer = load_model(inputs.model, device=inputs.device, dtype=inputs.dtype, mlp_chunk=inputs.mlp_chunk,
                                   options=inputs.options)
    if passkey_trials:
        passkey_prompt(tokenizer, min(resolved), "00000", 0.5)  # a too-short length fails now, not after the PPL
    fillers = needle_fillers(tokenizer, inputs, max(resolved), min(resolved), needle, seed) if needle else None
    result = eval_ppl(loaded, tokenizer, spec, inputs.corpus, resolved, ff, inputs.samples, seed, inputs.cache_dir,
                      inputs.chunk_size, inputs.exclude, progress)
    if passkey_trials:
        result.passkey = passkey(loaded, tokenizer, spec, resolved, ff, passkey_trials, seed, progress)
    if needle is not None:
        result.needle = needle_accuracy(loaded, tokenizer, spec, resolved, ff, fillers, needle, progress)
        result.needle_trials = needle.trials
    result.model, result.factors = inputs.model, str(inputs.factors_file)
    result.heldout, result.not_heldout = inputs.not_heldout is None, inputs.not_heldout
    result.measured = measured(loaded.config, ff, inputs.corpus)
    if output is not None:
        merged = result.merged_into(output)
        merged.save(output)
        result.merge_note = merged.merge_note
    return result


def measured(model_config: Any, ff: FactorsFile, corpus: CorpusSpec) -> str:
    """What an evaluation's numbers depend on, however the run folder was named or reached: the model's config, the
    factor sets with their attention factor and window, and the corpus. eval.json merges only equal ones."""
    config = {k: v for k, v in model_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    doc = {"model": config, "corpus": dataclasses.asdict(corpus),
           "factors": [ff.factors, ff.short_factors, ff.n_hat, ff.mscale, ff.target_length, dataclasses.asdict(ff.rope)]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
