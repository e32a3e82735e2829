"""Multi-fidelity scoring (search.screen_windows, search.screen_keep): the promotion rule, a screened score continued
equals one scored whole, a screened search keeps exactly the promoted fraction on every window, and a resume from
any point of a screened generation (every line of its log, and a real kill -9) equals the uninterrupted run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from search_fixtures import comparable, kill_9_then_resume, search_config, write_config
from tiny_models import tiny_model

from longrope_search import checkpoint
from longrope_search.config import from_dict
from longrope_search.fitness import Evaluator, Race, Screen
from longrope_search.rundir import CONFIG_FILE, FACTORS_FILE, LOG_FILE, config_for_resume
from longrope_search.search_run import run_search

pytestmark = pytest.mark.usefixtures("one_thread")

SCREENED = dict(screen_windows=1, screen_keep=0.5, race_margin=1e-6)  # a random model: NLL gaps ~1e-5


@pytest.fixture(scope="module")
def setup(tiny_files):
    return tiny_files("screen", documents=12)


def screened_config(model, corpus, **search) -> dict:
    config = search_config(model, corpus, **{**SCREENED, **search})
    config["data"]["samples"] = 4
    return config


def test_promotion_keeps_the_best_fraction_on_the_first_windows():
    screen = Screen(windows=2, keep=0.25)
    partial = {"a": [1.0, 1.0], "b": [0.5, 0.9], "c": [2.0, 0.1], "d": [0.7, 0.7, 5.0], "e": [0.1, math.inf],
               "f": [0.6, 0.8]}
    # means over the first 2 windows: a 1.0, b 0.7, c 1.05, d 0.7 (its third window is not looked at), f 0.7;
    # e is broken; ceil(0.25 * 6) = 2 promoted, the tie at 0.7 broken by key
    assert screen.promoted(partial) == {"b", "d"}
    assert Screen(windows=2, keep=0.01).promoted(partial) == {"b"}  # at least one
    assert Screen(windows=2, keep=1.0).promoted(partial) == {"a", "b", "c", "d", "f"}  # never a broken one


def test_a_screened_score_continued_equals_the_whole_score():
    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=32).eval()
    samples = torch.randint(0, 200, (4, 48))  # (n, L)
    factors = [1.0 + 0.1 * i for i in range(8)]
    whole = Evaluator(model, samples, chunk_size=16).score("k", factors, 2, 1.1)
    parted = Evaluator(model, samples, chunk_size=16)
    first = parted.score("k", factors, 2, 1.1, upto=1)
    assert first.screened and first.rejected and len(first.nlls) == 1 and first.forward_tokens == 48
    assert parted.needs("k") and not parted.needs("k", upto=1)
    assert parted.score("k", factors, 2, 1.1, upto=1) is first  # nothing is scored twice
    done = parted.score("k", factors, 2, 1.1)
    assert not done.screened and not done.rejected and not parted.needs("k")
    assert done.nlls == whole.nlls and done.ppl == whole.ppl and done.forward_tokens == whole.forward_tokens == 4 * 48
    # continued under a race it cannot win: stopped after the next window, counting both rounds' tokens
    raced = Evaluator(model, samples, chunk_size=16)
    raced.score("k", factors, 2, 1.1, upto=1)
    lost = raced.score("k", factors, 2, 1.1, race=Race(tuple(v - 1.0 for v in whole.nlls), 0.0))
    assert lost.rejected and not lost.screened and len(lost.nlls) == 2 and lost.forward_tokens == 2 * 48


def test_a_screened_search_scores_the_promoted_fraction_of_each_batch_in_full(setup, tmp_path):
    model, corpus = setup
    final, run_dir = run_search(from_dict(screened_config(model, corpus, race_margin=0.0)), tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    lines: dict[str, list[dict]] = {}
    for r in records:
        if r["event"] == "eval":
            lines.setdefault(r["key"], []).append(r)
    state, _ = checkpoint.load_state(run_dir)
    for generation in range(1, state.generation + 1):
        batch = [e for e in state.history if e.generation == generation]
        full = [e for e in batch if not e.rejected]
        assert len(full) == math.ceil(0.5 * len(batch)), generation
        for e in batch:
            first = lines[e.candidate.key][0]
            assert first["screened"] and len(first["nlls"]) == 1 and first["tokens"] == e.tokens // (1 if e.rejected else 4)
        # the promoted are the best on the first window
        cut = max(lines[e.candidate.key][0]["nlls"][0] for e in full)
        assert all(lines[e.candidate.key][0]["nlls"][0] >= cut for e in batch if e.rejected)
    assert all(not e.rejected for e in state.history if e.generation == 0 and e.origin != "mutation")  # seeds whole
    assert final.search.forward_tokens == state.forward_tokens < len(state.history) * 4 * 128


@pytest.mark.slow
def test_a_resume_from_every_line_of_a_screened_generation_equals_the_uninterrupted_run(setup, tmp_path):
    """Generation 1 of a reference run cut after each of its log lines (and inside one, a torn line), as a kill there
    leaves it: generation 0's checkpoint and the log so far. Every resume ends where the reference ended."""
    model, corpus = setup
    config = from_dict(screened_config(model, corpus, generations=2))
    run_search(config, tmp_path / "ref")
    ref = tmp_path / "ref"
    lines = (ref / LOG_FILE).read_text().splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if json.loads(line).get("event") == "generation") + 1
    last = next(i for i, line in enumerate(lines) if json.loads(line).get("event") == "generation"
                and json.loads(line)["generation"] == 1)
    expected = comparable(json.loads((ref / FACTORS_FILE).read_text()))
    cuts = [(n, False) for n in range(first, last + 1)] + [(first + 2, True)]
    assert sum(1 for line in lines[first:last] if '"screened"' in line) >= 4  # the cuts fall inside both rounds
    for n, torn in cuts:
        run = tmp_path / f"cut{n}{'t' if torn else ''}"
        shutil.copytree(ref, run)
        for path in (run / "state").glob("gen_*.json"):
            if path.name != "gen_00000.json":
                path.unlink()
        (run / LOG_FILE).write_text("".join(lines[:n]) + (lines[n][: len(lines[n]) // 2] if torn else ""))
        (run / FACTORS_FILE).unlink()
        final, _ = run_search(None, run, resume=True)
        assert comparable(final.to_json()) == expected, (n, torn)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted_with_screening(setup, tmp_path):
    model, corpus = setup
    cfg = write_config(tmp_path / "cfg.yaml", screened_config(model, corpus, generations=6))
    ref, run, what = kill_9_then_resume(cfg, tmp_path, latest=1.0)
    assert comparable(run) == comparable(ref), what


def test_a_run_from_before_screening_resumes_without_it(setup, tmp_path):
    model, corpus = setup
    saved = screened_config(model, corpus)
    saved["search"].pop("screen_windows")  # what a run of an earlier version wrote
    write_config(tmp_path / CONFIG_FILE, saved)
    config, notes = config_for_resume(tmp_path, [])
    assert config.search.screen_windows == 0 and notes == []
    # a budget setting: a resume may change it, and says so
    config, notes = config_for_resume(tmp_path, ["search.screen_windows=2", "search.screen_keep=0.25"])
    assert (config.search.screen_windows, config.search.screen_keep) == (2, 0.25) and len(notes) == 2
