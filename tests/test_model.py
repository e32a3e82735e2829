"""Installing a candidate into real transformers models: identity, no stale tables, every family."""

import importlib.util

import pytest
import torch
from tiny_models import FAMILIES, tiny_config, tiny_model, tiny_tokenizer
from transformers import GPT2Config, LlamaForCausalLM

from longrope_search import rope
from longrope_search.errors import DependencyError, ModelError
from longrope_search.model import LongRopeRotaryEmbedding, carried_factors, install_rope, load_model, rope_spec


def tokens(length: int, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def test_identity_candidate_gives_identical_logits():
    model = tiny_model("llama")
    ids = tokens(200)  # longer than the 64-token window
    before = model(ids).logits
    spec = rope_spec(model.config)
    install_rope(model, torch.ones(spec.num_factors), n_hat=0, mscale=1.0)
    assert isinstance(model.model.rotary_emb, LongRopeRotaryEmbedding)
    assert torch.equal(model(ids).logits, before)


def test_two_candidates_differ_and_switching_back_is_exact():
    model = tiny_model("llama")
    ids = tokens(256)
    n = rope_spec(model.config).num_factors
    install_rope(model, torch.full((n,), 4.0))
    first = model(ids).logits
    install_rope(model, torch.linspace(1.0, 4.0, n))
    second = model(ids).logits
    assert (first - second).abs().max() > 1e-3
    install_rope(model, torch.full((n,), 4.0))
    assert torch.equal(model(ids).logits, first)


def test_matches_transformers_longrope_model():
    scale, original = 4.0, 64
    config = tiny_config("llama")
    spec = rope_spec(config)
    long_factor = torch.linspace(1.0, 1.25 * scale, spec.num_factors).tolist()
    hf_config = tiny_config(
        "llama", max_position_embeddings=int(original * scale),
        rope_parameters={
            "rope_type": "longrope", "rope_theta": spec.base, "long_factor": long_factor,
            "short_factor": [1.0] * spec.num_factors, "original_max_position_embeddings": original,
        },
    )
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config).eval()
    ours = tiny_model("llama", seed=0)
    install_rope(ours, long_factor, mscale=rope.longrope_mscale(scale, original))
    ids = tokens(int(original * scale))
    diff = (hf_model(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_runs_with_a_candidate(family):
    model = tiny_model(family)
    spec = rope_spec(model.config)
    expected_dim = 8 if family == "phi3" else 16
    assert spec.rotary_dim == expected_dim and spec.num_factors == expected_dim // 2
    ids = tokens(160)
    base = model(ids).logits
    install_rope(model, torch.linspace(1.0, 5.0, spec.num_factors), n_hat=4, mscale=1.1)
    out = model(ids).logits
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, base)


def test_n_hat_changes_only_through_early_positions():
    model = tiny_model("llama")
    n = rope_spec(model.config).num_factors
    ids = tokens(128)
    install_rope(model, torch.full((n,), 3.0), n_hat=0)
    without = model(ids).logits
    install_rope(model, torch.full((n,), 3.0), n_hat=8)
    with_n_hat = model(ids).logits
    # the first token attends only to itself: its rotation cancels, so logits there do not move
    torch.testing.assert_close(with_n_hat[:, 0], without[:, 0])
    assert (with_n_hat[:, 8:] - without[:, 8:]).abs().max() > 1e-4


def test_refusals_are_typed_errors():
    with pytest.raises(ModelError, match="no rotary position embedding"):
        rope_spec(GPT2Config())
    scaled = tiny_config("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ModelError, match="already uses rope_type 'linear'"):
        rope_spec(scaled)
    extended = tiny_config("llama", max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "long_factor": [2.0] * 8, "short_factor": [1.0] * 8,
        "original_max_position_embeddings": 64})
    assert rope_spec(extended).original_length == 64 and carried_factors(extended) == [2.0] * 8
    assert carried_factors(tiny_config("llama")) is None
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="got 3 factors"):
        install_rope(model, [1.0, 2.0, 3.0])
    with pytest.raises(ModelError, match="finite and positive"):
        install_rope(model, [float("nan")] * rope_spec(model.config).num_factors)


