"""Plan a search before renting GPUs: weights and activation memory of one evaluation, the mode that fits
(whole MLP, chunked MLP, context parallelism over k GPUs), and the time of one evaluation and of the budget.

Memory follows what the fitness forward holds at once (measured with `memory.measure_peak`); time is
FLOPs over an assumed achieved TFLOP/s per GPU, which is the number to correct with a measurement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from longrope_search.attention import attention_grid
from longrope_search.config import DEFAULT_CHUNK_SIZE, DEFAULT_MLP_CHUNK, DEFAULT_TARGET, Config, load_config, parse_length
from longrope_search.errors import ConfigError, ModelError
from longrope_search.rope import longrope_mscale
from longrope_search.stages_file import has_stages, load_stages, non_search_stages
from longrope_search.shapes import ModelShape, model_shape

GB = 1e9
# CUDA context, cuBLAS workspaces and allocator fragmentation take the rest of a GPU's memory.
USABLE_FRACTION = 0.9
# Assumed achieved bf16 TFLOP/s of one H100/H200 on this workload (FlashAttention-2 forward reaches
# roughly 40-50% of the 989 TFLOP/s dense peak at long sequences); measure and pass --tflops.
DEFAULT_TFLOPS = 400.0
PAPER_LONG = 512 * 1024  # from here the paper halves P, N1, N2 and scores 3 books instead of 5


@dataclass(frozen=True)
class Budget:
    """Evaluations of a search: the initial population, then N1 + N2 new candidates per generation."""

    population: int
    generations: int
    per_generation: int
    # the share of a full evaluation's forward passes a new candidate costs on average: with multi-fidelity scoring
    # (search.screen_windows w of the n windows, screen_keep k of a batch on the rest) w/n + k (n-w)/n; else 1
    share: float = 1.0

    @property
    def evaluations(self) -> int:
        return self.population + self.generations * self.per_generation

    def rounds(self, parallel: int) -> float:
        """Batches of `parallel` concurrent full evaluations; a generation waits for its slowest rank."""
        return self.share * (math.ceil(self.population / parallel)
                             + self.generations * math.ceil(self.per_generation / parallel))


def attention_fit_budget(long_length: int, original_length: int) -> Budget:
    """Long-set evaluations of a short search's attention-factor fit on one worker: the long set's own
    mscale, 1.0, then a bisection of the grid between them (search.fit_attention)."""
    grid = attention_grid(longrope_mscale(long_length / original_length, original_length))
    return Budget(2 + math.ceil(math.log2(max(len(grid) - 1, 1))), 0, 0)


def paper_budget(target_length: int) -> Budget:
    """P=64, T=40, N1=N2=16 up to 256k; P, N1, N2 halved from 512k (paper, section 4.1)."""
    return Budget(32, 40, 16) if target_length >= PAPER_LONG else Budget(64, 40, 32)


def paper_samples(target_length: int) -> int:
    return 3 if target_length >= PAPER_LONG else 5


def samples_advice(samples: int, target_length: int) -> str:
    """How many search windows a target needs, and why: `longrope plan`'s "search samples" line."""
    return (f"{samples} (the paper: {paper_samples(target_length)} at this length); each is a forward pass of every "
            "candidate, so time grows in proportion; too few and the winner fits them instead of long context, "
            "which data.validation_samples (other documents, default 4) catches")


def search_inputs(config: Config, model: str | None = None, shape: ModelShape | None = None
                  ) -> tuple[ModelShape, int, int, Budget]:
    """(shape, target length, samples, budget) of a search Config; `model` replaces the config's model,
    `shape` the reading of it (a stage whose fine-tuned model does not exist yet has its base's shape)."""
    shape = shape or model_shape(model or config.model.name)
    if config.model.original_length is not None:
        shape = replace(shape, original_length=config.model.original_length)
    s = config.search
    windows = config.data.samples
    share = (s.screen_windows + s.screen_keep * (windows - s.screen_windows)) / windows \
        if 0 < s.screen_windows < windows else 1.0
    budget = Budget(s.population, s.generations, s.mutations + s.crossovers, share)
    return shape, parse_length(s.target_or_default, shape.original_length), config.data.samples, budget


