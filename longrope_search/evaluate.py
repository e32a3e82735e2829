"""`longrope eval`: perplexity on held-out windows and passkey retrieval, per method (none, PI, NTK, YaRN, the
searched factors) per length, rendered as a table and written as `RUN/eval.json` for plotting.

Each method runs as a served model would run it: see `methods_for` for what "longrope" means at each length.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from longrope_search import rope
from longrope_search.config import format_length, parse_length
from longrope_search.data import CorpusSpec, build_samples
from longrope_search.errors import ConfigError, DataError, ModelError
from longrope_search.factors import FactorsFile
from longrope_search.files import atomic_write_text
from longrope_search.rope import RopeSpec

LONGROPE = "longrope"
METHODS = ("none", *rope.BASELINES, LONGROPE)  # table row order
EVAL_FILE = "eval.json"
DEFAULT_SAMPLES = 8  # held-out windows per length when the run kept none

Progress = Callable[[str], None]


# --- methods ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way to run the model at one length: what `install_rope` receives."""

    name: str
    factors: tuple[float, ...]  # (d/2,)
    n_hat: int
    mscale: float

    @property
    def key(self) -> str:
        """Equal keys give equal logits, so a score is computed once per key and length."""
        return json.dumps([self.factors, self.n_hat, self.mscale])


def check_geometry(spec: RopeSpec, ff: FactorsFile) -> None:
    """The factors belong to a model with this rotary geometry (the window may differ: a config override)."""
    if (ff.rope.rotary_dim, ff.rope.base) != (spec.rotary_dim, spec.base):
        raise ModelError(
            f"the factors were searched for rotary_dim {ff.rope.rotary_dim} and rope_theta {ff.rope.base:g} but the "
            f"model has rotary_dim {spec.rotary_dim} and rope_theta {spec.base:g}; evaluate them on the searched model."
        )


def methods_for(spec: RopeSpec, length: int, ff: FactorsFile | None) -> list[Method]:
    """none, pi, ntk, yarn at scale s = length / original (each with its own mscale), then the searched factors.

    At length <= original the baselines reduce to factors 1 and mscale 1 (nothing to stretch). "longrope" runs like
    the exported model in transformers (and `runtime.apply`): the long factors with the file's n_hat and mscale
    whenever length > original, at any length, not only the target; otherwise the short factors (all 1.0 when
    the search kept none) with n_hat 0 and the SAME mscale, because transformers applies `attention_factor` to
    both sets. So at length <= original, longrope differs from none by its mscale alone. n_hat > 0 is kept as
    searched; an exported config.json cannot express it (export --drop-n-hat runs without it).
    """
    scale = max(spec.scale(length), 1.0)
    methods = []
    for name in METHODS[:-1]:
        factors = rope.baseline(name)(spec, scale)  # (d/2,)
        mscale = rope.BASELINE_MSCALE[name](scale, spec.original_length)
        methods.append(Method(name, tuple(float(x) for x in factors), 0, float(mscale)))
    if ff is not None:
        check_geometry(spec, ff)
        if length > ff.rope.original_length:
            methods.append(Method(LONGROPE, tuple(ff.factors), ff.n_hat, ff.mscale))
        else:
            short = ff.short_or_ones
            methods.append(Method(LONGROPE, tuple(short), 0, ff.mscale))
    return methods


# --- held-out windows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSampling:
    """How a run drew its search windows (its data section and target): the documents evaluation must avoid."""

    target_length: int
    samples: int  # data.samples
    heldout_samples: int  # data.heldout_samples (part of the sample cache key)
    seed: int  # data.seed
    fingerprint: str | None = None  # the search ids' hash from the run's state; catches a changed corpus


