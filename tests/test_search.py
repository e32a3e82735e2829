"""The search loop end to end on a tiny model: exact resume after kill -9, damaged checkpoints,
every bad input as one line and exit code 2, constraint and no-re-evaluation invariants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from search_fixtures import comparable, kill_9_then_resume, one_line_error, search_config, write_config, write_corpus
from typer.testing import CliRunner

from longrope_search import checkpoint
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.errors import CheckpointError, ConfigError
from longrope_search.factors import load_factors
from longrope_search.evolution import SearchSpace
from longrope_search.search_run import run_search
from longrope_search.search_setup import make_setup as make_plan
from longrope_search.model import load_model_config, rope_spec
from longrope_search.rope import longrope_mscale

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_files):
    return tiny_files("search")


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def final_history(run_dir: Path) -> list[dict]:
    state, _ = checkpoint.load_state(run_dir)
    return checkpoint.state_to_json(state)["history"]


def test_search_writes_outputs_and_keeps_invariants(setup, tmp_path):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=4))
    final, run_dir = run_search(config, tmp_path / "run")
    assert {p.name for p in run_dir.iterdir()} >= {"config.resolved.yaml", "state", "log.jsonl", "factors.json"}
    history = final_history(run_dir)
    keys = [(tuple(e["genes"]), e["n_hat"]) for e in history]
    assert len(keys) == len(set(keys)) == 8 + 4 * 6  # no candidate evaluated twice, full budget used
    plan = make_plan(config, rope_spec(load_model_config(str(model))))
    space: SearchSpace = plan.space
    for genes, n_hat in keys:
        assert all(a <= b for a, b in zip(genes, genes[1:])) and n_hat in space.n_hat_choices
    # the winner is the best evaluation, and its held-out score and baselines are recorded
    assert final.scores.search == min(e["ppl"] for e in history)
    assert set(final.baselines) == {"none", "pi", "ntk", "yarn"} and final.scores.heldout is not None
    assert len(final.factors) == 8 and final.target_length == 128
    events = [json.loads(line)["event"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events.count("eval") == len(history) and events.count("generation") == 5 and events[-1] == "done"


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(setup, tmp_path):
    model, corpus = setup
    cfg = write_config(tmp_path / "cfg.yaml", search_config(model, corpus, generations=12))
    ref, run, what = kill_9_then_resume(cfg, tmp_path)
    assert comparable(run) == comparable(ref), what
    assert final_history(tmp_path / "run") == final_history(tmp_path / "ref")


def test_truncated_newest_checkpoint_falls_back_with_warning(setup, tmp_path):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=3))
    run_search(config, tmp_path / "run")
    reference = final_history(tmp_path / "run")
    newest = tmp_path / "run" / "state" / "gen_00003.json"
    newest.write_text(newest.read_text()[: len(newest.read_text()) // 2])
    state, warnings = checkpoint.load_state(tmp_path / "run")
    assert state.generation == 2 and warnings and "gen_00003.json is damaged" in warnings[0]
    result = runner.invoke(app, ["search", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "warning: gen_00003.json is damaged" in result.output
    assert final_history(tmp_path / "run") == reference  # scores reused from the log, same trajectory
    record = load_factors(tmp_path / "run").search  # the final report states the work the run spent
    assert f"work: {record.evaluations} evaluations, {record.forward_tokens / 1e6:.2f}M forward tokens" in result.output


def test_resume_with_more_generations_extends_the_run(setup, tmp_path):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=2))
    run_search(config, tmp_path / "run")
    result = runner.invoke(app, ["search", "--resume", str(tmp_path / "run"), "--set", "search.generations=4"])
    assert result.exit_code == 0, result.output
    state, _ = checkpoint.load_state(tmp_path / "run")
    assert state.generation == 4 and "search.generations: 2 -> 4" in state.notes
    result = runner.invoke(app, ["search", "--resume", str(tmp_path / "run"), "--set", "search.target=8x"])
    assert result.exit_code == 2 and "search.target cannot change when resuming" in result.stderr
    before = snapshot(tmp_path / "run")
    result = runner.invoke(app, ["search", "--resume", str(tmp_path / "run"), "--set", "search.population=16"])
    assert result.exit_code == 2 and "sizes generation 0 only" in result.stderr
    assert snapshot(tmp_path / "run") == before


BAD_INPUTS = {
    "malformed YAML": ("search: {population: [1, 2\n", "fix the YAML syntax"),
    "unknown key": ({"search": {"populaton": 8}}, "search.populaton: unknown key (did you mean 'population'?)"),
    "wrong type": ({"search": {"generations": "many"}}, "search.generations: Input should be a valid integer"),
    "target not longer": ({"search": {"target": 32}}, "is not longer than the model's original window (32 tokens)"),
    "population < parents": ({"search": {"population": 4, "parents": 8}}, "parents (8) cannot exceed population (4)"),
    "missing model": ({"model": {"name": "/no/such/model"}}, "model directory /no/such/model does not exist"),
    "corpus too short": ({"search": {"target": "64x"}}, "has 0 documents of at least 2047 tokens but 4 are needed"),
}


@pytest.fixture(scope="module")
def finished_run(setup, tmp_path_factory):
    model, corpus = setup
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_search(from_dict(search_config(model, corpus, generations=1)), run_dir)
    return run_dir


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_run_untouched(setup, finished_run, tmp_path, case):
    model, corpus = setup
    good = search_config(model, corpus, generations=1)
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)

    change, expected = BAD_INPUTS[case]
    cfg = tmp_path / "bad.yaml"
    if isinstance(change, str):
        cfg.write_text(change)
    else:
        merged = yaml.safe_load(yaml.safe_dump(good))
        for section, values in change.items():
            merged[section].update(values)
        write_config(cfg, merged)
    for out in (run_dir, tmp_path / "fresh"):  # an existing run and a new directory
        result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(out)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        # the existing run is refused as such unless the config itself is already unreadable
        assert expected in lines[0] or (out == run_dir and "already exists and is not empty" in lines[0]), lines[0]
    assert snapshot(run_dir) == before
    fresh = tmp_path / "fresh"
    assert not fresh.exists() or [p.name for p in fresh.iterdir()] == ["config.resolved.yaml"]


def test_existing_run_is_never_overwritten(setup, tmp_path):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=0))
    run_search(config, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(CheckpointError, match="already exists and is not empty; resume it"):
        run_search(config, tmp_path / "run")
    assert snapshot(tmp_path / "run") == before


def test_resume_refuses_a_changed_identity(setup, tmp_path):
    model, _ = setup
    corpus = write_corpus(tmp_path)
    run_search(from_dict(search_config(model, corpus, generations=1)), tmp_path / "run")
    log = tmp_path / "run" / "log.jsonl"  # stopped before its comparison ended: a resume has work to do
    log.write_text("".join(line for line in log.read_text().splitlines(keepends=True) if '"event": "done"' not in line))
    before = snapshot(tmp_path / "run")
    for doc in corpus.glob("*.txt"):  # other text at the start of every document: other samples
        doc.write_text("import os " + doc.read_text())
    result = runner.invoke(app, ["search", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "was searched with a different setup (data: checkpoint has" in result.stderr
    assert snapshot(tmp_path / "run") == {**before, "config.resolved.yaml": before["config.resolved.yaml"]}


def test_progressive_stage_composes_with_the_previous_factors(setup, finished_run, tmp_path):
    import numpy as np
    import torch

    from longrope_search.corpus import CorpusSpec
    from longrope_search.data import build_samples
    from longrope_search.factors import load_factors
    from longrope_search.fitness import perplexity
    from longrope_search.model import install_rope, load_model

    model, corpus = setup
    stage1 = load_factors(finished_run)
    config = from_dict(search_config(model, corpus, target="8x", generations=1, init_from=str(finished_run)))
    final, run_dir = run_search(config, tmp_path / "stage2")
    stage = np.array(final.factors) / np.array(stage1.factors)
    assert final.target_length == 256 and final.search.prior.target_length == 128
    assert np.all(stage >= 1.0 - 1e-9) and np.all(stage <= 1.25 * 2 + 1e-9)  # stage factors in [1, 1.25 * 2]
    assert "prior" in final.baselines
    # what was scored is exactly the composed vector written to factors.json
    lm, tokenizer = load_model(str(model), device="cpu")
    d = config.data
    samples = build_samples(tokenizer, CorpusSpec(d.source), 256, d.samples, d.heldout_samples, d.seed, d.cache_dir)
    install_rope(lm, torch.tensor(final.factors), final.n_hat, final.mscale)
    assert perplexity(lm, samples.search, 48).ppl == pytest.approx(final.scores.search, rel=1e-6)
    with pytest.raises(ConfigError, match=r"not longer than the previous stage's target \(128 tokens\)"):
        run_search(from_dict(search_config(model, corpus, target="4x", init_from=str(finished_run))), tmp_path / "x")


def test_short_readjustment_keeps_the_long_set_and_adds_a_short_one(setup, finished_run, tmp_path):
    from longrope_search.factors import load_factors

    model, corpus = setup
    long = load_factors(finished_run)
    config = from_dict(search_config(model, corpus, target="1x", generations=1, short=True, mscale="keep",
                                     init_from=str(finished_run)))
    final, _ = run_search(config, tmp_path / "short")
    assert final.factors == long.factors and final.target_length == long.target_length
    assert final.mscale == long.mscale and final.n_hat == long.n_hat
    assert len(final.short_factors) == 8 and all(1.0 <= f <= 2.0 for f in final.short_factors)
    assert final.search.mode == "short" and final.search.scored_length == 32
    assert set(final.baselines) == {"none", "ones", "long"} and final.search.attention_fit is None
    with pytest.raises(ConfigError, match="short readjustment needs the long factors"):
        run_search(from_dict(search_config(model, corpus, target="1x", short=True)), tmp_path / "a")
    with pytest.raises(ConfigError, match="set search.target to 1x or less"):
        run_search(from_dict(search_config(model, corpus, short=True, init_from=str(finished_run))), tmp_path / "b")
    # a long search keeps the attention factor of what it builds on, and refuses keep with nothing to build on
    with pytest.raises(ConfigError, match="search.mscale keep runs the attention factor of the factors the search "
                       "builds on, and there are none"):
        run_search(from_dict(search_config(model, corpus, mscale="keep")), tmp_path / "c")
    kept, _ = run_search(from_dict(search_config(model, corpus, target="8x", mscale="keep", generations=0,
                                                 init_from=str(finished_run))), tmp_path / "d")
    assert kept.mscale == long.mscale != longrope_mscale(8, 32)


def test_short_readjustment_lowers_the_attention_factor_within_the_long_tolerance(setup, finished_run, tmp_path):
    """mscale auto: the lowest grid value whose long PPL stays within tolerance, checked independently."""
    import numpy as np
    import torch

    from longrope_search.corpus import CorpusSpec
    from longrope_search.data import build_samples
    from longrope_search.factors import load_factors
    from longrope_search.fitness import perplexity
    from longrope_search.model import install_rope, load_model
    from longrope_search.attention import MSCALE_GRID

    model, corpus = setup
    long = load_factors(finished_run)
    tolerance = 0.01
    config = from_dict(search_config(model, corpus, target="1x", generations=1, short=True,
                                     long_tolerance=tolerance, init_from=str(finished_run)))
    final, run_dir = run_search(config, tmp_path / "short")
    fit = final.search.attention_fit
    assert final.mscale == fit.mscale <= long.mscale and fit.long_mscale == long.mscale
    assert final.factors == long.factors and fit.length == long.target_length
    assert fit.heldout is not None
    if final.mscale != long.mscale:
        assert set(final.baselines) == {"none", "ones", "long", "ones_fitted"}

    lm, tokenizer = load_model(str(model), device="cpu")
    d = config.data
    samples = build_samples(tokenizer, CorpusSpec(d.source), long.target_length, d.samples, d.heldout_samples,
                            d.seed, d.cache_dir)

    def long_ppl(mscale: float) -> float:
        install_rope(lm, torch.tensor(long.factors), long.n_hat, mscale)
        return perplexity(lm, samples.search, 48).ppl

    reference = long_ppl(long.mscale)
    assert fit.search.long_mscale == pytest.approx(reference, rel=1e-6)
    assert long_ppl(final.mscale) <= reference * (1 + tolerance) + 1e-9
    # every lower value the fit scored is over the limit (the bisection's guarantee; the unit test below
    # checks that it finds the lowest grid value on a known curve)
    limit = reference * (1 + tolerance)
    assert all(ppl > limit for m, ppl in fit.checked.items() if float(m) < final.mscale)
    keys = [json.loads(line).get("key", "") for line in (run_dir / "log.jsonl").read_text().splitlines()]
    fitted = [k for k in keys if k.startswith("attention:")]
    assert len(fitted) == len(fit.checked) == len(set(fitted))
    assert len(fitted) <= 2 + int(np.ceil(np.log2(max(2, (long.mscale - 1) / MSCALE_GRID))))


def test_fit_attention_bisects_to_the_lowest_value_within_tolerance(tmp_path):
    """A fake long-PPL curve: the fit finds the lowest grid value under the limit in O(log n) evaluations."""
    import numpy as np

    from longrope_search.fitness import FitnessResult
    from longrope_search.attention import fit_attention
    from longrope_search.search_setup import Prior

    class Curve:  # PPL falls as the attention factor rises toward 1.3
        def __init__(self):
            self.results, self.calls = {}, []

        def needs(self, key, upto=None):
            return key not in self.results

        def score(self, key, factors, n_hat, mscale, race=None, upto=None):
            self.calls.append(mscale)
            return FitnessResult(10.0 + 20.0 * (1.3 - mscale) ** 2)

    class FakePlan:
        prior = Prior(np.ones(4), 1024, 1.3, 0, "test")

        class config:
            class search:
                long_tolerance = 0.05

    curve = Curve()
    fit = fit_attention(FakePlan, curve, tmp_path / "log.jsonl")
    # 10 + 20 (1.3 - m)^2 <= 10.5  <=>  m >= 1.3 - 0.1581
    assert fit.mscale == pytest.approx(1.15) and len(curve.calls) <= 2 + 5
    assert fit.search.long_mscale == 10.0 and fit.search.mscale == pytest.approx(10.0 + 20 * 0.15 ** 2)
    # four workers (ranks or context-parallel groups) probe four values per round: fewer rounds, same answer
    from longrope_search import distributed

    class FourWorkers(distributed.Context):
        workers = 4

    wide = Curve()
    fit = fit_attention(FakePlan, wide, tmp_path / "log3.jsonl", ctx=FourWorkers())
    assert fit.mscale == pytest.approx(1.15) and len(wide.calls) <= 2 + 4 * 2
    FakePlan.config.search.long_tolerance = 0.9  # everything passes: 1.0 itself
    assert fit_attention(FakePlan, Curve(), tmp_path / "log2.jsonl").mscale == 1.0


def test_resume_of_a_run_stopped_during_generation_0_reuses_its_logged_scores(setup, tmp_path):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=1))
    final, ref = run_search(config, tmp_path / "ref")
    # a run killed while scoring its initial population: resolved config, the start record, 3 scores, no state/
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ref / "config.resolved.yaml", run)
    lines = (ref / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:4]) + '\n{"event": "eval", "key": "n_hat=0|1,')  # torn last line
    result = runner.invoke(app, ["search", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "generation 0 starts again with 3 logged evaluations" in result.output
    assert comparable(json.loads((run / "factors.json").read_text())) == comparable(
        json.loads((ref / "factors.json").read_text()))
    keys = []
    for line in (run / "log.jsonl").read_text().splitlines():
        if line.startswith('{"event": "eval"') and line.endswith("}"):  # the torn line stays, unread
            keys.append(json.loads(line)["key"])
    assert len(keys) == len(set(keys)) == len(final_history(ref))  # nothing scored twice


@pytest.mark.parametrize("logged", [2, 6])  # stopped while scoring the seeds, then while scoring their mutants
def test_seed_margin_scores_the_seeds_first_breeds_the_best_and_resumes_exactly(setup, tmp_path, logged):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, generations=1, seed_margin=0.0))
    final, ref = run_search(config, tmp_path / "ref")
    gen0 = [e for e in checkpoint.load_state(ref)[0].history if e.generation == 0]
    assert [e.origin for e in gen0[:3]] == ["pi", "ntk", "yarn"]  # the seeds, scored before any mutant
    best = min(gen0[:3], key=lambda e: e.ppl)

    def closest(cand):  # the seed sharing most genes: the one it was mutated from
        return max(gen0[:3], key=lambda e: sum(a == b for a, b in zip(cand.genes, e.candidate.genes))).origin

    assert {closest(e.candidate) for e in gen0[3:]} == {best.origin}  # margin 0: only the best seed breeds
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ref / "config.resolved.yaml", run)
    lines = (ref / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:1 + logged]) + "\n")
    result = runner.invoke(app, ["search", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert comparable(json.loads((run / "factors.json").read_text())) == comparable(
        json.loads((ref / "factors.json").read_text()))


def test_a_short_search_stopped_during_its_attention_fit_resumes_without_rescoring(setup, finished_run, tmp_path):
    model, corpus = setup
    config = from_dict(search_config(model, corpus, target="1x", generations=1, short=True,
                                     init_from=str(finished_run)))
    _, ref = run_search(config, tmp_path / "ref")
    lines = (ref / "log.jsonl").read_text().splitlines()
    first_fit = next(i for i, line in enumerate(lines) if '"key": "attention:' in line)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ref / "config.resolved.yaml", run)
    (run / "log.jsonl").write_text("\n".join(lines[:first_fit + 1]) + "\n")  # killed after one long evaluation
    result = runner.invoke(app, ["search", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "attention factor" in result.output
    assert comparable(json.loads((run / "factors.json").read_text())) == comparable(
        json.loads((ref / "factors.json").read_text()))
    keys = [json.loads(line)["key"] for line in (run / "log.jsonl").read_text().splitlines() if '"event": "eval"' in line]
    assert len(keys) == len(set(keys))  # the logged long evaluation was reused, nothing scored twice
    # the fit's result is logged once found; a later resume reuses it without scoring the long set again
    fitted = [k for k in keys if k.startswith("attention:")]
    more = runner.invoke(app, ["search", "--resume", str(run), "--set", "search.generations=2"])
    assert more.exit_code == 0, more.output
    log = (run / "log.jsonl").read_text()
    assert [json.loads(line)["key"] for line in log.splitlines() if '"key": "attention:' in line] == fitted
    assert log.count('"event": "attention_fit"') == 1
    assert json.loads((run / "factors.json").read_text())["mscale"] == json.loads((ref / "factors.json").read_text())["mscale"]


def test_a_start_that_failed_before_scoring_can_be_retried_in_place(setup, tmp_path):
    model, corpus = setup
    bad = from_dict(search_config(model, corpus, target="64x"))  # too long for the corpus: fails after the config is written
    with pytest.raises(Exception, match="documents"):
        run_search(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a failed start removes what it wrote (issue 18): the disk as it was
    # a start killed before scoring (no clean-up possible) leaves its config.resolved.yaml: the folder is reused
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.resolved.yaml").write_text(bad.to_yaml())
    run_search(from_dict(search_config(model, corpus, generations=0)), tmp_path / "run")
    assert (tmp_path / "run" / "factors.json").is_file()
    assert oct((tmp_path / "run" / "factors.json").stat().st_mode & 0o777) != oct(0o600)  # readable by a server


def test_a_refused_resume_changes_nothing_on_disk(setup, finished_run, tmp_path):
    model, _ = setup
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    resolved["model"]["name"] = str(tmp_path / "other-model")  # the run's identity no longer matches
    shutil.copytree(model, tmp_path / "other-model")
    from tiny_models import tiny_model

    tiny_model("llama", seed=1, max_position_embeddings=64).save_pretrained(tmp_path / "other-model")
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(resolved))
    before = snapshot(run)
    result = runner.invoke(app, ["search", "--resume", str(run), "--set", "search.generations=5"])
    assert result.exit_code == 2 and "different setup" in result.stderr
    assert snapshot(run) == before


def test_a_long_stage_on_a_model_carrying_other_factors_than_init_from_is_warned_about(setup, finished_run):
    from types import SimpleNamespace

    import numpy as np

    from longrope_search.factors import load_factors
    from longrope_search.search_setup import Prior, carried_mismatch

    model, corpus = setup
    stage1 = load_factors(finished_run)
    prior = Prior(np.asarray(stage1.factors), stage1.target_length, stage1.mscale, 0, "run")

    def carrying(factors):
        return SimpleNamespace(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": factors})

    config = from_dict(search_config(model, corpus, target="8x", init_from=str(finished_run)))
    assert carried_mismatch(config, carrying(stage1.factors), prior) is None  # fine-tuned on stage 1: consistent
    other = [f * 1.1 for f in stage1.factors]  # stage 1 searched further after the fine-tune
    warning = carried_mismatch(config, carrying(other), prior)
    assert warning and "differ from search.init_from's (by up to 10.0%)" in warning
    short = from_dict(search_config(model, corpus, target="1x", short=True, init_from=str(finished_run)))
    assert carried_mismatch(short, carrying(other), prior) is None  # a short set builds on the later, composed set


def test_more_seeds_than_the_population_is_one_line_before_any_seed_is_scored(setup, tmp_path):
    model, corpus = setup
    cfg = write_config(tmp_path / "cfg.yaml", search_config(model, corpus, population=2, parents=2))
    result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(tmp_path / "run")])
    one_line_error(result, "3 distinct seeds do not fit search.population 2", "raise search.population")
    assert not (tmp_path / "run").exists()  # nothing scored, nothing left behind
