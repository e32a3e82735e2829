"""The shipped `builtin:tiny` model and `builtin:cpython` corpus: they load offline, fit each other,
and the model is good at 1x context and breaks at 8x without rescaling (the problem LongRoPE solves)."""

import gzip
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from longrope_search import builtin
from longrope_search.errors import DataError, LongRopeError, ModelError

CONTEXT = 128  # training context of the shipped model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Any attempt to reach the hub fails loudly instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    with gzip.open(builtin.resolve_corpus("builtin:cpython"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin.resolve_model("builtin:tiny"))


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin.resolve_model("builtin:tiny"), dtype=torch.float32).eval()


def test_names_resolve_with_and_without_prefix():
    assert builtin.resolve_model("builtin:tiny") == builtin.resolve_model("tiny")
    assert builtin.resolve_corpus("builtin:cpython") == builtin.resolve_corpus("cpython")
    assert (builtin.resolve_model("tiny") / "config.json").is_file()
    assert (builtin.resolve_model("tiny") / "model.safetensors").is_file()
    assert builtin.resolve_corpus("cpython").is_file()
    assert (builtin.resolve_corpus("cpython").parent / "LICENSE").is_file()
    assert builtin.is_builtin("builtin:tiny")
    assert not builtin.is_builtin("tiny")
    assert not builtin.is_builtin("/models/llama-2-7b")


def test_unknown_names_raise_typed_errors_listing_valid_ones():
    with pytest.raises(ModelError, match="builtin:tiny"):
        builtin.resolve_model("builtin:huge")
    with pytest.raises(DataError, match="builtin:cpython"):
        builtin.resolve_corpus("builtin:pg19")
    assert issubclass(ModelError, LongRopeError) and issubclass(DataError, LongRopeError)


def test_shipped_files_stay_small():
    total = sum(p.stat().st_size for p in builtin.ROOT.rglob("*") if p.is_file())
    assert total < 20 * 2**20


def test_model_has_documented_rope_config(model):
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.max_position_embeddings == CONTEXT
    assert cfg.rope_parameters["rope_type"] == "default"
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.head_dim == 64  # 32 rotary pairs, the length of a factor vector
    assert model.model.rotary_emb.inv_freq.shape == (32,)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 6e6


def test_tokenizer_adds_bos_only_when_asked(tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    with_bos = tokenizer(text)["input_ids"]
    assert plain[0] != tokenizer.bos_token_id
    assert with_bos == [tokenizer.bos_token_id] + plain
    assert tokenizer.decode(plain) == text
    assert len(tokenizer) == 4096
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")


def test_corpus_loads_with_datasets(tmp_path):
    from datasets import load_dataset

    ds = load_dataset(
        "json", data_files=str(builtin.resolve_corpus("cpython")), split="train", cache_dir=str(tmp_path)
    )
    assert set(ds.column_names) == {"text", "source"}
    assert len(ds) >= 48  # room for disjoint search and validation samples


def test_every_corpus_document_is_long_and_held_out(docs, tokenizer):
    facts = json.loads((builtin.resolve_model("tiny") / "training_facts.json").read_text())
    percent = facts["heldout_percent"]
    sources = [d["source"] for d in docs]
    assert len(set(sources)) == len(sources)
    for source in sources:
        # the training script's split: these paths were never in the train files
        assert int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") % 100 < percent
        assert source.endswith(".py") and not source.startswith("site-packages/")
    lengths = [len(ids) for ids in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]]
    assert min(lengths) >= 16 * CONTEXT


