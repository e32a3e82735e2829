"""data.py: local/hub sources give the same samples, seeded disjoint sets, the disk cache, clear errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from longrope_search import data
from longrope_search.corpus import CorpusSpec, load_texts
from longrope_search.data import build_samples
from longrope_search.errors import DataError

VOCAB = 60
BOS, EOS = 1, 2


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word w0..w59, so document lengths in tokens are exact."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i + 3 for i in range(VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", **specials)


def corpus(lengths: list[int], seed: int = 0) -> list[str]:
    """One document per length, made of that many random words."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, VOCAB, n)) for n in lengths]


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) + 3 for w in text.split()]


LENGTHS = [5, 40, 12, 33, 50, 8, 64, 31, 45, 3, 70, 36]  # 8 documents of >= 31 tokens
TEXTS = corpus(LENGTHS)


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Keep the `datasets` arrow cache and our sample cache inside the test's tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LONGROPE_CACHE", str(tmp_path / "cache"))


def write_txt(root, texts):
    root.mkdir()
    for i, text in enumerate(texts):
        (root / f"doc_{i:03d}.txt").write_text(text + "\n")
    return str(root / "*.txt")


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def write_parquet(path, texts):
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path)
    return str(path)


def sample(source, tmp_path, **kw):
    spec = CorpusSpec(source=source, **{k: kw.pop(k) for k in ("text_field", "concatenate", "split", "hub_config", "revision")
                                        if k in kw})
    args = dict(length=32, n_search=3, n_heldout=2, seed=7, cache_dir=tmp_path / "cache") | kw
    return build_samples(word_tokenizer(), spec, **args)


def test_txt_jsonl_jsonl_gz_and_parquet_give_the_same_samples(tmp_path):
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(open(write_jsonl(tmp_path / "tmp.jsonl", TEXTS), "rb").read()))
    sources = [
        write_txt(tmp_path / "txt", TEXTS),
        write_jsonl(tmp_path / "c.jsonl", TEXTS),
        str(gz),
        write_parquet(tmp_path / "c.parquet", TEXTS),
    ]
    results = [sample(s, tmp_path) for s in sources]
    first = results[0]
    assert first.search.shape == (3, 32) and first.heldout.shape == (2, 32)
    for other in results[1:]:
        assert torch.equal(other.search, first.search) and torch.equal(other.heldout, first.heldout)
        assert other.search_docs == first.search_docs and other.fingerprint == first.fingerprint


def test_a_txt_file_is_one_document_not_one_line(tmp_path):
    (tmp_path / "book.txt").write_text("\n".join(TEXTS))  # 12 lines, one document
    assert len(load_texts(CorpusSpec(str(tmp_path / "book.txt")))) == 1


def test_sample_is_bos_then_document_start_and_sets_are_disjoint(tmp_path):
    s = sample(write_jsonl(tmp_path / "c.jsonl", TEXTS), tmp_path)
    assert not set(s.search_docs) & set(s.heldout_docs)
    assert len(set(s.search_docs + s.heldout_docs)) == 5
    for row, ids in zip(s.search_docs + s.heldout_docs, torch.cat([s.search, s.heldout])):
        assert LENGTHS[row] >= 31
        assert ids.tolist() == [BOS] + ids_of(TEXTS[row])[:31]


def test_seed_decides_the_documents_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    a = sample(path, tmp_path, seed=1, cache_dir=tmp_path / "c1")
    b = sample(path, tmp_path, seed=1, cache_dir=tmp_path / "c2")
    c = sample(path, tmp_path, seed=2, cache_dir=tmp_path / "c3")
    assert a.search_docs == b.search_docs and torch.equal(a.search, b.search)
    assert a.search_docs + a.heldout_docs != c.search_docs + c.heldout_docs


def test_tokenizer_without_bos_takes_the_first_length_tokens(tmp_path):
    spec = CorpusSpec(write_jsonl(tmp_path / "c.jsonl", TEXTS))
    s = build_samples(word_tokenizer(bos=False), spec, 32, 2, 1, seed=0, cache_dir=tmp_path / "cache")
    for row, ids in zip(s.search_docs, s.search):
        assert LENGTHS[row] >= 32 and ids.tolist() == ids_of(TEXTS[row])[:32]


