"""One search over several processes (torchrun): every rank runs the same deterministic loop and scores
a share of each batch of candidates; rank 0 alone reads and writes the run directory.
Built on torch.distributed: object collectives of the process group plus a shared counter in its store.
With context parallelism (`cp_groups`) the ranks form groups that score each candidate together.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from longrope_search.errors import ConfigError, LongRopeError

T = TypeVar("T")
R = TypeVar("R")

# A collective waits for the slowest rank: a model download on a cold node, or the longest candidate at
# 256k+ tokens, can outlast torch's default timeout (10 min for NCCL) and would abort a healthy run.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class CPGroup:
    """The ranks that score one candidate together, each holding 1/size of every sample's positions."""

    size: int
    index: int  # which group: global ranks index * size ... index * size + size - 1
    rank: int  # place in the group; 0 is the group's leader
    group: Any = field(compare=False, repr=False)  # its torch ProcessGroup

    @property
    def leader(self) -> int:
        """Global rank of the group's rank 0."""
        return self.index * self.size


@dataclass(frozen=True)
class Context:
    """This process's place in the run; the defaults describe a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None  # cuda:LOCAL_RANK under torchrun on GPUs; None: the config decides
    store: dist.Store | None = None  # the process group's key-value store
    prefix: str = ""  # unique per worker group: a restarted group never reads an old counter
    calls: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)
    cp: CPGroup | None = None  # context parallelism (set by cp_groups); None: every rank scores on its own

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def workers(self) -> int:
        """How many items map_candidates computes at once: ranks, or context-parallel groups of ranks."""
        return self.world_size // (self.cp.size if self.cp is not None else 1)


SINGLE_PROCESS = Context()


def init_from_env() -> Context:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = None
    if torch.cuda.is_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        if local_world > torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started {local_world} processes on a node with {torch.cuda.device_count()} GPUs; "
                f"use --nproc-per-node {torch.cuda.device_count()} (one process per GPU)."
            )
        torch.cuda.set_device(local_rank)  # object collectives on NCCL go through the current device
        device = f"cuda:{local_rank}"
    store, rank, world_size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    dist.init_process_group(
        "nccl" if device else "gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT,
        device_id=torch.device(device) if device else None,
    )
    ctx = Context(rank, world_size, local_rank, device, store)
    return replace(ctx, prefix=broadcast_object(f"longrope/{uuid.uuid4().hex}", ctx))


def shutdown(ctx: Context, wait: bool = True) -> None:
    """Leave the process group; `wait`: all ranks together (after success only).

    Rank 0 hosts the rendezvous store, and a rank still tearing down gloo when it exits dies with
    `terminate called without an active exception` (seen in CI). After a failure no barrier: a rank
    stuck in another collective would make it hang until the timeout instead of torchrun stopping the group.
    """
    if ctx.world_size > 1 and dist.is_initialized():
        if wait:
            dist.barrier()
        # context-parallel groups first, each by itself: their gloo threads are gone before the world group's
        for groups in _cp_process_groups.values():
            for group in groups:
                if wait and dist.get_rank(group) >= 0:  # -1: this rank is not in that group
                    dist.barrier(group=group)
                dist.destroy_process_group(group)
        _cp_process_groups.clear()
        dist.destroy_process_group()


# (ctx.prefix, size) -> the process groups of that split: each stage of a pipeline calls cp_groups again, and
# NCCL sets up communicators (GPU memory) per group, so they are created once per process group and size
_cp_process_groups: dict[tuple[str, int], list[Any]] = {}


def cp_groups(ctx: Context, size: int) -> Context:
    """`ctx` with its ranks split into context-parallel groups of `size` consecutive ranks (size 1: `ctx` itself).

    Every rank must call it with the same size (the first call per size creates the groups' process groups, a
    collective). Consecutive ranks share a node under torchrun, so a group's ring of key/value exchanges stays on
    the node's fast links.
    """
    if size == 1:
        return ctx
    if size < 1:
        raise ConfigError(f"search.context_parallel is {size}; use 1 (off) or the number of ranks that share a sample.")
    if ctx.world_size % size:
        started = "a single process" if ctx.world_size == 1 else f"torchrun started {ctx.world_size} processes"
        raise ConfigError(
            f"search.context_parallel is {size} but {started}; it must divide the number of processes: start "
            f"torchrun with a multiple of {size} processes (--nproc-per-node), or set search.context_parallel to 1."
        )
    key = (ctx.prefix, size)
    if key not in _cp_process_groups:  # every rank creates every group, in the same order, as torch requires
        _cp_process_groups[key] = [dist.new_group(list(range(start, start + size)))
                                   for start in range(0, ctx.world_size, size)]
    index = ctx.rank // size
    return replace(ctx, cp=CPGroup(size, index, ctx.rank % size, _cp_process_groups[key][index]))


def broadcast_object(obj: T, ctx: Context) -> T:
    """Rank 0's `obj` on every rank (pickled: nodes need not share a filesystem)."""
    if ctx.world_size == 1:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: T, ctx: Context) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def _as_raised_elsewhere(exc: Exception, rank: int) -> Exception:
    """`exc` as the other ranks raise it: named by its rank, a user error kept as one (pickles either way)."""
    if isinstance(exc, LongRopeError):
        return type(exc)(f"on rank {rank}: {exc}")
    return RuntimeError(f"rank {rank} failed with {type(exc).__name__}: {exc}")


