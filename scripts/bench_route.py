"""The fine-tuned route against its rival, side by side, each route one command ending in an exported model:

- LongRoPE's progressive route (configs/tiny-progressive-ft.yaml): 8x search, fine-tune, 16x search on the
  fine-tuned model, short set last;
- YaRN's (configs/tiny-progressive-ft-yarn.yaml): YaRN 8x, the same fine-tune (rows, steps, learning rate and
  schedule), YaRN 16x on the fine-tuned weights;
- YaRN 8x fine-tuned, then LongRoPE's 16x search and short set on it (configs/tiny-progressive-ft-yarn-search.yaml);
- LongRoPE's route with attention factor 1 in every stage (`--set search.mscale=1.0`): short inputs as the
  unmodified model runs them, the fine-tune learns the long-context temperature.

The final models, the fine-tuned 8x models, the stages in between and the unmodified model are scored on the same
held-out windows (none of them a document any search of any route decided with): PPL at 1x, 8x and 16x, needle
accuracy at 8x and 16x (eval's prompts), each model as it runs in transformers (the `longrope.json` of its folder).
Also the tokens and seconds each route spent, from its stages' own records (a resumed route counts all its work).
The lines under the tables say which goals each searched route met against YaRN's.

    python scripts/bench_route.py                                   # builtin:tiny and builtin:tiny-qwen2, 4 routes
    python scripts/bench_route.py --models builtin:tiny --out runs/bench-route

Running it again continues: finished stages are kept (a finished route costs only the scoring).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from longrope_search.config import parse_length
from longrope_search.evaluate import eval_ppl, needle_fillers, run_inputs
from longrope_search.factors import FactorsFile, load_factors
from longrope_search.finetune_result import load_result
from longrope_search.methods import file_row
from longrope_search.model import load_model
from longrope_search.retrieval import NeedleSettings, mean_over_depths, needle_accuracy
from longrope_search.rundir import EXPORT_FACTORS_FILE
from longrope_search.stages import run_stages

ROOT = Path(__file__).resolve().parent.parent
ROUTE = ROOT / "configs" / "tiny-progressive-ft.yaml"  # 8x search, fine-tune, 16x search, short set, export
YARN_ROUTE = ROOT / "configs" / "tiny-progressive-ft-yarn.yaml"  # YaRN 8x, the same fine-tune, YaRN 16x, export
HYBRID_ROUTE = ROOT / "configs" / "tiny-progressive-ft-yarn-search.yaml"  # YaRN 8x fine-tuned, searched 16x, short




@dataclass
class Scored:
    """One model as it runs in transformers, scored on the bench's windows."""

    name: str
    ppl: dict[int, float]  # length -> held-out PPL
    needles: dict[int, tuple[float, float]]  # length -> (one needle, several keys) accuracy


def score(name: str, model_dir: str, ff: FactorsFile | None, inputs, lengths: list[int], needles: list[int],
          settings: NeedleSettings) -> Scored:
    """PPL (and needle accuracy at `needles`) of the model as it runs: its own RoPE from `ff` (None: unmodified)."""
    loaded, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    spec = inputs.factors.rope
    only = (file_row(ff),) if ff is not None else ("none",)
    result = eval_ppl(loaded, tokenizer, spec, inputs.corpus, lengths, ff, inputs.samples, 0, inputs.cache_dir,
                      inputs.chunk_size, inputs.exclude, only=only)
    ppl = result.ppl[only[0]]
    accuracy = {}
    if needles:
        fillers = needle_fillers(tokenizer, inputs, max(needles), min(needles), settings, settings.seed)
        cells = needle_accuracy(loaded, tokenizer, spec, needles, ff, fillers, settings, only=only)
        accuracy = {n: (mean_over_depths(cells["single"][only[0]][n]), mean_over_depths(cells["multikey"][only[0]][n]))
                    for n in needles}
    return Scored(name, ppl, accuracy)


@dataclass(frozen=True)
class Route:
    label: str
    folder: str  # under the model's folder
    config: Path
    searched: bool  # its final factors come from a search: measured against YaRN's route
    overrides: tuple[str, ...] = ()  # --set on the config


ROUTES = (Route("LongRoPE", "longrope", ROUTE, True), Route("YaRN", "yarn", YARN_ROUTE, False),
          Route("YaRN 8x + LongRoPE 16x", "hybrid", HYBRID_ROUTE, True),
          Route("LongRoPE, attention factor 1", "attention1", ROUTE, True, ("search.mscale=1.0",)))


