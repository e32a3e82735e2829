"""Figures of a run directory: searched factors against PI/NTK/YaRN, search progress, and `longrope eval`
results by length. Reads factors.json, state/ and eval.json; writes each figure as PNG and SVG with matplotlib.

Over 450 lines: seven figures and the axis helpers they share; each figure is one function under 60 lines.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
    ScalarFormatter,
)

from longrope_search import rope
from longrope_search.checkpoint import SearchState, load_state
from longrope_search.config import format_length
from longrope_search.errors import CheckpointError, StorageError
from longrope_search.eval_result import EvalResult, read_eval
from longrope_search.factors import FactorsFile, load_factors
from longrope_search.files import atomic_write_bytes, make_dirs
from longrope_search.methods import FIXED_MARK, is_fixed
from longrope_search.rundir import EVAL_FILE, PLOTS_DIR

SEARCHED = "longrope"
# One colour per method in every figure, so a reader matches lines across plots at a glance.
METHOD_COLORS = {SEARCHED: "black", "pi": "tab:blue", "ntk": "tab:orange", "yarn": "tab:green", "none": "tab:gray"}
METHOD_LABELS = {SEARCHED: "LongRoPE (searched)", "pi": "PI", "ntk": "NTK-aware", "yarn": "YaRN",
                 "none": "none (original RoPE)"}
BASELINE_DASHES = {"pi": (0, (6, 3)), "ntk": "-.", "yarn": (0, (2, 2))}
ORIGIN_COLORS = {"init": "tab:purple", "mutation": "tab:red", "crossover": "tab:cyan"}
EXTRA_COLORS = ["tab:brown", "tab:pink", "tab:olive", "tab:purple", "tab:red", "tab:cyan"]
DPI = 120
HEATMAP_COLUMNS = 4  # needle heat maps per row of a figure


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write factors.png, search.png, search_work.png and, when eval.json exists, ppl_by_length.png, passkey.png and the needle
    figures (needle_by_length.png, one heat map per variant: needle_single.png, needle_multikey.png).

    out_dir defaults to RUN/plots. `warn` receives one line per damaged newer checkpoint skipped, since
    search.png then stops at an older generation.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir} is not a directory; pass the run directory a search wrote (e.g. runs/tiny-8x)."
        )
    factors = load_factors(run_dir)
    state, warnings = load_state(run_dir)
    if warn is not None:
        for line in warnings:
            warn(line)
    figures = {"factors.png": factors_figure(factors), "search.png": search_figure(state, factors),
               "search_work.png": work_figure(state, factors)}
    result = read_eval(run_dir / EVAL_FILE)
    if result is not None:
        lengths = (factors.rope.original_length, factors.target_length)
        results = _finite(result)
        documents = (f"{result.samples} held-out documents per length" if result.heldout
                     else f"{result.samples} documents per length, not held out from the search")
        if results["ppl"]:
            figures["ppl_by_length.png"] = by_length_figure(
                results["ppl"], lengths, "perplexity (lower is better)",
                f"Perplexity by context length ({documents})", log_y=True)
        if results["passkey"]:
            figures["passkey.png"] = by_length_figure(
                results["passkey"], lengths, "passkey retrieval accuracy (fraction correct)", "Passkey retrieval by context length",
                log_y=False)
        if result.needle:
            figures["needle_by_length.png"] = needle_by_length_figure(result.needle, lengths)
            for variant, methods in result.needle.items():
                figures[f"needle_{variant}.png"] = needle_heatmap(methods, variant, factors.rope.original_length)
    return save_figures(figures, Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR)


def save_figures(figures: dict[str, Figure], out_dir: Path) -> list[Path]:
    """Each figure rendered in memory as PNG and as SVG (same name, .svg: sharp at any size, for papers and slides),
    then written atomically: a link planted at a figure's name is replaced, never written through. The PNG paths."""
    paths = []
    try:
        make_dirs(out_dir)
        for name, figure in figures.items():
            path = out_dir / name
            for fmt, target in (("png", path), ("svg", path.with_suffix(".svg"))):
                buffer = io.BytesIO()
                figure.savefig(buffer, dpi=DPI, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
                atomic_write_bytes(target, buffer.getvalue())
            paths.append(path)
    except (OSError, StorageError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).rstrip(".")
        raise CheckpointError(f"cannot write plots to {out_dir} ({reason}); pass a writable --out folder.") from None
    return paths


# --- factors --------------------------------------------------------------------------------------------


def factors_figure(ff: FactorsFile) -> Figure:
    """Factor per rotary pair, log y: the searched vector over the baselines for the same scale."""
    spec, scale = ff.rope, ff.scale
    pairs = np.arange(spec.num_factors)
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    # Pairs whose wavelength exceeds the original window never completed a turn in pre-training
    # (LongRoPE2's critical dimensions): they must be interpolated, which is where methods differ most.
    wavelengths = (2 * math.pi / rope.base_inv_freq(spec)).numpy()
    long_pairs = np.flatnonzero(wavelengths > spec.original_length)
    if long_pairs.size:
        ax.axvspan(long_pairs[0] - 0.5, pairs[-1] + 0.5, color="0.92", zorder=0,
                   label=f"wavelength > original window ({spec.original_length:,})")
    # YaRN equals PI on its interpolated pairs: distinct dashes keep both visible where they overlap.
    for name, fn in rope.BASELINES.items():
        ax.plot(pairs, fn(spec, scale).numpy(), color=METHOD_COLORS[name], linewidth=2, alpha=0.85,
                linestyle=BASELINE_DASHES[name], label=f"{METHOD_LABELS[name]} (same scale)")
    ax.plot(pairs, ff.factors, color=METHOD_COLORS[SEARCHED], linewidth=2.5, marker="o", markersize=4,
            label="LongRoPE long factors (searched)")
    if ff.short_factors is not None:
        ax.plot(pairs, ff.short_factors, color=METHOD_COLORS[SEARCHED], linewidth=1.5, linestyle=":", marker="s",
                markersize=3, label="LongRoPE short factors")
    _log_y(ax, [*ff.factors, *(ff.short_factors or []), 1.0, scale])
    ax.set_xlim(-0.5, pairs[-1] + 0.5)
    return _finish(fig, ax, "rotary pair i (low i = high frequency, short wavelength)",
                   "rescale factor λ_i (frequency divided by λ_i)",
                   f"Rescale factors for {ff.target_length:,} tokens: scale {scale:g}x, n_hat {ff.n_hat}, "
                   f"mscale {ff.mscale:.3f}\n{ff.model}", legend_columns=3)


# --- search progress ------------------------------------------------------------------------------------


def search_figure(state: SearchState, ff: FactorsFile) -> Figure:
    """Every evaluation by generation (coloured by where it came from), the best so far, and the seeds."""
    fig = Figure(figsize=(9, 6), layout="constrained")
    ax = fig.add_subplot()
    generations = np.array([e.generation for e in state.history])
    ppls = np.array([e.ppl for e in state.history], dtype=float)
    origins = [e.origin for e in state.history]
    finite = np.isfinite(ppls)
    stopped = np.array([e.rejected for e in state.history], dtype=bool)  # their scores are partial: drawn apart
    # Spread each generation's points over its own slot so equal scores do not hide each other.
    x = generations.astype(float)
    for g in np.unique(generations):
        members = np.flatnonzero(generations == g)
        x[members] += np.linspace(-0.3, 0.3, members.size) if members.size > 1 else 0.0

    marks, rounded = _scatter_origins(ax, x, ppls, origins, finite & ~stopped, ff)
    if (finite & stopped).any():
        ax.scatter(x[finite & stopped], ppls[finite & stopped], s=14, facecolors="none", edgecolors="0.45", zorder=2,
                   label=f"stopped early ({(finite & stopped).sum()}; partial score)")
    last = int(generations.max()) if generations.size else 0
    best_so_far = [min((p for g, p, r in zip(generations, ppls, stopped) if g <= gen and math.isfinite(p) and not r),
                       default=math.nan) for gen in range(last + 1)]
    edges = [-0.4, *(g + 0.5 for g in range(last)), last + 0.4]  # each generation's slot of points
    ax.stairs(best_so_far, edges, color=METHOD_COLORS[SEARCHED], linewidth=2.5, zorder=5, baseline=None,
              label=f"best so far: {best_so_far[-1]:.6g}")
    if not finite.all():
        ax.plot([], [], " ", label=f"{(~finite).sum()} non-finite PPL not shown")
    footnote = "".join("\n" + line for line in textwrap.wrap(
        f"* the table runs each method as published (its own attention factor); its seed here runs with the "
        f"search's ({ff.mscale:.3f}), rounded to the grid", 95)) if rounded else ""

    # the search's own range: from its best to the bulk of its candidates, so the progress of the best reads; scores
    # beyond (the worst seeds, failed children) sit at the top edge, their values in the legend
    low, high = _search_range(ppls[finite & ~stopped], best_so_far, min(marks.values(), default=math.nan))
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    _readable_log_axis(ax.yaxis, [low, high])
    above = finite & (ppls > high)
    if above.any():
        ax.scatter(x[above], np.full(above.sum(), high), marker="^", s=22, color="0.4", clip_on=False, zorder=4,
                   label=f"{above.sum()} scores above {high:.4g} (at the top edge)")
    ax.set_xticks(range(last + 1) if last < 25 else np.linspace(0, last, 11).round().astype(int))
    ax.set_xlim(-0.6, last + 0.6)
    if math.isfinite(best_so_far[-1]):
        marks["best"] = best_so_far[-1]
    _value_ticks(ax, marks)
    fig = _finish(fig, ax, "generation (0 = initial population)", "score on the search samples (lower is better)",
                  f"Search for {ff.scored_length:,} tokens ({ff.scored_length / ff.rope.original_length:g}x): "
                  f"{len(state.history)} evaluations over {last} generations", legend_columns=3)
    ax.set_title(ax.get_title() + footnote, fontsize=10)
    return fig


def _scatter_origins(ax: Any, x: np.ndarray, ppls: np.ndarray, origins: list[str], shown: np.ndarray,
                     ff: FactorsFile) -> tuple[dict[str, float], bool]:
    """The `shown` candidates coloured by where they came from, the seeds as diamonds with a reference line each;
    returns the seeds' scores (for the right-hand ticks) and whether a seed's score differs from its table row."""
    # The seeds are the baselines snapped to the grid, run with the search's attention factor: their scores are the
    # bar the search has to clear. The table runs each method as published (its own attention factor, unrounded), so a
    # seed may differ from its row.
    others = iter(EXTRA_COLORS)
    marks: dict[str, float] = {}  # right-axis ticks: where each seed and the best end up
    rounded = False  # some seed's PPL differs from its table row
    for origin in dict.fromkeys(origins):
        chosen = shown & np.array([o == origin for o in origins])
        if not chosen.any():
            continue
        if origin in rope.BASELINES:
            ppl = float(ppls[chosen][0])
            marks[f"{origin} seed"] = ppl
            exact = ff.baselines[origin].search if origin in ff.baselines else None
            differs = exact is not None and math.isfinite(exact) and not math.isclose(exact, ppl, rel_tol=5e-5)
            ax.scatter(x[chosen], ppls[chosen], s=45, marker="D", color=METHOD_COLORS[origin], zorder=4)
            rounded = rounded or differs
            ax.axhline(ppl, color=METHOD_COLORS[origin], linestyle="--", linewidth=1, alpha=0.8,
                       label=f"{origin} seed {ppl:.2f}" + (f" (table* {exact:.2f})" if differs else ""))
        else:
            ax.scatter(x[chosen], ppls[chosen], s=18, alpha=0.8, zorder=3,
                       color=ORIGIN_COLORS.get(origin) or next(others, None), label=f"{origin} ({chosen.sum()})")

    return marks, rounded


def _search_range(scores: np.ndarray, best_so_far: list[float], best_seed: float) -> tuple[float, float]:
    """The y-range of search.png: just below the final best, up to the 75th percentile of the scores, a little above
    the first generation's best or the best seed (the bar the search had to clear), whichever is highest."""
    if scores.size == 0:
        return 1.0, 10.0
    best = [b for b in best_so_far if math.isfinite(b)]
    low = min(best) if best else float(scores.min())
    high = max(float(np.percentile(scores, 75)), (best[0] if best else low) * 1.02, low * 1.05,
               best_seed * 1.02 if math.isfinite(best_seed) else 0.0)
    return low / 1.01, high * 1.01


def work_curve(state: SearchState) -> tuple[list[int], list[float]]:
    """(forward tokens spent, best search score so far) after each generation: what the search's work bought.

    A candidate stopped early (racing, screening) counts its tokens but never a score."""
    spent, best, tokens, scores = 0, math.inf, [], []
    for generation in range(state.generation + 1):
        for e in (e for e in state.history if e.generation == generation):
            spent += e.tokens
            if not e.rejected and math.isfinite(e.ppl):
                best = min(best, e.ppl)
        tokens.append(spent)
        scores.append(best)
    return tokens, scores


def work_figure(state: SearchState, ff: FactorsFile) -> Figure:
    """The best search score against the forward tokens spent, with the reference methods on the same samples: where a
    search's work went, comparable between runs with and without early rejection. When the search validated, a
    second panel shows that best candidate on the validation samples (no reference method is scored there)."""
    validated = {int(g): float(v) for g, _, v in ff.search.validation if v is not None}
    fig = Figure(figsize=(9, 7.5 if validated else 6), layout="constrained")
    axes = fig.subplots(2 if validated else 1, 1, sharex=True, squeeze=False, height_ratios=[2, 1] if validated else
                        None)[:, 0]
    ax = axes[0]
    tokens, scores = work_curve(state)
    millions = np.array(tokens) / 1e6
    ax.step(millions, scores, where="post", color=METHOD_COLORS[SEARCHED], linewidth=2.5,
            label=f"best so far on the search samples: {scores[-1]:.6g}")
    references = {name: row.search for name, row in ff.baselines.items()
                  if name in rope.BASELINES and row.search is not None and math.isfinite(row.search)}
    values = [v for v in scores if math.isfinite(v)]
    # the search's own range, up to the nearest reference above its start: the others are named, off the scale
    start = values[0] if values else math.inf
    high = min((v for v in references.values() if v >= start), default=start)
    low = min([*values, *(v for v in references.values() if v < start)], default=start) / 1.01
    for name, value in references.items():
        off = not low <= value <= high * 1.03
        ax.axhline(value, color=METHOD_COLORS[name], linestyle="--", linewidth=1, alpha=0.8,
                   label=f"{METHOD_LABELS[name]} on the search samples: {value:.4f}" + (" (off the scale)" if off
                                                                                       else ""))
    if values:
        ax.set_yscale("log")
        ax.set_ylim(low, high * 1.03)
        _readable_log_axis(ax.yaxis, [low, high * 1.03])
    ax.set_ylabel("search samples (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    if validated:
        gens = sorted(g for g in validated if g < len(tokens))
        axes[1].plot(millions[gens], [validated[g] for g in gens], marker="o", color="tab:green",
                     label="that candidate on the validation samples")
        _log_y(axes[1], [validated[g] for g in gens])
        axes[1].set_ylabel("validation samples")
        axes[1].grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("forward tokens spent (millions)")
    stopped = f", {ff.search.rejected} stopped early" if ff.search.rejected else ""
    fig.suptitle(f"Search work at {ff.scored_length:,} tokens: {len(state.history)} evaluations{stopped}, "
                 f"{tokens[-1] / 1e6:.2f}M forward tokens (score: lower is better)", fontsize=11)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    return fig


# --- eval results ---------------------------------------------------------------------------------------


def load_eval(run_dir: Path) -> dict[str, dict[str, dict[int, float]]] | None:
    """eval.json as {"ppl"|"passkey": {method: {length: value}}}; None when absent (see `_finite`)."""
    result = read_eval(run_dir / EVAL_FILE)
    return None if result is None else _finite(result)


def _finite(result: EvalResult) -> dict[str, dict[str, dict[int, float]]]:
    """Missing scores (null, inf) are left out rather than drawn at an arbitrary height."""
    return {kind: {method: {length: value for length, value in by_length.items() if math.isfinite(value)}
                   for method, by_length in getattr(result, kind).items()}
            for kind in ("ppl", "passkey")}


def method_styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """Colour, line and legend label per eval row: a method's colour for both its rows, the one rescaled to each
    length solid and the one fixed at the target (METHOD@TARGET) dashed, so a reader sees which is which."""
    extra = iter(EXTRA_COLORS)
    fixed = any(is_fixed(m) for m in methods)
    styles = {}
    for method in methods:
        base, mark, target = method.partition(FIXED_MARK)
        label = METHOD_LABELS.get(base, base)
        if mark:
            label += f" {FIXED_MARK}{target} (fixed at the target)"
        elif fixed and base in rope.BASELINES:
            label += " (rescaled to each length)"
        styles[method] = {"color": METHOD_COLORS.get(base) or next(extra, None), "linestyle": "--" if mark else "-",
                          "linewidth": 2.5 if method == SEARCHED else 1.5, "label": label}
    return styles


def _side_by_side(k: int, count: int) -> float:
    """A small factor on a log-x axis that draws the k-th of `count` methods a little apart from the others, so
    methods with equal scores (none, PI and NTK all at 0% past the window) do not hide each other."""
    return 2 ** ((k - (count - 1) / 2) * 0.03)


def by_length_figure(results: dict[str, dict[int, float]], lengths: tuple[int, int], ylabel: str, title: str,
                     log_y: bool) -> Figure:
    """One line per method over context length (log x); the original window and the target marked."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    shown = [m for m, by_length in results.items() if by_length]
    styles = method_styles(shown)
    for k, method in enumerate(shown):
        xs = sorted(results[method])
        shift = 1.0 if log_y else _side_by_side(k, len(shown))  # accuracies tie at 0 and 1; perplexities rarely
        ax.plot([n * shift for n in xs], [results[method][n] for n in xs], marker="o", **styles[method])
    original, target = lengths
    ax.axvline(original, color="0.5", linestyle=":", label=f"original window ({format_length(original)})")
    ax.axvline(target, color="0.5", linestyle="--", label=f"search target ({format_length(target)})")
    ax.set_xscale("log", base=2)
    _measured_ticks(ax, sorted({n for by_length in results.values() for n in by_length}))
    if log_y:
        _log_y(ax, [v for by_length in results.values() for v in by_length.values()])
    else:
        # A little room below 0 and above the top score, so markers at exactly 0 or 1 stay whole.
        top = max([1.0, *(v for by_length in results.values() for v in by_length.values())])
        ax.set_ylim(-0.03 * top, 1.05 * top)
    return _finish(fig, ax, "context length (tokens, log scale)", ylabel, title, legend_columns=3)


VARIANT_TITLES = {"single": "one needle", "multikey": "several keys, one asked"}


def needle_heatmap(methods: dict[str, dict[int, dict[float, float]]], variant: str, original: int) -> Figure:
    """The needle-in-a-haystack map: depth (rows) x length (columns), one panel per method (four to a row), green =
    found."""
    names = list(methods)
    labels = {name: style["label"] for name, style in method_styles(names).items()}
    lengths = sorted({n for rows in methods.values() for n in rows})
    depths = sorted({d for rows in methods.values() for cells in rows.values() for d in cells})
    columns = min(HEATMAP_COLUMNS, len(names))
    rows_of_panels = math.ceil(len(names) / columns)
    fig = Figure(figsize=(2.2 + 2.3 * columns, 0.6 + 3.0 * rows_of_panels), layout="constrained")
    grid_axes = fig.subplots(rows_of_panels, columns, sharey=True, squeeze=False)
    for spare in grid_axes.flat[len(names):]:
        spare.set_visible(False)
    axes = list(grid_axes.flat[:len(names)])
    image = None
    for ax, name in zip(axes, names):
        grid = np.array([[methods[name].get(n, {}).get(d, np.nan) for n in lengths] for d in depths])  # (depths, lengths)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        for (row, col), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [format_length(n) + ("*" if n > original else "") for n in lengths],
                      fontsize=8)
        ax.set_title(labels[name], fontsize=8)
        ax.set_xlabel("context length", fontsize=8)
    for first in grid_axes[:, 0]:
        first.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        first.set_ylabel("needle depth (share before it)", fontsize=8)
    fig.colorbar(image, ax=list(grid_axes.flat), shrink=0.8, label="exact answers")
    fig.suptitle(f"Needle retrieval ({VARIANT_TITLES.get(variant, variant)}); * = beyond the original window",
                 fontsize=10)
    return fig


def needle_by_length_figure(needle: dict[str, dict[str, dict[int, dict[float, float]]]],
                            lengths: tuple[int, int]) -> Figure:
    """Accuracy averaged over depths by length: one panel per variant, one colour per method (its fixed-at-the-target
    row dashed), methods with equal scores drawn a little apart; ticks at the measured lengths only."""
    variants = list(needle)
    methods = list(dict.fromkeys(m for v in variants for m in needle[v]))
    styles = method_styles(methods)
    measured = sorted({n for v in variants for rows in needle[v].values() for n in rows})
    original, target = lengths
    fig = Figure(figsize=(4.6 * len(variants) + 1.0, 5.5), layout="constrained")
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        first = ax is axes[0]
        for k, method in enumerate(methods):
            rows = needle[variant].get(method)
            if not rows:
                continue
            xs, style = sorted(rows), styles[method]
            ax.plot([n * _side_by_side(k, len(methods)) for n in xs], [sum(rows[n].values()) / len(rows[n]) for n in xs],
                    marker="o", markersize=4, **{**style, "label": style["label"] if first else None})
        ax.axvline(original, color="0.5", linestyle=":", label=f"original window ({format_length(original)})" if first
                   else None)
        ax.axvline(target, color="0.5", linestyle="-.", label=f"search target ({format_length(target)})" if first
                   else None)
        ax.set_xscale("log", base=2)
        _measured_ticks(ax, measured)
        ax.set_ylim(-0.03, 1.05)
        ax.set_title(VARIANT_TITLES.get(variant, variant), fontsize=10)
        ax.set_xlabel("context length (tokens, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("exact answers (share, mean over depths)")
    fig.suptitle("Needle retrieval by context length (methods with equal scores are drawn a little apart)",
                 fontsize=11)
    fig.legend(loc="outside lower center", ncols=3, fontsize=9)
    return fig


# --- helpers --------------------------------------------------------------------------------------------


def _measured_ticks(ax: Any, lengths: list[int]) -> None:
    """Ticks at the measured lengths only (with their multiple of nothing else): a reader never looks for a score
    at a length that was not measured."""
    if not lengths:
        return
    ax.xaxis.set_major_locator(FixedLocator(lengths))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_length(int(round(v)))))
    ax.xaxis.set_minor_locator(NullLocator())


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, legend_columns: int = 4) -> Any:
    """Labels, title, grid and the legend under the axes: the same on every plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=legend_columns, fontsize=9)
    return fig


def _value_ticks(ax: Any, marks: dict[str, float]) -> None:
    """A right-hand axis with one tick per mark ("best 16.24", "yarn seed 17.16"), so the values that matter are read
    off the figure, not guessed between log ticks; marks too close to read apart share one tick and one label."""
    bottom, top = ax.get_ylim()
    finite = sorted(((v, name) for name, v in marks.items() if math.isfinite(v) and bottom <= v <= top))
    if not finite:
        return
    right = ax.twinx()
    right.set_yscale(ax.get_yscale())
    right.set_ylim(ax.get_ylim())
    low, high = (math.log(v) for v in ax.get_ylim())
    span = high - low if high > low else 1.0
    groups: list[list[tuple[float, str]]] = []
    for value, name in finite:
        if groups and (math.log(value) - math.log(groups[-1][0][0])) / span < 0.03:
            groups[-1].append((value, name))
        else:
            groups.append([(value, name)])
    right.set_yticks([g[0][0] for g in groups], [", ".join(f"{name} {v:.2f}" for v, name in g) for g in groups],
                     fontsize=8)
    right.set_ylim(bottom, top)  # set_yticks may widen the view: keep it the left axis's
    right.yaxis.set_minor_locator(NullLocator())


def _log_y(ax: Any, values: list[float]) -> None:
    ax.set_yscale("log")
    _readable_log_axis(ax.yaxis, values)


def _readable_log_axis(axis: Any, values: list[float]) -> None:
    """Plain-number ticks on a log axis (matplotlib's default labels only powers of ten)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    ratio = max(finite) / min(finite) if finite else math.inf
    # Within a factor of 2 a log locator finds no tick at all; evenly spaced ones read fine on so short a span.
    if ratio < 2:
        locator = MaxNLocator(nbins=6)
    else:
        locator = LogLocator(base=10, subs=tuple(range(1, 10)) if ratio < 10 else (1.0, 2.0, 5.0), numticks=12)
    axis.set_major_locator(locator)
    if ratio < 2:
        formatter = ScalarFormatter(useOffset=False)  # digits follow the tick spacing: 320.82, 320.84, ...
        formatter.set_scientific(False)
    else:
        formatter = FuncFormatter(lambda v, _: f"{v:g}")  # round ticks (1, 2, 5, 10) need no decimals
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())
