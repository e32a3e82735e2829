"""runtime.apply: searched factors with n_hat and mscale, short factors inside the window, long ones past it."""

import pytest
import torch
from tiny_models import tiny_model

from longrope_search.errors import ModelError
from longrope_search.factors import FactorsFile
from longrope_search.model import install_rope, rope_spec
from longrope_search.runtime import ShortLongRotaryEmbedding, apply

ORIGINAL = 64


def ids(length: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def factors(tmp_path):
    spec = rope_spec(tiny_model("llama").config)
    ff = FactorsFile(
        model="tiny", rope=spec, target_length=4 * ORIGINAL, factors=torch.linspace(1.0, 5.0, 8).tolist(),
        n_hat=8, mscale=1.1, short_factors=torch.linspace(1.0, 1.5, 8).tolist(),
    )
    ff.save(tmp_path / "factors.json")
    return ff, tmp_path / "factors.json"


def reference(ff_factors, length: int, n_hat: int, mscale: float) -> torch.Tensor:
    model = tiny_model("llama")
    install_rope(model, ff_factors, n_hat=n_hat, mscale=mscale)
    return model(ids(length)).logits


def test_long_input_uses_long_factors_with_n_hat(factors):
    ff, path = factors
    model = apply(tiny_model("llama"), path)
    assert isinstance(model.model.rotary_emb, ShortLongRotaryEmbedding)
    expected = reference(ff.factors, 2 * ORIGINAL, n_hat=8, mscale=1.1)
    assert torch.equal(model(ids(2 * ORIGINAL)).logits, expected)
    without_n_hat = reference(ff.factors, 2 * ORIGINAL, n_hat=0, mscale=1.1)
    assert (expected - without_n_hat).abs().max() > 1e-4  # n_hat is really in effect


def test_short_input_uses_short_factors(factors):
    ff, path = factors
    model = apply(tiny_model("llama"), path)
    got = model(ids(ORIGINAL)).logits  # exactly the window: still short
    assert torch.equal(got, reference(ff.short_factors, ORIGINAL, n_hat=0, mscale=1.1))
    assert (got - reference(ff.factors, ORIGINAL, n_hat=8, mscale=1.1)).abs().max() > 1e-4


def test_mode_long_uses_long_factors_for_short_input(factors):
    ff, path = factors
    model = apply(tiny_model("llama"), path, mode="long")
    assert torch.equal(model(ids(32)).logits, reference(ff.factors, 32, n_hat=8, mscale=1.1))


def test_switches_per_forward_like_transformers(factors):
    _, path = factors
    model = apply(tiny_model("llama"), path)
    rotary = model.model.rotary_emb
    assert not rotary.uses_long(torch.arange(ORIGINAL)[None])
    assert rotary.uses_long(torch.arange(ORIGINAL + 1)[None])
    assert rotary.uses_long(torch.tensor([[ORIGINAL]]))  # one decoding step past the window


def test_refuses_other_geometry_and_unknown_mode(factors):
    _, path = factors
    with pytest.raises(ModelError, match="rotary_dim 16 .* rotary_dim 8"):
        apply(tiny_model("phi3"), path)
    with pytest.raises(ModelError, match="unknown mode 'short'"):
        apply(tiny_model("llama"), path, mode="short")


def test_cached_generation_across_the_window_matches_exported_model(tmp_path, factors):
    from transformers import AutoModelForCausalLM

    from longrope_search.export import export

    ff, _ = factors
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    ff.model, ff.n_hat = str(src), 0  # n_hat=0: the one setting a config can carry
    ff.save(tmp_path / "run" / "factors.json")
    export(tmp_path / "run", tmp_path / "dst", verify=False)
    dst = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32).eval()
    ours = apply(tiny_model("llama"), tmp_path / "dst")  # reads the exported longrope.json
    prompt = ids(ORIGINAL - 4)  # the cache holds short-factor keys when decoding crosses the window
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected, got = dst.generate(prompt, **kwargs), ours.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, expected.logits)) <= 1e-5
