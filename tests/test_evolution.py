"""Properties of the evolutionary search's pure part: grid, validity, dedup, determinism, selection."""

import json
import math

import numpy as np
import pytest

from longrope_search.errors import LongRopeError, SearchError
from longrope_search.evolution import (
    competitive_seeds,
    Candidate,
    SearchSpace,
    crossover,
    initial_population,
    mutate,
    next_generation,
    seed_candidates,
    select,
)

N_HATS = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


def space_for(scale: float = 8.0, num_factors: int = 16, monotonic: bool = True,
              n_hat_choices: tuple[int, ...] = N_HATS) -> SearchSpace:
    return SearchSpace(num_factors=num_factors, max_factor=1.25 * scale, monotonic=monotonic,
                       n_hat_choices=n_hat_choices)


def baseline_seeds(num_factors: int, scale: float = 8.0) -> dict[str, np.ndarray]:
    i = np.arange(num_factors)
    d = 2 * num_factors
    return {
        "pi": np.full(num_factors, scale),
        "ntk": scale ** (2 * i / (d - 2)),
        # a YaRN-like ramp: untouched fast dims, PI on slow dims
        "ramp": np.clip(np.linspace(0.0, 1.5, num_factors), 0, 1) * (scale - 1) + 1,
    }


def random_valid(space: SearchSpace, rng: np.random.Generator) -> Candidate:
    genes = rng.integers(0, space.num_levels(), size=space.num_factors)
    if space.monotonic:
        genes = np.sort(genes)
    return Candidate(tuple(genes), space.n_hat_choices[rng.integers(len(space.n_hat_choices))])


# ---- search space and grid ------------------------------------------------------------------

def test_num_levels_includes_max_factor_despite_float_noise():
    # (10.0 - 1.0) / 0.01 == 899.9999999999999 in floats; the grid must still reach 10.0
    space = space_for(scale=8.0)
    assert space.num_levels() == 901
    assert space.factors(np.full(16, 900))[0] == pytest.approx(10.0)
    # a range that is not a whole number of steps stops below max_factor
    assert SearchSpace(num_factors=1, max_factor=1.055, step=0.01).num_levels() == 6


def test_grid_round_trip_within_half_step():
    space = space_for()
    rng = np.random.default_rng(0)
    factors = np.sort(rng.uniform(space.min_factor, space.max_factor, size=(200, 16)), axis=1)
    for f in factors:
        genes = space.to_genes(f)
        assert genes.dtype == np.int64
        assert np.max(np.abs(space.factors(genes) - f)) <= space.step / 2 + 1e-12
        # on-grid values survive exactly
        assert np.array_equal(space.to_genes(space.factors(genes)), genes)


def test_to_genes_clips_into_range():
    space = SearchSpace(num_factors=4, max_factor=2.0, step=0.1)  # levels 0..10
    genes = space.to_genes([0.5, 1.04, 1.96, 50.0])
    assert genes.tolist() == [0, 0, 10, 10]


def test_seed_candidates_clip_and_repair_monotonicity():
    space = SearchSpace(num_factors=5, max_factor=3.0, step=0.5, n_hat_choices=(8, 0, 4))
    seeds = {"dip": np.array([1.0, 2.0, 1.5, 9.0, 2.5]), "low": np.array([0.1, 1.0, 1.0, 1.0, 1.0])}
    out = seed_candidates(space, seeds)
    assert list(out) == ["dip", "low"]
    # 1.5 after 2.0 is raised to 2.0 (running max); 9.0 clipped to 3.0 holds for the rest
    assert out["dip"].genes == (0, 2, 2, 4, 4)
    assert out["low"].genes == (0, 0, 0, 0, 0)
    # seeds take the smallest n_hat choice: 0, the published baseline
    assert {c.n_hat for c in out.values()} == {0}
    assert all(space.is_valid(c) for c in out.values())


