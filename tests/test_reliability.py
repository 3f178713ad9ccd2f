"""Pre-emption, corrupt checkpoints, broken images, non-finite losses, bad plugins, unsafe pickles."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from helpers import env_with, install_recorder, metrics, tiny_recipe, torchrun_cmd
from PIL import Image
from test_train import train

from radio_core.recipe import load_recipe
from radio_core.registry import PluginError, Registry
from radio_core.train.loop import NonFiniteLossError, Trainer


def last_per_step(rows):
    """metrics.jsonl after a resume from an older checkpoint holds repeated steps: keep the last."""
    return {r["step"]: r for r in rows}


@pytest.mark.slow
def test_sigterm_on_two_ranks_checkpoints_and_resume_continues_the_curve(tmp_path):
    site = install_recorder(tmp_path)
    steps = ["train.steps=14"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    subprocess.run(torchrun_cmd(2, str(tiny_recipe(full_dir, *steps))), env=env_with(site), check=True,
                   capture_output=True, timeout=240)
    recipe = tiny_recipe(cut_dir, *steps)
    # A real SIGTERM to the torchrun launcher, as a scheduler sends on pre-emption: it is
    # forwarded to both ranks, which finish the step in flight, checkpoint and exit.
    proc = subprocess.Popen(torchrun_cmd(2, str(recipe)), env=env_with(site), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = cut_dir / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stop requested: checkpoint written at step" in out, out[-3000:]
    stopped_at = len(metrics(cut_dir / "run"))
    assert 4 <= stopped_at < 14
    ckpts = sorted(p.name for p in (cut_dir / "run" / "checkpoints").iterdir())
    assert ckpts == [f"step_{stopped_at:08d}"]  # complete, no leftover temp directory
    subprocess.run(torchrun_cmd(2, str(recipe), "--resume"), env=env_with(site), check=True,
                   capture_output=True, timeout=240)
    full, cut = metrics(full_dir / "run"), metrics(cut_dir / "run")
    assert [r["step"] for r in cut] == list(range(1, 15))
    for a, b in zip(full, cut):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5, abs=1e-6), a["step"]
    rec = [json.loads((cut_dir / "run" / f"record_rank{r}.json").read_text()) for r in range(2)]
    assert rec[0]["digest"] == rec[1]["digest"] == json.loads(
        (full_dir / "run" / "record_rank0.json").read_text())["digest"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    common = ["train.steps=12", "checkpoint.every=4", "checkpoint.keep=3"]
    train(tiny_recipe(tmp_path / "full", *common))
    path = tiny_recipe(tmp_path / "cut", *common)
    train(path, stop_at=10)
    ckpts = tmp_path / "cut" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000008", "step_00000010"]
    weights = ckpts / "step_00000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # truncated mid-write
    trainer, _ = train(path, resume=True)
    err = capsys.readouterr().out
    assert "step_00000010 could not be loaded" in err and "resumed from" in err and "step_00000008" in err
    full, cut = metrics(tmp_path / "full" / "run"), last_per_step(metrics(tmp_path / "cut" / "run"))
    for a in full:
        assert cut[a["step"]]["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5, abs=1e-6), a["step"]


def test_folder_of_broken_images_trains_with_the_right_skip_count(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    good = [("rgb.jpg", "RGB"), ("cmyk.jpg", "CMYK"), ("grey.png", "L"), ("palette.png", "P"),
            ("alpha.png", "RGBA"), ("tiny.png", "RGB")]
    for name, mode in good:
        size = (1, 1) if name.startswith("tiny") else (80, 60)
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(data / name)
    Image.fromarray(rng.integers(0, 65535, (60, 80), dtype=np.uint16)).save(data / "deep16.png")
    (data / "zero.jpg").write_bytes(b"")
    (data / "garbage.png").write_bytes(b"\x89PNG not really")
    raw = (data / "rgb.jpg").read_bytes()
    (data / "truncated.jpg").write_bytes(raw[: len(raw) // 3])
    # 10 files, 3 unreadable; one epoch = 10 samples = 5 steps of 2
    path = tiny_recipe(tmp_path, "data.source={name: image_folder, args: {root: %s}}" % data,
                       "data.batch_size=2", "train.steps=5")
    trainer, last = train(path)
    assert trainer.state.bad_images == last["bad_images"] == 3
    assert np.isfinite(last["loss/total"])


def test_non_finite_losses_skip_steps_then_stop_with_a_clear_message(tmp_path, capsys):
    from radio_core.hookspecs import hookimpl

    class Diverge:  # what a far too large learning rate does, in one step (optim.lr is capped at 1)
        @staticmethod
        @hookimpl
        def radio_step_end(trainer, step, metrics):
            if step == 2:
                with torch.no_grad():
                    next(trainer.unwrapped.student.parameters()).fill_(float("inf"))

    path = tiny_recipe(tmp_path, "train.max_nonfinite_steps=2", "train.steps=10", "checkpoint.every=1")
    trainer = Trainer(load_recipe(path))
    trainer.registry.plugin_manager.register(Diverge, name="diverge")
    try:
        with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
            trainer.fit()
    finally:
        trainer.registry.plugin_manager.unregister(name="diverge")
    out = capsys.readouterr().out
    assert "non-finite loss from" in out and "step skipped" in out
    assert any(k in out for k in ("clip/", "dino/", "sam/"))  # names the teacher terms


def test_a_plugin_that_breaks_the_output_protocol_is_named(tmp_path, registry):
    from radio_core import Teacher, TeacherOutput, hookimpl

    class WrongShape(Teacher):
        def __init__(self, resolution=None):
            super().__init__()
            self.input_size, self.patch_size = (32, 32), 16
            self.mean = self.std = (0.5, 0.5, 0.5)
            self.summary_dim, self.spatial_dim = 8, 8
            self.proj = torch.nn.Conv2d(3, 8, 16, 16)

        def forward(self, x):
            return TeacherOutput(summary=None, spatial=self.proj(x).flatten(2))  # (B, C, N): not a grid

    class Plugin:
        @staticmethod
        @hookimpl
        def radio_register(registry):
            registry.add("teacher", "wrong_shape", WrongShape)

    reg = Registry()
    reg.load_entry_points()
    reg.register_plugin(Plugin, name="wrong_shape_plugin")
    recipe = load_recipe(tiny_recipe(tmp_path, "teachers={bad: {plugin: wrong_shape}}"))
    with pytest.raises(PluginError, match=r"teachers\.bad \(plugin 'wrong_shape'\): spatial output has shape"):
        Trainer(recipe, registry=reg).fit()
