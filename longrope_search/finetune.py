"""`longrope finetune`: train a model with a search run's factors installed exactly as the export runs them, with
transformers' Trainer, and write the result as a Hugging Face model directory through export's writer and check.

The run is first exported into DIR/start (config.json with rope_type longrope, weights linked) and loaded from there
with plain transformers, so training runs transformers' own longrope RoPE: the long factors for rows longer than the
original window, the short ones for rows within it (LongRoPE2's mixed context window, `packing.py`). The Trainer
checkpoints into DIR/checkpoints and continues from the newest complete one (`--resume DIR`, also after kill -9);
the trained weights go into DIR itself beside export's config.json, tokenizer, longrope.json and model card, and the
reload check of `longrope export` runs on them. DIR/finetune.json, written last, marks a finished fine-tune.

Over 450 lines: setup, data, the Trainer's arguments and callbacks, the written model and its check; the
checkpoints folder (trainer_checkpoints.py) and the result record (finetune_result.py) are apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from longrope_search import checkpoint, data, export, hf_config, methods, packing, reload_check
from longrope_search.config import Config, apply_overrides, from_dict, parse_length, read_yaml
from longrope_search.corpus import CorpusSpec, corpus_identity, same_documents
from longrope_search.errors import (CheckpointError, ConfigError, DataError, DependencyError, ExportError, ModelError,
                                    install_hint)
from longrope_search.factors import FactorsFile, factors_path, load_factors, software_versions
from longrope_search.files import atomic_write_text, make_readable, remove_temps
from longrope_search.finetune_result import FinetuneResult, is_trained, load_result
from longrope_search.model import LoadOptions, attention_backend, default_device, load_model_config, load_tokenizer, rope_spec
from longrope_search.progress import SILENT, Reporter
from longrope_search.trainer_checkpoints import CHECKPOINTS_KEPT, check_checkpoints, latest_checkpoint, remove_from
from longrope_search.rundir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    EXPORT_FACTORS_FILE,
    FINETUNE_FILE,
    FINETUNE_RESUME_KEYS,
    LOG_FILE,
    START_DIR,
    absolute_paths,
    check_folder_path,
    is_finetune,
    claimed,
    read_run_config,
    unstarted,
    write_resolved_config,
)

HELD_OUT_CORPUS = "builtin:cpython"  # what searches and evals of the shipped model score on: never trained on
CONFIG_SECTIONS = ("model", "finetune", "output")  # what a fine-tune's --config may set; data and search are RUN's


# --- the config -------------------------------------------------------------------------------------------


def finetune_config(run: Path | None, config_path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """`longrope finetune RUN --config FILE --set KEY=VALUE`: RUN's saved config (its model, and its data and search,
    kept for the record), FILE's model, finetune and output sections over it, the overrides last. Without RUN (a
    baseline's fine-tune, --factors yarn --target 8x) FILE's model, data, finetune and output sections alone."""
    sections = CONFIG_SECTIONS if run is not None else (*CONFIG_SECTIONS, "data")
    raw = read_run_config(Path(run)) if run is not None else {}
    raw["output"] = {"dir": None}  # the run's own folder is not the fine-tune's
    if config_path is not None:
        extra = read_yaml(config_path)
        others = sorted(set(extra) - set(sections))
        if others:
            raise ConfigError(f"{config_path}: a fine-tune's config sets {', '.join(sections)} only ({', '.join(others)} "
                              f"come from the run {run}); move those settings to the search's config.")
        for section in sections:
            if isinstance(extra.get(section), dict):
                raw[section] = {**(raw.get(section) or {}), **extra[section]}
    run_item = [f"finetune.run={Path(run).absolute()}"] if run is not None else []
    raw = apply_overrides(raw, [*(overrides or []), *run_item])
    return from_dict(raw, source=str(config_path or (run / CONFIG_FILE if run is not None else "--set")))


def with_run(config: Config) -> Config:
    """A stage's config with the data and search sections of the run it fine-tunes (what its folder records); a
    baseline's stage, which trains no run, as it is."""
    if config.finetune.run is None:
        return config
    saved = read_run_config(Path(config.finetune.run))
    raw = config.model_dump(mode="json")
    raw["data"], raw["search"] = saved.get("data", {}), saved.get("search", {})
    return from_dict(raw, source=f"{config.finetune.run}/{CONFIG_FILE}")


