"""A search's setup: everything derived from the config and the model's geometry before any weights load.

`SearchSetup` is what one search scores: the target length, the search space, the attention factor, the
factors it builds on (`Prior`, a previous stage) and the seeds of its first population (`identity.run_identity`
builds what a resume must match from it). A setup is immutable: the attention-factor fit of a short search makes
a new one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from longrope_search import reference_csv, rope
from longrope_search.config import Config, parse_length
from longrope_search.errors import ConfigError
from longrope_search.evolution import Candidate, SearchSpace, distinct_seeds
from longrope_search.factors import AttentionFit, PriorRecord, check_geometry, load_factors
from longrope_search.model import carried_factors, carried_mscale
from longrope_search.rope import RopeSpec


@dataclass(frozen=True)
class Prior:
    """Long factors the model already runs with: a previous stage of a progressive extension."""

    factors: np.ndarray  # (d/2,)
    target_length: int
    mscale: float
    n_hat: int
    source: str  # where they came from, for messages and factors.json
    short_factors: list[float] | None = None  # a short set searched earlier; kept through later stages

    def record(self) -> PriorRecord:
        return PriorRecord(self.source, self.target_length, [float(x) for x in self.factors], self.mscale)


@dataclass(frozen=True)
class SearchSetup:
    """What a search scores, derived from the config and the model's rotary geometry."""

    config: Config
    spec: RopeSpec
    target_length: int  # the length candidates are scored at
    space: SearchSpace
    mscale: float  # the attention factor every candidate runs with
    seeds: dict[str, np.ndarray]  # named seed vectors of the initial population, in the space's terms
    prior: Prior | None = None
    short: bool = False
    attention_fit: AttentionFit | None = None  # a short search: how the shared mscale was lowered
    critical_dim: int | None = None  # LongRoPE2's: seeds that reach the scale at this pair, a wider space above it

    @property
    def scale(self) -> float:
        return self.spec.scale(self.target_length)

    @property
    def fits_mscale(self) -> bool:
        """Short search with mscale auto: lower the shared attention factor before searching the short set."""
        s = self.config.search
        return self.short and s.mscale == "auto" and s.long_tolerance > 0 and self.prior.mscale > 1.0

    def with_attention_fit(self, fit: AttentionFit) -> "SearchSetup":
        """The same setup scoring under the fitted attention factor."""
        return dataclasses.replace(self, mscale=fit.mscale, attention_fit=fit)

    @property
    def stage_scale(self) -> float:
        """How far this search extends what the model already runs: target over the prior's target, or the window."""
        if self.prior is not None and not self.short:
            return self.target_length / self.prior.target_length
        return self.scale

    def factors(self, genes: Sequence[int]) -> np.ndarray:
        """What the model runs with for a candidate: its stage factors composed with the prior's (long mode)."""
        stage = self.space.factors(genes)  # (d/2,)
        if self.prior is not None and not self.short:
            return stage * self.prior.factors  # lambda_total = lambda_stage2 * lambda_stage1
        return stage

    def mscale_of(self, candidate: Candidate) -> float:
        """The attention factor a candidate runs with: its own gene when searched, else the search's."""
        searched = self.space.mscale(candidate)
        return self.mscale if searched is None else searched

    def comparisons(self) -> dict[str, tuple[np.ndarray, float]]:
        """Reference methods scored beside the winner: name -> (factors, mscale)."""
        if self.short:
            ones = np.ones(self.spec.num_factors)
            out = {
                "none": (ones, 1.0),  # the unmodified model
                "ones": (ones, self.prior.mscale),  # an export without a short set: factors 1, the long mscale
                "long": (self.prior.factors, self.prior.mscale),  # the long set used for short inputs too
            }
            if self.mscale != self.prior.mscale:
                out["ones_fitted"] = (ones, self.mscale)  # what lowering the mscale alone achieves
            return out
        out = {}
        for name in ("none", *rope.BASELINES):
            factors = rope.baseline(name)(self.spec, self.scale).numpy()
            out[name] = (factors, rope.BASELINE_MSCALE[name](self.scale, self.spec.original_length))
        if self.prior is not None:
            out["prior"] = (self.prior.factors, self.prior.mscale)  # the previous stage, extrapolated
        return out


# --- the prior ------------------------------------------------------------------------------------------


def resolve_prior(config: Config, model_config: Any, spec: RopeSpec) -> Prior | None:
    """The factors this search builds on: search.init_from, or else those the model carries (rope_type longrope).

    init_from wins over carried factors: a fine-tuned stage-1 model carries stage 1, while its short
    readjustment must build on the composed stage-2 factors of a later run.
    """
    carried = carried_factors(model_config)
    prior = None
    if config.search.init_from:
        ff = load_factors(config.search.init_from)
        check_geometry(ff.rope, spec, f"search.init_from {config.search.init_from}", config.model.name,
                       "use a run of this model.")
        prior = Prior(np.asarray(ff.factors), ff.target_length, ff.mscale, ff.n_hat, f"run {config.search.init_from}",
                      ff.short_factors)
    elif carried is not None:
        params = model_config.rope_parameters
        target = int(model_config.max_position_embeddings)
        mscale = carried_mscale(model_config, spec)
        short = params.get("short_factor")
        prior = Prior(np.asarray(carried), target, float(mscale), 0, f"model {config.model.name}",
                      None if short is None or all(x == 1.0 for x in short) else [float(x) for x in short])
    if config.search.short and prior is None:
        raise ConfigError(
            "short readjustment needs the long factors it complements: set search.init_from (--init-from) to the "
            "long run, or search on a LongRoPE-extended model."
        )
    return prior


