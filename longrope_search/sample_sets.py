"""The sample sets of a search, drawn once from disjoint documents of the corpus: search (the fitness), validation (the
choice of the winner, and early stopping) and held-out (the number reported, never used to decide anything), with
a needle in each window where the fitness or the final comparison asks for one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from longrope_search import data
from longrope_search.config import Config
from longrope_search.corpus import CorpusSpec
from longrope_search.errors import ConfigError
from longrope_search.fitness import Joint
from longrope_search.needle import NeedleSample, answer_targets, answers_only, asked_windows, needle_samples

# Needles of each set come from their own generator: (data.seed, NEEDLE_STREAMS[set]).
NEEDLE_STREAMS = {"search": 1, "heldout": 2, "validation": 3}


@dataclass(frozen=True)
class Scored:
    """Windows as a fitness scores them: ids (n, L), the targets (n, L-1) it scores (None: every next token) and, for
    the joint fitness, which of them are answers."""

    ids: torch.Tensor
    targets: torch.Tensor | None = None
    joint: Joint | None = None

    @property
    def count(self) -> int:
        return self.ids.shape[0]


@dataclass(frozen=True)
class Split:
    """A search's documents, drawn once: the search windows, then the held-out ones and after them the validation
    ones (so adding validation leaves a config's search and held-out windows as they were)."""

    windows: data.Samples  # .heldout holds the held-out windows, then the validation windows
    heldout_samples: int

    @property
    def heldout(self) -> torch.Tensor:
        return self.windows.heldout[: self.heldout_samples]  # (m, L)

    @property
    def validation(self) -> torch.Tensor:
        return self.windows.heldout[self.heldout_samples:]  # (v, L)

    @property
    def decided_docs(self) -> set[int]:
        """The corpus rows the search decided with (search and validation): what evaluation must not score."""
        return set(self.windows.search_docs) | set(self.windows.heldout_docs[self.heldout_samples:])


def draw_split(tokenizer: Any, corpus: CorpusSpec, length: int, samples: int, heldout: int, validation: int,
               seed: int, cache_dir: Any = None) -> Split:
    """The documents of a search with these data settings at `length` tokens (the sample cache keeps them)."""
    windows = data.build_samples(tokenizer, corpus, length, samples, heldout + validation, seed, cache_dir)
    return Split(windows, heldout)


@dataclass(frozen=True)
class SampleSets:
    windows: data.Samples  # the plain windows: search, then held-out and validation together
    search: Scored
    heldout: Scored  # scored like the search (needles with the needle fitness)
    heldout_plain: torch.Tensor  # (m, L) the held-out windows without needles: plain perplexity
    heldout_needles: list[NeedleSample]  # one needle per held-out window: the retrieval column of the comparison
    validation: Scored | None  # None: data.validation_samples is 0


def reweighed(sets: SampleSets, weight: float) -> SampleSets:
    """The sets with the joint fitness's answers at `weight` (search, validation and held-out alike)."""
    def scored(s: Scored | None) -> Scored | None:
        return s if s is None or s.joint is None else dataclasses.replace(s, joint=s.joint.reweighed(weight))
    return dataclasses.replace(sets, search=scored(sets.search), heldout=scored(sets.heldout),
                               validation=scored(sets.validation))


def sample_sets(tokenizer: Any, config: Config, length: int) -> SampleSets:
    """The search's sets at `length` tokens, on the documents of `draw_split`."""
    d = config.data
    split = draw_split(tokenizer, CorpusSpec.of(d), length, d.samples, d.heldout_samples, d.validation_samples,
                       d.seed, d.cache_dir)
    windows, heldout_plain, validation_plain = split.windows, split.heldout, split.validation
    s = config.search
    needle = s.fitness != "ppl"  # the windows hold needles

    def scored(ids: torch.Tensor, name: str) -> Scored:
        if not needle:
            return Scored(ids)
        try:
            windows = asked_windows(tokenizer, ids, _needle_rng(d.seed, name), s.needles)
        except ConfigError as exc:
            raise ConfigError(f"search.fitness {s.fitness} hides {s.needles} needles in each {length}-token window: "
                              f"{str(exc).rstrip('.')}; lower search.needles, or set search.fitness: ppl.") from None
        ids, targets, rows = answer_targets(windows)
        if s.fitness == "joint":
            return Scored(ids, targets, Joint(rows, s.needle_weight))
        return Scored(ids, answers_only(targets, rows))

    search = scored(windows.search, "search")
    try:  # the comparison's retrieval column (with the needle fitness: the held-out samples themselves)
        heldout_needles = needle_samples(tokenizer, heldout_plain, _needle_rng(d.seed, "heldout"))
    except ConfigError:
        if needle:
            raise
        heldout_needles = []  # windows too short for a needle prompt (a short search of a tiny window): no column
    validation = scored(validation_plain, "validation") if d.validation_samples else None
    heldout = scored(heldout_plain, "heldout") if needle and heldout_needles else Scored(heldout_plain)
    return SampleSets(windows, search, heldout, heldout_plain, heldout_needles, validation)


def _needle_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, NEEDLE_STREAMS[name]])
