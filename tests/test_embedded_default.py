"""The embedded default end to end: a short search on the shipped model beats PI on held-out text at 8x,
and a short-context readjustment on top brings 1x back within 1% of the unmodified model."""

from pathlib import Path

import pytest

from longrope_search.config import load_config
from longrope_search.search_run import run_search

TINY = Path(__file__).parent.parent / "configs" / "tiny.yaml"
SMALL_BUDGET = ["search.population=8", "search.parents=3", "search.mutations=2", "search.crossovers=1",
                "search.generations=1"]


@pytest.mark.slow
def test_short_search_on_the_shipped_model_beats_pi_then_readjusts_short_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGROPE_CACHE", str(tmp_path / "cache"))
    config = load_config(TINY, ["data.samples=3", "data.heldout_samples=4", *SMALL_BUDGET])
    final, run_dir = run_search(config, tmp_path / "run")
    heldout = final.scores.heldout_ppl  # the default (joint) fitness: the plain held-out perplexity beside it
    assert final.search.settings["fitness"] == "joint" and final.scores.needle >= final.baselines["yarn"].needle
    # measured: 5.6 held-out against PI's 25.8 and no scaling's 17.9 (PI without fine-tuning is worse than none here);
    # needles 3 of 4 held-out windows, as YaRN
    assert heldout < final.baselines["pi"].heldout_ppl * 0.7
    assert heldout < final.baselines["none"].heldout_ppl

    short = load_config(TINY, ["search.short=true", "search.target=1x", f"search.init_from={run_dir}",
                               *SMALL_BUDGET])
    readjusted, _ = run_search(short, tmp_path / "short")
    unmodified = readjusted.baselines["none"].heldout
    # measured: the long set on short inputs is ~17% worse, factors 1.0 with its mscale ~3% worse; the
    # lowered attention factor (~1.08) and short set are within 1% (a 2% rise allowed at 8x)
    assert readjusted.baselines["long"].heldout > unmodified * 1.05
    assert readjusted.scores.heldout <= unmodified * 1.01 < readjusted.baselines["ones"].heldout
    fit = readjusted.search.attention_fit
    assert 1.0 <= readjusted.mscale < final.mscale
    assert fit.search.mscale <= fit.search.long_mscale * 1.02
