"""scripts/bench_search.py and scripts/race_replay.py run end to end on a tiny model: every variant's row has its
numbers, the reference's ratios are 1, a saving changes what it should (racing and screening stop candidates, the
seed settings change the initial population), and the replay reads the reference's run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from search_fixtures import search_config, write_config

from longrope_search import checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench(tiny_files):
    model, corpus = tiny_files("bench", documents=12)
    root = model.parent
    config = search_config(model, corpus, generations=2, population=16)
    config["data"].update(samples=3, validation_samples=2)
    config["search"]["select_top"] = 2
    path = write_config(root / "bench.yaml", config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--config", str(path),
                          "--targets", "4x", "--variants", "plain,race,screen,all", "--out", str(root / "runs"),
                          "--race-margin", "1e-6"],  # a random model: NLL gaps ~1e-5
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 12 and cells[1] == "4x":
            rows[cells[2]] = cells[1:]
    return root / "runs", rows, env


def test_every_variant_prints_its_numbers_and_the_reference_is_1(bench):
    runs, rows, _ = bench
    assert set(rows) == {"plain", "race", "screen", "all"}
    plain = rows["plain"]
    assert plain[3] == "0" and plain[5] == "1.000" and plain[8] == "+0.00%"  # no rejection; ratios to itself
    assert "(1.00x)" in plain[10] or float(plain[10].split("(")[1].rstrip("x)")) <= 1.0  # reaches its own winner
    evals = {name: int(row[2]) for name, row in rows.items()}
    tokens = {name: float(row[4]) for name, row in rows.items()}
    assert int(rows["race"][3]) > 0 and float(rows["race"][5]) < 1.0 and evals["race"] == evals["plain"]
    # screening: about half of each generation's children stop after the first 2 of 3 windows
    assert int(rows["screen"][3]) >= 2 * 3 and float(rows["screen"][5]) < 1.0 and evals["screen"] == evals["plain"]
    for name in rows:  # the work printed is every score the run logged (a key's last line), validation included
        logged = [json.loads(line) for line in (runs / f"4x-{name}" / "log.jsonl").read_text().splitlines()]
        last = {r["key"]: r["tokens"] for r in logged if r["event"] == "eval"}
        assert round(sum(last.values()) / 1e6, 2) == tokens[name]
        assert any(r["key"].startswith("validation|") for r in logged if r["event"] == "eval")
        curve = json.loads((runs / f"4x-{name}" / "bench_curve.json").read_text())
        assert len(curve) == 3 and all(a[0] < b[0] for a, b in zip(curve, curve[1:]))  # generation 0, 1, 2


def test_the_seed_settings_change_the_initial_population(bench):
    runs, _, _ = bench
    plain = checkpoint.load_state(runs / "4x-plain")[0].history
    every = checkpoint.load_state(runs / "4x-all")[0].history
    assert {e.origin for e in plain if e.generation == 0} == {"pi", "ntk", "yarn", "mutation"}
    seeds = [e.origin for e in every if e.generation == 0 and e.origin != "mutation"]
    assert seeds[:3] == ["pi", "ntk", "yarn"] and any(o.startswith("yarn@") for o in seeds)  # scored first


def test_race_replay_reads_the_plain_run(bench):
    runs, _, env = bench
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "race_replay.py"), str(runs / "4x-plain"),
                          "--margins", "1e-6,1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "children became parents" in lines[1]
    assert lines[2].startswith("margin 1e-06: stopped") and lines[3].startswith("margin 1: stopped 0/")


def test_race_replay_refuses_a_raced_run(bench):
    runs, _, env = bench
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "race_replay.py"), str(runs / "4x-race")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "search.race_margin=0" in out.stderr.splitlines()[-1]


def test_bench_long_context_runs_on_a_tiny_shape_and_its_memory_model_holds():
    """The first GPU run of scripts/bench_long_context.py must not fail on an import: a tiny shape on CPU, both modes
    at two lengths, the measured peak within 5% of plan's prediction."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_long_context.py"), "--hidden", "64",
                          "--layers", "1", "--intermediate", "128", "--heads", "2", "--kv-heads", "2", "--vocab", "512",
                          "--lengths", "256,512"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip().startswith(("256", "512"))]
    assert sorted((int(r[0]), r[1].strip()) for r in rows) == [(256, "chunked"), (256, "whole"), (512, "chunked"),
                                                               (512, "whole")]
    assert all(abs(float(r[-1]) - 1) < 0.05 for r in rows)
    assert "whole: longest length scored 512" in out.stdout and "chunked: longest length scored 512" in out.stdout
