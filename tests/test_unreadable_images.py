"""Unreadable images: out of every loss term and out of the teacher-feature cache, still counted."""
import json

import numpy as np
import torch
from PIL import Image

from radio_core.models.distiller import Distiller
from radio_core.protocols import TeacherOutput
from radio_core.recipe import load_recipe
from radio_core.registry import get_registry
from radio_core.models.losses import build_losses
from radio_core.train.objective import Objective

from helpers import tiny_recipe


def test_invalid_samples_are_left_out_of_every_loss_term(tmp_path, registry):
    recipe = load_recipe(tiny_recipe(tmp_path))
    objective = Objective(recipe, registry, {}, set(), None)
    student = registry.build("student", "vit", model="vit_tiny", embed_dim=16, depth=1, num_heads=2, num_cls_tokens=2)
    distiller = Distiller(student, [], {}, {}, losses=build_losses(recipe, registry, set()))
    g = torch.Generator().manual_seed(0)
    preds = {"clip": (torch.randn(3, 8, generator=g), torch.randn(3, 6, 4, 4, generator=g)),
             "sam": (None, torch.randn(3, 5, 4, 4, generator=g))}
    targets = {"clip": TeacherOutput(torch.randn(3, 8, generator=g), torch.randn(3, 6, 4, 4, generator=g)),
               "sam": TeacherOutput(None, torch.randn(3, 5, 4, 4, generator=g))}
    valid = torch.tensor([True, False, True])
    masked = objective.losses(distiller, preds, targets, {}, valid=valid)
    keep = [0, 2]
    sub = objective.losses(distiller, {n: tuple(None if p is None else p[keep] for p in v) for n, v in preds.items()},
                           {n: TeacherOutput(None if t.summary is None else t.summary[keep], t.spatial[keep])
                            for n, t in targets.items()}, {})
    assert masked.keys() == sub.keys()
    for k in masked:
        assert torch.equal(masked[k], sub[k]), k
    # a black image's garbage no longer moves any term
    targets["clip"].summary[1] += 100
    targets["sam"].spatial[1] *= -3
    again = objective.losses(distiller, preds, targets, {}, valid=valid)
    assert all(torch.equal(again[k], masked[k]) for k in masked)
    # no readable sample at all: zero-weighted terms only (DDP still sees every head)
    none = objective.losses(distiller, preds, targets, {}, valid=torch.zeros(3, dtype=torch.bool))
    assert set(none) == {"total"} and float(none["total"]) == 0.0


def test_the_cache_stores_no_teacher_features_of_unreadable_images(tmp_path):
    from radio_core.data.cache import INDEX, build_cache

    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    path = tiny_recipe(tmp_path, "data.source={name: image_folder, args: {root: %s}}" % data)
    out = build_cache(load_recipe(path), get_registry(), tmp_path / "features", 1, batch_size=4, progress=False)
    index = json.loads((out / INDEX).read_text())
    valid = np.load(out / "valid.npy")
    assert index["bad_images"] == 1 and valid.sum() == 3 and valid.shape == (4,)
    bad = int(np.flatnonzero(~valid)[0])
    for teacher in ("clip", "dino", "sam"):
        spatial = np.load(out / teacher / "spatial.npy", mmap_mode="r")
        assert not spatial[bad].any() and all(spatial[i].any() for i in np.flatnonzero(valid)), teacher