def heldout_windows(
    tokenizer: Any,
    corpus: CorpusSpec,
    length: int,
    n: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    exclude: RunSampling | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """n windows of `length` tokens (n, length) and the corpus rows they come from, none of them a search document.

    Why the run's own `.heldout` at another length is not enough: which documents are long enough depends on the
    length, so at a shorter length a short document can join the search set and push one of the run's search
    documents into the held-out set. Instead the run's search documents are re-derived at its target length (the
    sample cache usually holds them) and excluded by row, with the run's seed:
    - separate documents: draw `samples + n` windows at this length and keep the first n from other documents.
      At most `samples` of them are excluded, so n always remain;
    - concatenated documents (one stream per set): grow the search stream at this length until it holds at least as
      many tokens as the run's did; it then covers every document the run searched on (same order), and the
      held-out stream starts on a later document.
    Without a run (`exclude` None) the first n documents in `seed`'s order are used.
    """
    if n < 1:
        raise ConfigError(f"cannot evaluate on {n} samples; pass --samples 1 or more.")
    if exclude is None:
        drawn = build_samples(tokenizer, corpus, length, n, 0, seed, cache_dir)
        return drawn.search, drawn.search_docs
    run = build_samples(
        tokenizer, corpus, exclude.target_length, exclude.samples, exclude.heldout_samples, exclude.seed, cache_dir
    )
    if exclude.fingerprint is not None and run.fingerprint != exclude.fingerprint:
        raise DataError(
            f"the corpus {corpus.source!r} or tokenizer changed since the search (its search windows differ), so "
            "held-out documents cannot be told apart; restore them, or evaluate with --model, --factors and --data."
        )
    if corpus.concatenate:
        bos = 1 if tokenizer.bos_token_id is not None else 0  # windows are [bos] + length-1 stream tokens
        streams = math.ceil(exclude.samples * (exclude.target_length - bos) / (length - bos))
        drawn = build_samples(tokenizer, corpus, length, streams, n, exclude.seed, cache_dir)
        return drawn.heldout, drawn.heldout_docs
    drawn = build_samples(tokenizer, corpus, length, exclude.samples, n, exclude.seed, cache_dir)
    rows = drawn.search_docs + drawn.heldout_docs
    windows = torch.cat([drawn.search, drawn.heldout])  # (samples + n, length)
    searched = set(run.search_docs)
    keep = [i for i, row in enumerate(rows) if row not in searched][:n]
    return windows[keep], [rows[i] for i in keep]


# --- results ------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Scores per method per length. JSON schema (read by the plotter, keep it stable):
    {"lengths": [int], "ppl": {method: {"<length>": float | null}}, "passkey": {method: {"<length>": float}},
     "samples": int, "model": str, "factors": str | null}; null ppl = not finite, empty passkey = not measured.
    """

    lengths: list[int]
    ppl: dict[str, dict[int, float]]
    samples: int
    model: str
    factors: str | None = None
    passkey: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def table(scores: dict[str, dict[int, float]]) -> dict[str, dict[str, float | None]]:
            return {m: {str(n): (v if math.isfinite(v) else None) for n, v in row.items()} for m, row in scores.items()}

        return {"lengths": list(self.lengths), "ppl": table(self.ppl), "passkey": table(self.passkey),
                "samples": self.samples, "model": self.model, "factors": self.factors}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "EvalResult":
        def table(scores: dict[str, dict[str, float | None]]) -> dict[str, dict[int, float]]:
            return {m: {int(n): (math.inf if v is None else float(v)) for n, v in row.items()}
                    for m, row in scores.items()}

        return cls(lengths=[int(n) for n in doc["lengths"]], ppl=table(doc["ppl"]), samples=int(doc["samples"]),
                   model=str(doc["model"]), factors=doc["factors"], passkey=table(doc["passkey"]))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    def merged_into(self, path: Path) -> "EvalResult":
        """This result on top of an earlier eval.json of the same samples: a quick run never erases a long one."""
        try:
            old = EvalResult.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return self  # none yet, or unreadable: replaced by this complete result
        if (old.samples, old.model, old.factors) != (self.samples, self.model, self.factors):
            return self
        merged = {name: {m: {**getattr(old, name).get(m, {}), **row} for m, row in getattr(self, name).items()}
                  for name in ("ppl", "passkey")}
        for name in ("ppl", "passkey"):
            for m, row in getattr(old, name).items():
                merged[name].setdefault(m, row)
        return EvalResult(sorted(set(old.lengths) | set(self.lengths)), merged["ppl"], self.samples, self.model,
                          self.factors, merged["passkey"])


def length_label(length: int, original_length: int | None = None) -> str:
    """4096 -> '4k'; with the window known, '32k (8x)'."""
    text = format_length(length)
    return f"{text} ({length / original_length:g}x)" if original_length else text


def render_tables(result: EvalResult, original_length: int | None = None) -> list[Any]:
    """Rich tables, rows = methods, columns = lengths; the best per column bold and starred (ties all starred)."""
    from rich.table import Table
    from rich.text import Text

    def build(title: str, scores: dict[str, dict[int, float]], better: Callable[..., float], fmt: str) -> Any:
        table = Table(title=title, caption="* best per length")
        table.add_column("method")
        for n in result.lengths:
            table.add_column(length_label(n, original_length), justify="right")
        best = {n: better(row[n] for row in scores.values()) for n in result.lengths}
        for method, row in scores.items():
            cells = []
            for n in result.lengths:
                value = row[n]
                top = math.isclose(value, best[n], rel_tol=1e-9)  # equal infinities count as a tie
                cells.append(Text(format(value, fmt) + ("*" if top else " "), style="bold green" if top else ""))
            table.add_row(method, *cells)
        return table

    tables = [build(f"perplexity on {result.samples} held-out samples, lower is better", result.ppl, min, ",.3f")]
    if result.passkey:
        tables.append(build("passkey retrieval accuracy, higher is better", result.passkey, max, ".2f"))
    return tables


# --- perplexity ---------------------------------------------------------------------------------------


def _unique_lengths(lengths: Sequence[int]) -> list[int]:
    return list(dict.fromkeys(int(n) for n in lengths))


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
    chunk_size: int = 1024,
    exclude: RunSampling | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Perplexity of every method at every length on `samples` held-out windows (see `heldout_windows`).

    Methods with identical factors, n_hat and mscale (all of them but longrope at length <= original) are scored
    once per length, so they report exactly the same number. `seed` orders the documents only without a run.
    """
    from longrope_search.fitness import Evaluator

    lengths = _unique_lengths(lengths)
    ppl: dict[str, dict[int, float]] = {}
    for length in lengths:
        ids, _ = heldout_windows(tokenizer, corpus, length, samples, seed, cache_dir, exclude)  # (samples, length)
        evaluator = Evaluator(model, ids, chunk_size=chunk_size)
        for method in methods_for(spec, length, ff):
            if progress is not None:
                progress(f"perplexity: {method.name} at {length} tokens")
            ppl.setdefault(method.name, {})[length] = evaluator.score(
                method.key, method.factors, method.n_hat, method.mscale
            ).ppl
    return EvalResult(lengths=lengths, ppl=ppl, samples=samples,
                      model=ff.model if ff is not None else str(getattr(model, "name_or_path", "")))


# --- passkey retrieval --------------------------------------------------------------------------------

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLER_WORDS = " ".join(FILLER).split(" ")
SENTENCE_STARTS = [i for i, word in enumerate(FILLER_WORDS) if i == 0 or FILLER_WORDS[i - 1].endswith(".")]
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NEW_TOKENS = 10  # greedy decoding budget for the answer


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: torch.Tensor  # (n,) with n <= length, [bos] included when the tokenizer has one
    key: str  # the 5-digit number to retrieve
    depth: float  # share of the filler words placed before the needle


def _filler(start: int, count: int) -> str:
    """`count` filler words from word index `start` of the endlessly repeated sentences."""
    size = len(FILLER_WORDS)
    return " ".join(FILLER_WORDS[i % size] for i in range(start, start + count))


def _needle_word(depth: float, words: int) -> int:
    """The sentence start (in word index) nearest to depth * words, so the needle never splits a sentence."""
    target = depth * words
    cycles, size = int(target // len(FILLER_WORDS)), len(FILLER_WORDS)
    starts = [c * size + s for c in (cycles, cycles + 1) for s in SENTENCE_STARTS]
    return min((s for s in starts if s <= words), key=lambda s: abs(s - target), default=0)


def _prompt_ids(tokenizer: Any, key: str, depth: float, words: int) -> tuple[list[int], float]:
    split = _needle_word(depth, words)
    parts = [INTRO, _filler(0, split), NEEDLE.format(key=key), _filler(split, words - split)]
    text = " ".join(p for p in parts if p) + "\n" + QUESTION
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # as data.py builds windows
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"], split / words if words else 0.0


def passkey_prompt(tokenizer: Any, length: int, key: str, depth: float) -> PasskeyPrompt:
    """The prompt of at most `length` tokens (short by less than one filler word) with the key at `depth` of the filler.

    Filler words are added until the next one would pass `length`; the count is estimated from the tokens per word,
    then corrected on the real tokenisation of the whole prompt.
    """
    fixed, _ = _prompt_ids(tokenizer, key, depth, 0)
    if len(fixed) > length:
        raise ConfigError(
            f"a passkey prompt needs {len(fixed)} tokens before any filler but the length is {length}; "
            "evaluate passkey retrieval at longer lengths."
        )
    sample = 10 * len(FILLER_WORDS)
    per_word = len(tokenizer(_filler(0, sample), add_special_tokens=False)["input_ids"]) / sample
    words = int((length - len(fixed)) / per_word)
    for _ in range(8):  # a few secant steps land within a word or two on real tokenisers
        size = len(_prompt_ids(tokenizer, key, depth, words)[0])
        step = int((length - size) / per_word)
        if step == 0:
            break
        words = max(words + step, 0)
    while words > 0 and len(_prompt_ids(tokenizer, key, depth, words)[0]) > length:
        words -= 1
    while len(_prompt_ids(tokenizer, key, depth, words + 1)[0]) <= length:
        words += 1
    ids, placed = _prompt_ids(tokenizer, key, depth, words)
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.long), key, placed)


