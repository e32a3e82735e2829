"""How many needles a search window should hold: for each count k, how well the answer loss on the search windows
ranks candidates the way held-out retrieval does.

The candidates are the seeds of a search (PI, NTK, YaRN and the YaRN family) plus any factors files given. Each is
scored (1) by the needle loss on the config's search windows with k needles each, all asked at the end (what the
joint fitness adds to perplexity), and (2) by greedy retrieval of one needle on the held-out windows (exact match).
Printed per k: the concordance (share of candidate pairs whose order by answer loss is their order by held-out
accuracy, ties in accuracy left out), the Spearman correlation, and YaRN's answer loss (does asking k numbers in a
row still read as retrieval to the model). Every k scores the same windows at the same forward cost.

    python scripts/bench_needles.py --config tiny --keys 1,2,4,8 --factors runs/tiny-8x
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from longrope_search.comparison import NeedleCheck
from longrope_search.config import find_config, load_config
from longrope_search.errors import LongRopeError
from longrope_search.factors import load_factors
from longrope_search.fitness import Evaluator
from longrope_search.model import LoadOptions, load_model
from longrope_search.sample_sets import sample_sets
from longrope_search.search_run import set_up



def fail(message: str) -> None:
    """A user mistake: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def concordance(loss: list[float], accuracy: list[float]) -> float:
    """Share of pairs with different accuracy that the lower loss puts first."""
    agree = total = 0
    for i, j in itertools.combinations(range(len(loss)), 2):
        if accuracy[i] == accuracy[j]:
            continue
        total += 1
        agree += (loss[i] < loss[j]) == (accuracy[i] > accuracy[j])
    return agree / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="a search config (its model, corpus, target and windows)")
    parser.add_argument("--keys", default="1,2,4,8", help="needle counts per window to compare")
    parser.add_argument("--heldout", type=int, default=64, help="held-out windows (one needle each) for the accuracy")
    parser.add_argument("--factors", nargs="*", default=[], help="runs or factors.json files added as candidates")
    parser.add_argument("--set", action="append", default=[], help="config override, key=value")
    args = parser.parse_args()
    try:
        keys = [int(k) for k in args.keys.split(",")]
    except ValueError:
        fail(f"--keys {args.keys!r} is not a comma-separated list of counts, e.g. 1,2,4,8")
    try:
        overrides = [*args.set, f"data.heldout_samples={args.heldout}", "search.fitness=needle",
                     "search.seeds=[pi,ntk,yarn,yarn-family]"]  # the candidates: every seed a search starts from
        base = load_config(find_config(args.config), overrides)
        _, setup = set_up(base)  # as the search sets itself up (the model section's load options included)
        model, tokenizer = load_model(base.model.name, device="cpu", dtype=base.model.dtype,
                                      options=LoadOptions.of(base.model))
        vectors = dict(setup.seeds)
        for path in args.factors:
            vectors[Path(path).name] = np.asarray(load_factors(path).factors)
        mscale = setup.mscale
        sets = {k: sample_sets(tokenizer, base.model_copy(update={"search": base.search.model_copy(
            update={"needles": k})}), setup.target_length) for k in keys}
    except LongRopeError as exc:
        fail(f"{exc}")
    check = NeedleCheck(model, tokenizer, sets[keys[0]].heldout_needles)
    names = list(vectors)
    accuracy = [check.accuracy(vectors[n], 0, mscale) for n in names]
    print(f"{base.model.name} at {setup.target_length} tokens: {len(names)} candidates, held-out accuracy on "
          f"{len(check.samples)} windows (one needle each)")
    for n, a in sorted(zip(names, accuracy), key=lambda x: -x[1]):
        print(f"  {n:>16}  {a:.0%}")
    print("\n| needles per window | answers | concordance | Spearman | YaRN answer NLL | best by loss (its accuracy) |")
    print("|---|---|---|---|---|---|")
    for k in keys:
        windows = sets[k].search
        evaluator = Evaluator(model, windows.ids, base.search.chunk_size, targets=windows.targets)
        loss = [float(np.log(evaluator.score(n, vectors[n], 0, mscale).ppl)) for n in names]
        rho = float(np.corrcoef(ranks(loss), ranks([-a for a in accuracy]))[0, 1])
        best = int(np.argmin(loss))
        answers = windows.count * k
        print(f"| {k} | {answers} | {concordance(loss, accuracy):.2f} | {rho:.2f} | {loss[names.index('yarn')]:.3f} "
              f"| {names[best]} ({accuracy[best]:.0%}) |")


if __name__ == "__main__":
    main()
