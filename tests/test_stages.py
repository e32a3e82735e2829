"""Multi-stage (progressive) configs: stages chain their factors, a rerun keeps finished stages and
resumes unfinished ones, and a conflicting change or a missing model is one line with nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from search_fixtures import search_config, write_corpus
from typer.testing import CliRunner

from longrope_search.cli import app
from longrope_search.config import load_config
from longrope_search.errors import ConfigError
from longrope_search.factors import load_factors

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_files):
    return tiny_files("stages")


def staged_config(path: Path, model: Path, corpus: Path, stages: list[dict] | None = None) -> Path:
    config = search_config(model, corpus, generations=1)
    del config["search"]["target"]
    config["stages"] = stages or [
        {"name": "4x", "search": {"target": "4x"}},
        {"name": "8x", "search": {"target": "8x", "population": 6, "parents": 3}},
        {"name": "short", "search": {"short": True, "target": "1x", "mscale": "keep"}},
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def eval_keys(run_dir: Path) -> list[str]:
    return [json.loads(line)["key"] for line in (run_dir / "log.jsonl").read_text().splitlines()
            if '"event": "eval"' in line]


def test_stages_chain_factors_and_a_rerun_keeps_finished_ones(setup, tmp_path):
    model, corpus = setup
    config = staged_config(tmp_path / "stages.yaml", model, corpus)
    root = tmp_path / "out"
    result = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert result.exit_code == 0, result.output
    assert "stage 4x (searched)" in result.output and "stage short (searched)" in result.output
    first, second, short = (load_factors(root / name) for name in ("4x", "8x", "short"))
    assert (first.target_length, second.target_length, short.target_length) == (128, 256, 256)
    # stage 2 multiplies its own factors (in [1, 1.25 * 2]) onto stage 1's: lambda_2 * lambda_1
    assert second.search.prior.factors == first.factors
    ratio = np.asarray(second.factors) / np.asarray(first.factors)
    assert np.all(ratio >= 1 - 1e-9) and np.all(ratio <= 2.5 + 1e-9)
    assert short.factors == second.factors and short.short_factors is not None  # the short set readjusts stage 2
    assert (root / "stages.yaml").is_file()
    for command in (["export", str(root), "--out", str(tmp_path / "x")], ["eval", str(root), "-l", "1x"],
                    ["plot", str(root)]):  # commands that take one run name the stage to pass instead
        wrong = runner.invoke(app, command)
        assert wrong.exit_code == 2 and f"pass one stage's folder, e.g. {root / 'short'}" in wrong.stderr

    before = snapshot(root)
    again = runner.invoke(app, ["search", "--resume", str(root)])
    assert again.exit_code == 0, again.output
    assert again.output.count("(kept)") == 3
    assert snapshot(root) == before  # nothing re-scored, nothing rewritten

    # a stage stopped before its end resumes; the others are kept
    log = root / "short" / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"event": "done"' not in line))
    resumed = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert resumed.exit_code == 0, resumed.output
    assert "stage short (resumed)" in resumed.output and resumed.output.count("(kept)") == 2
    assert load_factors(root / "short").short_factors == short.short_factors
    keys = eval_keys(root / "short")
    assert len(keys) == len(set(keys))

    # a setting that changes only memory use keeps finished stages as they are; so does a moved folder
    stage_files = {k: v for k, v in snapshot(root).items() if k != "stages.yaml"}
    memory = runner.invoke(app, ["search", "--resume", str(root), "--set", "search.chunk_size=32"])
    assert memory.exit_code == 0 and memory.output.count("(kept)") == 3, memory.output
    assert {k: v for k, v in snapshot(root).items() if k != "stages.yaml"} == stage_files
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    again = runner.invoke(app, ["search", "--resume", str(moved)])
    assert again.exit_code == 0 and again.output.count("(kept)") == 3, again.output
    # an unfinished stage of a moved folder resumes on its new neighbours, not the old location's
    shutil.rmtree(moved)
    shutil.copytree(root, moved)
    log = moved / "short" / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"event": "done"' not in line))
    shutil.move(root, tmp_path / "gone")
    resumed = runner.invoke(app, ["search", "--resume", str(moved)])
    assert resumed.exit_code == 0 and "stage short (resumed)" in resumed.output, resumed.output
    assert yaml.safe_load((moved / "short" / "config.resolved.yaml").read_text())["search"]["init_from"] == str(moved / "8x")
    shutil.move(tmp_path / "gone", root)

    # changes that a finished stage cannot take are refused before anything is written, stages.yaml included
    before = snapshot(root)
    population = runner.invoke(app, ["search", "--resume", str(root), "--set", "search.population=12"])
    assert population.exit_code == 2 and "stage 4x: search.population sizes generation 0 only" in population.stderr
    # more generations would change stage 4x's factors, under the stages already built on them
    more = runner.invoke(app, ["search", "--resume", str(root), "--set", "search.generations=2"])
    line = more.stderr.strip()
    assert more.exit_code == 2 and "\n" not in line
    assert "stage 8x was built on the factors of stage 4x, which this run would change" in line
    assert snapshot(root) == before


def test_a_conflicting_change_or_a_missing_model_is_one_line_and_keeps_finished_stages(setup, tmp_path):
    model, corpus = setup
    root = tmp_path / "out"
    stages = [{"name": "4x", "search": {"target": "4x"}},
              {"name": "8x", "model": {"name": str(tmp_path / "finetuned")}, "search": {"target": "8x"}}]
    config = staged_config(tmp_path / "stages.yaml", model, corpus, stages)
    result = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: stage 8x:") and "finished stages (4x) are kept" in line
    assert load_factors(root / "4x").target_length == 128 and not (root / "8x").exists()

    # the fine-tuned model appears: the same command continues with stage 2 only
    (tmp_path / "finetuned").symlink_to(model, target_is_directory=True)
    before = snapshot(root / "4x")
    done = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert done.exit_code == 0, done.output
    assert "stage 4x (kept)" in done.output and "stage 8x (searched)" in done.output
    assert snapshot(root / "4x") == before

    # a finished stage's target may not change; the budget may
    before = snapshot(root)
    changed = staged_config(tmp_path / "changed.yaml", model, corpus,
                            [{"name": "4x", "search": {"target": "2x"}}, stages[1]])
    result = runner.invoke(app, ["search", "--config", str(changed), "--out", str(root)])
    assert result.exit_code == 2 and "stage 4x in" in result.stderr and "search.target = '4x'" in result.stderr
    assert snapshot(root) == before


def test_bad_stage_configs_are_one_line(setup, tmp_path):
    model, corpus = setup
    bad = staged_config(tmp_path / "bad.yaml", model, corpus, [
        {"name": "a", "serach": {"target": "4x"}},
        {"name": "a", "search": {"target": "8x", "populaton": 4}},
        {"name": "b/c", "output": {"dir": "x"}},
    ])
    result = runner.invoke(app, ["search", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    message = result.stderr.strip()
    assert "\n" not in message
    for part in ("stages[0].serach: unknown key (did you mean 'search'?", "stages[1].name: 'a' is used twice",
                 "search.populaton: unknown key (did you mean 'population'?)", "stages[2].name: give each stage",
                 "stages[2].output: unknown key"):
        assert part in message, message
    result = runner.invoke(app, ["search", "--config", str(staged_config(tmp_path / "ok.yaml", model, corpus)),
                                 "--target", "16x"])
    assert result.exit_code == 2 and "set search.target, search.init_from and search.short per stage" in result.stderr
    shorter = staged_config(tmp_path / "shorter.yaml", model, corpus, [
        {"name": "a", "search": {"target": 256}}, {"name": "b", "search": {"target": 128}}])
    result = runner.invoke(app, ["search", "--config", str(shorter), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "stage b: target 128 (128 tokens) is not longer than stage a's (256 tokens)" in result.stderr
    assert not (tmp_path / "out").exists()  # refused before stage a ran
    relative = staged_config(tmp_path / "relative.yaml", model, corpus, [
        {"name": "a", "search": {"target": "4x"}}, {"name": "b", "search": {"target": "2x"}}])
    result = runner.invoke(app, ["search", "--config", str(relative), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "stage b: target 2x (64 tokens) is not longer than stage a's (128 tokens)" in result.stderr
    assert not (tmp_path / "out").exists()  # the model's window is read up front for relative targets
    with pytest.raises(ConfigError, match="has stages; run it with `longrope search"):
        load_config(tmp_path / "ok.yaml")
    not_ours = tmp_path / "busy"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["search", "--config", str(tmp_path / "ok.yaml"), "--out", str(not_ours)])
    assert result.exit_code == 2 and "is not a stages folder" in result.stderr
    assert [p.name for p in not_ours.iterdir()] == ["notes.txt"]


def test_command_line_overrides_win_over_stage_settings(setup, tmp_path):
    from longrope_search.stages_file import load_stages

    model, corpus = setup
    config = staged_config(tmp_path / "stages.yaml", model, corpus)
    _, stages = load_stages(config, ["search.population=10", "search.seed=3"])
    assert [c.search.population for _, c in stages] == [10, 10, 10]  # the 8x stage's own 6 included
    assert [c.search.parents for _, c in stages] == [4, 3, 4] and all(c.search.seed == 3 for _, c in stages)


def test_a_finished_stage_resumed_for_more_generations_takes_the_memory_settings_too(setup, tmp_path):
    model, corpus = setup
    config = staged_config(tmp_path / "one.yaml", model, corpus, [{"name": "a", "search": {"target": "4x"}}])
    root = tmp_path / "out"
    assert runner.invoke(app, ["search", "--config", str(config), "--out", str(root)]).exit_code == 0
    result = runner.invoke(app, ["search", "--resume", str(root), "--set", "search.generations=2",
                                 "--set", "search.chunk_size=32"])
    assert result.exit_code == 0 and "stage a (resumed)" in result.output, result.output
    saved = yaml.safe_load((root / "a" / "config.resolved.yaml").read_text())["search"]
    assert (saved["generations"], saved["chunk_size"]) == (2, 32)


def finetune_stages_config(path: Path, model: Path, corpus: Path, train: Path, **finetune) -> Path:
    config = search_config(model, corpus, generations=1, n_hat=[0])  # no runtime, so no trainer, runs n_hat
    del config["search"]["target"]
    config["finetune"] = {"source": f"{train}/*.txt", "steps": 2, "learning_rate": 1e-3, "short_share": 0.5,
                          **finetune}
    config["stages"] = [
        {"name": "4x", "search": {"target": "4x"}},
        {"name": "ft", "finetune": {}},
        {"name": "8x", "search": {"target": "8x", "population": 6, "parents": 3}},
        {"name": "short", "search": {"short": True, "target": "1x", "mscale": "keep"}},
    ]
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_finetune_stage_trains_the_stage_before_and_the_later_stages_run_on_its_model(setup, tmp_path):
    model, corpus = setup
    train = write_corpus(tmp_path / "train", documents=8, words=600, seed=3)
    config = finetune_stages_config(tmp_path / "stages.yaml", model, corpus, train)
    root = tmp_path / "out"
    result = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "stage ft (fine-tuned): 2 steps of 128-token rows" in result.output
    assert "the last search stage's factors (export this one): " + str(root / "short") in result.output
    trained = yaml.safe_load((root / "ft" / "config.resolved.yaml").read_text())
    assert trained["finetune"]["run"] == str(root / "4x") and trained["data"]["source"] == str(corpus / "*.txt")
    after = yaml.safe_load((root / "8x" / "config.resolved.yaml").read_text())
    short = yaml.safe_load((root / "short" / "config.resolved.yaml").read_text())
    # the search after the fine-tune runs on its model, which carries stage 4x's factors (no init_from to chain);
    # the short stage readjusts the composed 8x set on the same model
    assert after["model"]["name"] == short["model"]["name"] == str(root / "ft")
    assert after["search"]["init_from"] is None and short["search"]["init_from"] == str(root / "8x")
    first, second = load_factors(root / "4x"), load_factors(root / "8x")
    assert second.search.prior.factors == first.factors and second.search.prior.source == f"model {root / 'ft'}"
    assert load_factors(root / "ft" / "longrope.json").factors == first.factors

    # run again: every stage kept; a setting that changes what was trained is refused, one that does not is taken
    again = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert again.exit_code == 0 and "stage ft (kept)" in again.output and "stage 8x (kept)" in again.output
    before = snapshot(root)
    changed = finetune_stages_config(tmp_path / "changed.yaml", model, corpus, train, steps=3)
    refused = runner.invoke(app, ["search", "--config", str(changed), "--out", str(root)])
    assert refused.exit_code == 2 and "stage ft in" in refused.stderr and "finetune.steps = 2" in refused.stderr
    assert snapshot(root) == before
    kept = finetune_stages_config(tmp_path / "kept.yaml", model, corpus, train, save_every=7)
    assert runner.invoke(app, ["search", "--config", str(kept), "--out", str(root)]).exit_code == 0
    # a new fine-tune under stages that were built on the old one would leave them stale: refused
    shutil.rmtree(root / "ft")
    stale = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert stale.exit_code == 2 and "stage 8x was built on the model of stage ft" in stale.stderr


def test_bad_finetune_stages_are_one_line(setup, tmp_path):
    model, corpus = setup
    config = search_config(model, corpus)
    config["stages"] = [{"name": "ft", "finetune": {"run": "x"}, "search": {"target": "4x"}},
                        {"name": "ft2", "finetune": {"stpes": 3}}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["search", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    message = result.stderr.strip()
    assert "\n" not in message
    for part in ("stages[0].search: a finetune stage trains the model of the stage before", "stages[0]: a finetune "
                 "stage trains the factors of the search stage before it", "stages[0].finetune.run: a finetune stage "
                 "trains the stage before it", "stages[1]: the stage before is not a search stage",
                 "finetune.stpes: unknown key (did you mean 'steps'?)"):
        assert part in message, message
    # export stages: first, with other sections, a baseline without its target, a target without a baseline
    config["stages"] = [{"name": "m0", "export": {}}, {"name": "4x", "search": {"target": "4x"}},
                        {"name": "m1", "export": {"factors": "yarn"}, "search": {"target": "8x"}},
                        {"name": "m2", "export": {"target": "8x"}}, {"name": "m3", "export": {"factors": "rope"}},
                        {"name": "m4", "export": "yes"}]
    path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["search", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    message = result.stderr.strip()
    assert "\n" not in message
    for part in ("stages[0]: an export stage writes what the stages before it made",
                 "stages[2].search: an export stage writes the model of the stages before",
                 "stages[2].export: an export stage sets factors: yarn (pi, ntk) with a target",
                 "stages[3].export: an export stage sets", "stages[4].export.factors: Input should be 'run', 'yarn', 'pi' "
                 "or 'ntk'", "stages[5].export: a mapping"):
        assert part in message, message


# --- routes that end in an exported model: LongRoPE's and YaRN's ----------------------------------------------


def route_configs(tmp_path: Path, model: Path, corpus: Path, train: Path) -> tuple[Path, Path]:
    """The LongRoPE route (4x, fine-tune, 8x on the fine-tuned model, short set, export) and YaRN's with the same
    fine-tune (YaRN 4x fine-tuned, YaRN 8x exported), as configs/tiny-progressive-ft(-yarn).yaml are."""
    longrope = finetune_stages_config(tmp_path / "longrope.yaml", model, corpus, train, steps=3, save_every=1)
    config = yaml.safe_load(longrope.read_text())
    config["stages"].append({"name": "model", "export": {}})
    longrope.write_text(yaml.safe_dump(config))
    config["stages"] = [{"name": "ft", "finetune": {"factors": "yarn", "target": "4x"}},
                        {"name": "model", "export": {"factors": "yarn", "target": "8x"}}]
    yarn = tmp_path / "yarn.yaml"
    yarn.write_text(yaml.safe_dump(config))
    return longrope, yarn


def test_both_routes_end_in_a_checked_exported_model_and_a_rerun_keeps_them(setup, tmp_path):
    model, corpus = setup
    train = write_corpus(tmp_path / "train", documents=8, words=600, seed=3)
    longrope, yarn = route_configs(tmp_path, model, corpus, train)
    for config, rope_type, factor in ((longrope, "longrope", 8.0), (yarn, "yarn", 8.0)):
        root = tmp_path / config.stem
        result = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
        assert result.exit_code == 0, (result.output, result.exception)
        assert f"the exported model: {root / 'model'}" in result.output
        doc = json.loads((root / "model" / "config.json").read_text())
        assert doc["rope_parameters"]["rope_type"] == rope_type and doc["rope_parameters"]["factor"] == factor
        record = json.loads((root / "model" / "export.json").read_text())
        assert record["model"] == str(root / "ft") and record["max_abs_diff"] <= 1e-4
        again = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
        assert again.exit_code == 0 and "stage model: exported earlier, kept" in again.output
    # the LongRoPE route's export holds the short stage's factors (the composed 8x set and the short set)
    assert load_factors(tmp_path / "longrope" / "model" / "longrope.json").factors == \
        load_factors(tmp_path / "longrope" / "short").factors
    assert load_factors(tmp_path / "yarn" / "ft" / "longrope.json").method == "yarn"
    # a damaged record means an unfinished export: written again, nothing else touched
    (tmp_path / "yarn" / "model" / "export.json").write_text("{")
    before = snapshot(tmp_path / "yarn" / "ft")
    again = runner.invoke(app, ["search", "--config", str(yarn), "--out", str(tmp_path / "yarn")])
    assert again.exit_code == 0 and "stage model: exporting" in again.output
    assert snapshot(tmp_path / "yarn" / "ft") == before


# Runs the CLI and dies (os._exit: no clean-up, as kill -9) right after the given log line of the given stage folder,
# or inside the export stage's check.
ROUTE_DRIVER = r"""
import os, sys
from longrope_search import checkpoint, export
stage, event = sys.argv[1], sys.argv[2]
if event == "export":
    def verified(*args, **kwargs):
        os._exit(137)
    export._verified = verified
