"""Early rejection (search.race_margin): a rejected candidate is never a parent nor the winner, margin 0 is the plain
search, a race that never triggers changes nothing, the work is counted, and replaying a fully scored search with the
racing rule never drops the generation's eventual best."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from search_fixtures import search_config

from longrope_search import checkpoint, evolution
from longrope_search.config import from_dict
from longrope_search.fitness import FitnessResult, Race
from longrope_search.model import load_model_config, rope_spec
from longrope_search.search import Search
from longrope_search.search_run import run_search
from longrope_search.search_setup import make_setup


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_files):
    return tiny_files("racing", documents=12)


def history(run_dir) -> list[dict]:
    return checkpoint.state_to_json(checkpoint.load_state(run_dir)[0])["history"]


def test_a_rejected_candidate_is_never_a_parent_nor_the_winner(setup, tmp_path):
    """A fake scorer rejects every odd child with a score better than everything: selection must ignore it."""
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=4))
    search_setup = make_setup(config, rope_spec(load_model_config(str(model))))
    rejected: set[str] = set()

    def score(candidates, bar=None, full=False):
        out = []
        for cand in candidates:
            h = int(cand.key.encode().hex(), 16) % 1000
            if bar is not None and h % 2:
                rejected.add(cand.key)
                out.append(FitnessResult(1.0, [0.0], rejected=True, forward_tokens=32))  # "better" than all
            else:
                out.append(FitnessResult(10.0 + h / 1000, [math.log(10.0)] * 2, forward_tokens=64))
        return out

    search = Search(search_setup, tmp_path, score, None, writes=False)  # in memory: no identity to resume
    state = search.run(None)
    assert rejected and state.generation == 4
    for generation in range(4):  # replay selection from the history: no rejected key among any generation's parents
        population = [(e.candidate, e.selection_score) for e in state.history if e.generation <= generation]
        parents = evolution.select(population, config.search.parents)
        assert not rejected & {p.key for p in parents}
    assert state.best().candidate.key not in rejected and state.best().ppl >= 10.0
    assert state.forward_tokens == sum(32 if e.rejected else 64 for e in state.history)


def test_margin_0_is_the_plain_search_and_a_race_that_never_triggers_changes_nothing(setup, tmp_path):
    model, corpus = setup
    off, off_dir = run_search(from_dict(search_config(model, corpus, generations=3, race_margin=0)), tmp_path / "off")
    wide, wide_dir = run_search(from_dict(search_config(model, corpus, generations=3, race_margin=1e9)),
                                tmp_path / "wide")
    assert history(off_dir) == history(wide_dir) and off.factors == wide.factors and off.scores == wide.scores
    assert not any(e.get("rejected") for e in history(off_dir))
    length, samples = 128, 2  # 4x of the 32-token window, data.samples
    assert all(e["tokens"] == samples * length for e in history(off_dir))
    assert off.search.forward_tokens == len(history(off_dir)) * samples * length and off.search.rejected == 0


def test_racing_saves_work_and_records_it_everywhere(setup, tmp_path):
    model, corpus = setup
    config = search_config(model, corpus, generations=4, race_margin=1e-6)  # a random model: NLL gaps ~1e-5
    config["data"]["samples"] = 4
    final, run_dir = run_search(from_dict(config), tmp_path / "run")
    entries = history(run_dir)
    stopped = [e for e in entries if e.get("rejected")]
    assert stopped and all(e["tokens"] < 4 * 128 and e["generation"] > 0 for e in stopped)
    assert final.search.rejected == len(stopped) and final.search.forward_tokens == sum(e["tokens"] for e in entries)
    assert final.search.forward_tokens < len(entries) * 4 * 128
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["event"] == "eval"]
    assert all("tokens" in r and isinstance(r["nlls"], list) for r in evals)
    assert {r["key"] for r in evals if r.get("rejected")} == {
        evolution.Candidate.from_json(e).key for e in stopped}
    assert lines[-2]["event"] == "generation" and lines[-2]["forward_tokens"] == final.search.forward_tokens


def test_replaying_a_full_search_with_the_race_never_drops_the_eventual_best(setup, tmp_path):
    """Every candidate scored in full (margin 0, per-sample NLLs logged); the racing rule applied afterwards to each
    generation against its worst parent: the winner of the search, and of each generation, is never rejected."""
    model, corpus = setup
    config = search_config(model, corpus, generations=5, race_margin=0)
    config["data"]["samples"] = 4
    search_config_ = from_dict(config)
    _, run_dir = run_search(search_config_, tmp_path / "full")
    nlls = {json.loads(line)["key"]: json.loads(line)["nlls"] for line in (run_dir / "log.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "eval"}
    entries = checkpoint.load_state(run_dir)[0].history
    k = search_config_.search.parents
    winner = min(entries, key=lambda e: e.ppl).candidate.key
    for generation in range(1, 6):
        before = [(e.candidate, e.ppl) for e in entries if e.generation < generation]
        bar = evolution.select(before, k)[-1]
        race = Race(tuple(nlls[bar.key]), 0.05)
        children = [e for e in entries if e.generation == generation]
        best_child = min(children, key=lambda e: e.ppl)
        stopped = {e.candidate.key for e in children
                   if any(race.lost(nlls[e.candidate.key][:j]) for j in range(1, len(nlls[e.candidate.key])))}
        assert best_child.candidate.key not in stopped and winner not in stopped
        # nothing rejected was good enough to become a parent by more than the margin
        threshold = np.mean(nlls[bar.key])
        assert all(np.mean(nlls[key]) > threshold - 0.05 for key in stopped)


@pytest.mark.slow
def test_kill_9_mid_candidate_with_racing_resumes_to_the_uninterrupted_result(setup, tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from search_fixtures import comparable, write_config

    model, corpus = setup
    config = search_config(model, corpus, generations=8, race_margin=1e-6)
    config["data"]["samples"] = 4
    cfg = write_config(tmp_path / "cfg.yaml", config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "longrope_search", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = cli("search", "--config", str(cfg), "--out", "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    victim = cli("search", "--config", str(cfg), "--out", "run")
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:  # past the initial population: children are raced
        if log.is_file() and '"event": "generation", "generation": 1' in log.read_text():
            break
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = cli("search", "--resume", "run")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    ref = json.loads((tmp_path / "ref" / "factors.json").read_text())
    run = json.loads((tmp_path / "run" / "factors.json").read_text())
    ref.pop("model"), run.pop("model")
    assert comparable(run) == comparable(ref) and ref["search"]["rejected"] > 0
    assert history(tmp_path / "run") == history(tmp_path / "ref")
