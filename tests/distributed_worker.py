"""One rank of the distributed tests, started by torchrun; writes what it saw to OUT/<scenario>-rank<N>.json.

`map OUT`: the collectives of longrope_search.distributed. `search OUT CONFIG EXISTING PARTIAL`: searches.
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


def search_scenario(ctx: distributed.Context, config_path: Path, existing: Path, partial: Path, out: Path) -> dict:
    from longrope_search import config as config_mod
    from longrope_search.search import run_search

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
        else:
            report = search_scenario(ctx, Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), out)
        report["rank"], report["world_size"] = ctx.rank, ctx.world_size
        (out / f"{scenario}-rank{ctx.rank}.json").write_text(json.dumps(report))
    finally:
        distributed.shutdown(ctx)


if __name__ == "__main__":
    main()
