"""The proxy benchmark (radio_proxy): a deterministic world, teachers cached by fingerprint and
loaded by the built-in plugins, the boundary metric, and the ablation pipeline end to end."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from radio_proxy import world as W

SMALL = {"train": 12, "val": 4, "test": 4}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIO_PROXY_CACHE", str(tmp_path / "proxy"))
    return tmp_path / "proxy"


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = W.generate_world(W.WorldConfig(**SMALL), root=tmp_path / "a")
    b = W.generate_world(W.WorldConfig(**SMALL), root=tmp_path / "b")
    assert digest(a.directory) == digest(b.directory)  # every array, caption file and world.json
    c = W.generate_world(W.WorldConfig(seed=1, **SMALL), root=tmp_path / "c")
    assert c.fingerprint != a.fingerprint
    assert not np.array_equal(np.asarray(a.images("train")), np.asarray(c.images("train")))
    # one scene is a pure function of (config, split, index): regenerating it alone gives the same bytes
    scene = W.render_scene(W.WorldConfig(**SMALL), "test", 3)
    assert np.array_equal(scene.image, a.images("test")[3]) and scene.caption == a.captions("test")[3]


def test_scene_labels_agree_with_the_pixels(tmp_path):
    world = W.generate_world(W.WorldConfig(**SMALL), root=tmp_path)
    for i in range(4):
        scene = W.render_scene(world.cfg, "val", i)
        colour, shape = W.CLASSES[scene.label].split()
        assert f"{colour} {shape}" in scene.caption  # the caption names the main object
        assert (scene.semantic == W.SHAPE_OFFSET + W.SHAPES.index(shape)).sum() > 200  # which covers a large area
        background = scene.semantic < W.SHAPE_OFFSET  # sky above the horizon, ground below, whatever is drawn
        rows = np.arange(128)[:, None].repeat(128, 1)
        assert (scene.semantic[background] == (rows[background] >= 64)).all()
        assert ((scene.parts > 0) == (scene.semantic >= W.SHAPE_OFFSET)).all()  # every object pixel is in a part
    assert world.cfg.size == 128 and W.WorldConfig().test >= 2000


def test_part_textures_are_fine_and_invisible_to_a_linear_read_out():
    """Each part's 1-px texture has a random sign: its energy tells the textures apart, the mean
    of the pixels does not, and at half resolution the texture averages away."""
    energy, mean_gap, low_res_energy = {k: [] for k in (1, 2, 3)}, [], []
    for i in range(30):
        scene = W.render_scene(W.WorldConfig(), "train", i)
        grey = scene.image.astype(np.float64).mean(-1)
        # high-pass along rows, columns and the diagonal: which one fires names the texture
        dy = np.abs(np.diff(grey, axis=0))[:, :-1]
        dx = np.abs(np.diff(grey, axis=1))[:-1, :]
        inner = scene.parts[:-1, :-1]
        for k in (1, 2, 3):
            sel = (inner == k) & (np.roll(inner, 1, 0) == k) & (np.roll(inner, 1, 1) == k)
            if sel.sum() > 50:
                energy[k].append((dy[sel].mean(), dx[sel].mean()))
        half = grey.reshape(64, 2, 64, 2).mean((1, 3))
        obj = scene.parts.reshape(64, 2, 64, 2).min((1, 3)) > 0
        if obj.sum() > 50:  # inside objects, at 64 px: flat up to the image noise
            low_res_energy.append(np.abs(np.diff(half, axis=1))[obj[:, :-1] & obj[:, 1:]].mean())
    horizontal, vertical = np.mean(energy[1], 0), np.mean(energy[2], 0)
    assert horizontal[0] > 5 * horizontal[1] and vertical[1] > 5 * vertical[0]  # stripes across rows / columns
    assert np.mean(energy[3], 0).min() > 20  # checks change along both
    assert np.mean(low_res_energy) < 0.25 * horizontal[0]


def test_proxy_world_is_a_dataset_source(registry, cache):
    source = registry.build("dataset", "proxy_world", split="val", world=SMALL)
    assert len(source) == 4 and source.load(0).size == (128, 128)
    assert source.key(1).endswith("/val/000001")
    from radio_core import PluginError

    with pytest.raises(PluginError, match="split must be one of train, val, test"):
        registry.build("dataset", "proxy_world", split="holdout", world=SMALL)
    with pytest.raises(PluginError, match="unknown option"):
        registry.build("dataset", "proxy_world", world={"trian": 3})


def test_teachers_are_cached_by_fingerprint_and_loaded_by_the_builtin_plugins(registry, cache):
    from radio_plugins.clip import ClipTeacher
    from radio_plugins.dinov2 import Dinov2Teacher
    from radio_plugins.sam import SamTeacher
    from radio_proxy.teachers import ensure_teacher

    first, trained = ensure_teacher("dinov2", "tiny", world=SMALL, log=lambda *_: None)
    assert trained and json.loads((first / "trained.json").read_text())["world"] == W.WorldConfig(**SMALL).fingerprint()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again, trained = ensure_teacher("dinov2", "tiny", world=SMALL, log=lambda *_: None)
    assert again == first and not trained and (first / "model.safetensors").stat().st_mtime_ns == stamp
    other_world, trained = ensure_teacher("dinov2", "tiny", world={**SMALL, "seed": 1}, log=lambda *_: None)
    assert trained and other_world != first
    other_cfg, trained = ensure_teacher("dinov2", "tiny", world=SMALL, config={"steps": 3}, log=lambda *_: None)
    assert trained and other_cfg not in (first, other_world)

    dino = registry.build("teacher", "proxy_dinov2", preset="tiny", world=SMALL)
    assert isinstance(dino, Dinov2Teacher) and dino.input_size == (64, 64)
    from safetensors.torch import load_file

    saved = load_file(str(first / "model.safetensors"))  # the trained weights, not a fresh init
    # (transformers may rename keys on load: compare the tensors' norms, sorted)
    norms = sorted(round(float(v.float().norm()), 4) for v in saved.values())
    assert sorted(round(float(v.float().norm()), 4) for v in dino.model.state_dict().values()) == norms
    clip = registry.build("teacher", "proxy_clip", preset="tiny", world=SMALL)
    assert isinstance(clip, ClipTeacher) and clip.encode_text(["a photo of a red star."]).shape == (1, clip.summary_dim)
    sam = registry.build("teacher", "proxy_sam", preset="tiny", world=SMALL)
    assert isinstance(sam, SamTeacher) and sam(torch.zeros(1, 3, 128, 128)).spatial.shape[-2:] == (16, 16)
    # meta builds (planning) need no training
    meta = registry.build("teacher", "proxy_sam", preset="standard", meta=True)
    assert meta.spatial_dim == 32


def test_boundary_f_score_by_hand():
    from radio_core.eval.metrics import boundary_f_score

    target = torch.zeros(1, 16, 16, dtype=torch.bool)
    target[0, 8, 2:14] = True  # a 12-px horizontal edge
    exact = boundary_f_score(target.float(), target)
    assert exact["boundary_f"] == pytest.approx(1.0)
    shifted = torch.roll(target, 1, dims=1).float()  # one pixel off: inside the 1-px tolerance
    assert boundary_f_score(shifted, target)["boundary_f"] == pytest.approx(1.0)
    far = torch.roll(target, 3, dims=1).float()
    assert boundary_f_score(far, target)["boundary_f"] == 0.0
    half = target.float().clone()
    half[0, 8, 8:14] = 0  # columns 2-7 found, nothing wrong: P = 1; columns 2-8 lie within 1 px: R = 7/12
    r = boundary_f_score(half, target)
    assert (r["precision"], r["recall"]) == (pytest.approx(1.0), pytest.approx(7 / 12))
    assert r["boundary_f"] == pytest.approx(2 * (7 / 12) / (1 + 7 / 12))


@pytest.mark.slow
def test_ablation_suite_smoke_runs_end_to_end(tmp_path, cache):
    """The CI version of the ablation suite: one seed, a few steps, tiny world and teachers, two
    processes sharing the runs. Checks the pipeline (training, downstream evaluation, the table of
    every run whichever process did it, resume), not the findings."""
    out = tmp_path / "abl"
    cmd = [sys.executable, str(REPO / "bench" / "proxy_ablations.py"), str(REPO / "recipes" / "proxy" / "ablations.yaml"),
           "--smoke", "--arms", "baseline", "only_sam", "vitdet", "eradio", "--output-dir", str(out), "--jobs", "2"]
    env = {**__import__("os").environ, "RADIO_PROXY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "baseline" / "seed0" / "results.json").read_text())
    scores = result["scores"]
    assert set(scores) == {"student@64", "student@128", "teacher/clip", "teacher/dino", "teacher/sam"}
    assert set(scores["student@64"]) == {"zeroshot", "knn", "linear", "miou", "boundary_f"}
    assert "zeroshot" in scores["teacher/clip"] and "zeroshot" not in scores["teacher/sam"]
    only_sam = json.loads((out / "only_sam" / "seed0" / "results.json").read_text())["scores"]["student@64"]
    assert "zeroshot" not in only_sam  # no CLIP teacher, no zero-shot
    # ViTDet mode is scored only where the student has windowed blocks, with its throughput
    vitdet = json.loads((out / "vitdet" / "seed0" / "results.json").read_text())
    assert set(vitdet["scores"]["student@128w8"]) == {"zeroshot", "knn", "linear", "miou", "boundary_f"}
    assert set(vitdet["meta"]["images_per_s"]) == {"student@64", "student@128", "student@128w8"}
    assert "student@128w8" in result["meta"]["evaluated"] and "student@128w8" not in scores
    table = (out / "results.md").read_text()
    assert "| baseline | 1 |" in table and "inconclusive (one seed: no interval)" in table
    assert "miou@128w8 vs miou@128 | vitdet - baseline" in table and "| vitdet |" in table
    # an arm that swaps the student plugin (the ViT's args dropped), and its speed against the baseline
    assert "| miou@64 | eradio - baseline |" in table and "| eradio | 128 px |" in table
    # a relaunch finds every run done and trains nothing; an evaluation the spec gained since
    # (here: the windowed one, forgotten) is added without training
    del vitdet["scores"]["student@128w8"]
    vitdet["meta"]["evaluated"].remove("student@128w8")
    (out / "vitdet" / "seed0" / "results.json").write_text(json.dumps(vitdet))
    logs = {arm: (out / arm / "seed0" / "train.log").stat().st_size for arm in ("baseline", "vitdet")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {arm: (out / arm / "seed0" / "train.log").stat().st_size for arm in logs} == logs
    assert json.loads((out / "baseline" / "seed0" / "results.json").read_text()) == result
    again = json.loads((out / "vitdet" / "seed0" / "results.json").read_text())
    assert "student@128w8" in again["scores"] and "student@128w8" in again["meta"]["evaluated"]


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("proxy_ablations", REPO / "bench" / "proxy_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confidence_intervals_and_verdicts():
    bench = _bench()
    mean, half = bench.mean_ci([0.50, 0.52, 0.54])
    assert mean == pytest.approx(0.52) and half == pytest.approx(4.3027 * 0.02 / 3 ** 0.5, rel=1e-4)  # t(.975, 2)
    assert bench.mean_ci([0.5]) == (0.5, None)
    assert bench.verdict([(0.05, 0.01), (0.03, 0.02)], "better", 0.0) == "reproduced"
    assert bench.verdict([(0.05, 0.01), (-0.03, 0.02)], "better", 0.0) == "not reproduced"
    assert bench.verdict([(0.05, 0.01), (0.01, 0.02)], "better", 0.0) == "inconclusive"
    assert bench.verdict([(-0.01, 0.005)], "not_worse", 0.02) == "reproduced"
    assert bench.verdict([(-0.05, 0.01)], "not_worse", 0.02) == "not reproduced"
    assert bench.verdict([(0.05, None)], "better", 0.0).startswith("inconclusive")
