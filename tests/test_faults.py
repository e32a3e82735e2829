"""The fault-injection campaign of issue 18 as tests: kills at named moments (inside the checkpoint write included),
SIGTERM, a full disk, damaged and wrong-typed files, two commands in one folder, planted symbolic links, and bad
inputs. Each asserts the outcome: the same result as an uninterrupted run, or one line, exit code 2 and the disk
as it was."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from search_fixtures import comparable, one_line_error, search_config, write_config
from typer.testing import CliRunner

from longrope_search import checkpoint
from longrope_search.cli import app
from longrope_search.config import from_dict
from longrope_search.errors import ExportError
from longrope_search.factors import FactorsFile, Scores, load_factors
from longrope_search.files import LOCK_FILE, folder_lock
from longrope_search.rope import RopeSpec
from longrope_search.search_run import run_search

runner = CliRunner()
GENERATIONS = 3


# --- fixtures and helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_files):
    model, corpus = tiny_files("faults")
    cfg = write_config(model.parent / "cfg.yaml", search_config(model, corpus, generations=GENERATIONS))
    return model, corpus, cfg


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must end with."""
    model, corpus, _ = setup
    run_dir = tmp_path_factory.mktemp("reference") / "ref"
    run_search(from_dict(search_config(model, corpus, generations=GENERATIONS)), run_dir)
    return run_dir


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file (bytes) and folder under `folder`: equal snapshots mean nothing on disk changed."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "link -> " + os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else "dir"
    return out


def canonical_log(run_dir: Path) -> list[dict]:
    """log.jsonl as an uninterrupted run would read (through the reader resume uses, which skips torn and wrong-typed
    lines): resume markers and timings aside."""
    records = []
    for record in checkpoint.log_records(run_dir / "log.jsonl"):
        if record["event"] != "resume":
            records.append({k: v for k, v in record.items() if k not in ("seconds", "time")})
    return records


def history(run_dir: Path) -> list[dict]:
    state, _ = checkpoint.load_state(run_dir)
    return checkpoint.state_to_json(state)["history"]


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob(".*.tmp"))


def assert_same_as(reference: Path, run_dir: Path) -> None:
    """Resumed == uninterrupted: factors.json, every evaluation, the log; nothing half-written or locked left."""
    assert comparable(json.loads((run_dir / "factors.json").read_text())) == comparable(
        json.loads((reference / "factors.json").read_text()))
    assert history(run_dir) == history(reference)
    assert canonical_log(run_dir) == canonical_log(reference)
    assert temp_files(run_dir) == [] and not (run_dir / LOCK_FILE).exists()


def resume(run_dir: Path, *more: str):
    result = runner.invoke(app, ["search", "--resume", str(run_dir), *more])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def unfinish(run_dir: Path) -> None:
    """As if killed after its last checkpoint, before the comparison with the baselines ended."""
    log = run_dir / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines() if '"event": "done"' not in line))


# A process that dies (os._exit: no clean-up, like kill -9) or waits at a named moment, then runs the CLI.
DRIVER = r"""
import os, sys, time
from longrope_search import checkpoint
moment, arg, folder = sys.argv[1:4]
if moment == "replace":  # inside the atomic write of the file named arg: written and fsynced, not yet renamed
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(dst) == arg:
            os._exit(137)
        return real_replace(src, dst, *a, **k)
    os.replace = replace
else:  # at a log record: "log" dies before generation arg's line, "hold" waits there until folder/go exists
    real_append = checkpoint.append_log
    event, _, number = arg.partition(":")
    seen = []
    def append_log(path, record):
        if record.get("event") == event:
            seen.append(record)
            if (event == "generation" and record["generation"] == int(number)) or (
                    event == "eval" and len(seen) == int(number)):
                if moment == "log":
                    os._exit(137)
                open(os.path.join(folder, "holding"), "w").close()
                while not os.path.exists(os.path.join(folder, "go")):
                    time.sleep(0.05)
        return real_append(path, record)
    checkpoint.append_log = append_log
from longrope_search.cli import app
app(sys.argv[4:], prog_name="longrope")
"""


def driver(tmp_path: Path, moment: str, arg: str, *argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, moment, arg, str(tmp_path), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) first: {process.communicate()[1]}")
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- kills at named moments (points 1, 8, 11) ---------------------------------------------------------------

