"""The proxy world: deterministic procedural scenes small enough for a CPU.

Each image (``size`` px, 128 by default) shows one large *main* object and 0-2 small
distractors on a textured background. What there is to know, and who is meant to know it:

* image label = the main object's colour and shape (``"red star"``; 4 colours x 5 shapes = 20
  classes) and a caption generated from the scene description (colours, shapes, sizes,
  texture, background): the CLIP-like teacher learns these from image-caption pairs;
* a per-pixel semantic mask of shape categories (0 = background, 1-5 = shape): the dense
  semantics the DINOv2-like teacher learns;
* fine boundaries: every object is cut into parts by 1-px dark cracks; the boundary map marks
  the edges of every part. At the full size a crack is one pixel; at half size it is blended
  away, so only a high-resolution model can place them (the SAM-like teacher's speciality).

Scene ``i`` of a split is a pure function of (seed, split, i): the same seed gives the same
bytes on every run. A generated world is written once to a cache directory named by its
fingerprint (generator version + parameters) and memory-mapped from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

#: bump when the drawing code changes: old caches then stop matching.
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85),
           "yellow": (0.9, 0.82, 0.15)}
COLOUR_NAMES = tuple(COLOURS)
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS = ("noise", "stripes", "checks")
#: image classes: "<colour> <shape>", index = colour * len(SHAPES) + shape.
CLASSES = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
#: semantic classes of the masks.
SEGMENT_CLASSES = ("background",) + SHAPES
#: the template zero-shot uses; captions are written in the same register.
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("RADIO_PROXY_CACHE", "~/.cache/radio_distill/proxy")))


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    size: int = 128
    train: int = 4000
    val: int = 1000
    test: int = 1000
    #: anti-aliasing: shapes are drawn at ``supersample`` x the size and averaged down.
    supersample: int = 2

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"proxy world: split must be one of {', '.join(SPLITS)}, got {split!r}")
        return int(getattr(self, split))

    def fingerprint(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W) uint8, SEGMENT_CLASSES index
    boundary: np.ndarray  # (H, W) uint8 0/1: edges of every object part
    label: int  # CLASSES index of the main object
    caption: str
    objects: list = field(default_factory=list)


# --------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a shape of radius ``r`` centred at 0 in rotated coordinates (x, y)."""
    if shape == "circle":
        return x * x + y * y < r * r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) < 0.8 * r
    if shape == "triangle":
        inside = y < 0.5 * r
        for angle in (np.pi / 6, 5 * np.pi / 6):
            inside &= (np.cos(angle) * x - np.sin(angle) * y) < 0.5 * r
        return inside
    if shape == "star":
        phi = np.arctan2(y, x)
        return np.sqrt(x * x + y * y) < r * (0.62 + 0.38 * np.cos(5 * phi))
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax < 0.32 * r) & (ay < r)) | ((ay < 0.32 * r) & (ax < r))
    raise ValueError(shape)


def _background(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    base = rng.uniform(0.35, 0.7) + rng.uniform(-0.08, 0.08, size=3)  # low-saturation grey
    yy, xx = np.mgrid[0:n, 0:n] / n
    if kind == "noise":
        coarse = rng.normal(0, 1, size=(8, 8))
        pattern = np.kron(coarse, np.ones((n // 8, n // 8)))[:n, :n] * 0.05
    elif kind == "stripes":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 9)
        pattern = 0.08 * np.sign(np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy)))
    else:
        freq = rng.integers(3, 7)
        pattern = 0.08 * np.sign(np.sin(2 * np.pi * freq * xx) * np.sin(2 * np.pi * freq * yy))
    return np.clip(base[None, None, :] + pattern[..., None], 0, 1)


def _texture(rng: np.random.Generator, kind: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    if kind == "plain":
        return np.ones_like(xx)
    if kind == "striped":
        angle = rng.uniform(0, np.pi)
        return 1 - 0.25 * (np.sin(2 * np.pi * 0.12 * (np.cos(angle) * xx + np.sin(angle) * yy)) > 0)
    return 1 - 0.25 * ((np.sin(2 * np.pi * 0.14 * xx) * np.sin(2 * np.pi * 0.14 * yy)) > 0.5)


def _cracks(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float,
            width: float) -> tuple[np.ndarray, np.ndarray]:
    """1-2 straight cracks through the object: (crack mask, part id per pixel)."""
    crack = np.zeros(xx.shape, bool)
    part = np.zeros(xx.shape, np.int64)
    for k in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.35, 0.35) * r
        d = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy) - offset
        crack |= np.abs(d) < width / 2
        part += (d > 0).astype(np.int64) << k
    return crack, part


