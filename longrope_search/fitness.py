"""Fitness of a RoPE candidate: long-context perplexity on fixed token windows.

The decoder runs once to its last hidden states; lm_head and cross-entropy then run over chunks of
positions, so L x vocab logits never exist. `Evaluator` installs candidates and scores each key once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from longrope_search.config import DEFAULT_CHUNK_SIZE as CHUNK_SIZE  # positions per lm_head + loss chunk
from longrope_search.errors import ConfigError, DataError, ModelError
from longrope_search.model import install_rope


@dataclass
class FitnessResult:
    ppl: float  # exp(mean per-sample NLL); inf when a loss was not finite
    nlls: list[float] = field(default_factory=list)  # mean NLL per sample (empty for preloaded scores)
    tokens: int = 0  # predicted tokens scored
    seconds: float = 0.0
    error: str | None = None
    rejected: bool = False  # stopped early by a Race: ppl and nlls cover only the samples scored
    forward_tokens: int = 0  # tokens the decoder ran: the work this score cost
    # the joint fitness: {"text": [...], "answer": [...]}, each sample's two mean NLLs (nlls = text + weight * answer)
    parts: dict[str, list[float]] = field(default_factory=dict)
    # scored on the first windows only (a Screen's first round); rejected until a promotion scores the rest
    screened: bool = False


@dataclass(frozen=True)
class Race:
    """Early rejection (racing over samples). `bar`: the per-sample NLLs of the candidate a newcomer must beat to
    become a parent (the worst current parent); `margin` in nats. A newcomer stops as soon as its mean NLL over the
    samples scored so far exceeds the bar's mean over the same samples by more than the margin. The comparison is
    paired: both are scored on the same documents, so the documents' own difficulty cancels."""

    bar: tuple[float, ...]
    margin: float

    def lost(self, nlls: Sequence[float]) -> bool:
        """True when the newcomer is out of the race (never after its last sample: then it is fully scored)."""
        done = len(nlls)
        if not 0 < done < len(self.bar):
            return False
        return (sum(nlls) - sum(self.bar[:done])) / done > self.margin


@dataclass(frozen=True)
class Screen:
    """Multi-fidelity scoring (successive halving inside a generation, search.screen_windows / screen_keep): every
    new candidate of a batch is scored on the first `windows` samples only; the `keep` fraction of the batch with the
    lowest mean NLL over those windows (at least one; ties by key) is scored on the rest, the others stay rejected at
    their partial score. All are compared on the same windows, so the documents' own difficulty cancels."""

    windows: int
    keep: float

    def promoted(self, partial: Mapping[str, Sequence[float]]) -> set[str]:
        """The keys to score in full, of `partial`: each batch key -> its per-sample NLLs (at least `windows`)."""
        ranked = sorted((sum(nlls[: self.windows]) / self.windows, key) for key, nlls in partial.items()
                        if len(nlls) >= self.windows and all(map(math.isfinite, nlls[: self.windows])))
        return {key for _, key in ranked[: max(1, math.ceil(self.keep * len(partial)))]}


@dataclass(frozen=True)
class Joint:
    """The joint fitness (search.fitness: joint): each window holds needles asked at its end, and one decoder pass
    gives two mean NLLs per window, the text's (every prediction but the answers') and the answers'. The window's
    score is text + weight * answer, so a candidate must keep long text fluent AND find what lies far back."""

    answer_rows: torch.Tensor  # (n, L-1) bool: the predictions of answer tokens
    weight: float

    def combine(self, text: float, answer: float) -> float:
        return text + self.weight * answer

    def reweighed(self, weight: float) -> "Joint":
        return Joint(self.answer_rows, weight)