def test_seed_candidates_keep_order_when_not_monotonic():
    space = SearchSpace(num_factors=3, max_factor=3.0, step=0.5, monotonic=False)
    out = seed_candidates(space, {"dip": np.array([2.0, 1.0, 3.0])})
    assert out["dip"].genes == (2, 0, 4)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_factors=4, max_factor=0.5), "max_factor"),
        (dict(num_factors=4, max_factor=2.0, step=0.0), "step"),
        (dict(num_factors=4, max_factor=2.0, step=-0.01), "step"),
        (dict(num_factors=4, max_factor=2.0, n_hat_choices=()), "n_hat_choices"),
        (dict(num_factors=4, max_factor=2.0, n_hat_choices=(0, -1)), "n_hat_choices"),
        (dict(num_factors=4, max_factor=2.0, n_hat_choices=(4, 4)), "n_hat_choices"),
        (dict(num_factors=0, max_factor=2.0), "num_factors"),
        (dict(num_factors=4, max_factor=float("nan")), "max_factor"),
        (dict(num_factors=4, max_factor=2.0, min_factor=0.0), "min_factor"),
    ],
)
def test_impossible_spaces_raise_search_error(kwargs, fragment):
    with pytest.raises(SearchError, match=fragment) as info:
        SearchSpace(**kwargs)
    assert isinstance(info.value, LongRopeError)


def test_n_hat_choices_are_sorted():
    assert SearchSpace(num_factors=2, max_factor=2.0, n_hat_choices=(8, 0, 4)).n_hat_choices == (0, 4, 8)


def test_seed_with_wrong_length_or_nan_raises():
    space = space_for(num_factors=4)
    with pytest.raises(SearchError, match="'pi' has 3 factors"):
        seed_candidates(space, {"pi": np.ones(3)})
    with pytest.raises(SearchError, match="NaN"):
        seed_candidates(space, {"file": np.array([1.0, np.nan, 2.0, 3.0])})


def test_is_valid_checks_length_range_order_and_n_hat():
    space = SearchSpace(num_factors=3, max_factor=2.0, step=0.5, n_hat_choices=(0, 4))  # levels 0..2
    assert space.is_valid(Candidate((0, 1, 2), 4))
    assert not space.is_valid(Candidate((0, 1), 0))          # length
    assert not space.is_valid(Candidate((0, 1, 3), 0))       # above the grid
    assert not space.is_valid(Candidate((-1, 1, 2), 0))      # below the grid
    assert not space.is_valid(Candidate((0, 2, 1), 0))       # decreasing
    assert not space.is_valid(Candidate((0, 1, 2), 8))       # n_hat not offered
    free = SearchSpace(num_factors=3, max_factor=2.0, step=0.5, monotonic=False)
    assert free.is_valid(Candidate((0, 2, 1), 0))


# ---- candidates -----------------------------------------------------------------------------

def test_candidate_key_json_round_trip_and_hashing():
    cand = Candidate(tuple(np.array([0, 3, 3, 17], dtype=np.int64)), np.int64(8))
    assert cand.key == "n_hat=8|0,3,3,17"
    text = json.dumps(cand.to_json())  # numpy ints would make json.dumps fail
    back = Candidate.from_json(json.loads(text))
    assert back == cand and hash(back) == hash(cand) and back.key == cand.key
    assert Candidate((0, 3, 3, 17), 0).key != cand.key


@pytest.mark.parametrize("bad", [{"genes": [1, 2]}, {"genes": [1.5], "n_hat": 0},
                                 {"genes": "12", "n_hat": 0}, {"genes": [1], "n_hat": True}, [1, 2]])
def test_candidate_from_json_rejects_malformed(bad):
    with pytest.raises(ValueError, match="candidate"):
        Candidate.from_json(bad)


# ---- variation operators: validity over many draws ------------------------------------------

def test_mutate_keeps_monotonic_candidates_valid():
    space = space_for()
    rng = np.random.default_rng(1)
    changed = 0
    for _ in range(500):
        parent = random_valid(space, rng)
        child = mutate(parent, space, rng, p=0.3)
        assert space.is_valid(child), child.key
        changed += child != parent
    assert changed > 450


def test_mutate_opens_a_run_of_equal_factors_in_both_directions():
    # PI is one value repeated: the corridor walk must let it spread below and above that value
    space = space_for(num_factors=8)
    pi = seed_candidates(space, {"pi": np.full(8, 8.0)})["pi"]
    rng = np.random.default_rng(2)
    below, above = set(), set()
    for _ in range(500):
        genes = np.array(mutate(pi, space, rng, p=0.5).genes)
        g = pi.genes[0]
        below |= set(np.flatnonzero(genes < g).tolist())
        above |= set(np.flatnonzero(genes > g).tolist())
    # more than the end dims move, in each direction
    assert len(below) >= 3 and len(above) >= 3