def render_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (cfg, split, index)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, GENERATOR_VERSION])
    n, ss = cfg.size, cfg.supersample
    big = n * ss
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) / ss  # pixel units of the final image
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    # The background needs no anti-aliasing: drawn at the final size, repeated to the big grid.
    canvas = np.repeat(np.repeat(_background(rng, bg_kind, n), ss, 0), ss, 1)
    instance = np.zeros((big, big), np.int64)  # part id + 1, 0 = background
    semantic = np.zeros((big, big), np.uint8)

    main_shape, main_colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    objects = []
    for _ in range(int(rng.integers(0, 3))):  # distractors first: the main object is drawn on top
        objects.append(dict(shape=int(rng.integers(len(SHAPES))), colour=int(rng.integers(len(COLOURS))),
                            radius=rng.uniform(0.09, 0.14) * n, main=False))
    objects.append(dict(shape=main_shape, colour=main_colour, radius=rng.uniform(0.2, 0.3) * n, main=True))
    next_id = 1
    for obj in objects:
        r = obj["radius"]
        margin = r * 1.05
        cx, cy = rng.uniform(margin, n - margin), rng.uniform(margin, n - margin)
        theta = rng.uniform(0, 2 * np.pi)
        # Only the object's bounding window is computed (shapes fit in a circle of radius r).
        y0, y1 = max(int((cy - margin) * ss), 0), min(int((cy + margin) * ss) + 2, big)
        x0, x1 = max(int((cx - margin) * ss), 0), min(int((cx + margin) * ss) + 2, big)
        wy, wx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        dx, dy = wx - cx, wy - cy
        rx, ry = np.cos(theta) * dx + np.sin(theta) * dy, -np.sin(theta) * dx + np.cos(theta) * dy
        inside = _shape_mask(SHAPES[obj["shape"]], rx, ry, r)
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        colour = np.clip(np.asarray(COLOURS[COLOUR_NAMES[obj["colour"]]]) + rng.uniform(-0.07, 0.07, 3), 0, 1)
        shade = _texture(rng, texture, rx, ry)
        crack, part = _cracks(rng, wx, wy, cx, cy, r, width=1.0)
        win_canvas, win_sem, win_inst = canvas[y0:y1, x0:x1], semantic[y0:y1, x0:x1], instance[y0:y1, x0:x1]
        win_canvas[inside] = colour[None, :] * shade[inside, None]
        win_canvas[inside & crack] = 0.08
        win_sem[inside] = obj["shape"] + 1
        win_inst[inside] = next_id + part[inside]
        win_inst[inside & crack] = 0
        next_id += 4
        obj.update(texture=texture, centre=(float(cx), float(cy)))

    image = canvas.reshape(n, ss, n, ss, 3).mean((1, 3))
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    image_u8 = np.round(image * 255).astype(np.uint8)
    # Labels at the final size: the sample at the centre of each supersampled cell.
    sem = semantic[ss // 2::ss, ss // 2::ss]
    inst = instance[ss // 2::ss, ss // 2::ss]
    edge = np.zeros_like(inst, bool)
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    edge[:, :-1] |= inst[:, 1:] != inst[:, :-1]
    edge[1:, :] |= inst[1:, :] != inst[:-1, :]
    edge[:-1, :] |= inst[1:, :] != inst[:-1, :]
    edge &= inst > 0  # the object side of every edge (cracks and outlines)
    caption = describe(objects, bg_kind, rng)
    return Scene(image_u8, sem.astype(np.uint8), edge.astype(np.uint8),
                 main_colour * len(SHAPES) + main_shape, caption, objects)


def describe(objects: list, background: str, rng: np.random.Generator) -> str:
    """A caption from the scene description, in one of several phrasings."""
    main = objects[-1]
    name = f"{COLOUR_NAMES[main['colour']]} {SHAPES[main['shape']]}"
    texture = "" if main["texture"] == "plain" else f"{main['texture']} "
    form = int(rng.integers(4))
    if form == 0:
        text = f"a photo of a {name}"
    elif form == 1:
        text = f"a photo of a large {texture}{name}"
    elif form == 2:
        text = f"a {name} on a {background} background"
    else:
        text = f"a photo of a {name} with {len(objects) - 1} small shape{'s' if len(objects) != 2 else ''}"
    others = objects[:-1]
    if others and rng.random() < 0.5:
        o = others[int(rng.integers(len(others)))]
        text += f" next to a small {COLOUR_NAMES[o['colour']]} {SHAPES[o['shape']]}"
    return text + "."


# --------------------------------------------------------------------------- the cached world


class ProxyWorld:
    """Memory-mapped arrays of a generated world: ``images(split)`` (N, H, W, 3) uint8,
    ``semantic(split)`` and ``boundary(split)`` (N, H, W) uint8, ``labels(split)`` (N,)
    int64, ``captions(split)`` list[str]."""

    def __init__(self, directory: Path, cfg: WorldConfig) -> None:
        self.directory, self.cfg = directory, cfg

    def _array(self, split: str, what: str) -> np.ndarray:
        self.cfg.split_size(split)
        return np.load(self.directory / f"{split}_{what}.npy", mmap_mode="r")

    def images(self, split: str) -> np.ndarray:
        return self._array(split, "images")

    def semantic(self, split: str) -> np.ndarray:
        return self._array(split, "semantic")

    def boundary(self, split: str) -> np.ndarray:
        return self._array(split, "boundary")

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self._array(split, "labels"))

    def captions(self, split: str) -> list[str]:
        self.cfg.split_size(split)
        return json.loads((self.directory / f"{split}_captions.json").read_text())

    @property
    def fingerprint(self) -> str:
        return self.cfg.fingerprint()


def world_dir(cfg: WorldConfig, root: Optional[Path] = None) -> Path:
    return Path(root or cache_root()) / f"world-{cfg.fingerprint()}"


def generate_world(cfg: WorldConfig = WorldConfig(), root: Optional[Path] = None) -> ProxyWorld:
    """The world of ``cfg``, generated into ``root`` on first use (written to a temporary
    sibling and renamed, so a killed generation leaves nothing half-written)."""
    directory = world_dir(cfg, root)
    if not (directory / "world.json").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            for split in SPLITS:
                _write_split(cfg, split, tmp)
            (tmp / "world.json").write_text(json.dumps({"version": GENERATOR_VERSION, **asdict(cfg),
                                                        "classes": CLASSES, "segment_classes": SEGMENT_CLASSES},
                                                       indent=1))
            try:
                os.rename(tmp, directory)
            except OSError:
                if not (directory / "world.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ProxyWorld(directory, cfg)


def _write_split(cfg: WorldConfig, split: str, out: Path) -> None:
    count, n = cfg.split_size(split), cfg.size
    images = np.lib.format.open_memmap(out / f"{split}_images.npy", "w+", np.uint8, (count, n, n, 3))
    semantic = np.lib.format.open_memmap(out / f"{split}_semantic.npy", "w+", np.uint8, (count, n, n))
    boundary = np.lib.format.open_memmap(out / f"{split}_boundary.npy", "w+", np.uint8, (count, n, n))
    labels, captions = np.zeros(count, np.int64), []
    for i in range(count):
        scene = render_scene(cfg, split, i)
        images[i], semantic[i], boundary[i], labels[i] = scene.image, scene.semantic, scene.boundary, scene.label
        captions.append(scene.caption)
    for arr in (images, semantic, boundary):
        arr.flush()
    del images, semantic, boundary
    np.save(out / f"{split}_labels.npy", labels)
    (out / f"{split}_captions.json").write_text(json.dumps(captions))


def world_from_args(world: Optional[dict] = None) -> ProxyWorld:
    """The world a recipe's ``world: {seed: .., train: ..}`` mapping names (generated if needed)."""
    try:
        cfg = WorldConfig(**(world or {}))
    except TypeError as exc:
        known = ", ".join(WorldConfig.__dataclass_fields__)
        raise ValueError(f"proxy world: unknown option in {world!r} (known: {known})") from exc
    return generate_world(cfg)


class ProxyWorldSource:
    """The images of one split as a ``dataset`` source (labels are not given to training)."""

    def __init__(self, split: str = "train", world: Optional[dict] = None) -> None:
        self.world = world_from_args(world)
        self.split = split
        self._images = self.world.images(split)

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int):
        from PIL import Image

        return Image.fromarray(np.asarray(self._images[index]))

    def key(self, index: int) -> str:
        return f"proxy-{self.world.fingerprint}/{self.split}/{index:06d}"


__all__ = ["WorldConfig", "ProxyWorld", "ProxyWorldSource", "generate_world", "render_scene", "world_from_args",
           "CLASSES", "SEGMENT_CLASSES", "SHAPES", "COLOUR_NAMES", "ZERO_SHOT_TEMPLATES", "cache_root"]