def test_load_model_from_local_directory(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tokenizer = load_model(str(tmp_path / "m"), device="cpu")
    assert rope_spec(loaded.config) == rope_spec(model.config)
    assert loaded.dtype == torch.float32 and not loaded.training
    assert loaded.config._attn_implementation == "sdpa"
    ids = tokens(32)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tokenizer.bos_token_id == 1
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    with pytest.raises(ModelError, match="cannot load model config"):
        load_model(str(tmp_path / "broken"))


def test_model_section_keys_reach_every_from_pretrained_call(tmp_path, monkeypatch):
    """model.revision, model.trust_remote_code and model.attn_implementation (config keys) reach the config, tokenizer
    and weights loads; model.device_map reaches the weights load, and the model is then not moved."""
    import transformers

    from longrope_search import model as model_mod
    from longrope_search.config import from_dict

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    calls: dict[str, list[dict]] = {}

    def spy(name, cls):
        original = cls.from_pretrained

        def from_pretrained(source, **kwargs):
            calls.setdefault(name, []).append(kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "device_map")}  # a local folder
            return original(source, **kwargs)

        monkeypatch.setattr(model_mod, name, type(name, (), {"from_pretrained": staticmethod(from_pretrained)}))

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        spy(name, getattr(transformers, name))
    config = from_dict({"model": {"name": str(tmp_path / "m"), "revision": "v1.0", "trust_remote_code": True,
                                  "attn_implementation": "eager"}})
    options = model_mod.LoadOptions.of(config.model)
    loaded, _ = model_mod.load_model(config.model.name, device="cpu", options=options)
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        assert calls[name] and all(c["revision"] == "v1.0" and c["trust_remote_code"] is True for c in calls[name])
    assert calls["AutoModelForCausalLM"][-1]["attn_implementation"] == "eager"
    assert loaded.config._attn_implementation == "eager"
    # defaults: no revision, no remote code, today's attention choice (sdpa on CPU), no device map
    calls.clear()
    model_mod.load_model(str(tmp_path / "m"), device="cpu", options=model_mod.LoadOptions.of(from_dict({}).model))
    weights = calls["AutoModelForCausalLM"][-1]
    assert weights["trust_remote_code"] is False and "revision" not in weights and "device_map" not in weights
    assert weights["attn_implementation"] == "sdpa"

    sharded = model_mod.LoadOptions(device_map="auto")
    if importlib.util.find_spec("accelerate") is None:  # said in one line before anything loads
        with pytest.raises(DependencyError, match="pip install accelerate"):
            model_mod.load_model(str(tmp_path / "m"), options=sharded)
    monkeypatch.setattr(model_mod, "check_device_map", lambda device_map: None)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    calls.clear()
    model_mod.load_model(str(tmp_path / "m"), device="cuda:3", options=sharded)
    assert calls["AutoModelForCausalLM"][-1]["device_map"] == "auto" and not moved  # accelerate placed it


def test_a_tokenizer_this_transformers_cannot_build_is_named_as_such(tmp_path, monkeypatch):
    """Not 'check the path or hub id': the folder and its weights are fine, its tokenizer class is the problem (the
    error transformers 4.57 raises for a tokenizer_config.json saved by 5.x)."""
    from longrope_search import model as model_mod

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")

    class FourX:
        @staticmethod
        def from_pretrained(source, **kwargs):
            raise ValueError("Tokenizer class TokenizersBackend does not exist or is not currently imported.")

    monkeypatch.setattr(model_mod, "AutoTokenizer", FourX)
    with pytest.raises(ModelError, match="TokenizersBackend does not exist.*cannot build its tokenizer.*"
                                         "tokenizer_class") as caught:
        load_model(str(tmp_path / "m"), device="cpu")
    assert "hub id" not in str(caught.value) and "PreTrainedTokenizerFast loads in 4.x and 5.x" in str(caught.value)
