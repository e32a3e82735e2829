"""Context parallelism: the ranks of a CP group score each sample together, each holding L/C of its positions.

Attention runs as PyTorch's ring attention (`torch.distributed.tensor.experimental.context_parallel`, head-tail
load balancing); each rank scores its own positions with fitness's chunked head and one all_reduce sums the NLL.
Switched on by `search.context_parallel` > 1: `distributed.cp_groups` forms the groups, `make_evaluator` scores.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from longrope_search import fitness
from longrope_search.distributed import Context, CPGroup
from longrope_search.errors import ConfigError, DataError, ModelError

SEQ_DIM = 2  # of the (b, heads, L, head_dim) tensors SDPA takes, as torch's ring attention assumes

_ring_calls = 0  # SDPA calls this process routed through torch's ring attention; a forward must route all


# --- torch's ring attention ---------------------------------------------------------------------------


@functools.cache
def _ring() -> Any:
    """torch's context-parallel module, prepared once; the only place that touches torch-private names.

    Checked with torch 2.13.0, `torch/distributed/tensor/experimental/_context_parallel/_attention.py`:
    - `context_parallel`: the public API (re-exported as torch.distributed.tensor.experimental.context_parallel);
    - `custom_ops`: SDPA aten op -> its ring handler, copied into DTensor's dispatcher each time the context opens;
      we wrap each handler to count the calls, and add the CPU flash kernel, which torch routes nowhere;
    - `_templated_ring_attention`: the ring itself (rotate K/V, merge partial outputs by logsumexp), used for
      the CPU kernel exactly as torch's own handlers use it for the CUDA flash/efficient/cuDNN kernels.
    """
    try:  # torch-private and version-dependent: imported only when context parallelism runs
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError as exc:
        raise ConfigError(
            f"search.context_parallel needs PyTorch's context-parallel attention (checked with torch 2.13.0; this is "
            f"torch {torch.__version__}): upgrade torch, or set search.context_parallel to 1."
        ) from exc
    needed = ("context_parallel", "custom_ops", "_templated_ring_attention")
    missing = [name for name in needed if not hasattr(_attention, name)]
    if missing:
        raise ConfigError(
            f"torch {torch.__version__} lays out its context-parallel attention differently from torch 2.13.0 (no "
            f"{', '.join(missing)}); use torch 2.13, or set search.context_parallel to 1."
        )
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    cpu_ring = functools.partial(_cpu_flash_ring, _attention._templated_ring_attention)
    _attention.custom_ops.setdefault(cpu_flash, cpu_ring)  # a later torch's own CPU handler would win
    for op, handler in list(_attention.custom_ops.items()):
        _attention.custom_ops[op] = _counted(handler)
    return _attention


def _counted(handler: Callable[..., Any]) -> Callable[..., Any]:
    def counted(op_call: Any, args: tuple, kwargs: dict) -> Any:
        global _ring_calls
        _ring_calls += 1
        return handler(op_call, args, kwargs)

    return counted


def _cpu_flash_ring(ring_attention: Callable[..., Any], op_call: Any, args: tuple, kwargs: dict) -> Any:
    """The CPU flash kernel run through torch's ring attention, so a CP group of CPU (gloo) ranks works too.

    torch routes only its CUDA kernels to the ring. The CPU kernel returns what the ring merges, like CUDA's flash
    kernel: output (b, h, l, d) and logsumexp (b, h, l), and takes fewer K/V heads (GQA) natively. Inputs are
    DTensors sharded on the sequence as the ring expects (torch's handlers check the same through sharding rules).
    """
    query, key, value, *rest = args
    dropout_p = rest[0] if len(rest) > 0 else kwargs.get("dropout_p", 0.0)
    is_causal = rest[1] if len(rest) > 1 else kwargs.get("is_causal", False)
    if kwargs.get("attn_mask") is not None:
        raise NotImplementedError("context-parallel attention takes is_causal, not an attention mask")
    mesh, placements = query.device_mesh, (Shard(SEQ_DIM),)
    if any(not isinstance(t, DTensor) or t.device_mesh != mesh or tuple(t.placements) != placements
           for t in (query, key, value)):
        raise NotImplementedError("context-parallel attention needs query, key and value sharded on the sequence")
    out, lse = ring_attention(
        mesh.get_group(), SEQ_DIM, op_call, query.to_local(), key.to_local(), value.to_local(),
        is_causal=is_causal, dropout_p=dropout_p, scale=kwargs.get("scale"),
    )
    return (DTensor.from_local(out, mesh, placements, run_check=False),
            DTensor.from_local(lse, mesh, placements, run_check=False))


# --- scoring ----------------------------------------------------------------------------------------------


def sequence_nll(model: Any, input_ids: torch.Tensor, chunk_size: int = fitness.CHUNK_SIZE,
                 scored: torch.Tensor | None = None, *, mesh: Any) -> float:
    """fitness.sequence_nll of one sequence (L,) whose positions are split over the ranks of `mesh` (a CP group);
    `scored` (L-1,): the targets to score (IGNORE elsewhere), None: every next token.

    Every rank of the group passes the same sequence and returns the same value. The positions are padded to a
    multiple of 2 * size: torch's head-tail load balancing cuts the sequence into 2 * size equal chunks (rank r holds
    chunks r and 2 * size - 1 - r). Padding after the last token changes no scored position (attention is causal).
    """
    ring = _ring()
    device = model.get_input_embeddings().weight.device
    ids = input_ids.reshape(1, -1).to(device)  # (1, L)
    length, size = ids.shape[1], mesh.size()
    if length < 2:
        raise DataError(f"a sample of {length} token has nothing to predict; use samples of at least 2 tokens.")
    padded = -(-length // (2 * size)) * 2 * size  # Lp
    with torch.inference_mode():
        # next-token targets, built before the split so that each rank's targets travel with its positions
        targets = torch.full((1, padded), fitness.IGNORE, dtype=torch.long, device=device)  # (1, Lp)
        # the last position (and the padding) predicts nothing
        targets[0, : length - 1] = ids[0, 1:] if scored is None else scored.to(device)
        ids = torch.nn.functional.pad(ids, (0, padded - length))  # (1, Lp)
        positions = torch.arange(padded, device=device)[None]  # (1, Lp): RoPE (n_hat included) reads these values
        buffers = [ids, positions, targets]
        before = _ring_calls
        with ring.context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
            # each buffer is now this rank's (1, Lp / size) shard, all three in the same head-tail order.
            # An all-ones mask says "no padding": without it transformers reads the jump in this rank's positions
            # (0..k-1 then Lp-k..Lp-1) as packed sequences and builds an explicit mask, which the ring cannot take;
            # with it transformers drops the mask and calls SDPA with is_causal=True.
            hidden = fitness._decoder(model)(
                input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids), use_cache=False
            ).last_hidden_state[0]  # (Lp / size, H), final norm applied
        layers = model.config.get_text_config().num_hidden_layers
        if _ring_calls - before != layers:  # the same count on every rank of the group: all raise together
            raise ModelError(
                f"{type(model).__name__} ran {_ring_calls - before} of its {layers} attention layers through "
                "PyTorch's ring attention; context parallelism needs every layer to call SDPA. Set "
                "search.context_parallel to 1 for this model."
            )
        local = torch.stack([fitness.nll_sum(model, hidden, targets[0], chunk_size),
                             (targets != fitness.IGNORE).sum(dtype=torch.float64)])  # (2,): NLL sum, tokens
        dist.all_reduce(local, group=mesh.get_group())
    total, count = local.tolist()
    expected = length - 1 if scored is None else int((scored != fitness.IGNORE).sum())
    if count != expected:
        raise RuntimeError(f"context-parallel split scored {count:.0f} targets of {expected}")
    return total / max(expected, 1)


def _windowed(model: Any) -> bool:
    """Some layer attends to a window, not the whole prefix: transformers 5 says so itself; for 4.x the config's
    sliding window (when in use) or its layer types tell."""
    supports = getattr(model, "supports_context_parallel", None)
    if supports is not None:
        return supports is False
    config = model.config
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return bool(sliding) or any(t != "full_attention" for t in (getattr(config, "layer_types", None) or []))


def _require_sdpa(model: Any) -> None:
    """Refuse a model the ring cannot split; switch flash-attn (or another SDPA-equivalent) attention to SDPA."""
    if _windowed(model):
        raise ModelError(
            f"{type(model).__name__} has sliding-window, chunked or recurrent attention layers, which context "
            "parallelism cannot split (the ring computes full causal attention); set search.context_parallel to 1."
        )
    used = model.config._attn_implementation
    if used != "sdpa":
        try:
            model.set_attn_implementation("sdpa")  # flash_attention_2 -> the same attention through PyTorch's kernel
        except (ValueError, ImportError):
            pass
    if model.config._attn_implementation != "sdpa":
        raise ModelError(
            f"context parallelism runs attention as PyTorch SDPA, but {type(model).__name__} only runs {used!r} "
            "attention; set search.context_parallel to 1 for this model."
        )


class ContextParallelEvaluator(fitness.Evaluator):
    """fitness.Evaluator whose samples one CP group scores together (same `score`, `results`, `preload`).

    Every rank of the group must call `score` with the same keys in the same order, as `distributed.map_candidates`
    does under `ctx.cp`; each rank then returns the same FitnessResult. A model loaded with flash_attention_2 is
    switched to sdpa (the ring runs PyTorch's flash kernel).
    """

    def __init__(self, model: Any, samples: torch.Tensor, cp: CPGroup, chunk_size: int = fitness.CHUNK_SIZE,
                 targets: torch.Tensor | None = None, joint: fitness.Joint | None = None) -> None:
        _require_sdpa(model)
        super().__init__(model, samples, chunk_size, targets=targets, joint=joint)  # checks the head (no collective)
        _ring()
        self.cp = cp
        self.mesh = DeviceMesh.from_group(cp.group, model.get_input_embeddings().weight.device.type)
        nll = functools.partial(sequence_nll, mesh=self.mesh)
        self.fitness = functools.partial(fitness.perplexity, nll=nll, targets=targets, joint=joint,
                                         parts=functools.partial(fitness.two_pass_parts, nll=nll))


def make_evaluator(
    model: Any, samples: torch.Tensor, ctx: Context, chunk_size: int = fitness.CHUNK_SIZE,
    targets: torch.Tensor | None = None, joint: fitness.Joint | None = None,
) -> fitness.Evaluator:
    """The evaluator `ctx` calls for: fitness.Evaluator as before when `ctx.cp` is None, else its CP group's."""
    if ctx.cp is None:
        return fitness.Evaluator(model, samples, chunk_size=chunk_size, targets=targets, joint=joint)
    return ContextParallelEvaluator(model, samples, ctx.cp, chunk_size, targets, joint)
