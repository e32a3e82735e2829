"""The joint fitness and the one search space: windows with several needles all asked at the end (every answer
scored, nothing else), the joint score equal to its two halves scored apart, every seed a member of every method's
space, the winner never worse than the best seed, and a kill -9 resuming to the uninterrupted result."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from search_fixtures import (CODE, comparable, kill_9_then_resume, one_line_error, search_config, write_code_corpus,
                             write_config)
from tiny_models import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from longrope_search import checkpoint, rope
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.evolution import seed_candidates
from longrope_search.fitness import IGNORE, Evaluator, Joint
from longrope_search.model import load_model_config, rope_spec
from longrope_search.needle import answer_targets, answers_found, answers_only, asked_windows, needle_samples, text_only
from longrope_search.rundir import CONFIG_FILE, config_for_resume
from longrope_search.search_run import run_search
from longrope_search.search_setup import make_setup

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_files):
    """A tiny model with a 64-token window and a code corpus: 4x windows of 256 tokens hold two needles."""
    return tiny_files("joint", window=64, corpus=write_code_corpus, documents=12)


def joint_config(model: Path, corpus: Path, **search) -> dict:
    """A joint search whose answers keep their weight: the random test model finds no needle, so the chance check
    (tests below) would drop them."""
    return search_config(model, corpus, **{"fitness": "joint", "needles": 2, "n_hat": [0], "needle_check": False,
                                           **search})


def code_windows(n: int, length: int) -> torch.Tensor:
    tokenizer = tiny_tokenizer()
    doc = tokenizer("\n".join(CODE * 80), add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + doc[i * 7 : i * 7 + length - 1] for i in range(n)])  # (n, L)


# --- windows with several needles ----------------------------------------------------------------------------


def test_one_key_per_window_is_the_needle_fitness_window_token_for_token():
    tokenizer = tiny_tokenizer()
    windows = code_windows(3, 200)
    asked = asked_windows(tokenizer, windows, np.random.default_rng(0), keys=1)
    single = needle_samples(tokenizer, windows, np.random.default_rng(0))
    for window, sample in zip(asked, single):
        assert torch.equal(window.ids, sample.ids)
        assert window.answer_rows.nonzero().squeeze(1).tolist() == sample.predicting.tolist()


def test_every_needle_is_asked_and_only_the_answers_are_answer_rows():
    tokenizer = tiny_tokenizer()
    windows = asked_windows(tokenizer, code_windows(2, 400), np.random.default_rng(1), keys=3)
    ids, targets, rows = answer_targets(windows)
    assert ids.shape == (2, 400) and targets.shape == rows.shape == (2, 399)
    depths = sorted(d for w in windows for d in w.depths)
    assert depths[0] < 0.1 and depths[-1] > 0.9  # the 6 needles spread over the depths
    for i in range(2):
        text = tokenizer.decode(ids[i])
        asserts = [line for line in text.splitlines() if line.startswith("assert ")]
        assert len(asserts) == 3  # every needle asked, one line each
        bound = {line.split(" = ")[0]: line.split(" = ")[1] for line in text.splitlines() if " = " in line
                 and line.split(" = ")[0].isupper()}
        answers = tokenizer.decode(targets[i][rows[i]]).split()
        assert answers == [bound[a.split()[1]] for a in asserts]  # the scored tokens are exactly the asked values
    only = answers_only(targets, rows)
    assert torch.equal(only != IGNORE, rows) and torch.equal(text_only(targets, rows) != IGNORE, ~rows)


def test_a_window_too_short_for_its_needles_is_one_line_naming_the_fix(setup, tmp_path):
    model, corpus = setup
    cfg = write_config(tmp_path / "cfg.yaml", joint_config(model, corpus, target="2x", needles=8))
    runner = CliRunner()
    runner.invoke(app, ["search", "--config", str(cfg), "--out", str(tmp_path / "warm")])  # the corpus read once
    result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(tmp_path / "run")])
    one_line_error(result, "hides 8 needles in each 128-token window", "lower search.needles")
    assert not (tmp_path / "run").exists()


# --- the joint score --------------------------------------------------------------------------------------------


def test_the_joint_score_equals_its_two_halves_scored_apart():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", max_position_embeddings=512)
    ids, targets, rows = answer_targets(asked_windows(tokenizer, code_windows(3, 300), np.random.default_rng(2), 2))
    factors = [1.0, 1.2, 1.5, 1.5, 2.0, 2.0, 2.5, 3.0]
    joint = Evaluator(model, ids, 64, targets=targets, joint=Joint(rows, 0.3)).score("c", factors, 0, 1.1)
    text = Evaluator(model, ids, 64, targets=text_only(targets, rows)).score("c", factors, 0, 1.1)
    answer = Evaluator(model, ids, 64, targets=answers_only(targets, rows)).score("c", factors, 0, 1.1)
    assert joint.parts["text"] == pytest.approx(text.nlls, abs=1e-6)
    assert joint.parts["answer"] == pytest.approx(answer.nlls, abs=1e-6)
    expected = [t + 0.3 * a for t, a in zip(text.nlls, answer.nlls)]
    assert joint.nlls == pytest.approx(expected, abs=1e-6)
    assert math.log(joint.ppl) == pytest.approx(np.mean(expected), abs=1e-6)
    assert answer.nlls[0] > 0.5 and text.nlls[0] != answer.nlls[0]  # two different measures, both non-trivial


# --- one space for every method ----------------------------------------------------------------------------


@pytest.mark.parametrize("search", [
    dict(),  # the default: every pair, [1, 1.25 s]
    dict(method="longrope2", needles=1, population=16),  # the critical dimension's seeds and [1, 2 s]
    dict(critical_dim=1, max_factor=4.5),
    dict(fitness="ppl", n_hat=[0, 2]),
], ids=["default", "longrope2", "critical-1", "v1"])
def test_every_seed_is_a_member_of_every_methods_space(setup, search):
    model, corpus = setup
    config = joint_config(model, corpus, seeds=["pi", "ntk", "yarn", "yarn-family"], **search)
    if search.get("method"):
        config["search"].pop("fitness")
        config["search"].pop("n_hat")
    setup_ = make_setup(from_dict(config), rope_spec(load_model_config(str(model))))
    space = setup_.space
    assert space.num_factors == setup_.spec.num_factors  # every pair is searched
    assert {"pi", "ntk", "yarn", "yarn@16,0.25", "yarn@64,2"} <= set(setup_.seeds)
    candidates = seed_candidates(space, setup_.seeds)
    for name, vector in setup_.seeds.items():
        assert space.holds(vector), name  # on the grid as it is: nothing clipped, nothing repaired
        assert np.abs(setup_.factors(candidates[name].genes) - vector).max() <= space.step / 2 + 1e-12, name


def test_a_search_never_ends_worse_than_its_best_seed(setup, tmp_path):
    model, corpus = setup
    seeds = ["pi", "ntk", "yarn"]
    # generation 0 holds the seeds alone: the winner is the best of them
    zero, _ = run_search(from_dict(joint_config(model, corpus, population=3, parents=2, generations=0, seeds=seeds)),
                         tmp_path / "zero")
    log = [json.loads(line) for line in (tmp_path / "zero" / "log.jsonl").read_text().splitlines()]
    scores = list({e["key"]: e["ppl"] for e in log if e["event"] == "eval"}.values())  # a key's last line wins
    assert len(scores) == 3 and zero.scores.search == min(scores)
    assert zero.search.best_origin in seeds
    best_seed = zero.search.best_origin
    expected = rope.baseline(best_seed)(rope_spec(load_model_config(str(model))), 4.0).numpy()
    assert np.abs(np.asarray(zero.factors) - expected).max() <= 0.005 + 1e-12
    # with generations, elitism keeps it: the winner scores no worse than that seed
    final, run_dir = run_search(from_dict(joint_config(model, corpus, generations=3, seeds=seeds)), tmp_path / "run")
    history = checkpoint.state_to_json(checkpoint.load_state(run_dir)[0])["history"]
    seed_scores = [e["ppl"] for e in history if e["origin"] in seeds]
    assert final.scores.search <= min(seed_scores) and final.scores.search <= zero.scores.search + 1e-12


def measured(scores) -> set[str]:
    return {c.key for c in scores.measured}


def test_the_run_records_both_halves_and_the_plain_perplexity(setup, tmp_path):
    model, corpus = setup
    final, run_dir = run_search(from_dict(joint_config(model, corpus, generations=1)), tmp_path / "run")
    evals = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert all(len(e["parts"]["text"]) == len(e["parts"]["answer"]) == len(e["nlls"]) for e in evals)
    assert all(n == pytest.approx(t + 0.25 * a) for e in evals
               for n, t, a in zip(e["nlls"], e["parts"]["text"], e["parts"]["answer"]))
    assert {"search", "heldout", "heldout_ppl", "needle"} <= measured(final.scores) <= measured(final.baselines["yarn"]) | {"validation"}
    start = json.loads((run_dir / "log.jsonl").read_text().splitlines()[0])
    assert start["fingerprint"]["fitness"] == "joint" and start["fingerprint"]["needles_per_window"] == 2
    assert start["fingerprint"]["needle_weight"] == 0.25


# --- resume --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_with_the_joint_fitness(setup, tmp_path):
    model, corpus = setup
    cfg = write_config(tmp_path / "cfg.yaml", joint_config(model, corpus, generations=6))
    ref, run, what = kill_9_then_resume(cfg, tmp_path, latest=1.0)
    assert comparable(run) == comparable(ref), what
    assert ref["search"]["settings"]["fitness"] == "joint"


def test_a_needle_run_from_before_search_needles_resumes_with_its_one_needle(setup, tmp_path):
    model, corpus = setup
    saved = joint_config(model, corpus, fitness="needle")
    saved["search"].pop("needles")  # what a run of an earlier version wrote
    write_config(tmp_path / CONFIG_FILE, saved)
    config, notes = config_for_resume(tmp_path, [])
    assert config.search.needles == 1 and notes == []
    write_config(tmp_path / CONFIG_FILE, joint_config(model, corpus))  # a joint run keeps what it wrote
    assert config_for_resume(tmp_path, [])[0].search.needles == 2


# --- the chance check (search.needle_check) ------------------------------------------------------------------


def test_answers_beat_chance_only_below_half_a_uniform_guess_per_needle():
    rows = torch.zeros(2, 10, dtype=torch.bool)
    rows[:, :6] = True  # 6 answer tokens per window, 2 needles: 3 per needle
    chance = 5 * math.log(10)  # a uniform guess of a 5-digit number, in nats
    assert answers_found([0.1, 0.2], rows, needles=2)  # 0.45 nats per needle
    limit = 0.5 * chance / 3  # the mean per token at which a needle costs half a guess
    assert answers_found([limit * 0.99] * 2, rows, 2) and not answers_found([limit * 1.01] * 2, rows, 2)
    assert not answers_found([2.31, 2.30], rows, 2)  # a digit guessed: ln 10 per token


def test_reweighing_equals_scoring_with_the_new_weight():
    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=32).eval()
    ids = code_windows(3, 64)
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[:, :63]  # (n, L-1): any targets will do
    rows = torch.zeros(3, 63, dtype=torch.bool)
    rows[:, 50:56] = True
    factors = [1.0 + 0.1 * i for i in range(8)]
    before = Evaluator(model, ids, 16, targets=targets, joint=Joint(rows, 0.25))
    before.score("k", factors, 0, 1.1)
    before.reweigh(Joint(rows, 0.0))
    direct = Evaluator(model, ids, 16, targets=targets, joint=Joint(rows, 0.0)).score("k", factors, 0, 1.1)
    assert before.results["k"].nlls == pytest.approx(direct.nlls, abs=1e-12)
    assert before.results["k"].ppl == pytest.approx(direct.ppl, rel=1e-12)
    assert before.score("j", factors, 0, 1.2).nlls == pytest.approx(before.results["j"].parts["text"], abs=1e-12)


def test_a_model_that_finds_no_needle_is_searched_on_the_text_and_resumes_the_same(setup, tmp_path):
    """The random model answers at chance: the seeds are scored, the answers drop to weight 0, every score (and the
    last log line of every key) is the text's alone; a resume cut anywhere in generation 0 ends the same."""
    model, corpus = setup
    config = joint_config(model, corpus, generations=1, needle_check=True)
    final, ref = run_search(from_dict(config), tmp_path / "ref")
    assert final.search.settings["needle_weight"] == 0.0
    lines = (ref / "log.jsonl").read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    assert [r["needle_weight"] for r in records if r["event"] == "needle_check"] == [0.0]
    last = {r["key"]: r for r in records if r["event"] == "eval"}
    assert all(r["nlls"] == pytest.approx(r["parts"]["text"], abs=1e-12) for r in last.values())
    expected = comparable(json.loads((ref / "factors.json").read_text()))
    first_generation = next(i for i, r in enumerate(records) if r["event"] == "generation")
    for n in range(2, first_generation + 1, 3):  # from before the check to the end of generation 0
        run = tmp_path / f"cut{n}"
        shutil.copytree(ref, run)
        shutil.rmtree(run / "state")
        (run / "log.jsonl").write_text("".join(lines[:n]))
        (run / "factors.json").unlink()
        resumed, _ = run_search(None, run, resume=True)
        assert comparable(resumed.to_json()) == expected, n
        events = [json.loads(line)["event"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert events.count("needle_check") == 1, n  # the decision is logged once, however often it resumed
