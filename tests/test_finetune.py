"""`longrope finetune`: the first step's loss is the search's fitness NLL on the same rows, a kill -9 resumes to the
same loss curve, the written model reloads in plain transformers with the trained model's logits (LoRA merged
included), and bad input is one line and exit code 2 with nothing written."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from search_fixtures import one_line_error, search_config, write_corpus, write_model
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from longrope_search import finetune, packing
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.errors import ConfigError
from longrope_search.factors import FactorsFile, load_factors
from longrope_search.files import file_mode
from longrope_search.finetune_result import load_result
from longrope_search.fitness import sequence_nll
from longrope_search.model import install_rope, load_model, load_tokenizer, rope_spec
from longrope_search.rope import longrope_mscale
from longrope_search.rundir import write_resolved_config

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
WINDOW, SCALE = 32, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, the corpus its run searched on, a training corpus, and a finished run (its factors by hand)."""
    root = tmp_path_factory.mktemp("finetune")
    model = write_model(root, window=WINDOW)
    corpus = write_corpus(root, documents=6, words=400)
    train = write_corpus(root / "train", documents=24, words=600, seed=7)
    run = root / "run"
    run.mkdir()
    config = search_config(model, corpus)
    config["data"]["cache_dir"] = str(root / "cache")
    write_resolved_config(run, from_dict(config))
    spec = rope_spec(AutoConfig.from_pretrained(model))
    n = spec.num_factors
    FactorsFile(model=str(model), rope=spec, target_length=WINDOW * SCALE,
                factors=torch.linspace(1.0, 1.25 * SCALE, n).tolist(), mscale=longrope_mscale(SCALE, WINDOW),
                short_factors=torch.linspace(1.0, 1.5, n).tolist()).save(run / "factors.json")
    return {"model": model, "train": train, "run": run, "cache": root / "cache"}


def settings(setup, *more: str) -> list[str]:
    return [f"finetune.source={setup['train']}/*.txt", f"data.cache_dir={setup['cache']}", "finetune.steps=2",
            "finetune.learning_rate=1e-3", "finetune.short_share=0", *more]


def run_cli(*argv: str):
    return runner.invoke(app, ["finetune", *argv])


def planned_rows(config) -> list[dict[str, torch.Tensor]]:
    """The blocks the fine-tune trains, rebuilt from its settings (the stream comes from the cache)."""
    setup = finetune.training_setup(config)
    stream, layout = finetune.training_data(setup, load_tokenizer(str(setup.src)))
    return [packing.block(stream, layout, b) for b in range(layout.blocks)]


# --- the trained numbers ----------------------------------------------------------------------------------


def test_the_first_step_loss_is_the_fitness_nll_of_the_same_rows(setup, tmp_path):
    """One step of two blocks, a long one (the long factors) and a short one (the short factors): the trainer's loss
    before any update is the search's fitness NLL of the same rows under the same RoPE, weighted by tokens."""
    config = finetune.finetune_config(setup["run"], None, settings(
        setup, "finetune.steps=1", f"finetune.batch_tokens={2 * WINDOW * SCALE}", "finetune.short_share=0.5"))
    result = finetune.run_finetune(config, tmp_path / "ft")
    long_block, short_block = planned_rows(config)
    assert long_block["input_ids"].shape == (1, 128) and short_block["input_ids"].shape == (4, 32)
    ff = load_factors(setup["run"])
    model, _ = load_model(str(setup["model"]), device="cpu")
    nll, count = 0.0, 0
    for block, factors in ((long_block, ff.factors), (short_block, ff.short_factors)):
        install_rope(model, factors, mscale=ff.mscale)
        for ids, positions in zip(block["input_ids"], block["position_ids"]):
            assert positions.tolist() == list(range(len(ids)))  # one document per row: exactly a fitness sample
            nll += sequence_nll(model, ids) * (len(ids) - 1)
            count += len(ids) - 1
    assert result.losses[0] == pytest.approx(nll / count, rel=1e-5)
    assert result.steps == 1 and result.short_share == 0.5 and result.long_rows_share == 1.0


