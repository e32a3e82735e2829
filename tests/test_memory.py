"""memory.py: chunked MLPs give the logits of whole ones, unchunking restores the model, peaks are measured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longrope_search.errors import ConfigError, ModelError
from longrope_search.fitness import sequence_nll
from longrope_search.memory import chunk_mlp, measure_peak, unchunk_mlp
from tiny_models import tiny_model

IDS = torch.randint(0, 320, (1, 100), generator=torch.Generator().manual_seed(3))  # (1, L)


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS, use_cache=False).logits  # (1, L, V)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_chunked_mlp_gives_the_logits_of_the_whole_mlp(family):
    model = tiny_model(family)
    whole = logits(model)
    for chunk in (1, 7, 32, 99):  # 7, 32 and 99 leave a shorter last chunk
        chunk_mlp(model, chunk)
        assert (logits(model) - whole).abs().max().item() <= 1e-6, chunk
    chunk_mlp(model, 100)  # one chunk: the very same call
    assert torch.equal(logits(model), whole)


def test_unchunk_restores_the_class_forward_and_its_logits():
    model = tiny_model("llama")
    whole = logits(model)
    chunk_mlp(model, 7)
    chunk_mlp(model, 13)  # a second call replaces the chunk size instead of wrapping twice
    assert model.model.layers[0].mlp.forward.chunk_tokens == 13
    unchunk_mlp(model)
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    assert torch.equal(logits(model), whole)
    unchunk_mlp(model)  # unchunking a whole model is a no-op


def test_unchunk_keeps_a_forward_installed_by_someone_else():
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    calls = []

    def hooked(x):  # e.g. accelerate's device hooks live in the instance dict too
        calls.append(x.shape[-2])
        return type(mlp).forward(mlp, x)

    mlp.forward = hooked
    chunk_mlp(model, 40)
    logits(model)
    assert calls == [40, 40, 20]
    unchunk_mlp(model)
    assert mlp.forward is hooked


def test_chunking_lowers_the_measured_activation_peak_and_keeps_the_nll():
    model = tiny_model("llama", hidden_size=64, intermediate_size=512)
    ids = torch.randint(0, 320, (1, 1024), generator=torch.Generator().manual_seed(0))
    nll, whole = measure_peak(lambda: sequence_nll(model, ids, 1024))
    chunk_mlp(model, 128)
    chunked_nll, chunked = measure_peak(lambda: sequence_nll(model, ids, 1024))
    assert chunked_nll == pytest.approx(nll, abs=1e-6)
    # whole: 3 (L, 512) fp32 intermediates = 6.3 MB on top of the (L, 64) states; chunked: 1/8 of them
    assert whole > 6.3e6 and chunked < 0.5 * whole


def test_measure_peak_counts_tensors_alive_at_once():
    result, peak = measure_peak(lambda: (torch.ones(1000) * 2).sum())  # ones and the product coexist
    assert result.item() == 2000.0 and peak == 8000
    x = torch.ones(1000)
    _, peak = measure_peak(lambda: x[:500].sum())  # a view allocates nothing; x existed before
    assert peak == 4


def test_bad_chunk_and_models_without_layers_are_user_errors():
    with pytest.raises(ConfigError, match="positive size"):
        chunk_mlp(tiny_model("llama"), 0)
    with pytest.raises(ModelError, match="mlp_chunk to 0"):
        chunk_mlp(nn.Linear(2, 2), 16)
