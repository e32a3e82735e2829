"""The fine-tuned route against its rival, side by side: LongRoPE's progressive route (8x search, fine-tune, 16x search
on the fine-tuned model, short set last; configs/tiny-progressive-ft.yaml) and YaRN's (YaRN 8x, the same fine-tune:
rows, steps, learning rate and schedule; YaRN 16x on the fine-tuned weights; configs/tiny-progressive-ft-yarn.yaml),
each run as one command and ending in an exported model. The
final models, the two fine-tuned 8x models and the unmodified model are scored on the same held-out windows (none of
them a document any search of the route decided with): PPL at 1x, 8x and 16x, needle accuracy at 8x and 16x (eval's
prompts), as each model runs in transformers (`longrope.json` of the exported folder). Also: tokens and wall time spent.

    python scripts/bench_route.py                                   # builtin:tiny and builtin:tiny-qwen2
    python scripts/bench_route.py --models builtin:tiny --out runs/bench-route

Running it again continues: finished stages are kept (a finished route costs only the eval).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from longrope_search.config import parse_length
from longrope_search.evaluate import eval_ppl, needle_fillers, run_inputs
from longrope_search.factors import FactorsFile, load_factors
from longrope_search.finetune import load_result
from longrope_search.methods import LONGROPE
from longrope_search.model import load_model
from longrope_search.retrieval import NeedleSettings, mean_over_depths, needle_accuracy
from longrope_search.rundir import EXPORT_FACTORS_FILE
from longrope_search.stages import run_stages

ROOT = Path(__file__).resolve().parent.parent
ROUTE = ROOT / "configs" / "tiny-progressive-ft.yaml"  # 8x search, fine-tune, 16x search, short set, export
YARN_ROUTE = ROOT / "configs" / "tiny-progressive-ft-yarn.yaml"  # YaRN 8x, the same fine-tune, YaRN 16x, export
TIMES = "times.json"  # wall seconds per step of a route, kept across reruns




@dataclass
class Scored:
    """One model as it runs in transformers, scored on the bench's windows."""

    name: str
    ppl: dict[int, float]  # length -> held-out PPL
    needles: dict[int, tuple[float, float]]  # length -> (one needle, several keys) accuracy


def timed(times: dict[str, float], key: str, step, path: Path):
    """Run `step` unless its time is on record (a kept result); record its wall seconds."""
    if key not in times:
        began = time.perf_counter()
        step()
        times[key] = time.perf_counter() - began
        path.write_text(json.dumps(times, indent=2) + "\n")
    return times[key]


def route(config: Path, model: str, folder: Path, times: dict[str, float], times_path: Path) -> tuple[Path, Path]:
    """A route's stages on `model` (kept when finished): its fine-tuned 8x model and its exported final model."""
    timed(times, config.stem, lambda: run_stages(config, [f"model.name={model}"], folder), times_path)
    return folder / "ft", folder / "model"


def score(name: str, model_dir: str, ff: FactorsFile | None, inputs, lengths: list[int], needles: list[int],
          settings: NeedleSettings) -> Scored:
    """PPL (and needle accuracy at `needles`) of the model as it runs: its own RoPE from `ff` (None: unmodified)."""
    loaded, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    spec = inputs.factors.rope
    only = (LONGROPE,) if ff is not None else ("none",)
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


def bench_model(model: str, out: Path, samples: int, trials: int) -> list[str]:
    folder = out / model.replace(":", "-").replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    times_path = folder / TIMES
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    lr_ft, lr_final = route(ROUTE, model, folder / "longrope", times, times_path)
    yarn_ft, yarn_final = route(YARN_ROUTE, model, folder / "yarn", times, times_path)

    stage_dirs = [folder / "longrope" / name for name in ("8x", "16x")]
    runs = [run_inputs(d, None, samples, "cpu", "float32") for d in stage_dirs]
    inputs = dataclasses.replace(runs[0], exclude=[r.exclude for r in runs], samples=samples)
    original = inputs.factors.rope.original_length
    lengths = [original, parse_length("8x", original), parse_length("16x", original)]
    settings = NeedleSettings(trials=trials)
    own = lambda path: load_factors(path / EXPORT_FACTORS_FILE)  # noqa: E731 - the RoPE a model folder runs
    base = score("unmodified", model, None, inputs, lengths[:1], [], settings)
    rows = [base,
            score("LongRoPE route: fine-tuned 8x", str(lr_ft), own(lr_ft), inputs, lengths[:2], [], settings),
            score("LongRoPE route: final 16x", str(lr_final), own(lr_final), inputs, lengths, lengths[1:], settings),
            score("YaRN route: fine-tuned 8x", str(yarn_ft), own(yarn_ft), inputs, lengths[:2], [], settings),
            score("YaRN route: final 16x", str(yarn_final), own(yarn_final), inputs, lengths, lengths[1:], settings)]
    return report(model, rows, lengths, folder, times, samples, trials)


