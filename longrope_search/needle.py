"""The retrieval task: a number bound to a name somewhere in a code context, asked back at its end.

Owns the task's text in the code corpus's own idiom (a line `CACHE_TIMEOUT = 4817263` placed at a depth of
the filler, then `assert CACHE_TIMEOUT ==` at the end, answered by the number), the seeded draw of names and
numbers, and the token-level construction of one sample of an exact length. The training script, `longrope
eval --needle` and the needle fitness all build their samples here, so they measure the same task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from longrope_search.errors import ConfigError, DataError
from longrope_search.fitness import IGNORE
from longrope_search.model import greedy_continuation

# Words of the constant names (two of them, upper case, joined by "_"): ordinary identifiers of Python code.
NAME_WORDS = (
    "BUFFER", "CACHE", "CHUNK", "CLIENT", "CONFIG", "COUNT", "DEFAULT", "DELAY", "DEPTH", "ERROR", "EVENT", "FIELD",
    "FILE", "FRAME", "GROUP", "HEADER", "INDEX", "ITEM", "KEY", "LIMIT", "LINE", "LOCK", "MAX", "MIN", "MODE",
    "NODE", "OFFSET", "OPTION", "PAGE", "PATH", "POOL", "PORT", "QUEUE", "RANGE", "RETRY", "ROOT", "ROW", "SEED",
    "SERVER", "SESSION", "SIZE", "SLOT", "STACK", "STATE", "STEP", "TABLE", "TASK", "TIMEOUT", "TOKEN", "TOTAL",
    "USER", "VALUE", "WIDTH", "WINDOW", "WORKER",
)
DIGITS = (5, 7)  # the number has 5 to 7 digits, no leading zero
BINDING = "\n{name} = {value}\n"  # inserted at a line break: the assignment on a line of its own
QUESTION = "\nassert {name} =="
ANSWER = " {value}"
LINE_SEARCH = 64  # tokens either side of the wanted depth searched for a line break


# The joint fitness's answers carry a signal only where some candidate finds them: a uniform guess of a number of
# DIGITS[0] digits costs DIGITS[0] ln 10 nats whatever the tokenizer, and an answer loss above this share of it per
# needle is treated as chance (docs/search-cost.md: the best of generation 0 reaches 0.12 of it on the shipped Llama at 8x,
# 1.4 on the Qwen2).
CHANCE_SHARE = 0.5


def answers_found(answer_means: Sequence[float], answer_rows: torch.Tensor, needles: int) -> bool:
    """Whether a candidate's answers beat chance: its mean answer loss per needle (each window's mean over its
    answer rows (n, L-1) times their count, over its `needles`) below CHANCE_SHARE of a uniform guess's."""
    per_window = [mean * float(rows.sum()) / needles for mean, rows in zip(answer_means, answer_rows)]
    return sum(per_window) / len(per_window) < CHANCE_SHARE * DIGITS[0] * math.log(10)


@dataclass(frozen=True)
class Needle:
    name: str  # e.g. CACHE_TIMEOUT
    value: str  # e.g. 4817263


def draw_needles(rng: np.random.Generator, count: int) -> list[Needle]:
    """`count` needles with distinct names and distinct values, drawn from the caller's RNG (fixed draw order)."""
    if not 1 <= count <= 64:
        raise ConfigError(f"a needle sample holds 1 to 64 keys, not {count}.")
    needles: list[Needle] = []
    while len(needles) < count:
        first, second = rng.choice(len(NAME_WORDS), size=2, replace=False)
        digits = int(rng.integers(DIGITS[0], DIGITS[1] + 1))
        value = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        needle = Needle(f"{NAME_WORDS[first]}_{NAME_WORDS[second]}", value)
        if all(n.name != needle.name and n.value != needle.value for n in needles):
            needles.append(needle)
    return needles


@dataclass(frozen=True)
class NeedleSample:
    """One sample of exactly `length` tokens: [bos] filler-with-needles question answer."""

    ids: torch.Tensor  # (length,) int64
    answer_start: int  # ids[answer_start:] are the answer tokens
    value: str  # the number asked for
    depth: float  # where the asked needle landed: share of the filler before it, 0..1

    @property
    def prompt(self) -> torch.Tensor:
        """What a model is given to answer: everything before the answer.  # (answer_start,)"""
        return self.ids[: self.answer_start]

    @property
    def answer(self) -> torch.Tensor:
        return self.ids[self.answer_start :]

    @property
    def predicting(self) -> torch.Tensor:
        """Positions whose next-token prediction is an answer token.  # (answer tokens,)"""
        return torch.arange(self.answer_start - 1, self.ids.shape[0] - 1)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def question_and_answer(tokenizer: Any, needle: Needle) -> tuple[list[int], list[int]]:
    """Token ids of the question and of its answer, split where the joint tokenisation splits."""
    question = QUESTION.format(name=needle.name)
    answer = ANSWER.format(value=needle.value)
    q, both = _encode(tokenizer, question), _encode(tokenizer, question + answer)
    if both[: len(q)] == q and len(both) > len(q):
        return q, both[len(q) :]
    return q, _encode(tokenizer, answer)  # a tokeniser that merges across the boundary: encode apart