def bench_model(model: str, out: Path, samples: int, trials: int) -> list[str]:
    folder = out / model.replace(":", "-").replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    for r in ROUTES:
        run_stages(r.config, [f"model.name={model}", *r.overrides], folder / r.folder)
    searches = [d for r in ROUTES for d in sorted((folder / r.folder).glob("*")) if _is_long_search(d)]
    runs = [run_inputs(d, None, samples, "cpu", "float32") for d in searches]
    inputs = dataclasses.replace(runs[0], exclude=[r.exclude for r in runs], samples=samples)  # held out from all
    original = inputs.factors.rope.original_length
    lengths = [original, parse_length("8x", original), parse_length("16x", original)]
    settings = NeedleSettings(trials=trials)
    own = lambda path: load_factors(path / EXPORT_FACTORS_FILE)  # noqa: E731 - the RoPE a model folder runs
    rows = {"unmodified": score("unmodified", model, None, inputs, lengths[:1], [], settings)}
    for r in ROUTES:
        root, tuned, final = folder / r.folder, folder / r.folder / "ft", folder / r.folder / "model"
        if (root / "8x").is_dir():
            rows[f"{r.folder} 8x"] = score(f"{r.label}: 8x factors, not fine-tuned", model, load_factors(root / "8x"),
                                           inputs, lengths[:2], [], settings)
        rows[f"{r.folder} ft"] = score(f"{r.label}: fine-tuned 8x", str(tuned), own(tuned), inputs, lengths[:2], [],
                                       settings)
        if (root / "16x").is_dir():
            rows[f"{r.folder} 16x"] = score(f"{r.label}: 16x stage, before the short set", str(tuned),
                                            load_factors(root / "16x"), inputs, lengths, [], settings)
        rows[r.folder] = score(f"{r.label}: final 16x", str(final), own(final), inputs, lengths, lengths[1:], settings)
    return report(model, rows, lengths, folder, samples, trials)


def _is_long_search(run_dir: Path) -> bool:
    path = run_dir / "factors.json"
    return path.is_file() and json.loads(path.read_text())["search"].get("mode", "long") == "long"


def report(model: str, rows: dict[str, Scored], lengths: list[int], folder: Path, samples: int,
           trials: int) -> list[str]:
    def cell(value: float | None) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"

    lines = [f"## {model}: {samples} held-out windows per length, {trials} needle prompts per depth", "",
             "| model | PPL 1x | PPL 8x | PPL 16x | needles 8x (one / keys) | needles 16x |", "|---|---|---|---|---|---|"]
    for row in rows.values():
        acc = [f"{row.needles[n][0]:.0%} / {row.needles[n][1]:.0%}" if n in row.needles else "-" for n in lengths[1:]]
        lines.append(f"| {row.name} | " + " | ".join([cell(row.ppl.get(n)) for n in lengths] + acc) + " |")
    lines += ["", "| route | fine-tune tokens | search forward tokens | fine-tune s | search s |", "|---|---|---|---|---|"]
    for r in ROUTES:
        records = [json.loads((d / "factors.json").read_text())["search"] for d in sorted((folder / r.folder).glob("*"))
                   if (d / "factors.json").is_file()]
        tuned = load_result(folder / r.folder / "ft")
        tokens = sum(int(x.get("forward_tokens", 0)) for x in records)
        seconds = sum(float(x.get("seconds", 0.0)) for x in records)
        lines.append(f"| {r.label} | {tuned.tokens:,} | {tokens / 1e6:.2f}M | {tuned.seconds:.0f} | {seconds:.0f} |")
    n1, n8, n16 = lengths
    base, yarn = rows["unmodified"], rows["yarn"]
    lines += ["", f"- YaRN route at 1x: final {yarn.ppl[n1] / base.ppl[n1] - 1:+.2%}, fine-tuned 8x "
                  f"{rows['yarn ft'].ppl[n1] / base.ppl[n1] - 1:+.2%} (against the unmodified model)"]
    for r in (r for r in ROUTES if r.searched):
        final, tuned = rows[r.folder], rows[f"{r.folder} ft"]
        gap = final.ppl[n16] / yarn.ppl[n16] - 1
        needles = all(final.needles[n][i] >= yarn.needles[n][i] for n in (n8, n16) for i in (0, 1))
        short = final.ppl[n1] / base.ppl[n1] - 1
        lines += [f"- {r.label}: final 16x PPL {gap:+.2%} against YaRN's route (goal -3% or lower: "
                  f"{'met' if gap <= -0.03 else 'missed'}); needles at 8x and 16x no worse than YaRN's: "
                  f"{'met' if needles else 'missed'}; 1x PPL {short:+.2%} against the unmodified model (goal within 2%: "
                  f"{'met' if short <= 0.02 else 'missed'}), the fine-tuned 8x model {tuned.ppl[n1] / base.ppl[n1] - 1:+.2%}"]
        if f"{r.folder} 8x" in rows:
            before = rows[f"{r.folder} 8x"].ppl[n8]
            lines.append(f"- {r.label}: the fine-tune's 8x gain {before:.3f} -> {tuned.ppl[n8]:.3f} "
                         f"({tuned.ppl[n8] / before - 1:+.2%}); YaRN's fine-tuned 8x model {rows['yarn ft'].ppl[n8]:.3f}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin:tiny,builtin:tiny-qwen2", help="comma-separated models")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-route"))
    parser.add_argument("--samples", type=int, default=8, help="held-out windows per length")
    parser.add_argument("--needle-trials", type=int, default=10, help="needle prompts per depth and length")
    args = parser.parse_args()
    lines = []
    for model in args.models.split(","):
        table = bench_model(model.strip(), args.out.absolute(), args.samples, args.needle_trials)
        print("\n".join(table), flush=True)
        lines += table
    (args.out / "bench_route.md").write_text("\n".join(lines) + "\n")
    print(f"written to {args.out / 'bench_route.md'}")


if __name__ == "__main__":
    main()
