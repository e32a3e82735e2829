"""What a user sees while a search runs without a terminal (a log file, a scheduler): every phase as a line, and a
progress line at least every PLAIN_EVERY_SECONDS naming the generation, "of N", elapsed and remaining time."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console
from search_fixtures import search_config, write_corpus, write_model

from longrope_search import progress
from longrope_search.config import from_dict
from longrope_search.search_run import run_search


def test_a_search_without_a_terminal_prints_its_phases_and_periodic_progress(tmp_path):
    out = io.StringIO()
    reporter = progress.RichReporter(Console(file=out, width=200), every=0.0, delay=0.0)  # a line per evaluation
    config = from_dict(search_config(write_model(tmp_path), write_corpus(tmp_path), generations=2))
    run_search(config, tmp_path / "run", reporter=reporter)
    text = out.getvalue()
    for phase in ("reading the config of", "loading ", "tokenising 2 search, 2 held-out", "comparing the winner"):
        assert re.search(rf"^\[\d+:\d\d\] .*{phase}", text, re.M), phase
    lines = re.findall(r"^generation (\d+) of 2: (\d+) of (\d+) evaluations, \d+:\d\d elapsed", text, re.M)
    assert lines and {g for g, _, _ in lines} == {"0", "1", "2"} and all(t == "20" for _, _, t in lines)
    assert [int(done) for _, done, _ in lines] == sorted(int(done) for _, done, _ in lines)
    assert "left" in text and re.search(r"^generation 2 of 2: best ", text, re.M)


def test_phases_print_timestamped_lines_without_a_terminal_once_a_phase_lasts():
    out = io.StringIO()
    with progress.phases(Console(file=out), delay=0.0) as phase:
        phase("loading builtin:tiny")
        phase("length 1 of 2: perplexity of yarn at 128 tokens")
    assert re.fullmatch(r"\[0:00\] loading builtin:tiny\n\[0:00\] length 1 of 2: perplexity of yarn at 128 tokens\n",
                        out.getvalue())
    quick = io.StringIO()  # the default delay: a command that ends (or fails) quickly prints no phase at all
    with progress.phases(Console(file=quick)) as phase:
        phase("loading builtin:tiny")
    assert quick.getvalue() == ""
    slow = io.StringIO()
    with progress.phases(Console(file=slow), delay=0.6) as phase:
        phase("loading a large model")
        time.sleep(1.5)
    assert re.fullmatch(r"\[0:0[01]\] loading a large model\n", slow.getvalue())
    assert progress.clock(3725) == "1:02:05" and progress.clock(65) == "1:05"


def test_countdown_counts_units_and_estimates_the_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    count = progress.Countdown(4)
    assert count.next() == "1 of 4"  # nothing finished yet: no estimate
    now[0] += 30.0
    assert count.next() == "2 of 4, about 1:30 left"  # 30 s per unit, 3 to go
    now[0] += 10.0
    assert count.next() == "3 of 4, about 0:40 left"


def test_a_fine_tune_reports_its_loss_and_tokens_per_second(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    reporter = progress.RichReporter(Console(file=out, width=200))
    reporter.train_start(4, 2, "fine-tuning tiny: 4 steps of 1024 tokens; resuming after step 2")
    now[0] += 8.0  # two steps of 1024 tokens in 8 s after the resume: 256 tokens/s
    reporter.trained(4, {"loss": 2.5, "learning_rate": 1e-4, "tokens": 4 * 1024})
    assert "step 4 of 4: loss 2.5000, learning rate 0.0001, 256 tokens/s, 0:08 elapsed" in out.getvalue()
