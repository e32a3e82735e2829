"""One rank of the distributed tests, started by torchrun; writes what it saw to OUT/<scenario>-rank<N>.json.

`map OUT`: the collectives of longrope_search.distributed. `search OUT CONFIG EXISTING PARTIAL`: searches.
`cp OUT`: context parallelism in groups of two ranks (scored on CPU through torch's ring attention).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch

from longrope_search import distributed
from longrope_search.errors import ConfigError, LongRopeError


def raised(fn) -> Exception | None:
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def describe(exc: Exception | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def map_scenario(ctx: distributed.Context) -> dict:
    items = list(range(11))
    computed: list[int] = []
    seen: list[int] = []

    def square(x: int) -> int:
        computed.append(x)
        return x * x

    results = distributed.map_candidates(square, items, ctx, on_result=lambda i, r: seen.append(i))

    # Once rank 0 holds an item, it blocks there until rank 1 has computed all the others: only a dynamic
    # split finishes (a fixed split would leave rank 1 short and the wait would time out).
    gated: list[int] = []

    def gate(x: int) -> int:
        if ctx.rank == 0:
            ctx.store.set("test/main-holds-one", "1")
            ctx.store.wait(["test/others-done"], timedelta(seconds=120))
        else:
            ctx.store.wait(["test/main-holds-one"], timedelta(seconds=120))
        gated.append(x)
        if ctx.rank == 1 and len(gated) == len(items) - 1:
            ctx.store.set("test/others-done", "1")
        return -x

    gated_results = distributed.map_candidates(gate, items, ctx)

    def fail_on(rank: int, exc: Exception):
        def fn() -> int:
            if ctx.rank == rank:
                raise exc
            return ctx.rank
        return fn

    user_error = raised(lambda: distributed.run_everywhere(fail_on(1, ConfigError("no model.")), ctx))
    return {
        "results": results, "computed": computed, "seen": seen,
        "gated_results": gated_results, "gated": gated,
        "empty": distributed.map_candidates(square, [], ctx),
        "main_result": distributed.run_on_main(lambda: f"from rank {ctx.rank}", ctx),
        "main_error": describe(raised(lambda: distributed.run_on_main(fail_on(0, ConfigError("bad config.")), ctx))),
        "user_error_elsewhere": describe(user_error),
        "user_error_is_typed": isinstance(user_error, LongRopeError),
        "crash_elsewhere": describe(raised(lambda: distributed.run_everywhere(fail_on(1, KeyError("x")), ctx))),
    }


def cp_setup() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[tuple]]:
    """Tiny Llama, samples and candidates of the `cp` scenario; the test builds the same ones for its reference.

    Samples of 64 tokens (a shard of 32 per rank, in two chunks of 16) and of 45 (padded to 48 for the split), four
    times the model's window; candidates (key, factors, n_hat, mscale) include a LongRoPE one with n_hat > 0.
    """
    from tiny_models import tiny_model

    from longrope_search.rope import RopeSpec, longrope_mscale, ntk_factors, pi_factors

    # initializer_range 0.3: sharp attention, so candidates differ by 5-40% in PPL (at the default 0.02 by 1e-5)
    model = tiny_model("llama", max_position_embeddings=16, initializer_range=0.3)
    spec = RopeSpec(base=10000.0, rotary_dim=16, original_length=16)  # the tiny Llama's geometry
    samples = {name: torch.randint(4, 320, shape, generator=torch.Generator().manual_seed(seed))
               for name, shape, seed in (("even", (2, 64), 0), ("odd", (1, 45), 1))}
    mscale = longrope_mscale(4.0, 16)
    candidates = [
        ("longrope", torch.linspace(1.0, 6.0, 8).tolist(), 6, mscale),
        ("longrope-n0", torch.linspace(1.0, 6.0, 8).tolist(), 0, mscale),
        ("pi", pi_factors(spec, 4.0).tolist(), 0, 1.0),
        ("ntk", ntk_factors(spec, 4.0).tolist(), 0, 1.0),
    ]
    return model, samples, candidates


def cp_scenario(ctx: distributed.Context) -> dict:
    from longrope_search import context_parallel

    bad_size = describe(raised(lambda: distributed.cp_groups(ctx, 3)))
    cp_ctx = distributed.cp_groups(ctx, 2)
    cp = cp_ctx.cp
    again = distributed.cp_groups(ctx, 2).cp  # e.g. the next stage of a pipeline: the same groups, none created

    # a group computes each item together: the all_reduce inside sums the item over both ranks of the group
    together: list[int] = []

    def sum_over_group(x: int) -> int:
        together.append(x)
        value = torch.tensor([x])
        torch.distributed.all_reduce(value, group=cp.group)
        return int(value.item())

    seen: list[int] = []
    summed = distributed.map_candidates(sum_over_group, list(range(11)), cp_ctx, on_result=lambda i, r: seen.append(i))

    model, samples, candidates = cp_setup()
    scored: dict[str, list[dict]] = {}
    for name, rows in samples.items():
        evaluator = context_parallel.make_evaluator(model, rows, cp_ctx, chunk_size=7)
        results = distributed.map_candidates(lambda cand: evaluator.score(*cand), candidates, cp_ctx)
        scored[name] = [{"ppl": r.ppl, "nlls": r.nlls, "tokens": r.tokens} for r in results]
    return {
        "bad_size": bad_size, "group": [cp.size, cp.index, cp.rank, cp.leader], "world_size": ctx.world_size,
        "summed": summed, "together": together, "seen": seen, "scored": scored,
        "ring_calls": context_parallel._ring_calls, "evaluator": type(evaluator).__name__,
        "same_group_again": again.group is cp.group and again == cp,
    }


def search_scenario(ctx: distributed.Context, config_path: Path, existing: Path, partial: Path, out: Path) -> dict:
    from longrope_search import config as config_mod
    from longrope_search.search_run import run_search

    config = config_mod.load_config(config_path, [])
    existing_error = describe(raised(lambda: run_search(config, existing, ctx=ctx)))
    fresh, _ = run_search(config, out / "dist", ctx=ctx)
    resumed, _ = run_search(None, partial, resume=True, overrides=["search.generations=3"], ctx=ctx)
    return {"existing_error": existing_error, "fresh": fresh.to_json(), "resumed": resumed.to_json()}


def main() -> None:
    torch.set_num_threads(1)  # two ranks share two cores; the single-process reference uses one thread too
    scenario, out = sys.argv[1], Path(sys.argv[2])
    ctx = distributed.init_from_env()
    try:
        if scenario == "map":
            report = map_scenario(ctx)
        elif scenario == "cp":
            report = cp_scenario(ctx)
        else:
            report = search_scenario(ctx, Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), out)
        report["rank"], report["world_size"] = ctx.rank, ctx.world_size
        (out / f"{scenario}-rank{ctx.rank}.json").write_text(json.dumps(report))
    finally:
        distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