def test_mutate_and_crossover_stay_in_range_when_not_monotonic():
    space = space_for(monotonic=False)
    rng = np.random.default_rng(3)
    levels = space.num_levels()
    for _ in range(500):
        a, b = random_valid(space, rng), random_valid(space, rng)
        child = mutate(a, space, rng, p=0.3)
        assert space.is_valid(child)
        assert 0 <= min(child.genes) and max(child.genes) < levels
        kid = crossover(a, b, space, rng, p=0.3)
        assert kid is not None and space.is_valid(kid)  # every mix is valid without the order constraint
        assert all(g in (x, y) for g, x, y in zip(kid.genes, a.genes, b.genes))


def test_crossover_is_valid_or_none_and_genes_come_from_parents():
    space = space_for()
    rng = np.random.default_rng(4)
    valid = invalid = 0
    for _ in range(500):
        a = random_valid(space, rng)
        b = mutate(a, space, rng, p=0.5)  # close parents, as late in a search
        kid = crossover(a, b, space, rng, p=0.3)
        if kid is None:
            invalid += 1
            continue
        valid += 1
        assert space.is_valid(kid)
        assert all(g in (x, y) for g, x, y in zip(kid.genes, a.genes, b.genes))
        assert kid.n_hat in (a.n_hat, b.n_hat)
    assert valid > 0 and invalid > 0


def test_crossover_returns_none_for_a_non_monotonic_child():
    space = SearchSpace(num_factors=2, max_factor=2.0, step=0.5)  # levels 0..2
    a, b = Candidate((0, 0)), Candidate((2, 2))
    # taking b's first gene and a's second gives (2, 0), which breaks the order
    rng = np.random.default_rng(0)
    kids = {crossover(a, b, space, rng, p=0.5) for _ in range(200)}
    assert None in kids
    assert kids - {None} <= {Candidate((0, 0)), Candidate((0, 2)), Candidate((2, 2))}


def test_mutate_rejects_a_parent_outside_the_space():
    space = SearchSpace(num_factors=2, max_factor=2.0, step=0.5)
    with pytest.raises(ValueError, match="outside the search space"):
        mutate(Candidate((2, 0)), space, np.random.default_rng(0), p=0.3)


def test_n_hat_is_mutated_to_neighbours_and_inherited():
    space = space_for(num_factors=4)
    rng = np.random.default_rng(5)
    cand = Candidate((0, 1, 2, 3), 8)  # index 4 in N_HATS
    steps = set()
    for _ in range(500):
        steps.add(mutate(cand, space, rng, p=0.3).n_hat)
    assert steps == {4, 8, 12}  # stays, or one step down / up in the sorted choices
    # at the ends the only neighbour is taken
    assert {mutate(Candidate((0, 1, 2, 3), 0), space, rng, p=1.0).n_hat for _ in range(50)} == {1}
    assert {mutate(Candidate((0, 1, 2, 3), 256), space, rng, p=1.0).n_hat for _ in range(50)} == {128}
    kids = {crossover(Candidate((0, 1, 2, 3), 0), Candidate((0, 1, 2, 3), 64), space, rng, p=0.3).n_hat
            for _ in range(100)}
    assert kids == {0, 64}


# ---- initial population ---------------------------------------------------------------------

def test_initial_population_starts_with_distinct_seeds_and_has_the_size():
    space = space_for()
    seeds = baseline_seeds(16)
    seeds["pi_again"] = seeds["pi"] + 0.001  # lands on the same grid point as "pi"
    pop = initial_population(space, seeds, size=64, rng=np.random.default_rng(6), p=0.3)
    named = seed_candidates(space, seeds)
    assert pop[:3] == [named["pi"], named["ntk"], named["ramp"]]
    assert len(pop) == 64
    assert len({c.key for c in pop}) == 64
    assert all(space.is_valid(c) for c in pop)


