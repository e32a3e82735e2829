"""A complete tiny search setup on disk: model directory, tokenizer, corpus, config (no network)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tiny_models import tiny_model, tiny_tokenizer

from longrope_search import checkpoint

WORDS = ["def", "return", "class", "self", "value", "import", "for", "in", "range", "if", "else", "print",
         "the", "quick", "brown", "fox", "lazy", "dog", "x", "y", "+", "=", "(", ")", ":"]


def write_model(root: Path, window: int = 32) -> Path:
    path = root / "model"
    tiny_model("llama", max_position_embeddings=window).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_corpus(root: Path, documents: int = 10, words: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = root / "corpus"
    path.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return path


def search_config(model: Path, corpus: Path, **search) -> dict:
    """A small search on `model` and `corpus`: the paper's search (fitness ppl, seeds PI, NTK, YaRN, every seed in
    the population, every candidate on every window) unless a test asks for more: the loop's tests run on word
    corpora without line breaks, in windows too short for the joint fitness's needles (tests/test_joint.py), with
    populations too small for the YaRN family, and on 2 windows, too few to screen (tests/test_screen.py)."""
    settings = dict(target="4x", population=8, parents=4, mutations=3, crossovers=3, generations=3,
                    n_hat=[0, 2, 4], seed=0, chunk_size=48, fitness="ppl", seeds=["pi", "ntk", "yarn"],
                    seed_margin=None, screen_windows=0)
    settings.update(search)
    return {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"source": str(corpus / "*.txt"), "samples": 2, "heldout_samples": 2, "cache_dir": str(corpus.parent / "cache"),
                 "validation_samples": 0},  # no validation set unless a test asks for one (tests/test_validation.py)
        "search": {"select_top": 1, **settings},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def comparable(doc: dict) -> dict:
    """A factors.json document without the search's wall-clock seconds: two runs of one search differ only there."""
    return {**doc, "search": {k: v for k, v in doc.get("search", {}).items() if k != "seconds"}}


# Lines of Python: documents made of them hold line breaks, where needles go (tests of the retrieval task).
CODE = ["def f(x):", "    return x + 1", "class A:", "    value = 3", "for i in range(4):", "    print(i)"]


def code_text(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(rng.choice(CODE) for _ in range(lines)) + "\n"


def write_code_corpus(root: Path, documents: int = 10, lines: int = 150) -> Path:
    path = root / "corpus"
    path.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        (path / f"doc{i:02d}.txt").write_text(code_text(lines, seed=i))
    return path


def one_line_error(result, *expected: str) -> str:
    """A CliRunner result that failed as a user mistake: exit code 2 and one `error: ...` line holding `expected`."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    """`longrope ARGS` in a subprocess (one thread), its output piped."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "longrope_search", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_9_then_resume(cfg: Path, root: Path, latest: float = 1.5) -> tuple[dict, dict, str]:
    """The search of `cfg` run whole in root/ref, and in root/run killed with SIGKILL at a random moment (up to
    `latest` s after its first checkpoint) then resumed: both factors.json documents (without the model path) and
    what the kill was, for the failure message. Both searches' histories (every candidate scored, in order) must be
    equal."""
    reference = cli("search", "--config", str(cfg), "--out", "ref", cwd=root)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    seed = random.randrange(1_000_000)
    delay = random.Random(seed).uniform(0.0, latest)
    victim = cli("search", "--config", str(cfg), "--out", "run", cwd=root)
    state_dir = root / "run" / "state"
    deadline = time.time() + 120
    while not any(state_dir.glob("gen_*.json")) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    resumed = cli("search", "--resume", "run", cwd=root)
    _, err = resumed.communicate(timeout=300)
    what = f"kill after {delay:.2f}s (seed {seed})"
    assert resumed.returncode == 0, f"{what}: {err}"
    histories = [checkpoint.state_to_json(checkpoint.load_state(root / name)[0])["history"] for name in ("ref", "run")]
    assert histories[0] == histories[1], f"{what}: the resumed search scored other candidates"
    docs = [json.loads((root / name / "factors.json").read_text()) for name in ("ref", "run")]
    for doc in docs:
        doc.pop("model")
    return docs[0], docs[1], what