def report(model: str, rows: list[Scored], lengths: list[int], folder: Path, times: dict[str, float], samples: int,
           trials: int) -> list[str]:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None or not math.isfinite(value) else format(value, fmt)

    tokens = {name: sum(_search_tokens(d) for d in (folder / name).glob("*") if (d / "factors.json").is_file())
              for name in ("longrope", "yarn")}
    tuned = {name: load_result(folder / name / "ft") for name in ("longrope", "yarn")}
    lines = [f"## {model}: {samples} held-out windows per length, {trials} needle prompts per depth", "",
             "| model | PPL 1x | PPL 8x | PPL 16x | needles 8x (one / keys) | needles 16x |", "|---|---|---|---|---|---|"]
    for row in rows:
        ppl = [cell(row.ppl.get(n), ".3f") for n in lengths]
        acc = [f"{row.needles[n][0]:.0%} / {row.needles[n][1]:.0%}" if n in row.needles else "-" for n in lengths[1:]]
        lines.append(f"| {row.name} | " + " | ".join(ppl + acc) + " |")
    base, lr_ft, lr, y_ft, y = rows
    n1, n8, n16 = lengths
    lines += ["", "| route | fine-tune tokens | search forward tokens | wall s |", "|---|---|---|---|"]
    for name, config in (("longrope", ROUTE), ("yarn", YARN_ROUTE)):
        lines.append(f"| {name} | {tuned[name].tokens:,} | {tokens[name] / 1e6:.2f}M | {times.get(config.stem, math.nan):.0f} |")
    gap16 = lr.ppl[n16] / y.ppl[n16] - 1
    needles_ok = all(lr.needles[n][i] >= y.needles[n][i] for n in (n8, n16) for i in (0, 1))
    short = lr.ppl[n1] / base.ppl[n1] - 1
    lines += ["", f"- final 16x PPL, LongRoPE vs YaRN route: {gap16:+.2%} (goal -3% or lower): "
                  f"{'met' if gap16 <= -0.03 else 'missed'}",
              f"- needles at 8x and 16x no worse than the YaRN route: {'met' if needles_ok else 'missed'}",
              f"- final model's 1x PPL vs the unmodified model: {short:+.2%} (goal within 2%): "
              f"{'met' if short <= 0.02 else 'missed'}; the fine-tuned 8x model: {lr_ft.ppl[n1] / base.ppl[n1] - 1:+.2%}",
              f"- YaRN route at 1x: final {y.ppl[n1] / base.ppl[n1] - 1:+.2%}, fine-tuned 8x {y_ft.ppl[n1] / base.ppl[n1] - 1:+.2%}",
              f"- 8x PPL of the fine-tuned 8x models: LongRoPE {lr_ft.ppl[n8]:.3f}, YaRN {y_ft.ppl[n8]:.3f}", ""]
    return lines


def _search_tokens(run_dir: Path) -> int:
    return int(json.loads((run_dir / "factors.json").read_text()).get("search", {}).get("forward_tokens", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin:tiny,builtin:tiny-qwen2", help="comma-separated models")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-route"))
    parser.add_argument("--samples", type=int, default=8, help="held-out windows per length")
    parser.add_argument("--needle-trials", type=int, default=10, help="needle prompts per depth and length")
    args = parser.parse_args()
    lines = []
    for model in args.models.split(","):
        lines += bench_model(model.strip(), args.out.absolute(), args.samples, args.needle_trials)
        print("\n".join(lines[-20:]), flush=True)
    (args.out / "bench_route.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