def resume_config(folder: Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """The fine-tune's saved config with the overrides a resume allows (FINETUNE_RESUME_KEYS), and a note per change."""
    saved = read_yaml(folder / CONFIG_FILE)
    for item in overrides:
        key = item.partition("=")[0].strip()
        section, _, name = key.partition(".")
        if section != "finetune" or name not in FINETUNE_RESUME_KEYS:
            raise ConfigError(f"{key} cannot change when resuming a fine-tune (it changes what is trained); start a "
                              f"new one with --out, or change only {', '.join('finetune.' + k for k in FINETUNE_RESUME_KEYS)}.")
    updated = apply_overrides(saved, overrides)
    notes = [f"finetune.{k}: {saved['finetune'].get(k)} -> {v}" for k, v in updated["finetune"].items()
             if saved["finetune"].get(k) != v]
    return from_dict(updated, source=str(folder / CONFIG_FILE)), notes


# --- what is trained, checked before anything is written --------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """A fine-tune's inputs, every user-facing check passed."""

    config: Config
    factors: FactorsFile
    factors_file: Path
    src: Path  # the model trained, as a local folder
    model_type: str
    options: LoadOptions
    corpus: CorpusSpec
    length: int
    short_length: int
    block_tokens: int  # tokens one forward pass of one process takes
    accumulation: int  # blocks per process per optimizer step
    world_size: int

    @property
    def installed(self) -> str:
        """What RoPE trains, for messages and the record: the run's factors, or a baseline at its target."""
        f = self.config.finetune
        return f"the factors of {f.run}" if f.factors == "run" else f"{f.factors} at {self.factors.target_length} tokens"

    @property
    def blocks(self) -> int:
        return self.config.finetune.steps * self.accumulation * self.world_size

    @property
    def batch_tokens(self) -> int:
        return self.block_tokens * self.accumulation * self.world_size


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def training_setup(config: Config) -> Setup:
    """The fine-tune `config` asks for, or one line naming every reason it cannot run."""
    f = config.finetune
    ff, factors_file = installed_factors(config)
    if ff.n_hat > 0 and not f.drop_n_hat:
        raise ConfigError(f"{f.run} searched n_hat={ff.n_hat}, which transformers (and so the trainer) cannot run; set "
                          "finetune.drop_n_hat=true to train the factors without it, or search with search.n_hat: [0].")
    corpus = CorpusSpec(f.source, f.hub_config, f.revision, f.split, f.text_field)
    if f.source == HELD_OUT_CORPUS:
        raise ConfigError(f"finetune.source {HELD_OUT_CORPUS} is the held-out corpus the search and eval score the "
                          "shipped model on; train on builtin:cpython-train (the model's own training files) instead.")
    run_data = read_run_config(Path(f.run)).get("data", {}) if f.run else config.data.model_dump()
    searched = CorpusSpec(str(run_data.get("source", "")), split=str(run_data.get("split", "validation")))
    if same_documents(corpus, searched) and (not f.source.startswith("hub:") or f.split == searched.split):
        raise ConfigError(f"finetune.source {f.source} is the corpus the run searched and is evaluated on; train on "
                          "another corpus or split (e.g. a hub dataset's train split), so held-out numbers stay held out.")
    src, model_config, options = export.source_model(ff, factors_file, config.model.name,
                                                     options=LoadOptions.of(config.model))
    original = ff.rope.original_length
    length = parse_length(f.length if f.length is not None else ff.target_length, original)
    short_length = parse_length(f.short_length if f.short_length is not None else original, original)
    problems = []
    if length <= original:
        problems.append(f"finetune.length {length} does not exceed the original window {original}: long rows would "
                        "run the short factors; give a longer length (the run's target by default)")
    if short_length > original:
        problems.append(f"finetune.short_length {short_length} exceeds the original window {original}: such rows run "
                        "the long factors; use the window or less")
    if short_length < 2:
        problems.append(f"finetune.short_length {short_length} is too short to predict anything; use 2 or more")
    world = world_size()
    block_tokens = f.rows * length
    step_tokens = block_tokens * world
    batch = parse_length(f.batch_tokens, original) if f.batch_tokens is not None else step_tokens
    if batch % step_tokens:
        lower, upper = max(1, batch // step_tokens) * step_tokens, (batch // step_tokens + 1) * step_tokens
        problems.append(f"finetune.batch_tokens {batch} is not a multiple of rows x length x processes = {f.rows} x "
                        f"{length} x {world} = {step_tokens}; use e.g. {lower} or {upper}")
    if f.context_parallel > 1 and (world % f.context_parallel or not f.fsdp.strip()):
        problems.append(f"finetune.context_parallel {f.context_parallel} needs a multiple of it in processes "
                        f"(torchrun started {world}) and finetune.fsdp (accelerate runs context parallelism on FSDP2)")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    if f.method == "lora" and importlib.util.find_spec("peft") is None:
        raise DependencyError(f"finetune.method lora needs peft, an optional part: {install_hint('lora')}")
    return Setup(config, ff, factors_file, src, str(model_config.model_type), options, corpus, length,
                 short_length, block_tokens, max(1, batch // step_tokens), world)


def installed_factors(config: Config) -> tuple[FactorsFile, Path]:
    """The factors the fine-tune installs and the file that holds them: the run's factors.json, or with
    finetune.factors yarn/pi/ntk that baseline at finetune.target (default: the run's target) for the model, kept in
    OUT/longrope.json (written when the fine-tune starts)."""
    f = config.finetune
    if not f.run and f.factors == "run":
        raise ConfigError("a fine-tune needs the search run whose factors it trains (longrope finetune RUN --out DIR), "
                          "or a RoPE method and target: longrope finetune --factors yarn --target 8x --out DIR.")
    ff = None
    if f.run:
        try:
            ff = load_factors(f.run)
        except ExportError as exc:
            raise CheckpointError(f"finetune.run {f.run}: {exc}") from None
    if f.factors == "run":
        return ff, factors_path(f.run)
    if f.target is None and ff is None:
        raise ConfigError(f"finetune.factors {f.factors} needs the length it extends to: pass --target (e.g. 8x).")
    model_config = load_model_config(config.model.name, LoadOptions.of(config.model))
    spec = rope_spec(model_config)
    if config.model.original_length:
        spec = dataclasses.replace(spec, original_length=config.model.original_length)
    target = parse_length(f.target, spec.original_length) if f.target is not None else ff.target_length
    folder = Path(config.output.dir or ".").absolute()
    return methods.method_file(f.factors, config.model.name, spec, target), folder / EXPORT_FACTORS_FILE


def training_data(setup: Setup, tokenizer: Any) -> tuple[data.TokenStream, packing.Plan]:
    """The planned blocks and the stream they cut; a corpus too small for them is refused in one line."""
    f = setup.config.finetune
    layout = packing.plan(setup.blocks, setup.length, setup.short_length, f.rows, f.short_share,
                          separate=f.context_parallel == 1)
    stream = data.token_stream(tokenizer, setup.corpus, layout.tokens, f.seed, setup.config.data.cache_dir)
    if f.short_share < 1 and stream.longest <= setup.short_length:
        raise DataError(f"no document of corpus {setup.corpus.source!r} is longer than {setup.short_length} tokens, so "
                        f"rows of {setup.length} tokens would never run the long factors; use a corpus of long "
                        "documents.")
    return stream, layout


# --- the folder -------------------------------------------------------------------------------------------


def check_new_folder(out: Path) -> None:
    check_folder_path(out)
    if not unstarted(out):
        raise CheckpointError(f"{out} already exists and is not empty; continue a fine-tune there with `longrope "
                              f"finetune --resume {out}`, or choose another --out.")


def logged_losses(log_path: Path) -> dict[int, float]:
    """step -> its loss from log.jsonl (a step trained again after a resume: its newest line)."""
    losses: dict[int, float] = {}
    for record in checkpoint.log_records(log_path):
        if record["event"] == "step" and isinstance(record.get("step"), int) and isinstance(record.get("loss"), (int, float)):
            losses[record["step"]] = float(record["loss"])
    return losses


def logged_seconds(log_path: Path) -> float:
    return sum(float(r.get("seconds", 0.0)) for r in checkpoint.log_records(log_path) if r["event"] == "trained")


# --- training ---------------------------------------------------------------------------------------------


class _Logger(TrainerCallback):
    """Each optimizer step's loss into log.jsonl (main process) and the reporter's bar."""

    def __init__(self, log_path: Path, reporter: Reporter, batch_tokens: int) -> None:
        self.log_path, self.reporter, self.batch_tokens = log_path, reporter, batch_tokens
        self.diverged: tuple[int, float, float | None] | None = None  # (step, loss, gradient norm) once not finite

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        step, norm = int(state.global_step), logs.get("grad_norm")
        if not math.isfinite(float(logs["loss"])) or (norm is not None and not math.isfinite(float(norm))):
            self.diverged = (step, float(logs["loss"]), None if norm is None else float(norm))  # every process sees it
            control.should_training_stop, control.should_save = True, False
        if not state.is_world_process_zero:
            return
        record = {"event": "step", "step": step, "loss": float(logs["loss"]),
                  "learning_rate": float(logs.get("learning_rate", math.nan)), "tokens": step * self.batch_tokens}
        if logs.get("grad_norm") is not None:
            record["grad_norm"] = float(logs["grad_norm"])
        checkpoint.append_log(self.log_path, record)
        self.reporter.trained(step, {**logs, "tokens": step * self.batch_tokens})


class _PlannedOrder(Trainer):
    """The Trainer with the blocks in planned order (short blocks spread evenly; a resume skips exactly the blocks
    already trained), whatever sampling options this transformers version has."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


def training_arguments(setup: Setup, folder: Path) -> TrainingArguments:
    """The Trainer's settings: one block per batch in planned order, a checkpoint every save_every steps."""
    f, model = setup.config.finetune, setup.config.model
    device = default_device() if model.device == "auto" else model.device
    cuda = device.startswith("cuda")
    schedule = "constant_with_warmup" if f.schedule == "constant" else f.schedule
    # activation_checkpointing since transformers 5.x, gradient_checkpointing before (now its deprecated alias)
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    checkpointing: dict[str, Any] = {name: f.gradient_checkpointing}
    if f.gradient_checkpointing:
        checkpointing[f"{name}_kwargs"] = {"use_reentrant": False}  # LoRA's frozen inputs need no grad hook then
    extra: dict[str, Any] = {}
    if f.fsdp.strip():
        extra["fsdp"] = f.fsdp
        extra["fsdp_config"] = {"version": 2} if f.context_parallel > 1 else {}
    if f.context_parallel > 1:
        from accelerate.parallelism_config import ParallelismConfig  # only under torchrun with context parallelism

        extra["parallelism_config"] = ParallelismConfig(cp_size=f.context_parallel,
                                                        dp_shard_size=setup.world_size // f.context_parallel)
    return TrainingArguments(
        output_dir=str(folder / CHECKPOINTS_DIR), max_steps=f.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=setup.accumulation, learning_rate=f.learning_rate, lr_scheduler_type=schedule,
        warmup_steps=f.warmup_steps, weight_decay=f.weight_decay, max_grad_norm=f.max_grad_norm or 0.0,
        logging_steps=1, logging_nan_inf_filter=False,  # a diverged step must show its loss (_Logger stops there)
        save_strategy="steps", save_steps=f.save_every, save_total_limit=CHECKPOINTS_KEPT,
        report_to=f.report_to, disable_tqdm=True, seed=f.seed, data_seed=f.seed,  # the reporter draws the bar
        bf16=cuda and f.precision == "auto", use_cpu=not cuda and not device.startswith(("mps", "xpu")),
        remove_unused_columns=False, dataloader_num_workers=0, log_level="warning", **extra, **checkpointing,
    )


def load_start_model(setup: Setup, start: Path) -> Any:
    """The model as the export runs it: DIR/start loaded with plain transformers (rope_type longrope), trainable."""
    f, options = setup.config.finetune, setup.options
    device = default_device() if setup.config.model.device == "auto" else setup.config.model.device
    dtype = torch.bfloat16 if f.precision == "bfloat16" else torch.float32  # auto: fp32 weights (bf16 autocast on CUDA)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            start, dtype=dtype, attn_implementation=attention_backend(device, options.attn_implementation),
            trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(f"cannot load {start} for training ({exc}); check model.attn_implementation.") from exc
    loaded, expected = hf_config.loaded_rope_type(model.config) or "default", hf_config.METHOD_ROPE_TYPES[setup.factors.method]
    if loaded != expected:
        raise ExportError(f"transformers loads {start} with rope type {loaded!r}, not {expected}; report this with "
                          "your transformers version.")
    model.config.use_cache = False  # a KV cache would hide the packed documents from transformers' mask
    if f.method == "lora":
        from peft import LoraConfig, get_peft_model  # optional: pip install longrope[lora]

        set_seed(f.seed)  # LoRA's initialisation
        targets = f.lora_targets if isinstance(f.lora_targets, str) else list(f.lora_targets)
        model = get_peft_model(model, LoraConfig(r=f.lora_rank, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    return model.train()


def write_start(setup: Setup, start: Path) -> None:
    """DIR/start: the run exported as `longrope export` writes it (weights linked, or copied for the built-in model),
    or the one a previous start left complete (its model card, written last, is there and its factors match)."""
    factors_text = setup.factors_file.read_text()
    if (start / export.CARD_FILE).is_file() and (start / EXPORT_FACTORS_FILE).is_file():
        if (start / EXPORT_FACTORS_FILE).read_text() == factors_text:
            return
    if start.exists():
        shutil.rmtree(start)  # our own staging copy, stale or half-written
    export.write_files(setup.factors, setup.factors_file, setup.src, start, setup.model_type)


def check_factors_unchanged(setup: Setup, start: Path) -> None:
    """A resume trains the factors it started with: the run's factors.json must still hold them."""
    started = start / EXPORT_FACTORS_FILE
    if started.is_file() and FactorsFile.from_json(json.loads(started.read_text())).factors != setup.factors.factors:
        raise CheckpointError(f"the factors in {setup.factors_file} changed since this fine-tune started (it trains "
                              f"those in {started}); restore the run, or start a new fine-tune with --out.")


def save_model(trainer: Trainer, setup: Setup, folder: Path) -> tuple[Any, str]:
    """The trained weights into DIR (LoRA merged first); returns the model saved and its dtype's name."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if setup.config.finetune.method == "lora":
        model = model.merge_and_unload()  # a plain model: its weights include the adapters
    model.config.use_cache = True
    if setup.config.finetune.fsdp.strip():
        trainer.save_model(str(folder))  # gathers the shards on the main process
        (folder / "training_args.bin").unlink(missing_ok=True)
    elif trainer.is_world_process_zero():
        model.save_pretrained(folder, safe_serialization=True)
    if trainer.is_world_process_zero():
        make_readable(folder.glob("model*.safetensors*"))  # safetensors writes 0600; the other files are 0644
    return model, str(next(model.parameters()).dtype).removeprefix("torch.")


def finish(setup: Setup, folder: Path, dtype: str, reporter: Reporter) -> tuple[float, float, int]:
    """export's files beside the trained weights (config.json, tokenizer, longrope.json, model card), then export's
    reload check: DIR loaded plainly against the same weights with the factors installed by longrope."""
    reporter.phase(f"writing {folder}: config.json with rope_type longrope, tokenizer, model card")
    export.write_files(setup.factors, setup.factors_file, setup.src, folder, setup.model_type, weights=False)
    doc = json.loads((folder / "config.json").read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in doc] or ["torch_dtype"]
    atomic_write_text(folder / "config.json", json.dumps({**doc, **{k: dtype for k in keys}}, indent=2) + "\n")
    length = setup.factors.rope.original_length + reload_check.LONG_VERIFY_MARGIN
    reporter.phase(f"checking {folder}: reloading it with plain transformers and comparing logits with longrope's RoPE")
    device = default_device() if setup.config.model.device == "auto" else setup.config.model.device
    long_diff, short_diff, _ = reload_check.verify_export(folder, folder, setup.factors, n_hat=0, length=length,
                                                    device=device, options=setup.options)
    if not max(long_diff, short_diff) <= 1e-4:
        raise ExportError(f"verification failed: {folder} differs from its weights under longrope's RoPE by "
                          f"{max(long_diff, short_diff):.3g} in logits; do not use it, and report this with your "
                          "transformers version.")
    return long_diff, short_diff, length


def clean_up(folder: Path, keep_checkpoints: bool) -> None:
    """A finished fine-tune's staging copy and (unless kept) its checkpoints, optimizer states and all, removed."""
    shutil.rmtree(folder / START_DIR, ignore_errors=True)
    if not keep_checkpoints:
        shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)


def model_card_note(result: FinetuneResult) -> str:
    return (f"\n## Fine-tuning\n\nFine-tuned by `longrope finetune` ({result.method}) for {result.steps} steps "
            f"({result.tokens:,} tokens) with these factors installed: rows of {result.length} tokens, and "
            f"{result.short_share:.0%} of the blocks rows of {result.short_length} tokens (the short factors); training "
            f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}. Base run: `{result.run}`.\n")


def run_finetune(config: Config | None, out: Path | None, resume: bool = False, overrides: list[str] | None = None,
                 reporter: Reporter = SILENT) -> FinetuneResult:
    """Start (config, out) or continue (`resume`, out) a fine-tune; returns its result. A finished one is returned as
    it is. Every check of the inputs runs before anything is written or loaded."""
    reporter = reporter if is_main_process() else SILENT
    if out is None:
        raise ConfigError("pass --out with the folder the fine-tuned model goes to (or --resume with one).")
    folder = Path(out).absolute()
    notes: list[str] = []
    if resume:
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(f"{folder} holds no fine-tune (no {CONFIG_FILE}); pass the folder a fine-tune wrote.")
        if not is_finetune(folder):
            raise CheckpointError(f"{folder} holds a search, not a fine-tune; continue it with `longrope search --resume "
                                  f"{folder}`, or fine-tune it with `longrope finetune {folder} --out DIR`.")
        config, notes = resume_config(folder, overrides or [])
        if is_trained(folder):
            reporter.note(f"{folder} is finished; nothing to resume")
            if is_main_process():
                clean_up(folder, config.finetune.keep_checkpoints)  # a kill between the result and the clean-up
            return load_result(folder)
    else:
        if config is None:
            raise ConfigError("a new fine-tune needs a config (the run and the finetune settings).")
        check_new_folder(folder)
        config = absolute_paths(config.model_copy(update={"output": config.output.model_copy(update={"dir": str(folder)})}))
    setup = training_setup(config)
    with contextlib.ExitStack() as stack:
        claim = stack.enter_context(claimed(folder, create=not resume)) if is_main_process() else None
        if claim is not None and (not resume or notes):
            write_resolved_config(folder, config, claim)
        if claim is not None and not resume:
            claim.write_text(LOG_FILE, "")  # a log a killed start left (no work in it) begins again
        if claim is not None and not setup.factors_file.is_file():  # a baseline's factors, kept with the fine-tune
            claim.track(setup.factors_file.name)
            setup.factors.save(setup.factors_file)
        reporter.phase(f"reading and tokenising {setup.corpus.source} for {setup.config.finetune.steps} steps of "
                       f"{setup.batch_tokens} tokens")
        tokenizer = load_tokenizer(str(setup.src), setup.options)
        stream, layout = training_data(setup, tokenizer)
        log_path = folder / LOG_FILE
        start = folder / START_DIR
        if resume:
            check_factors_unchanged(setup, start)
            check_checkpoints(folder)
        if claim is not None:
            remove_temps(folder)
            checkpoint.ensure_log_line_end(log_path)
            if resume:
                checkpoint.append_log(log_path, {"event": "resume", "changes": notes})
            else:
                checkpoint.append_log(log_path, {"event": "start", "fingerprint": {
                    "run": str(setup.config.finetune.run), "factors": setup.factors.factors, "model": str(setup.src),
                    "corpus": corpus_identity(setup.corpus), "tokens": layout.tokens,
                    "tokenizer": data.tokenizer_fingerprint(tokenizer)}})
            claim.keep()  # the fine-tune exists: a failure from here on leaves it to be resumed
        return _train(setup, folder, stream, layout, reporter)


def _train(setup: Setup, folder: Path, stream: data.TokenStream, layout: packing.Plan,
           reporter: Reporter) -> FinetuneResult:
    f = setup.config.finetune
    start, log_path = folder / START_DIR, folder / LOG_FILE
    args = training_arguments(setup, folder)  # under torchrun this joins the processes (accelerate)
    with args.main_process_first(local=False, desc="writing the start model"):
        if is_main_process():
            reporter.phase(f"exporting {setup.installed} into {start} (the model training starts from)")
            write_start(setup, start)
    reporter.phase(f"loading {start} with plain transformers (rope_type {hf_config.METHOD_ROPE_TYPES[setup.factors.method]})")
    set_seed(f.seed)
    model = load_start_model(setup, start)
    resume_from = latest_checkpoint(folder, clean=is_main_process(), reporter=reporter)
    done = int(resume_from.name.split("-")[-1]) if resume_from is not None else 0
    logger = _Logger(log_path, reporter, setup.batch_tokens)
    trainer = _PlannedOrder(model=model, args=args, train_dataset=packing.PackedBlocks(stream, layout),
                            data_collator=packing.one_block, callbacks=[logger])
    trainer.remove_callback(PrinterCallback)  # the reporter shows the steps; log.jsonl keeps them
    reporter.train_start(f.steps, done, (
        f"fine-tuning {setup.config.model.name} ({f.method}) with {setup.installed}: {f.steps} steps of "
        f"{setup.batch_tokens} tokens, rows of {setup.length} tokens"
        + (f" and {f.short_share:.0%} of the blocks rows of {setup.short_length} (short factors)" if f.short_share else "")
        + (f"; resuming after step {done}" if done else "")))
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    seconds = time.perf_counter() - began
    reporter.stop()
    if logger.diverged is not None:
        raise _diverged(setup, folder, logger.diverged)
    _, dtype = save_model(trainer, setup, folder)
    if is_main_process():
        checkpoint.append_log(log_path, {"event": "trained", "seconds": seconds})
        result = _written(setup, folder, stream, layout, dtype, reporter)
    trainer.accelerator.wait_for_everyone()  # under torchrun: the other processes return once the model is checked
    return result if is_main_process() else load_result(folder)


def _diverged(setup: Setup, folder: Path, diverged: tuple[int, float, float | None]) -> ConfigError:
    """A fine-tune whose loss or gradient norm stopped being finite: its checkpoints from that step on removed (our
    own, written after the weights went bad), no model written; the error names the step and the fix."""
    step, loss, norm = diverged
    if is_main_process():
        remove_from(folder, step)
        checkpoint.append_log(folder / LOG_FILE, {"event": "diverged", "step": step, "loss": loss, "grad_norm": norm})
    kept = latest_checkpoint(folder, clean=False)
    where = f"the checkpoint before it, {kept}, is kept" if kept is not None else "no checkpoint came before it"
    shown = "not computed" if norm is None else f"{norm:g}"
    return ConfigError(f"the fine-tune diverged at step {step} (loss {loss:g}, gradient norm {shown}); no model was "
                       f"written and {where}; start again in a new --out with a lower finetune.learning_rate (now "
                       f"{setup.config.finetune.learning_rate:g}) or more finetune.warmup_steps.")


def _written(setup: Setup, folder: Path, stream: data.TokenStream, layout: packing.Plan, dtype: str,
             reporter: Reporter) -> FinetuneResult:
    """The main process's part after training: export's files and check, the result, the clean-up."""
    f, log_path = setup.config.finetune, folder / LOG_FILE
    long_diff, short_diff, length = finish(setup, folder, dtype, reporter)
    losses = logged_losses(log_path)
    result = FinetuneResult(
        run=str(f.run) if f.factors == "run" else setup.installed, model=setup.config.model.name, out=str(folder), method=f.method,
        target_length=setup.factors.target_length, length=setup.length, short_length=setup.short_length,
        steps=f.steps, tokens=layout.trained_tokens, short_share=float(layout.short.mean()) if layout.blocks else 0.0,
        long_rows_share=packing.long_rows_share(stream, layout),
        losses=[losses.get(s, math.nan) for s in range(1, f.steps + 1)], seconds=logged_seconds(log_path),
        max_abs_diff=long_diff, short_max_abs_diff=short_diff, verify_length=length, versions=software_versions())
    card = folder / export.CARD_FILE
    atomic_write_text(card, card.read_text() + model_card_note(result))
    result.save(folder / FINETUNE_FILE)  # last: the fine-tune is finished
    checkpoint.append_log(log_path, {"event": "done", "losses": [result.first_loss, result.last_loss]})
    clean_up(folder, f.keep_checkpoints)
    reporter.stop()
    return result
