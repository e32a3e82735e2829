"""context_parallel.py and distributed.cp_groups: a CP group of two CPU ranks (gloo) scores each candidate through
torch's ring attention to the PPL one process computes; each item of a map runs once per group, on all its ranks."""

from __future__ import annotations


import pytest
import torch
from distributed_worker import cp_setup
from test_distributed import torchrun
from tiny_models import tiny_model

from longrope_search import context_parallel, distributed, fitness
from longrope_search.errors import ConfigError, ModelError
from longrope_search.model import install_rope


def test_without_context_parallelism_nothing_changes():
    ctx = distributed.SINGLE_PROCESS
    assert distributed.cp_groups(ctx, 1) is ctx and ctx.cp is None
    evaluator = context_parallel.make_evaluator(tiny_model(), torch.randint(0, 320, (1, 20)), ctx, chunk_size=8)
    assert type(evaluator) is fitness.Evaluator


@pytest.mark.parametrize("size, message", [
    (2, "search.context_parallel is 2 but a single process; it must divide the number of processes: start torchrun "
        "with a multiple of 2 processes (--nproc-per-node), or set search.context_parallel to 1."),
    (0, "search.context_parallel is 0; use 1 (off) or the number of ranks that share a sample."),
])
def test_a_group_size_that_does_not_divide_the_ranks_is_one_line_naming_the_fix(size, message):
    with pytest.raises(ConfigError) as info:
        distributed.cp_groups(distributed.SINGLE_PROCESS, size)
    assert str(info.value) == message


def test_a_model_the_ring_cannot_split_is_refused_before_any_collective():
    group = distributed.CPGroup(size=2, index=0, rank=0, group=None)  # never reached
    windowed = tiny_model("mistral", sliding_window=8)  # every layer attends to the last 8 positions only
    with pytest.raises(ModelError, match="sliding-window, chunked or recurrent attention"):
        context_parallel.ContextParallelEvaluator(windowed, torch.randint(0, 320, (1, 20)), group)
    eager_only = tiny_model()
    eager_only.set_attn_implementation = lambda name: (_ for _ in ()).throw(ValueError("no sdpa"))
    eager_only.config._attn_implementation = "eager"
    with pytest.raises(ModelError, match="runs 'eager' attention"):
        context_parallel.ContextParallelEvaluator(eager_only, torch.randint(0, 320, (1, 20)), group)


def reference_scores() -> dict[str, list[fitness.FitnessResult]]:
    """What one process computes for the `cp` scenario's samples and candidates."""
    model, samples, candidates = cp_setup()
    scores: dict[str, list[fitness.FitnessResult]] = {}
    for name, rows in samples.items():
        scores[name] = []
        for _, factors, n_hat, mscale in candidates:
            install_rope(model, factors, n_hat, mscale)
            scores[name].append(fitness.perplexity(model, rows, chunk_size=7))
    return scores


def check_cp_reports(reports: list[dict], groups: int) -> None:
    reference = reference_scores()
    _, samples, candidates = cp_setup()
    layers, forwards = 2, len(candidates) * sum(rows.shape[0] for rows in samples.values())
    for rank, report in enumerate(reports):
        assert report["group"] == [2, rank // 2, rank % 2, rank // 2 * 2]  # (size, index, rank in group, leader)
        assert report["evaluator"] == "ContextParallelEvaluator" and report["same_group_again"]
        assert report["bad_size"].startswith(f"ConfigError: search.context_parallel is 3 but torchrun started "
                                             f"{len(reports)} processes; it must divide")
        # an item runs on both ranks of its group at once: the all_reduce over the group doubled it
        assert report["summed"] == [2 * x for x in range(11)]
        for name, expected in reference.items():
            got = report["scored"][name]
            assert len(got) == len(expected)
            for want, have in zip(expected, got):
                assert have["ppl"] == pytest.approx(want.ppl, rel=1e-5), name
                assert have["nlls"] == pytest.approx(want.nlls, rel=1e-5) and have["tokens"] == want.tokens
    # each group's ranks computed the same items, each item once over all groups
    by_group = [reports[g * 2]["together"] for g in range(groups)]
    for g in range(groups):
        assert reports[g * 2 + 1]["together"] == by_group[g]
    assert sorted(x for items in by_group for x in items) == list(range(11))
    assert sorted(reports[0]["seen"]) == list(range(11)) and all(r["seen"] == [] for r in reports[1:])
    # every attention layer of every forward ran through torch's ring, on both ranks of the group that scored it
    calls = [r["ring_calls"] for r in reports]
    assert sum(calls) == 2 * layers * forwards and calls[0::2] == calls[1::2]


def test_the_tolerance_separates_the_candidates():
    """The 1e-5 match below means something: n_hat and the factors move these PPLs by far more."""
    even = [r.ppl for r in reference_scores()["even"]]
    assert min(abs(a / b - 1) for i, a in enumerate(even) for b in even[i + 1:]) > 1e-2  # longrope vs its n_hat=0


@pytest.mark.slow
def test_two_ranks_in_one_group_score_like_one_process(tmp_path):
    check_cp_reports(torchrun("cp", str(tmp_path), cwd=tmp_path), groups=1)


@pytest.mark.slow
def test_four_ranks_in_two_groups_share_the_candidates(tmp_path):
    check_cp_reports(torchrun("cp", str(tmp_path), cwd=tmp_path, ranks=4), groups=2)
