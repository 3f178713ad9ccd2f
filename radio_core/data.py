"""Image sources, consistent augmentation and deterministic, resumable sampling.

Sampling is a pure function of (seed, global sample number): the sample number ``g`` picks an
epoch (``g // len``), a position in that epoch's seeded permutation, and the seed of the
image's augmentation. A run resumed at step ``k`` therefore sees exactly the images (and
crops) the uninterrupted run would have, whatever the number of loader workers.

Any source with random access gets this; tar shards (``radio_core.shards``) get it through a
per-member byte index, and opt in to block shuffling (shards permuted, then members within a
few shards at a time) which needs memory per shard, not per sample.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

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


# ---------------------------------------------------------------------------------------
# sampling


def _mix(*values: int) -> int:
    """A deterministic 63-bit hash of integers (SplitMix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class SampleRef:
    """One sample of the stream: which image, and the seed of its augmentation."""

    number: int  # global sample number
    index: int
    aug_seed: int
    #: with a fixed number of views per image (teacher-feature caches): which view, else -1.
    view: int = -1


def view_seed(seed: int, index: int, view: int) -> int:
    """Augmentation seed of fixed view ``view`` of image ``index``."""
    return _mix(seed, index, view, 0xCAC4E)


class SampleStream:
    """Maps global sample numbers to (image index, augmentation seed), epoch by epoch.

    Two shuffles, both seeded permutations of the whole dataset per epoch:

    * global (default): ``torch.randperm(len)`` per epoch, 8 bytes per sample in memory;
    * block (``shard_sizes`` given, from sources stored as shards): shards are permuted, taken
      ``block_shards`` at a time, and the members of each block permuted. Memory is O(shards),
      and consecutive sample numbers (a step's batch on every rank) read from one block, so
      reads stay within a few files.
    """

    def __init__(self, length: int, seed: int, views: Optional[int] = None,
                 shard_sizes: Optional[Sequence[int]] = None, block_shards: int = 1) -> None:
        if length <= 0:
            raise ValueError("dataset is empty")
        self.length, self.seed, self.views = length, seed, views
        self._perm_epoch, self._perm = -1, None
        self.shard_sizes = None
        if shard_sizes is not None:
            sizes = np.asarray(list(shard_sizes), dtype=np.int64)
            if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any() or int(sizes.sum()) != length:
                raise ValueError(f"shard_sizes must be positive and sum to the dataset length {length} "
                                 f"(got {sizes.size} shards summing to {int(sizes.sum())})")
            if block_shards < 1:
                raise ValueError(f"block_shards must be >= 1, got {block_shards}")
            self.shard_sizes, self.block_shards = sizes, int(block_shards)
            self._shard_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            self._blocks: dict[int, np.ndarray] = {}

    def __call__(self, number: int) -> SampleRef:
        epoch, pos = divmod(number, self.length)
        index = self._global_index(epoch, pos) if self.shard_sizes is None else self._block_index(epoch, pos)
        if self.views:
            # K fixed augmentations per image: the crop depends on (image, view) only, so a
            # teacher-feature cache computed for these seeds matches online teachers exactly.
            view = _mix(self.seed, number, 0x71E) % self.views
            return SampleRef(number, index, view_seed(self.seed, index, view), view)
        return SampleRef(number, index, _mix(self.seed, number, 0xA06))

    def _global_index(self, epoch: int, pos: int) -> int:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xDA7A))
            self._perm, self._perm_epoch = torch.randperm(self.length, generator=g), epoch
        return int(self._perm[pos])

    def _block_index(self, epoch: int, pos: int) -> int:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0xB10C))
            order = torch.randperm(len(self.shard_sizes), generator=g).numpy()
            block_ends = np.cumsum(np.add.reduceat(self.shard_sizes[order],
                                                   np.arange(0, len(order), self.block_shards)))
            self._perm, self._perm_epoch = (order, block_ends), epoch
            self._blocks.clear()
        order, block_ends = self._perm
        block = int(np.searchsorted(block_ends, pos, side="right"))
        local = pos - (int(block_ends[block - 1]) if block else 0)
        members = self._blocks.get(block)
        if members is None:
            shards = order[block * self.block_shards:(block + 1) * self.block_shards]
            members = np.concatenate([np.arange(self._shard_starts[s], self._shard_starts[s] + self.shard_sizes[s])
                                      for s in shards])
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, block, 0xB10C))
            members = members[torch.randperm(len(members), generator=g).numpy()]
            if len(self._blocks) >= 4:  # a batch spans at most a couple of blocks
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[block] = members
        return int(members[local])