def test_initial_population_is_deterministic():
    space = space_for()
    a = initial_population(space, baseline_seeds(16), 32, np.random.default_rng(7), 0.3)
    b = initial_population(space, baseline_seeds(16), 32, np.random.default_rng(7), 0.3)
    c = initial_population(space, baseline_seeds(16), 32, np.random.default_rng(8), 0.3)
    assert a == b and a != c


def test_competitive_seeds_keep_those_within_the_margin_of_the_best():
    scores = {"pi": 49.08, "ntk": 21.05, "yarn": 9.93, "file": math.inf}
    assert competitive_seeds(scores, 0.5) == ["yarn"]
    assert competitive_seeds(scores, math.log(21.05 / 9.93) + 1e-9) == ["ntk", "yarn"]  # ln(21.05/9.93) = 0.751 nats
    assert competitive_seeds(scores, 0.0) == ["yarn"]
    assert competitive_seeds({"pi": math.inf, "ntk": math.nan}, 0.5) == ["pi", "ntk"]  # nothing tells them apart


def test_initial_population_breeds_only_the_named_seeds():
    space = space_for()
    seeds = baseline_seeds(16)
    rng = lambda: np.random.default_rng(9)  # noqa: E731
    plain = initial_population(space, seeds, 32, rng(), 0.3)
    assert initial_population(space, seeds, 32, rng(), 0.3, breed=["pi", "ntk", "ramp"]) == plain  # same draws
    only_ramp = initial_population(space, seeds, 32, rng(), 0.3, breed=["ramp"])
    named = seed_candidates(space, seeds)
    assert plain[:3] == list(named.values())
    assert only_ramp[0] == named["ramp"] and len(only_ramp) == 32  # the seeds left behind leave the population
    assert named["pi"] not in only_ramp and named["ntk"] not in only_ramp

    def closest(cand):  # the seed sharing most genes: the one it was mutated from (p 0.3 keeps ~70% of them)
        return max(named, key=lambda n: sum(a == b for a, b in zip(cand.genes, named[n].genes)))

    assert {closest(c) for c in only_ramp[1:]} == {"ramp"}
    assert {closest(c) for c in plain[3:]} == {"pi", "ntk", "ramp"}
    with pytest.raises(ValueError, match="names none of the seeds"):
        initial_population(space, seeds, 32, rng(), 0.3, breed=["yarn"])


def test_initial_population_errors_are_helpful():
    space = space_for(num_factors=4)
    rng = np.random.default_rng(0)
    with pytest.raises(SearchError, match="at least one seed"):
        initial_population(space, {}, 8, rng, 0.3)
    with pytest.raises(SearchError, match="raise the population size"):
        initial_population(space, baseline_seeds(4), 2, rng, 0.3)
    tiny = SearchSpace(num_factors=2, max_factor=1.02, step=0.01)  # 6 monotonic candidates
    with pytest.raises(SearchError, match="lower the population size"):
        initial_population(tiny, {"pi": np.full(2, 1.01)}, 10, rng, 0.3)


# ---- selection ------------------------------------------------------------------------------

def test_select_orders_by_score_with_inf_nan_last_and_ties_by_key():
    c = [Candidate((i,)) for i in range(6)]
    scored = [(c[5], float("nan")), (c[4], 3.0), (c[3], float("inf")), (c[2], 2.0), (c[1], 3.0), (c[0], 9.5)]
    assert select(scored, 6) == [c[2], c[1], c[4], c[0], c[3], c[5]]
    # ties and non-finite values are ordered by key, whatever the input order
    assert select(list(reversed(scored)), 6) == select(scored, 6)
    assert select(scored, 2) == [c[2], c[1]]
    assert select(scored, 100) == select(scored, 6)


def test_select_counts_a_repeated_candidate_once_at_its_best():
    a, b = Candidate((1,)), Candidate((2,))
    assert select([(a, 5.0), (b, 4.0), (a, 1.0)], 2) == [a, b]
    with pytest.raises(SearchError, match="top-k"):
        select([(a, 1.0)], 0)


def test_select_accepts_numpy_scores():
    a, b = Candidate((1,)), Candidate((2,))
    assert select([(a, np.float32(2.0)), (b, np.float64(math.inf))], 1) == [a]


