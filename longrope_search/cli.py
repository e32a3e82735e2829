"""The `longrope` command line. Heavy imports (torch, transformers) happen inside commands, so
`longrope --help` is instant; every LongRopeError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from longrope_search.errors import LongRopeError, ModelError

app = typer.Typer(
    help="Search LongRoPE's per-dimension RoPE rescale factors to extend a Hugging Face causal LM's context window.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)  # long lines stay whole: logs and grep read them
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises the error; one line is enough
        err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes -> one line and exit 2; Ctrl-C -> a resume hint and exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LongRopeError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err_console.print("interrupted.", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def quiet_libraries() -> None:
    """Our progress display replaces the per-file bars of transformers and datasets."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def parse_overrides(items: list[str] | None) -> list[str]:
    from longrope_search.errors import ConfigError

    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value; write e.g. --set search.generations=10.")
    return list(items or [])


class RichReporter:
    """Live progress of a search: a bar over evaluations plus one printed line per generation."""

    def __init__(self, out: Console) -> None:
        self.console = out
        self.progress: Any = None
        self.task: Any = None

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", markup=False, style="yellow")

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def start(self, plan: Any, state: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.stop()  # the previous stage's bar, when stages run one after another
        s = plan.config.search
        total = s.population + s.generations * (s.mutations + s.crossovers)
        done = len(state.history) if state is not None else 0
        self.console.print(
            f"searching {plan.spec.num_factors} factors for {plan.target_length} tokens "
            f"({plan.scale:g}x the {plan.spec.original_length}-token window), mscale {plan.mscale:.4f}, "
            f"n_hat in {list(plan.space.n_hat_choices)}"
            + (f"; resuming after generation {state.generation}" if state is not None else ""),
            markup=False,
        )
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evals"),
            TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.task = self.progress.add_task("generation 0", total=total, completed=done)
        self.progress.start()

    def evaluated(self, ppl: float, cached: bool) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def generation(self, state: Any) -> None:
        best = state.best()
        per_eval = state.seconds / max(len(state.history), 1)  # scoring time only, resumed runs included
        line = (f"generation {state.generation}: best ppl {best.ppl:.4f} ({best.origin}), "
                f"{len(state.history)} evaluations, {per_eval:.2f} s/eval")
        if self.progress is not None:
            self.progress.update(self.task, description=f"generation {state.generation}, best {best.ppl:.3f}")
            self.progress.console.print(line, markup=False)
        else:
            self.console.print(line, markup=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@app.command()
@user_errors
def search(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target length: 256k, 2m, 131072, or 8x."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<model>-<target>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the search (or stages) in this directory."),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Build on this run's factors: progressive extension, or the long set for --short."),
    short: bool = typer.Option(
        False, "--short", help="Search the short-context set (inputs within the original window) for --init-from."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config value: --set search.generations=10."),
) -> None:
    """Search per-dimension rescale factors (and n_hat) for a target context length.

    Progressive extension: `--init-from RUN --target 16x` multiplies a further factor set onto RUN's
    (the paper's 256k -> 2048k stage). Short readjustment: `--init-from RUN --short` searches the set used
    for inputs that fit the original window; the run's factors.json then carries both sets for export.
    A config with `stages` runs them in order in OUT/<stage> (see configs/tiny-progressive.yaml); run it
    again, or `--resume OUT`, to continue: finished stages are kept.

    Every generation is checkpointed to RUN/state/; after Ctrl-C, a crash or kill -9, run
    `longrope search --resume RUN` to continue with the same result as an uninterrupted run.
    The best factors so far are always in RUN/factors.json.
    """
    from longrope_search import config as config_mod
    from longrope_search import distributed
    from longrope_search.search import default_run_dir, run_search
    from longrope_search.stages import PIPELINE_FILE, is_pipeline, run_stages

    quiet_libraries()
    overrides = parse_overrides(set_)
    if target is not None:
        overrides.append(f"search.target={target}")
    if init_from is not None:
        overrides.append(f"search.init_from={init_from}")
    if short:
        overrides.append("search.short=true")
    ctx = distributed.init_from_env()  # under torchrun: join the ranks; otherwise one process
    reporter = RichReporter(console) if ctx.is_main else None
    run_dir = resume or out
    staged = False
    try:
        if resume is not None and config is not None:
            fail("--resume continues the saved config of the run; drop --config (budget changes go in --set).")
        # rank 0 reads the files: the other nodes may not have them
        staged = distributed.run_on_main(
            lambda: is_pipeline(resume) if resume is not None else config is not None and config_mod.has_stages(config),
            ctx)
        if staged and (target is not None or init_from is not None or short):
            fail("--target, --init-from and --short apply to a single search; in a config with stages, set "
                 "search.target, search.init_from and search.short per stage.")
        if staged:
            pipeline = resume / PIPELINE_FILE if resume is not None else config
            results, run_dir = run_stages(pipeline, overrides, resume or out, reporter, ctx)
            final = results[-1].final
        elif resume is not None:
            final, run_dir = run_search(None, resume, resume=True, overrides=overrides, reporter=reporter, ctx=ctx)
        else:
            # rank 0 reads the YAML: the other nodes may not have the file
            cfg = distributed.run_on_main(lambda: config_mod.load_config(config, overrides), ctx)
            run_dir = out or Path(cfg.output.dir or default_run_dir(cfg))
            final, run_dir = run_search(cfg, run_dir, reporter=reporter, ctx=ctx)
    except KeyboardInterrupt:
        if reporter is not None:
            reporter.stop()
        if ctx.is_main and (run_dir is not None or staged):
            again = f"`longrope search --resume {run_dir}`" if run_dir is not None else "the same command"
            err_console.print(f"interrupted: finished generations and evaluations are saved; continue with {again}",
                              markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        if reporter is not None:
            reporter.stop()
        distributed.shutdown(ctx, wait=sys.exc_info()[0] is None)
    if ctx.is_main:
        if staged:
            show_stages(results)
            run_dir = results[-1].stage.run_dir
        show_result(final, run_dir)


def show_stages(results: list[Any]) -> None:
    for r in results:
        ppl = r.final.ppl
        console.print(f"stage {r.stage.name} ({r.status}): {r.final.scored_length} tokens, search ppl "
                      f"{ppl.get('search', float('nan')):.4f}, held-out {ppl.get('heldout', float('nan')):.4f}, "
                      f"{r.stage.run_dir}", markup=False)
    console.print(f"the last stage's factors (export this one): {results[-1].stage.run_dir}", markup=False)


def show_result(final: Any, run_dir: Path) -> None:
    from rich.table import Table

    length = final.search.get("scored_length", final.target_length)
    kind = "short-context set" if final.search.get("mode") == "short" else "factors"
    table = Table(title=f"{kind} at {length} tokens ({length / final.rope.original_length:g}x the window): "
                        "perplexity, lower is better")
    table.add_column("method")
    table.add_column("search samples", justify="right")
    table.add_column("held-out samples", justify="right")
    table.add_row("longrope (searched)", f"{final.ppl.get('search', float('nan')):.4f}",
                  f"{final.ppl.get('heldout', float('nan')):.4f}")
    for name, row in final.baselines.items():
        table.add_row(name, f"{row.get('search', float('nan')):.4f}", f"{row.get('heldout', float('nan')):.4f}")
    console.print(table)
    fit = final.search.get("attention_fit")
    if fit:
        from longrope_search.search import describe_attention_fit

        console.print(describe_attention_fit(fit), markup=False)
        if "heldout" in fit:
            before, after = fit["heldout"]["long_mscale"], fit["heldout"]["mscale"]
            console.print(f"held-out at {fit['length']} tokens: {before:.4f} -> {after:.4f} ({after / before - 1:+.2%})",
                          markup=False)
    console.print(f"n_hat {final.n_hat}, mscale {final.mscale:.4f}; factors written to {run_dir / 'factors.json'}",
                  markup=False)


@app.command("export")
@user_errors
def export_cmd(
    source: Path = typer.Argument(..., help="Run directory (or its factors.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="New Hugging Face model directory to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Local model directory to export onto (default: the one searched)."),
    copy_weights: bool = typer.Option(False, "--copy-weights", help="Copy the weights instead of symlinking them."),
    force: bool = typer.Option(False, "--force", help="Write into an existing, non-empty --out."),
    drop_n_hat: bool = typer.Option(False, "--drop-n-hat", help="Export factors searched with n_hat > 0 without n_hat."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload --out and compare its logits with the searched model."),
    verify_length: Optional[int] = typer.Option(None, "--verify-length", help="Tokens for the check (default: window + 16)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest accepted max abs logit difference."),
    device: str = typer.Option("cpu", "--device", help="Device for the check (cuda for big models)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (exact check) or bfloat16 (half the memory)."),
) -> None:
    """Write a Hugging Face model directory that runs the searched factors as rope type longrope.

    transformers (4.5x and 5.x) and vLLM load it; the check reloads it and compares logits past the
    original window with the search-time model. SRC is never written; weights are symlinked by default.
    """
    from longrope_search.export import export

    quiet_libraries()
    report = export(source, out, model=model, copy_weights=copy_weights, force=force, drop_n_hat=drop_n_hat,
                    verify=verify, tolerance=tolerance, verify_length=verify_length, device=device, dtype=dtype)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    if report.max_abs_diff is not None:
        console.print(f"verified: max abs logit difference {report.max_abs_diff:.2e} at {report.verify_length} tokens, "
                      f"{report.short_max_abs_diff:.2e} inside the original window", markup=False)
    console.print(f"exported to {report.out}", markup=False)


@app.command("eval")
@user_errors
def eval_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory: the model, corpus and factors come from it."),
    lengths: str = typer.Option(..., "--lengths", "-l", help="Comma-separated: 1x,8x,16x (times the original window) or 4k,32k."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to load (with RUN_DIR: the searched one)."),
    factors: Optional[Path] = typer.Option(None, "--factors", "-f", help="factors.json or run directory, without RUN_DIR."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Corpus without RUN_DIR: builtin:NAME, hub:NAME or a path."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help="Windows per length (default: the run's heldout_samples, or 8)."),
    passkey: bool = typer.Option(False, "--passkey", help="Also measure passkey retrieval."),
    trials: int = typer.Option(10, "--trials", help="Passkey prompts per length."),
    seed: int = typer.Option(0, "--seed", help="Picks the passkey prompts (and the documents without RUN_DIR)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: the run's, else auto)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout and nothing else."),
) -> None:
    """Perplexity (and passkey retrieval) per length of no scaling, PI, NTK, YaRN and the searched factors.

    With RUN_DIR, perplexity is measured on held-out documents the search never scored, and the result is
    also written to RUN_DIR/eval.json. Without it, pass --model, --factors and --data.
    """
    import json

    from longrope_search.evaluate import evaluate, render_tables
    from longrope_search.factors import load_factors

    quiet_libraries()
    with err_console.status("loading") as status:
        result = evaluate(
            [x.strip() for x in lengths.split(",") if x.strip()], run_dir=run_dir, model=model, factors=factors,
            data=data, samples=samples, seed=seed, passkey_trials=trials if passkey else 0, device=device,
            progress=status.update,
        )
    if json_out:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    window = load_factors(result.factors).rope.original_length
    for table in render_tables(result, original_length=window):
        console.print(table)
    if run_dir is not None:
        console.print(f"written to {run_dir / 'eval.json'}", markup=False)


@app.command()
@user_errors
def plot(
    run: Path = typer.Argument(..., help="Run directory a search wrote."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs (default RUN/plots)."),
) -> None:
    """Draw a run as PNGs: factors against PI/NTK/YaRN, search progress, and (after `longrope eval`)
    perplexity and passkey accuracy by length."""
    from longrope_search.plot import plot_run

    def warn(line: str) -> None:
        console.print(f"warning: {line}", markup=False, style="yellow")

    for path in plot_run(run, out, warn=warn):
        console.print(f"wrote {path}", markup=False)


@app.command()
@user_errors
def plan(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Search YAML: its model, target, samples and budget."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Preset (llama2-7b, llama3-8b, mistral-7b, phi3-mini), local directory or hub id."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target length: 256k, 2m, 131072, or 8x."),
    gpus: int = typer.Option(1, "--gpus", help="GPUs the search runs on."),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", help="Memory of one GPU in GB."),
    tflops: Optional[float] = typer.Option(None, "--tflops", help="Achieved bf16 TFLOP/s per GPU (default 400: an assumption for H100/H200; A100 about 150)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Windows per evaluation (default: the config's, else the paper's 5, or 3 from 512k)."),
    dtype_bytes: int = typer.Option(2, "--dtype-bytes", help="Bytes per weight and activation: 2 for bf16, 4 for fp32."),
    mlp_chunk: Optional[int] = typer.Option(None, "--mlp-chunk", help="Positions per MLP chunk when chunking (default 16384)."),
    eager: bool = typer.Option(False, "--eager", help="Eager attention (L x L scores) instead of flash/SDPA."),
) -> None:
    """Memory and time of a search before renting GPUs: whether one evaluation fits, which mode it needs
    (whole MLP, MLP chunking, context parallelism), and how long the budget takes.

    Time is FLOPs over --tflops, an assumption: measure one evaluation and pass what you get.
    """
    from longrope_search import plan as plan_mod
    from longrope_search.config import has_stages, load_config, load_stages, parse_length

    if config is None and model is None:
        fail("pass --config with a search YAML or --model with a preset, model directory or hub id.")

    def estimate(shape: Any, length: int, samples_: int | None, budget: Any, search: Any | None) -> Any:
        chunk = mlp_chunk or (search.mlp_chunk if search is not None else None) or None  # 0 (off) still compared
        return plan_mod.estimate(
            shape, length, gpus=gpus, gpu_mem_gb=gpu_mem, dtype_bytes=dtype_bytes, samples=samples or samples_,
            budget=budget, flash=not eager, tflops=tflops or plan_mod.DEFAULT_TFLOPS,
            mlp_chunk=chunk or plan_mod.DEFAULT_MLP_CHUNK, loss_chunk=search.chunk_size if search is not None else 1024,
        )

    if config is not None and has_stages(config):
        if target is not None:
            fail("--target applies to a single-stage config; each stage sets its own search.target.")
        previous = None  # (name, shape, length) of the last long stage
        for name, cfg in load_stages(config)[1]:
            try:
                shape, length, n, budget = plan_mod.search_inputs(cfg, model)
            except ModelError:
                if previous is None:
                    raise
                console.print(f"note: stage {name}: {cfg.model.name} is not readable yet (a model still to be "
                              f"fine-tuned?); planned with stage {previous[0]}'s model shape", markup=False)
                shape, length, n, budget = plan_mod.search_inputs(cfg, shape=previous[1])
            if cfg.search.short and previous is not None and cfg.search.mscale == "auto" and cfg.search.long_tolerance > 0:
                fit = plan_mod.attention_fit_budget(previous[2], shape.original_length)
                show_plan(f"stage {name}: attention-factor check at {previous[2]} tokens", previous[1], previous[2],
                          gpus, gpu_mem, estimate(previous[1], previous[2], n, fit, cfg.search))
            show_plan(f"stage {name}", shape, length, gpus, gpu_mem, estimate(shape, length, n, budget, cfg.search))
            if not cfg.search.short:
                previous = (name, shape, length)
        return
    budget, search_section, config_samples = None, None, None
    if config is not None:
        search_config = load_config(config)
        shape, length, config_samples, budget = plan_mod.search_inputs(search_config, model)
        search_section = search_config.search
    else:
        shape = plan_mod.model_shape(model)
    if target is not None or config is None:
        length = parse_length(target or "8x", shape.original_length)
    show_plan("longrope plan", shape, length, gpus, gpu_mem, estimate(shape, length, config_samples, budget, search_section))


def show_plan(title: str, shape: Any, length: int, gpus: int, gpu_mem: float, result: Any) -> None:
    from rich.table import Table

    from longrope_search import plan as plan_mod

    table = Table(title=f"{title}: {shape.name} at {length} tokens on {gpus} x {gpu_mem:g} GB")
    table.add_column("quantity")
    table.add_column("estimate")
    for name, value in plan_mod.rows(result):
        table.add_row(name, value)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"recommended: {result.recommendation()}", markup=False)


@app.command()
@user_errors
def info(
    model: str = typer.Option("builtin:tiny", "--model", "-m", help="Local directory, hub id, or builtin:NAME."),
    target: str = typer.Option("8x", "--target", "-t", help="Target length for the baseline factor vectors."),
) -> None:
    """Show a model's RoPE geometry and the PI / NTK / YaRN factor vectors for a target length."""
    from rich.table import Table

    from longrope_search import rope
    from longrope_search.config import parse_length
    from longrope_search.model import load_config, rope_spec

    spec = rope_spec(load_config(model))
    length = parse_length(target, spec.original_length)
    scale = spec.scale(length)
    console.print(f"{model}: rope_theta {spec.base:g}, rotary_dim {spec.rotary_dim} ({spec.num_factors} factors), "
                  f"original window {spec.original_length}; target {length} = {scale:g}x, "
                  f"LongRoPE mscale {rope.longrope_mscale(scale, spec.original_length):.4f}", markup=False)
    table = Table(title="factor per rotary pair (1 = untouched)")
    table.add_column("pair", justify="right")
    table.add_column("wavelength", justify="right")
    vectors = {name: fn(spec, scale) for name, fn in rope.BASELINES.items()}
    for name in vectors:
        table.add_column(name, justify="right")
    wavelengths = 2 * math.pi / rope.base_inv_freq(spec)
    for i in range(spec.num_factors):
        table.add_row(str(i), f"{wavelengths[i].item():.1f}", *(f"{v[i].item():.3f}" for v in vectors.values()))
    console.print(table)


def main() -> None:
    app()
