"""The `longrope` command line. Heavy imports (torch, transformers) happen inside commands, so
`longrope --help` is instant; every LongRopeError becomes one line on stderr and exit code 2. What the commands
print lives in report.py.

Over 450 lines: seven commands whose options (with their help texts) are most of it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from longrope_search.config import DEFAULT_TARGET, canonical_dtype  # light: stdlib, yaml, pydantic
from longrope_search.errors import ConfigError, DependencyError, LongRopeError, StorageError, install_hint
from longrope_search.progress import phases  # light: rich, and the search's state and setup types

app = typer.Typer(
    help="Search LongRoPE's per-dimension RoPE rescale factors to extend a Hugging Face causal LM's context window.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: paragraphs re-wrapped to the terminal's width, no type column (no <bool> on flags)
    rich_markup_mode=None,
)
console = Console(soft_wrap=True)  # long lines stay whole: logs and grep read them
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, what schedulers (Slurm, Kubernetes) send before they kill


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the work in flight is dropped, what is finished stays saved."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` for the block (in the main thread; elsewhere signals are not ours to take)."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends the process
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_exit(exc: KeyboardInterrupt) -> typer.Exit:
    return typer.Exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)


@contextlib.contextmanager
def saved_on_stop(reporter: Any, saved: str, resume: Callable[[], str | None],
                  resume_after_disk_error: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Ctrl-C or SIGTERM: stop the live display, say what is `saved` and the command `resume()` returns (None:
    nothing to continue), exit 130 or 143. A full disk (StorageError): its one line gains the same command
    (`resume_after_disk_error`, default `resume`), since what was finished is on disk."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if reporter is not None:
            reporter.stop()
        command = resume()
        if command is not None:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            err_console.print(f"{what}: {saved}; continue with {command}", markup=False, soft_wrap=True)
        raise interrupted_exit(exc) from None
    except StorageError as exc:
        command = (resume_after_disk_error or resume)()
        if command is None:
            raise
        raise StorageError(f"{str(exc).rstrip('.')}; then continue with {command}.") from None


def fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises the error; one line is enough
        err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes -> one line and exit 2; Ctrl-C -> exit 130, SIGTERM -> exit 143 (search prints how to resume);
    an operating-system error no library call turned into a typed one -> one line naming the file, exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except LongRopeError as exc:
            fail(str(exc))
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}; check the path, its permissions and the free disk space.")
        except KeyboardInterrupt as exc:
            err_console.print("terminated." if isinstance(exc, Terminated) else "interrupted.", markup=False)
            raise interrupted_exit(exc) from None

    return wrapper


def quiet_libraries() -> None:
    """Our phase lines replace transformers' per-tensor "Loading weights" bars and its warnings; downloads keep
    their bars (huggingface_hub's for models, datasets' for corpora), so a long download is never silent."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()  # also switches huggingface_hub's off: on again below
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.enable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"longrope {version('longrope')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("longrope (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                 help="Print the installed version and exit."),
) -> None:
    """Search LongRoPE's per-dimension RoPE rescale factors to extend a Hugging Face causal LM's context window."""


