"""What the commands print: each result as lines and rich tables on a console (the CLI parses, calls the library,
and hands the result here, as lm-evaluation-harness's CLI hands off to its table maker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

from longrope_search import checkpoint
from longrope_search.eval_result import EvalResult, render_tables
from longrope_search.factors import COLUMN, Scores, factors_path, load_factors, measured_columns
from longrope_search.plan import rows as plan_rows


def show_job(out: Console, result: Any) -> None:
    """A search's, a sweep's or a stages run's result: each stage, the sweep's pick, the last search's table."""
    if result.stages:
        show_stages(out, result.stages, "search" if result.sweep is not None else "stage")
    if result.sweep is not None:
        best = result.sweep.best.stage
        out.print(f"best critical dimension: {best.config.search.critical_dim} ({best.run_dir}); every "
                      f"search's fitness in {result.sweep.root / 'sweep.json'}", markup=False)
    if result.final is not None:
        show_result(out, result.final, result.run_dir)


def show_stages(out: Console, results: list[Any], what: str = "stage") -> None:
    for r in results:
        if r.stage.kind == "export":
            out.print(f"{what} {r.stage.name} ({r.status}): {r.final.method} at {r.final.target_length} tokens, "
                          f"a checked Hugging Face model in {r.stage.run_dir}", markup=False)
            continue
        if r.trained is not None:  # a finetune stage
            t = r.trained
            out.print(f"{what} {r.stage.name} ({r.status}): {t.steps} steps of {t.length}-token rows, loss "
                          f"{t.first_loss:.4f} -> {t.last_loss:.4f}, model {r.stage.run_dir}", markup=False)
            continue
        scores = r.final.scores
        out.print(f"{what} {r.stage.name} ({r.status}): {r.final.scored_length} tokens, search ppl "
                      f"{COLUMN['search'].show(scores.search)}, held-out {COLUMN['heldout'].show(scores.heldout)}, "
                      f"{r.stage.run_dir}", markup=False)
    searched = [r for r in results if r.stage.kind == "search"]
    if what == "stage" and results[-1].stage.kind == "export":
        out.print(f"the exported model: {results[-1].stage.run_dir}", markup=False)
    elif what == "stage" and searched:
        out.print(f"the last search stage's factors (export this one): {searched[-1].stage.run_dir}", markup=False)


def show_result(out: Console, final: Any, run_dir: Path) -> None:
    """A search's table (the winner and each reference method on each sample set), its work, and where the factors went."""
    length = final.scored_length
    kind = "short-context set" if final.search.mode == "short" else "factors"
    settings = final.search.settings
    fitness = {"needle": "needle perplexity (loss on the hidden numbers' answers)",
               "joint": f"joint score (exp of the text's mean NLL + {settings.get('needle_weight')} x the answers')"
               if settings.get("needle_weight") else "joint score with the answers at weight 0 (exp of the text's mean "
               "NLL around the needles)"
               }.get(settings.get("fitness"), "perplexity")
    table = Table(title=f"{kind} at {length} tokens ({length / final.rope.original_length:g}x the window): "
                        f"{fitness}, lower is better; needles found, higher is better")
    rows = {"longrope (searched)": final.scores, **final.baselines}
    shown = measured_columns(rows)
    table.add_column("method")
    for column in shown:
        table.add_column(column.label, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(column.show(row.get(column.key)) for column in shown))
    out.print(table)
    mine, yarn = final.scores.heldout_text, final.baselines.get("yarn", Scores()).heldout_text
    if final.search.mode != "short" and mine is not None and yarn is not None and mine > yarn:
        target = f"{length / final.rope.original_length:g}x"
        out.print(f"warning: the winner's held-out perplexity {mine:.4f} is worse than YaRN's {yarn:.4f}; export "
                      f"YaRN instead (longrope export --factors yarn --target {target} --model {final.model} --out "
                      "DIR), or search longer (search.generations) on more samples (data.samples).",
                      markup=False, style="yellow")
    record = final.search
    stopped = f", {record.rejected} stopped early (search.race_margin, search.screen_windows)" if record.rejected else ""
    out.print(f"work: {record.evaluations} evaluations{stopped}, {record.forward_tokens / 1e6:.2f}M forward tokens, "
                  f"{record.seconds:.0f} s of scoring (`longrope plot` draws the best score against the tokens)",
                  markup=False)
    if record.selected_by == "validation":
        out.print(f"the winner is the validation best of the {record.settings.get('select_top')} best candidates by "
                      f"search score (generation {record.best_generation}, {record.best_origin})", markup=False)
    if record.stopped_early is not None:
        out.print(f"stopped early after generation {record.stopped_early}: validation had not improved for "
                      f"{record.settings.get('patience')} generations; {record.saved_evaluations} evaluations saved",
                      markup=False)
    fit = final.search.attention_fit
    if fit is not None:
        out.print(fit.describe(), markup=False)
        if fit.heldout is not None:
            before, after = fit.heldout.long_mscale, fit.heldout.mscale
            out.print(f"held-out at {fit.length} tokens: {before:.4f} -> {after:.4f} ({after / before - 1:+.2%})",
                          markup=False)
    out.print(f"n_hat {final.n_hat}, mscale {final.mscale:.4f}; factors written to {factors_path(run_dir)}",
                  markup=False)

