"""LongRoPE2's search: the critical dimension (formula, space, prefix), strictly increasing genes, the attention factor
as a gene, the needle fitness (labels on exactly the answer tokens), the critical-dimension sweep (resume after
kill -9 equals an uninterrupted run), and bad settings as one line with exit code 2."""

from __future__ import annotations

import json
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from search_fixtures import CODE, cli, search_config, write_code_corpus, write_config
from tiny_models import tiny_tokenizer
from typer.testing import CliRunner

from longrope_search import rope
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.errors import ConfigError
from longrope_search.evolution import Candidate, SearchSpace, crossover, initial_population, mutate, seed_candidates
from longrope_search.fitness import IGNORE, Evaluator, sequence_nll
from longrope_search.model import load_model_config, rope_spec
from longrope_search.needle import answer_targets, answers_only, asked_windows, needle_samples
from longrope_search.rope import RopeSpec
from longrope_search.search_run import run_search
from longrope_search.search_setup import make_setup

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_files):
    """A tiny model with a 64-token window (room for a needle prompt) and a code corpus of long documents."""
    return tiny_files("longrope2", window=64, corpus=write_code_corpus)


def v2_config(model: Path, corpus: Path, **search) -> dict:
    settings = dict(method="longrope2", target="2x", population=12, parents=4, mutations=3, crossovers=3,
                    generations=2, chunk_size=48, needles=1)  # one needle: room in a 128-token window
    settings.update(search)
    config = search_config(model, corpus, **settings)
    config["search"].pop("n_hat")  # the preset's [0]
    if "fitness" not in search:
        config["search"].pop("fitness")  # the preset's needle
    return config


# --- the critical dimension ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, spec, expected", [
    # ceil((d/2) * ln(L / 2 pi) / ln(base)), worked by hand:
    ("llama2-7b", RopeSpec(10000.0, 128, 4096), 46),  # 64 * ln(651.9) / ln(1e4) = 64 * 6.480 / 9.210 = 45.03
    ("llama3-8b", RopeSpec(500000.0, 128, 8192), 35),  # 64 * ln(1303.8) / ln(5e5) = 64 * 7.173 / 13.122 = 34.99
    ("phi3-mini", RopeSpec(10000.0, 96, 4096), 34),  # 48 * 6.480 / 9.210 = 33.77
])
def test_critical_dimension_of_known_geometries(name, spec, expected):
    assert rope.critical_pair(spec) == expected
    # the pair at the critical dimension is the first whose period exceeds the window
    period = 2 * math.pi * spec.base ** (2 * np.arange(spec.num_factors) / spec.rotary_dim)
    assert period[expected] > spec.original_length >= period[expected - 1]


def test_the_critical_dimension_adds_seeds_and_range_but_every_pair_is_searched(setup):
    model, corpus = setup
    config = from_dict(v2_config(model, corpus, critical_dim=3))
    setup_ = make_setup(config, rope_spec(load_model_config(str(model))))  # 8 pairs, 2x
    space = setup_.space
    assert setup_.critical_dim == 3 and space.num_factors == 8 and space.monotonic
    assert space.min_factor == 1.0 and space.max_factor == 4.0 and space.n_hat_choices == (0,)
    assert {"ntk@1", "ntk@1.5", "pi", "ntk", "yarn"} <= set(setup_.seeds)
    # LongRoPE2's curves: 2^(i/3), the scale at the critical dimension, then on up to the top of the space
    assert np.allclose(setup_.seeds["ntk@1"], np.minimum(2.0 ** (np.arange(8) / 3), 4.0))
    rng = np.random.default_rng(0)
    population = initial_population(space, setup_.seeds, 40, rng, 0.3)
    for cand in population:
        factors = setup_.factors(cand.genes)  # (8,)
        assert np.all(factors >= 1.0) and np.all(factors <= 4.0 + 1e-12) and np.all(np.diff(factors) >= 0)
        assert cand.mscale is not None and 1.0 <= space.mscale_choices[cand.mscale] <= 1.7
    # the pairs below the critical dimension are searched too: the population does not share one prefix
    assert len({tuple(setup_.factors(c.genes)[:3].round(2)) for c in population}) > 5
    # the seeds start at LongRoPE's attention factor for 2x
    start = space.mscale_choices[space.mscale_start]
    assert start == pytest.approx(rope.longrope_mscale(2.0, 64), abs=0.006)


