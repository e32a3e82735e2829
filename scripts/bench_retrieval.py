"""Searches side by side on one budget, judged on both things a user extends a model for: held-out perplexity and
held-out needle retrieval at the target, with no scaling, PI, NTK and YaRN as rows.

Each variant is `longrope search` on the config with a few settings changed, then `longrope eval RUN --lengths
TARGET --needle` (16 held-out windows for PPL; 20 prompts at each of 5 depths per needle cell, one needle and 4 keys
with one asked; documents no search decided with). The variants (--variants):
  v1         search.fitness ppl with seeds PI, NTK, YaRN, every seed bred, every candidate on every window:
             the paper's search, perplexity of whole windows
  v1+family  the same with the YaRN family among the seeds
  joint      the default (screening, seed margin): windows with search.needles numbers asked at the end, text NLL + weight x answer NLL
  needle     search.fitness needle: the answers' loss alone, in the same space
  longrope2  search.method longrope2 on the config's budget (needle fitness, critical-dimension seeds, mscale gene)
(every variant but v1 seeds the YaRN family too, the default)
plus any `--variant "NAME=KEY=VALUE;KEY=VALUE"` (e.g. `--variant w1=search.needle_weight=1`).

Printed: one row per method, PPL and needles at the target, each variant's ratio to YaRN, and whether it meets the
bar of the default (PPL at least 3% below YaRN's and needles no fewer). Runs go to OUT/TARGET/VARIANT; --reuse keeps
finished ones. --jobs 2 runs two searches at once (one thread each).

    python scripts/bench_retrieval.py --config tiny --targets 8x,16x --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from longrope_search.config import find_config

PAPER_SEEDS, FAMILY = "search.seeds=[pi,ntk,yarn]", "search.seeds=[pi,ntk,yarn,yarn-family]"
# each variant pins the settings it is about, so its row does not move when a default does
PAPER_COST = ["search.screen_windows=0", "search.seed_margin=null"]  # every candidate in full, every seed bred
VARIANTS = {
    "v1": ["search.fitness=ppl", PAPER_SEEDS, *PAPER_COST],
    "v1+family": ["search.fitness=ppl", FAMILY, *PAPER_COST],
    "joint": ["search.fitness=joint", FAMILY],
    "needle": ["search.fitness=needle", FAMILY],
    "longrope2": ["search.method=longrope2", "search.fitness=needle", "search.n_hat=[0]", FAMILY],
}
BASELINES = ("none", "pi", "ntk", "yarn")
SEARCHED = "longrope"  # the searched factors' row in eval.json
PPL_MARGIN = 0.03  # the default's bar: held-out PPL at least this much below YaRN's



def fail(message: str) -> None:
    """A user mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        sys.exit(f"error: `{' '.join(command)}` failed (exit {done.returncode}); its output is in {log}")


def search_and_eval(config: str, target: str, name: str, settings: list[str], out: Path, reuse: bool) -> Path:
    """The run folder of one variant, searched and evaluated (each step skipped when --reuse finds it done)."""
    run_dir = out / target / name
    log = out / target / f"{name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = [arg for s in [f"search.target={target}", *settings] for arg in ("--set", s)]
    if not (reuse and (run_dir / "factors.json").is_file() and _finished(run_dir)):
        resume = run_dir.is_dir() and reuse
        command = ["longrope", "search", "--resume", str(run_dir)] if resume else \
            ["longrope", "search", "--config", config, "--out", str(run_dir), *overrides]
        run(command, log)
    if not (reuse and _evaluated(run_dir)):
        run(["longrope", "eval", str(run_dir), "--lengths", target, "--needle"], log)
    return run_dir


def _finished(run_dir: Path) -> bool:
    lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").is_file() else []
    return any(json.loads(line).get("event") == "done" for line in lines[-3:] if line.strip())


def _evaluated(run_dir: Path) -> bool:
    """eval.json holds PPL and both needle variants at the run's own target."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return False
    doc = json.loads(path.read_text())
    length = str(json.loads((run_dir / "factors.json").read_text())["target_length"])
    needles = doc.get("needle", {})
    return (all(length in row for row in doc.get("ppl", {}).values())
            and all(length in row for v in ("single", "multikey") for row in needles.get(v, {"": {}}).values()))


def scores(run_dir: Path) -> dict[str, tuple[float, float, float]]:
    """method -> (held-out PPL, one needle, 4 keys) at the run's target, from its eval.json."""
    doc = json.loads((run_dir / "eval.json").read_text())
    length = str(json.loads((run_dir / "factors.json").read_text())["target_length"])

    def needle(variant: str, method: str) -> float:
        cells = doc["needle"][variant][method][length]
        return sum(cells.values()) / len(cells)

    return {m: (doc["ppl"][m][length], needle("single", m), needle("multikey", m)) for m in doc["ppl"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="the search config (a path or a shipped name)")
    parser.add_argument("--targets", default="8x", help="comma-separated targets, e.g. 8x,16x")
    parser.add_argument("--variants", default="v1,joint,longrope2", help="comma-separated, from: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE: one more variant")
    parser.add_argument("--out", default="runs/bench-retrieval", help="folder of the runs")
    parser.add_argument("--reuse", action="store_true", help="keep finished searches and evaluations")
    parser.add_argument("--jobs", type=int, default=1, help="searches at once (one thread each)")
    args = parser.parse_args()
    variants = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            fail(f"unknown variant {name!r}; use {', '.join(VARIANTS)} or --variant NAME=KEY=VALUE")
        variants[name] = VARIANTS[name]
    for text in args.variant:
        name, sep, settings = text.partition("=")
        if not sep or not name or "=" not in settings:
            fail(f"--variant {text!r} is not NAME=KEY=VALUE[;KEY=VALUE]")
        variants[name] = settings.split(";")
    config = str(find_config(args.config))
    if not Path(config).is_file():
        fail(f"config {args.config} does not exist; give a path or a shipped name such as tiny")
    out = Path(args.out)
    targets = args.targets.split(",")
    jobs = [(t, n, s) for t in targets for n, s in variants.items()]
    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        folders = list(pool.map(lambda job: search_and_eval(config, job[0], job[1], job[2], out, args.reuse), jobs))
    results = {(t, n): scores(f) for (t, n, _), f in zip(jobs, folders)}
    for target in targets:
        first = results[(target, next(iter(variants)))]
        yarn_ppl, yarn_needle, yarn_keys = first["yarn"]
        print(f"\n{args.config} at {target}: held-out PPL and needle accuracy (100 prompts per cell)")
        print("| method | PPL | vs YaRN | one needle | 4 keys | PPL -3% and needles >= YaRN |")
        print("|---|---|---|---|---|---|")
        for method in BASELINES:
            ppl, one, four = first[method]
            print(f"| {method} | {ppl:.2f} | {ppl / yarn_ppl - 1:+.1%} | {one:.0%} | {four:.0%} | |")
        for name in variants:
            ppl, one, four = results[(target, name)][SEARCHED]
            met = ppl <= (1 - PPL_MARGIN) * yarn_ppl and one >= yarn_needle and four >= yarn_keys
            print(f"| longrope {name} | {ppl:.2f} | {ppl / yarn_ppl - 1:+.1%} | {one:.0%} | {four:.0%} | "
                  f"{'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
