"""Teacher-feature cache for ablation studies that train many students against the same teachers.

Each image gets K fixed augmentations ("views", seeds from ``data.view_seed``); every teacher's
targets for every (image, view) are computed once and stored as fp16 memory-mapped ``.npy``
arrays, with an index that records the identity of everything that determines them: teacher
weights + preprocessing (``Teacher.fingerprint``), dataset keys, crop size, augmentation
parameters, seed and K. A run whose identity differs is refused with the differing fields.

An image that cannot be read is stored as zeros, flagged false in ``valid.npy`` and counted in
the index's ``bad_images`` (training leaves such samples out of every loss term).

Cached features are never transformed: a flipped or re-cropped feature map is not the teacher's
feature of the flipped image, so a cache only serves the exact crops it was computed for.

    python -m radio_core.data.cache RECIPE --views 4 [--out DIR] [overrides ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..models import preprocess
from ..models.teachers import build_teacher, compute_targets, group_teachers
from ..protocols import Teacher
from .augment import AugmentedImages, collate
from .sampling import SampleRef, view_seed

CACHE_VERSION = 1
INDEX = "index.json"


class CacheMismatchError(ValueError):
    """The cache was computed for other teachers, preprocessing, data or augmentation."""


def dataset_identity(source: Any, name: str, args: dict) -> dict:
    keys = hashlib.sha256("\n".join(source.key(i) for i in range(len(source))).encode()).hexdigest()[:16]
    return {"name": name, "args": args, "length": len(source), "keys_sha": keys}


def teacher_identity(plugin: str, teacher: Teacher) -> dict:
    return {"plugin": plugin, "fingerprint": teacher.fingerprint(), "input_size": list(teacher.input_size),
            "resize_mode": teacher.resize_mode, "mean": list(teacher.mean), "std": list(teacher.std),
            "summary_dim": teacher.summary_dim, "spatial_dim": teacher.spatial_dim}


def _diff(expected: Any, found: Any, path: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for k in sorted(set(expected) | set(found)):
            out += _diff(expected.get(k), found.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if expected == found else [f"{path}: cache has {found!r}, this run has {expected!r}"]


class FeatureCache:
    """Read side. Memory maps open lazily, so each DataLoader worker opens its own."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"cache.path: no complete teacher-feature cache at {self.path} "
                                    f"(missing {INDEX}); build it with radio cache RECIPE")
        self.index = json.loads(index.read_text())
        if self.index.get("version") != CACHE_VERSION:
            raise CacheMismatchError(f"cache.path: {self.path} has cache version {self.index.get('version')}, "
                                     f"expected {CACHE_VERSION}; rebuild it")
        self.views: int = self.index["views"]
        self.length: int = self.index["data"]["length"]
        self.teachers: dict[str, dict] = self.index["teachers"]
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def dims(self, name: str) -> tuple[Optional[int], int]:
        t = self.teachers[name]
        return t["summary_dim"], t["spatial_dim"]

    def verify(self, identity: dict) -> None:
        """Refuse the cache unless ``identity`` (same layout as the index) matches, naming every
        differing field."""
        found = {k: v for k, v in self.index.items() if k in identity}
        problems = _diff(identity, found)
        if problems:
            raise CacheMismatchError(f"cache.path: {self.path} is stale for this run:\n  " + "\n  ".join(problems)
                                     + "\nRebuild it with radio cache RECIPE, or point cache.path elsewhere.")

    def _array(self, name: str, part: str) -> np.ndarray:
        key = (name, part)
        if key not in self._arrays:
            self._arrays[key] = np.load(self.path / name / f"{part}.npy", mmap_mode="r")
        return self._arrays[key]

    def entry(self, index: int, view: int) -> int:
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} outside the cache's {self.views} views; set augment.views to {self.views}")
        return index * self.views + view

    def read(self, index: int, view: int) -> dict[str, tuple[Optional[torch.Tensor], torch.Tensor]]:
        e = self.entry(index, view)
        out = {}
        for name, meta in self.teachers.items():
            summary = (torch.from_numpy(np.array(self._array(name, "summary")[e]))
                       if meta["summary_dim"] is not None else None)
            out[name] = (summary, torch.from_numpy(np.array(self._array(name, "spatial")[e])))
        return out

    def __getstate__(self) -> dict:  # workers reopen their own memory maps
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


