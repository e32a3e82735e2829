"""Export: the written config loads as longrope in transformers, reproduces the searched model, leaves SRC alone."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from longrope_search.errors import ConfigError, ExportError, GeometryError
from longrope_search.export import export, hf_rope_config
from longrope_search.factors import FactorsFile, Scores
from longrope_search.model import install_rope, rope_spec
from longrope_search.rope import RopeSpec, longrope_mscale

ORIGINAL, SCALE = 64, 4


def make_source(tmp_path: Path, family: str) -> Path:
    """A saved tiny model; Phi-3's class default window (4096) is lowered to the tiny model's 64."""
    overrides = {"original_max_position_embeddings": ORIGINAL} if family == "phi3" else {}
    src = tmp_path / f"src-{family}"
    tiny_model(family, **overrides).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def make_factors(tmp_path: Path, src: Path, **fields) -> Path:
    spec = rope_spec(AutoConfig.from_pretrained(src))
    n = spec.num_factors
    doc = dict(
        model=str(src), rope=spec, target_length=ORIGINAL * SCALE,
        factors=torch.linspace(1.0, 1.25 * SCALE, n).tolist(),
        mscale=longrope_mscale(SCALE, ORIGINAL), short_factors=torch.linspace(1.0, 1.5, n).tolist(),
    )
    doc.update(fields)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    FactorsFile(**doc).save(run / "factors.json")
    return run


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def ids(length: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_export_loads_as_longrope_and_matches_search_time_model(tmp_path, family):
    src = make_source(tmp_path, family)
    run = make_factors(tmp_path, src)
    before = tree_digest(src)
    out = tmp_path / "dst"

    report = export(run, out)

    assert tree_digest(src) == before
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.short_max_abs_diff is not None and report.short_max_abs_diff <= 1e-4
    assert report.verify_length > ORIGINAL and not report.dropped_n_hat
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == ORIGINAL
    assert config.max_position_embeddings == ORIGINAL * SCALE
    written = json.loads((out / "config.json").read_text())
    if family == "phi3":
        assert set(written["rope_scaling"]) == {"type", "short_factor", "long_factor"}
        assert written["partial_rotary_factor"] == 0.5
    else:
        assert written["rope_scaling"]["factor"] == SCALE and "attention_factor" not in written["rope_scaling"]
    assert written["original_max_position_embeddings"] == ORIGINAL and written["rope_theta"] == 10000.0
    assert (out / "model.safetensors").is_symlink() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "longrope.json").read_text())["factors"] == json.loads(
        (run / "factors.json").read_text())["factors"]

    # an independent check at another length: plain transformers vs our module on SRC
    dst_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    doc = json.loads((run / "factors.json").read_text())
    install_rope(ref, doc["factors"], mscale=doc["mscale"])
    x = ids(3 * ORIGINAL)
    assert (dst_model(x).logits - ref(x).logits).abs().max().item() <= 1e-4


def test_custom_mscale_is_written_for_transformers_and_vllm(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src, mscale=1.05, short_factors=None)
    report = export(run, tmp_path / "dst", copy_weights=True)
    assert report.max_abs_diff <= 1e-4 and report.short_max_abs_diff <= 1e-4
    scaling = json.loads((tmp_path / "dst" / "config.json").read_text())["rope_scaling"]
    assert scaling["attention_factor"] == scaling["short_mscale"] == scaling["long_mscale"] == 1.05
    assert scaling["short_factor"] == [1.0] * 8
    assert not (tmp_path / "dst" / "model.safetensors").is_symlink()
    assert any("attention_factor" in note for note in report.notes)


def test_hf_rope_config_phi3_with_custom_mscale_falls_back_to_full_form(tmp_path):
    spec = rope_spec(AutoConfig.from_pretrained(make_source(tmp_path, "phi3")))
    ff = FactorsFile(model="x", rope=spec, target_length=256, factors=[2.0] * 4, mscale=1.3)
    updates = hf_rope_config(ff, "phi3", partial_rotary_factor=0.5)
    assert updates["rope_scaling"]["rope_type"] == "longrope" and updates["rope_scaling"]["attention_factor"] == 1.3
    assert updates["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert math.isclose(updates["rope_parameters"]["factor"], 4.0)


def test_refuses_non_empty_destination_without_force(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src)
    out = tmp_path / "dst"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export(run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "model-00001-of-00002.safetensors").write_text("real weights of another model")
    report = export(run, out, force=True, verify=False)
    assert report.max_abs_diff is None
    # not a previous export (no longrope.json before): real weight files are never deleted
    assert (out / "model-00001-of-00002.safetensors").read_text() == "real weights of another model"
    (out / "model-00001-of-00002.safetensors").unlink()
    (out / "model-00002-of-00002.safetensors").write_text("stale shard of the previous export")
    export(run, out, force=True, verify=False)
    assert not (out / "model-00002-of-00002.safetensors").exists() and (out / "keep.txt").exists()


def test_refuses_destination_inside_source(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src)
    before = tree_digest(src)
    for out in (src, src / "longrope"):
        with pytest.raises(ExportError, match="overlaps the source model"):
            export(run, out, force=True)
    assert tree_digest(src) == before


def test_refuses_factor_count_that_does_not_match_the_model(tmp_path):
    llama, phi3 = make_source(tmp_path, "llama"), make_source(tmp_path, "phi3")
    run = make_factors(tmp_path, llama)  # 8 factors; the Phi-3 model has 4 rotary pairs
    with pytest.raises(GeometryError, match="8 factors but .* has 4 rotary pairs"):
        export(run, tmp_path / "dst", model=str(phi3))
    assert not (tmp_path / "dst").exists()


def test_refuses_non_finite_factors(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src)
    doc = json.loads((run / "factors.json").read_text())
    doc["factors"][3] = float("nan")
    (run / "factors.json").write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="non-finite"):
        export(run, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_n_hat_needs_drop_n_hat(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src, n_hat=8)
    with pytest.raises(ExportError, match="n_hat=8.*--drop-n-hat.*runtime.apply"):
        export(run, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    report = export(run / "factors.json", tmp_path / "dst", drop_n_hat=True)
    assert report.dropped_n_hat and report.max_abs_diff <= 1e-4
    assert any("n_hat=8 dropped" in note for note in report.notes)
    assert json.loads((tmp_path / "dst" / "longrope.json").read_text())["n_hat"] == 8


def test_refuses_verify_length_inside_the_window(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src)
    with pytest.raises(ExportError, match="must exceed the original window"):
        export(run, tmp_path / "dst", verify_length=ORIGINAL)
    assert not (tmp_path / "dst").exists()


def test_verification_in_bfloat16_and_a_bad_dtype(tmp_path):
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src)
    with pytest.raises(ConfigError, match="--dtype 'fp8' is not a dtype; use bf16, fp16, fp32"):
        export(run, tmp_path / "bad", dtype="fp8")
    assert not (tmp_path / "bad").exists()
    # half the memory; the same operations on both sides, so the logits still agree (measured: exactly)
    report = export(run, tmp_path / "dst", dtype="bfloat16")
    assert report.max_abs_diff <= 1e-2 and report.short_max_abs_diff <= 1e-2


def test_verification_catches_a_config_that_does_not_reproduce_the_search(tmp_path, monkeypatch):
    import longrope_search.export as export_module

    def wrong_window(ff, model_type, partial_rotary_factor=None):
        updates = hf_rope_config(ff, model_type, partial_rotary_factor)
        updates["rope_scaling"]["original_max_position_embeddings"] = ff.target_length  # never switches to long
        updates["original_max_position_embeddings"] = ff.target_length
        return updates

    monkeypatch.setattr(export_module, "hf_rope_config", wrong_window)
    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src)
    with pytest.raises(ExportError, match="verification failed: the export for .*dst \\(not kept\\).*tolerance"):
        export(run, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "src-llama"]  # no unverified model, no staging folder

    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="verification failed"):
        export(run, tmp_path / "dst", force=True)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["notes.txt"]  # --force: nothing replaced


def test_drop_n_hat_reports_the_measured_ppl_cost(tmp_path):
    from search_fixtures import search_config, write_corpus, write_model

    from longrope_search.config import from_dict
    from longrope_search.search_run import run_search

    model, corpus = write_model(tmp_path), write_corpus(tmp_path)
    config = from_dict(search_config(model, corpus, generations=0, population=4, parents=2, n_hat=[4]))
    final, run = run_search(config, tmp_path / "run")
    assert final.n_hat == 4
    report = export(run, tmp_path / "dst", drop_n_hat=True)
    cost = [n for n in report.notes if n.startswith("dropping n_hat=4 changes the search-sample PPL")]
    assert len(cost) == 1 and f"from {final.scores.search:.4f}" in cost[0]


def builtin_factors(tmp_path: Path) -> Path:
    """A factors.json for the shipped model (8x, PI-like factors) in a folder that is not a run."""
    from longrope_search.model import load_model_config

    spec = rope_spec(load_model_config("builtin:tiny"))
    run = tmp_path / "builtin-run"
    run.mkdir()
    FactorsFile(model="builtin:tiny", rope=spec, target_length=8 * spec.original_length,
                factors=torch.linspace(1.0, 8.0, spec.num_factors).tolist(), mscale=longrope_mscale(8, spec.original_length),
                scores=Scores(search=16.2, heldout=23.0), baselines={"yarn": Scores(search=17.2, heldout=24.2)},
                ).save(run / "factors.json")
    return run


def test_export_of_the_builtin_model_copies_weights_and_writes_a_model_card(tmp_path):
    from longrope_search import builtin
    from longrope_search.eval_result import EvalResult

    run = builtin_factors(tmp_path)
    EvalResult(lengths=[128, 1024], ppl={"none": {128: 15.5, 1024: 30.8}, "longrope": {128: 16.0, 1024: 23.0}},
               samples=16, model="builtin:tiny").save(run / "eval.json")
    out = tmp_path / "dst"
    report = export(run, out, verify_length=136)

    weights = out / "model.safetensors"
    assert weights.is_file() and not weights.is_symlink()  # never a link into the installed package
    assert weights.read_bytes() == (builtin.resolve_model("builtin:tiny") / "model.safetensors").read_bytes()
    assert any("inside the installed package" in note for note in report.notes)
    assert not any("copy_weights" in note for note in report.notes)
    card = (out / "README.md").read_text()
    assert card != (builtin.resolve_model("builtin:tiny") / "README.md").read_text()  # its own, not SRC's
    assert "base_model" not in card.split("---")[1]  # builtin:tiny is no hub id
    assert "8x" in card and "mscale" in card and "| longrope (searched) | 16.20 | 23.00 |" in card
    assert "| yarn | 17.20 | 24.20 |" in card and "| longrope | 16.00 | 23.00 |" in card  # factors.json, eval.json
    assert f"vllm serve {out} --max-model-len 1024" in card and "from_pretrained" in card
    assert "original window" in card and "long factors for every token" in card
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x and 5.x load it
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids for generate
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((out / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__  # what wrote it, not the source's version
    assert config["dtype"] == "float16"  # the weights' own dtype (they are SRC's, copied)

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("x = 1", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def test_hub_model_card_names_its_base_model(tmp_path):
    from longrope_search.model_card import model_card

    spec = RopeSpec(base=10000.0, rotary_dim=128, original_length=4096)
    ff = FactorsFile(model="meta-llama/Llama-2-7b-hf", rope=spec, target_length=262144, factors=[2.0] * 64,
                     mscale=longrope_mscale(64, 4096))
    card = model_card(ff, "me/llama-2-7b-256k")
    assert "\nbase_model: meta-llama/Llama-2-7b-hf\n" in card
    assert 'from_pretrained("me/llama-2-7b-256k")' in card and "--max-model-len 262144" in card
    from longrope_search.eval_result import EvalResult

    needle = {"single": {"yarn@64x": {262144: {0.0: 0.5, 1.0: 1.0}}, "longrope": {262144: {0.0: 1.0, 1.0: 0.75}}}}
    card = model_card(ff, "me/llama-2-7b-256k", EvalResult([262144], {"longrope": {262144: 7.5}}, 8, "m",
                                                           needle=needle, needle_trials=20))
    assert "Needle retrieval (one needle) by context length" in card and "over 20 prompts per depth" in card
    assert "| yarn@64x | 75% |" in card and "| longrope | 88% |" in card


def test_export_from_a_hub_id_downloads_a_snapshot_and_pushes_with_the_hub_api(tmp_path, monkeypatch):
    """No network: snapshot_download and HfApi are replaced; the calls they get are what a real hub sees."""
    import huggingface_hub

    src = make_source(tmp_path, "llama")
    run = make_factors(tmp_path, src, model="org/tiny-llama")
    downloads, api_calls = [], []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        return str(src)

    class Api:
        def create_repo(self, repo_id, **kwargs):
            api_calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            api_calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            assert (Path(kwargs["folder_path"]) / "README.md").is_file()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    report = export(run, tmp_path / "dst", revision="abc123", push_to_hub="me/tiny-longrope", private=True)

    assert downloads == [("org/tiny-llama", {"revision": "abc123", "allow_patterns": downloads[0][1]["allow_patterns"]})]
    assert "*.safetensors" in downloads[0][1]["allow_patterns"]
    assert [c[0] for c in api_calls] == ["create_repo", "upload_folder"]
    assert api_calls[0][2]["private"] is True and api_calls[0][2]["exist_ok"] is True
    assert api_calls[1][2]["folder_path"] == str(tmp_path / "dst") and api_calls[1][1] == "me/tiny-longrope"
    assert report.pushed == "https://huggingface.co/me/tiny-longrope" and report.max_abs_diff <= 1e-4
    # transformers 5 saves SRC's tokenizer class as TokenizersBackend, which 4.x cannot build: written portably
    assert json.loads((src / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    assert json.loads((tmp_path / "dst" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    card = (tmp_path / "dst" / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card and 'from_pretrained("me/tiny-longrope")' in card

    def failing(**kwargs):
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(Api, "upload_folder", lambda self, **kwargs: failing())
    with pytest.raises(ExportError, match="huggingface-cli login.*--push-to-hub me/tiny-longrope"):
        export(run, tmp_path / "dst", force=True, verify=False, push_to_hub="me/tiny-longrope")
