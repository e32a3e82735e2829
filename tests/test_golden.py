"""A tiny deterministic search pinned to its result (as torchtune pins its recipes' losses): any change to the
operators, their draw order, the fitness, the seeds or the selection that moves the search shows here first. When
a change is meant to move it, update the numbers in the same commit and say why."""

from __future__ import annotations

import pytest
from search_fixtures import search_config, write_corpus, write_model

from longrope_search.config import from_dict
from longrope_search.search_run import run_search

# the model and corpus of tests/search_fixtures.py (seeded), 2 generations of the paper's search on them
FACTORS = [1.14, 1.22, 1.22, 1.4, 2.21, 2.93, 3.28, 4.11]
N_HAT, MSCALE = 2, 1.1832159566199232
SEARCH_PPL, HELDOUT_PPL = 320.8432802582887, 324.04964439441426
YARN_SEARCH_PPL, YARN_HELDOUT_PPL = 320.8645411515063, 324.052217692017


def test_the_tiny_search_ends_where_it_always_has(tmp_path):
    model, corpus = write_model(tmp_path), write_corpus(tmp_path)
    final, _ = run_search(from_dict(search_config(model, corpus, generations=2)), tmp_path / "run")
    assert final.factors == FACTORS and final.n_hat == N_HAT  # grid values: exact
    assert final.mscale == pytest.approx(MSCALE, rel=1e-12)
    assert final.scores.search == pytest.approx(SEARCH_PPL, rel=1e-6)
    assert final.scores.heldout == pytest.approx(HELDOUT_PPL, rel=1e-6)
    assert final.baselines["yarn"].search == pytest.approx(YARN_SEARCH_PPL, rel=1e-6)
    assert final.baselines["yarn"].heldout == pytest.approx(YARN_HELDOUT_PPL, rel=1e-6)