def parse_shares(text: str) -> tuple[float, ...]:
    """'0,0.25,1' -> (0.0, 0.25, 1.0); range checks are the caller's."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as comma-separated numbers; write e.g. 0,0.25,0.5,0.75,1.") from None


# The model flags of search, finetune and eval: the config's model section under the names transformers and
# lm-evaluation-harness use (one definition, shared by the commands).
MODEL_FLAG = typer.Option(None, "--model", "-m", help="Hub id, local folder or builtin:NAME (model.name).")
DTYPE_FLAG = typer.Option(None, "--dtype", help="bf16, fp16, fp32 or auto (model.dtype; auto: bf16 on GPU, fp32 on CPU).")
REVISION_FLAG = typer.Option(None, "--revision", help="Hub branch, tag or commit of the model (model.revision).")
REMOTE_CODE_FLAG = typer.Option(
    False, "--trust-remote-code", help="Run model code from the hub repository (model.trust_remote_code).")
ATTENTION_FLAG = typer.Option(
    None, "--attn-implementation", help="flash_attention_2, sdpa, eager or auto (model.attn_implementation).")
JSON_FLAG = typer.Option(False, "--json", help="Print the result as one JSON object on stdout; progress goes to stderr.")


def model_overrides(model: str | None, dtype: str | None, revision: str | None, trust_remote_code: bool,
                    attn_implementation: str | None, dtype_key: str = "model.dtype") -> list[str]:
    """The model flags as --set overrides, so they pass the config's checks like any value (a fine-tune's --dtype is
    its training precision, finetune.precision)."""
    values = {"model.name": model, dtype_key: canonical_dtype(dtype, "--dtype") if dtype is not None else None,
              "model.revision": revision, "model.trust_remote_code": True if trust_remote_code else None,
              "model.attn_implementation": attn_implementation}
    # JSON is YAML: a value stays the string typed (a commit id 0123456, a model named yes), never a number or bool
    return [f"{key}={json.dumps(value)}" for key, value in values.items() if value is not None]


def print_json(doc: Any) -> None:
    """One JSON object on stdout (strict: no NaN or Infinity), for scripts."""
    from longrope_search.files import json_text

    typer.echo(json_text(doc, indent=2))


def parse_overrides(items: list[str] | None) -> list[str]:
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value; write e.g. --set search.generations=10.")
    return list(items or [])


@app.command()
@user_errors
def search(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML config, or a shipped one by name: tiny, llama2-7b, ... (see configs/)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target length: 256k, 2m, 131072, or 8x."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<model>-<target>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the search (or stages) in this directory."),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Build on this run's factors: progressive extension, or the long set for --short."),
    short: bool = typer.Option(
        False, "--short", help="Search the short-context set (inputs within the original window) for --init-from."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Override a config value: --set search.generations=10."),
    model: Optional[str] = MODEL_FLAG,
    dtype: Optional[str] = DTYPE_FLAG,
    revision: Optional[str] = REVISION_FLAG,
    trust_remote_code: bool = REMOTE_CODE_FLAG,
    attn_implementation: Optional[str] = ATTENTION_FLAG,
    json_out: bool = JSON_FLAG,
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
    from longrope_search.config import find_config

    quiet_libraries()
    config = find_config(config) if config is not None else None
    overrides = parse_overrides(set_) + model_overrides(model, dtype, revision, trust_remote_code, attn_implementation)
    if target is not None:
        overrides.append(f"search.target={target}")
    if init_from is not None:
        overrides.append(f"search.init_from={init_from}")
    if short:
        overrides.append("search.short=true")
    run_job(config, resume, out, overrides, target is not None or init_from is not None or short, json_out)


def run_job(config: Path | None, resume: Path | None, out: Path | None, overrides: list[str], single: bool,
            json_out: bool) -> None:
    """`longrope search` once its arguments are read: join the ranks, run the job, print its result on rank 0."""
    from longrope_search import distributed, job, report
    from longrope_search.progress import RichReporter

    ctx = distributed.init_from_env()  # under torchrun: join the ranks; otherwise one process
    reporter = RichReporter(err_console if json_out else console) if ctx.is_main else None
    planned = None
    try:
        with saved_on_stop(reporter, "finished generations and evaluations are saved",
                           lambda: planned.continue_command if ctx.is_main and planned is not None else None,
                           lambda: planned.continue_command if planned is not None and planned.resumable else None):
            planned = job.prepare(config, resume, out, overrides, single, ctx)
            result = job.run(planned, reporter, ctx)
    finally:
        if reporter is not None:
            reporter.stop()
        distributed.shutdown(ctx, wait=sys.exc_info()[0] is None)
    if ctx.is_main and json_out:
        print_json(result.to_json())
    elif ctx.is_main:
        report.show_job(console, result)


@app.command()
@user_errors
def finetune(
    run: Optional[Path] = typer.Argument(None, help="Search run whose factors the model trains with."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="New folder: the fine-tuned Hugging Face model."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML with a finetune section (and model, output), or a shipped one by name: "
        "tiny-finetune, llama2-7b-finetune-256k."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the fine-tune in this folder."),
    factors: Optional[str] = typer.Option(
        None, "--factors", help="Train with a baseline instead of RUN's factors: yarn, pi or ntk, as transformers runs "
        "it (without RUN: the config's model.name, and --target)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="The baseline's target length (8x, 32k); "
                                         "default: RUN's target."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Override a config value: --set finetune.steps=200."),
    model: Optional[str] = MODEL_FLAG,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Training precision: bf16, fp32 or auto (finetune.precision)."),
    revision: Optional[str] = REVISION_FLAG,
    trust_remote_code: bool = REMOTE_CODE_FLAG,
    attn_implementation: Optional[str] = ATTENTION_FLAG,
    json_out: bool = JSON_FLAG,
) -> None:
    """Fine-tune the model with RUN's factors installed as the export runs them, and write it as a Hugging Face model
    directory (the stabilising fine-tune of the progressive route). With --factors yarn (pi, ntk) the same training
    runs with that baseline instead: the route LongRoPE is compared with.

    transformers' Trainer trains on finetune.source, packed to the run's target length with documents kept apart,
    plus finetune.short_share of rows within the original window (the short factors). Checkpoints go to
    OUT/checkpoints; after Ctrl-C, a crash or kill -9, `longrope finetune --resume OUT` continues from the last one.
    OUT then loads with plain transformers and is checked like `longrope export`'s output; search on it again with
    --set model.name=OUT.
    """
    quiet_libraries()
    overrides = parse_overrides(set_) + model_overrides(model, dtype, revision, trust_remote_code, attn_implementation,
                                                        dtype_key="finetune.precision")
    if resume is not None and (run is not None or config is not None or out is not None or factors or target):
        raise ConfigError("--resume continues the saved fine-tune; drop RUN, --config, --out, --factors and --target "
                          "(changes that keep what is trained go in --set).")
    if resume is None and run is None and factors is None:
        raise ConfigError("pass the search run to fine-tune: longrope finetune RUN --out DIR (or --factors yarn "
                          "--target 8x for a baseline, or --resume DIR).")
    if factors is not None:
        overrides.append(f"finetune.factors={factors}")
    if target is not None:
        overrides.append(f"finetune.target={target}")
    run_finetune_job(run, config, resume, out, overrides, json_out)


def run_finetune_job(run: Path | None, config: Path | None, resume: Path | None, out: Path | None,
                     overrides: list[str], json_out: bool) -> None:
    """`longrope finetune` once its arguments are read: train (or resume), print the result."""
    from longrope_search import report
    from longrope_search.config import find_config
    from longrope_search.finetune import finetune_config, run_finetune
    from longrope_search.progress import RichReporter
    from longrope_search.rundir import CONFIG_FILE

    reporter = RichReporter(err_console if json_out else console)
    folder = resume

    def resume_command() -> str | None:  # once the fine-tune's folder holds its config, it can be continued
        saved = folder is not None and (folder / CONFIG_FILE).is_file()
        return f"`longrope finetune --resume {folder}`" if saved else None

    try:
        with saved_on_stop(reporter, "the steps up to the last checkpoint are saved", resume_command):
            if resume is not None:
                result = run_finetune(None, resume, resume=True, overrides=overrides, reporter=reporter)
            else:
                settings = finetune_config(run, find_config(config) if config is not None else None, overrides)
                folder = out or (Path(settings.output.dir) if settings.output.dir else None)
                result = run_finetune(settings, folder, reporter=reporter)
    finally:
        reporter.stop()
    if json_out:
        print_json(result.to_json())
    else:
        report.show_finetune(console, result)


@app.command("export")
@user_errors
def export_cmd(
    source: Optional[Path] = typer.Argument(None, help="Run directory (or its factors.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="New Hugging Face model directory to write."),
    factors: Optional[str] = typer.Option(
        None, "--factors", help="Export a baseline instead of a run: yarn, pi or ntk at --target onto --model (e.g. "
        "a model `finetune --factors yarn` trained)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="The baseline's target length (16x, 32k)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Model to export onto: local directory, builtin:NAME or hub id (default: the "
        "one searched)."),
    revision: Optional[str] = typer.Option(
        None, "--revision", help="Hub branch, tag or commit of the model (default: the run's model.revision)."),
    copy_weights: bool = typer.Option(False, "--copy-weights", help="Copy the weights instead of symlinking them."),
    force: bool = typer.Option(False, "--force", help="Write into an existing, non-empty --out."),
    drop_n_hat: bool = typer.Option(False, "--drop-n-hat", help="Export factors searched with n_hat > 0 without n_hat."),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Reload --out and compare its logits with the searched model."),
    verify_length: Optional[int] = typer.Option(
        None, "--verify-length", help="Tokens for the check (default: window + 16)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest accepted max abs logit difference."),
    device: str = typer.Option("cpu", "--device", help="Device for the check (cuda for big models)."),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="auto: shard the check's models over all GPUs (needs accelerate)."),
    dtype: str = typer.Option("float32", "--dtype", help="fp32 (exact check) or bf16 (half the memory)."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", metavar="REPO", help="Upload --out to this hub model repository (org/name)."),
    private: bool = typer.Option(False, "--private", help="Create the --push-to-hub repository as private."),
    format_: str = typer.Option(
        "hf", "--format", help="hf: a Hugging Face model directory; longrope-csv: the factors as microsoft/LongRoPE's "
        "CSVs (result_final.csv, result_short.csv) in --out."),
    json_out: bool = JSON_FLAG,
) -> None:
    """Write a Hugging Face model directory that runs the searched factors as rope type longrope.

    transformers (4.57+ and 5.x) and vLLM load it; it gets its own model card (README.md). The check reloads it
    and compares logits past the original window with the search-time model. The original model is never written;
    weights are symlinked (copied for the built-in model).
    """
    from longrope_search.export import export, export_method
    from longrope_search.report import show_export

    quiet_libraries()
    run_only = [flag for flag, given in (("--push-to-hub", push_to_hub), ("--copy-weights", copy_weights),
                                         ("--no-verify", not verify), ("--verify-length", verify_length),
                                         ("--tolerance", tolerance != 1e-4), ("--dtype", dtype != "float32"),
                                         ("--device-map", device_map), ("--revision", revision),
                                         ("--drop-n-hat", drop_n_hat)) if given]
    check_export_form(format_, source, factors, model, target, run_only)
    if format_ == "longrope-csv":
        return export_reference_csv(source, out, force, json_out)
    with phases(err_console) as phase:
        written = export_method(factors, target, model, out, force=force, device=device, progress=phase) \
            if factors is not None else \
            export(source, out, model=model, copy_weights=copy_weights, force=force, drop_n_hat=drop_n_hat, verify=verify,
                   tolerance=tolerance, verify_length=verify_length, device=device, dtype=dtype, device_map=device_map,
                   revision=revision, push_to_hub=push_to_hub, private=private, progress=phase)
    if json_out:
        print_json(written.to_json())
    else:
        show_export(console, written)


def check_export_form(format_: str, source: Path | None, factors: str | None, model: str | None,
                      target: str | None, run_only: list[str]) -> None:
    """One line for an export asked in a form that does not hold: a run's export, a baseline's, or the CSVs, each
    with only the flags that apply to it (`run_only`: the given flags that set a run's Hugging Face export)."""
    if format_ not in ("hf", "longrope-csv"):
        raise ConfigError(f"--format {format_!r} is not one of hf, longrope-csv.")
    if run_only and (factors is not None or format_ == "longrope-csv"):
        what = "--format longrope-csv" if format_ == "longrope-csv" else "--factors"
        raise ConfigError(f"{', '.join(run_only)} do not apply with {what}; drop them (they set a run's Hugging Face "
                          "export and its check).")
    if format_ == "longrope-csv" and (model is not None or factors is not None or target is not None):
        raise ConfigError("--format longrope-csv writes a run's own factors; drop --model, --factors and --target.")
    if format_ == "hf" and ((factors is None) == (source is None) or
                            (factors is not None and (model is None or target is None))):
        raise ConfigError("pass a run to export (longrope export RUN --out DIR), or a baseline with the model and "
                          "length: longrope export --factors yarn --target 16x --model MODEL --out DIR.")


def export_reference_csv(source: Path | None, out: Path, force: bool, json_out: bool) -> None:
    """`longrope export --format longrope-csv`: the run's factors as microsoft/LongRoPE's CSVs."""
    from longrope_search.reference_csv import export_csv

    if source is None:
        raise ConfigError("--format longrope-csv writes a run's factors: longrope export RUN --format longrope-csv "
                          "--out DIR.")
    written = export_csv(source, out, force)
    if json_out:
        print_json(written.to_json())
        return
    for note in written.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"wrote {', '.join(str(p) for p in written.files)}", markup=False)


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
    needle: bool = typer.Option(False, "--needle", help="Also measure needle retrieval by length and depth."),
    needle_trials: int = typer.Option(20, "--needle-trials", help="Needle prompts per length and depth."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Needle depths, shares of the context."),
    keys: int = typer.Option(4, "--keys", help="Needles in a multi-key prompt (one is asked)."),
    seed: int = typer.Option(0, "--seed", help="Picks the passkey and needle prompts (and the documents without RUN_DIR)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: the run's, else auto)."),
    device_map: Optional[str] = typer.Option(
        None, "--device-map", help="auto: shard the model over all GPUs (needs accelerate; default: the run's "
        "model.device_map)."),
    dtype: Optional[str] = DTYPE_FLAG,
    revision: Optional[str] = REVISION_FLAG,
    trust_remote_code: bool = REMOTE_CODE_FLAG,
    attn_implementation: Optional[str] = ATTENTION_FLAG,
    output_path: Optional[Path] = typer.Option(
        None, "--output-path", "-o", help="The eval.json to write, merged with what it holds (default: RUN_DIR/eval.json; "
        "none without RUN_DIR)."),
    json_out: bool = JSON_FLAG,
) -> None:
    """Perplexity (and passkey and needle retrieval) per length of no scaling, PI, NTK and YaRN (each rescaled to the
    length, and fixed at the factors' target as one deploys it: yarn@8x) and the searched factors.

    With RUN_DIR, perplexity is measured on held-out documents the search never scored, and the result is
    also written to RUN_DIR/eval.json. Without it, pass --model, --factors and --data. --needle hides a named
    number in held-out text at each depth and asks for it at the end (one needle, and several keys with one
    asked): the share of exact greedy answers per length and depth.
    """
    from longrope_search.evaluate import evaluate
    from longrope_search.report import show_eval
    from longrope_search.retrieval import NeedleSettings
    from longrope_search.rundir import EVAL_FILE

    if seed < 0:
        raise ConfigError(f"--seed {seed} is negative; pass 0 or more (it picks the prompts and documents).")
    if passkey and trials < 1:
        raise ConfigError(f"--passkey with --trials {trials} measures nothing; pass --trials 1 or more (default 10).")
    quiet_libraries()
    settings = NeedleSettings(needle_trials, parse_shares(depths), keys, seed) if needle else None
    load = {key: value for key, value in (("revision", revision), ("attn_implementation", attn_implementation),
                                          ("trust_remote_code", trust_remote_code or None)) if value is not None}
    with phases(err_console) as phase:
        result = evaluate(
            [x.strip() for x in lengths.split(",") if x.strip()], run_dir=run_dir, model=model, factors=factors,
            data=data, samples=samples, seed=seed, passkey_trials=trials if passkey else 0, device=device,
            dtype=canonical_dtype(dtype, "--dtype") if dtype is not None else None, progress=phase, needle=settings,
            device_map=device_map, load=load, output=output_path,
        )
    if json_out:
        print_json(result.to_json())
    else:
        show_eval(console, result, run_dir, output_path or (run_dir / EVAL_FILE if run_dir is not None else None))