KILLS = {
    "inside the first checkpoint write": ("replace", "gen_00000.json"),
    "inside a later checkpoint write": ("replace", "gen_00002.json"),
    "inside the first factors.json write": ("replace", "factors.json"),
    "between a checkpoint and its log line": ("log", "generation:1"),
    "before an evaluation's log line": ("log", "eval:11"),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILLS))
def test_a_kill_at_a_named_moment_resumes_to_the_uninterrupted_result(setup, reference, tmp_path, moment):
    _, _, cfg = setup
    run_dir = tmp_path / "run"
    victim = driver(tmp_path, *KILLS[moment], "search", "--config", str(cfg), "--out", str(run_dir))
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 137, err  # it died at that moment, without any clean-up
    if moment == "inside the first checkpoint write":
        # point 1: state/ holds only the temp file of generation 0, every score of which is in the log
        assert [p.name for p in (run_dir / "state").iterdir() if not p.name.startswith(".")] == []
        assert temp_files(run_dir) and (run_dir / LOCK_FILE).exists()
    result = resume(run_dir)
    if moment == "inside the first checkpoint write":
        assert "generation 0 starts again with 8 logged evaluations" in result.output
    assert_same_as(reference, run_dir)  # stale temp files and the dead process's lock file are gone too


@pytest.mark.slow
def test_sigterm_exits_143_with_the_resume_command_and_the_run_resumes(setup, reference, tmp_path):
    _, _, cfg = setup
    run_dir = tmp_path / "run"
    # held while scoring generation 1, where a scheduler's SIGTERM would find it
    victim = driver(tmp_path, "hold", "eval:11", "search", "--config", str(cfg), "--out", str(run_dir))
    wait_for(tmp_path / "holding", victim)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err
    assert "Traceback" not in err
    assert f"terminated (SIGTERM): finished generations and evaluations are saved; continue with `longrope search " \
           f"--resume {run_dir}`" in err
    assert not (run_dir / LOCK_FILE).exists()
    resume(run_dir)
    assert_same_as(reference, run_dir)


# --- a full disk (point 5) ----------------------------------------------------------------------------------


def full_disk(monkeypatch, name: str, nth: int = 1) -> None:
    """The nth write of `name` fails with ENOSPC: an atomic write at its fsync, an append at its write."""
    real_fsync, real_write = os.fsync, os.write
    calls = []

    def target(fd: int) -> str:
        try:
            return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return ""

    def hit(fd: int, matches) -> bool:
        if matches(target(fd)):
            calls.append(fd)
            return len(calls) == nth
        return False

    def fsync(fd: int) -> None:
        if hit(fd, lambda n: n.startswith(f".{name}.") and n.endswith(".tmp")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def write(fd: int, data) -> int:
        if hit(fd, lambda n: n == name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("name, nth", [("gen_00000.json", 1), ("gen_00002.json", 1), ("factors.json", 2),
                                       ("log.jsonl", 13)])
def test_a_full_disk_is_one_line_with_the_resume_command_and_loses_nothing(setup, reference, tmp_path, monkeypatch,
                                                                           name, nth):
    _, _, cfg = setup
    run_dir = tmp_path / "run"
    full_disk(monkeypatch, name, nth)
    result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(run_dir)])
    monkeypatch.undo()
    one_line_error(result, name, "No space left on device", "free disk space",
                   f"then continue with `longrope search --resume {run_dir}`")
    assert temp_files(run_dir) == [] and not (run_dir / LOCK_FILE).exists()
    resume(run_dir)
    assert_same_as(reference, run_dir)


def test_a_full_disk_before_the_run_started_leaves_nothing_behind(setup, tmp_path, monkeypatch):
    _, _, cfg = setup
    full_disk(monkeypatch, "config.resolved.yaml")
    result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(tmp_path / "new" / "run")])
    monkeypatch.undo()
    line = one_line_error(result, "config.resolved.yaml", "No space left on device")
    assert "--resume" not in line and not (tmp_path / "new").exists()  # no run exists, none is offered


# --- damaged, deleted and wrong-typed files (points 6, 7, 8, 11) -------------------------------------------


