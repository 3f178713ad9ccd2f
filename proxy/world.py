"""The proxy world: deterministic procedural scenes small enough for a CPU, built so that each
teacher has something to learn that raw pixels do not give away.

Each image (``size`` px, 128 by default) shows one large *main* object and 0-2 small
distractors on a textured background. What there is to know, and who is meant to know it:

* image label = the main object's colour and shape (``"red star"``; 4 colours x 5 shapes = 20
  classes) and a caption generated from the scene description (colours, shapes, sizes,
  background, neighbours): the CLIP-like teacher learns these from image-caption pairs. Colour
  is a pixel statistic; shape is not (objects are rotated, scaled and placed anywhere), so
  zero-shot is reported split into colour and shape;
* a per-pixel semantic mask (``SEGMENT_CLASSES``): *sky* and *ground* for the background above
  and below the horizon, which is the middle of the frame and drawn nowhere (both halves come
  from one background generator, so only a model that knows where a pixel is in the frame can
  tell them apart: position embeddings matter), and the shape category of every object pixel
  (a patch inside an object looks the same whatever the shape: context is needed). The dense
  semantics the DINOv2-like teacher learns;
* fine structure: every object is cut into 2-4 *parts* by straight lines, and each part is
  filled with one of three 1-px textures (horizontal stripes, vertical stripes, checks; random
  phase) around the object's colour, neighbouring parts with different textures. The parts map
  gives each object pixel its part's texture (``PART_CLASSES``). A texture's sign is random, so
  a linear read-out of the pixels cannot tell the textures apart (it takes the energy of a
  high-frequency pattern, a non-linear feature), and at half resolution every 1-px texture
  averages to the same flat colour: only a high-resolution model sees the parts (the SAM-like
  teacher's speciality).

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
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85),
           "yellow": (0.9, 0.82, 0.15)}
COLOUR_NAMES = tuple(COLOURS)
#: the 1-px part textures (each part differs from its neighbours).
PART_TEXTURES = ("horizontal", "vertical", "checks")
#: classes of the parts map: background (no object), then the texture of the object's part.
PART_CLASSES = ("background",) + PART_TEXTURES
BACKGROUNDS = ("noise", "stripes", "checks")
#: image classes: "<colour> <shape>", index = colour * len(SHAPES) + shape.
CLASSES = tuple(f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES)
#: semantic classes of the masks: background above / below the horizon, then the shapes.
SEGMENT_CLASSES = ("sky", "ground") + SHAPES
#: first semantic id of the shapes (``semantic == SHAPE_OFFSET + SHAPES.index(shape)``).
SHAPE_OFFSET = 2
#: the template zero-shot uses; captions are written in the same register.
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)
#: relative amplitude of the part textures (+-, around the part's colour).
TEXTURE_AMPLITUDE = 0.3


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("RADIO_PROXY_CACHE", "~/.cache/radio_distill/proxy")))


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    size: int = 128
    train: int = 4000
    val: int = 2000
    test: int = 2000
    #: anti-aliasing of outlines and part lines: drawn at ``supersample`` x the size, averaged down.
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
    parts: np.ndarray  # (H, W) uint8 PART_CLASSES index: the texture of the part under each pixel
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
    """A low-saturation textured background; its statistics do not depend on position."""
    base = rng.uniform(0.35, 0.7) + rng.uniform(-0.08, 0.08, size=3)
    yy, xx = np.mgrid[0:n, 0:n] / n
    if kind == "noise":
        coarse = rng.normal(0, 1, size=(8, 8))
        pattern = np.kron(coarse, np.ones((n // 8, n // 8)))[:n, :n] * 0.05
    elif kind == "stripes":
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(4, 9), rng.uniform(0, 1)
        pattern = 0.08 * np.sign(np.sin(2 * np.pi * (freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)))
    else:
        freq = rng.integers(3, 7)
        ox, oy = rng.uniform(0, 1, 2)
        pattern = 0.08 * np.sign(np.sin(2 * np.pi * freq * (xx + ox)) * np.sin(2 * np.pi * freq * (yy + oy)))
    return np.clip(base[None, None, :] + pattern[..., None], 0, 1)


def _part_pattern(kind: int, phase: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """+-1 at integer pixel coordinates: a 1-px texture whose mean over any 2x2 block is 0."""
    if kind == 0:
        return 1 - 2 * ((py + phase) % 2)
    if kind == 1:
        return 1 - 2 * ((px + phase) % 2)
    return 1 - 2 * ((px + py + phase) % 2)


def _cut_into_parts(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float,
                    r: float) -> np.ndarray:
    """Part id (0..3) per point: 1-2 straight lines through the object."""
    part = np.zeros(xx.shape, np.int64)
    for k in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.35, 0.35) * r
        d = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy) - offset
        part += (d > 0).astype(np.int64) << k
    return part


def _part_textures(rng: np.random.Generator) -> list[tuple[int, int]]:
    """(texture, phase) of parts 0-3. Parts are the cells of at most two lines (part id bit k = the
    side of line k), so part p borders p^1 and p^2: every neighbour gets another texture."""
    def other_than(*taken: int) -> int:
        free = [k for k in range(len(PART_TEXTURES)) if k not in taken]
        return free[int(rng.integers(len(free)))]

    kinds = [int(rng.integers(len(PART_TEXTURES)))]
    kinds.append(other_than(kinds[0]))
    kinds.append(other_than(kinds[0]))
    kinds.append(other_than(kinds[1], kinds[2]))
    return [(k, int(rng.integers(2))) for k in kinds]


def render_scene(cfg: WorldConfig, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (cfg, split, index)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, GENERATOR_VERSION])
    n, ss = cfg.size, cfg.supersample
    big = n * ss
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float64) / ss  # pixel units of the final image
    py, px = yy.astype(np.int64), xx.astype(np.int64)  # the final pixel each sample falls in
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    # The background needs no anti-aliasing: drawn at the final size, repeated to the big grid.
    canvas = np.repeat(np.repeat(_background(rng, bg_kind, n), ss, 0), ss, 1)
    texture = np.zeros((big, big), np.uint8)  # PART_CLASSES index
    semantic = np.where(yy < n / 2, 0, 1).astype(np.uint8)  # sky above the horizon, ground below

    main_shape, main_colour = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOURS)))
    objects = []
    for _ in range(int(rng.integers(0, 3))):  # distractors first: the main object is drawn on top
        objects.append(dict(shape=int(rng.integers(len(SHAPES))), colour=int(rng.integers(len(COLOURS))),
                            radius=rng.uniform(0.09, 0.14) * n, main=False))
    objects.append(dict(shape=main_shape, colour=main_colour, radius=rng.uniform(0.2, 0.3) * n, main=True))
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
        colour = np.clip(np.asarray(COLOURS[COLOUR_NAMES[obj["colour"]]]) + rng.uniform(-0.07, 0.07, 3), 0.1, 0.9)
        part = _cut_into_parts(rng, wx, wy, cx, cy, r)
        textures = _part_textures(rng)
        shade = np.ones(part.shape)
        for p, (kind, phase) in enumerate(textures):
            sel = part == p
            shade[sel] = 1 + TEXTURE_AMPLITUDE * _part_pattern(kind, phase, px[y0:y1, x0:x1][sel],
                                                                 py[y0:y1, x0:x1][sel])
        kinds = np.array([k for k, _ in textures], np.uint8)
        win_canvas, win_sem, win_tex = canvas[y0:y1, x0:x1], semantic[y0:y1, x0:x1], texture[y0:y1, x0:x1]
        win_canvas[inside] = np.clip(colour[None, :] * shade[inside, None], 0, 1)
        win_sem[inside] = obj["shape"] + SHAPE_OFFSET
        win_tex[inside] = 1 + kinds[part[inside]]
        obj.update(centre=(float(cx), float(cy)), parts=int(part[inside].max()) + 1 if inside.any() else 1)

    image = canvas.reshape(n, ss, n, ss, 3).mean((1, 3))
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    image_u8 = np.round(image * 255).astype(np.uint8)
    # Labels at the final size: the sample at the centre of each supersampled cell.
    sem = semantic[ss // 2::ss, ss // 2::ss]
    tex = texture[ss // 2::ss, ss // 2::ss]
    return Scene(image_u8, sem.astype(np.uint8), tex.astype(np.uint8), main_colour * len(SHAPES) + main_shape,
                 describe(objects, bg_kind, rng), objects)


def describe(objects: list, background: str, rng: np.random.Generator) -> str:
    """A caption from the scene description, in one of several phrasings."""
    main = objects[-1]
    name = f"{COLOUR_NAMES[main['colour']]} {SHAPES[main['shape']]}"
    form = int(rng.integers(4))
    if form == 0:
        text = f"a photo of a {name}"
    elif form == 1:
        text = f"a photo of a large {name}"
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
    ``semantic(split)`` and ``parts(split)`` (N, H, W) uint8, ``labels(split)`` (N,)
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

    def parts(self, split: str) -> np.ndarray:
        return self._array(split, "parts")

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
                                                        "classes": CLASSES, "segment_classes": SEGMENT_CLASSES,
                                                        "part_classes": PART_CLASSES},
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
    parts = np.lib.format.open_memmap(out / f"{split}_parts.npy", "w+", np.uint8, (count, n, n))
    labels, captions = np.zeros(count, np.int64), []
    for i in range(count):
        scene = render_scene(cfg, split, i)
        images[i], semantic[i], parts[i], labels[i] = scene.image, scene.semantic, scene.parts, scene.label
        captions.append(scene.caption)
    for arr in (images, semantic, parts):
        arr.flush()
    del images, semantic, parts
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
           "CLASSES", "SEGMENT_CLASSES", "SHAPE_OFFSET", "SHAPES", "COLOUR_NAMES", "ZERO_SHOT_TEMPLATES", "cache_root",
           "PART_CLASSES"]