@dataclass(frozen=True)
class PlannedSearch:
    """One search a command asks to plan, with what `estimate` needs beyond the hardware."""

    title: str
    shape: ModelShape
    length: int
    samples: int | None = None  # the config's data.samples; None: the paper's for the length
    budget: Budget | None = None  # None: the paper's
    mlp_chunk: int = DEFAULT_MLP_CHUNK  # compared even when the config switches chunking off
    loss_chunk: int = DEFAULT_CHUNK_SIZE
    note: str | None = None


def planned_searches(config_path: Path | None, model: str | None, target: str | None) -> list[PlannedSearch]:
    """The searches `longrope plan` estimates: a preset or model at a target, a config's search, or each stage of a
    config with stages (plus a short stage's attention-factor check on the long set)."""
    if config_path is None and model is None:
        raise ConfigError("pass --config with a search YAML or --model with a preset, model directory or hub id.")
    if config_path is None:
        shape = model_shape(model)
        return [PlannedSearch("longrope plan", shape, parse_length(target or DEFAULT_TARGET, shape.original_length))]
    if not has_stages(config_path):
        config = load_config(config_path)
        shape, length, samples, budget = search_inputs(config, model)
        if target is not None:
            length = parse_length(target, shape.original_length)
        return [_planned("longrope plan", shape, length, samples, budget, config)]
    if target is not None:
        raise ConfigError("--target applies to a single-stage config; each stage sets its own search.target.")
    out: list[PlannedSearch] = []
    previous = None  # (name, shape, length) of the last long stage
    tuning = non_search_stages(config_path)  # fine-tunes: no search to plan (the stages after them run the same shape)
    for name, config in load_stages(config_path)[1]:
        if name in tuning:
            continue
        note = None
        try:
            shape, length, samples, budget = search_inputs(config, model)
        except ModelError:
            if previous is None:
                raise
            note = (f"stage {name}: {config.model.name} is not readable yet (a model still to be fine-tuned?); "
                    f"planned with stage {previous[0]}'s model shape")
            shape, length, samples, budget = search_inputs(config, shape=previous[1])
        s = config.search
        if s.short and previous is not None and s.mscale == "auto" and s.long_tolerance > 0:
            fit = attention_fit_budget(previous[2], shape.original_length)
            out.append(_planned(f"stage {name}: attention-factor check at {previous[2]} tokens", previous[1],
                                previous[2], samples, fit, config, note))
            note = None
        out.append(_planned(f"stage {name}", shape, length, samples, budget, config, note))
        if not s.short:
            previous = (name, shape, length)
    return out


def _planned(title: str, shape: ModelShape, length: int, samples: int, budget: Budget, config: Config,
             note: str | None = None) -> PlannedSearch:
    s = config.search
    return PlannedSearch(title, shape, length, samples, budget, s.mlp_chunk or DEFAULT_MLP_CHUNK, s.chunk_size, note)


# --- memory ------------------------------------------------------------------------------------------


def activation_bytes(
    shape: ModelShape, length: int, dtype_bytes: int = 2, flash: bool = True, mlp_chunk: int | None = None,
    loss_chunk: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, int]:
    """Peak bytes of the tensors one fitness forward holds at once, in each phase of a decoder layer and of the loss.

    Terms follow the transformers Llama code path: the embeddings stay referenced by the decoder's forward
    and the layer input by its caller while a layer runs; RMSNorm works on fp32 copies.
    """
    b, n = dtype_bytes, length
    hidden = n * shape.hidden_size * b  # one (L, H) activation
    q = n * shape.num_heads * shape.head_dim * b  # (L, heads * head_dim)
    kv = n * shape.num_kv_heads * shape.head_dim * b  # one of k, v: a layer's KV is 2 * kv
    base = 2 * hidden + 2 * n * shape.rotary_dim * b  # embeddings, layer input, cos and sin
    # rotate q: q, q*cos, rotate_half(q) and its product with sin; then k rotates while q and q_embed live
    rotary = max(4 * q, 2 * q + 3 * kv)
    upcast = 4 if b < 4 else 0  # softmax and cross-entropy copy a bf16/fp16 input to fp32 first
    scores = 0
    if not flash:  # eager, per head: scores, their fp32 copy and softmax; an (L, L) mask; GQA repeats k/v
        scores = shape.num_heads * n * n * (b + upcast + 4) + n * n * b + 2 * (q - kv)
    # after attention: v (all of a fused qkv, which v's view keeps alive), rotated q and k, the output
    # with its contiguous copy, or with o_proj's output
    after = (q + 2 * kv if shape.fused_projections else kv) + q + kv + max(2 * q, q + hidden)
    attention = base + hidden + max(2 * kv + rotary + scores, after)
    norm = base + hidden + n * shape.hidden_size * 8  # residual + the fp32 upcast and its square (or product)
    per_row = (4 if shape.fused_projections else 3) * shape.intermediate_size * b  # gate/up, act, product
    if mlp_chunk is None or mlp_chunk >= n:
        mlp = base + 2 * hidden + n * per_row  # residual, normed input, whole intermediates
    else:  # + the preallocated output, one chunk's intermediates and its output rows
        mlp = base + 3 * hidden + mlp_chunk * (per_row + shape.hidden_size * b)
    loss = hidden + min(loss_chunk, n) * shape.vocab_size * 8  # fp32 logits and their log-softmax
    return {"attention": attention, "norm": norm, "mlp": mlp, "loss": loss}


