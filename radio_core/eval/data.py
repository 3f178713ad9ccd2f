"""A user's own labelled data for evaluation (``radio eval RUN TASK --data PATH``), as an
``EvalData`` (train and test splits, class labels, segmentation masks where given).

PATH may be:

* an image-folder tree: one sub-folder per class (ImageNet layout), or ``train/`` and
  ``val/`` (or ``test/``, ``validation/``) each holding one sub-folder per class;
* a segmentation folder in ADE20K's layout: ``images/{training,validation}/*`` with
  ``annotations/{training,validation}/<stem>.png`` masks (pixel value = class id, 255 = ignore);
* webdataset shards (a directory of ``*.tar``, its ``manifest.json``, a tar, or a brace
  pattern): ``radio pack`` output of a class-folder tree (the class is the key's folder) or
  plain webdataset tars whose samples hold an image (``jpg``, ``png``, ...), a class id
  (``cls``, or ``json`` with ``label``) and optionally a mask (``seg.png`` / ``mask.png``);
  class names from ``classes.txt`` beside the shards when present;
* a Hugging Face dataset folder (``datasets.save_to_disk``; a ``DatasetDict`` with ``train`` and
  ``test``/``validation`` splits, or one ``Dataset``): the first ``Image`` column is the image, a
  ``ClassLabel`` column the label (its names the class names), an ``Image`` column named like
  ``mask``/``annotation``/``segmentation`` the mask.

Without a split in the data, a seeded share (``test_fraction``) of it is the test split. Images
are decoded when used; the fingerprint (files, sizes, times, split settings) keys the feature
cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.sources import IMAGE_EXTENSIONS, to_rgb
from ..protocols import EvalData, Split

TEST_SPLITS = ("val", "validation", "test")
MASK_NAMES = ("mask", "masks", "annotation", "annotations", "segmentation", "seg", "semantic", "label_mask")
IGNORE = 255


class Lazy(Sequence):
    """A sequence whose items are made on access by ``load(item)`` (images stay on disk)."""

    def __init__(self, items: Sequence[Any], load: Callable[[Any], Any]) -> None:
        self.items, self.load = list(items), load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return Lazy(self.items[i], self.load)
        item = self.items[i]
        try:
            return self.load(item)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for a bad file
            what = item if isinstance(item, (str, Path)) else f"item {i}"
            raise ValueError(f"--data: {what}: cannot be read ({type(exc).__name__}: {exc})") from None

    def subset(self, idx: Sequence[int]) -> "Lazy":
        return Lazy([self.items[i] for i in idx], self.load)


def _open_image(source: Any) -> Image.Image:
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        im.load()
        return to_rgb(im)


def _mask_loader(reduce_zero_label: bool) -> Callable[[Any], np.ndarray]:
    def load(source: Any) -> np.ndarray:
        if isinstance(source, np.ndarray):
            m = source.astype(np.int64)
        else:
            if isinstance(source, bytes):
                source = io.BytesIO(source)
            with Image.open(source) as im:
                m = np.asarray(im if im.mode in ("L", "P", "I", "I;16") else im.convert("L"), dtype=np.int64).copy()
        if reduce_zero_label:  # ADE20K: 0 = "other" -> ignore, 1..N -> 0..N-1
            m = np.where((m == 0) | (m == IGNORE), IGNORE, m - 1)
        return m
    return load


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_identity(paths: Sequence[Path]) -> list:
    return [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in paths]


def _capped(idx: list[int], labels: Optional[list[int]], max_per_class: Optional[int]) -> list[int]:
    """The first ``max_per_class`` of each class in ``idx``'s order (all without a cap)."""
    if max_per_class is None:
        return idx
    if labels is None:
        return idx[:max_per_class]
    seen: dict[int, int] = {}
    kept = []
    for i in idx:
        if seen.get(labels[i], 0) < max_per_class:
            seen[labels[i]] = seen.get(labels[i], 0) + 1
            kept.append(i)
    return kept