def carried_mismatch(config: Config, model_config: Any, prior: Prior | None) -> str | None:
    """A warning when a long stage composes onto init_from's factors while the model carries other ones.

    A model fine-tuned on stage 1's export carries stage 1's factors; if init_from's differ (stage 1 was
    searched further after the fine-tune), the new stage would compose onto factors the model never saw.
    A short search legitimately differs (it builds on the later, composed set).
    """
    carried = carried_factors(model_config)
    if carried is None or prior is None or config.search.short or not config.search.init_from:
        return None
    if len(carried) != len(prior.factors):
        return None  # resolve_prior's geometry check names this
    gap = float(np.max(np.abs(np.asarray(carried) / prior.factors - 1.0)))
    if gap <= 1e-6:
        return None
    return (f"{config.model.name} carries LongRoPE factors that differ from search.init_from's (by up to {gap:.1%}); "
            "this search composes onto init_from's. If the model was fine-tuned with its own factors, build on "
            "those instead: drop search.init_from.")


# --- the setup ------------------------------------------------------------------------------------------


def make_setup(config: Config, spec: RopeSpec, prior: Prior | None = None) -> SearchSetup:
    """The setup of a search on a model of geometry `spec`; every check of the target happens here."""
    s = config.search
    if config.model.original_length is not None:
        spec = RopeSpec(spec.base, spec.rotary_dim, config.model.original_length)
    if s.short:
        target, space, mscale = _short_space(config, spec, prior)
        critical = None
    else:
        critical = critical_dim(config, spec)
        target, space, mscale = _long_space(config, spec, prior, critical)
    setup = SearchSetup(config, spec, target, space, mscale, {}, prior, short=s.short, critical_dim=critical)
    setup = dataclasses.replace(setup, seeds=seed_vectors(setup))  # a bad init_factors file fails here
    distinct = len(distinct_seeds(space, setup.seeds))
    if distinct > s.population:  # before any seed is scored
        raise ConfigError(f"{distinct} distinct seeds do not fit search.population {s.population}; raise "
                          "search.population or drop seeds from search.seeds.")
    return setup


def critical_dim(config: Config, spec: RopeSpec) -> int | None:
    """The config's critical dimension in pairs for a model of geometry `spec` (auto resolved); one line when it
    leaves no pair to search."""
    value = config.search.critical_dim
    if value is None:
        return None
    if isinstance(value, list):
        if len(value) > 1:
            raise ConfigError(f"search.critical_dim {value} is a sweep (one search per value); run it with "
                              "`longrope search --config`, which runs the sweep.")
        value = value[0]
    critical = rope.critical_pair(spec) if value == "auto" else int(value)
    if critical >= spec.num_factors:
        raise ConfigError(
            f"search.critical_dim {value} leaves no pair to search: the model has {spec.num_factors} rotary pairs "
            f"(rotary_dim {spec.rotary_dim}){'; auto gives ' + str(critical) if value == 'auto' else ''}; use a "
            f"value below {spec.num_factors}."
        )
    return critical


def _long_space(config: Config, spec: RopeSpec, prior: Prior | None, critical: int | None
                ) -> tuple[int, SearchSpace, float]:
    s = config.search
    target = parse_length(s.target_or_default, spec.original_length)
    floor = prior.target_length if prior is not None else spec.original_length
    if target <= floor:
        what = f"the previous stage's target ({floor} tokens)" if prior else f"the model's original window ({floor} tokens)"
        raise ConfigError(
            f"target {s.target_or_default} ({target} tokens) is not longer than {what}; set search.target above it, "
            f"e.g. {floor * 8}."
        )
    stage_scale = target / floor
    scale = target / spec.original_length
    if s.mscale == "keep" and prior is None:
        raise ConfigError("search.mscale keep runs the attention factor of the factors the search builds on, and there "
                          "are none: set search.init_from, search on an extended model, or use auto or a number.")
    mscale = (rope.longrope_mscale(scale, spec.original_length) if s.mscale in ("auto", "search")
              else prior.mscale if s.mscale == "keep" else float(s.mscale))
    # n_hat positions keep the original rotation; values at or beyond the window would mean "no scaling".
    n_hat = tuple(v for v in s.n_hat if v < spec.original_length) or (0,)
    choices, start = _mscale_choices(mscale) if s.mscale == "search" else ((), 0)
    # One space for every method, holding every seed as it is: each pair searched, factors non-decreasing in [1,
    # max_factor]. A critical dimension (LongRoPE2) adds seeds that reach the scale there and a wider range above it.
    top = s.max_factor or (2.0 if critical is not None else 1.25) * stage_scale
    space = SearchSpace(
        num_factors=spec.num_factors, max_factor=top, step=s.step, monotonic=s.monotonic, n_hat_choices=n_hat,
        mscale_choices=choices, mscale_start=start,
    )
    return target, space, mscale