def test_too_few_long_documents_is_one_data_error_with_the_counts(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    with pytest.raises(DataError) as err:
        sample(path, tmp_path, length=52, n_search=2, n_heldout=1)  # needs 51 tokens: only 64 and 70 qualify
    msg = str(err.value)
    assert "has 2 documents of at least 51 tokens but 3 are needed (2 search + 1 held-out)" in msg
    assert "longest document has 70 tokens" in msg and "concatenate: true" in msg


def test_concatenate_cuts_windows_from_short_documents_joined_with_eos(tmp_path):
    texts = corpus([4, 7, 2, 9, 5, 6, 3, 8, 10, 4] * 3)
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    s = sample(path, tmp_path, length=16, n_search=2, n_heldout=1, concatenate=True)
    assert s.search.shape == (2, 16) and s.heldout.shape == (1, 16)
    assert (s.search[:, 0] == BOS).all() and (s.heldout[:, 0] == BOS).all()
    assert not set(s.search_docs) & set(s.heldout_docs)
    stream = sum((ids_of(texts[r]) + [EOS] for r in s.search_docs), [])
    assert s.search[:, 1:].reshape(-1).tolist() == stream[:30]
    held = sum((ids_of(texts[r]) + [EOS] for r in s.heldout_docs), [])
    assert s.heldout[0, 1:].tolist() == held[:15]


def test_concatenate_too_small_corpus_names_the_tokens(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", corpus([4, 5, 6]))  # 18 tokens with EOS
    with pytest.raises(DataError, match=r"only 1 windows of 15 tokens .* 3 are needed .* from its 18 tokens"):
        sample(path, tmp_path, length=16, n_search=2, n_heldout=1, concatenate=True)


def test_hub_source_calls_load_dataset_with_name_config_split(tmp_path, monkeypatch):
    import datasets

    local = sample(write_jsonl(tmp_path / "c.jsonl", TEXTS), tmp_path)
    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, split, revision))
        return datasets.Dataset.from_dict({"content": TEXTS, "id": list(range(len(TEXTS)))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = sample("hub:someone/books", tmp_path, text_field="content", hub_config="en", split="test")
    assert calls == [("someone/books", "en", "test", None)]
    assert torch.equal(hub.search, local.search) and torch.equal(hub.heldout, local.heldout)
    # a pinned revision is passed on and is part of the cache key (the cached windows above are not reused)
    pinned = sample("hub:someone/books", tmp_path, text_field="content", hub_config="en", split="test", revision="abc123")
    assert calls[-1] == ("someone/books", "en", "test", "abc123") and len(calls) == 2
    assert torch.equal(pinned.search, local.search)


def test_builtin_source_reads_the_shipped_file(tmp_path, monkeypatch):
    from longrope_search import builtin

    shipped = tmp_path / "shipped.jsonl.gz"
    shipped.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()))
    monkeypatch.setattr(builtin, "resolve_corpus", lambda spec: shipped)
    local = sample(write_jsonl(tmp_path / "c.jsonl", TEXTS), tmp_path)
    assert torch.equal(sample("builtin:cpython", tmp_path).search, local.search)
    shipped.unlink()
    with pytest.raises(DataError, match="built-in corpus file .* is missing"):
        load_texts(CorpusSpec("builtin:cpython"))


def test_hub_failure_becomes_a_data_error(monkeypatch, tmp_path):
    import datasets

    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nobody/none' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="cannot load hub dataset 'nobody/none'.*check the name"):
        load_texts(CorpusSpec("hub:nobody/none"))


def test_second_call_hits_the_disk_cache_without_reading_or_tokenising(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    first = sample(path, tmp_path)
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(data, "load_texts", fail)
    monkeypatch.setattr(data, "_encode", fail)
    again = sample(path, tmp_path)
    assert torch.equal(again.search, first.search) and again.fingerprint == first.fingerprint
    assert again.heldout_docs == first.heldout_docs


def test_cache_key_changes_with_the_corpus_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    first = sample(path, tmp_path)
    write_jsonl(tmp_path / "c.jsonl", corpus(LENGTHS, seed=1))
    assert not torch.equal(sample(path, tmp_path).search, first.search)


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS)
    first = sample(path, tmp_path)
    (cached,) = (tmp_path / "cache" / "samples").glob("*.pt")
    cached.write_bytes(b"not a torch file")
    again = sample(path, tmp_path)
    assert torch.equal(again.search, first.search)
    assert data._read_cache(cached, 3, 2, 32) is not None  # rewritten whole


def test_large_corpus_stops_tokenising_once_enough_documents_qualify(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", corpus([40] * 2000))
    seen = []
    encode = data._encode

    def counting(tokenizer, texts):
        seen.extend(texts)
        return encode(tokenizer, texts)

    monkeypatch.setattr(data, "_encode", counting)
    sample(path, tmp_path, n_search=2, n_heldout=1)
    assert len(seen) == 16  # the first block only


def test_fingerprint_is_the_hash_of_the_search_ids(tmp_path):
    s = sample(write_jsonl(tmp_path / "c.jsonl", TEXTS), tmp_path)
    assert s.fingerprint == data.ids_fingerprint(s.search) and len(s.fingerprint) == 16
    changed = s.search.clone()
    changed[0, -1] += 1
    assert data.ids_fingerprint(changed) != s.fingerprint


def test_missing_sources_and_fields_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(CorpusSpec(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="no file matches"):
        load_texts(CorpusSpec(str(tmp_path / "*.parquet")))
    path = write_jsonl(tmp_path / "c.jsonl", TEXTS, field="body")
    with pytest.raises(DataError, match=r"no field 'text' \(fields: body, id\)"):
        load_texts(CorpusSpec(path))
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match="unsupported type"):
        load_texts(CorpusSpec(str(tmp_path / "a.csv")))


def test_corpus_spec_of_a_config_section_keeps_every_field():
    from longrope_search.config import DataSection

    section = DataSection(source="hub:someone/books", hub_config="en", split="test", text_field="content",
                          concatenate=True, revision="abc123")
    spec = CorpusSpec.of(section)
    assert (spec.source, spec.hub_config, spec.split, spec.text_field, spec.concatenate, spec.revision) == (
        "hub:someone/books", "en", "test", "content", True, "abc123")
