"""The flags users type: --model, --dtype, --revision, --trust-remote-code and --attn-implementation on search, eval
and finetune reach the model that loads; --json prints one JSON object on stdout; eval --output-path; plan --dtype;
dtype names as people write them."""

from __future__ import annotations

import json

import pytest
import torch
from search_fixtures import search_config, write_config, write_corpus, write_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from longrope_search import evaluate as ev
from longrope_search import search_run as search_module
from longrope_search.cli import app
from longrope_search.config import canonical_dtype, from_dict
from longrope_search.errors import ConfigError

runner = CliRunner()
FLAGS = ["--dtype", "bf16", "--revision", "main", "--trust-remote-code", "--attn-implementation", "eager"]


@pytest.fixture(scope="module")
def files(tiny_files):
    model, corpus = tiny_files("flags")
    root = model.parent
    other = write_model(root / "other")  # the same tiny model in another folder: what --model points to
    config = search_config(model, corpus, population=4, parents=2, generations=0)
    return root, model, other, corpus, write_config(root / "cfg.yaml", config)


@pytest.fixture
def loads(monkeypatch):
    """Every model the search and eval load: (name, dtype argument, LoadOptions, the loaded model)."""
    seen = []
    for module in (search_module, ev):
        real = module.load_model

        def spy(name, *args, real=real, **kwargs):
            model, tokenizer = real(name, *args, **kwargs)
            seen.append((name, kwargs.get("dtype"), kwargs.get("options"), model))
            return model, tokenizer

        monkeypatch.setattr(module, "load_model", spy)
    return seen


def test_dtype_names_as_people_write_them():
    assert [canonical_dtype(n) for n in ("bf16", "BF16", "torch.bfloat16", "fp16", "half", "fp32", "float", "auto")] \
        == ["bfloat16", "bfloat16", "bfloat16", "float16", "float16", "float32", "float32", "auto"]
    assert from_dict({"model": {"dtype": "bf16"}}).model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="--dtype 'bf17' is not a dtype; use bf16, fp16, fp32"):
        canonical_dtype("bf17", "--dtype")


def test_search_flags_reach_the_loaded_model_and_json_is_the_only_stdout(files, loads, tmp_path):
    _, _, other, _, cfg = files
    result = runner.invoke(app, ["search", "--config", str(cfg), "--model", str(other), *FLAGS, "--json",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)  # progress and tables went to stderr
    assert doc["run_dir"] == str(tmp_path / "run") and doc["stages"] == []
    assert doc["factors"]["model"] == str(other) and len(doc["factors"]["factors"]) == 8
    name, dtype, options, model = loads[0]
    assert (name, dtype) == (str(other), "bfloat16")
    assert (options.revision, options.trust_remote_code, options.attn_implementation) == ("main", True, "eager")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    saved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    assert "dtype: bfloat16" in saved and "attn_implementation: eager" in saved and "trust_remote_code: true" in saved


def test_eval_flags_reach_the_loaded_model_and_output_path_holds_the_result(files, loads, tmp_path):
    _, model, _, corpus, cfg = files
    run = tmp_path / "run"
    assert runner.invoke(app, ["search", "--config", str(cfg), "--out", str(run)]).exit_code == 0
    loads.clear()
    out = tmp_path / "results" / "tiny.json"
    (tmp_path / "results").mkdir()
    result = runner.invoke(app, ["eval", str(run), "--lengths", "1x", *FLAGS[:2], "--attn-implementation", "eager",
                                 "--output-path", str(out), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)
    assert json.loads(out.read_text())["ppl"] == doc["ppl"] and not (run / "eval.json").exists()
    name, dtype, options, loaded = loads[0]
    assert (name, dtype, options.attn_implementation) == (str(model), "bfloat16", "eager")
    assert next(loaded.parameters()).dtype == torch.bfloat16 and loaded.config._attn_implementation == "eager"


def test_finetune_flags_reach_the_trained_model(files, tmp_path, monkeypatch):
    root, model, _, _, _ = files
    train = write_corpus(root / "train", documents=12, words=600, seed=7)
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, *args, **kwargs):
        seen.append(kwargs)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    result = runner.invoke(app, ["finetune", "--factors", "yarn", "--target", "4x", "--model", str(model), "--dtype",
                                 "fp32", "--attn-implementation", "eager", "--trust-remote-code", "--json", "--out",
                                 str(tmp_path / "ft"), "--set", f"finetune.source={train}/*.txt", "--set",
                                 f"data.cache_dir={root / 'cache'}", "--set", "finetune.steps=1", "--set",
                                 "finetune.length=128", "--set", "finetune.short_share=0"])
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)
    assert doc["steps"] == 1 and doc["out"] == str(tmp_path / "ft")
    trained = seen[0]  # the start model the Trainer trains
    assert trained["dtype"] == torch.float32 and trained["attn_implementation"] == "eager"
    assert trained["trust_remote_code"] is True


def test_export_and_plan_json_and_dtype(files, tmp_path):
    _, _, _, _, cfg = files
    run = tmp_path / "run"
    assert runner.invoke(app, ["search", "--config", str(cfg), "--out", str(run)]).exit_code == 0
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "model"), "--drop-n-hat", "--json",
                                 "--dtype", "fp32"])
    assert result.exit_code == 0, (result.output, result.exception)
    doc = json.loads(result.stdout)
    assert doc["out"] == str(tmp_path / "model") and doc["max_abs_diff"] <= 1e-4
    plans = [json.loads(runner.invoke(app, ["plan", "--model", "llama2-7b", "--dtype", d, "--json"]).stdout)[0]
             for d in ("bf16", "fp32")]
    assert plans[1]["weights_bytes"] == 2 * plans[0]["weights_bytes"]
    line = runner.invoke(app, ["plan", "--model", "llama2-7b", "--dtype", "auto"])
    assert line.exit_code == 2 and "plan needs bf16, fp16 or fp32" in line.output


def test_flag_values_stay_the_strings_typed_and_flags_that_do_not_apply_are_refused(files, tmp_path):
    from longrope_search.cli import model_overrides
    from longrope_search.config import apply_overrides

    raw = apply_overrides({}, model_overrides("yes", None, "0123456", False, None))
    assert from_dict(raw).model.name == "yes" and from_dict(raw).model.revision == "0123456"
    _, model, _, _, _ = files
    for argv, expected in (
        (["--factors", "yarn", "--target", "8x", "--model", str(model), "--push-to-hub", "me/x"],
         "--push-to-hub do not apply with --factors"),
        (["RUN", "--format", "longrope-csv", "--model", str(model)], "drop --model, --factors and --target"),
        (["RUN", "--format", "longrope-csv", "--copy-weights"], "--copy-weights do not apply with --format longrope-csv"),
    ):
        argv = [str(tmp_path) if a == "RUN" else a for a in argv]
        result = runner.invoke(app, ["export", *argv, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and expected in result.output, result.output
