"""What early rejection would have stopped, replayed offline on a plain run (search.race_margin 0), whose every
candidate was scored on every sample (log.jsonl keeps each one's per-sample losses).

For each generation g >= 1 the bar is the worst of the parents chosen from generations before g (the `parents`
best), as the search sets it; a child is stopped at the first sample after which `fitness.Race` says it lost. For
each margin it prints how many children would have been stopped, how many of those would have become parents had
they been scored in full, whether a generation's best child or the run's winner would have been lost, and the
share of the children's samples that would have been scored. First it prints why a margin cannot go lower: how
many children became parents, how close to the bar the others were (mean over all samples), and the spread of one
sample's paired difference (the noise a race has to see through after one sample).

Run: python scripts/race_replay.py RUN [--parents K (default: the run's search.parents)] [--margins 0.01,0.05]
"""

import argparse
import statistics
from pathlib import Path

from longrope_search import checkpoint, evolution
from longrope_search.errors import LongRopeError
from longrope_search.fitness import Race
from longrope_search.rundir import LOG_FILE, read_run_config


def margin_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give margins in nats separated by commas, e.g. 0.01,0.05")


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("run", type=Path,
                    help="a finished search run with search.race_margin 0 (e.g. bench_search's plain run)")
parser.add_argument("--parents", type=int, default=None, help="parents per generation (default: the run's own)")
parser.add_argument("--margins", type=margin_list, default="0.01,0.02,0.05,0.1,0.2",
                    help="race margins to replay, in nats")
args = parser.parse_args()
run, margins = args.run, args.margins
try:
    ran = read_run_config(run)["search"]
except LongRopeError as e:
    parser.error(str(e))
if ran.get("race_margin"):
    parser.error(f"{run} ran with search.race_margin {ran['race_margin']}: its stopped candidates have no full "
                 "scores to replay; rerun it with --set search.race_margin=0.")
k = ran["parents"] if args.parents is None else args.parents
nlls = {r["key"]: r["nlls"] for r in checkpoint.log_records(run / LOG_FILE)
        if r["event"] == "eval" and not r["key"].startswith(("validation|", "baseline:", "attention:"))}
try:
    state, _ = checkpoint.load_state(run)
except LongRopeError as e:
    parser.error(str(e))
entries = state.history
gens = max(e.generation for e in entries)
if gens < 1:
    parser.error(f"{run} has no generation after the initial population yet; replay it once it has children.")
winner = min(entries, key=lambda e: e.ppl).candidate.key
n = len(next(iter(nlls.values())))
print(f"{run}: {len(entries)} evaluations, {gens} generations, {n} samples, parents {k}")
became, others, spreads = 0, [], []  # children that became parents; the others' mean gap to the bar; per-sample sd
for g in range(1, gens + 1):
    before = [(e.candidate, e.ppl) for e in entries if e.generation < g]
    bar = nlls[evolution.select(before, k)[-1].key]
    children = [e for e in entries if e.generation == g]
    nxt = {c.key for c in evolution.select(before + [(e.candidate, e.ppl) for e in children], k)}
    for e in children:
        gaps = [a - b for a, b in zip(nlls[e.candidate.key], bar)]
        spreads.append(statistics.stdev(gaps))
        if e.candidate.key in nxt:
            became += 1
        else:
            others.append(statistics.mean(gaps))
total = became + len(others)
print(f"{became} of {total} children became parents; of the other {len(others)}, {sum(g <= 0.02 for g in others)} "
      f"were at most 0.02 nats above the bar over all {n} samples (median {statistics.median(others):+.4f}); one sample's "
      f"gap to the bar varies by {statistics.median(spreads):.4f} nats (median sd)")
for m in margins:
    stopped = would_be_parents = 0; best_lost = winner_lost = False; samples_used = 0; children_total = 0
    for g in range(1, gens + 1):
        before = [(e.candidate, e.ppl) for e in entries if e.generation < g]
        parents = evolution.select(before, k)
        race = Race(tuple(nlls[parents[-1].key]), m)
        children = [e for e in entries if e.generation == g]
        children_total += len(children)
        nxt = {c.key for c in evolution.select(before + [(e.candidate, e.ppl) for e in children], k)}
        best_child = min(children, key=lambda e: e.ppl).candidate.key
        for e in children:
            seq = nlls[e.candidate.key]
            j = next((j for j in range(1, n) if race.lost(seq[:j])), None)
            samples_used += n if j is None else j
            if j is not None:
                stopped += 1
                would_be_parents += e.candidate.key in nxt
                best_lost |= e.candidate.key == best_child
                winner_lost |= e.candidate.key == winner
    print(f"margin {m:g}: stopped {stopped}/{children_total} children, of them {would_be_parents} would have been parents; "
          f"a generation's best child stopped: {best_lost}; the winner stopped: {winner_lost}; "
          f"child samples scored {samples_used}/{children_total * n} ({samples_used / (children_total * n):.2f})")
