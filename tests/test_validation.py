"""Generalisation during a search: three disjoint document sets, the best-so-far validated each generation, the winner
chosen on validation among the top candidates, early stopping (exact on resume), and bad settings as one line."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from search_fixtures import comparable, search_config, write_config
from typer.testing import CliRunner

from longrope_search import checkpoint
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.model import load_model
from longrope_search.sample_sets import sample_sets
from longrope_search.search_run import run_search
from longrope_search.validation import KEY_PREFIX, stalled

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_files):
    return tiny_files("validation", documents=12)


def validated_config(model, corpus, **search) -> dict:
    config = search_config(model, corpus, **{"select_top": 3, **search})
    config["data"]["validation_samples"] = 3
    return config


def test_the_three_sets_are_disjoint_documents_and_the_held_out_set_is_unchanged(setup):
    model, corpus = setup
    config = from_dict(validated_config(model, corpus))
    _, tokenizer = load_model(str(model), device="cpu")
    sets = sample_sets(tokenizer, config, 128)
    search, rest = set(sets.windows.search_docs), sets.windows.heldout_docs
    heldout, validation = set(rest[:2]), set(rest[2:])
    assert len(search) == 2 and len(heldout) == 2 and len(validation) == 3
    assert not (search & heldout) and not (search & validation) and not (heldout & validation)
    # adding the validation set draws after the held-out documents: search and held-out windows stay as they were
    without = from_dict(search_config(model, corpus))
    plain = sample_sets(tokenizer, without, 128)
    assert torch.equal(plain.search.ids, sets.search.ids) and torch.equal(plain.heldout.ids, sets.heldout.ids)
    assert plain.validation is None and sets.validation.count == 3


def test_the_winner_is_the_validation_best_of_the_top_candidates(setup, tmp_path):
    model, corpus = setup
    final, run_dir = run_search(from_dict(validated_config(model, corpus, generations=3)), tmp_path / "run")
    state, _ = checkpoint.load_state(run_dir)
    assert [g for g, _, _ in state.validation] == [0, 1, 2, 3]  # the best-so-far of every generation
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    validated = {r["key"].removeprefix(KEY_PREFIX): r["ppl"] for r in log
                 if r["event"] == "eval" and r["key"].startswith(KEY_PREFIX)}
    ranked = sorted({e.candidate.key: e.ppl for e in state.history}.items(), key=lambda kv: (kv[1], kv[0]))[:3]
    top = [key for key, _ in ranked]
    assert set(top) <= set(validated)
    best = min(top, key=lambda key: (validated[key], top.index(key)))
    assert final.search.best_key == best and final.search.selected_by == "validation"
    assert final.scores.validation == validated[best]
    assert final.scores.search == dict(ranked)[best]
    assert final.search.validation == [[g, k, p] for g, k, p in state.validation]
    # the search's own best is reported beside the winner when validation chose another, else not repeated
    row = final.baselines.get("search best")
    if best == top[0]:
        assert row is None
    else:
        assert row.search == dict(ranked)[top[0]] < final.scores.search and math.isfinite(row.heldout)


def test_early_stopping_saves_evaluations_and_a_rerun_resumes_to_the_same_result(setup, tmp_path):
    model, corpus = setup
    config = validated_config(model, corpus, generations=12, patience=1)
    final, run_dir = run_search(from_dict(config), tmp_path / "run")
    assert final.search.stopped_early is not None and final.search.stopped_early < 12
    assert final.search.saved_evaluations == (12 - final.search.stopped_early) * 6
    state, _ = checkpoint.load_state(run_dir)
    assert stalled(state, 1) and not stalled(checkpoint.SearchState(0, [], [], {}, {}, validation=state.validation[:1]), 1)
    result = runner.invoke(app, ["search", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    again = json.loads((run_dir / "factors.json").read_text())
    assert comparable(again) == comparable(final.to_json() | {"scale": again["scale"]})


def test_a_kill_between_a_generation_and_its_validation_resumes_exactly(setup, tmp_path):
    model, corpus = setup
    config = from_dict(validated_config(model, corpus, generations=3))
    _, ref = run_search(config, tmp_path / "ref")
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    # killed after generation 3's candidates were scored and logged, before its validation and checkpoint
    lines = (run / "log.jsonl").read_text().splitlines()
    last_validation = max(i for i, line in enumerate(lines) if KEY_PREFIX in line)
    (run / "log.jsonl").write_text("\n".join(lines[:last_validation]) + "\n")
    checkpoint.state_path(run, 3).unlink()
    (run / "factors.json").unlink()
    result = runner.invoke(app, ["search", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert comparable(json.loads((run / "factors.json").read_text())) == comparable(
        json.loads((ref / "factors.json").read_text()))
    assert checkpoint.load_state(run)[0].validation == checkpoint.load_state(ref)[0].validation


@pytest.mark.parametrize("data, search, message", [
    ({"validation_samples": 0}, {"select_top": 3}, "data.validation_samples is 0"),
    ({"validation_samples": 0}, {"patience": 2}, "data.validation_samples is 0"),
    ({}, {"select_top": 0}, "search.select_top: Input should be greater than or equal to 1"),
    ({}, {"patience": -1}, "search.patience: Input should be greater than or equal to 0"),
])
def test_bad_validation_settings_are_one_line_and_exit_2(setup, tmp_path, data, search, message):
    model, corpus = setup
    config = validated_config(model, corpus)
    config["data"].update(data)
    config["search"].update(search)
    result = runner.invoke(app, ["search", "--config", str(write_config(tmp_path / "c.yaml", config)),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
