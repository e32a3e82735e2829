"""Passkey retrieval: a 5-digit number hidden at a depth of repeated English filler sentences, asked back at the
end (the classic test of the LongRoPE and YaRN papers), scored by greedy decoding for each method and length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from longrope_search.errors import ConfigError
from longrope_search.factors import FactorsFile
from longrope_search.methods import methods_for, unique_lengths
from longrope_search.model import greedy_continuation, install_rope
from longrope_search.progress import Countdown
from longrope_search.rope import RopeSpec

Progress = Callable[[str], None]

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
    """Greedy decoding of up to NEW_TOKENS tokens with the installed RoPE; True when the answer contains the key."""
    return prompt.key in greedy_continuation(model, tokenizer, prompt.ids, NEW_TOKENS)


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
    if trials < 1:
        raise ConfigError(f"cannot run {trials} passkey trials; pass --trials 1 or more.")
    accuracy: dict[str, dict[int, float]] = {}
    plan = {length: methods_for(spec, length, ff) for length in unique_lengths(lengths)}
    count = Countdown(sum(len(methods) for methods in plan.values()))
    for length, methods in plan.items():
        prompts = [passkey_prompt(tokenizer, length, key, depth) for key, depth in passkey_trials(trials, seed)]
        hits: dict[str, float] = {}  # method key -> accuracy, shared by identical methods
        for method in methods:
            if progress is not None:
                progress(f"passkey: {method.name} at {length} tokens ({count.next()})")
            if method.key not in hits:
                install_rope(model, method.factors, method.n_hat, method.mscale)
                hits[method.key] = sum(retrieve(model, tokenizer, p) for p in prompts) / trials
            accuracy.setdefault(method.name, {})[length] = hits[method.key]
    return accuracy
