"""microsoft/LongRoPE's factor CSVs: a run exported as them reads back with that code's own reader (np.loadtxt) to
the same numbers, and a CSV from there seeds a search here (search.init_factors), with bad files refused in one
line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from search_fixtures import one_line_error, search_config, write_config
from typer.testing import CliRunner

from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.factors import load_factors
from longrope_search.search_run import run_search, set_up
from longrope_search.search_setup import seed_vectors

runner = CliRunner()
PAIRS = 8  # the tiny llama's rotary pairs


@pytest.fixture(scope="module")
def files(tiny_files):
    model, corpus = tiny_files("csv")
    root = model.parent
    run = root / "run"
    run_search(from_dict(search_config(model, corpus, population=4, parents=2, generations=0)), run)
    return root, model, corpus, run


def test_a_run_exported_as_csv_reads_back_with_the_reference_reader(files, tmp_path):
    _, _, _, run = files
    result = runner.invoke(app, ["export", str(run), "--format", "longrope-csv", "--out", str(tmp_path / "csv"), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)
    assert doc["files"] == [str(tmp_path / "csv" / "result_final.csv")]  # no short set searched
    assert any("not in the CSVs: the attention factor" in note for note in doc["notes"])
    read = np.loadtxt(open(tmp_path / "csv" / "result_final.csv", "rb"), delimiter=",", skiprows=0)  # their reader
    assert read.shape == (PAIRS,) and read.tolist() == load_factors(run).factors  # every digit kept
    again = runner.invoke(app, ["export", str(run), "--format", "longrope-csv", "--out", str(tmp_path / "csv")])
    one_line_error(again, "result_final.csv exists; choose another --out, or pass --force")


def test_a_reference_csv_seeds_a_search_here(files, tmp_path):
    _, model, corpus, _ = files
    factors = np.linspace(1.0, 6.0, PAIRS)
    path = tmp_path / "result_final.csv"
    np.savetxt(path, factors, delimiter="\n")  # exactly as the reference search writes it
    config = search_config(model, corpus, population=4, parents=2, generations=0)
    config["search"]["init_factors"] = str(path)
    _, setup = set_up(from_dict(config))
    assert seed_vectors(setup)["init"].tolist() == factors.tolist()
    per_layer = tmp_path / "layers.csv"  # one row per layer, all the same: accepted
    np.savetxt(per_layer, np.tile(factors, (4, 1)), delimiter=",")
    config["search"]["init_factors"] = str(per_layer)
    _, setup = set_up(from_dict(config))
    assert seed_vectors(setup)["init"].tolist() == factors.tolist()


@pytest.mark.parametrize("text, expected", [
    ("1.0\n2.0\n", "holds 2 factors but the model has 8 rotary pairs"),
    ("1,2,3,4,5,6,7,8\n1,2,3,4,5,6,7,9\n", "a different factor set per layer (2 rows)"),
    ("1\n2\nthree\n4\n5\n6\n7\n8\n", "holds something other than numbers"),
    ("1\n2\n0\n4\n5\n6\n7\n8\n", "not finite positive numbers"),
])
def test_a_bad_reference_csv_is_one_line(files, tmp_path, text, expected):
    root, model, corpus, _ = files
    path = tmp_path / "bad.csv"
    path.write_text(text)
    config = search_config(model, corpus, population=4, parents=2, generations=0)
    config["search"]["init_factors"] = str(path)
    cfg = write_config(tmp_path / "cfg.yaml", config)
    one_line_error(runner.invoke(app, ["search", "--config", str(cfg), "--out", str(tmp_path / "run")]), expected)
    assert not (tmp_path / "run").exists()