def _context_parallel_bytes(shape: ModelShape, length: int, k: int, dtype_bytes: int, flash: bool, mlp_chunk: int,
                            loss_chunk: int) -> int:
    """Per-GPU activations with the sequence split over k GPUs (ring attention): L/k positions plus
    the K/V blocks of the other ranks in flight (two, so one transfers while the other is used)."""
    part = math.ceil(length / k)
    ring = 2 * 2 * part * shape.num_kv_heads * shape.head_dim * dtype_bytes
    return max(activation_bytes(shape, part, dtype_bytes, flash, mlp_chunk, loss_chunk).values()) + ring


# --- time --------------------------------------------------------------------------------------------


def sample_flops(shape: ModelShape, length: int) -> float:
    """Forward FLOPs of one window: 2 * weights * tokens, plus QK^T and AV (4 L^2 d per layer, halved by the causal mask)."""
    linear = 2.0 * shape.matmul_params * length
    attention = 4.0 * length**2 * shape.num_heads * shape.head_dim * shape.num_layers / 2
    return linear + attention


# --- the plan ----------------------------------------------------------------------------------------

MODES = {
    "fits": "one GPU per evaluation, whole MLP",
    "mlp_chunk": "one GPU per evaluation with MLP chunking (search.mlp_chunk)",
    "context_parallel": "context parallelism: the sequence split over several GPUs",
    "too_big": "does not fit",
}