def _split_indices(labels: Optional[list[int]], n: int, test_fraction: float, seed: int,
                   max_per_class: Optional[int]) -> tuple[list[int], list[int]]:
    """Seeded train/test indices; ``max_per_class`` caps each class before splitting."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    idx = _capped(idx, labels, max_per_class)
    n_test = min(len(idx) - 1, max(1, int(round(len(idx) * test_fraction))))
    return sorted(idx[n_test:]), sorted(idx[:n_test])


class _Table:
    """Images, labels and masks of one collection before it is split."""

    def __init__(self, images: Lazy, labels: Optional[list[int]], masks: Optional[Lazy]) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def split(self, idx: Sequence[int]) -> Split:
        return Split(self.images.subset(idx),
                     None if self.labels is None else torch.tensor([self.labels[i] for i in idx], dtype=torch.long),
                     None if self.masks is None else self.masks.subset(idx))


# --------------------------------------------------------------------------- readers


def _class_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            files.append(f)
            labels.append(label)
    return files, labels, classes


def _read_folder(root: Path, mask_loader) -> tuple[dict[str, _Table], list[str], list]:
    test = next((root / s for s in TEST_SPLITS if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        tables, names, ident = {}, None, []
        for split, d in (("train", root / "train"), ("test", test)):
            files, labels, classes = _class_folder(d)
            if names is not None and classes != names:
                raise ValueError(f"{root}: train/ and {test.name}/ hold different class folders "
                                 f"({len(names)} vs {len(classes)} classes)")
            names = classes
            tables[split] = _Table(Lazy(files, _open_image), labels, None)
            ident += _file_identity(files)
        return tables, names or [], ident
    files, labels, classes = _class_folder(root)
    if not files:
        raise FileNotFoundError(f"{root}: no images in class sub-folders (expected ROOT/<class>/*.jpg, "
                                f"ROOT/{{train,val}}/<class>/*, ADE20K's images/ + annotations/, webdataset "
                                f"shards or a datasets.save_to_disk folder)")
    return {"all": _Table(Lazy(files, _open_image), labels, None)}, classes, _file_identity(files)


def _read_ade(root: Path, mask_loader) -> tuple[dict[str, _Table], list[str], list]:
    tables, ident = {}, []
    for split, names in (("train", ("training", "train")), ("test", ("validation", "val", "test"))):
        name = next((n for n in names if (root / "images" / n).is_dir()), None)
        if name is None:
            raise FileNotFoundError(f"{root}: expected images/{names[0]}/ and images/{names[1]}/ (ADE20K layout)")
        imgs = sorted(p for p in (root / "images" / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        masks = []
        for img in imgs:
            m = root / "annotations" / name / (img.stem + ".png")
            if not m.is_file():
                raise FileNotFoundError(f"{img}: no mask {m}")
            masks.append(m)
        tables[split] = _Table(Lazy(imgs, _open_image), None, Lazy(masks, mask_loader))
        ident += _file_identity(imgs) + _file_identity(masks)
    return tables, [], ident


def _read_webdataset(spec: str, mask_loader) -> tuple[dict[str, _Table], list[str], list]:
    import webdataset as wds

    from ..data.shards import expand_shards

    paths = expand_shards(spec)
    images, labels, masks, folder_names = [], [], [], []
    names_from_json: dict[int, str] = {}
    for sample in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        exts = {k.lower(): v for k, v in sample.items() if not k.startswith("__")}
        mask = next((exts[k] for k in exts if k.split(".")[0] in MASK_NAMES), None)
        image = next((v for k, v in exts.items() if k.split(".")[0] not in MASK_NAMES
                      and "." + k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        if image is None:
            continue
        label = None
        if "cls" in exts:
            label = int(exts["cls"].decode().strip())
        elif "json" in exts:
            meta = json.loads(exts["json"])
            label = meta.get("label", meta.get("cls"))
            name = meta.get("classname") or meta.get("class")
            if label is not None and isinstance(name, str):
                names_from_json[int(label)] = name
        key = sample["__key__"]
        folder_names.append(key.split("/")[0] if "/" in key else None)
        images.append(image)
        labels.append(label)
        masks.append(mask)
    if not images:
        raise FileNotFoundError(f"{spec}: no images in the shards")
    classes: list[str] = []
    if all(lab is not None for lab in labels):
        n = max(labels) + 1
        listed = Path(paths[0]).parent / "classes.txt"
        if listed.is_file():
            classes = [ln.strip() for ln in listed.read_text().splitlines() if ln.strip()]
        else:
            classes = [names_from_json.get(i, str(i)) for i in range(n)]
        if len(classes) < n:
            raise ValueError(f"{listed}: {len(classes)} class names for class ids up to {n - 1}")
    elif all(f is not None for f in folder_names):  # radio pack of a class-folder tree: key = class/stem
        classes = sorted(set(folder_names))
        labels = [classes.index(f) for f in folder_names]
    else:
        labels = None
    has_masks = all(m is not None for m in masks)
    table = _Table(Lazy(images, _open_image), labels, Lazy(masks, mask_loader) if has_masks else None)
    return {"all": table}, classes, _file_identity(paths)


def _read_hf(root: Path, mask_loader) -> tuple[dict[str, _Table], list[str], list]:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{root} is a Hugging Face dataset folder: pip install 'radio-distill[data]'") from None
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        test = next((s for s in ("test", "validation", "val") if s in ds), None)
        parts = {"train": ds["train"], "test": ds[test]} if "train" in ds and test else \
            {"all": ds[next(iter(ds))]}
    else:
        parts = {"all": ds}
    first = next(iter(parts.values()))
    feats = first.features
    image_cols = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
    mask_col = next((c for c in image_cols if c.lower() in MASK_NAMES), None)
    image_col = next((c for c in image_cols if c != mask_col), None)
    if image_col is None:
        raise ValueError(f"{root}: no Image column (columns: {', '.join(feats)})")
    label_col = next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    classes = list(feats[label_col].names) if label_col else []
    if label_col is None and "label" in feats:
        label_col = "label"
    tables = {}
    for split, part in parts.items():
        rows = part.cast_column(image_col, datasets.Image(decode=False))
        if mask_col:
            rows = rows.cast_column(mask_col, datasets.Image(decode=False))

        def image_bytes(i, rows=rows):
            cell = rows[i][image_col]
            return cell["bytes"] if cell.get("bytes") else open(cell["path"], "rb").read()

        def mask_bytes(i, rows=rows):
            cell = rows[i][mask_col]
            return cell["bytes"] if cell.get("bytes") else open(cell["path"], "rb").read()

        labels = [int(v) for v in part[label_col]] if label_col else None
        if labels and not classes:
            classes = [str(i) for i in range(max(labels) + 1)]
        tables[split] = _Table(Lazy(range(len(part)), lambda i, f=image_bytes: _open_image(f(i))), labels,
                               Lazy(range(len(part)), lambda i, f=mask_bytes: mask_loader(f(i))) if mask_col else None)
    ident = [(split, getattr(p, "_fingerprint", None), len(p)) for split, p in parts.items()]
    return tables, classes, ident


def kind_of(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "hf"
        if (p / "images").is_dir() and (p / "annotations").is_dir():
            return "ade"
        if any(p.glob("*.tar")) or (p / "manifest.json").is_file():
            return "webdataset"
        return "folder"
    if p.suffix == ".tar" or p.name == "manifest.json" or "{" in str(path) or "::" in str(path):
        return "webdataset"
    raise FileNotFoundError(f"--data {path}: no such folder")


def open_data(path: str, test_fraction: float = 0.3, seed: int = 0, max_per_class: Optional[int] = None,
              max_images: Optional[int] = None, reduce_zero_label: bool = False,
              mask_classes: Optional[int] = None) -> EvalData:
    """Read ``path`` (see the module docstring) into train/test splits.

    ``max_per_class`` / ``max_images``: caps per class and per split (the smoke tier);
    ``reduce_zero_label``: masks follow ADE20K (0 = ignore, 1..N -> 0..N-1); ``mask_classes``:
    number of segmentation classes (default: the largest id in the train masks + 1)."""
    kind = kind_of(path)
    mask_loader = _mask_loader(reduce_zero_label)
    reader = {"folder": _read_folder, "ade": _read_ade, "webdataset": _read_webdataset, "hf": _read_hf}[kind]
    tables, classes, ident = reader(Path(path).expanduser() if kind != "webdataset" else path, mask_loader)
    if "all" in tables:
        t = tables["all"]
        train_idx, test_idx = _split_indices(t.labels, len(t.images), test_fraction, seed, max_per_class)
        train, test = t.split(train_idx[:max_images]), t.split(test_idx[:max_images])
    else:
        splits = []
        for name in ("train", "test"):
            t = tables[name]
            idx = _capped(list(range(len(t.images))), t.labels, max_per_class)
            splits.append(t.split(idx[:max_images]))
        train, test = splits
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"--data {path}: the {'train' if len(train) == 0 else 'test'} split is empty")
    n_mask = mask_classes
    if train.masks is not None and n_mask is None:
        n_mask = int(max(int(m[m != IGNORE].max(initial=0)) for m in train.masks)) + 1
    fp = _fingerprint(kind, ident, test_fraction, seed, max_per_class, max_images, reduce_zero_label)
    return EvalData(train, test, classes, fp, f"{kind}:{path}", mask_classes=n_mask, ignore_index=IGNORE)


__all__ = ["open_data", "kind_of", "Lazy"]
