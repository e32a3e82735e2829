"""The search config: YAML schema with defaults, `key=value` overrides, lengths like `256k` or `8x`.

Validated by pydantic when loaded, every problem reported at once in one line, unknown keys named with
the nearest valid key. Cross-field checks that need the model (target longer than the window) live in
`search.py`, which knows the model's original length. Files with stages: stages_file.py.

Over 450 lines: five sections of documented keys, one home for every default and bound.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from longrope_search.errors import ConfigError

DEFAULT_TARGET = "8x"  # a long search without search.target
DEFAULT_SHORT_TARGET = "1x"  # a short-context search without search.target

# Positions per lm_head + log-softmax chunk of the fitness. With the two (chunk, vocab) fp32 buffers reused across
# chunks, 1024 rows are as fast as 2048 and ~7% faster than 512 (2 CPU threads, 32k vocab), for 256 MB of buffers.
DEFAULT_CHUNK_SIZE = 1024
# Positions per MLP slice: (16384, intermediate) GEMMs still run at full speed on a GPU.
DEFAULT_MLP_CHUNK = 16384

MIN_STEP = 1e-6  # the finest factor grid search.step may set

# Early rejection's margin in nats per sample (see search.race_margin); measured in README ("Search efficiency").
DEFAULT_RACE_MARGIN = 0.05

# The initial population's seed margin in nats (search.seed_margin): a whole search improves on its best seed by
# about 0.02 nats on both shipped models, so a seed 0.1 behind cannot breed the winner (docs/search-cost.md).
DEFAULT_SEED_MARGIN = 0.1

# Multi-fidelity scoring (search.screen_windows, search.screen_keep): measured in docs/search-cost.md.
DEFAULT_SCREEN_WINDOWS = 2
DEFAULT_SCREEN_KEEP = 0.5

# The joint fitness (search.fitness: joint): needles per search window and the answers' weight, chosen by measurement
# on both shipped models (docs/retrieval.md).
DEFAULT_NEEDLES = 4
DEFAULT_NEEDLE_WEIGHT = 0.25

# The paper's n_hat candidates (LongRoPE, section 4.1); those not below the window are dropped at search time.
PAPER_N_HAT = [0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256]

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?|x)\s*$")


MAX_COUNT = 100_000  # population, generations, ...: a search of that many evaluations per generation never ends
MAX_FACTOR = 1e6  # a rescale factor beyond this turns every rotation into a constant (and overflows the genes)
MAX_LENGTH = 1 << 30  # 1024m tokens: 500 times LongRoPE's 2048k, far beyond any context a GPU holds


def parse_length(text: str | int, original_length: int | None = None) -> int:
    """'256k' -> 262144 (k = 1024), '2m' -> 2097152, '8x' -> 8 * original_length, '4096' -> 4096."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ConfigError(f"length {text} is not a positive number of tokens; write e.g. 4096, 256k or 8x.")
        text = str(text)
    match = _LENGTH.match(str(text))
    if not match:
        raise ConfigError(f"cannot read length {text!r}; write it as 4096, 256k, 2m or 8x (times the original window).")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "x":
        if original_length is None:
            raise ConfigError(f"length {text!r} is relative to the model's window, which is unknown here; give tokens.")
        tokens = int(round(number * original_length))
    else:
        tokens = int(round(number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]))
    if tokens < 1:
        raise ConfigError(f"length {text!r} is {tokens} tokens; a length must be at least 1 token (e.g. 4096, 256k or 8x).")
    if tokens > MAX_LENGTH:
        raise ConfigError(f"length {text!r} is {tokens:,} tokens, more than the {format_length(MAX_LENGTH)} ({MAX_LENGTH:,}) "
                          "tokens any model here can be extended to; give a length such as 256k or 2m.")
    return tokens


