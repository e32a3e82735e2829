"""What a `pip install` user gets: shipped configs found by name (in the wheel too), the dependency floors the code
needs, an optional plot extra, --version, JSON from plan and info, info on plan's presets, log timestamps, and help
that reads at 80 columns."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longrope_search import checkpoint, cli
from longrope_search.config import find_config, load_config, packaged_configs
from longrope_search.shapes import PRESETS

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_shipped_configs_resolve_by_name_and_paths_keep_working(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: configs/tiny.yaml does not exist here
    assert set(packaged_configs()) == {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        found = find_config(name)
        assert found.read_text() == (ROOT / "configs" / "tiny.yaml").read_text()
        assert load_config(found).model.name == "builtin:tiny"
    mine = tmp_path / "tiny.yaml"  # a file of the user's own with a shipped name wins
    mine.write_text("search: {generations: 2}\n")
    assert find_config("tiny.yaml") == Path("tiny.yaml") and load_config(find_config("tiny.yaml")).search.generations == 2
    assert find_config("no-such-config") == Path("no-such-config")
    result = runner.invoke(cli.app, ["search", "--config", "no-such-config"])
    assert result.exit_code == 2 and "tiny" in result.output and "llama2-7b" in result.output


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_the_builtin_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("longrope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"longrope_search/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    assert "longrope_search/builtin/tiny-llama-cpython/model.safetensors" in names
    assert not any(name.startswith("configs/") for name in names)  # inside the package, not a top-level folder


def test_dependencies_match_what_the_code_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=\[ ]", d)[0].lower(): d for d in project["dependencies"]}
    assert deps["torch"] == "torch>=2.6" and deps["transformers"] == "transformers>=4.57,<6"
    assert "matplotlib" not in deps and "matplotlib>=3.8" in project["optional-dependencies"]["plot"]
    imported = set()
    for path in (ROOT / "longrope_search").glob("*.py"):
        imported |= set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.M))
    third_party = {name.replace("-", "_") for name in deps}
    assert third_party - {"pyyaml"} <= imported | {"yaml"}  # every direct dependency is imported
    assert "yaml" in imported and not {"tokenizers", "safetensors"} & set(deps)  # used only through transformers


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = runner.invoke(cli.app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    root = Path(cli.__file__).resolve().parent.parent  # a checkout: the command that works from it, quoted for zsh
    assert f'pip install -e "{root}[plot]"' in result.output


def test_the_install_hint_of_an_installed_wheel_names_the_package(tmp_path, monkeypatch):
    from longrope_search import errors

    monkeypatch.setattr(errors, "__file__", str(tmp_path / "site-packages" / "longrope_search" / "errors.py"))
    assert errors.install_hint("plot") == 'pip install "longrope[plot]"'


def test_version_plan_json_and_info_on_presets():
    from importlib.metadata import version

    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"longrope {version('longrope')}"

    result = runner.invoke(cli.app, ["plan", "--model", "llama2-7b", "--target", "32k", "--json"])
    (doc,) = json.loads(result.output)
    assert doc["target_length"] == 32768 and doc["shape"]["name"] == "llama2-7b" and doc["recommendation"]
    assert doc["weights_bytes"] > 13e9 and "rows" in doc

    for name in PRESETS:
        result = runner.invoke(cli.app, ["info", "--model", name, "--target", "4x", "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        assert doc["original_length"] == PRESETS[name].original_length and doc["scale"] == 4.0
        assert set(doc["factors"]) == {"pi", "ntk", "yarn"} and len(doc["factors"]["pi"]) == doc["num_factors"]
    assert json.loads(runner.invoke(cli.app, ["info", "-m", "llama3-8b", "--json"]).output)["rope_theta"] == 500000.0
    assert "rope_theta 10000" in runner.invoke(cli.app, ["info", "--model", "mistral-7b"]).output


def test_log_lines_carry_a_utc_timestamp_that_readers_ignore(tmp_path):
    log = tmp_path / "log.jsonl"
    checkpoint.append_log(log, {"event": "eval", "key": "k", "ppl": 3.5, "generation": 0})
    record = json.loads(log.read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["time"])
    assert checkpoint.read_log(log).scores == {"k": 3.5}


@pytest.mark.parametrize("command", ["search", "eval", "export", "plot", "plan", "info", None])
def test_help_reads_at_80_columns(command):
    args = [command, "--help"] if command else ["--help"]
    result = runner.invoke(cli.app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "<list" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    # paragraphs are re-wrapped to the width: no line of the description stops short before its paragraph ends
    description = re.split(r"\n(?:Arguments|Options):", result.output)[0].split("\n\n")[1:]
    for paragraph in description:
        lines = [line for line in paragraph.splitlines() if line.strip()]
        assert all(len(line) >= 50 for line in lines[:-1]), paragraph
