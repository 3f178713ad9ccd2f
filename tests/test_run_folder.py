"""Run folders cannot collide: a run holds an exclusive lock on its output_dir for its whole life
(a second run there is refused, naming the holder; the lock dies with the process), and
``--overwrite`` deletes only what the earlier run recorded writing in its manifest, never a
user's own ``export/``, ``report/`` or ``recipe.yaml``."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import env, tiny_recipe

from radio_core.formats.run_folder import LOCK_FILE, MANIFEST_FILE
from radio_core.run import main


def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.slow
def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    recipe = tiny_recipe(tmp_path, "train.steps=100000", "checkpoint.every=100000", "checkpoint.export=false")
    cmd = [sys.executable, "-m", "radio_core.run", str(recipe)]
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.stat().st_size) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.5)
        for extra in ([], ["--resume"]):  # however it is asked, the folder is taken
            second = subprocess.run(cmd + extra, env=env(), capture_output=True, text=True, timeout=240)
            errors = _errors(second.stderr)
            assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
            assert f"is in use by another run: pid {first.pid} on " in errors[0] and "run.py" in errors[0] and str(recipe) in errors[0]
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)  # the lock dies with its process, however it dies
        first.wait(timeout=60)
    again = subprocess.run(cmd + ["--resume", "train.steps=1"], env=env(), capture_output=True, text=True,
                           timeout=240)
    assert "in use by another run" not in again.stderr, again.stderr[-2000:]


def test_the_lock_is_taken_before_the_folder_is_looked_at_and_released_at_the_end(tmp_path):
    import fcntl

    from radio_core.formats.run_folder import lock_run_folder, unlock_run_folder

    out = tmp_path / "run"
    lock_run_folder(out)
    try:  # another open file description (as another process would have) cannot take it
        fd = os.open(out / LOCK_FILE, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        unlock_run_folder(out)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: free to take
    os.close(fd)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step run with its checkpoint and export, and the manifest it wrote."""
    root = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe(root, "train.steps=2", "checkpoint.every=2")
    assert main([str(recipe)]) == 0
    return root, recipe


def _copy(finished, tmp_path):
    import shutil

    root, recipe = finished
    shutil.copytree(root, tmp_path / "copy")
    text = recipe.read_text().replace(str(root), str(tmp_path / "copy"))
    (tmp_path / "copy" / "recipe.yaml").write_text(text)
    return tmp_path / "copy" / "run", tmp_path / "copy" / "recipe.yaml"


def test_the_manifest_lists_what_the_run_wrote(finished):
    root, _ = finished
    written = json.loads((root / "run" / MANIFEST_FILE).read_text())["written"]
    assert {"recipe.yaml", "metrics.jsonl", "export", "checkpoints", "checkpoints/step_00000002"} <= set(written)
    assert all((root / "run" / w).exists() for w in written if w != "tensorboard")


def test_overwrite_removes_only_what_the_manifest_lists(finished, tmp_path, capsys):
    run, recipe = _copy(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "my_weights.safetensors").write_text("mine too")
    (run / "checkpoints" / "step_00000001").mkdir()  # a folder of a checkpoint's name the run never wrote
    assert main([str(recipe), "train.steps=1", "--overwrite"]) == 0, capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "my_weights.safetensors").read_text() == "mine too"
    assert "--overwrite: removed the earlier run's" in capsys.readouterr().out
    written = json.loads((run / MANIFEST_FILE).read_text())["written"]
    assert "checkpoints/step_00000002" not in written and not (run / "checkpoints" / "step_00000002").exists()


@pytest.mark.parametrize("name,make", [
    ("export/", lambda p: ((p / "export").mkdir(), (p / "export" / "paper.pdf").write_text("mine"))),
    ("report/", lambda p: ((p / "report").mkdir(), (p / "report" / "draft.md").write_text("mine"))),
    ("recipe.yaml", lambda p: (p / "recipe.yaml").write_text("# my notes\n")),
])
def test_a_users_own_files_named_like_run_outputs_are_never_touched(name, make, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    make(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    recipe = tiny_recipe(tmp_path, "train.steps=1", "eval.report=true")
    for extra in ([], ["--overwrite"]):
        assert main([str(recipe), f"output_dir={out}", *extra]) == 2
        errors = _errors(capsys.readouterr().err)
        assert len(errors) == 1 and name in errors[0] and "no run recorded writing" in errors[0], errors
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before


def test_overwrite_of_a_run_without_a_manifest_deletes_nothing(finished, tmp_path, capsys):
    run, recipe = _copy(finished, tmp_path)
    (run / MANIFEST_FILE).unlink()  # as a folder written before manifests existed
    files = sorted(p for p in run.rglob("*") if p.name != LOCK_FILE)
    assert main([str(recipe), "--overwrite"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and f"but no {MANIFEST_FILE}" in err[0] and "remove" in err[0]
    assert sorted(p for p in run.rglob("*") if p.name != LOCK_FILE) == files


def test_a_manifest_cannot_point_outside_the_folder(finished, tmp_path, capsys):
    run, recipe = _copy(finished, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    manifest["written"] += [str(victim), "../victim.txt"]
    (run / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert main([str(recipe), "train.steps=1", "--overwrite"]) == 0, capsys.readouterr().err
    assert victim.read_text() == "keep"