def passkey_trials(trials: int, seed: int) -> list[tuple[str, float]]:
    """(5-digit key, depth in [0, 1]) per trial; the same for every length and method, so they compare fairly."""
    rng = np.random.default_rng(seed)
    return [(str(int(rng.integers(10_000, 100_000))), float(rng.uniform(0.0, 1.0))) for _ in range(trials)]


def retrieve(model: Any, tokenizer: Any, prompt: PasskeyPrompt) -> bool:
    """Greedy decoding of up to NEW_TOKENS tokens; True when the answer contains the key.

    The rotary module installed by `install_rope` computes cos/sin from position_ids on every forward, the cached
    decoding steps included, so generation runs the installed method.
    """
    from transformers import GenerationConfig

    ids = prompt.ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)  # (1, n)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy)  # (1, n + new)
    return prompt.key in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def passkey(
    model: Any,
    tokenizer: Any,
    spec: RopeSpec,
    lengths: Sequence[int],
    ff: FactorsFile | None,
    trials: int = 10,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, dict[int, float]]:
    """{method: {length: accuracy}}: the share of `trials` prompts whose greedy answer contains the key."""
    from longrope_search.model import install_rope

    if trials < 1:
        raise ConfigError(f"cannot run {trials} passkey trials; pass --trials 1 or more.")
    accuracy: dict[str, dict[int, float]] = {}
    for length in _unique_lengths(lengths):
        prompts = [passkey_prompt(tokenizer, length, key, depth) for key, depth in passkey_trials(trials, seed)]
        hits: dict[str, float] = {}  # method key -> accuracy, shared by identical methods
        for method in methods_for(spec, length, ff):
            if progress is not None:
                progress(f"passkey: {method.name} at {length} tokens")
            if method.key not in hits:
                install_rope(model, method.factors, method.n_hat, method.mscale)
                hits[method.key] = sum(retrieve(model, tokenizer, p) for p in prompts) / trials
            accuracy.setdefault(method.name, {})[length] = hits[method.key]
    return accuracy


