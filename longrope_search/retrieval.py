"""`longrope eval --needle`: needle retrieval accuracy per method, length and depth, for a single needle and for
several keys with one asked, on held-out documents; greedy decoding, exact match of the whole number.

Every method sees the same prompts: trial t of a variant uses filler document t and the same needles at every
length and depth, so differences between methods are differences of the RoPE alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from longrope_search.errors import ConfigError
from longrope_search.factors import FactorsFile
from longrope_search.methods import methods_for, unique_lengths
from longrope_search.model import install_rope
from longrope_search.progress import Countdown
from longrope_search.needle import Needle, NeedleSample, build_sample, draw_needles, greedy_answer, is_retrieved
from longrope_search.rope import RopeSpec

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of the context before the asked needle
DEFAULT_TRIALS = 20  # prompts per (length, depth) cell
DEFAULT_KEYS = 4  # needles in a multi-key prompt, one of them asked
VARIANTS = ("single", "multikey")

Progress = Callable[[str], None]
# variant -> method -> length -> depth -> share of trials answered exactly
Accuracy = dict[str, dict[str, dict[int, dict[float, float]]]]


@dataclass(frozen=True)
class NeedleSettings:
    trials: int = DEFAULT_TRIALS
    depths: tuple[float, ...] = DEPTHS
    keys: int = DEFAULT_KEYS
    seed: int = 0

    def check(self) -> None:
        problems = []
        if self.trials < 1:
            problems.append(f"--needle-trials must be at least 1 (got {self.trials})")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            problems.append(f"--depths are shares of the context from 0 to 1, e.g. 0,0.25,0.5,0.75,1 (got "
                            f"{','.join(f'{d:g}' for d in self.depths) or 'none'})")
        if not 2 <= self.keys <= 64:
            problems.append(f"--keys (needles in a multi-key prompt) must be 2 to 64 (got {self.keys})")
        if problems:
            raise ConfigError("; ".join(problems) + ".")

    def key_count(self, variant: str) -> int:
        return 1 if variant == "single" else self.keys


@dataclass(frozen=True)
class Trial:
    needles: list[Needle]
    asked: int  # the needle asked for, placed at the cell's depth
    other_depths: list[float]  # where the others go (uniform), in needle order without the asked one

    def depths(self, depth: float) -> list[float]:
        others = iter(self.other_depths)
        return [depth if j == self.asked else next(others) for j in range(len(self.needles))]


def draw_trials(settings: NeedleSettings, variant: str) -> list[Trial]:
    """The variant's trials, from a generator seeded by (seed, variant): the same for every length, depth and method."""
    rng = np.random.default_rng([settings.seed, VARIANTS.index(variant)])
    trials = []
    for _ in range(settings.trials):
        needles = draw_needles(rng, settings.key_count(variant))
        asked = int(rng.integers(len(needles)))
        trials.append(Trial(needles, asked, [float(x) for x in rng.uniform(0.0, 1.0, len(needles) - 1)]))
    return trials


def cell_samples(tokenizer: Any, fillers: Sequence[Sequence[int]], length: int, depth: float,
                 trials: Sequence[Trial]) -> list[NeedleSample]:
    """One sample per trial at this length and depth; trial t takes filler document t."""
    return [build_sample(tokenizer, fillers[t], length, trial.needles, trial.depths(depth), trial.asked)
            for t, trial in enumerate(trials)]


def accuracy(model: Any, tokenizer: Any, samples: Sequence[NeedleSample]) -> float:
    """Share of samples the model (with its installed RoPE) answers with exactly the asked number."""
    return sum(is_retrieved(s, greedy_answer(model, tokenizer, s)) for s in samples) / len(samples)


def needle_accuracy(
    model: Any, tokenizer: Any, spec: RopeSpec, lengths: Sequence[int], ff: FactorsFile | None,
    fillers: Sequence[Sequence[int]], settings: NeedleSettings, progress: Progress | None = None,
    only: Sequence[str] | None = None,
) -> Accuracy:
    """Accuracy of every method (methods.methods_for) per variant, length and depth. `fillers`: token ids of at least
    `settings.trials` held-out documents (no bos), each at least as long as the longest length. `only`: these
    methods by name (default all)."""
    settings.check()
    if len(fillers) < settings.trials:
        raise ConfigError(f"{settings.trials} needle trials need as many filler documents, got {len(fillers)}.")
    out: Accuracy = {}
    plan = {length: methods_for(spec, length, ff, only) for length in unique_lengths(lengths)}
    count = Countdown(len(VARIANTS) * sum(len(methods) for methods in plan.values()))
    for variant in VARIANTS:
        trials = draw_trials(settings, variant)
        for length, methods in plan.items():
            cells = {depth: cell_samples(tokenizer, fillers, length, depth, trials) for depth in settings.depths}
            scored: dict[str, dict[float, float]] = {}  # method key -> depth -> accuracy, shared by equal methods
            for method in methods:
                if progress is not None:
                    progress(f"needle ({variant}): {method.name} at {length} tokens, {len(cells)} depths x "
                             f"{settings.trials} prompts ({count.next()})")
                if method.key not in scored:
                    install_rope(model, method.factors, method.n_hat, method.mscale)
                    scored[method.key] = {depth: accuracy(model, tokenizer, samples) for depth, samples in cells.items()}
                out.setdefault(variant, {}).setdefault(method.name, {})[length] = scored[method.key]
    return out


def mean_over_depths(by_depth: dict[float, float]) -> float:
    return sum(by_depth.values()) / len(by_depth)