def needle_overhead(tokenizer: Any, needles: Sequence[Needle], asked: int | Sequence[int] = 0) -> int:
    """Tokens a sample spends on anything but filler: bos, the bindings, and each asked question with its answer."""
    bos = 1 if tokenizer.bos_token_id is not None else 0
    asked = [asked] if isinstance(asked, int) else list(asked)
    bindings = sum(len(_encode(tokenizer, BINDING.format(name=n.name, value=n.value))) for n in needles)
    return bos + bindings + sum(len(q) + len(a) for q, a in (question_and_answer(tokenizer, needles[j]) for j in asked))


def _line_break(tokenizer: Any, filler: Sequence[int], want: int) -> int:
    """The token boundary nearest to `want` at a line break of the filler (after a token that ends one, or before
    a token that starts one; 0 and the end count too), so a needle never splits a line; `want` if none is near."""

    def at_break(p: int) -> bool:
        if p in (0, len(filler)):
            return True
        return tokenizer.decode([filler[p - 1]]).endswith("\n") or tokenizer.decode([filler[p]]).startswith("\n")

    for offset in range(LINE_SEARCH + 1):
        for p in (want - offset, want + offset):
            if 0 <= p <= len(filler) and at_break(p):
                return p
    return want


def _filled(tokenizer: Any, filler: Sequence[int], length: int, needles: Sequence[Needle], depths: Sequence[float],
            asked: Sequence[int]) -> tuple[list[int], list[float]]:
    """[bos] + the filler's first tokens with needle j bound at `depths[j]` of it (at the nearest line break), leaving
    exactly the room the questions and answers of `asked` take; and where each needle landed (share of the filler)."""
    if len(depths) != len(needles) or not asked or any(not 0 <= j < len(needles) for j in asked):
        raise ConfigError("give one depth per needle and ask for one of them.")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ConfigError(f"needle depths are shares of the context, from 0 to 1; got {list(depths)}.")
    overhead = needle_overhead(tokenizer, needles, asked)
    room = length - overhead
    if room < 0:
        raise ConfigError(
            f"a needle sample needs {overhead} tokens before any filler but the length is {length}; "
            f"use lengths of at least {overhead} tokens."
        )
    if len(filler) < room:
        raise DataError(f"the filler document has {len(filler)} tokens but {room} are needed for a {length}-token "
                        "needle sample; use longer documents or a shorter length.")
    filler = list(filler[:room])
    places = [_line_break(tokenizer, filler, int(round(d * room))) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (places[j], j))
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    done = 0
    for j in order:
        ids += filler[done : places[j]] + _encode(tokenizer, BINDING.format(name=needles[j].name, value=needles[j].value))
        done = places[j]
    return ids + filler[done:], [p / room if room else 0.0 for p in places]


def build_sample(
    tokenizer: Any, filler: Sequence[int], length: int, needles: Sequence[Needle], depths: Sequence[float],
    asked: int = 0,
) -> NeedleSample:
    """A sample of `length` tokens: the first tokens of `filler` with needle j placed at `depths[j]` of it (at the
    nearest line break), then the question for needle `asked`, then its answer.

    filler: token ids of one document (no bos); it must hold at least length - overhead tokens.
    """
    ids, landed = _filled(tokenizer, filler, length, needles, depths, [asked])
    question, answer = question_and_answer(tokenizer, needles[asked])
    ids += question
    answer_start = len(ids)
    ids += answer
    assert len(ids) == length, (len(ids), length)  # overhead counted exactly the tokens added
    return NeedleSample(torch.tensor(ids, dtype=torch.long), answer_start, needles[asked].value, landed[asked])


@dataclass(frozen=True)
class AskedWindow:
    """A window of exactly `length` tokens with several needles, every one of them asked at its end in turn:
    [bos] filler-with-needles, then `assert NAME == VALUE` for each, in `asked` order. What the joint fitness scores:
    the answers' tokens (several per window, so more retrieval evidence per forward token) and the rest as text."""

    ids: torch.Tensor  # (length,) int64
    answer_rows: torch.Tensor  # (length - 1,) bool: the positions whose next token is an answer token
    depths: tuple[float, ...]  # where each needle landed, in needle order