@dataclass(frozen=True)
class Estimate:
    """Memory, mode and time of one search on given hardware."""

    shape: ModelShape
    target_length: int
    gpus: int
    gpu_mem_gb: float
    dtype_bytes: int
    flash: bool
    samples: int
    budget: Budget
    tflops: float
    mlp_chunk: int
    loss_chunk: int  # search.chunk_size: positions per lm_head + loss chunk
    weights_bytes: int
    activations: dict[str, int]  # phase -> bytes, whole MLP
    activations_chunked: dict[str, int]  # phase -> bytes, MLP in chunks of mlp_chunk positions
    mode: str  # a key of MODES
    gpus_per_eval: int  # context-parallel degree k; 1 unless mode is context_parallel
    per_gpu_bytes: int  # weights + activations in the chosen mode (the smallest found when too_big)
    gpus_needed: int | None  # too_big: GPUs that context parallelism would need, None when none would do
    flops_per_eval: float
    seconds_per_eval: float  # with gpus_per_eval GPUs on it
    search_seconds: float  # the budget with gpus // gpus_per_eval evaluations at once
    notes: list[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gb * GB * USABLE_FRACTION

    def to_json(self) -> dict[str, Any]:
        """`longrope plan --json`: every field (bytes, FLOPs, seconds), the recommendation, and the table's rows."""
        return {**dataclasses.asdict(self), "recommendation": self.recommendation(), "rows": dict(rows(self))}

    @property
    def parallel_evals(self) -> int:
        return self.gpus // self.gpus_per_eval

    def recommendation(self) -> str:
        if self.mode == "fits":
            return f"{MODES['fits']}: {self.parallel_evals} evaluation(s) at once over {self.gpus} GPU(s)."
        if self.mode == "mlp_chunk":
            return (f"{MODES['mlp_chunk']}: set search.mlp_chunk: {self.mlp_chunk}; {self.parallel_evals} "
                    f"evaluation(s) at once over {self.gpus} GPU(s).")
        if self.mode == "context_parallel":
            return (f"{MODES['context_parallel']}: set search.context_parallel: {self.gpus_per_eval} and run under "
                    f"torchrun; {self.parallel_evals} evaluation(s) at once; or lower --target.")
        need = f"about {self.gpus_needed} such GPUs with context parallelism" if self.gpus_needed else "bigger GPUs"
        return f"{MODES['too_big']} on {self.gpus} x {self.gpu_mem_gb:g} GB: it needs {need}, or a lower --target."


def _mode(gpus: int, usable: float, weights: int, whole: int, chunked: int, need: Callable[[int], int],
          seconds_one_gpu: float, budget: Budget) -> tuple[str, int, int, int | None]:
    """(mode, GPUs per evaluation, per-GPU bytes, GPUs needed when too big) for the first mode that fits;
    need(k) is the per-GPU bytes with the sequence split over k GPUs."""
    if weights + whole <= usable:
        return "fits", 1, weights + whole, None
    if weights + chunked <= usable:
        return "mlp_chunk", 1, weights + chunked, None
    if weights > usable:  # longrope loads the whole model on every GPU
        return "too_big", 1, weights + chunked, None

    # a group size must divide the GPUs (torchrun processes) so that every GPU belongs to a group
    feasible = [k for k in range(2, gpus + 1) if gpus % k == 0 and need(k) <= usable]
    if feasible:  # the fastest search; on a tie, the fewest GPUs per evaluation (least communication)
        k = min(feasible, key=lambda k: (budget.rounds(gpus // k) * seconds_one_gpu / k, k))
        return "context_parallel", k, need(k), None
    # need(k) falls as k grows: double past the GPUs at hand, then bisect for the smallest k that fits
    low, high = gpus, 2 * gpus + 1
    while need(high) > usable and high < 1 << 20:
        low, high = high, 2 * high
    if need(high) > usable:
        return "too_big", 1, weights + chunked, None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if need(mid) <= usable else (mid, high)
    return "too_big", 1, weights + chunked, high


def estimate(
    shape: ModelShape,
    target_length: int,
    gpus: int = 1,
    gpu_mem_gb: float = 80.0,
    dtype_bytes: int = 2,
    samples: int | None = None,
    budget: Budget | None = None,
    flash: bool = True,
    tflops: float = DEFAULT_TFLOPS,
    mlp_chunk: int = DEFAULT_MLP_CHUNK,
    loss_chunk: int = DEFAULT_CHUNK_SIZE,
) -> Estimate:
    """Memory, mode and time of a search; samples and budget default to the paper's for the target."""
    problems = [
        f"{what} must be {rule} (got {value})" for what, value, ok, rule in (
            ("--gpus", gpus, gpus >= 1, "at least 1"),
            ("--gpu-mem", gpu_mem_gb, math.isfinite(gpu_mem_gb) and gpu_mem_gb > 0, "a finite positive GB"),
            ("--target", target_length, target_length >= 2, "at least 2 tokens"),
            ("--dtype-bytes", dtype_bytes, dtype_bytes in (1, 2, 4), "1, 2 or 4"),
            ("--tflops", tflops, math.isfinite(tflops) and tflops > 0, "a finite positive number"),
            ("--mlp-chunk", mlp_chunk, mlp_chunk >= 1, "at least 1 position"),
            ("--loss-chunk", loss_chunk, loss_chunk >= 1, "at least 1 position"),
            ("--samples", samples, samples is None or samples >= 1, "at least 1"),
        ) if not ok
    ]
    if problems:
        raise ConfigError(f"{'; '.join(problems)}; fix the value and run longrope plan again.")
    samples = samples or paper_samples(target_length)
    budget = budget or paper_budget(target_length)
    weights = shape.params * dtype_bytes
    whole = activation_bytes(shape, target_length, dtype_bytes, flash, None, loss_chunk)
    chunked = activation_bytes(shape, target_length, dtype_bytes, flash, mlp_chunk, loss_chunk)
    flops = samples * sample_flops(shape, target_length)
    seconds_one_gpu = flops / (tflops * 1e12)
    usable = gpu_mem_gb * GB * USABLE_FRACTION

    def need(k: int) -> int:
        return weights + _context_parallel_bytes(shape, target_length, k, dtype_bytes, flash, mlp_chunk, loss_chunk)

    mode, k, per_gpu, needed = _mode(gpus, usable, weights, max(whole.values()), max(chunked.values()), need,
                                     seconds_one_gpu, budget)
    notes = []
    if mode == "context_parallel":
        notes.append("context parallelism time assumes perfect scaling (no ring communication cost).")
    if not flash:
        notes.append("eager attention holds L x L scores per head; sdpa (the default) or flash-attn needs O(L).")
    return Estimate(
        shape=shape, target_length=target_length, gpus=gpus, gpu_mem_gb=gpu_mem_gb, dtype_bytes=dtype_bytes,
        flash=flash, samples=samples, budget=budget, tflops=tflops, mlp_chunk=mlp_chunk, loss_chunk=loss_chunk,
        weights_bytes=weights,
        activations=whole, activations_chunked=chunked, mode=mode, gpus_per_eval=k, per_gpu_bytes=per_gpu,
        gpus_needed=needed, flops_per_eval=flops, seconds_per_eval=seconds_one_gpu / k,
        search_seconds=budget.rounds(gpus // k) * seconds_one_gpu / k, notes=notes,
    )


# --- display -----------------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def format_seconds(s: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def rows(plan: Estimate) -> list[tuple[str, str]]:
    """(quantity, value) lines of `longrope plan`, in reading order."""
    s, n, b = plan.shape, plan.target_length, plan.dtype_bytes
    per_row = (4 if s.fused_projections else 3) * s.intermediate_size * b
    chunk = min(plan.mlp_chunk, n)
    whole, chunked = max(plan.activations.values()), max(plan.activations_chunked.values())
    return [
        ("model", f"{s.name}: {s.params / 1e9:.2f}B params, hidden {s.hidden_size}, {s.num_layers} layers, "
                  f"{s.num_heads}/{s.num_kv_heads} q/kv heads, intermediate {s.intermediate_size}"),
        ("target", f"{n} tokens ({n / s.original_length:g}x the {s.original_length}-token window)"),
        ("weights", format_bytes(plan.weights_bytes) + f" ({b} bytes per parameter, on every GPU)"),
        ("hidden state (L x H)", format_bytes(n * s.hidden_size * b)),
        ("q/k/v of one layer", format_bytes(n * s.head_dim * (s.num_heads + 2 * s.num_kv_heads) * b)),
        ("MLP intermediates, whole", format_bytes(n * per_row)),
        (f"MLP intermediates, {chunk}-position chunks", format_bytes(chunk * per_row)),
        ("attention scores", "O(L): flash/SDPA" if plan.flash else format_bytes(s.num_heads * n * n * b)),
        (f"logits of one {plan.loss_chunk}-position loss chunk", format_bytes(min(plan.loss_chunk, n) * s.vocab_size * 4)),
        ("activation peak, whole MLP", f"{format_bytes(whole)} ({max(plan.activations, key=plan.activations.get)})"),
        ("activation peak, chunked MLP",
         f"{format_bytes(chunked)} ({max(plan.activations_chunked, key=plan.activations_chunked.get)})"),
        ("per GPU in this mode", f"{format_bytes(plan.per_gpu_bytes)} of {format_bytes(plan.usable_bytes)} usable "
                                 f"({USABLE_FRACTION:.0%} of {plan.gpu_mem_gb:g} GB)"),
        ("mode", MODES[plan.mode] + (f", {plan.gpus_per_eval} GPUs per evaluation" if plan.gpus_per_eval > 1 else "")),
        ("search samples", samples_advice(plan.samples, n)),
        ("FLOPs per evaluation", f"{plan.flops_per_eval:.3g} ({plan.samples} samples)"),
        ("time per evaluation", f"{format_seconds(plan.seconds_per_eval)} at an assumed {plan.tflops:g} TFLOP/s per GPU"),
        ("search budget", f"{plan.budget.evaluations} evaluations (population {plan.budget.population} + "
                          f"{plan.budget.generations} x {plan.budget.per_generation})"
                          + (f", about {plan.budget.share:.2f} of their forward passes with search.screen_windows"
                             if plan.budget.share < 1 else "")),
        ("search time", f"{format_seconds(plan.search_seconds)} on {plan.gpus} GPU(s), "
                        f"{plan.parallel_evals} evaluation(s) at once"),
    ]