def show_finetune(out: Console, result: Any) -> None:
    out.print(f"fine-tuned {result.steps} steps ({result.tokens:,} tokens, {result.seconds:.0f} s of training): "
                  f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}; {result.long_rows_share:.0%} of the long "
                  f"rows ran the long factors", markup=False)
    if result.max_abs_diff is not None:
        out.print(f"verified: max abs logit difference {result.max_abs_diff:.2e} at {result.verify_length} tokens, "
                      f"{result.short_max_abs_diff:.2e} inside the original window", markup=False)
    out.print(f"fine-tuned model written to {result.out}; measure it with `longrope eval --model {result.out} "
                  f"--factors {result.run if Path(result.run).exists() else Path(result.out) / 'longrope.json'} --data "
                  "<the run's corpus> --lengths 1x,8x`", markup=False)


def show_export(out: Console, report: Any) -> None:
    for note in report.notes:
        out.print(f"note: {note}", markup=False)
    if report.max_abs_diff is not None:
        out.print(f"verified: max abs logit difference {report.max_abs_diff:.2e} at {report.verify_length} tokens, "
                  f"{report.short_max_abs_diff:.2e} inside the original window", markup=False)
    out.print(f"exported to {report.out}", markup=False)
    if report.pushed is not None:
        out.print(f"pushed to {report.pushed}", markup=False)


def show_eval(out: Console, result: EvalResult, run_dir: Path | None, written: Path | None) -> None:
    """The tables, the notes that change how they read, and where eval.json went."""
    window = load_factors(result.factors).rope.original_length
    for table in render_tables(result, original_length=window):
        out.print(table)
    if not result.heldout:
        out.print(f"note: these documents were not held out from the search: {result.not_heldout}.", markup=False)
    if result.passkey and not any(v > 0 for row in result.passkey.values() for v in row.values()):
        out.print("note: no method, the unmodified model included, retrieved a passkey at any length measured: this "
                  "model cannot do the task, so the table says nothing about the factors (--needle measures retrieval "
                  "in text like the corpus).", markup=False)
    for note in checkpoint.unfinished_note(run_dir) if run_dir is not None else []:
        out.print(f"note: {note}", markup=False)
    if written is not None:
        kept = f" ({result.merge_note})" if result.merge_note else ""
        out.print(f"written to {written}{kept}", markup=False)


def show_plan(out: Console, title: str, shape: Any, length: int, gpus: int, gpu_mem: float, result: Any) -> None:
    table = Table(title=f"{title}: {shape.name} at {length} tokens on {gpus} x {gpu_mem:g} GB")
    table.add_column("quantity")
    table.add_column("estimate")
    for name, value in plan_rows(result):
        table.add_row(name, value)
    out.print(table)
    for note in result.notes:
        out.print(f"note: {note}", markup=False)
    out.print(f"recommended: {result.recommendation()}", markup=False)


def show_info(out: Console, model: str, spec: Any, length: int, mscale: float, wavelengths: list[float],
              vectors: dict[str, Iterable[float]]) -> None:
    """A model's rotary geometry and the baseline factor per pair for a target."""
    scale = length / spec.original_length
    out.print(f"{model}: rope_theta {spec.base:g}, rotary_dim {spec.rotary_dim} ({spec.num_factors} factors), "
              f"original window {spec.original_length}; target {length} = {scale:g}x, LongRoPE mscale {mscale:.4f}",
              markup=False)
    table = Table(title="factor per rotary pair (1 = untouched)")
    table.add_column("pair", justify="right")
    table.add_column("wavelength", justify="right")
    columns = {name: list(v) for name, v in vectors.items()}
    for name in columns:
        table.add_column(name, justify="right")
    for i in range(spec.num_factors):
        table.add_row(str(i), f"{wavelengths[i]:.1f}", *(f"{v[i]:.3f}" for v in columns.values()))
    out.print(table)
