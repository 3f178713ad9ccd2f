"""Augmentation: one seeded random resized crop + flip per image, shared by every model's input."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .sampling import SampleRef
from .sources import ImageSource, to_rgb


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
        #: optional ``radio_core.data.cache.FeatureCache``: cached teacher targets are read here, in
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
            image = self.augment(to_rgb(self.source.load(ref.index)), ref.aug_seed)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder refuses, in any source
            # A broken file must not kill a long run: a black image, flagged invalid and counted
            # (the trainer stops if too many are: data.max_bad_fraction).
            return {**item, "image": torch.zeros(3, *self.crop_size, dtype=torch.uint8), "valid": False,
                    "error": self._describe(ref.index, exc)}
        return {**item, "image": image, "valid": True, "error": ""}

    def _describe(self, index: int, exc: Exception) -> str:
        """``KEY: Type: message`` in one bounded line."""
        try:
            key = self.source.key(index)
        except Exception:  # noqa: BLE001 - a source that cannot even name the sample
            key = f"sample {index}"
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return text if key in text else f"{key}: {text}"


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