# --- orchestration ------------------------------------------------------------------------------------


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
) -> EvalResult:
    """`longrope eval`: a run directory (model, corpus and factors from it; writes RUN/eval.json), or
    --model with --factors and --data. Input checks run before the weights load (passkey lengths, which need the
    tokenizer, right after), so a mistake never costs a long evaluation.

    Lengths may be relative ('8x' of the factors' original window) or absolute ('16k'). passkey_trials 0 skips
    passkey retrieval. samples defaults to the run's data.heldout_samples (or DEFAULT_SAMPLES). seed picks the
    passkey trials, and the documents without a run (a run's held-out windows follow its own data.seed).
    """
    from longrope_search.factors import load_factors
    from longrope_search.model import load_config, load_model, rope_spec

    if not lengths:
        raise ConfigError("no lengths to evaluate; pass --lengths, e.g. --lengths 1x,8x,16x or 4k,32k.")
    exclude: RunSampling | None = None
    if run_dir is not None:
        from longrope_search import checkpoint
        from longrope_search.search import resolved_config_for_resume

        if factors is not None or data is not None:
            raise ConfigError(
                "RUN_DIR evaluates the run's factors on its own corpus; to use other factors or data, drop RUN_DIR and "
                "pass --model, --factors (a run directory or factors.json) and --data."
            )
        run_dir = Path(run_dir)
        config, _ = resolved_config_for_resume(run_dir, {})
        ff = load_factors(run_dir)
        factors_path = run_dir / "factors.json"
        model = model or config.model.name
        d = config.data
        corpus = CorpusSpec.of(d)
        fingerprint = None
        if (run_dir / "state").is_dir():
            fingerprint = checkpoint.load_state(run_dir)[0].fingerprint.get("data")
        exclude = RunSampling(ff.scored_length, d.samples, d.heldout_samples, d.seed, fingerprint)
        samples = (d.heldout_samples or DEFAULT_SAMPLES) if samples is None else samples
        device = device or (None if config.model.device == "auto" else config.model.device)
        dtype, cache_dir, chunk_size = dtype or config.model.dtype, d.cache_dir, config.search.chunk_size
        mlp_chunk = config.search.mlp_chunk
    else:
        if model is None or factors is None:
            raise ConfigError("pass a run directory, or --model with --factors (a run directory or factors.json).")
        if data is None:
            raise ConfigError("pass --data with the corpus to measure perplexity on: builtin:NAME, hub:NAME or a path.")
        ff = load_factors(factors)
        factors_path = Path(factors) / "factors.json" if Path(factors).is_dir() else Path(factors)
        corpus = CorpusSpec(data)
        samples = DEFAULT_SAMPLES if samples is None else samples
        cache_dir, chunk_size, mlp_chunk = None, 1024, 16384
    if samples < 1:
        raise ConfigError(f"cannot evaluate on {samples} samples; pass --samples 1 or more.")
    if passkey_trials < 0:
        raise ConfigError(f"cannot run {passkey_trials} passkey trials; pass --trials 1 or more.")

    spec = ff.rope  # carries a window override (model.original_length) the model's config does not know
    check_geometry(rope_spec(load_config(model)), ff)
    resolved = [parse_length(n, spec.original_length) for n in lengths]

    loaded, tokenizer = load_model(model, device=device, dtype=dtype, mlp_chunk=mlp_chunk)
    if passkey_trials:
        passkey_prompt(tokenizer, min(resolved), "00000", 0.5)  # a too-short length fails now, not after the PPL
    result = eval_ppl(loaded, tokenizer, spec, corpus, resolved, ff, samples, seed, cache_dir, chunk_size, exclude,
                      progress)
    if passkey_trials:
        result.passkey = passkey(loaded, tokenizer, spec, resolved, ff, passkey_trials, seed, progress)
    result.model, result.factors = model, str(factors_path)
    if run_dir is not None:
        result.merged_into(run_dir / EVAL_FILE).save(run_dir / EVAL_FILE)
    return result
