"""`longrope plot` on a real tiny run: valid PNGs of sensible size, eval plots only with eval.json,
eval.json read with string or int length keys, and every missing or damaged input as a typed error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from search_fixtures import search_config

from longrope_search.config import from_dict
from longrope_search.errors import CheckpointError, ExportError
from longrope_search.config import format_length
from longrope_search.checkpoint import load_state
from longrope_search.factors import load_factors
from longrope_search.plot import load_eval, plot_run, work_curve
from longrope_search.search_run import run_search

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EVAL = {
    "lengths": [32, 64, 128],
    # string keys as json.dump writes them, int keys as a Python caller might pass them
    "ppl": {"longrope": {"32": 9.1, "64": 9.4, "128": 10.2}, "pi": {32: 9.5, 64: 11.0, 128: None}},
    "passkey": {"longrope": {"32": 1.0, "64": 0.9, "128": 0.6}},
}


@pytest.fixture(scope="module")
def run(tiny_files) -> Path:
    model, corpus = tiny_files("plot", documents=6)
    config = search_config(model, corpus, generations=2, population=4, parents=2, mutations=2, crossovers=2)
    _, run_dir = run_search(from_dict(config), model.parent / "run")
    return run_dir


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    height, width = image.shape[:2]
    assert 500 <= width <= 2000 and 400 <= height <= 1500
    # not a blank canvas: a drawn figure has many distinct colours
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20


def test_run_without_eval_writes_factors_and_search_plots(run_copy):
    paths = plot_run(run_copy)
    assert [p.name for p in paths] == ["factors.png", "search.png", "search_work.png"]
    assert all(p.parent == run_copy / "plots" for p in paths)
    for path in paths:
        assert_png(path)


def test_eval_json_adds_length_plots_in_the_chosen_folder(run_copy, tmp_path):
    (run_copy / "eval.json").write_text(json.dumps(EVAL))
    paths = plot_run(run_copy, tmp_path / "figures")
    assert [p.name for p in paths] == ["factors.png", "search.png", "search_work.png", "ppl_by_length.png",
                                       "passkey.png"]
    assert all(p.parent == tmp_path / "figures" for p in paths)
    assert not (run_copy / "plots").exists()
    for path in paths:
        assert_png(path)


def test_the_work_curve_ends_at_the_runs_forward_tokens_and_its_best_score(run):
    state, _ = load_state(run)
    ff = load_factors(run)
    tokens, scores = work_curve(state)
    assert len(tokens) == state.generation + 1 == 3
    assert tokens[-1] == ff.search.forward_tokens > tokens[0] > 0  # every evaluation's tokens, generation 0 first
    assert all(a <= b for a, b in zip(tokens, tokens[1:]))
    assert all(a >= b for a, b in zip(scores, scores[1:]))  # the best so far never gets worse
    assert scores[-1] == min(e.ppl for e in state.history if not e.rejected)


def test_eval_without_passkey_skips_the_passkey_plot(run_copy):
    (run_copy / "eval.json").write_text(json.dumps({"lengths": [32], "ppl": {"pi": {"32": 9.0}}}))
    assert [p.name for p in plot_run(run_copy)][-1] == "ppl_by_length.png"


def test_load_eval_accepts_string_and_int_lengths_and_drops_missing_scores(tmp_path):
    assert load_eval(tmp_path) is None
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    results = load_eval(tmp_path)
    assert results["ppl"] == {"longrope": {32: 9.1, 64: 9.4, 128: 10.2}, "pi": {32: 9.5, 64: 11.0}}
    assert results["passkey"] == {"longrope": {32: 1.0, 64: 0.9, 128: 0.6}}


@pytest.mark.parametrize("text", ["{not json", '{"ppl": {"pi": {"4k": 9.0}}}', '{"ppl": [1, 2]}', "[1]"])
def test_damaged_eval_json_is_a_checkpoint_error(tmp_path, text):
    (tmp_path / "eval.json").write_text(text)
    with pytest.raises(CheckpointError, match="eval.json is damaged.*re-run `longrope eval`"):
        load_eval(tmp_path)


def test_missing_or_damaged_inputs_are_typed_errors(run_copy, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        plot_run(tmp_path / "nowhere")
    state = run_copy / "state"
    (run_copy / "factors.json").rename(run_copy / "moved.json")
    with pytest.raises(ExportError, match="factors.json does not exist"):
        plot_run(run_copy)
    (run_copy / "moved.json").rename(run_copy / "factors.json")
    for path in state.glob("gen_*.json"):
        path.write_text("{torn")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        plot_run(run_copy)
    shutil.rmtree(state)
    with pytest.raises(CheckpointError, match="no search state"):
        plot_run(run_copy)


def test_damaged_newest_checkpoint_warns_and_plots_the_one_before(run_copy):
    newest = sorted((run_copy / "state").glob("gen_*.json"))[-1]
    newest.write_text("{torn")
    warnings: list[str] = []
    assert len(plot_run(run_copy, warn=warnings.append)) == 3
    assert len(warnings) == 1 and newest.name in warnings[0]


def test_unwritable_output_is_a_checkpoint_error(run_copy):
    (run_copy / "plots").write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="cannot write plots to .*writable"):
        plot_run(run_copy)


def test_lengths_read_as_the_cli_writes_them():
    assert [format_length(n) for n in (32, 4096, 6144, 262144, 2097152, 4000)] == [
        "32", "4k", "6k", "256k", "2m", "4000"]


def test_needle_results_add_a_heat_map_per_variant_and_accuracy_by_length(run_copy):
    cells = {"0": 1.0, "0.5": 0.5, "1": 1.0}
    needle = {variant: {m: {"32": cells, "128": {"0": 0.0, "0.5": 0.25, "1": 0.75}} for m in ("none", "yarn", "longrope")}
              for variant in ("single", "multikey")}
    (run_copy / "eval.json").write_text(json.dumps({**EVAL, "needle": needle, "needle_trials": 4}))
    paths = plot_run(run_copy)
    assert [p.name for p in paths][-3:] == ["needle_by_length.png", "needle_single.png", "needle_multikey.png"]
    for path in paths:
        assert_png(path)