def test_the_training_corpus_is_the_stdlib_outside_the_held_out_split(docs, tmp_path):
    """builtin:cpython-train (what `longrope finetune` trains the shipped model on) shares no file with
    builtin:cpython (what searches and evals score on): one rule, `builtin.is_heldout`, splits them."""
    facts = json.loads((builtin.resolve_model("tiny") / "training_facts.json").read_text())
    assert builtin.HELDOUT_PERCENT == facts["heldout_percent"]
    assert all(builtin.is_heldout(d["source"]) for d in docs)
    path = builtin.generated_corpus("builtin:cpython-train", tmp_path / "a")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    sources = [r["source"] for r in rows]
    assert len(rows) > 1000 and sources == sorted(sources) and all(r["text"].strip() for r in rows)
    assert not any(builtin.is_heldout(s) for s in sources) and not set(sources) & {d["source"] for d in docs}
    assert builtin.generated_corpus("builtin:cpython-train", tmp_path / "a") == path  # generated once, then reused
    assert builtin.generated_corpus("cpython-train", tmp_path / "b").read_bytes() == path.read_bytes()  # deterministic
    assert builtin.is_generated("builtin:cpython-train") and not builtin.is_generated("builtin:cpython")
    with pytest.raises(DataError, match="builtin:cpython, builtin:cpython-train"):
        builtin.resolve_corpus("builtin:pg19")


def _ppl(model, tokenizer, texts: list[str], length: int) -> float:
    """exp(mean per-document NLL) of BOS + the first length-1 tokens of each text."""
    nlls = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: length - 1]
            x = torch.tensor([[tokenizer.bos_token_id] + ids])  # (1, length)
            logits = model(input_ids=x).logits[0, :-1]  # (length-1, vocab)
            nlls.append(F.cross_entropy(logits, x[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


@pytest.mark.slow
def test_model_is_good_at_1x_and_breaks_at_8x_without_rescaling(model, tokenizer, docs):
    texts = [d["text"] for d in docs[:4]]
    ppl_1x = _ppl(model, tokenizer, texts, CONTEXT)
    ppl_8x = _ppl(model, tokenizer, texts, 8 * CONTEXT)
    # measured 11.66 at 1x and 45.95 at 8x on these 4 documents (unigram baseline: ~1000)
    assert ppl_1x < 13.5
    assert ppl_8x > 2 * ppl_1x


@pytest.mark.slow
def test_model_retrieves_a_needle_inside_its_window(docs):
    # What `longrope eval --needle` measures, at 1x: held-out code as filler, 20 prompts per depth at 5 depths.
    from longrope_search.model import load_model_config, load_model, rope_spec
    from longrope_search.retrieval import NeedleSettings, mean_over_depths, needle_accuracy

    model, tokenizer = load_model("builtin:tiny", device="cpu", dtype="float32")
    fillers = [tokenizer(d["text"], add_special_tokens=False)["input_ids"][: 2 * CONTEXT] for d in docs[:20]]
    spec = rope_spec(load_model_config("builtin:tiny"))
    accuracy = needle_accuracy(model, tokenizer, spec, [CONTEXT], None, fillers, NeedleSettings(trials=20))
    single = mean_over_depths(accuracy["single"]["none"][CONTEXT])
    multikey = mean_over_depths(accuracy["multikey"]["none"][CONTEXT])
    # measured: 100% single, 99% with 4 keys (the training script's own check, 40 other prompts per depth: 100%, 92.5%)
    assert single >= 0.95 and multikey >= 0.80, (single, multikey)


def test_the_second_model_has_another_geometry_and_loads_the_tokenizer_it_trained_with(docs):
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    path = builtin.resolve_model("builtin:tiny-qwen2")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen2" and cfg.max_position_embeddings == CONTEXT
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 2)  # grouped-query attention
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.hidden_size // cfg.num_attention_heads == 32
    # transformers 5 builds every qwen2 tokenizer as Qwen2Tokenizer with its own pre-tokeniser: the shipped one was
    # trained with that pre-tokeniser, so what AutoTokenizer (longrope, users) runs is what the model saw
    auto, trained = AutoTokenizer.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)
    for text in [d["text"][:4000] for d in docs[:5]]:
        assert auto(text, add_special_tokens=False)["input_ids"] == trained(text, add_special_tokens=False)["input_ids"]
    assert auto.bos_token_id == trained.bos_token_id is not None
