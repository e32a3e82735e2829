"""The pure part of LongRoPE's evolutionary search: the factor grid, candidates, the initial
population, mutation, crossover and selection. numpy only; every random choice comes from the
caller's `np.random.Generator` in a fixed order, so one RNG state always yields the same candidates.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from longrope_search.errors import SearchError

# Each retry loop gives up after this many tries per requested candidate: enough that a healthy
# space never hits it, small enough that an exhausted one fails in well under a second.
TRIES_PER_CANDIDATE = 100

EXHAUSTED_FIX = "raise the mutation probability, widen max_factor or use a finer step"
MSCALE_REACH = 5  # a mutated attention factor moves at most this many grid steps


@dataclass(frozen=True)
class SearchSpace:
    """Factors on the grid `min_factor + step * g`, g = 0 … num_levels-1, plus a choice of n_hat and,
    when `mscale_choices` is given, of the attention factor (LongRoPE2 searches it as one more gene).

    The top grid value is the largest one not above `max_factor` (equal to it when the range is a
    whole number of steps). `n_hat_choices` is stored sorted, so neighbouring choices are adjacent.
    """

    num_factors: int  # the searched rotary pairs (all of them, or those from the critical dimension on)
    max_factor: float
    min_factor: float = 1.0
    step: float = 0.01
    monotonic: bool = True  # factors non-decreasing with the pair index (the paper's constraint)
    n_hat_choices: tuple[int, ...] = (0,)
    mscale_choices: tuple[float, ...] = ()  # ascending; empty: the attention factor is not searched
    mscale_start: int = 0  # index of the seeds' attention factor in mscale_choices

    def __post_init__(self) -> None:
        if not _is_int(self.num_factors) or self.num_factors < 1:
            raise SearchError(
                "num_factors must be a positive integer (rotary_dim // 2), got "
                f"{self.num_factors!r}."
            )
        for name in ("min_factor", "max_factor", "step"):
            if not math.isfinite(getattr(self, name)):
                raise SearchError(
                    f"{name} must be a finite number, got {getattr(self, name)!r}; "
                    "set it in the search config."
                )
        if self.min_factor <= 0:
            raise SearchError(
                f"min_factor must be positive (a factor divides a frequency), got {self.min_factor}; "
                "use 1.0 for untouched dims."
            )
        if self.max_factor < self.min_factor:
            raise SearchError(
                f"max_factor {self.max_factor} is below min_factor {self.min_factor}; "
                "raise max_factor (the paper uses 1.25 * scale)."
            )
        if self.step <= 0:
            raise SearchError(f"step must be positive, got {self.step}; the paper uses a 0.01 grid.")
        choices = tuple(self.n_hat_choices)
        if not choices:
            raise SearchError(
                "n_hat_choices is empty; "
                "give at least one value, e.g. [0] to keep every position rescaled."
            )
        if any(not _is_int(n) or n < 0 for n in choices):
            raise SearchError(
                f"n_hat_choices must be non-negative integers, got {list(choices)}; "
                "e.g. [0, 4, 8, 16]."
            )
        if len(set(choices)) != len(choices):
            raise SearchError(f"n_hat_choices repeats values {list(choices)}; list each value once.")
        if self.mscale_choices and not 0 <= self.mscale_start < len(self.mscale_choices):
            raise SearchError(f"mscale_start {self.mscale_start} is not an index of the {len(self.mscale_choices)} "
                              "attention-factor choices.")
        object.__setattr__(self, "num_factors", int(self.num_factors))
        object.__setattr__(self, "n_hat_choices", tuple(sorted(int(n) for n in choices)))
        object.__setattr__(self, "mscale_choices", tuple(float(m) for m in self.mscale_choices))

    def num_levels(self) -> int:
        span = (self.max_factor - self.min_factor) / self.step
        # (10.0 - 1.0) / 0.01 is 899.999…: snap float noise so max_factor itself stays on the grid.
        nearest = round(span)
        if abs(span - nearest) <= 1e-9 * max(1.0, abs(span)):
            span = nearest
        return int(math.floor(span)) + 1

    def factors(self, genes: Sequence[int] | np.ndarray) -> np.ndarray:
        genes = np.asarray(genes, dtype=np.int64)  # (num_factors,)
        if genes.shape != (self.num_factors,):
            raise ValueError(f"expected {self.num_factors} genes, got shape {genes.shape}")
        return self.min_factor + self.step * genes.astype(np.float64)  # (num_factors,)

    def to_genes(self, factors: Sequence[float] | np.ndarray) -> np.ndarray:
        """Nearest grid index of each factor, clipped into the space (no monotonic repair)."""
        factors = np.asarray(factors, dtype=np.float64)  # (num_factors,)
        if factors.shape != (self.num_factors,):
            raise ValueError(f"expected {self.num_factors} factors, got shape {factors.shape}")
        if not np.all(np.isfinite(factors)):
            raise ValueError("factors contain NaN or inf")
        genes = np.rint((factors - self.min_factor) / self.step)
        return np.clip(genes, 0, self.num_levels() - 1).astype(np.int64)  # (num_factors,)

    def holds(self, factors: Sequence[float] | np.ndarray) -> bool:
        """True when `factors` (num_factors,), rounded to the grid, is a member as it is: in range and, in a monotonic
        space, non-decreasing, with nothing clipped or repaired (what `seed_candidates` does to a vector that is not)."""
        genes = np.rint((np.asarray(factors, dtype=np.float64) - self.min_factor) / self.step)  # (num_factors,)
        if genes.shape != (self.num_factors,) or genes.min() < 0 or genes.max() > self.num_levels() - 1:
            return False
        return not self.monotonic or bool(np.all(np.diff(genes) >= 0))

    def is_valid(self, cand: Candidate) -> bool:
        if len(cand.genes) != self.num_factors or cand.n_hat not in self.n_hat_choices:
            return False
        if (cand.mscale is None) != (not self.mscale_choices) or (
                cand.mscale is not None and not 0 <= cand.mscale < len(self.mscale_choices)):
            return False
        genes = np.asarray(cand.genes, dtype=np.int64)  # (num_factors,)
        if genes.min() < 0 or genes.max() >= self.num_levels():
            return False
        return not self.monotonic or bool(np.all(np.diff(genes) >= 0))

    def mscale(self, cand: Candidate) -> float | None:
        """The candidate's attention factor when it is searched, else None (the search's fixed one applies)."""
        return None if cand.mscale is None else self.mscale_choices[cand.mscale]


@dataclass(frozen=True)
class Candidate:
    """One point of the search: integer grid indices (exact equality and hashing), n_hat, and the index of
    its attention factor when that is searched."""

    genes: tuple[int, ...]
    n_hat: int = 0
    mscale: int | None = None  # index into SearchSpace.mscale_choices; None: not searched

    def __post_init__(self) -> None:
        # numpy integers would leak into JSON and keys; plain ints keep both exact and portable.
        object.__setattr__(self, "genes", tuple(int(g) for g in self.genes))
        object.__setattr__(self, "n_hat", int(self.n_hat))
        if self.mscale is not None:
            object.__setattr__(self, "mscale", int(self.mscale))

    @property
    def key(self) -> str:
        """Stable text identity, e.g. "n_hat=8|0,3,3,17" (with "|m=5" after n_hat when the attention factor is
        searched), for result caches, `seen` sets and logs."""
        mscale = "" if self.mscale is None else f"|m={self.mscale}"
        return f"n_hat={self.n_hat}{mscale}|" + ",".join(str(g) for g in self.genes)

    def to_json(self) -> dict:
        doc = {"genes": list(self.genes), "n_hat": self.n_hat}
        if self.mscale is not None:
            doc["mscale"] = self.mscale
        return doc

    @classmethod
    def from_json(cls, d: dict) -> Candidate:
        """Inverse of `to_json`. Raises ValueError on a malformed dict; the caller names the file."""
        if not isinstance(d, dict) or "genes" not in d or "n_hat" not in d:
            raise ValueError(f"a candidate must be a mapping with 'genes' and 'n_hat', got {d!r}")
        genes, n_hat, mscale = d["genes"], d["n_hat"], d.get("mscale")
        if (not isinstance(genes, list) or not all(_is_int(g) for g in genes) or not _is_int(n_hat)
                or not (mscale is None or _is_int(mscale))):
            raise ValueError(
                "a candidate's 'genes' must be a list of integers and 'n_hat' (and 'mscale', when present) an "
                f"integer, got {d!r}"
            )
        return cls(tuple(genes), n_hat, mscale)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise SearchError(
            f"the mutation/crossover probability must be within [0, 1], got {p}; "
            "the paper uses 0.3."
        )


def seed_candidates(space: SearchSpace, seeds: dict[str, np.ndarray]) -> dict[str, Candidate]:
    """Named factor vectors (PI, NTK, YaRN, a user file, ...) -> on-grid candidates, same order.

    Factors are rounded to the grid and clipped into range; in a monotonic space a running max then
    repairs any decrease (raising a factor keeps the low-frequency dims at least as interpolated).
    Seeds take the smallest n_hat choice (0 when offered, i.e. the baseline exactly as published);
    other n_hat values enter through mutation, so the seed count does not grow with the n_hat list.
    Two seeds may land on the same candidate; `initial_population` deduplicates.
    """
    out: dict[str, Candidate] = {}
    for name, vec in seeds.items():
        vec = np.asarray(vec, dtype=np.float64)  # (num_factors,)
        if vec.shape != (space.num_factors,):
            raise SearchError(
                f"seed {name!r} has {vec.size} factors but the model needs {space.num_factors} "
                "(rotary_dim // 2); give one factor per rotary pair."
            )
        if not np.all(np.isfinite(vec)):
            raise SearchError(f"seed {name!r} contains NaN or inf; fix or drop that factor vector.")
        genes = space.to_genes(vec)  # (num_factors,)
        if space.monotonic:
            genes = np.maximum.accumulate(genes)
        mscale = space.mscale_start if space.mscale_choices else None
        out[name] = Candidate(tuple(genes), space.n_hat_choices[0], mscale)
    return out


def distinct_seeds(space: SearchSpace, seeds: dict[str, np.ndarray]) -> list[Candidate]:
    """The seeds' candidates without repeats, in the order given (two seeds may land on one candidate): what
    generation 0 scores first."""
    return list({c.key: c for c in seed_candidates(space, seeds).values()}.values())


def competitive_seeds(scores: dict[str, float], margin: float) -> list[str]:
    """The seeds worth mutating: those whose PPL is within `margin` nats (log PPL) of the best seed's, in the order
    given. A seed far behind the best (PI at 8x: 49 against YaRN's 9.9) only breeds mutants that are as far behind
    and can never become parents. With no finite score, every seed (nothing tells them apart)."""
    finite = {name: math.log(ppl) for name, ppl in scores.items() if math.isfinite(ppl) and ppl > 0}
    if not finite:
        return list(scores)
    best = min(finite.values())
    return [name for name, nll in finite.items() if nll <= best + margin]


def initial_population(space: SearchSpace, seeds: dict[str, np.ndarray], size: int,
                       rng: np.random.Generator, p: float, breed: Collection[str] | None = None) -> list[Candidate]:
    """The distinct seeds first (in the order given), then mutants of random seeds up to `size`. With `breed` (see
    `competitive_seeds`) only the seeds it names join the population and breed its mutants (the others were scored
    and fell behind); the draws are the same as without it when it names all.

    Raises SearchError when the seeds alone exceed `size` or the space cannot supply `size`
    distinct candidates: at the start of a search that is a configuration mistake, not convergence.
    """
    if size < 1:
        raise SearchError(f"population size must be at least 1, got {size}; the paper uses 64.")
    _check_probability(p)
    named = seed_candidates(space, seeds)
    if not named:
        raise SearchError(
            "the initial population needs at least one seed; "
            "enable a baseline seed (pi, ntk, yarn) or give a factors file."
        )
    population: list[Candidate] = []
    keys: set[str] = set()  # membership only; order lives in `population`
    for name, cand in named.items():
        if cand.key not in keys and (breed is None or name in breed):
            population.append(cand)
            keys.add(cand.key)
    if len(population) > size:
        raise SearchError(
            f"{len(population)} distinct seeds do not fit a population of {size}; "
            "raise the population size or drop seeds."
        )
    bases = list(population)
    if not bases:
        raise ValueError(f"breed names none of the seeds {list(named)}")
    tries = 0
    while len(population) < size and tries < TRIES_PER_CANDIDATE * size:
        tries += 1
        cand = mutate(bases[rng.integers(len(bases))], space, rng, p)
        if cand.key not in keys and space.is_valid(cand):
            population.append(cand)
            keys.add(cand.key)
    if len(population) < size:
        raise SearchError(
            f"only {len(population)} distinct candidates found for a population of {size}; "
            f"lower the population size, {EXHAUSTED_FIX}."
        )
    return population


def mutate(cand: Candidate, space: SearchSpace, rng: np.random.Generator, p: float) -> Candidate:
    """Each gene with probability p is resampled uniformly on the grid; n_hat moves with probability p.

    Monotonic space: a gene is drawn within its neighbours' corridor [genes[i-1], genes[i+1]]
    (the reference code's move), so the child stays valid. Genes are visited in one direction and
    each sees its already-moved neighbour, so a run of equal factors (the PI seed) can open up from
    its end; the direction is drawn at random so runs spread up and down alike. Otherwise a gene
    is drawn from the whole grid. n_hat steps to a neighbouring choice in sorted order (a local
    move, like the genes'; either side with equal chance, the only side at an end). A searched
    attention factor moves with probability p to a uniform choice within MSCALE_REACH steps.
    May return `cand` unchanged (no gene drawn, or a collapsed corridor); callers deduplicate.
    """
    _check_probability(p)
    if not space.is_valid(cand):
        raise ValueError(f"cannot mutate a candidate outside the search space: {cand.key}")
    n = space.num_factors
    top = space.num_levels() - 1
    genes = np.array(cand.genes, dtype=np.int64)  # (n,)
    hit = rng.random(n) < p  # (n,) genes to resample
    if space.monotonic:
        order = range(n) if rng.random() < 0.5 else range(n - 1, -1, -1)
        for i in order:
            if hit[i]:
                lo = genes[i - 1] if i > 0 else 0
                hi = genes[i + 1] if i < n - 1 else top
                genes[i] = rng.integers(lo, hi + 1)
    else:
        genes[hit] = rng.integers(0, top + 1, size=int(hit.sum()))
    n_hat = cand.n_hat
    choices = space.n_hat_choices
    if len(choices) > 1 and rng.random() < p:
        j = choices.index(n_hat)
        if j == 0:
            j = 1
        elif j == len(choices) - 1:
            j -= 1
        else:
            j += 1 if rng.random() < 0.5 else -1
        n_hat = choices[j]
    mscale = cand.mscale
    if mscale is not None and rng.random() < p:
        lo, hi = max(mscale - MSCALE_REACH, 0), min(mscale + MSCALE_REACH, len(space.mscale_choices) - 1)
        mscale = int(rng.integers(lo, hi + 1))
    return Candidate(tuple(genes), n_hat, mscale)


def crossover(a: Candidate, b: Candidate, space: SearchSpace, rng: np.random.Generator,
              p: float) -> Candidate | None:
    """Child = a with each gene taken from b with probability p, n_hat from either parent (1/2 each).

    Returns None when the child breaks monotonicity (no repair: the paper rejects such children).
    """
    _check_probability(p)
    for parent in (a, b):
        if not space.is_valid(parent):
            raise ValueError(f"cannot cross a candidate outside the search space: {parent.key}")
    take_b = rng.random(space.num_factors) < p  # (num_factors,)
    genes = np.where(take_b, np.asarray(b.genes), np.asarray(a.genes))  # (num_factors,)
    n_hat = b.n_hat if rng.random() < 0.5 else a.n_hat
    mscale = a.mscale
    if mscale is not None and rng.random() < 0.5:
        mscale = b.mscale
    child = Candidate(tuple(genes), n_hat, mscale)
    return child if space.is_valid(child) else None


def _sort_key(item: tuple[Candidate, float]) -> tuple[bool, float, str]:
    cand, score = item
    finite = math.isfinite(score)
    # Lower ppl first; NaN/inf (diverged or failed evaluations) last; equal scores by key.
    return (not finite, float(score) if finite else 0.0, cand.key)


def select(scored: Sequence[tuple[Candidate, float]], k: int) -> list[Candidate]:
    """The k best distinct candidates by score (lower ppl is better), deterministic on ties.

    NaN and inf sort after every finite score; a candidate listed twice counts once, at its best.
    """
    if k < 1:
        raise SearchError(f"top-k must be at least 1, got {k}; the paper keeps 32 parents.")
    chosen: list[Candidate] = []
    keys: set[str] = set()
    for cand, _ in sorted(scored, key=_sort_key):
        if cand.key not in keys:
            chosen.append(cand)
            keys.add(cand.key)
            if len(chosen) == k:
                break
    return chosen


def next_generation(parents: Sequence[Candidate], space: SearchSpace, rng: np.random.Generator,
                    n_mutations: int, n_crossovers: int, p: float,
                    seen: Collection[str]) -> list[Candidate]:
    """The new candidates of `labelled_generation`, without their origins."""
    return [c for c, _ in labelled_generation(parents, space, rng, n_mutations, n_crossovers, p, seen)]


def labelled_generation(parents: Sequence[Candidate], space: SearchSpace, rng: np.random.Generator,
                        n_mutations: int, n_crossovers: int, p: float,
                        seen: Collection[str]) -> list[tuple[Candidate, str]]:
    """(candidate, "mutation" | "crossover"): n_mutations mutants of random parents, then n_crossovers children of random distinct pairs.

    Every returned candidate is valid, distinct from the others and its key is not in `seen` (the
    keys of every candidate ever evaluated). Each phase tries at most TRIES_PER_CANDIDATE times per
    requested candidate. A short generation is returned as is (late in a search the neighbourhood
    of converged parents runs dry; the caller logs the shortfall); only a generation with no new
    candidate at all raises SearchError, since the search could not continue.
    """
    if not parents:
        raise ValueError("next_generation needs at least one parent")
    if n_mutations < 0 or n_crossovers < 0:
        raise SearchError(
            "the numbers of mutants and crossover children must be >= 0, got "
            f"{n_mutations} and {n_crossovers}."
        )
    if n_crossovers > 0 and len(parents) < 2:
        raise SearchError(
            "crossover needs at least two parents; "
            "set top-k to 2 or more, or the number of crossover children to 0."
        )
    seen_keys = set(seen)  # membership only
    out: list[tuple[Candidate, str]] = []
    keys: set[str] = set()

    def accept(cand: Candidate | None, origin: str) -> bool:
        if cand is None or cand.key in seen_keys or cand.key in keys or not space.is_valid(cand):
            return False
        out.append((cand, origin))
        keys.add(cand.key)
        return True

    made, tries = 0, 0
    while made < n_mutations and tries < TRIES_PER_CANDIDATE * n_mutations:
        tries += 1
        made += accept(mutate(parents[rng.integers(len(parents))], space, rng, p), "mutation")
    made, tries = 0, 0
    while made < n_crossovers and tries < TRIES_PER_CANDIDATE * n_crossovers:
        tries += 1
        i = int(rng.integers(len(parents)))
        j = int(rng.integers(len(parents) - 1))
        j += j >= i  # a uniform second index different from i
        made += accept(crossover(parents[i], parents[j], space, rng, p), "crossover")
    requested = n_mutations + n_crossovers
    if not out and requested > 0:
        raise SearchError(
            "the search space is exhausted: no new valid candidate in "
            f"{TRIES_PER_CANDIDATE * requested} tries; {EXHAUSTED_FIX}."
        )
    return out