def test_wrong_typed_and_garbage_log_lines_are_skipped_with_a_warning(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    unfinish(run_dir)
    lines = (run_dir / "log.jsonl").read_bytes().splitlines(keepends=True)
    garbage = [b'{"event": "eval", "key": "n_hat=0|1,2,3", "ppl": "abc"}\n', b'{"event": "eval", "key": ["a"], '
               b'"ppl": 1.0}\n', b'{"event": "generation", "generation": "two"}\n', b'{"event": 7}\n', b'[1, 2]\n',
               b'"text"\n', b'\xff\xfe\x00garbage\n', b'{"event": "start", "fingerprint": [1]}\n']
    (run_dir / "log.jsonl").write_bytes(b"".join(lines[:5] + garbage + lines[5:]))
    result = resume(run_dir)
    assert "log.jsonl: 8 unreadable line(s) skipped (line 6, 7, 8, 9, 10, ...: torn by a kill or edited)" in result.output
    assert_same_as(reference, run_dir)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_lost_newest_checkpoint_falls_back_with_a_warning_and_logs_no_generation_twice(reference, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    unfinish(run_dir)
    newest = run_dir / "state" / f"gen_{GENERATIONS:05d}.json"
    if damage == "deleted":
        newest.unlink()
    else:
        newest.write_text(newest.read_text()[:100])
    result = resume(run_dir)
    expected = (f"state/gen_{GENERATIONS:05d}.json is missing although log.jsonl records generation {GENERATIONS}"
                if damage == "deleted" else f"gen_{GENERATIONS:05d}.json is damaged")
    assert f"warning: {expected}" in result.output
    assert_same_as(reference, run_dir)  # generation 3 replayed from the logged scores, its line not written twice


def test_every_checkpoint_damaged_in_another_way_replays_from_the_log(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    unfinish(run_dir)
    files = sorted((run_dir / "state").glob("gen_*.json"))
    for path, text in zip(files, [b"\xff\xfe binary", b'{"generation": "x"}', b"[1, 2, 3]"]):
        path.write_bytes(text)
    result = resume(run_dir)
    assert "no checkpoint is readable; the search replays from generation 0" in result.output
    assert_same_as(reference, run_dir)


def test_factors_json_never_holds_bare_infinity_and_reads_it_back(tmp_path):
    spec = RopeSpec(10000.0, 16, 32)
    ff = FactorsFile(model="m", rope=spec, target_length=128, factors=[1.0] * 8, scores=Scores(search=math.inf),
                     baselines={"pi": Scores(search=math.inf, heldout=math.nan), "yarn": Scores(search=9.5)})
    ff.save(tmp_path / "factors.json")
    text = (tmp_path / "factors.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    back = load_factors(tmp_path / "factors.json")
    assert back.scores.search == math.inf and back.baselines["pi"].search == math.inf
    assert back.baselines["yarn"] == Scores(search=9.5) and back.baselines["pi"].heldout == math.inf
    checkpoint.append_log(tmp_path / "log.jsonl", {"event": "eval", "key": "k", "ppl": math.inf, "x": [math.nan]})
    assert "Infinity" not in (tmp_path / "log.jsonl").read_text() and "NaN" not in (tmp_path / "log.jsonl").read_text()
    assert checkpoint.read_log(tmp_path / "log.jsonl").scores == {"k": math.inf}


def test_a_damaged_run_config_or_factors_file_is_one_line(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "config.resolved.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00binary")
    before = snapshot(tmp_path)
    one_line_error(runner.invoke(app, ["search", "--resume", str(run_dir)]), "config.resolved.yaml is not a text file")
    assert snapshot(tmp_path) == before
    shutil.copy(reference / "config.resolved.yaml", run_dir)
    (run_dir / "factors.json").write_text('{"format": "longrope-factors/1", "factors": [1.0, ')
    before = snapshot(tmp_path)
    one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "out")]), "factors.json is not valid JSON")
    assert snapshot(tmp_path) == before


# --- the model's weights (point 3) ------------------------------------------------------------------------


