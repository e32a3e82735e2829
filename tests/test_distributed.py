"""Searches under torchrun: two CPU ranks (gloo) score each candidate once between them and end with
the same factors.json as one process; errors reach every rank instead of leaving one waiting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from search_fixtures import comparable, search_config, write_config, write_corpus, write_model

from longrope_search import checkpoint, distributed
from longrope_search.config import from_dict
from longrope_search.search_run import run_search

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(*args: str, cwd: Path, timeout: float = 600, ranks: int = 2) -> list[dict]:
    """`ranks` ranks (two by default) of distributed_worker.py; their reports in rank order."""
    # --standalone: a rendezvous on a free local port, so tests never collide on MASTER_PORT
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the two ranks it started
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s: {err[-3000:]}")
    # a failing rank's own last words come before torchrun's report of it, which alone fills a short tail
    report = re.search(r"^[WE]\d{4} .*elastic/multiprocessing/api\.py", err, re.MULTILINE)
    ranks_said = err[:report.start()] if report else ""
    assert proc.returncode == 0, f"{ranks_said[-3000:]}\n--- torchrun ---\n{err[-1500:]}"
    return [json.loads((cwd / f"{args[0]}-rank{rank}.json").read_text()) for rank in range(ranks)]


def test_single_process_context_is_a_plain_loop(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.store) == (0, 1, True, None)
    seen = []
    assert distributed.map_candidates(lambda x: x + 1, [3, 1, 2], ctx, lambda i, r: seen.append((i, r))) == [4, 2, 3]
    assert seen == [(0, 4), (1, 2), (2, 3)]  # reported live, in order
    assert distributed.run_on_main(lambda: "x", ctx) == "x"


@pytest.mark.slow
def test_map_candidates_over_two_ranks(tmp_path):
    main, other = torchrun("map", str(tmp_path), cwd=tmp_path)
    assert (main["rank"], other["rank"], main["world_size"]) == (0, 1, 2)
    for report in (main, other):  # every rank gets every result, in item order
        assert report["results"] == [x * x for x in range(11)]
        assert report["gated_results"] == [-x for x in range(11)] and report["empty"] == []
    assert sorted(main["computed"] + other["computed"]) == list(range(11))  # each item exactly once
    assert sorted(main["seen"]) == list(range(11)) and other["seen"] == []  # rank 0 sees each result once
    # rank 0 was held in its first item: rank 1 took every other one (work goes to the free rank)
    assert (len(main["gated"]), len(other["gated"])) == (1, 10)

    assert main["main_result"] == other["main_result"] == "from rank 0"
    assert main["main_error"] == "ConfigError: bad config."
    assert other["main_error"] == "ConfigError: on rank 0: bad config."
    assert main["user_error_elsewhere"] == "ConfigError: on rank 1: no model."
    assert other["user_error_elsewhere"] == "ConfigError: no model."
    assert main["user_error_is_typed"] and other["user_error_is_typed"]  # still exit code 2 on every rank
    assert main["crash_elsewhere"] == "RuntimeError: rank 1 failed with KeyError: 'x'"
    assert other["crash_elsewhere"] == "KeyError: 'x'"


def final_history(run_dir: Path) -> list[dict]:
    state, _ = checkpoint.load_state(run_dir)
    return checkpoint.state_to_json(state)["history"]


def log_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_search_and_resume_equal_one_process(tmp_path):
    model, corpus = write_model(tmp_path), write_corpus(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", search_config(model, corpus, generations=3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, the same rounding
    try:
        run_search(from_dict(search_config(model, corpus, generations=3)), tmp_path / "ref")
        run_search(from_dict(search_config(model, corpus, generations=1)), tmp_path / "partial")
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("not a run")

    reports = torchrun("search", str(tmp_path), str(cfg), str(tmp_path / "existing"), str(tmp_path / "partial"),
                       cwd=tmp_path)

    # a check that fails on rank 0 before the loop raises on both ranks, and nothing is written
    assert reports[0]["existing_error"].startswith("CheckpointError: ")
    assert reports[1]["existing_error"].startswith("CheckpointError: on rank 0: ")
    assert "already exists and is not empty" in reports[1]["existing_error"]
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep.txt"]

    reference = json.loads((tmp_path / "ref" / "factors.json").read_text())
    for run in ("dist", "partial"):  # a fresh two-rank run, and a one-process run resumed on two ranks
        assert comparable(json.loads((tmp_path / run / "factors.json").read_text())) == comparable(reference), run
        assert final_history(tmp_path / run) == final_history(tmp_path / "ref"), run
    for report in reports:  # every rank returns the same result
        assert comparable(report["fresh"]) == comparable(report["resumed"]) == comparable(reference)

    # rank 0 alone logs: one line per candidate, none from rank 1
    evals = [e["key"] for e in log_events(tmp_path / "dist") if e["event"] == "eval"]
    assert sorted(evals) == sorted(e["key"] for e in log_events(tmp_path / "ref") if e["event"] == "eval")
    assert len(evals) == len(set(evals)) == len(final_history(tmp_path / "ref"))
    resumed = [e["event"] for e in log_events(tmp_path / "partial")]
    assert resumed.count("resume") == 1 and resumed.count("done") == 2


@pytest.mark.slow
def test_cli_under_torchrun_equals_single_process(tmp_path):
    """What users type: `torchrun ... -m longrope_search search`, against a plain run."""
    model, corpus = write_model(tmp_path), write_corpus(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", search_config(model, corpus, generations=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "dist": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "longrope_search", "search", "--config", str(cfg), "--out", "dist"],
        "ref": [sys.executable, "-m", "longrope_search", "search", "--config", str(cfg), "--out", "ref"],
        # both ranks score every sample together, each holding half of its positions (torch's ring attention)
        "cp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "longrope_search", "search", "--config", str(cfg), "--out", "cp",
               "--set", "search.context_parallel=2"],
    }
    for name, command in commands.items():
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        assert proc.returncode == 0, f"{name}: {err}"
    dist = json.loads((tmp_path / "dist" / "factors.json").read_text())
    ref = json.loads((tmp_path / "ref" / "factors.json").read_text())
    assert comparable(dist) == comparable(ref)
    # the same search; its PPLs differ from one process's by float rounding (the NLL is summed per shard)
    cp = json.loads((tmp_path / "cp" / "factors.json").read_text())
    assert (cp["factors"], cp["n_hat"], cp["search"]["best_key"]) == (ref["factors"], ref["n_hat"], ref["search"]["best_key"])
    assert cp["search"]["settings"]["context_parallel"] == 2
    # greedy needle retrieval needs a whole sample on one rank: a context-parallel run leaves that column out
    assert "needle" in ref["scores"] and "needle" not in cp["scores"]

    def scores(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != "needle"}

    assert cp["scores"] == pytest.approx(scores(ref["scores"]), rel=1e-5)
    for name, row in ref["baselines"].items():
        assert cp["baselines"][name] == pytest.approx(scores(row), rel=1e-5)