@app.command()
@user_errors
def plot(
    run: Path = typer.Argument(..., help="Run directory a search wrote."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the figures (default RUN/plots)."),
) -> None:
    """Draw a run as PNG and SVG: factors against PI/NTK/YaRN, search progress, and (after `longrope eval`)
    perplexity and passkey accuracy by length."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise DependencyError(f"longrope plot needs matplotlib, an optional part: {install_hint('plot')}")
    from longrope_search import checkpoint
    from longrope_search.plot import plot_run

    def warn(line: str) -> None:
        console.print(f"warning: {line}", markup=False, style="yellow")

    for note in checkpoint.unfinished_note(run):
        warn(note)
    for path in plot_run(run, out, warn=warn):
        console.print(f"wrote {path} and {path.with_suffix('.svg').name}", markup=False)


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
    dtype: str = typer.Option("bf16", "--dtype", help="Weights and activations: bf16, fp16 or fp32."),
    mlp_chunk: Optional[int] = typer.Option(None, "--mlp-chunk", help="Positions per MLP chunk when chunking (default 16384)."),
    eager: bool = typer.Option(False, "--eager", help="Eager attention (L x L scores) instead of flash/SDPA."),
    json_out: bool = typer.Option(False, "--json", help="Print the estimates as JSON on stdout and nothing else."),
) -> None:
    """Memory and time of a search before renting GPUs: whether one evaluation fits, which mode it needs
    (whole MLP, MLP chunking, context parallelism), and how long the budget takes.

    Time is FLOPs over --tflops, an assumption: measure one evaluation and pass what you get.
    """
    from longrope_search import plan as plan_mod
    from longrope_search import report
    from longrope_search.config import DTYPE_BYTES, find_config

    name = canonical_dtype(dtype, "--dtype")
    if name not in DTYPE_BYTES:
        raise ConfigError(f"--dtype {dtype} leaves the size open; plan needs bf16, fp16 or fp32.")
    documents = []
    for planned in plan_mod.planned_searches(find_config(config) if config is not None else None, model, target):
        if planned.note and not json_out:
            console.print(f"note: {planned.note}", markup=False)
        result = plan_mod.estimate(
            planned.shape, planned.length, gpus=gpus, gpu_mem_gb=gpu_mem, dtype_bytes=DTYPE_BYTES[name],
            samples=planned.samples if samples is None else samples, budget=planned.budget, flash=not eager,
            tflops=plan_mod.DEFAULT_TFLOPS if tflops is None else tflops,
            mlp_chunk=planned.mlp_chunk if mlp_chunk is None else mlp_chunk,
            loss_chunk=planned.loss_chunk,
        )
        if json_out:
            documents.append({"title": planned.title, "note": planned.note, **result.to_json()})
        else:
            report.show_plan(console, planned.title, planned.shape, planned.length, gpus, gpu_mem, result)
    if json_out:
        print_json(documents)


@app.command()
@user_errors
def info(
    model: str = typer.Option(
        "builtin:tiny", "--model", "-m", help="Preset (llama2-7b, llama3-8b, mistral-7b, phi3-mini), local "
        "directory, hub id, or builtin:NAME."),
    target: str = typer.Option(DEFAULT_TARGET, "--target", "-t", help="Target length for the baseline factor vectors."),
    json_out: bool = typer.Option(False, "--json", help="Print the geometry and factors as JSON and nothing else."),
) -> None:
    """Show a model's RoPE geometry and the PI / NTK / YaRN factor vectors for a target length."""
    from longrope_search import rope
    from longrope_search.config import parse_length
    from longrope_search.report import show_info
    from longrope_search.shapes import model_shape

    spec = model_shape(model).rope
    length = parse_length(target, spec.original_length)
    if length <= spec.original_length:
        raise ConfigError(f"--target {target} ({length} tokens) is not longer than {model}'s original window "
                          f"({spec.original_length} tokens); give a longer target, e.g. 8x.")
    scale = spec.scale(length)
    mscale = rope.longrope_mscale(scale, spec.original_length)
    vectors = {name: fn(spec, scale).tolist() for name, fn in rope.BASELINES.items()}
    wavelengths = (2 * math.pi / rope.base_inv_freq(spec)).tolist()
    if json_out:
        print_json({"model": model, "rope_theta": spec.base, "rotary_dim": spec.rotary_dim, "num_factors": spec.num_factors,
                    "original_length": spec.original_length, "target_length": length, "scale": scale, "mscale": mscale,
                    "wavelengths": wavelengths, "factors": vectors})
        return
    show_info(console, model, spec, length, mscale, wavelengths, vectors)


def main() -> None:
    app()
