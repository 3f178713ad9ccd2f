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
def test_ablation_sweep_smoke_runs_end_to_end(tmp_path, cache):
    """The benchmark's own sweep file on a tiny world (recipes/proxy/ablations_smoke.yaml): two
    processes share the runs, each run is scored by the proxy evaluator, the references are scored
    once, findings are judged, a relaunch trains nothing, and a killed sweep's tables are rebuilt.
    Checks the pipeline, not the findings."""
    out = tmp_path / "abl"
    cmd = [sys.executable, "-m", "radio_core.sweep", str(REPO / "recipes" / "proxy" / "ablations_smoke.yaml"),
           "--output-dir", str(out), "--jobs", "2", "--no-progress", "--only", "baseline*", "--only", "only_sam*"]
    env = {**__import__("os").environ, "RADIO_PROXY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["name"]: r for r in __import__("csv").DictReader(open(out / "results.csv"))}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {"baseline,seed-0", "baseline,seed-1",
                                                                   "only_sam,seed-0", "only_sam,seed-1"}
    base = rows["baseline,seed-0"]
    for key in ("proxy/64/zeroshot", "proxy/96/miou", "proxy/128/parts_miou", "proxy/192/knn", "proxy/64/se_miou"):
        assert 0 <= float(base[key]) <= 1, key
    assert rows["only_sam,seed-0"]["proxy/64/zeroshot"] == ""  # no CLIP teacher, no zero-shot
    refs = json.loads((out / "references.json").read_text())
    assert set(refs["rows"]) == {"chance", "teacher/clip", "teacher/dino", "teacher/sam", "pixels", "random"}
    assert refs["rows"]["chance"]["proxy/64/zeroshot"] == pytest.approx(0.05)
    assert set(refs["rows"]["random"]["proxy/64/miou"]) == {"0", "1"}  # one random init per seed
    assert "proxy/128/parts_miou" in refs["rows"]["teacher/sam"] and "proxy/64/miou" in refs["rows"]["pixels"]
    agg = [f for f in summary["findings"] if f["comparison"] == "agglomeration"]
    assert [f["b"] for f in agg] == ["only_clip", "only_dino", "only_sam"]
    assert agg[2]["n"] == 2 and agg[0]["verdict"].startswith("no verdict")  # only_clip did not run
    table = (out / "results.md").read_text()
    assert "## Findings" in table and "## References" in table and "## Noise" in table
    # a relaunch finds every run done: nothing is trained, references are not rescored
    logs = sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/logs/*.stdout"))
    stamp = (out / "references.json").stat().st_mtime_ns
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/logs/*.stdout")) == logs
    assert (out / "references.json").stat().st_mtime_ns == stamp
