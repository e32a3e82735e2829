"""`longrope eval` on tiny random models: the method table, held-out windows that never touch a search document,
the eval.json schema, and passkey retrieval (prompt geometry, determinism, the installed RoPE during generation)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from search_fixtures import WORDS, search_config
from tiny_models import tiny_model, tiny_tokenizer

from longrope_search import eval_result as er
from longrope_search import evaluate as ev
from longrope_search import methods as mt
from longrope_search import passkey as pk
from longrope_search.config import from_dict
from longrope_search.corpus import CorpusSpec
from longrope_search.data import build_samples
from longrope_search.errors import ConfigError, DataError, ModelError
from longrope_search.factors import FactorsFile, Scores, load_factors
from longrope_search.fitness import perplexity
from longrope_search.model import install_rope
from longrope_search.rope import RopeSpec, ntk_factors, scaled_inv_freq
from longrope_search.search_run import run_search

SPEC = RopeSpec(base=10000.0, rotary_dim=16, original_length=32)  # the tiny llama saved by write_model
ALL = {"none", "pi", "ntk", "yarn", "pi@4x", "ntk@4x", "yarn@4x", "longrope"}


def write_mixed_corpus(root: Path, long_words: int = 120, documents: int = 16) -> Path:
    """Long documents (~350 tokens) alternating with short ones (~35): shorter lengths qualify more documents."""
    rng = random.Random(0)
    path = root / "corpus"
    path.mkdir()
    for i in range(documents):
        words = 12 if i % 2 else long_words
        (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tiny_files):
    """A finished 4x search (32 -> 128 tokens) on the mixed corpus: (run_dir, model_dir, corpus_dir)."""
    model, corpus = tiny_files("eval", corpus=write_mixed_corpus)
    root = model.parent
    config = from_dict(search_config(model, corpus, population=4, parents=2, generations=0))
    _, run_dir = run_search(config, root / "run")
    return run_dir, model, corpus


def factors_file(factors: list[float], mscale: float, target: int = 128, n_hat: int = 0, short=None) -> FactorsFile:
    return FactorsFile(model="tiny", rope=SPEC, target_length=target, factors=factors, n_hat=n_hat, mscale=mscale,
                       short_factors=short)


# --- methods ------------------------------------------------------------------------------------------


def test_methods_reduce_to_ones_inside_the_window_and_longrope_keeps_its_mscale():
    ff = factors_file([1.5] * 8, mscale=1.2, n_hat=4, short=[1.1] * 8)
    for length in (16, 32):
        methods = {m.name: m for m in mt.methods_for(SPEC, length, ff)}
        assert set(methods) == ALL
        for name in ("none", "pi", "ntk", "yarn"):
            assert methods[name].factors == (1.0,) * 8 and methods[name].mscale == 1.0 and methods[name].n_hat == 0
        # transformers' longrope: short factors, no n_hat, and the same attention_factor as the long ones
        assert methods["longrope"] == mt.Method("longrope", (1.1,) * 8, 0, 1.2)
    assert mt.methods_for(SPEC, 32, factors_file([1.5] * 8, 1.2))[-1].factors == (1.0,) * 8  # no short factors

    methods = {m.name: m for m in mt.methods_for(SPEC, 128, ff)}
    assert methods["pi"].factors == (4.0,) * 8 and methods["pi"].mscale == 1.0
    assert methods["ntk"].factors == tuple(ntk_factors(SPEC, 4.0).tolist())
    assert methods["yarn"].mscale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert methods["longrope"] == mt.Method("longrope", (1.5,) * 8, 4, 1.2)
    # past the target the long factors stay (what a served model does), baselines stretch to the new scale
    methods = {m.name: m for m in mt.methods_for(SPEC, 256, ff)}
    assert methods["longrope"].factors == (1.5,) * 8 and methods["pi"].factors == (8.0,) * 8
    assert [m.name for m in mt.methods_for(SPEC, 128, None)] == ["none", "pi", "ntk", "yarn"]


def test_fixed_rows_run_the_target_configuration_at_every_length_as_transformers_does():
    """pi@4x, ntk@4x, yarn@4x: the configuration deployed for the factors' target (what `export --factors yarn
    --target 4x` writes), identical at every length; at the target itself the same as the rescaled rows."""
    ff = factors_file([1.5] * 8, mscale=1.2)
    deployed = {name: mt.method_file(name, "tiny", SPEC, 128) for name in ("pi", "ntk", "yarn")}
    for length in (16, 64, 128, 512):
        methods = {m.name: m for m in mt.methods_for(SPEC, length, ff)}
        assert list(methods) == ["none", "pi", "ntk", "yarn", "pi@4x", "ntk@4x", "yarn@4x", "longrope"]
        for name, file in deployed.items():
            assert methods[f"{name}@4x"] == mt.Method(f"{name}@4x", tuple(file.factors), 0, file.mscale)
            assert (methods[f"{name}@4x"].key == methods[name].key) == (length == 128)
    assert methods["yarn@4x"].mscale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # a baseline's own file: its row is named METHOD@TARGET (never "longrope") and not repeated
    rows = [m.name for m in mt.methods_for(SPEC, 512, deployed["yarn"])]
    assert rows == ["none", "pi", "ntk", "yarn", "pi@4x", "ntk@4x", "yarn@4x"]
    assert mt.methods_for(SPEC, 512, deployed["yarn"])[-1].factors == tuple(deployed["yarn"].factors)
    odd = factors_file([1.5] * 8, mscale=1.2, target=80)  # not a whole multiple of the window: named by length
    assert [m.name for m in mt.methods_for(SPEC, 80, odd)][4:] == ["pi@80", "ntk@80", "yarn@80", "longrope"]
    table = er.render_tables(er.EvalResult([32], {"yarn": {32: 2.0}, "yarn@4x": {32: 3.0}}, 1, "m"))[0]
    assert "yarn: rescaled to each length" in table.caption and "@4x: fixed at the target" in table.caption


def test_factors_of_another_geometry_are_refused():
    other = FactorsFile(model="x", rope=RopeSpec(500000.0, 16, 32), target_length=128, factors=[1.0] * 8)
    with pytest.raises(ModelError, match="rope_theta 500000 but"):
        mt.methods_for(SPEC, 128, other)


# --- perplexity ---------------------------------------------------------------------------------------


def test_run_table_matches_the_searched_scores_and_writes_eval_json(tiny_run):
    run_dir, _, _ = tiny_run
    ff = load_factors(run_dir)
    result = ev.evaluate(["1x", "2x", "4x"], run_dir=run_dir)
    assert result.lengths == [32, 64, 128] and result.samples == 2
    assert set(result.ppl) == ALL and all(set(row) == {32, 64, 128} for row in result.ppl.values())
    assert all(math.isfinite(v) and v > 1.0 for row in result.ppl.values() for v in row.values())
    # inside the window the baselines all run factors 1 and mscale 1: one number
    assert len({result.ppl[m][32] for m in ("none", "pi", "ntk", "yarn")}) == 1
    assert result.ppl["longrope"][32] != result.ppl["none"][32]  # its mscale still applies (transformers does too)
    # at the target with the run's held-out count, the windows are the run's own held-out set: same scores
    assert result.ppl["longrope"][128] == pytest.approx(ff.scores.heldout, rel=1e-6)
    for name in ("none", "pi", "ntk", "yarn"):
        assert result.ppl[name][128] == pytest.approx(ff.baselines[name].heldout, rel=1e-6)

    doc = json.loads((run_dir / "eval.json").read_text())
    assert set(doc) == {"lengths", "ppl", "passkey", "samples", "model", "factors", "heldout", "measured"}
    assert doc["heldout"]
    assert doc["lengths"] == [32, 64, 128] and doc["passkey"] == {} and doc["samples"] == 2
    assert doc["factors"] == str(run_dir / "factors.json") and doc["model"] == ff.model
    assert set(doc["ppl"]["pi"]) == {"32", "64", "128"} and doc["ppl"]["pi"]["64"] == result.ppl["pi"][64]
    assert er.EvalResult.from_json(doc) == result


def test_eval_json_keeps_what_a_copied_or_renamed_run_measured_before(tiny_run, tmp_path, monkeypatch):
    """eval.json merges on what was measured (model config, factors' content, corpus), not on the path typed: a
    copy of the run evaluated at another length keeps the earlier lengths, and says so."""
    import shutil

    run_dir, _, _ = tiny_run
    copy = tmp_path / "renamed"
    shutil.copytree(run_dir, copy)
    (copy / "eval.json").unlink(missing_ok=True)
    first = ev.evaluate(["1x", "2x"], run_dir=copy)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(copy, moved)  # the folder copied again, then reached by a relative path
    monkeypatch.chdir(moved.parent)
    second = ev.evaluate(["4x"], run_dir=Path("run"))
    doc = json.loads((moved / "eval.json").read_text())
    assert doc["lengths"] == [32, 64, 128] and set(doc["ppl"]["pi"]) == {"32", "64", "128"}
    assert doc["ppl"]["pi"]["32"] == first.ppl["pi"][32] and first.measured == second.measured
    assert second.merge_note == "kept from the earlier eval.json: lengths 32, 64"
    # other factors in the same folder: a different measurement, replaced and said so
    ff = load_factors(moved)
    ff.factors = [f * 1.01 for f in ff.factors]
    ff.save(moved / "factors.json")
    third = ev.evaluate(["4x"], run_dir=Path("run"))
    assert "held another measurement" in third.merge_note
    assert json.loads((moved / "eval.json").read_text())["lengths"] == [128]


def test_longrope_with_pi_factors_and_mscale_scores_like_pi(tiny_run):
    _, model_dir, corpus = tiny_run
    from longrope_search.model import load_model

    model, tokenizer = load_model(str(model_dir), device="cpu")
    ff = factors_file([4.0] * 8, mscale=1.0)
    result = ev.eval_ppl(model, tokenizer, SPEC, CorpusSpec(str(corpus)), [128], ff, samples=2,
                         cache_dir=corpus.parent / "cache", chunk_size=48)
    assert result.ppl["longrope"][128] == result.ppl["pi"][128] != result.ppl["none"][128]
    ids, _ = ev.heldout_windows(tokenizer, CorpusSpec(str(corpus)), 128, 2, cache_dir=corpus.parent / "cache")
    install_rope(model, [4.0] * 8)
    assert perplexity(model, ids, 48).ppl == pytest.approx(result.ppl["pi"][128], rel=1e-6)


def test_model_mode_and_errors(tiny_run):
    run_dir, model_dir, corpus = tiny_run
    result = ev.evaluate(["64"], model=str(model_dir), factors=run_dir, data=str(corpus), samples=1)
    assert set(result.ppl) == ALL and result.samples == 1 and result.factors == str(run_dir / "factors.json")
    with pytest.raises(ConfigError, match="--model with --factors"):
        ev.evaluate(["64"], model=str(model_dir), data=str(corpus))
    with pytest.raises(ConfigError, match="--data"):
        ev.evaluate(["64"], model=str(model_dir), factors=run_dir)
    with pytest.raises(ConfigError, match="drop RUN_DIR"):
        ev.evaluate(["64"], run_dir=run_dir, factors=run_dir)
    with pytest.raises(ConfigError, match="--lengths"):
        ev.evaluate([], run_dir=run_dir)
    with pytest.raises(ConfigError, match="--samples 1"):
        ev.evaluate(["64"], run_dir=run_dir, samples=0)
    with pytest.raises(DataError, match="at least 1023 tokens"):  # no document is that long
        ev.evaluate(["32x"], run_dir=run_dir)


def test_flags_with_a_runs_factors_and_its_corpus_exclude_the_runs_documents_else_say_not_held_out(tiny_run, tmp_path):
    run_dir, model_dir, corpus = tiny_run
    by_run = ev.evaluate(["2x", "4x"], run_dir=run_dir, samples=2)
    # --factors RUN (or RUN/factors.json) and --data naming the run's corpus (a folder for its glob): the same windows
    for factors in (run_dir, run_dir / "factors.json"):
        by_flags = ev.evaluate(["2x", "4x"], model=str(model_dir), factors=factors, data=str(corpus), samples=2)
        assert by_flags.heldout and by_flags.not_heldout is None
        assert by_flags.ppl == by_run.ppl
    # the naive draw (what flags did before) scores the run's search documents at the target
    naive = ev.evaluate(["4x"], model=str(model_dir), factors=run_dir, data=str(corpus / "doc0*.txt"), samples=2)
    assert not naive.heldout and "not the corpus the factors were searched on" in naive.not_heldout
    assert naive.ppl["longrope"][128] != by_run.ppl["longrope"][128]
    # a bare factors.json: the documents the search used are unknown
    bare = tmp_path / "bare.json"
    bare.write_text((run_dir / "factors.json").read_text())
    result = ev.evaluate(["4x"], model=str(model_dir), factors=bare, data=str(corpus), samples=2)
    assert not result.heldout and "not inside a run directory" in result.not_heldout
    doc = result.to_json()
    assert doc["heldout"] is False and doc["not_heldout"] == result.not_heldout
    title = er.render_tables(result)[0].title
    assert "NOT held out from the search" in title and "held-out samples" not in title
    assert "2 held-out samples" in er.render_tables(by_run)[0].title


# --- held-out windows ---------------------------------------------------------------------------------


def test_heldout_documents_never_include_the_runs_search_documents(tiny_run):
    run_dir, _, corpus = tiny_run
    tokenizer, spec, cache = tiny_tokenizer(), CorpusSpec(str(corpus / "*.txt")), corpus.parent / "cache"
    run = build_samples(tokenizer, spec, 128, 2, 2, 0, cache)  # what the run searched on (data settings of the fixture)
    sampling = ev.RunSampling(128, 2, 2, 0)
    # the hazard: at 1x short documents qualify and push a search document into the naive held-out set
    naive = build_samples(tokenizer, spec, 32, 2, 2, 0, cache)
    assert set(naive.heldout_docs) & set(run.search_docs)
    for length in (16, 32, 64, 128, 256):
        ids, docs = ev.heldout_windows(tokenizer, spec, length, 3, cache_dir=cache, exclude=sampling)
        assert ids.shape == (3, length) and len(set(docs)) == 3
        assert not set(docs) & set(run.search_docs), length
    ids, docs = ev.heldout_windows(tokenizer, spec, 128, 2, cache_dir=cache, exclude=sampling)
    assert docs == run.heldout_docs and torch.equal(ids, run.heldout)
    stale = ev.RunSampling(128, 2, 2, 0, fingerprint="0" * 16)
    with pytest.raises(DataError, match="changed since the search"):
        ev.heldout_windows(tokenizer, spec, 64, 2, cache_dir=cache, exclude=stale)


def test_heldout_streams_never_include_search_documents_when_concatenated(tmp_path):
    tokenizer, corpus = tiny_tokenizer(), write_mixed_corpus(tmp_path, long_words=12, documents=40)  # ~35 tokens each
    spec, cache = CorpusSpec(str(corpus), concatenate=True), tmp_path / "cache"
    run = build_samples(tokenizer, spec, 128, 2, 1, 0, cache)
    naive = build_samples(tokenizer, spec, 16, 2, 1, 0, cache)
    assert set(naive.heldout_docs) & set(run.search_docs)  # a shorter search stream ends earlier
    for length in (16, 48, 128, 300):
        ids, docs = ev.heldout_windows(tokenizer, spec, length, 2, cache_dir=cache,
                                       exclude=ev.RunSampling(128, 2, 1, 0, run.fingerprint))
        assert ids.shape == (2, length) and docs and not set(docs) & set(run.search_docs), length


# --- results ------------------------------------------------------------------------------------------


def test_json_round_trip_keeps_infinite_ppl_as_null_and_tables_mark_the_best():
    result = er.EvalResult(lengths=[32, 256], ppl={"none": {32: 5.0, 256: math.inf}, "pi": {32: 5.0, 256: 9.5}},
                           samples=3, model="m", factors=None, passkey={"none": {32: 1.0, 256: 0.0},
                                                                        "pi": {32: 0.5, 256: 0.25}})
    doc = json.loads(json.dumps(result.to_json(), allow_nan=False))  # strict JSON: no Infinity
    assert doc == {"lengths": [32, 256], "ppl": {"none": {"32": 5.0, "256": None}, "pi": {"32": 5.0, "256": 9.5}},
                   "passkey": {"none": {"32": 1.0, "256": 0.0}, "pi": {"32": 0.5, "256": 0.25}},
                   "samples": 3, "model": "m", "factors": None, "heldout": True}
    assert er.EvalResult.from_json(doc) == result

    ppl_table, passkey_table = er.render_tables(result, original_length=32)
    assert [c.header for c in ppl_table.columns] == ["method", "32 (1x)", "256 (8x)"]
    cells = {c.header: [str(x) for x in c._cells] for c in ppl_table.columns}
    assert cells["method"] == ["none", "pi"]
    assert cells["32 (1x)"] == ["5.000*", "5.000*"] and cells["256 (8x)"] == ["inf ", "9.500*"]  # a tie marks both
    assert [str(x) for x in passkey_table.columns[2]._cells] == ["0.00 ", "0.25*"]  # higher is better


# --- passkey ------------------------------------------------------------------------------------------


def _first_prefix_containing(tokenizer, ids: torch.Tensor, text: str) -> int:
    """Smallest k such that the first k tokens decode to something containing `text` (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if text in tokenizer.decode(ids[:mid], skip_special_tokens=True):
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_passkey_prompt_has_the_length_and_the_needle_at_the_depth(depth):
    tokenizer = tiny_tokenizer()
    prompt = pk.passkey_prompt(tokenizer, 800, "48213", depth)
    assert 800 - 8 <= len(prompt.ids) <= 800  # short by less than one filler word (~5 tokens here)
    assert prompt.ids[0] == tokenizer.bos_token_id and prompt.key == "48213"
    text = tokenizer.decode(prompt.ids, skip_special_tokens=True)
    assert text.startswith(pk.INTRO) and text.endswith("\n" + pk.QUESTION) and text.count("48213") == 2
    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # depth = share of the filler tokens (between the intro and the needle + question) before the needle
    start = _first_prefix_containing(tokenizer, prompt.ids, pk.INTRO)
    needle = _first_prefix_containing(tokenizer, prompt.ids, "The pass key is 48213") - tokens("The pass key is 48213")
    filler = len(prompt.ids) - start - tokens(pk.NEEDLE.format(key="48213") + "\n" + pk.QUESTION)
    assert abs((needle - start) / filler - depth) < 0.06 and abs(prompt.depth - depth) < 0.06
    with pytest.raises(ConfigError, match="longer lengths"):
        pk.passkey_prompt(tokenizer, 64, "48213", depth)


def test_passkey_accuracy_per_method_and_length_is_deterministic_and_uses_the_installed_rope():
    model, tokenizer = tiny_model("llama", max_position_embeddings=32), tiny_tokenizer()
    ff = factors_file([1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 8.0], mscale=1.15, target=256)
    seen: list[tuple[tuple[float, ...], int]] = []
    module = install_rope(model, [1.0] * 8)  # passkey reinstalls candidates into this same module
    module.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((tuple(mod.inv_freq.tolist()), int(kwargs["position_ids"].max()))),
        with_kwargs=True,
    )
    scores = pk.passkey(model, tokenizer, SPEC, [256, 288], ff, trials=2, seed=7)
    assert set(scores) == {name.replace("@4x", "@8x") for name in ALL}  # the file's target: 256 = 8x the window
    assert all(set(row) == {256, 288} for row in scores.values())
    assert all(v in (0.0, 0.5, 1.0) for row in scores.values() for v in row.values())  # a random model: ~0
    again = pk.passkey(model, tokenizer, SPEC, [288], ff, trials=2, seed=7)
    assert again == {name: {288: row[288]} for name, row in scores.items()}
    # every method's frequencies reached the decoding steps (positions past the prompt), not just the prefill
    for length in (256, 288):
        for method in mt.methods_for(SPEC, length, ff):
            inv_freq = tuple(scaled_inv_freq(SPEC, torch.tensor(method.factors)).tolist())
            positions = [p for f, p in seen if f == inv_freq]
            assert positions and max(positions) >= length - 8, (method.name, length)
    assert pk.passkey_trials(3, 7) == pk.passkey_trials(3, 7) != pk.passkey_trials(3, 8)
    assert all(len(key) == 5 and 0.0 <= depth <= 1.0 for key, depth in pk.passkey_trials(10, 0))


def test_a_later_eval_adds_to_eval_json_instead_of_erasing_it(tmp_path):
    from longrope_search.eval_result import EvalResult

    path = tmp_path / "eval.json"
    long = EvalResult([256, 512], {"pi": {256: 3.0, 512: 4.0}}, 4, "m", "f", {"pi": {512: 0.5}})
    long.save(path)
    quick = EvalResult([32], {"pi": {32: 2.0}, "none": {32: 2.0}}, 4, "m", "f")
    merged = quick.merged_into(path)
    assert merged.lengths == [32, 256, 512]
    assert merged.ppl == {"pi": {256: 3.0, 512: 4.0, 32: 2.0}, "none": {32: 2.0}}
    assert merged.passkey == {"pi": {512: 0.5}}
    other = EvalResult([32], {"pi": {32: 9.0}}, 8, "m", "f")  # other samples: not comparable, replaces
    replaced = other.merged_into(path)
    assert replaced.ppl == other.ppl and replaced.lengths == [32] and "replaced" in replaced.merge_note
    assert merged.merge_note == "kept from the earlier eval.json: lengths 256, 512"


def test_eval_says_when_no_method_retrieves_a_passkey_and_search_warns_of_a_winner_worse_than_yarn(tiny_run,
                                                                                                   monkeypatch):
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    from longrope_search import cli

    run_dir, _, _ = tiny_run
    measured = er.EvalResult([32, 128], {"none": {32: 9.0, 128: 30.0}}, 2, "m", str(run_dir / "factors.json"),
                             passkey={"none": {32: 0.0, 128: 0.0}, "longrope": {32: 0.0, 128: 0.0}})
    monkeypatch.setattr(ev, "evaluate", lambda *args, **kwargs: measured)  # the shipped model's passkey result
    result = CliRunner().invoke(cli.app, ["eval", str(run_dir), "--lengths", "1x,4x", "--passkey"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "no method, the unmodified model included, retrieved a passkey" in " ".join(result.output.split())
    measured.passkey["longrope"][128] = 0.5
    assert "retrieved a passkey" not in CliRunner().invoke(cli.app, ["eval", str(run_dir), "-l", "1x", "--passkey"]).output
    from longrope_search import report

    out = io.StringIO()
    console = Console(file=out, width=300)
    ff = load_factors(run_dir)
    ff.scores, ff.baselines["yarn"] = Scores(heldout=20.0), Scores(heldout=19.0)
    report.show_result(console, ff, run_dir)
    assert "warning: the winner's held-out perplexity 20.0000 is worse than YaRN's 19.0000; export YaRN instead " \
           "(longrope export --factors yarn --target 4x" in out.getvalue()
    ff.scores = Scores(heldout=18.0)
    out.truncate(0)
    report.show_result(console, ff, run_dir)
    assert "worse than YaRN" not in out.getvalue()