def sampling_kwargs(source: ImageSource) -> dict:
    """What the sampler needs from a source beyond its length: a source stored as shards opts
    in to block shuffling by exposing ``shard_sizes`` (and optionally ``block_shards``)."""
    sizes = getattr(source, "shard_sizes", None)
    if sizes is None:
        return {}
    return {"shard_sizes": list(sizes), "block_shards": int(getattr(source, "block_shards", 1))}


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for each micro-step from ``start`` to ``stop``, this rank's list of SampleRefs.

    Sample numbers of micro-step ``s`` are ``base + s * stride + offset + j`` for j < batch_size.
    By default ``stride = world_size * batch_size`` and ``offset = rank * batch_size``; the trainer
    passes explicit values when ranks draw different batch sizes (teacher groups) and ``base``
    to continue the numbering across training stages. ``shard_sizes``/``block_shards`` select
    block shuffling (see ``SampleStream``; ``sampling_kwargs(source)`` gives them).
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, stop: Optional[int] = None, offset: Optional[int] = None,
                 stride: Optional[int] = None, base: int = 0, views: Optional[int] = None,
                 shard_sizes: Optional[Sequence[int]] = None, block_shards: int = 1) -> None:
        self.stream = SampleStream(length, seed, views, shard_sizes, block_shards)
        self.batch_size = batch_size
        self.offset = rank * batch_size if offset is None else offset
        self.stride = world_size * batch_size if stride is None else stride
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) if self.stop is not None else 2**62

    def refs(self, step: int) -> list[SampleRef]:
        first = self.base + step * self.stride + self.offset
        return [self.stream(first + j) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[list[SampleRef]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.refs(step)
            step += 1


# ---------------------------------------------------------------------------------------
# augmentation: one random resized crop + flip per image, shared by every model's input


def crop_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameter search, driven by an explicit generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=g))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    # fallback: central crop at the clamped aspect ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class AugmentedImages(torch.utils.data.Dataset):
    """Decodes an image and applies its seeded crop + flip, giving a uint8 (3, H, W) tensor.

    Indexed by ``SampleRef`` (through ``StepBatchSampler``), so the augmentation of every sample
    is fixed by its seed and identical for the student and every teacher.
    """

    def __init__(self, source: ImageSource, crop_size: tuple[int, int], scale=(0.25, 1.0),
                 ratio=(3 / 4, 4 / 3), hflip: float = 0.5, cache=None) -> None:
        self.source, self.crop_size = source, crop_size
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        #: optional ``radio_core.cache.FeatureCache``: cached teacher targets are read here, in
        #: the loader workers, for samples with a fixed view.
        self.cache = cache

    def __len__(self) -> int:
        return len(self.source)

    def augment(self, img: Image.Image, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = crop_params(img.width, img.height, self.scale, self.ratio, g)
        flip = float(torch.rand(1, generator=g)) < self.hflip
        out_h, out_w = self.crop_size
        img = img.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __getitem__(self, ref: SampleRef) -> dict:
        item = {"index": ref.index, "number": ref.number, "view": ref.view}
        if self.cache is not None:
            item["targets"] = self.cache.read(ref.index, ref.view)
        try:
            img = self.source.load(ref.index)
        except (OSError, ValueError, SyntaxError) as exc:
            # A broken file must not kill a long run: use a black image and flag it.
            return {**item, "image": torch.zeros(3, *self.crop_size, dtype=torch.uint8), "valid": False,
                    "error": f"{type(exc).__name__}: {exc}"}
        return {**item, "image": self.augment(img, ref.aug_seed), "valid": True, "error": ""}


def loader_worker_init(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """DataLoader ``worker_init_fn``: loader workers ignore SIGTERM and SIGINT.

    Launchers signal whole process groups (torchrun signals each worker's session, a shell's
    Ctrl-C reaches the foreground group). A decoding worker that dies on that signal makes the
    training process fail before it can checkpoint; the training process owns stopping and
    shuts its workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "number": torch.tensor([it["number"] for it in items]),
        "view": torch.tensor([it["view"] for it in items]),
        "valid": torch.tensor([it["valid"] for it in items]),
        "errors": [it["error"] for it in items if it["error"]],
        **({"targets": {name: tuple(None if parts[0] is None else torch.stack(parts)
                                    for parts in zip(*(it["targets"][name] for it in items)))
                        for name in items[0]["targets"]}} if "targets" in items[0] else {}),
    }


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


# ---------------------------------------------------------------------------------------
# command line: from an image folder to the scalable shard path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m radio_core.data pack FOLDER OUT [--shard-size 1000] | index SHARDS"""
    import argparse
    import sys

    from . import shards

    p = argparse.ArgumentParser(prog="python -m radio_core.data", description="Data tools.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="pack an image folder into webdataset tar shards plus manifest.json")
    pk.add_argument("folder")
    pk.add_argument("out", help="output folder (must not hold shards yet)")
    pk.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    pk.add_argument("--shard-bytes", type=float, default=3e9, help="start a new shard past this many bytes")
    pk.add_argument("--shuffle-seed", type=int, default=0, help="seed of the file order shuffle (default 0)")
    pk.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    ix = sub.add_parser("index", help="write manifest.json for existing shards (made by other tools)")
    ix.add_argument("shards", help="directory or brace pattern, e.g. '/data/{000000..000099}.tar'")
    args = p.parse_args(argv)
    try:
        if args.command == "pack":
            m = shards.pack_folder(args.folder, args.out, args.shard_size, args.shard_bytes,
                                   None if args.no_shuffle else args.shuffle_seed)
            where = Path(args.out) / shards.MANIFEST
            rate = m["count"] / max(m["seconds"], 1e-9)
            print(f"packed {m['count']} images from {m['source']} into {len(m['shards'])} shard(s), "
                  f"{m['bytes'] / 1e6:.1f} MB ({m['image_bytes'] / 1e6:.1f} MB of images) in {m['seconds']:.1f} s "
                  f"({rate:.0f} images/s); manifest: {where}")
            if m["unreadable"]:
                print(f"skipped {len(m['unreadable'])} unreadable file(s), e.g. {m['unreadable'][0]}")
            print(f"use it with: data.source.name=webdataset data.source.args.shards={Path(args.out).resolve()}")
        else:
            m = shards.index_shards(args.shards)
            print(f"indexed {m['count']} images in {len(m['shards'])} shard(s), {m['bytes'] / 1e6:.1f} MB")
    except (OSError, ValueError) as exc:  # missing folder, existing shards, unreadable tar
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