def test_the_written_model_reloads_in_plain_transformers_with_the_trained_logits(setup, tmp_path, monkeypatch):
    saved = {}
    real_save = finetune.save_model

    def save_model(trainer, ft_setup, folder):
        model, dtype = real_save(trainer, ft_setup, folder)
        saved["model"], saved["dtype"] = model.eval(), dtype
        return model, dtype

    monkeypatch.setattr(finetune, "save_model", save_model)
    result = finetune.run_finetune(finetune.finetune_config(setup["run"], None, settings(setup)), tmp_path / "ft")
    out = Path(result.out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plainly: dtype, RoPE and all from config.json
    assert reloaded.config.rope_parameters["rope_type"] == "longrope" and reloaded.dtype == torch.float32
    long_ids = torch.randint(3, 300, (1, WINDOW * SCALE), generator=torch.Generator().manual_seed(1))
    short_ids = long_ids[:, :WINDOW]
    with torch.no_grad():
        for ids in (long_ids, short_ids):
            assert torch.equal(reloaded(ids).logits, saved["model"](ids).logits)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5 and result.short_max_abs_diff <= 1e-5
    # a Hugging Face model directory with export's files; the staging copy and the checkpoints are gone
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "longrope.json", "README.md", "finetune.json",
            "config.resolved.yaml", "log.jsonl"} <= names and not {"start", "checkpoints"} & names
    assert "## Fine-tuning" in (out / "README.md").read_text()
    # the weights are as readable as every other file (a server under another user loads them)
    assert {(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {file_mode()}
    doc = json.loads((out / "config.json").read_text())
    assert doc["rope_scaling"]["rope_type"] == "longrope" and doc["max_position_embeddings"] == WINDOW * SCALE
    assert not math.isclose(result.losses[0], result.losses[1])  # it trained


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="LoRA needs peft (pip install longrope[lora])")
def test_lora_is_merged_before_the_model_is_written(setup, tmp_path, monkeypatch):
    seen = {}
    real_save = finetune.save_model
    ids = torch.randint(3, 300, (1, WINDOW * SCALE), generator=torch.Generator().manual_seed(2))

    def save_model(trainer, ft_setup, folder):
        with torch.no_grad():
            seen["adapted"] = trainer.model.eval()(ids).logits  # the peft model, adapters separate
        model, dtype = real_save(trainer, ft_setup, folder)
        return model, dtype

    monkeypatch.setattr(finetune, "save_model", save_model)
    config = finetune.finetune_config(setup["run"], None, settings(setup, "finetune.method=lora",
                                                                   "finetune.lora_rank=4", "finetune.learning_rate=1e-2"))
    result = finetune.run_finetune(config, tmp_path / "ft")
    reloaded = AutoModelForCausalLM.from_pretrained(result.out).eval()
    base, _ = load_model(str(setup["model"]), device="cpu")
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert torch.allclose(logits, seen["adapted"], atol=1e-4)  # merged == base + adapters
    assert not any(name.startswith("base_model") or "lora" in name for name in reloaded.state_dict())
    assert not torch.allclose(reloaded.model.layers[0].self_attn.q_proj.weight,
                              base.model.layers[0].self_attn.q_proj.weight)


# --- kill -9 and resume -----------------------------------------------------------------------------------

# Runs the CLI; at the log line of step `stop` it either holds (until the test kills it with SIGKILL) or, at the
# checkpoint save of step `stop`, dies inside the write (os._exit: no clean-up, like kill -9).
DRIVER = r"""
import os, sys, time
from longrope_search import checkpoint
moment, stop, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if moment == "hold":
    real_append = checkpoint.append_log
    def append_log(path, record):
        real_append(path, record)
        if record.get("event") == "step" and record["step"] == stop:
            open(os.path.join(folder, "holding"), "w").close()
            while True:
                time.sleep(1)
    checkpoint.append_log = append_log
else:  # inside the checkpoint of step `stop`: its weights written, its trainer state not yet
    from transformers import Trainer
    real_rng = Trainer._save_rng_state
    def save_rng_state(self, output_dir):
        if self.state.global_step == stop:
            os._exit(137)
        return real_rng(self, output_dir)
    Trainer._save_rng_state = save_rng_state
from longrope_search.cli import app
app(sys.argv[4:], prog_name="longrope")
"""


def driver(tmp_path: Path, moment: str, stop: int, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, moment, str(stop), str(tmp_path), *argv], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def step_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()
            if '"event": "step"' in line or '"event": "resume"' in line]


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted fine-tune the interrupted ones must reproduce."""
    folder = tmp_path_factory.mktemp("reference") / "ft"
    return finetune.run_finetune(finetune.finetune_config(setup["run"], None, RESUMABLE(setup)), folder)


def RESUMABLE(setup) -> list[str]:
    return settings(setup, "finetune.steps=10", "finetune.save_every=4", "finetune.short_share=0.25",
                    "finetune.warmup_steps=2")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["kill -9 after step 6", "killed inside the checkpoint of step 8"])
def test_a_kill_resumes_from_the_last_checkpoint_with_the_same_loss_curve(setup, reference, tmp_path, moment):
    folder = tmp_path / "ft"
    argv = ["finetune", str(setup["run"]), "--out", str(folder), *sum((["--set", s] for s in RESUMABLE(setup)), [])]
    if moment.startswith("kill -9"):
        victim = driver(tmp_path, "hold", 6, *argv)
        deadline = time.time() + 240
        while not (tmp_path / "holding").exists():
            assert victim.poll() is None, victim.communicate()[1]
            assert time.time() < deadline
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        kept = 4
    else:
        victim = driver(tmp_path, "save", 8, *argv)
        _, err = victim.communicate(timeout=240)
        assert victim.returncode == 137, err
        assert (folder / "checkpoints" / "checkpoint-8").is_dir()  # half-written: no trainer state
        kept = 4
    assert not (folder / "finetune.json").exists()
    result = run_cli("--resume", str(folder))
    assert result.exit_code == 0, (result.output, result.exception)
    resumed = load_result(folder)
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    lines = step_lines(folder)
    after = [line["step"] for line in lines[[line["event"] for line in lines].index("resume") + 1:]]
    assert after == list(range(kept + 1, 11))  # continued after the checkpoint, not from the start
    assert not (folder / "checkpoints").exists() and not (folder / ".longrope.lock").exists()


# --- bad input: one line, exit code 2, nothing written ----------------------------------------------------


def test_bad_input_is_one_line_and_exit_2_with_nothing_written(setup, tmp_path):
    out = tmp_path / "ft"
    base = sum((["--set", s] for s in settings(setup)), [])
    # a run without factors (a search that never finished its first generation)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.resolved.yaml").write_text((setup["run"] / "config.resolved.yaml").read_text())
    one_line_error(run_cli(str(empty), "--out", str(out), *base), "factors.json does not exist")
    # more tokens than the corpus holds
    one_line_error(run_cli(str(setup["run"]), "--out", str(out), *base, "--set", "finetune.steps=100000"),
                   "tokens in 24 documents", "lower finetune.steps")
    # a share outside 0..1, and a misspelt key with its hint, in one line
    one_line_error(run_cli(str(setup["run"]), "--out", str(out), *base, "--set", "finetune.short_share=1.5",
                           "--set", "finetune.stpes=3"),
                   "finetune.short_share: Input should be less than or equal to 1", "did you mean 'steps'?")
    # the held-out corpus of the shipped model, and the run's own corpus
    one_line_error(run_cli(str(setup["run"]), "--out", str(out), *base, "--set", "finetune.source=builtin:cpython"),
                   "held-out corpus")
    searched = yaml.safe_load((setup["run"] / "config.resolved.yaml").read_text())["data"]["source"]
    one_line_error(run_cli(str(setup["run"]), "--out", str(out), *base, "--set", f"finetune.source={searched}"),
                   "the corpus the run searched")
    # a length inside the window, and a batch that is no multiple of a block
    one_line_error(run_cli(str(setup["run"]), "--out", str(out), *base, "--set", "finetune.length=1x",
                           "--set", "finetune.batch_tokens=100"),
                   "does not exceed the original window 32", "not a multiple of")
    assert not out.exists()  # nothing was written by any of them
    # an existing folder is never trained into
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    one_line_error(run_cli(str(setup["run"]), "--out", str(out), *base), "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_resume_refuses_changes_to_what_is_trained_and_returns_a_finished_result(setup, tmp_path):
    folder = tmp_path / "ft"
    first = finetune.run_finetune(finetune.finetune_config(setup["run"], None, settings(setup)), folder)
    one_line_error(run_cli("--resume", str(folder), "--set", "finetune.learning_rate=1"),
                   "finetune.learning_rate cannot change when resuming")
    result = run_cli("--resume", str(folder), "--set", "finetune.save_every=7")
    assert result.exit_code == 0 and "is finished" in result.output
    assert load_result(folder).losses == first.losses
    one_line_error(run_cli("--resume", str(tmp_path / "nothing")), "holds no fine-tune")
    one_line_error(run_cli(str(setup["run"]), "--resume", str(folder)), "drop RUN")


# --- a baseline's fine-tune (finetune --factors yarn | pi | ntk) -------------------------------------------


def reference_rope(method: str, spec) -> dict:
    """The rope_parameters a user writes for `method` at SCALE, as transformers documents them."""
    if method == "yarn":
        return {"rope_type": "yarn", "factor": float(SCALE), "original_max_position_embeddings": WINDOW,
                "rope_theta": spec.base}
    if method == "pi":
        return {"rope_type": "linear", "factor": float(SCALE), "rope_theta": spec.base}
    d = spec.rotary_dim
    return {"rope_type": "default", "rope_theta": spec.base * SCALE ** (d / (d - 2))}


@pytest.mark.parametrize("method", ["yarn", "pi", "ntk"])
def test_a_baseline_fine_tune_trains_exactly_the_rope_transformers_runs_for_it(setup, tmp_path, method):
    """The start model of `--factors METHOD` gives the logits of the base model loaded with that method's
    rope_parameters (yarn, linear, an NTK-scaled rope_theta), at the target and inside the original window."""
    folder = tmp_path / "ft"
    config = finetune.finetune_config(setup["run"], None, settings(setup, f"finetune.factors={method}",
                                                                   f"output.dir={folder}"))
    ft_setup = finetune.training_setup(config)
    assert ft_setup.factors.method == method and ft_setup.factors.target_length == WINDOW * SCALE  # the run's target
    folder.mkdir()
    ft_setup.factors.save(ft_setup.factors_file)
    finetune.write_start(ft_setup, folder / "start")
    trained = finetune.load_start_model(ft_setup, folder / "start").eval()
    model_config = AutoConfig.from_pretrained(setup["model"])
    model_config.rope_parameters = reference_rope(method, rope_spec(model_config))
    model_config.max_position_embeddings = WINDOW * SCALE
    reference = AutoModelForCausalLM.from_pretrained(setup["model"], config=model_config).eval()
    ids = torch.randint(3, 300, (1, WINDOW * SCALE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for part in (ids, ids[:, :WINDOW]):
            assert torch.equal(trained(part).logits, reference(part).logits)
    # and eval's rows for it (our RoPE with the file's factors and attention factor) agree with transformers'
    ours = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    install_rope(ours, ft_setup.factors.factors, mscale=ft_setup.factors.mscale)
    with torch.no_grad():
        assert (trained(ids).logits - ours(ids).logits).abs().max() <= 1e-4


def test_a_yarn_fine_tune_without_a_run_writes_a_checked_yarn_model_and_exports_further(setup, tmp_path):
    run_config = yaml.safe_load((setup["run"] / "config.resolved.yaml").read_text())
    folder = tmp_path / "ft"
    argv = ["--factors", "yarn", "--target", f"{SCALE}x", "--out", str(folder),
            *sum((["--set", s] for s in settings(setup, f"model.name={setup['model']}",
                                                  f"data.source={run_config['data']['source']}")), [])]
    result = run_cli(*argv)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"with yarn at {WINDOW * SCALE} tokens" in result.output
    done = load_result(folder)
    assert done.run == f"yarn at {WINDOW * SCALE} tokens" and done.max_abs_diff <= 1e-4
    doc = json.loads((folder / "config.json").read_text())
    assert doc["rope_parameters"]["rope_type"] == "yarn" and doc["rope_parameters"]["factor"] == SCALE
    assert load_factors(folder / "longrope.json").method == "yarn"
    # the route's last step: YaRN at twice the target on the fine-tuned weights, checked like an export
    done = runner.invoke(app, ["export", "--factors", "yarn", "--target", f"{2 * SCALE}x", "--model", str(folder),
                               "--out", str(tmp_path / "final")])
    assert done.exit_code == 0 and "verified: max abs logit difference" in done.output, done.output
    assert load_factors(tmp_path / "final" / "longrope.json").target_length == 2 * WINDOW * SCALE
    final = json.loads((tmp_path / "final" / "config.json").read_text())
    assert final["rope_parameters"]["factor"] == 2 * SCALE and final["max_position_embeddings"] == 2 * WINDOW * SCALE


def test_bad_factors_values_are_one_line_and_exit_2(setup, tmp_path):
    out = tmp_path / "ft"
    base = sum((["--set", s] for s in settings(setup, f"model.name={setup['model']}")), [])
    one_line_error(run_cli("--factors", "yarnn", "--target", "4x", "--out", str(out), *base),
                   "finetune.factors: Input should be 'run', 'yarn', 'pi' or 'ntk'")
    one_line_error(run_cli("--factors", "yarn", "--out", str(out), *base), "needs the length it extends to")
    one_line_error(run_cli("--factors", "yarn", "--target", "1x", "--out", str(out), *base), "does not exceed")
    one_line_error(run_cli(str(setup["run"]), "--target", "8x", "--out", str(out), *base),
                   "finetune.target sets a baseline's target")
    one_line_error(run_cli("--out", str(out), *base), "pass the search run to fine-tune")
    # export of a baseline: an unknown method, or a missing model or target
    export_args = ["export", "--out", str(out), "--model", str(setup["model"])]
    one_line_error(runner.invoke(app, [*export_args, "--factors", "yarnn", "--target", "8x"]),
                   "--factors 'yarnn' is not a RoPE method")
    one_line_error(runner.invoke(app, [*export_args, "--factors", "yarn"]), "or a baseline with the model and length")
    one_line_error(runner.invoke(app, [*export_args, "--factors", "yarn", "--target", "1x"]), "does not exceed")
    assert not out.exists()


def test_a_baseline_fine_tune_resumes_and_a_fine_tune_folder_is_named_as_one(setup, tmp_path):
    """A YaRN fine-tune trains no run: its folder is still a fine-tune's (resume continues it, and a search's resume
    or eval of it says what it holds in one line)."""
    folder = tmp_path / "ft"
    config = finetune.finetune_config(setup["run"], None, settings(setup, "finetune.factors=yarn", "finetune.steps=3",
                                                                   "finetune.save_every=1"))
    first = finetune.run_finetune(config, folder)
    (folder / "finetune.json").unlink()  # as if killed before the result was written
    (folder / "model.safetensors").unlink()
    result = run_cli("--resume", str(folder))
    assert result.exit_code == 0, (result.output, result.exception)
    assert load_result(folder).losses == pytest.approx(first.losses, rel=1e-6)
    assert run_cli("--resume", str(folder)).exit_code == 0  # finished: returned as it is
    one_line_error(runner.invoke(app, ["search", "--resume", str(folder)]), "holds a fine-tune (a model), not a search")
    one_line_error(runner.invoke(app, ["eval", str(folder), "--lengths", "1x"]), "holds a fine-tune (a model)")


def test_a_diverged_fine_tune_stops_at_the_first_non_finite_step_and_writes_no_model(setup, tmp_path):
    folder = tmp_path / "ft"
    config = finetune.finetune_config(setup["run"], None, settings(
        setup, "finetune.learning_rate=1e30", "finetune.steps=8", "finetune.save_every=1"))
    with pytest.raises(ConfigError, match=r"the fine-tune diverged at step \d+ .*no model was written.*lower "
                       r"finetune.learning_rate \(now 1e\+30\)") as caught:
        finetune.run_finetune(config, folder)
    line = str(caught.value)
    assert "\n" not in line
    lines = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    diverged = [x for x in lines if x.get("event") == "diverged"]
    assert len(diverged) == 1 and f"step {diverged[0]['step']}" in line
    steps = [x for x in lines if x.get("event") == "step"]
    assert steps[-1]["step"] == diverged[0]["step"] < 8  # stopped there, not trained on
    assert not (folder / "model.safetensors").exists() and not (folder / "finetune.json").exists()
    left = sorted(int(p.name.split("-")[-1]) for p in (folder / "checkpoints").glob("checkpoint-*"))
    assert all(n < diverged[0]["step"] for n in left)  # only checkpoints from before the divergence


def test_a_resume_never_deletes_what_it_did_not_write_and_warns_of_a_damaged_state(setup, tmp_path):
    """OUT/checkpoints linked to a scratch disk holding a folder of the user's named like a checkpoint: refused in one
    line, nothing deleted; a checkpoint whose trainer state is damaged is warned about, and the one before it used."""
    folder = tmp_path / "ft"
    config = finetune.finetune_config(setup["run"], None, settings(setup, "finetune.steps=3", "finetune.save_every=1",
                                                                   "finetune.keep_checkpoints=true"))
    first = finetune.run_finetune(config, folder)
    scratch = tmp_path / "scratch" / "ck"
    scratch.parent.mkdir()
    (folder / "checkpoints").rename(scratch)
    (folder / "checkpoints").symlink_to(scratch)
    (folder / "finetune.json").unlink()  # unfinished again: a resume trains from the newest checkpoint
    (scratch / "checkpoint-99").mkdir()
    (scratch / "checkpoint-99" / "precious.txt").write_text("mine")
    one_line_error(run_cli("--resume", str(folder)), "checkpoint-99 was not written by `longrope finetune` (it holds "
                   "precious.txt); move it out of")
    assert (scratch / "checkpoint-99" / "precious.txt").read_text() == "mine"
    shutil.rmtree(scratch / "checkpoint-99")
    newest = max(scratch.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    (newest / "trainer_state.json").write_text("{")
    result = run_cli("--resume", str(folder))
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"checkpoints/{newest.name}/trainer_state.json is damaged" in result.output
    assert load_result(folder).losses == pytest.approx(first.losses, rel=1e-5)


@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors"])
def test_a_checkpoint_cut_short_is_warned_about_and_the_one_before_it_used(setup, tmp_path, name):
    """A kill or a full disk while the Trainer saved: the newest checkpoint's optimizer or weights are truncated
    although its trainer state was written. The resume names the file and trains from the checkpoint before."""
    folder = tmp_path / "ft"
    config = finetune.finetune_config(setup["run"], None, settings(setup, "finetune.steps=3", "finetune.save_every=1",
                                                                   "finetune.keep_checkpoints=true"))
    first = finetune.run_finetune(config, folder)
    (folder / "finetune.json").unlink()
    newest = max((folder / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    damaged = newest / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    result = run_cli("--resume", str(folder))
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{newest.name}/{name} is damaged (cut short by a kill or a full disk?); removing that checkpoint" in (
        result.output.replace("\n", " ").replace("  ", " "))
    assert load_result(folder).losses == pytest.approx(first.losses, rel=1e-5)


def test_report_to_reaches_the_trainer(setup, tmp_path):
    for value, expected in (("[tensorboard]", ["tensorboard"]), ("none", [])):
        config = finetune.finetune_config(setup["run"], None, settings(setup, f"finetune.report_to={value}"))
        args = finetune.training_arguments(finetune.training_setup(config), tmp_path / "ft")
        assert args.report_to == expected and args.disable_tqdm  # our bar, not the Trainer's
