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

Reads are cheap: the arrays are memory-mapped copy-on-write, so an entry is a zero-copy view of
the page cache and the only copy is the one into the batch (``collate``); the loader reads
ahead in a background thread or its workers (``data.prefetch``, ``data.num_workers``).

Compressed option (``--pca K`` or ``compress_cache``): each teacher's spatial features are
stored as K fp16 coefficients on a per-teacher PCA basis (fitted exactly, on every cached
token) and reconstructed on read; the index records the basis size and its fidelity cost (mean
cosine similarity and relative L2 error of the reconstruction against the fp16 features).

    python -m radio_core.data.cache RECIPE --views 4 [--out DIR] [--pca K] [overrides ...]
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
from ..utils import OneLineParser, check_user_file, read_user_json
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
        self.index = read_user_json(index, "cache index")
        if not isinstance(self.index, dict) or self.index.get("version") != CACHE_VERSION:
            raise CacheMismatchError(f"cache.path: {self.path} has cache version {self.index.get('version')}, "
                                     f"expected {CACHE_VERSION}; rebuild it")
        self.views: int = self.index["views"]
        self.length: int = self.index["data"]["length"]
        self.teachers: dict[str, dict] = self.index["teachers"]
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        #: per-teacher PCA basis (spatial_dim, K) and mean (spatial_dim,) of a compressed cache
        self.codec: dict = self.index.get("codec", {})
        self._bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
            # copy-on-write: writable for torch.from_numpy (no copy, no warning), file untouched
            path = self.path / name / f"{part}.npy"
            check_user_file(path, "cached features", None)
            try:  # never unpickled: an object array in the cache is refused
                self._arrays[key] = np.load(path, mmap_mode="c", allow_pickle=False)
            except ValueError as exc:
                raise CacheMismatchError(f"cache.path: {path} is not a feature array ({exc})") from None
        return self._arrays[key]

    def _basis(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._bases:
            path = self.path / name / "pca.npz"
            check_user_file(path, "cache PCA basis", None)
            try:
                with np.load(path, allow_pickle=False) as f:
                    self._bases[name] = (torch.from_numpy(f["basis"]), torch.from_numpy(f["mean"]))
            except (ValueError, KeyError) as exc:
                raise CacheMismatchError(f"cache.path: {path} is not a PCA basis ({exc})") from None
        return self._bases[name]

    def bytes_per_entry(self) -> dict[str, int]:
        """Stored bytes per (image, view), per teacher."""
        out = {}
        for name, meta in self.teachers.items():
            parts = ["spatial"] + (["summary"] if meta["summary_dim"] is not None else [])
            out[name] = sum(self._array(name, p)[0].nbytes for p in parts)
        return out

    def entry(self, index: int, view: int) -> int:
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} outside the cache's {self.views} views; set augment.views to {self.views}")
        return index * self.views + view

    def read(self, index: int, view: int) -> dict[str, tuple[Optional[torch.Tensor], torch.Tensor]]:
        """Every teacher's (summary, spatial) targets of one entry: fp16 zero-copy views of the
        memory maps (pages are read when the batch is collated), or for a PCA-compressed teacher
        the fp32 reconstruction."""
        e = self.entry(index, view)
        out = {}
        for name, meta in self.teachers.items():
            summary = (torch.from_numpy(self._array(name, "summary")[e])
                       if meta["summary_dim"] is not None else None)
            spatial = torch.from_numpy(self._array(name, "spatial")[e])
            if name in self.codec:
                basis, mean = self._basis(name)  # (C, K), (C,); coefficients are (K, h, w)
                spatial = torch.einsum("ck,khw->chw", basis, spatial.float()) + mean.view(-1, 1, 1)
            out[name] = (summary, spatial)
        return out

    def __getstate__(self) -> dict:  # workers reopen their own memory maps
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