def test_weights_replaced_at_the_same_path_are_refused_by_name_and_old_runs_still_resume(setup, tmp_path):
    from tiny_models import tiny_model

    model, corpus, _ = setup
    mine = tmp_path / "model"
    shutil.copytree(model, mine)
    run_dir = tmp_path / "run"
    run_search(from_dict(search_config(mine, corpus, generations=1)), run_dir)
    saved = mine / "model.safetensors"
    original = saved.read_bytes()
    tiny_model("llama", seed=1, max_position_embeddings=32).save_pretrained(mine)  # same config, other weights
    assert saved.read_bytes() != original and (mine / "config.json").read_bytes() == (model / "config.json").read_bytes()
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["search", "--resume", str(run_dir), "--set", "search.generations=2"])
    one_line_error(result, "was searched with a different setup", "weights model.safetensors: checkpoint has")
    assert snapshot(tmp_path) == before

    # a run written before the weights were part of the identity resumes on the original weights
    saved.write_bytes(original)
    for path in [*sorted((run_dir / "state").glob("gen_*.json"))]:
        doc = json.loads(path.read_text())
        del doc["fingerprint"]["weights"]
        path.write_text(json.dumps(doc))
    resume(run_dir, "--set", "search.generations=2")


# --- two commands in one folder (point 10) ----------------------------------------------------------------


@pytest.mark.slow
def test_a_second_command_in_a_running_folder_is_refused_naming_the_first(setup, reference, tmp_path):
    _, _, cfg = setup
    run_dir = tmp_path / "run"
    first = driver(tmp_path, "hold", "generation:0", "search", "--config", str(cfg), "--out", str(run_dir))
    wait_for(tmp_path / "holding", first)
    before = snapshot(run_dir)
    for argv in (["search", "--resume", str(run_dir)], ["search", "--config", str(cfg), "--out", str(run_dir)]):
        one_line_error(runner.invoke(app, argv), f"{run_dir} is in use by pid {first.pid} on ", "wait until it ends")
    assert snapshot(run_dir) == before
    (tmp_path / "go").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_same_as(reference, run_dir)  # the lock is released when the command ends


def test_a_stages_folder_in_use_is_refused(setup, tmp_path):
    model, corpus, _ = setup
    raw = search_config(model, corpus, generations=0)
    raw["stages"] = [{"name": "a", "search": {"target": "4x"}}]
    cfg = write_config(tmp_path / "stages.yaml", raw)
    root = tmp_path / "out"
    root.mkdir()
    (root / "stages.yaml").write_text(yaml.safe_dump(raw))
    with folder_lock(root):  # held by this very process, through another open file
        one_line_error(runner.invoke(app, ["search", "--config", str(cfg), "--out", str(root)]),
                       f"{root} is in use by pid {os.getpid()}")
    assert not (root / LOCK_FILE).exists() and not (root / "a").exists()


# --- symbolic links planted where longrope writes (point 4) --------------------------------------------------


def outside_files(tmp_path: Path, *names: str) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    paths = {}
    for name in names:
        paths[name] = outside / f"{name}.victim"
        paths[name].write_text("not yours to write")
    return paths