# ---- next generation ------------------------------------------------------------------------

def test_next_generation_is_valid_new_distinct_and_deterministic():
    space = space_for()
    rng = np.random.default_rng(9)
    parents = initial_population(space, baseline_seeds(16), 32, rng, 0.3)
    seen = {c.key for c in parents}
    for _ in range(40):
        state = rng.bit_generator.state
        gen = next_generation(parents, space, rng, n_mutations=16, n_crossovers=16, p=0.3, seen=seen)
        keys = [c.key for c in gen]
        assert len(keys) == len(set(keys))
        assert not set(keys) & seen
        assert all(space.is_valid(c) for c in gen)
        assert len(gen) >= 16
        # the same RNG state replays the same generation
        replay = np.random.default_rng()
        replay.bit_generator.state = state
        assert next_generation(parents, space, replay, 16, 16, 0.3, seen) == gen
        assert replay.bit_generator.state == rng.bit_generator.state
        seen |= set(keys)
        # fake fitness: distance to a fixed target, so parents drift and converge
        target = np.linspace(0, 900, 16)
        scored = [(c, float(np.abs(np.array(c.genes) - target).sum())) for c in parents + gen]
        parents = select(scored, 16)


def test_next_generation_never_returns_seen_keys_under_heavy_reuse():
    # a small space where most draws collide with `seen`
    space = SearchSpace(num_factors=3, max_factor=1.05, step=0.01, n_hat_choices=(0, 4))
    rng = np.random.default_rng(10)
    parents = [Candidate((0, 2, 5)), Candidate((1, 1, 3), 4), Candidate((0, 0, 0))]
    seen: set[str] = {c.key for c in parents}
    for _ in range(30):
        try:
            gen = next_generation(parents, space, rng, 4, 4, 0.5, seen)
        except SearchError:
            break
        assert not {c.key for c in gen} & seen
        assert len({c.key for c in gen}) == len(gen)
        seen |= {c.key for c in gen}
        parents = gen if len(gen) >= 2 else parents
    # the space holds 56 monotonic gene triples x 2 n_hat values; nothing was proposed twice
    assert len(seen) <= 112


def test_exhausted_space_raises_a_helpful_error():
    space = SearchSpace(num_factors=2, max_factor=1.02, step=0.01)  # 3 levels: 6 valid candidates
    everything = [Candidate((i, j)) for i in range(3) for j in range(i, 3)]
    seen = {c.key for c in everything}
    with pytest.raises(SearchError, match="exhausted") as info:
        next_generation(everything, space, np.random.default_rng(11), 4, 4, 0.3, seen)
    message = str(info.value)
    assert "mutation probability" in message and "max_factor" in message and "step" in message


def test_next_generation_returns_a_short_generation_when_only_some_are_new():
    space = SearchSpace(num_factors=2, max_factor=1.02, step=0.01)
    everything = [Candidate((i, j)) for i in range(3) for j in range(i, 3)]
    left = everything[-1]
    seen = {c.key for c in everything if c != left}
    gen = next_generation(everything[:-1], space, np.random.default_rng(12), 4, 4, 0.5, seen)
    assert gen == [left]


def test_next_generation_argument_errors():
    space = space_for(num_factors=4)
    one = [Candidate((0, 1, 2, 3))]
    with pytest.raises(SearchError, match="two parents"):
        next_generation(one, space, np.random.default_rng(0), 2, 2, 0.3, set())
    with pytest.raises(SearchError, match="probability"):
        next_generation(one, space, np.random.default_rng(0), 2, 0, 1.5, set())
    assert next_generation(one, space, np.random.default_rng(0), 0, 0, 0.3, set()) == []


def test_mutants_and_children_reach_other_n_hat_values():
    space = space_for(num_factors=8)
    rng = np.random.default_rng(13)
    parents = initial_population(space, baseline_seeds(8), 16, rng, 0.3)
    seen = {c.key for c in parents}
    n_hats = set()
    for _ in range(10):
        gen = next_generation(parents, space, rng, 8, 8, 0.3, seen)
        seen |= {c.key for c in gen}
        n_hats |= {c.n_hat for c in gen}
        parents = gen
    assert len(n_hats) > 2 and n_hats <= set(N_HATS)
