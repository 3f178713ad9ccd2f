"""Image sources: random access to RGB images with stable ids (folders, bundled photos, synthetic).

Any source with random access gets deterministic, resumable sampling (``radio_core.data.sampling``);
tar shards (``radio_core.data.shards``) get it through a per-member byte index.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageSource(Protocol):
    """What a ``dataset`` plugin returns: random access to RGB images with stable ids."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...

    def key(self, index: int) -> str: ...


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (palette, CMYK, 16-bit, grey, alpha) -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 0 else 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class ImageFolderSource:
    """Every image PIL can read under ``root`` (recursively), sorted by relative path."""

    def __init__(self, root: str, extensions: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.source.args.root: image folder not found: {self.root}")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions} if extensions else IMAGE_EXTENSIONS
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not self.files:
            raise FileNotFoundError(f"data.source.args.root: no images ({', '.join(sorted(exts))}) under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as img:
            img.load()
            return to_rgb(img)

    def key(self, index: int) -> str:
        return str(self.files[index].relative_to(self.root))


# The colour photographs scikit-image ships (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle", "camera", "moon", "grass", "gravel", "brick")


class SkimageSamplesSource:
    """The real photographs packaged with scikit-image, plus scikit-learn's two samples when
    scikit-learn is installed. Needs no network."""

    def __init__(self, names: Optional[Sequence[str]] = None, include_sklearn: bool = True,
                 exclude: Sequence[str] = ()) -> None:
        import skimage.data

        self._images: list[tuple[str, np.ndarray]] = []
        for name in exclude:
            if name not in SKIMAGE_PHOTOS:
                raise ValueError(f"data.source.args.exclude: {name!r} is not one of {', '.join(SKIMAGE_PHOTOS)}")
        for name in [n for n in (names or SKIMAGE_PHOTOS) if n not in exclude]:
            fn = getattr(skimage.data, name, None)
            if fn is None or name not in SKIMAGE_PHOTOS:
                raise ValueError(f"data.source.args.names: {name!r} is not one of the photographs "
                                 f"{', '.join(SKIMAGE_PHOTOS)}")
            try:
                arr = fn()
            except Exception:  # noqa: BLE001 - a few samples need an optional download (pooch)
                continue
            if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
                self._images += [(f"skimage/{name}_left", arr[0]), (f"skimage/{name}_right", arr[1])]
            else:
                self._images.append((f"skimage/{name}", arr))
        if include_sklearn and names is None:
            try:
                from sklearn.datasets import load_sample_images

                samples = load_sample_images()
                for fname, arr in zip(samples.filenames, samples.images):
                    self._images.append((f"sklearn/{Path(fname).name}", arr))
            except ImportError:
                pass
        if not self._images:
            raise RuntimeError("no scikit-image sample photos could be loaded")

    def __len__(self) -> int:
        return len(self._images)

    def load(self, index: int) -> Image.Image:
        arr = self._images[index][1]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) - arr.min()) / max(np.ptp(arr), 1e-12)).astype(np.uint8)
        return to_rgb(Image.fromarray(arr[..., :4] if arr.shape[-1] >= 3 else arr))

    def key(self, index: int) -> str:
        return self._images[index][0]


class SyntheticSource:
    """Seeded random smooth images (for benchmarks and shape tests, not for learning)."""

    def __init__(self, size: int = 1000, height: int = 256, width: int = 256, seed: int = 0) -> None:
        self.size, self.height, self.width, self.seed = size, height, width, seed

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> Image.Image:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        low = torch.rand(3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(self.height, self.width), mode="bicubic",
                                              align_corners=False)[0]
        img = (img.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(img)

    def key(self, index: int) -> str:
        return f"synthetic/{index:08d}"



def build_image_folder(root: str, extensions: Optional[list[str]] = None) -> ImageFolderSource:
    """Every PIL-readable image under a folder (recursive)."""
    return ImageFolderSource(root, extensions)


def build_skimage_samples(names: Optional[list[str]] = None, include_sklearn: bool = True,
                          exclude: Sequence[str] = ()) -> SkimageSamplesSource:
    """Real photos shipped inside scikit-image / scikit-learn (offline)."""
    return SkimageSamplesSource(names, include_sklearn, exclude)


def build_synthetic(size: int = 1000, height: int = 256, width: int = 256, seed: int = 0) -> SyntheticSource:
    """Seeded random smooth images (benchmarks, shape tests)."""
    return SyntheticSource(size, height, width, seed)


ImageFile.LOAD_TRUNCATED_IMAGES = bool(int(os.environ.get("RADIO_LOAD_TRUNCATED_IMAGES", "0")))