def compress_cache(src: str | Path, out: str | Path, dims: int | dict[str, int], chunk: int = 64,
                   fit_entries: Optional[int] = None) -> Path:
    """Write a copy of the fp16 cache ``src`` whose spatial features are ``dims`` PCA coefficients
    per token (per teacher, or one number for all), with the fidelity cost in the index.

    The basis is exact for the tokens it is fitted on: mean and covariance accumulate (fp64)
    over every token of the first ``fit_entries`` entries (default: all), and the top-``dims``
    eigenvectors are kept. The fidelity is measured on the entries not fitted on when there are
    any (``held_out`` in the index), else on all of them. No teacher is run."""
    source = FeatureCache(src)
    if source.codec:
        raise ValueError(f"cache: {src} is already compressed; compress the fp16 cache")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n = source.index["entries"]
    codec, fidelity = {}, {}
    for name, meta in source.teachers.items():
        (tmp / name).mkdir()
        if meta["summary_dim"] is not None:
            shutil.copyfile(source.path / name / "summary.npy", tmp / name / "summary.npy")
        sp = source._array(name, "spatial")  # (n, C, h, w) fp16
        c = sp.shape[1]
        k = dims.get(name, c) if isinstance(dims, dict) else int(dims)
        if not 0 < k < c:  # nothing to gain: keep this teacher in fp16
            shutil.copyfile(source.path / name / "spatial.npy", tmp / name / "spatial.npy")
            continue

        def tokens(a: int, b: int) -> torch.Tensor:  # (tokens, C) fp64
            return torch.from_numpy(sp[a:b]).double().permute(0, 2, 3, 1).reshape(-1, c)

        fit = min(fit_entries or n, n)
        total, s1, s2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
        for a in range(0, fit, chunk):
            x = tokens(a, min(a + chunk, fit))
            total, s1, s2 = total + x.shape[0], s1 + x.sum(0), s2 + x.T @ x
        mean = s1 / total
        _, vecs = torch.linalg.eigh(s2 / total - torch.outer(mean, mean))
        basis = vecs[:, -k:].flip(1).contiguous()  # (C, K), largest variance first
        np.savez(tmp / name / "pca.npz", basis=basis.float().numpy(), mean=mean.float().numpy())
        coef = np.lib.format.open_memmap(tmp / name / "spatial.npy", mode="w+", dtype=np.float16,
                                         shape=(n, k, *sp.shape[2:]))
        held_out = fit < n
        count, cos_sum, err2, ref2 = 0, 0.0, 0.0, 0.0
        for a in range(0, n, chunk):
            x = tokens(a, a + chunk)
            y = ((x - mean) @ basis).half()  # what is stored
            b = min(a + chunk, n) - a
            measured = slice((max(fit - a, 0) if held_out else 0) * (x.shape[0] // b), None)
            rec, ref = y[measured].double() @ basis.T + mean, x[measured]
            count += rec.shape[0]
            cos_sum += float(torch.nn.functional.cosine_similarity(rec, ref, dim=-1).sum())
            err2, ref2 = err2 + float(((rec - ref) ** 2).sum()), ref2 + float((ref ** 2).sum())
            coef[a:a + b] = y.float().reshape(b, *sp.shape[2:], k).permute(0, 3, 1, 2).numpy()
        coef.flush()
        codec[name] = {"kind": "pca", "dims": k, "spatial_dim": c}
        fidelity[name] = {"mean_cosine": cos_sum / max(count, 1), "relative_l2": (err2 / max(ref2, 1e-30)) ** 0.5,
                          "held_out": held_out, "fit_entries": fit,
                          "compression": round(c / k, 2)}
    index = {**source.index, "codec": codec, "fidelity": fidelity}
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def build_cache(recipe: Any, registry: Any, out: str | Path, views: int, batch_size: int = 16,
                teacher_names: Optional[Sequence[str]] = None, device: Optional[str] = None,
                progress: bool = True) -> Path:
    """Compute and store every teacher's targets for ``views`` fixed views of every image."""
    from ..progress import progress as progress_display

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
    bar = progress_display(n_entries, "teacher-feature cache", "crop", enabled=progress)
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
    p = OneLineParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--views", type=int, default=None, help="fixed augmentations per image (default: augment.views)")
    p.add_argument("--out", default=None, help="cache directory (default: cache.path of the recipe)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teachers", nargs="*", help="cache only these teachers (default: all)")
    p.add_argument("--pca", type=int, default=None,
                   help="store K PCA coefficients per token instead of the fp16 features (prints the fidelity cost)")
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
    if args.pca:
        fp16 = path.with_name(path.name + ".fp16")
        os.replace(path, fp16)
        path = compress_cache(fp16, path, args.pca)
        shutil.rmtree(fp16)
        for name, f in json.loads((path / INDEX).read_text())["fidelity"].items():
            print(f"{name}: PCA {args.pca} dims, mean cosine {f['mean_cosine']:.4f}, relative L2 {f['relative_l2']:.4f}")
    sizes = FeatureCache(path).bytes_per_entry()
    print(f"cache written to {path}: {sum(sizes.values()) / 1024:.0f} KiB per image per view "
          f"({', '.join(f'{n} {b / 1024:.0f}' for n, b in sizes.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