def test_operators_keep_candidates_valid_and_the_mscale_gene_moves():
    space = SearchSpace(num_factors=6, min_factor=2.0, max_factor=2.1, step=0.01,
                        mscale_choices=tuple(1.0 + 0.01 * i for i in range(30)), mscale_start=12)
    seeds = seed_candidates(space, {"flat": np.full(6, 2.0), "top": np.full(6, 9.0)})
    assert seeds["flat"].genes == (0,) * 6 and seeds["top"].genes == (10,) * 6
    assert all(c.mscale == 12 for c in seeds.values())
    rng = np.random.default_rng(1)
    moved = set()
    cand = seeds["flat"]
    for _ in range(300):
        child = mutate(cand, space, rng, 0.5)
        assert space.is_valid(child)
        moved.add(child.mscale)
        kid = crossover(cand, child, space, rng, 0.5)
        assert kid is None or space.is_valid(kid)
        cand = child
    assert len(moved) > 5  # the attention factor is searched, not fixed
    assert not space.is_valid(Candidate((0, 1, 0, 3, 4, 5), 0, 3))  # a decrease: not monotonic
    assert not space.is_valid(Candidate((0, 1, 2, 3, 4, 5), 0))  # the mscale gene is missing
    assert Candidate((0, 1), 0, 3).key == "n_hat=0|m=3|0,1" and Candidate((0, 1), 0).key == "n_hat=0|0,1"


def test_the_v1_space_and_its_candidates_are_unchanged(setup):
    model, corpus = setup
    setup_ = make_setup(from_dict(search_config(model, corpus)), rope_spec(load_model_config(str(model))))
    assert setup_.critical_dim is None and setup_.space.mscale_choices == ()
    cand = seed_candidates(setup_.space, setup_.seeds)["pi"]
    assert cand.mscale is None and "m=" not in cand.key and setup_.mscale_of(cand) == setup_.mscale


# --- the needle fitness ----------------------------------------------------------------------------------


def test_needle_labels_cover_exactly_the_answer_tokens():
    tokenizer = tiny_tokenizer()
    doc = tokenizer("\n".join(CODE * 40), add_special_tokens=False)["input_ids"]
    windows = torch.tensor([[tokenizer.bos_token_id] + doc[:199]] * 3)  # (3, 200)
    samples = needle_samples(tokenizer, windows, np.random.default_rng(0))
    ids, targets, rows = answer_targets(asked_windows(tokenizer, windows, np.random.default_rng(0)))
    targets = answers_only(targets, rows)
    assert ids.shape == (3, 200) and targets.shape == (3, 199)
    assert [s.depth for s in samples][0] == 0.0 and samples[-1].depth > 0.8  # spread over the samples
    for i, sample in enumerate(samples):
        scored = (targets[i] != IGNORE).nonzero().squeeze(1)
        assert scored.tolist() == sample.predicting.tolist()  # the positions that predict the answer, no others
        assert targets[i, scored].tolist() == sample.answer.tolist() == ids[i, scored + 1].tolist()
        assert tokenizer.decode(sample.answer).strip() == sample.value
    assert len({s.value for s in samples}) == 3
    again = needle_samples(tokenizer, windows, np.random.default_rng(0))
    assert [s.value for s in again] == [s.value for s in samples]  # a resumed search scores the same needles