def build_cache(recipe: Any, registry: Any, out: str | Path, views: int, batch_size: int = 16,
                teacher_names: Optional[Sequence[str]] = None, device: Optional[str] = None,
                progress: bool = True) -> Path:
    """Compute and store every teacher's targets for ``views`` fixed views of every image."""
    from tqdm.auto import tqdm


    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = list(teacher_names or recipe.teachers)
    torch.manual_seed(recipe.train.seed)  # as the trainer does: random-init teachers build the same
    teachers = {n: build_teacher(recipe, n, registry).to(device) for n in names}
    source = registry.build("dataset", recipe.data.source.name, **recipe.data.source.args)
    crop = cache_crop_size(recipe, teachers)
    dataset = AugmentedImages(source, crop, recipe.augment.scale, recipe.augment.ratio, recipe.augment.hflip)
    resize_sets = group_teachers(teachers)
    identity = run_identity(recipe, source, teachers, crop, views)
    n_entries = len(source) * views

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    refs = [SampleRef(e, e // views, view_seed(recipe.train.seed, e // views, e % views), e % views)
            for e in range(n_entries)]
    bar = tqdm(total=n_entries, desc="teacher-feature cache", unit="crop", disable=not progress)
    valid = np.lib.format.open_memmap(tmp / "valid.npy", mode="w+", dtype=np.bool_, shape=(n_entries,))
    bad_images = 0
    for start in range(0, n_entries, batch_size):
        batch = collate([dataset[r] for r in refs[start:start + batch_size]])
        images01 = preprocess.to_float(batch["image"].to(device))
        targets = compute_targets(teachers, resize_sets, images01)
        bad = ~batch["valid"]
        if bad.any():  # unreadable image: no teacher-of-a-black-image in the cache, zeros + valid.npy
            bad_images += int(bad.sum())
            bad = bad.to(device)
            targets = {n: type(t)(summary=None if t.summary is None else t.summary.masked_fill(bad[:, None], 0),
                                  spatial=t.spatial.masked_fill(bad[:, None, None, None], 0))
                       for n, t in targets.items()}
        valid[start:start + images01.shape[0]] = batch["valid"].numpy()
        for name, t in targets.items():
            if name not in arrays:
                (tmp / name).mkdir()
                arrays[name] = {"spatial": np.lib.format.open_memmap(
                    tmp / name / "spatial.npy", mode="w+", dtype=np.float16, shape=(n_entries, *t.spatial.shape[1:]))}
                if t.summary is not None:
                    arrays[name]["summary"] = np.lib.format.open_memmap(
                        tmp / name / "summary.npy", mode="w+", dtype=np.float16, shape=(n_entries, *t.summary.shape[1:]))
            end = start + t.spatial.shape[0]
            arrays[name]["spatial"][start:end] = t.spatial.half().cpu().numpy()
            if t.summary is not None:
                arrays[name]["summary"][start:end] = t.summary.half().cpu().numpy()
        bar.update(images01.shape[0])
    bar.close()
    for parts in arrays.values():
        for a in parts.values():
            a.flush()
    valid.flush()
    index = {"version": CACHE_VERSION, **identity, "entries": n_entries,
             "bad_images": bad_images}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))  # written last: its presence = complete
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def cache_crop_size(recipe: Any, teachers: dict[str, Teacher]) -> tuple[int, int]:
    if recipe.data.crop_size:
        return tuple(recipe.data.crop_size)
    return preprocess.covering_size([t.input_size for t in teachers.values()], recipe.student.resolution)


def run_identity(recipe: Any, source: Any, teachers: dict[str, Teacher], crop: tuple[int, int], views: int) -> dict:
    return {"teachers": {n: teacher_identity(recipe.teachers[n].plugin, t) for n, t in teachers.items()},
            "data": dataset_identity(source, recipe.data.source.name, recipe.data.source.args),
            "augment": {"scale": list(recipe.augment.scale), "ratio": list(recipe.augment.ratio),
                        "hflip": recipe.augment.hflip, "crop_size": list(crop)},
            "seed": recipe.train.seed, "views": views}


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m radio_core.data.cache") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--views", type=int, default=None, help="fixed augmentations per image (default: augment.views)")
    p.add_argument("--out", default=None, help="cache directory (default: cache.path of the recipe)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teachers", nargs="*", help="cache only these teachers (default: all)")
    args = p.parse_args(argv)
    from ..recipe import RecipeError, load_recipe
    from ..registry import get_registry

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    views = args.views or recipe.augment.views
    out = args.out or (recipe.cache.path if recipe.cache else None)
    if not views or not out:
        print("error: give --views (or augment.views) and --out (or cache.path)", file=sys.stderr)
        return 2
    path = build_cache(recipe, get_registry(), out, views, args.batch_size, args.teachers)
    print(f"cache written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