def test_a_start_killed_before_any_work_is_rerun_in_the_same_folder(setup, reference, tmp_path, monkeypatch):
    _, _, cfg = setup
    run_dir = tmp_path / "run"
    full_disk(monkeypatch, "log.jsonl")  # the start line cannot be appended: nothing of the run may stay
    one_line_error(runner.invoke(app, ["search", "--config", str(cfg), "--out", str(run_dir)]), "No space left")
    monkeypatch.undo()
    assert not run_dir.exists()
    run_dir.mkdir()  # killed (kill -9) after the start line, before the first evaluation: its config and log stay
    (run_dir / "config.resolved.yaml").write_text((reference / "config.resolved.yaml").read_text())
    (run_dir / "log.jsonl").write_text((reference / "log.jsonl").read_text().splitlines()[0] + "\n{\"event\": \"ev")
    result = runner.invoke(app, ["search", "--config", str(cfg), "--out", str(run_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert_same_as(reference, run_dir)  # a fresh start: one start line, the same search


def test_a_start_killed_after_work_is_resumed_not_restarted(setup, reference, tmp_path):
    _, _, cfg = setup
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.yaml").write_text((reference / "config.resolved.yaml").read_text())
    (run_dir / "log.jsonl").write_text("".join((reference / "log.jsonl").read_text().splitlines(keepends=True)[:3]))
    line = one_line_error(runner.invoke(app, ["search", "--config", str(cfg), "--out", str(run_dir)]),
                          "already exists and is not empty")
    assert f"longrope search --resume {run_dir}" in line  # the logged evaluations are not thrown away
    resume(run_dir)
    assert_same_as(reference, run_dir)


def test_a_failed_export_leaves_no_model_and_a_killed_one_is_cleaned_by_the_next(reference, tmp_path, monkeypatch):
    import longrope_search.export as export_module

    out = tmp_path / "models" / "export"
    monkeypatch.setattr(export_module, "verify_export", lambda *a, **k: (1.0, 1.0, None))  # the check fails
    one_line_error(runner.invoke(app, ["export", str(reference), "--out", str(out), "--drop-n-hat"]),
                   "verification failed", "(not kept)")
    monkeypatch.undo()
    assert not (tmp_path / "models").exists()  # neither the model, nor the folders made for it
    (tmp_path / "models").mkdir()
    killed = tmp_path / "models" / ".export.k1ll3d00.tmp"  # what a kill -9 during an export leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    out.mkdir()
    (out / ".model.safetensors.x1.tmp").write_bytes(b"\0" * 1000)  # an atomic copy's temp, from an older version
    result = runner.invoke(app, ["export", str(reference), "--out", str(out), "--drop-n-hat"])
    assert result.exit_code == 0, (result.output, result.exception)  # a folder holding only temps counts as empty
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["export"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())  # served like any folder
    (out / ".config.json.x2.tmp").write_text("{}")
    result = runner.invoke(app, ["export", str(reference), "--out", str(out), "--drop-n-hat", "--force"])
    assert result.exit_code == 0 and not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_second_export_into_the_same_folder_is_refused_while_the_first_runs(reference, tmp_path):
    out = tmp_path / "models" / "export"
    running = out / ".export.r4nn1ng0.tmp"  # the staging folder of the export that is running, inside --out
    running.mkdir(parents=True)
    with folder_lock(out):  # that export's lock, held through another open file
        one_line_error(runner.invoke(app, ["export", str(reference), "--out", str(out), "--drop-n-hat"]),
                       f"{out} is in use by pid {os.getpid()}", "wait until it ends")
    assert sorted(p.name for p in out.iterdir()) == [running.name]  # not taken for a killed export's; the lock gone
    # a kill -9 leaves the lock file: the next export treats the folder as empty and takes it
    (out / LOCK_FILE).write_text("pid 1 on elsewhere\n")
    running.rmdir()
    result = runner.invoke(app, ["export", str(reference), "--out", str(out), "--drop-n-hat"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert not (out / LOCK_FILE).exists() and (out / "config.json").is_file()


def test_an_export_into_an_existing_folder_needs_no_write_access_to_its_parent(reference, tmp_path, monkeypatch):
    """--out a mount point under a read-only parent: the lock and the staging folder are inside --out."""
    out = tmp_path / "ro" / "export"
    out.mkdir(parents=True)
    parent_writes = []
    real_open = os.open

    def watched(path, flags, *args, **kwargs):  # root ignores a read-only mode: catch a write in the parent instead
        if Path(path).parent == out.parent and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            parent_writes.append(path)
        return real_open(path, flags, *args, **kwargs)

    real_mkdtemp = tempfile.mkdtemp

    def watched_mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out.parent:
            parent_writes.append(dir)
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "open", watched)
    monkeypatch.setattr(tempfile, "mkdtemp", watched_mkdtemp)
    result = runner.invoke(app, ["export", str(reference), "--out", str(out), "--drop-n-hat"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert parent_writes == [] and sorted(p.name for p in out.parent.iterdir()) == ["export"]


def test_a_finished_run_resumed_again_is_left_as_it_is(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    result = resume(run_dir)
    assert f"{run_dir} is finished; nothing to resume" in result.output
    assert snapshot(run_dir) == before  # no second `done` line, nothing scored or written again


def test_export_eval_and_plot_of_an_unfinished_run_say_so(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    unfinish(run_dir)
    expected = (f"{run_dir} has not finished its search (it is still running, or was stopped): these are its best "
                f"factors after generation {GENERATIONS}")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "model"), "--drop-n-hat"])
    assert result.exit_code == 0 and expected in " ".join(result.output.split())
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0 and expected in " ".join(result.output.split())
    result = runner.invoke(app, ["export", str(reference), "--out", str(tmp_path / "finished"), "--drop-n-hat"])
    assert result.exit_code == 0 and "has not finished" not in result.output


def test_eval_refuses_a_run_it_could_not_write_into_before_measuring(reference, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "eval.json").mkdir()
    one_line_error(runner.invoke(app, ["eval", str(run_dir), "--lengths", "1x"]),
                   "eval.json: a folder stands where the file goes")
    (run_dir / "eval.json").rmdir()
    real_access = os.access  # root reads and writes everything: a read-only disk is what os.access reports then
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == run_dir and mode & os.W_OK
                        else real_access(path, mode, **kw))
    one_line_error(runner.invoke(app, ["eval", str(run_dir), "--lengths", "1x"]),
                   "(permission denied or a read-only disk); make", "copy the run somewhere writable")


@pytest.mark.parametrize("what", ["weights", "corpus folder", "corpus file", "dangling weights link"])
def test_unreadable_weights_and_corpus_are_named_as_such(setup, tmp_path, monkeypatch, what):
    model, corpus, cfg = setup
    if what == "dangling weights link":
        copy = tmp_path / "model"
        shutil.copytree(model, copy)
        (copy / "model.safetensors").unlink()
        (copy / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
        line = one_line_error(runner.invoke(app, ["search", "--config", str(cfg), "--set", f"model.name={copy}",
                                                  "--out", str(tmp_path / "run")]),
                              f"{copy}/model.safetensors is a link to {tmp_path}/gone.safetensors, which does not exist")
        assert not (tmp_path / "run").exists()
        return
    folder = Path(corpus)
    blocked = {"weights": Path(model) / "model.safetensors", "corpus folder": folder,
               "corpus file": next(folder.glob("*.txt"))}[what]
    source = str(blocked) if what == "corpus file" else corpus
    real_access = os.access  # as a user without read permission sees it (root reads everything)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == blocked and mode & os.R_OK
                        else real_access(path, mode, **kw))
    fix = "make the model readable by this user" if what == "weights" else "make the corpus readable by this user"
    one_line_error(runner.invoke(app, ["search", "--config", str(cfg), "--set", f"data.source={source}", "--out",
                                       str(tmp_path / "run")]), f"cannot read {blocked} (permission denied); {fix}")
    assert not (tmp_path / "run").exists()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_export_force_replaces_planted_links_and_never_writes_through_them(reference, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    names = ("config.json", "tokenizer.json", ".tokenizer.json.tmp", ".config.json.tmp")  # old temp names were fixed
    victims = outside_files(tmp_path, *names)
    for name, victim in victims.items():
        (out / name).symlink_to(victim)
    result = runner.invoke(app, ["export", str(reference), "--out", str(out), "--force", "--drop-n-hat", "--no-verify"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert all(victim.read_text() == "not yours to write" for victim in victims.values())
    for name in ("config.json", "tokenizer.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "longrope"


def test_plot_replaces_planted_links_in_the_plots_folder(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    victims = outside_files(tmp_path, "factors.png", "search.png")
    (run_dir / "plots").mkdir()
    for name, victim in victims.items():
        (run_dir / "plots" / name).symlink_to(victim)
    result = runner.invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert all(victim.read_text() == "not yours to write" for victim in victims.values())
    for name in victims:
        path = run_dir / "plots" / name
        assert not path.is_symlink() and path.read_bytes().startswith(b"\x89PNG")


def test_a_log_that_is_a_link_is_refused_not_appended_through(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    unfinish(run_dir)
    victim = tmp_path / "elsewhere.jsonl"
    shutil.move(run_dir / "log.jsonl", victim)
    (run_dir / "log.jsonl").symlink_to(victim)
    before = snapshot(tmp_path)
    one_line_error(runner.invoke(app, ["search", "--resume", str(run_dir)]), "log.jsonl", "symbolic link",
                   "remove the link")
    assert snapshot(tmp_path) == before


# --- bad inputs: one line, exit code 2, nothing on disk changed (points 2, 5, 6, 11) ----------------------

BAD_INPUTS = {
    # name: (argv from the arena's paths, what the line says)
    "search --target 0": (lambda p: ["search", "--config", p["cfg"], "--target", "0", "--out", p["fresh"]],
                          "search.target: length 0 is not a positive number of tokens"),
    "search.target: 0": (lambda p: ["search", "--config", p["target0"], "--out", p["fresh"]],
                         "search.target: length 0 is not a positive number of tokens"),
    "info --target 0": (lambda p: ["info", "--target", "0"], "a length must be at least 1 token"),
    "info --target 64": (lambda p: ["info", "--target", "64"],
                         "--target 64 (64 tokens) is not longer than builtin:tiny's original window (128 tokens)"),
    "plan --tflops 0": (lambda p: ["plan", "--model", "llama2-7b", "--tflops", "0"],
                        "--tflops must be a finite positive number"),
    "plan --tflops inf": (lambda p: ["plan", "--model", "llama2-7b", "--tflops", "inf"],
                          "--tflops must be a finite positive number (got inf)"),
    "info --target 99999999999999999999k": (lambda p: ["info", "--target", "99999999999999999999k"],
                                            "tokens any model here can be extended to"),
    "search.max_factor=1e308": (lambda p: ["search", "--config", p["cfg"], "--set", "search.max_factor=1e308", "--out",
                                           p["fresh"]], "search.max_factor: Input should be less than or equal to 1000000"),
    "search.population huge": (lambda p: ["search", "--config", p["cfg"], "--set",
                                          "search.population=99999999999999999999", "--out", p["fresh"]],
                               "search.population: Input should be less than or equal to 100000"),
    "negative seeds": (lambda p: ["search", "--config", p["cfg"], "--set", "search.seed=-1", "--set", "data.seed=-1",
                                  "--out", p["fresh"]], "data.seed: Input should be greater than or equal to 0"),
    "eval --seed -1": (lambda p: ["eval", p["run"], "--lengths", "1x", "--seed", "-1"], "--seed -1 is negative"),
    "critical_dim [2, 999]": (lambda p: ["search", "--config", p["cfg"], "--set", "search.critical_dim=[2, 999]",
                                         "--out", p["fresh"]], "search.critical_dim 999 leaves no pair to search"),
    "eval --passkey --trials 0": (lambda p: ["eval", p["run"], "--lengths", "1x", "--passkey", "--trials", "0"],
                                  "--passkey with --trials 0 measures nothing"),
    "finetune.fsdp=nonsense": (lambda p: ["finetune", p["run"], "--out", p["fresh"], "--set", "finetune.fsdp=nonsense"],
                               "nonsense is not one of transformers' fsdp options"),
    "finetune.seed=-3": (lambda p: ["finetune", p["run"], "--out", p["fresh"], "--set", "finetune.seed=-3"],
                         "finetune.seed: Input should be greater than or equal to 0"),
    "plan --samples 0": (lambda p: ["plan", "--model", "llama2-7b", "--samples", "0"], "--samples must be at least 1"),
    "export --device quantum": (lambda p: ["export", p["run"], "--out", p["fresh"], "--device", "quantum"],
                                "cannot use device 'quantum'"),
    "export --device cuda:99": (lambda p: ["export", p["run"], "--out", p["fresh"], "--device", "cuda:99"],
                                "cannot use device 'cuda:99'"),
    "export --verify-length 1000000000": (lambda p: ["export", p["run"], "--out", p["fresh"], "--drop-n-hat",
                                                     "--verify-length", "1000000000"],
                                          "--verify-length 1000000000 needs about"),
    "export --tolerance nan": (lambda p: ["export", p["run"], "--out", p["fresh"], "--tolerance", "nan"],
                               "--tolerance nan is not a finite number >= 0"),
    "search.mscale: .inf": (lambda p: ["search", "--config", p["cfg"], "--set", "search.mscale=.inf", "--out", p["fresh"]],
                            "search.mscale: mscale must be a finite positive number"),
    "search.mscale: .nan": (lambda p: ["search", "--config", p["cfg"], "--set", "search.mscale=.nan", "--out", p["fresh"]],
                            "search.mscale: mscale must be a finite positive number"),
    "search.max_factor: .inf": (lambda p: ["search", "--config", p["cfg"], "--set", "search.max_factor=.inf", "--out",
                                           p["fresh"]],
                                "search.max_factor: Input should be a finite number"),
    "search.step=1e-30": (lambda p: ["search", "--config", p["cfg"], "--set", "search.step=1e-30", "--out", p["fresh"]],
                          "search.step: Input should be greater than or equal to 0.000001"),
    "binary config file": (lambda p: ["search", "--config", p["binary"], "--out", p["fresh"]],
                           "is not a text file (not UTF-8)"),
    "--config DIR": (lambda p: ["search", "--config", p["folder"]], "is a folder; pass --config with a YAML file"),
    "--out under /proc": (lambda p: ["search", "--config", p["cfg"], "--out", "/proc/longrope-run"],
                          "cannot create the folder /proc/longrope-run"),
    "--out under a regular file": (lambda p: ["search", "--config", p["cfg"], "--out", p["file"] + "/run"],
                                   "is a file, not a folder"),
    "--out FILE": (lambda p: ["search", "--config", p["cfg"], "--out", p["file"]], "is a file, not a folder"),
    "export onto a folder named like a source file": (
        lambda p: ["export", p["run"], "--out", p["shadowed"], "--force", "--drop-n-hat"],
        "holds a folder tokenizer.json/ where export writes the file tokenizer.json"),
    "corpus too short (fails after the config is written)": (
        lambda p: ["search", "--config", p["cfg"], "--target", "64x", "--out", p["fresh"]], "documents"),
    "corpus too short in an empty folder": (
        lambda p: ["search", "--config", p["cfg"], "--target", "64x", "--out", p["empty"]], "documents"),
}


@pytest.fixture(scope="module")
def arena(setup, reference, tmp_path_factory):
    model, corpus, cfg = setup
    root = tmp_path_factory.mktemp("arena")
    shutil.copytree(reference, root / "run")
    target0 = search_config(model, corpus)
    target0["search"]["target"] = 0
    write_config(root / "target0.yaml", target0)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "folder").mkdir()
    (root / "folder" / "x.yaml").write_text("search: {}\n")
    (root / "a-file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "shadowed" / "tokenizer.json").mkdir(parents=True)
    paths = {"cfg": cfg, "target0": root / "target0.yaml", "binary": root / "binary.yaml", "folder": root / "folder",
             "file": root / "a-file", "run": root / "run", "fresh": root / "fresh", "empty": root / "empty",
             "shadowed": root / "shadowed"}
    return root, {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(arena, case):
    root, paths = arena
    argv, expected = BAD_INPUTS[case]
    before = snapshot(root)
    line = one_line_error(runner.invoke(app, argv(paths)), expected)
    assert "resume it" not in line  # a file or a folder that holds no run is not offered for resuming
    assert snapshot(root) == before  # a failed start removes what it wrote: no config.resolved.yaml left


def test_export_into_a_linked_folder_stages_on_its_disk_and_leaves_no_staging(reference, tmp_path):
    elsewhere = tmp_path / "scratch" / "model"
    elsewhere.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(elsewhere)  # --out a link to a scratch disk
    result = runner.invoke(app, ["export", str(reference), "--out", str(tmp_path / "models" / "tiny"), "--drop-n-hat"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (elsewhere / "config.json").is_file() and (elsewhere / "longrope.json").is_file()
    assert not [p for p in [*elsewhere.iterdir(), *(tmp_path / "models").iterdir()] if p.name.endswith(".tmp")]


def test_a_factors_file_of_the_first_format_reads_its_scores_from_ppl(tmp_path):
    spec = RopeSpec(10000.0, 16, 32)
    ff = FactorsFile(model="m", rope=spec, target_length=128, factors=[1.0] * 8,
                     scores=Scores(search=9.25, heldout=10.5, needle=0.75), baselines={"yarn": Scores(search=9.5)})
    doc = ff.to_json()
    assert doc["format"] == "longrope-factors/2" and doc["scores"] == {"search": 9.25, "heldout": 10.5, "needle": 0.75}
    old = {**{k: v for k, v in doc.items() if k != "scores"}, "format": "longrope-factors/1", "ppl": doc["scores"]}
    (tmp_path / "factors.json").write_text(json.dumps(old))
    back = load_factors(tmp_path / "factors.json")
    assert (back.scores, back.baselines) == (ff.scores, ff.baselines)
    assert [c.label for c in back.scores.measured] == ["search samples", "held-out samples", "held-out needles found"]
    (tmp_path / "factors.json").write_text(json.dumps({**doc, "scores": {"search": 9.0, "searh": 1.0}}))
    with pytest.raises(ExportError, match="missing or has a malformed field"):
        load_factors(tmp_path / "factors.json")