def build_window(tokenizer: Any, filler: Sequence[int], length: int, needles: Sequence[Needle],
                 depths: Sequence[float], asked: Sequence[int]) -> AskedWindow:
    """`build_sample` with every needle of `asked` questioned at the end, one line after the other, each followed by
    its answer."""
    ids, landed = _filled(tokenizer, filler, length, needles, depths, asked)
    rows = torch.zeros(length - 1, dtype=torch.bool)  # (L-1,)
    for j in asked:
        question, answer = question_and_answer(tokenizer, needles[j])
        ids += question
        rows[len(ids) - 1 : len(ids) - 1 + len(answer)] = True  # position i predicts token i + 1
        ids += answer
    assert len(ids) == length, (len(ids), length)  # overhead counted exactly the tokens added
    return AskedWindow(torch.tensor(ids, dtype=torch.long), rows, tuple(landed))


def leading_number(text: str) -> str | None:
    """The number a generated answer starts with (after spaces), or None: what exact match compares."""
    text = text.lstrip()
    end = 0
    while end < len(text) and text[end].isdigit():
        end += 1
    return text[:end] or None


def greedy_answer(model: Any, tokenizer: Any, sample: NeedleSample) -> str:
    """The model's greedy continuation of the sample's prompt (with the installed RoPE), as text: as many tokens as
    the answer has plus two, enough to see whether the number goes on."""
    return greedy_continuation(model, tokenizer, sample.prompt, sample.answer.shape[0] + 2)


def is_retrieved(sample: NeedleSample, text: str) -> bool:
    """Exact match of the whole number: the continuation starts with the asked value and no further digit."""
    return leading_number(text) == sample.value


def needle_samples(tokenizer: Any, windows: torch.Tensor, rng: np.random.Generator) -> list[NeedleSample]:
    """One needle sample per window: window i's document with one needle at depth i / (n - 1) (spread evenly over
    the samples; 0.5 for a single one), its question and answer at the end, the same length as the window.

    windows: (n, L) [bos] + a document's first tokens (data.build_samples); the needles come from `rng`, in order.
    """
    n, length = windows.shape
    skip = 1 if tokenizer.bos_token_id is not None else 0
    return [build_sample(tokenizer, windows[i, skip:].tolist(), length, draw_needles(rng, 1),
                         [i / (n - 1) if n > 1 else 0.5]) for i in range(n)]


def asked_windows(tokenizer: Any, windows: torch.Tensor, rng: np.random.Generator, keys: int = 1) -> list[AskedWindow]:
    """`keys` needles in each window, all asked at its end (in an order drawn from `rng` when there are several):
    needle j of window i at depth (j * n + i) / (keys * n - 1), so the n * keys needles of the set spread evenly over
    the depths. With one key this is `needle_samples` token for token.

    windows: (n, L) [bos] + a document's first tokens (data.build_samples); the needles come from `rng`, in order.
    """
    n, length = windows.shape
    skip = 1 if tokenizer.bos_token_id is not None else 0
    spread = keys * n - 1
    out = []
    for i in range(n):
        needles = draw_needles(rng, keys)
        order = [0] if keys == 1 else [int(j) for j in rng.permutation(keys)]
        depths = [(j * n + i) / spread if spread else 0.5 for j in range(keys)]
        out.append(build_window(tokenizer, windows[i, skip:].tolist(), length, needles, depths, order))
    return out


def answer_targets(windows: Sequence[AskedWindow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows' ids (n, L), their next tokens (n, L-1) and the answer rows among them (n, L-1) bool. All windows
    have one length."""
    ids = torch.stack([w.ids for w in windows])  # (n, L)
    return ids, ids[:, 1:].clone(), torch.stack([w.answer_rows for w in windows])


def answers_only(targets: torch.Tensor, answer_rows: torch.Tensor) -> torch.Tensor:
    """`targets` (n, L-1) scored only at the answer rows (IGNORE elsewhere): the needle fitness's targets."""
    return torch.where(answer_rows, targets, torch.full_like(targets, IGNORE))


def text_only(targets: torch.Tensor, answer_rows: torch.Tensor) -> torch.Tensor:
    """`targets` (n, L-1) scored everywhere but at the answer rows: the text half of the joint fitness."""
    return torch.where(answer_rows, torch.full_like(targets, IGNORE), targets)
