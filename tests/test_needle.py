"""The retrieval task: needle samples (exact length, depth, answer tokens), deterministic draws, the exact-match rule,
and `longrope eval --needle` (accuracy per method, length and depth; eval.json; bad input as one line)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from search_fixtures import code_text, search_config, write_code_corpus, write_model
from tiny_models import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from longrope_search import needle as nd
from longrope_search import retrieval
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.errors import ConfigError, DataError
from longrope_search.eval_result import EvalResult, render_tables
from longrope_search.factors import FactorsFile
from longrope_search.rope import RopeSpec
from longrope_search.search_run import run_search

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def filler(tokenizer, lines: int = 400, seed: int = 0) -> list[int]:
    return tokenizer(code_text(lines, seed), add_special_tokens=False)["input_ids"]


# --- construction -----------------------------------------------------------------------------------------


def test_draws_are_deterministic_distinct_and_5_to_7_digits():
    a = nd.draw_needles(np.random.default_rng(3), 8)
    assert a == nd.draw_needles(np.random.default_rng(3), 8) != nd.draw_needles(np.random.default_rng(4), 8)
    assert len({n.name for n in a}) == 8 and len({n.value for n in a}) == 8
    assert all(5 <= len(n.value) <= 7 and n.value[0] != "0" and n.value.isdigit() for n in a)
    assert all(n.name.replace("_", "").isalpha() and n.name.isupper() for n in a)
    with pytest.raises(ConfigError, match="1 to 64 keys"):
        nd.draw_needles(np.random.default_rng(0), 0)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_sample_has_the_length_the_needle_at_the_depth_and_exactly_the_answer_tokens(tokenizer, depth):
    doc = filler(tokenizer)
    needle = nd.Needle("CACHE_TIMEOUT", "4817263")
    sample = nd.build_sample(tokenizer, doc, 300, [needle], [depth])
    assert sample.ids.shape == (300,) and sample.ids[0] == tokenizer.bos_token_id
    # the answer is the last tokens, and exactly the number with its leading space
    assert tokenizer.decode(sample.answer) == " 4817263"
    assert tokenizer.decode(sample.prompt).endswith("\nassert CACHE_TIMEOUT ==")
    assert sample.predicting.tolist() == list(range(sample.answer_start - 1, 299))
    text = tokenizer.decode(sample.ids[1:])
    assert text.count("CACHE_TIMEOUT = 4817263\n") == 1
    # the needle sits at a line break near the asked depth of the filler (within the search window)
    room = 300 - nd.needle_overhead(tokenizer, [needle])
    assert abs(sample.depth - depth) <= nd.LINE_SEARCH / room
    before = text[: text.index("CACHE_TIMEOUT = ")]
    assert before == "" or before.endswith("\n")
    # the filler is the document's first tokens, in order, around the needle
    assert tokenizer.decode(sample.ids[1:]).replace("\nCACHE_TIMEOUT = 4817263\n", "", 1).startswith(
        tokenizer.decode(doc[:20]))


def test_multikey_sample_asks_one_of_several_needles(tokenizer):
    needles = nd.draw_needles(np.random.default_rng(0), 4)
    sample = nd.build_sample(tokenizer, filler(tokenizer), 400, needles, [0.1, 0.9, 0.5, 0.3], asked=2)
    text = tokenizer.decode(sample.ids[1:])
    assert all(text.count(f"{n.name} = {n.value}\n") == 1 for n in needles)
    assert text.endswith(f"assert {needles[2].name} == {needles[2].value}") and sample.value == needles[2].value
    positions = [text.index(f"{n.name} =") for n in needles]
    assert positions[0] < positions[3] < positions[2] < positions[1]  # in depth order


def test_bad_construction_inputs_are_typed_errors(tokenizer):
    needle = [nd.Needle("A_B", "12345")]
    with pytest.raises(ConfigError, match="shares of the context, from 0 to 1"):
        nd.build_sample(tokenizer, filler(tokenizer), 200, needle, [1.5])
    with pytest.raises(ConfigError, match="needs .* tokens before any filler"):
        nd.build_sample(tokenizer, filler(tokenizer), 5, needle, [0.5])
    with pytest.raises(DataError, match="filler document has"):
        nd.build_sample(tokenizer, filler(tokenizer)[:10], 200, needle, [0.5])


def test_exact_match_is_the_whole_number():
    sample = nd.NeedleSample(torch.zeros(4, dtype=torch.long), 3, "48172", 0.5)
    assert nd.is_retrieved(sample, " 48172\n")
    assert nd.is_retrieved(sample, " 48172 and more")
    assert not nd.is_retrieved(sample, " 481723")  # the number goes on
    assert not nd.is_retrieved(sample, " 4817")
    assert not nd.is_retrieved(sample, " x48172")


# --- trials -----------------------------------------------------------------------------------------------


def test_trials_are_the_same_for_every_method_and_differ_by_variant_and_seed():
    settings = retrieval.NeedleSettings(trials=5, keys=3, seed=1)
    single, multi = retrieval.draw_trials(settings, "single"), retrieval.draw_trials(settings, "multikey")
    assert single == retrieval.draw_trials(settings, "single")
    assert all(len(t.needles) == 1 for t in single) and all(len(t.needles) == 3 for t in multi)
    assert single != retrieval.draw_trials(retrieval.NeedleSettings(trials=5, keys=3, seed=2), "single")
    trial = multi[0]
    depths = trial.depths(0.4)
    assert depths[trial.asked] == 0.4 and len(depths) == 3


@pytest.mark.parametrize("settings, message", [
    (retrieval.NeedleSettings(trials=0), "needle-trials must be at least 1"),
    (retrieval.NeedleSettings(depths=(0.0, 1.2)), "shares of the context from 0 to 1"),
    (retrieval.NeedleSettings(depths=()), "shares of the context"),
    (retrieval.NeedleSettings(keys=1), "--keys"),
])
def test_bad_settings_name_the_option(settings, message):
    with pytest.raises(ConfigError, match=message):
        settings.check()


def test_accuracy_per_method_length_and_depth_is_deterministic(tokenizer):
    model = tiny_model("llama", max_position_embeddings=128)
    spec = RopeSpec(10000.0, 16, 128)
    ff = FactorsFile(model="tiny", rope=spec, target_length=256, factors=[2.0] * 8, mscale=1.1)
    fillers = [filler(tokenizer, seed=i) for i in range(3)]
    settings = retrieval.NeedleSettings(trials=3, depths=(0.0, 1.0), keys=2)
    result = retrieval.needle_accuracy(model, tokenizer, spec, [128, 256], ff, fillers, settings)
    assert set(result) == {"single", "multikey"}
    assert set(result["single"]) == {"none", "pi", "ntk", "yarn", "pi@2x", "ntk@2x", "yarn@2x", "longrope"}
    for rows in result.values():
        for by_length in rows.values():
            assert set(by_length) == {128, 256}
            for cells in by_length.values():
                assert set(cells) == {0.0, 1.0} and all(v in (0.0, 1 / 3, 2 / 3, 1.0) for v in cells.values())
    assert retrieval.needle_accuracy(model, tokenizer, spec, [128, 256], ff, fillers, settings) == result
    with pytest.raises(ConfigError, match="need as many filler documents"):
        retrieval.needle_accuracy(model, tokenizer, spec, [128], ff, fillers[:2], settings)


def test_a_model_that_copies_is_scored_correct(tokenizer, monkeypatch):
    """greedy_answer replaced by an oracle that reads the sample: every cell is 1.0, so scoring counts answers."""
    model = tiny_model("llama", max_position_embeddings=64)
    spec = RopeSpec(10000.0, 16, 64)
    monkeypatch.setattr(retrieval, "greedy_answer", lambda m, t, s: f" {s.value}\n")
    settings = retrieval.NeedleSettings(trials=2, depths=(0.5,), keys=2)
    result = retrieval.needle_accuracy(model, tokenizer, spec, [128], None, [filler(tokenizer)] * 2, settings)
    assert all(cells == {0.5: 1.0} for rows in result.values() for by_length in rows.values()
               for cells in by_length.values())


# --- eval.json and the CLI --------------------------------------------------------------------------------


def test_eval_json_round_trips_needle_cells_and_merges_by_trial_count():
    needle = {"single": {"pi": {128: {0.0: 1.0, 0.5: 0.5}}}, "multikey": {"pi": {128: {0.0: 0.25}}}}
    result = EvalResult([128], {"pi": {128: 3.0}}, 4, "m", "f", needle=needle, needle_trials=4)
    doc = result.to_json()
    assert doc["needle"]["single"]["pi"] == {"128": {"0": 1.0, "0.5": 0.5}} and doc["needle_trials"] == 4
    assert EvalResult.from_json(json.loads(json.dumps(doc))) == result
    assert "needle" not in EvalResult([128], {"pi": {128: 3.0}}, 4, "m", "f").to_json()  # only once measured
    tables = render_tables(result, original_length=64)
    assert len(tables) == 3 and "needle retrieval (one needle)" in tables[1].title


def test_eval_needle_on_a_run_writes_cells_and_bad_input_is_one_line(tmp_path):
    model = write_model(tmp_path, window=128)
    corpus = write_code_corpus(tmp_path, documents=8, lines=300)
    config = from_dict(search_config(model, corpus, target="2x", population=4, parents=2, generations=0))
    _, run_dir = run_search(config, tmp_path / "run")
    result = runner.invoke(app, ["eval", str(run_dir), "-l", "1x,2x", "--needle", "--needle-trials", "2",
                                 "--depths", "0,1", "--keys", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["needle"]) == {"single", "multikey"} and doc["needle_trials"] == 2
    assert set(doc["needle"]["single"]["longrope"]) == {"128", "256"}
    assert set(doc["needle"]["single"]["longrope"]["256"]) == {"0", "1"}
    assert json.loads((run_dir / "eval.json").read_text())["needle"] == doc["needle"]
    for args, message in [
        (["--depths", "0,1.5"], "shares of the context from 0 to 1"),
        (["--depths", "a,b"], "comma-separated numbers"),
        (["--needle-trials", "0"], "needle-trials must be at least 1"),
        (["--needle-trials", "20"], "documents of at least"),  # 20 held-out documents: the corpus has 8
        (["--keys", "3", "--needle-trials", "2", "-l", "0.25x"], "tokens before any filler"),  # 32 tokens cannot hold the prompt
    ]:
        bad = runner.invoke(app, ["eval", str(run_dir), "-l", "2x", "--needle", *args])
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