def _decoder(model: Any) -> Any:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def head_logits(model: Any, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """lm_head plus the per-architecture logit transforms of *ForCausalLM.forward; (c, H) -> (c, V) fp32.

    `out` (c, V) fp32 is reused when the head is a plain fp32 Linear: on CPU a fresh (c, V) tensor per chunk
    is fresh pages from the kernel, and those page faults cost ~20% of the head.
    """
    head = model.get_output_embeddings()
    hidden = hidden.to(head.weight.device)
    if out is not None and type(head) is torch.nn.Linear and head.weight.dtype == torch.float32:
        weight_t = head.weight.t()  # (H, V) view
        logits = torch.mm(hidden, weight_t, out=out) if head.bias is None else torch.addmm(head.bias, hidden, weight_t, out=out)
    else:
        logits = head(hidden).float()  # a new tensor: the in-place transforms below touch nothing shared
    config = model.config
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        logits.mul_(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite
        logits.div_(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap is not None:
        logits.div_(cap).tanh_().mul_(cap)
    return logits


# A target that is not scored: the last position of a sample, and the padding of a context-parallel split.
IGNORE = -100


def nll_sum(model: Any, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Summed NLL of `targets` (m,) after the final hidden states `hidden` (m, H); IGNORE targets add nothing.

    norm is already applied; lm_head + log-softmax run in fp32 over chunks of rows. A float64 scalar on the device
    of `hidden`, not synced, so a caller may still add or all-reduce it before the one `.item()`.
    """
    rows_total = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    logits_buf = logp_buf = None  # (chunk, V) each, allocated by the first (largest) chunk
    for start in range(0, rows_total, chunk_size):
        end = min(start + chunk_size, rows_total)
        rows = end - start
        logits = head_logits(model, hidden[start:end], None if logits_buf is None else logits_buf[:rows])  # (c, V)
        if logits_buf is None:
            logits_buf, logp_buf = logits, torch.empty_like(logits)
        logp = torch.log_softmax(logits, dim=-1, out=logp_buf[:rows])  # (c, V)
        chunk_targets = targets[start:end].to(logp.device)[:, None]  # (c, 1)
        picked = logp.gather(1, chunk_targets.clamp_min(0))  # (c, 1)
        total -= torch.where(chunk_targets == IGNORE, 0.0, picked).sum(dtype=torch.float64)
    return total


def sequence_nll(model: Any, input_ids: torch.Tensor, chunk_size: int = CHUNK_SIZE,
                 targets: torch.Tensor | None = None) -> float:
    """Mean NLL of one sequence (1, L) or (L,): over its L-1 next tokens, or over the `targets` (L-1,) that are not
    IGNORE (position i predicts targets[i]); the head and log-softmax run only at scored positions, in fp32 chunks."""
    ids = input_ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)  # (1, L)
    length = ids.shape[1]
    if length < 2:
        raise DataError(f"a sample of {length} token has nothing to predict; use samples of at least 2 tokens.")
    with torch.inference_mode():
        # use_cache=False: a KV cache would only hold every layer's keys and values until the end
        hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0]  # (L, H), final norm applied
        if targets is None:
            total = nll_sum(model, hidden[: length - 1], ids[0, 1:], chunk_size)  # position i predicts token i+1
            return total.item() / (length - 1)
        scored = (targets != IGNORE).nonzero().squeeze(1).to(hidden.device)  # (k,): a few rows, not L x vocab
        total = nll_sum(model, hidden[scored], targets.to(hidden.device)[scored], chunk_size)
    return total.item() / max(scored.numel(), 1)


def sequence_parts(model: Any, input_ids: torch.Tensor, chunk_size: int, targets: torch.Tensor,
                   answer_rows: torch.Tensor) -> tuple[float, float]:
    """(mean NLL of the text rows, mean NLL of the answer rows) of one sequence (L,), from one decoder pass: the
    joint fitness's two parts. targets (L-1,) what each position predicts; answer_rows (L-1,) bool."""
    ids = input_ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)  # (1, L)
    length = ids.shape[1]
    with torch.inference_mode():
        hidden = _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0]  # (L, H), final norm applied
        rows = answer_rows.to(hidden.device)  # (L-1,)
        targets = targets.to(hidden.device)  # (L-1,)
        # the text over a view of every row (answers IGNOREd): no (L, H) copy; then the few answer rows gathered
        text = nll_sum(model, hidden[: length - 1], torch.where(rows, IGNORE, targets), chunk_size)
        picked = rows.nonzero().squeeze(1)  # (a,)
        answer = nll_sum(model, hidden[picked], targets[picked], chunk_size)
    return text.item() / max(int((~rows).sum()), 1), answer.item() / max(picked.numel(), 1)


def two_pass_parts(model: Any, input_ids: torch.Tensor, chunk_size: int, targets: torch.Tensor,
                   answer_rows: torch.Tensor, nll: Callable[..., float]) -> tuple[float, float]:
    """`sequence_parts` through a per-sequence NLL that scores one target set per pass (context parallelism's): the
    same two means, at twice the forward cost."""
    ignore = torch.full_like(targets, IGNORE)
    return (nll(model, input_ids, chunk_size, torch.where(answer_rows, ignore, targets)),
            nll(model, input_ids, chunk_size, torch.where(answer_rows, targets, ignore)))


def scored_tokens(samples: torch.Tensor, targets: torch.Tensor | None) -> int:
    """Predictions a fitness pass scores: every next token, or the targets that are not IGNORE."""
    return samples.shape[0] * (samples.shape[1] - 1) if targets is None else int((targets != IGNORE).sum())


def perplexity(
    model: Any, samples: torch.Tensor, chunk_size: int = CHUNK_SIZE,
    nll: Callable[..., float] = sequence_nll, targets: torch.Tensor | None = None, race: Race | None = None,
    joint: Joint | None = None, parts: Callable[..., tuple[float, float]] = sequence_parts,
    upto: int | None = None, prior: FitnessResult | None = None,
) -> FitnessResult:
    """exp(mean over samples (n, L) of each sample's mean NLL); a non-finite loss gives ppl inf, not a raise.

    `nll(model, row, chunk_size, row_targets)` scores one sample: `sequence_nll` here, a context-parallel one for a
    CP group. `targets` (n, L-1): what each position predicts, IGNORE where nothing is scored (the needle fitness
    scores only the answer); None: every next token. `race`: stop early (rejected) once the candidate lost it.
    `joint`: each sample scores `joint.combine` of its text and answer means (`parts(model, row, chunk_size,
    row_targets, row_answer_rows)`, one pass), both kept in the result's `parts`. `upto`: score only the first upto
    samples (a Screen's first round: the result is `screened`); `prior`: a screened result to continue from.
    """
    began = time.perf_counter()
    count = samples.shape[0] if upto is None else min(upto, samples.shape[0])
    nlls: list[float] = [] if prior is None else list(prior.nlls)
    halves: dict[str, list[float]] = {"text": [], "answer": []} if joint is not None else {}
    if prior is not None:
        halves = {name: list(values) for name, values in prior.parts.items()} or halves
    earlier = 0 if prior is None else prior.forward_tokens  # a continued result counts the first round's work too
    before = 0.0 if prior is None else prior.seconds

    def result(done: int, ppl: float | None = None, **flags: Any) -> FitnessResult:
        """The result after the first `done` samples (PPL over them unless given)."""
        ran = done - (0 if prior is None else len(prior.nlls))  # samples this call scored
        return FitnessResult(_ppl(sum(nlls) / done) if ppl is None else ppl, nlls,
                             scored_tokens(samples[:done], None if targets is None else targets[:done]),
                             before + time.perf_counter() - began, forward_tokens=earlier + ran * samples.shape[1],
                             parts=halves, **flags)

    for i in range(len(nlls), count):
        row = samples[i]
        if joint is None:
            value = nll(model, row, chunk_size, None if targets is None else targets[i])
        else:
            text, answer = parts(model, row, chunk_size, targets[i], joint.answer_rows[i])
            halves["text"].append(text)
            halves["answer"].append(answer)
            value = joint.combine(text, answer)
        nlls.append(value)
        if not math.isfinite(value):  # the candidate is broken: the other samples cannot redeem it
            return result(i + 1, ppl=math.inf, error=f"loss is {value} on sample {i}")
        if race is not None and race.lost(nlls):
            return result(i + 1, rejected=True)
    if count < samples.shape[0]:
        return result(count, rejected=True, screened=True)
    return result(count)


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf  # 709: largest exponent a float holds


FITNESS: dict[str, Callable[..., FitnessResult]] = {"ppl": perplexity}


def check_head(model: Any, input_ids: torch.Tensor) -> None:
    """Refuse a model whose own logits differ from our chunked head (an architecture with another transform)."""
    ids = input_ids.reshape(1, -1).to(model.get_input_embeddings().weight.device)  # (1, l)
    with torch.inference_mode():
        theirs = model(input_ids=ids, use_cache=False).logits[0].float()  # (l, V)
        ours = head_logits(model, _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state[0])
    tolerance = 1e-4 if model.get_output_embeddings().weight.dtype == torch.float32 else 2e-2  # bf16/fp16: rounding
    scale = theirs.abs().max().clamp_min(1.0)
    if not torch.allclose(ours.to(theirs.device), theirs, rtol=0.0, atol=tolerance * scale.item()):
        raise ModelError(
            f"{type(model).__name__} transforms its logits in a way longrope does not reproduce "
            "(chunked logits differ from the model's own); report the architecture so its head can be supported."
        )


class Evaluator:
    """Scores RoPE candidates on fixed samples (n, L); each distinct key is evaluated once. `targets` (n, L-1):
    score only these predictions (IGNORE elsewhere), e.g. a needle's answer; None: every next token."""

    def __init__(self, model: Any, samples: torch.Tensor, chunk_size: int = CHUNK_SIZE, kind: str = "ppl",
                 targets: torch.Tensor | None = None, joint: Joint | None = None) -> None:
        if kind not in FITNESS:
            raise ConfigError(f"unknown fitness {kind!r}; use one of: {', '.join(FITNESS)}.")
        if joint is not None and targets is None:
            raise ValueError("the joint fitness needs the windows' targets beside their answer rows")
        self.model = model
        self.samples = samples  # (n, L)
        self.targets = targets  # (n, L-1) or None
        self.chunk_size = chunk_size
        self.fitness = functools.partial(FITNESS[kind], targets=targets, joint=joint)
        self.results: dict[str, FitnessResult] = {}
        self.evaluations = 0
        check_head(model, samples[0, :64])

    def score(
        self, key: str, factors: Sequence[float] | torch.Tensor, n_hat: int = 0, mscale: float = 1.0,
        race: Race | None = None, upto: int | None = None,
    ) -> FitnessResult:
        """The key's result: scored now (stopped early when it loses `race`; on the first `upto` samples only, a
        Screen's first round), continued over the rest when it was screened and more is asked, or the one already
        held, rejected or not: no sample is ever scored twice for a key."""
        if self.needs(key, upto):
            held = self.results.get(key)
            install_rope(self.model, factors, n_hat, mscale)
            try:
                self.results[key] = self.fitness(self.model, self.samples, self.chunk_size, race=race, upto=upto,
                                                 prior=held)
            except torch.OutOfMemoryError as exc:
                raise ModelError(
                    f"out of device memory scoring {self.samples.shape[1]}-token samples; check `longrope plan` for "
                    "this target, lower search.mlp_chunk / search.chunk_size, or spread the search with torchrun."
                ) from exc
            self.evaluations += 1
        return self.results[key]

    def reweigh(self, joint: Joint) -> None:
        """Score with `joint` from now on, and every result held so far as if it had been: each window's score
        recombined from its two logged parts (so a resume that recombines again gets the same numbers)."""
        self.fitness = functools.partial(self.fitness.func, **{**self.fitness.keywords, "joint": joint})
        for key, held in self.results.items():
            if held.parts and held.error is None:
                nlls = [joint.combine(t, a) for t, a in zip(held.parts["text"], held.parts["answer"])]
                self.results[key] = dataclasses.replace(held, nlls=nlls, ppl=_ppl(sum(nlls) / len(nlls)))

    def needs(self, key: str, upto: int | None = None) -> bool:
        """Whether `score(key, upto=upto)` would run the model: the key is new, or screened short of `upto`."""
        held = self.results.get(key)
        upto = self.samples.shape[0] if upto is None else min(upto, self.samples.shape[0])
        return held is None or (held.screened and len(held.nlls) < upto)

    def preload(self, scores: Mapping[str, float], details: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Reuse scores from a resumed search (with their per-sample NLLs and rejection from `details`, log lines);
        a key already scored here keeps its full result. forward_tokens is what the evaluation cost when it ran, so a
        resumed search counts the same work as an uninterrupted one."""
        details = details or {}
        for key, ppl in scores.items():
            line = details.get(key, {})
            nlls = [math.inf if v is None else float(v) for v in line.get("nlls", [])]
            parts = {name: [math.inf if v is None else float(v) for v in values]
                     for name, values in (line.get("parts") or {}).items()}
            self.results.setdefault(key, FitnessResult(float(ppl), nlls, rejected=bool(line.get("rejected", False)),
                                                       forward_tokens=int(line.get("tokens", 0)), parts=parts,
                                                       screened=bool(line.get("screened", False))))