def run_everywhere(fn: Callable[[], T], ctx: Context) -> T:
    """fn() on every rank; when it fails on any rank, every rank raises (another rank's error names it)."""
    if ctx.world_size == 1:
        return fn()
    error: Exception | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    failures = gather_objects(None if error is None else _as_raised_elsewhere(error, ctx.rank), ctx)
    if error is not None:
        raise error
    for failure in failures:
        if failure is not None:
            raise failure
    return result


def run_on_main(fn: Callable[[], T], ctx: Context) -> T:
    """fn() on rank 0 only; its result, or its error, reaches every rank, so none waits on a failed check."""
    return broadcast_object(run_everywhere(fn if ctx.is_main else lambda: None, ctx), ctx)


def map_candidates(
    fn: Callable[[T], R], items: Sequence[T], ctx: Context, on_result: Callable[[int, R], None] | None = None
) -> list[R]:
    """[fn(x) for x in items] on every rank, each item computed once, by whichever rank is free first.

    Every rank must pass the same items. Ranks take the next index from an atomic counter in the
    process group's store, so a slow candidate holds up only its own rank. `on_result(i, result)` runs on
    rank 0 once per item: as soon as rank 0 computed it, or when the other ranks' results arrive.
    Under context parallelism (`ctx.cp`) the unit is a group, not a rank: its leader takes the index and
    every rank of the group calls fn on that item together (fn runs the group's collectives).
    """
    if ctx.world_size == 1:
        take = itertools.count().__next__
    else:
        counter = dist.PrefixStore(f"{ctx.prefix}/map/{next(ctx.calls)}/", ctx.store)

        def take() -> int:
            return counter.add("next", 1) - 1

        if ctx.cp is not None:
            take = _taken_by_leader(take, ctx.cp)

    done: dict[int, R] = {}
    while (i := take()) < len(items):
        done[i] = fn(items[i])
        if ctx.is_main and on_result is not None:
            on_result(i, done[i])
    # a group's ranks hold the same results: its leader alone sends them
    shared = done if ctx.cp is None or ctx.cp.rank == 0 else {}
    merged = {i: r for shard in gather_objects(shared, ctx) for i, r in shard.items()}
    if ctx.is_main and on_result is not None:
        for i in sorted(merged.keys() - done.keys()):
            on_result(i, merged[i])
    return [merged[i] for i in range(len(items))]


def _taken_by_leader(take: Callable[[], int], cp: CPGroup) -> Callable[[], int]:
    """`take` on the group's leader, its index on every rank of the group."""

    def take_together() -> int:
        box = [take() if cp.rank == 0 else None]
        dist.broadcast_object_list(box, src=cp.leader, group=cp.group)
        return box[0]

    return take_together
