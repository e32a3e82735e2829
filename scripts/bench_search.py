"""The search's savings measured side by side: the same search (same config, seed and budget) with each saving off
and on, on the shipped model at 8x and 16x. The variants (--variants, the first is the reference):
  plain       the paper's search: fitness ppl, seeds PI/NTK/YaRN, every seed mutated, every candidate on every window,
              no racing
  race        plain with early rejection at --race-margin (default: the config default)
  seeds       plain with the initial mutants only of seeds within SEED_MARGIN nats of the best
  race+seeds  both
  family      plain with the YaRN family among the seeds
  all         race, seeds and family together
  screen      plain with multi-fidelity scoring (search.screen_windows, the default 2 windows, half kept)
  default     the config as it is: every default of this version (joint fitness, chance check, family, seed margin
              0.1, screening, racing)
  keep0.25    the default with a quarter of each batch kept (and no chance check, as first measured)
  no-check    the default without the chance check (search.needle_check false)
  default-ppl the default with the paper's fitness
(Fewer search windows is not a variant: data.samples also moves which documents are held out, so the held-out PPLs
would not compare.)

For each run it prints the evaluations, the candidates stopped early, the forward tokens (every score the run logged,
validation included: the work), the wall time, the held-out PPL of the winner and its needle retrieval on the held-out
samples (the search's final comparison), and the forward tokens the run needed to reach the held-out PPL of the
reference's final winner: after each generation the winner the search would have returned had it stopped there is
scored on the held-out samples afterwards (that scoring is not search work).

Run: `python scripts/bench_search.py` (the paper's settings and the defaults, on both shipped models at 8x and 16x:
about 50 minutes on one core; `--config tiny` and `--config tiny-qwen2` as two processes on 2 cores); `--targets 8x
--generations 6` for a quick look.
Searches run one after another in a process; `--out DIR --reuse` adds variants to finished runs without rerunning
them (each keeps the wall time it recorded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from longrope_search import checkpoint, distributed
from longrope_search.checkpoint import Evaluation
from longrope_search.config import DEFAULT_RACE_MARGIN, DEFAULT_SCREEN_WINDOWS, find_config, load_config
from longrope_search.factors import COLUMN, load_factors
from longrope_search.fitness import Evaluator
from longrope_search.rundir import FACTORS_FILE, LOG_FILE
from longrope_search.sample_sets import reweighed
from longrope_search.search_run import load, open_run, run_search, set_up
from longrope_search.validation import Validator



PAPER_SEEDS, FAMILY = "search.seeds=[pi,ntk,yarn]", "search.seeds=[pi,ntk,yarn,yarn-family]"
SEED_MARGIN = 0.5  # nats: at 8x on the shipped model PI's seed is 1.6 and NTK's 0.7 behind YaRN's
NO_RACE, RACE = "search.race_margin=0", "search.race_margin={margin}"  # filled with --race-margin
ALL_SEEDS, BEST_SEEDS = "search.seed_margin=null", f"search.seed_margin={SEED_MARGIN}"
NO_SCREEN, SCREEN = "search.screen_windows=0", f"search.screen_windows={DEFAULT_SCREEN_WINDOWS}"
PPL = "search.fitness=ppl"  # the savings were measured on the paper's fitness
# every variant but `default` sets all five settings, so the table does not depend on the config's defaults
VARIANTS = {
    "plain": [NO_RACE, ALL_SEEDS, PAPER_SEEDS, PPL, NO_SCREEN],
    "race": [RACE, ALL_SEEDS, PAPER_SEEDS, PPL, NO_SCREEN],
    "seeds": [NO_RACE, BEST_SEEDS, PAPER_SEEDS, PPL, NO_SCREEN],
    "race+seeds": [RACE, BEST_SEEDS, PAPER_SEEDS, PPL, NO_SCREEN],
    "family": [NO_RACE, ALL_SEEDS, FAMILY, PPL, NO_SCREEN],
    "all": [RACE, BEST_SEEDS, FAMILY, PPL, NO_SCREEN],
    "screen": [NO_RACE, ALL_SEEDS, PAPER_SEEDS, PPL, SCREEN],  # multi-fidelity alone, against race
    "default": [],  # the config as it is: every default of this version
    "keep0.25": ["search.screen_keep=0.25", "search.needle_check=false"],  # a harder screen: a quarter in full
    "no-check": ["search.needle_check=false"],  # the defaults with the answers weighed even at chance
    "default-ppl": [PPL],  # the defaults with the paper's fitness: what the cost savings do without the needles
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny,tiny-qwen2",
                   help="the searches to run, comma-separated config names or paths (default: both shipped models)")
    p.add_argument("--targets", default="8x,16x")
    p.add_argument("--variants", default="plain,default",
                   help=f"of {', '.join(VARIANTS)}; the first is the reference")
    p.add_argument("--race-margin", type=float, default=DEFAULT_RACE_MARGIN, help="the racing variants' margin")
    p.add_argument("--generations", type=int, default=None, help="override search.generations")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="take finished runs in --out as they are (the wall time "
                   "they recorded) and only redo the held-out curves")
    return p.parse_args()


def best_so_far(run_dir: Path) -> list[tuple[int, Evaluation]]:
    """(forward tokens spent, best evaluation so far) after each generation. The tokens are every score in
    log.jsonl, the search's and the validation's (both are work the search needs), in the order they were spent; the
    final comparison on the held-out samples is reporting, not search work, and is not logged."""
    state, _ = checkpoint.load_state(run_dir)
    spent, at_generation, counted = 0, [], {}
    for record in checkpoint.log_records(run_dir / LOG_FILE):
        if record["event"] == "eval":  # a screened candidate's second line holds both rounds' tokens
            spent += record["tokens"] - counted.get(record["key"], 0)
            counted[record["key"]] = record["tokens"]
        elif record["event"] == "generation":
            at_generation.append(spent)
    out, best = [], None
    for generation, tokens in enumerate(at_generation):
        for e in state.history:
            if e.generation == generation and not e.rejected and (
                    best is None or (e.ppl, e.candidate.key) < (best.ppl, best.candidate.key)):
                best = e
        out.append((tokens, best))
    return out


def work_tokens(run_dir: Path) -> int:
    """Forward tokens of the whole search: its evaluations and the validation's, with the final selection's (each key
    once, at its last line: a screened candidate's second line holds both rounds' tokens)."""
    last = {r["key"]: r["tokens"] for r in checkpoint.log_records(run_dir / LOG_FILE) if r["event"] == "eval"}
    return sum(last.values())


def heldout_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(forward tokens spent, held-out PPL of the winner the search would have returned had it stopped there) after
    each generation: the validation best of the search.select_top best by search score, picked by the search's own
    rule (Validator.select); the search's best where there is no validation set. The run is opened, set up and loaded
    as a resume of it would be (its saved config, model options and samples); validation scores it logged are
    reused, the others scored here (a few evaluations on the validation windows, logged beside the run)."""
    opened = open_run(None, run_dir, resume=True, overrides=[])
    model_config, setup = set_up(opened.config)
    loaded = load(setup, model_config, distributed.SINGLE_PROCESS)
    # the run weighed the answers 0 after its chance check: so does its validation
    sets = reweighed(loaded.sets, 0.0) if opened.needles_checked else loaded.sets
    chunk = setup.config.search.chunk_size
    heldout = Evaluator(loaded.model, sets.heldout_plain, chunk)  # plain PPL, whatever the fitness
    validator = None
    if sets.validation is not None:
        scores = Evaluator(loaded.model, sets.validation.ids, chunk, targets=sets.validation.targets,
                           joint=sets.validation.joint)
        scores.preload(opened.logged, opened.details)
        validator = Validator(setup, scores, run_dir / "bench_validation.jsonl")
    state, _ = checkpoint.load_state(run_dir)
    curve = []
    for generation, (tokens, _) in enumerate(best_so_far(run_dir)):
        so_far = dataclasses.replace(state, generation=generation,
                                     history=[e for e in state.history if e.generation <= generation])
        c = (validator.select(so_far)[0] if validator is not None else so_far.best()).candidate
        curve.append((tokens, heldout.score(c.key, setup.factors(c.genes), c.n_hat, setup.mscale_of(c)).ppl))
    return curve