MSCALE_SEARCH_STEP = 0.01  # the attention-factor gene's grid
MSCALE_SEARCH_SPAN = 0.5  # from 1.0 to this much above the default


def _mscale_choices(default: float) -> tuple[tuple[float, ...], int]:
    """The attention-factor gene's values (1.0 up to default + MSCALE_SEARCH_SPAN) and the index nearest the default."""
    count = int(round((default - 1.0 + MSCALE_SEARCH_SPAN) / MSCALE_SEARCH_STEP)) + 1
    choices = tuple(round(1.0 + i * MSCALE_SEARCH_STEP, 6) for i in range(count))
    return choices, min(range(count), key=lambda i: abs(choices[i] - default))


def _short_space(config: Config, spec: RopeSpec, prior: Prior) -> tuple[int, SearchSpace, float]:
    s = config.search
    target = parse_length(s.target_or_default, spec.original_length)
    if target > spec.original_length:
        raise ConfigError(
            f"a short-context search scores inputs that fit the original window ({spec.original_length} tokens), "
            f"but target is {target}; set search.target to 1x or less."
        )
    prior_scale = prior.target_length / spec.original_length
    # milder than the long set: the paper readjusts with a lower maximum factor
    space = SearchSpace(
        num_factors=spec.num_factors, max_factor=s.max_factor or max(1.0 + s.step, min(2.0, prior_scale)),
        step=s.step, monotonic=s.monotonic, n_hat_choices=(0,),  # no runtime applies n_hat to short inputs
    )
    # transformers and vLLM apply the long set's attention factor to short inputs too; with auto it is
    # lowered by the attention fit once the model is loaded
    mscale = prior.mscale if s.mscale in ("auto", "keep") else float(s.mscale)
    return target, space, mscale


# LongRoPE2 seeds its population with NTK-style vectors at several scales at and above the target's.
CRITICAL_SEED_SCALES = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)


def seed_vectors(setup: SearchSetup) -> dict[str, np.ndarray]:
    """Named seed vectors of the initial population, in the space's terms (a later stage's own factors), each a member
    of the space as it is; with a critical dimension also LongRoPE2's curves that reach the scale there."""
    if setup.prior is not None and not setup.short:
        # a later stage starts from the previous stage's window, extending it by target / previous target
        spec = RopeSpec(setup.spec.base, setup.spec.rotary_dim, setup.prior.target_length)
        scale = setup.target_length / setup.prior.target_length
    elif setup.short:
        spec, scale = setup.spec, setup.space.max_factor / 1.25  # the mildest set that still spans the space
    else:
        spec, scale = setup.spec, setup.scale
    seeds: dict[str, np.ndarray] = {}
    for name in setup.config.search.seeds:
        if name == "yarn-family":
            seeds.update({n: v.numpy() for n, v in rope.yarn_family(spec, scale).items()})
        else:
            seeds[name] = rope.baseline(name)(spec, scale).numpy()
    if setup.short:
        seeds.setdefault("none", np.ones(spec.num_factors))  # "keep the original RoPE" is the natural start
    if setup.config.search.init_factors:
        seeds["init"] = init_seed(setup)
    if setup.critical_dim is not None:
        critical, pairs = setup.critical_dim, np.arange(spec.num_factors)
        for m in CRITICAL_SEED_SCALES:  # t^(i / cd): an NTK-style curve reaching t at the critical dimension
            t = scale * m
            curve = t ** (pairs / critical) if critical else np.full(spec.num_factors, t)
            seeds[f"ntk@{m:g}"] = np.minimum(curve, setup.space.max_factor)  # the curve runs on past the top
    return seeds


def init_seed(setup: SearchSetup) -> np.ndarray:
    """search.init_factors as a seed of this search's space: a factors file's long set (its short set for a short
    search), or the one set of a reference-code CSV; a later stage divides out the prior."""
    path = setup.config.search.init_factors
    if reference_csv.is_csv(path):
        factors = reference_csv.read_csv(path, setup.spec.num_factors)  # no geometry recorded: the count is checked
        short = factors
    else:
        init = load_factors(path)
        check_geometry(init.rope, setup.spec, f"search.init_factors {path}", setup.config.model.name,
                       "use a factors file searched on the same model.")
        factors, short = init.factors, init.short_or_ones
    if setup.short:
        return np.asarray(short, dtype=np.float64)
    seed = np.asarray(factors, dtype=np.float64)
    return seed / setup.prior.factors if setup.prior is not None else seed