else:
    real_append = checkpoint.append_log
    def append_log(path, record):
        real_append(path, record)
        if os.path.basename(os.path.dirname(str(path))) == stage and record.get("event") == event:
            os._exit(137)
    checkpoint.append_log = append_log
from longrope_search.cli import app
app(sys.argv[3:], prog_name="longrope")
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage,event", [("4x", "generation"), ("ft", "step"), ("8x", "eval"),
                                         ("short", "generation"), ("model", "export")])
def test_a_route_killed_at_any_stage_resumes_to_the_uninterrupted_result(setup, tmp_path_factory, tmp_path, stage,
                                                                         event):
    model, corpus = setup
    shared = tmp_path_factory.getbasetemp() / "route-reference"
    if not (shared / "longrope" / "model" / "export.json").is_file():
        train = write_corpus(shared / "train", documents=8, words=600, seed=3)
        longrope, _ = route_configs(shared, model, corpus, train)
        assert runner.invoke(app, ["search", "--config", str(longrope), "--out", str(shared / "longrope")]).exit_code == 0
    config = shared / "longrope.yaml"
    root = tmp_path / "route"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.run([sys.executable, "-c", ROUTE_DRIVER, stage, event, "search", "--config", str(config),
                             "--out", str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert victim.returncode == 137, victim.stderr[-2000:]
    assert not (root / "model" / "export.json").exists()
    result = runner.invoke(app, ["search", "--config", str(config), "--out", str(root)])
    assert result.exit_code == 0, (result.output, result.exception)
    reference, resumed = shared / "longrope", root
    for name in ("4x", "8x", "short"):
        assert load_factors(resumed / name).factors == pytest.approx(load_factors(reference / name).factors, rel=1e-6)
    assert json.loads((resumed / "ft" / "finetune.json").read_text())["losses"] == pytest.approx(
        json.loads((reference / "ft" / "finetune.json").read_text())["losses"], rel=1e-5)
    assert json.loads((resumed / "model" / "export.json").read_text())["max_abs_diff"] <= 1e-4
