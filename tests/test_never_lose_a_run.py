"""Never lose a run: a failed --resume changes no byte and exits non-zero with the list of what
failed and why; a new run is refused where a run lives unless --overwrite; unexpected names in
the checkpoint folder are ignored; a state beyond the schedule is named; metrics.jsonl holds each
step once after a resume; checksums are verified on load; SIGTERM exits 75 after checkpointing."""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radio_core.run import EXIT_FAILED, EXIT_REFUSED, EXIT_STOPPED, main

from helpers import env, metrics, tiny_recipe
from test_train import train

COMMON = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.export=false"]


def snapshot(root: Path) -> dict:
    """Every file's bytes (hash) and every directory under ``root`` (but the run folder's lock,
    which records its latest holder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".radio.lock":
            continue
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at step 4 of 6 with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("stopped")
    path = tiny_recipe(root, *COMMON)
    train(path, stop_at=4)
    return root


def copy_run(stopped_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(stopped_run, root)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(stopped_run), str(root)))
    return root, recipe


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def corrupt_all(kind):
    def apply(ckpts: Path) -> None:
        for c in sorted(ckpts.glob("step_*")):
            (_truncate if kind == "truncate" else _flip_byte)(c / "model.safetensors")
    return apply


FAILED_RESUMES = [
    # (case, damage to the checkpoints, overrides for the resumed recipe, fragments of the error)
    ("all_truncated", corrupt_all("truncate"), [], ["step_00000004: ValueError: checksum mismatch",
                                                    "step_00000002: ValueError: checksum mismatch"]),
    ("all_flipped_same_size", corrupt_all("flip"), [], ["step_00000004", "step_00000002", "checksum mismatch"]),
    ("truncated_without_checksums", lambda c: [(_truncate(s / "model.safetensors"), (s / "checksums.json").unlink())
                                               for s in c.glob("step_*")], [], ["step_00000004", "step_00000002"]),
    ("checksums_deleted", lambda c: [(s / "checksums.json").unlink() for s in c.glob("step_*")], [],
     ["step_00000004: ValueError: no checksums.json: a checkpoint is never loaded unverified"]),
    ("file_added_after_the_fact", lambda c: [(s / "notes.txt").write_text("x") for s in c.glob("step_*")], [],
     ["step_00000004: ValueError: file(s) not in checksums.json: notes.txt"]),
    ("recipe_changed_the_model", lambda c: None, ["student.args.embed_dim=64"], ["step_00000004", "step_00000002"]),
    ("state_beyond_the_schedule", lambda c: None, ["train.steps=3"],
     ["step_00000004 is at step 4, beyond this recipe's train.steps=3"]),
    ("state_file_garbage", lambda c: [(s / "trainer_state.json").write_text("{nope") for s in c.glob("step_*")],
     [], ["step_00000004", "step_00000002"]),
]


@pytest.mark.parametrize("case,damage,overrides,fragments", FAILED_RESUMES, ids=[c[0] for c in FAILED_RESUMES])
def test_a_failed_resume_leaves_every_byte_of_the_old_run_in_place(case, damage, overrides, fragments,
                                                                   stopped_run, tmp_path, capsys):
    root, recipe = copy_run(stopped_run, tmp_path)
    damage(root / "run" / "checkpoints")
    before = snapshot(root)
    code = main([str(recipe), *overrides, "--resume"])
    err = capsys.readouterr().err
    assert code == EXIT_REFUSED, err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    assert snapshot(root) == before


def test_a_new_run_where_a_run_lives_is_refused_unless_overwrite(stopped_run, tmp_path, capsys):
    root, recipe = copy_run(stopped_run, tmp_path)
    before = snapshot(root)
    assert main([str(recipe)]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints/, metrics.jsonl)" in err and "--overwrite" in err, err
    assert snapshot(root) == before
    assert main([str(recipe), "--resume", "--overwrite"]) == EXIT_REFUSED
    (root / "run" / "notes.txt").write_text("mine")
    assert main([str(recipe), "train.steps=2", "--overwrite"]) == 0
    assert [r["step"] for r in metrics(root / "run")] == [1, 2]
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step_00000002"]
    assert (root / "run" / "notes.txt").read_text() == "mine"  # only the run's own outputs went


def test_resume_ignores_unexpected_names_and_logs_each_step_once(stopped_run, tmp_path, capsys):
    root, recipe = copy_run(stopped_run, tmp_path)
    ckpts = root / "run" / "checkpoints"
    odd = ["step_12.bak", "step_00000009", ".tmp-step_00000005", "notes.txt", "step_00000099"]
    (ckpts / "step_12.bak").mkdir()
    (ckpts / "step_00000009").write_text("a file, not a folder")
    (ckpts / ".tmp-step_00000005").mkdir()
    (ckpts / "notes.txt").write_text("keep me")
    (ckpts / "step_00000099").mkdir()  # incomplete: no trainer_state.json
    # a kill after step 5 was logged but before its checkpoint: metrics.jsonl is ahead
    with open(root / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss/total": 1.0}) + "\n" + '{"step": 6, "loss/to')
    assert main([str(recipe), "--resume", "checkpoint.keep=1"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000004 (step 4)" in out
    assert [r["step"] for r in metrics(root / "run")] == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in ckpts.iterdir())
    assert set(odd) <= set(names), names  # ignored: never loaded, pruned or deleted
    assert "step_00000006" in names and "step_00000002" not in names  # this run's own pruning still works


def test_checksums_catch_a_flipped_byte_and_the_resume_falls_back(stopped_run, tmp_path, capsys):
    root, recipe = copy_run(stopped_run, tmp_path)
    newest = root / "run" / "checkpoints" / "step_00000004"
    table = json.loads((newest / "checksums.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "rng_rank0.safetensors", "trainer_state.json"} <= set(table)
    _flip_byte(newest / "model.safetensors")  # still a valid safetensors file, of the same size
    assert main([str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "step_00000004 could not be loaded (ValueError: checksum mismatch for model.safetensors" in out
    assert "step_00000002 (step 2)" in out
    # the unloadable checkpoint is not overwritten when the resumed run reaches step 4 again
    kept = sorted(p.name for p in newest.parent.iterdir())
    assert "step_00000004.kept-1" in kept and "step_00000004" in kept, kept


def test_sigterm_after_checkpoint_exits_75(tmp_path):
    recipe = tiny_recipe(tmp_path, "train.steps=400", "checkpoint.every=1000")
    proc = subprocess.Popen([sys.executable, "-m", "radio_core.run", str(recipe)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED == 75, out[-3000:]
    assert "stop requested: checkpoint written at step" in out
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 1


def test_too_many_undecodable_images_stop_the_run_naming_examples(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "good.png")
    for i in range(9):
        (data / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    recipe = tiny_recipe(tmp_path, "data.source={name: image_folder, args: {root: %s}}" % data, "train.steps=30",
                         "checkpoint.every=1000")
    code = main([str(recipe)])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED, err
    assert "could not be decoded, more than data.max_bad_fraction=0.01" in err and "broken" in err, err
    assert "without an export" in err and not (tmp_path / "run" / "export").exists()
    # the same folder with a tolerance that allows it trains to the end
    assert main([str(recipe), "train.steps=2", "data.max_bad_fraction=1.0", "--overwrite"]) == 0