def main() -> None:
    args = parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_search_"))
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; use some of: {', '.join(VARIANTS)}.")
    configs = [find_config(name) for name in args.config.split(",")]
    print(f"configs {', '.join(map(str, configs))}, variants {variants}, runs in {root}", flush=True)
    header = ("model", "target", "variant", "evals", "stopped", "fwd Mtok", "tok ratio", "wall s", "held-out", "vs plain",
              "needles", "Mtok to plain's held-out")
    print(" | ".join(f"{h:>10}" for h in header), flush=True)
    for path, target in ((path, target) for path in configs for target in args.targets.split(",")):
        plain = None  # (forward tokens, held-out PPL) of the reference (first) variant's run
        for variant in variants:
            overrides = [f"search.target={target}", *(o.format(margin=args.race_margin) for o in VARIANTS[variant])]
            if args.generations is not None:
                overrides.append(f"search.generations={args.generations}")
            config = load_config(path, overrides)
            run_dir = root / (f"{target}-{variant}" if len(configs) == 1 else f"{path.stem}/{target}-{variant}")
            wall_file = run_dir / "bench_wall.json"
            if args.reuse and (run_dir / FACTORS_FILE).exists() and wall_file.exists():
                final, wall = load_factors(run_dir / FACTORS_FILE), json.loads(wall_file.read_text())["seconds"]
            else:
                began = time.perf_counter()
                final, _ = run_search(config, run_dir)
                wall = time.perf_counter() - began
                wall_file.write_text(json.dumps({"seconds": wall}))
            curve = heldout_curve(run_dir)
            (run_dir / "bench_curve.json").write_text(json.dumps(curve))
            heldout, tokens = final.scores.heldout_text, work_tokens(run_dir)
            plain = plain or (tokens, heldout)
            reach = next((t for t, ppl in curve if ppl <= plain[1] * (1 + 1e-9)), None)
            row = (path.stem, target, variant, final.search.evaluations, final.search.rejected, f"{tokens / 1e6:.2f}",
                   f"{tokens / plain[0]:.3f}", f"{wall:.0f}", f"{heldout:.4f}", f"{heldout / plain[1] - 1:+.2%}",
                   COLUMN['needle'].show(final.scores.needle),
                   "never" if reach is None else f"{reach / 1e6:.2f} ({reach / plain[0]:.2f}x)")
            print(" | ".join(f"{str(c):>10}" for c in row), flush=True)


if __name__ == "__main__":
    main()