def test_the_answer_only_loss_equals_the_full_loss_restricted_to_the_answer():
    from tiny_models import tiny_model

    model = tiny_model("llama", max_position_embeddings=256)
    ids = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    targets = torch.full((63,), IGNORE)
    targets[50:55] = ids[0, 51:56]
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # (64, V)
    expected = -logp[torch.arange(50, 55), ids[0, 51:56]].mean().item()
    assert sequence_nll(model, ids, 16, targets) == pytest.approx(expected, rel=1e-5)
    result = Evaluator(model, ids, 16, targets=targets[None]).score("k", [1.0] * 8)
    assert result.tokens == 5 and result.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_a_longrope2_search_runs_end_to_end_and_records_needles(setup, tmp_path):
    model, corpus = setup
    final, run_dir = run_search(from_dict(v2_config(model, corpus)), tmp_path / "run")
    spec = rope_spec(load_model_config(str(model)))
    assert final.search.settings["fitness"] == "needle" and final.search.settings["critical_dim"] == "auto"
    critical = rope.critical_pair(RopeSpec(spec.base, spec.rotary_dim, 64))
    assert np.all(np.diff(final.factors) >= 0) and max(final.factors) <= 4.0 + 1e-12  # one space, [1, 2 s]
    assert final.mscale != rope.longrope_mscale(2.0, 64) or True  # the searched gene, on the 0.01 grid
    assert round(final.mscale, 6) == round(final.mscale, 2)
    assert {"search", "heldout", "heldout_ppl", "needle"} <= {c.key for c in final.scores.measured}
    assert {"search", "heldout", "heldout_ppl", "needle"} <= {c.key for c in final.baselines["yarn"].measured}
    start = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert start["fingerprint"]["fitness"] == "needle" and start["fingerprint"]["critical_dim"] == critical


# --- bad settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("search, message", [
    (dict(critical_dim=8), "leaves no pair to search: the model has 8 rotary pairs"),
    (dict(critical_dim=-2), "critical_dim counts rotary pairs"),
    (dict(fitness="bleu"), "search.fitness: Input should be 'joint', 'ppl' or 'needle'"),
    (dict(method="longrope3"), "search.method: Input should be 'longrope' or 'longrope2'"),
    (dict(critical_dim=[]), "needs at least one value"),
])
def test_bad_longrope2_settings_are_one_line_and_exit_2(setup, tmp_path, search, message):
    model, corpus = setup
    cfg = write_config(tmp_path / "bad.yaml", v2_config(model, corpus, **search))
    result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "state").exists()


def test_short_searches_refuse_longrope2_settings(setup):
    model, corpus = setup
    with pytest.raises(ConfigError, match="short-context search has its own space"):
        from_dict(search_config(model, corpus, short=True, mscale="search"))


# --- the sweep ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_sweep_then_resume_equals_uninterrupted(setup, tmp_path):
    model, corpus = setup
    cfg = write_config(tmp_path / "cfg.yaml", v2_config(model, corpus, critical_dim=[1, 2, 4], generations=3))
    reference = cli("search", "--config", str(cfg), "--out", "ref", cwd=tmp_path)
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    assert "best critical dimension" in out
    ref = json.loads((tmp_path / "ref" / "sweep.json").read_text())
    assert ref["critical_dims"] == [1, 2, 4] and ref["chosen_by"] == "heldout"
    best = min(ref["fitness"], key=lambda name: ref["fitness"][name]["heldout"])
    assert ref["run"].endswith(best) and ref["best"] == int(best.removeprefix("cd-"))

    victim = cli("search", "--config", str(cfg), "--out", "run", cwd=tmp_path)
    second = tmp_path / "run" / "cd-2" / "state"  # killed while the second value's search runs
    deadline = time.time() + 300
    while not any(second.glob("gen_*.json")) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    resumed = cli("search", "--resume", "run", cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    run = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert {k: v for k, v in run.items() if k != "run"} == {k: v for k, v in ref.items() if k != "run"}
    for name in ("cd-1", "cd-2", "cd-4"):
        a = json.loads((tmp_path / "ref" / name / "factors.json").read_text())
        b = json.loads((tmp_path / "run" / name / "factors.json").read_text())
        assert (a["factors"], a["mscale"], a["scores"]) == (b["factors"], b["mscale"], b["scores"])
    # commands that take one run point at the best search
    wrong = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and f"e.g. {tmp_path / 'run' / best} (the best)" in wrong.stderr