def format_length(tokens: int) -> str:
    """The inverse of parse_length (k = 1024): 4096 -> 4k, 2097152 -> 2m; others as plain numbers."""
    for unit, size in (("m", 1024 * 1024), ("k", 1024)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def check_length(text: str | int) -> str | int:
    """Syntax check for a config field; the window, needed for '8x', is known only later (a window of 2^20 tokens
    stands in for it: only a length of no tokens at all is refused here)."""
    try:
        parse_length(text, original_length=1 << 20)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return text


# dtype names as people write them (transformers, lm-evaluation-harness, torch) -> the one the config stores
DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def canonical_dtype(name: str, where: str = "model.dtype") -> str:
    """bf16, fp16, half, torch.float32, ... -> bfloat16, float16, float32 (or auto); a name no one means, one line."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ConfigError(f"{where} {name!r} is not a dtype; use bf16, fp16, fp32 (or bfloat16, float16, float32), "
                          "or auto.")
    return DTYPE_NAMES[key]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    name: str = "builtin:tiny"  # local directory, hub id, or builtin:NAME
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: cuda when available
    # The context the model was trained on, when its config says otherwise (Mistral-7B-v0.1 declares
    # 32768 positions but was trained on 8192). None: original_max_position_embeddings or max_position_embeddings.
    original_length: int | None = Field(None, ge=2)
    revision: str | None = None  # hub models: a branch, tag or commit, for config, tokenizer and weights
    trust_remote_code: bool = False  # run model code shipped in a hub repository (only for repositories you trust)
    attn_implementation: str = "auto"  # auto: flash_attention_2 on CUDA when installed, else sdpa; or eager, sdpa
    # auto (or balanced, sequential): accelerate spreads the layers over the visible GPUs, for a model larger than
    # one GPU (eval and export's check; a search keeps one model per GPU). null: the whole model on model.device.
    device_map: str | None = None

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:  # bf16, fp16, ... as written; an unknown name gets the list of choices
        return DTYPE_NAMES.get(str(value).strip().lower().removeprefix("torch."), value)


class DataSection(Section):
    source: str = "builtin:cpython"  # builtin:NAME | hub:NAME | local path or glob (.txt, .jsonl, .parquet)
    hub_config: str | None = None
    revision: str | None = None  # hub only: a commit, tag or branch; pin it so reruns read the same books
    split: str = "validation"
    text_field: str = "text"
    concatenate: bool = False  # join short documents with EOS to reach the length
    samples: int = Field(5, ge=1)  # the paper: 5 PG19 books (3 for >= 512k)
    heldout_samples: int = Field(8, ge=0)  # disjoint documents the final numbers are reported on (the test set)
    # further documents that choose the winner among the best candidates and stop a search that stopped generalising
    validation_samples: int = Field(4, ge=0)
    seed: int = Field(0, ge=0)
    cache_dir: str | None = None  # tokenised samples; default $LONGROPE_CACHE or ~/.cache/longrope


# `method: longrope2` fills these in wherever the config does not set them (LongRoPE2, arXiv:2502.20082: needle-
# driven fitness, the critical dimension, a searched attention factor; P=64 with an initial population of 2P,
# 60 iterations, 16 mutations, 16 crossovers, 32 parents; no n_hat).
LONGROPE2 = {"fitness": "needle", "critical_dim": "auto", "mscale": "search", "n_hat": [0], "population": 128,
             "generations": 60, "parents": 32, "mutations": 16, "crossovers": 16}


class SearchSection(Section):
    # longrope: the paper's search (LongRoPE, 2024); longrope2: the LONGROPE2 settings as defaults
    method: Literal["longrope", "longrope2"] = "longrope"
    target: str | int | None = None  # 256k, 2m, 131072, or 8x the window; None: 8x (1x with short: true)
    # joint (a long search's default): each window holds `needles` numbers asked at its end; the score is the text's
    # mean NLL plus needle_weight times the answers' (docs/retrieval.md). ppl: perplexity of whole windows
    # (the paper's v1; a short search's default). needle: the answers' loss alone (LongRoPE2's needle-driven PPL).
    fitness: Literal["joint", "ppl", "needle"] = "joint"
    needles: int = Field(DEFAULT_NEEDLES, ge=1, le=16)  # numbers hidden in each window (joint, needle), all asked
    needle_weight: float = Field(DEFAULT_NEEDLE_WEIGHT, ge=0.0, allow_inf_nan=False)  # joint: the answers' weight
    # joint: the seeds are scored first, and when none finds the answers better than chance (the model retrieves
    # nothing at the target) the answers get weight 0: their loss is noise the search would fit (docs/search-cost.md)
    needle_check: bool = True
    # LongRoPE2's critical dimension: adds seeds on NTK-style curves that reach the scale at this pair (and at 1.1-1.5
    # times it) and widens the space to 2 * scale; every pair is still searched and every seed kept. auto: the
    # paper's value from the model's base and window; a list: one search per value, the best by held-out fitness.
    critical_dim: int | list[int] | Literal["auto"] | None = None
    # The paper's budget; the caps only refuse values no search could finish (MAX_COUNT)
    population: int = Field(64, ge=2, le=MAX_COUNT)  # P
    generations: int = Field(40, ge=0, le=MAX_COUNT)  # T
    parents: int = Field(32, ge=1, le=MAX_COUNT)  # top-k kept each generation
    mutations: int = Field(16, ge=0, le=MAX_COUNT)  # N1
    crossovers: int = Field(16, ge=0, le=MAX_COUNT)  # N2
    mutation_prob: float = Field(0.3, ge=0.0, le=1.0, allow_inf_nan=False)  # p, also crossover's gene swap probability
    # Early rejection: a new candidate is scored sample by sample and stops once its mean NLL is this many nats above
    # the worst parent's on the same samples (it could not become a parent). 0: every candidate scored in full.
    race_margin: float = Field(DEFAULT_RACE_MARGIN, ge=0.0, allow_inf_nan=False)
    # Multi-fidelity scoring (successive halving inside a generation): every new candidate is scored on the first
    # screen_windows search windows, and only the screen_keep fraction of its batch with the lowest loss there on the
    # rest; the others are stopped early. 0: every candidate on every window. The seeds are always scored in full.
    screen_windows: int = Field(DEFAULT_SCREEN_WINDOWS, ge=0)
    screen_keep: float = Field(DEFAULT_SCREEN_KEEP, gt=0.0, le=1.0, allow_inf_nan=False)
    # Generalisation (data.validation_samples): score the best-so-far on the validation samples every this many
    # generations (0: only at the end), pick the winner as the validation best among the select_top best candidates
    # by search score (1: the search's best), and stop once validation has not improved for `patience` validations
    # (0: run every generation).
    validate_every: int = Field(1, ge=0)
    select_top: int = Field(4, ge=1)
    patience: int = Field(0, ge=0)
    # None: 1.25 * scale (the paper); 2 * scale with critical_dim
    max_factor: float | None = Field(None, gt=1.0, le=MAX_FACTOR, allow_inf_nan=False)
    # the factor grid; finer than MIN_STEP changes no factor measurably and overflows the integer genes
    step: float = Field(0.01, ge=MIN_STEP, allow_inf_nan=False)
    monotonic: bool = True  # factors non-decreasing with the rotary pair index
    n_hat: list[int] = Field(default_factory=lambda: list(PAPER_N_HAT))
    # The attention factor. Long search, auto: sqrt(1 + ln s / ln L), transformers' default; keep: the factor of what
    # it builds on (init_from's, or the one a fine-tuned model was trained with). Short search (runtimes apply one
    # factor to short and long inputs), auto: lowered toward 1 as far as the long set's PPL at its target allows
    # (long_tolerance); keep: the long set's factor unchanged. search: one more gene of the search, 0.01 grid (LongRoPE2).
    mscale: float | Literal["auto", "keep", "search"] = "auto"
    long_tolerance: float = Field(0.02, ge=0.0, lt=1.0, allow_inf_nan=False)  # short search: allowed rise of the long PPL, 0.02 = 2%
    # yarn-family: 11 more YaRN vectors, the ramp's ends moved by octaves of rotations (rope.YARN_FAMILY); in the
    # default because they retrieve better than YaRN itself on the shipped Llama (docs/retrieval.md)
    seeds: list[Literal["none", "pi", "ntk", "yarn", "yarn-family"]] = Field(
        default_factory=lambda: ["pi", "ntk", "yarn", "yarn-family"])
    # The initial population: a number: the seeds are scored first, and only those within this many nats (log PPL)
    # of the best seed join it and breed its mutants (a far-behind seed breeds only losers); null: every seed and
    # mutants of every seed (the paper).
    seed_margin: float | None = Field(DEFAULT_SEED_MARGIN, ge=0.0, allow_inf_nan=False)
    init_factors: str | None = None  # a factors.json (or a microsoft/LongRoPE factor CSV) whose factors join the initial population
    # Progressive extension: a run directory (or factors.json) whose long factors the model already runs
    # with; this search multiplies its own factors onto them. A LongRoPE-extended model needs none.
    init_from: str | None = None
    # Short-context readjustment: search the factor set used when the input fits the original window,
    # on the extended model (init_from), scored at `target` (default 1x) under the shared mscale.
    short: bool = False
    seed: int = Field(0, ge=0)
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1)  # positions per lm_head + loss chunk
    mlp_chunk: int = Field(DEFAULT_MLP_CHUNK, ge=0)  # positions per MLP chunk: exact, cuts L x intermediate memory; 0: whole
    # Ranks that score one sample together under torchrun, each holding 1/N of its positions (PyTorch's ring
    # attention): for sequences one GPU cannot hold. Must divide the number of processes; 1: off.
    context_parallel: int = Field(1, ge=1)

    _target = field_validator("target")(classmethod(lambda cls, v: v if v is None else check_length(v)))

    @property
    def target_or_default(self) -> str | int:
        """The target as written, or the default: 8x for a long search, 1x for a short-context one."""
        if self.target is not None:
            return self.target
        return DEFAULT_SHORT_TARGET if self.short else DEFAULT_TARGET

    @field_validator("n_hat")
    @classmethod
    def _n_hat(cls, values: list[int]) -> list[int]:
        if not values or any(v < 0 for v in values):
            raise ValueError("n_hat needs at least one value, all >= 0 (use [0] to switch it off)")
        return sorted(set(values))

    @field_validator("mscale")
    @classmethod
    def _mscale(cls, value: float | str) -> float | str:
        if value not in ("auto", "keep", "search") and not (math.isfinite(value) and value > 0):
            raise ValueError(f"mscale must be a finite positive number, 'auto', 'keep' or 'search' (got {value})")
        return value

    @field_validator("critical_dim")
    @classmethod
    def _critical_dim(cls, value: int | list[int] | str | None) -> int | list[int] | str | None:
        values = value if isinstance(value, list) else [value] if isinstance(value, int) else []
        if isinstance(value, list) and not value:
            raise ValueError("critical_dim needs at least one value in a list (or auto, or one number)")
        if any(v < 0 for v in values):
            raise ValueError("critical_dim counts rotary pairs: use 0 or more (or auto)")
        return sorted(set(value)) if isinstance(value, list) else value

    @model_validator(mode="before")
    @classmethod
    def _method_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") == "longrope2":
            data = {**LONGROPE2, **data}
        if isinstance(data, dict) and "fitness" not in data and data.get("short"):
            data = {**data, "fitness": "ppl"}  # short inputs: plain perplexity, a window too short for needles
        return data

    @model_validator(mode="after")
    def _budget(self) -> "SearchSection":
        if self.parents > self.population:
            raise ValueError(f"parents ({self.parents}) cannot exceed population ({self.population})")
        if self.generations > 0 and self.mutations + self.crossovers == 0:
            raise ValueError("mutations + crossovers must be > 0 when generations > 0")
        if self.short and (self.mscale == "search" or self.critical_dim is not None or self.fitness != "ppl"):
            raise ValueError("a short-context search has its own space, fitness (ppl) and attention-factor fit; drop "
                             "mscale: search, critical_dim and fitness (method longrope2 sets them) for --short")
        return self

    @property
    def sweep(self) -> list[int]:
        """The critical dimensions of an outer sweep (a list of several), else empty."""
        return self.critical_dim if isinstance(self.critical_dim, list) and len(self.critical_dim) > 1 else []


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")
RopeFactors = Literal["run", "yarn", "pi", "ntk"]  # a run's searched factors, or a baseline as transformers runs it


class FinetuneSection(Section):
    """`longrope finetune` and finetune stages: train the model with a run's factors installed (finetune.py)."""

    run: str | None = None  # the search run whose factors the model trains with (the CLI's RUN; a stage: the one before)
    # What RoPE is installed: run (the run's searched factors), or a baseline as transformers runs it at `target`
    # (yarn: rope_type yarn; pi: linear; ntk: rope_theta scaled), for the same training with another method
    factors: RopeFactors = "run"
    target: str | int | None = None  # a baseline's target length (8x, 32k); None: the run's target
    # The training corpus, read like data.source (builtin:NAME | hub:NAME | local files). Never the corpus the search
    # and eval score on: builtin:cpython-train is the shipped model's training files, builtin:cpython its held-out ones.
    source: str = "builtin:cpython-train"
    hub_config: str | None = None
    revision: str | None = None  # hub only: pin the dataset commit so a resume reads the same text
    split: str = "train"  # hub only
    text_field: str = "text"
    seed: int = Field(0, ge=0)  # document order, LoRA's initialisation and the trainer's seed
    length: str | int | None = None  # tokens of a long row (256k, 8x); None: the run's target
    # Share of the blocks whose rows fit the original window: they train the short factors, the others the long ones
    # (LongRoPE2's mixed context window; it sampled 1B short tokens of 10B). 0: long rows only (LongRoPE).
    short_share: float = Field(0.1, ge=0.0, le=1.0, allow_inf_nan=False)
    short_length: str | int | None = None  # tokens of a short row; None: the original window
    steps: int = Field(100, ge=1)  # optimizer steps
    # Tokens per optimizer step over all processes (256k, 8m); a multiple of rows x length x processes (the rest is
    # gradient accumulation). None: one block per process per step.
    batch_tokens: str | int | None = None
    rows: int = Field(1, ge=1)  # long rows per forward pass and process (a short block holds the same tokens)
    learning_rate: float = Field(2e-5, gt=0.0, allow_inf_nan=False)  # the paper, for LLaMA2
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after the warm-up; the paper: linear decay
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, ge=0.0, allow_inf_nan=False)  # 0: no clipping
    method: Literal["full", "lora"] = "full"  # lora: peft adapters (pip install longrope[lora]), merged before export
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0.0, allow_inf_nan=False)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    lora_targets: str | list[str] = "all-linear"  # peft's target_modules: all-linear, or module names (q_proj, ...)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 mixed precision on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: far less memory, ~30% slower
    # Under torchrun: transformers' fsdp option (e.g. "full_shard auto_wrap"); empty: each process holds the model (DDP).
    fsdp: str = ""
    # Processes that train one sequence together (accelerate's context parallelism, FSDP2, SDPA); 1: off.
    context_parallel: int = Field(1, ge=1)
    save_every: int = Field(50, ge=1)  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: bool = False  # keep checkpoints/ (optimizer state included) once the model is written and verified
    # where the Trainer also logs the run: none, or its integrations (tensorboard, wandb, mlflow, ...; a list or "all")
    report_to: str | list[str] = "none"
    drop_n_hat: bool = False  # train factors searched with n_hat > 0 without it (no runtime can run n_hat)

    _lengths = field_validator("length", "short_length", "batch_tokens", "target")(
        classmethod(lambda cls, v: v if v is None else check_length(v)))

    @model_validator(mode="after")
    def _combinations(self) -> "FinetuneSection":
        unknown = sorted(set(self.fsdp.split()) - set(FSDP_OPTIONS))
        if unknown:
            raise ValueError(f"finetune.fsdp {self.fsdp!r}: {', '.join(unknown)} is not one of transformers' fsdp options "
                             f"({', '.join(FSDP_OPTIONS)}); e.g. \"full_shard auto_wrap\"")
        if self.target is not None and self.factors == "run":
            raise ValueError("finetune.target sets a baseline's target (finetune.factors yarn, pi or ntk); the run's "
                             "factors have their own: drop it")
        if self.method == "lora" and self.fsdp.strip():
            raise ValueError("finetune.method lora runs each process with the whole model (DDP): drop finetune.fsdp, "
                             "or use method full with fsdp")
        if self.context_parallel > 1 and self.method == "lora":
            raise ValueError("finetune.context_parallel needs FSDP (method full); LoRA runs each process with the "
                             "whole model")
        return self


class OutputSection(Section):
    dir: str | None = None  # default runs/<model>-<target>


class Config(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    search: SearchSection = SearchSection()
    finetune: FinetuneSection = FinetuneSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _validation_set(self) -> "Config":
        s = self.search
        if self.data.validation_samples == 0 and (s.select_top > 1 or s.patience > 0):
            raise ValueError(f"search.select_top {s.select_top} and search.patience {s.patience} choose with the "
                             "validation samples, but data.validation_samples is 0; set it above 0, or set "
                             "search.select_top: 1 and search.patience: 0")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- loading ------------------------------------------------------------------------------------------


# The ready configs: installed inside the package (pyproject maps the top-level configs/ there), or a checkout's own.
PACKAGE_ROOT = Path(__file__).resolve().parent
CONFIG_DIRS = (PACKAGE_ROOT / "configs", PACKAGE_ROOT.parent / "configs")


def packaged_configs() -> dict[str, Path]:
    """name (tiny, llama2-7b, ...) -> the shipped config file, from the first folder that has any."""
    for folder in CONFIG_DIRS:
        found = {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
        if found:
            return found
    return {}


def find_config(path: str | Path) -> Path:
    """A config file: the path itself when it exists, else a shipped config by name (`tiny` or `tiny.yaml`, also
    `configs/tiny.yaml` from any folder once installed). A path that matches neither is returned as it is, so the
    error names what the user wrote."""
    path = Path(path)
    if path.exists():
        return path
    shipped = packaged_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and (len(path.parts) == 1 or path.parent.name == "configs"):
        return shipped[name]
    return path


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` (the unknown key's parent)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(error: dict) -> str:
    loc = tuple(str(p) for p in error["loc"])
    where = ".".join(loc) or "config"
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(Config, loc)
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
        return f"{where}: unknown key ({hint})"
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    if error["type"] in ("model_type", "dict_type"):
        message = "must be a mapping of keys"
    if error["type"] == "value_error":
        return f"{where}: {message}" if loc else message  # a check across sections names its keys itself
    return f"{where}: {message} (got {error.get('input')!r})"


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass --config with a YAML file (see configs/), or "
                          f"--resume {path} to continue a run.")
    if not path.is_file():
        names = ", ".join(packaged_configs()) or "none found"
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file or a shipped config's "
                          f"name ({names}).")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8); pass --config with a YAML file (see configs/).") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}); check its permissions.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError(f"{path}: {problem}{where}; fix the YAML syntax.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with model/data/search/output sections.")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`search.generations=10` style overrides; values parsed as YAML (10 -> int, [0,4] -> list)."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value; write e.g. search.generations=10.")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section.")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it or fix the brackets.") from None
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw = read_yaml(path) if path is not None else {}
    if "stages" in raw:
        raise ConfigError(f"{path} has stages; run it with `longrope search --config {path}`, or give this command "
                          "a single-stage config or one stage's run directory.")
    return from_dict(apply_overrides(raw, overrides or []), source=str(path or "config"))
