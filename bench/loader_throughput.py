"""Loader throughput: decode + augment images/s from tar shards vs. an image folder (same
images), at several worker counts, against how fast a distill step consumes images.

    python bench/loader_throughput.py            # ~480 images, batches of 16
    python bench/loader_throughput.py --quick    # < 1 min on 2 CPU cores

The images are the photos packaged with scikit-image / scikit-learn, written as JPEG and
replicated to ``--images`` files, then packed with ``radio_core.data.shards.pack_folder``.

Consumption rate: the built-in student/teacher plugins are not ready yet, so a stand-in is
measured: forward + backward of timm ``vit_small_patch16_224`` (random weights) at batch 16,
224 px, on this machine's device. A loader/consumption ratio above 1 means the loader keeps up.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radio_core.data.augment import AugmentedImages, collate, loader_worker_init
from radio_core.data.sampling import StepBatchSampler, sampling_kwargs
from radio_core.data.shards import TarShardSource, pack_folder  # noqa: E402
from radio_core.data.sources import ImageFolderSource, SkimageSamplesSource


def make_folder(root: Path, count: int) -> Path:
    photos = SkimageSamplesSource()
    folder = root / "photos"
    images = [photos.load(i) for i in range(len(photos))]
    for n in range(count):
        path = folder / f"{n % 10:02d}" / f"img{n:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        images[n % len(images)].save(path, quality=90)
    return folder


def loader_rate(source, workers: int, batch: int, batches: int, crop: int) -> tuple[float, float]:
    """(images/s in steady state, seconds to the first batch incl. worker start-up)."""
    ds = AugmentedImages(source, (crop, crop))
    sampler = StepBatchSampler(len(source), batch, seed=0, stop=batches + 1, **sampling_kwargs(source))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         worker_init_fn=loader_worker_init if workers else None,
                                         prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)  # start-up and the first batch are not steady state
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = sum(b["image"].shape[0] for b in it)
    return n / (time.perf_counter() - t1), first


def consumption_rate(batch: int, steps: int, device: str) -> float:
    """Images/s of a stand-in distill step: ViT-S/16 forward + backward + AdamW at 224 px."""
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 224, 224, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).float().pow(2).mean().backward()
        opt.step()

    step()  # warm-up (allocations, kernel selection)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images and steps (< 1 min on 2 cores)")
    p.add_argument("--images", type=int, default=None, help="files in the folder (default 480; quick 160)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=224, help="edge of the augmented crop the loader produces")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    count = args.images or (160 if args.quick else 480)
    batches = max(1, count // args.batch - 1)
    steps = 2 if args.quick else 5

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        folder = make_folder(root, count)
        manifest = pack_folder(str(folder), str(root / "shards"), shard_size=args.shard_size, progress=False)
        print(f"{count} JPEG files ({manifest['image_bytes'] / 1e6:.1f} MB) packed into {len(manifest['shards'])} "
              f"shards in {time.perf_counter() - t0:.1f} s; batch {args.batch}, crop {args.crop}px, "
              f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
        sources = {"image_folder": ImageFolderSource(str(folder)), "webdataset": TarShardSource(str(root / "shards"))}
        rows = []
        for workers in args.workers:
            for name, src in sources.items():
                rate, first = loader_rate(src, workers, args.batch, batches, args.crop)
                rows.append((name, workers, rate, first))
    consume = consumption_rate(args.batch, steps, args.device)

    folder_rate = {w: r for n, w, r, _ in rows if n == "image_folder"}
    print(f"\n{'source':<14}{'workers':>8}{'images/s':>11}{'first batch s':>15}{'vs folder':>11}{'vs step':>9}")
    for name, workers, rate, first in rows:
        print(f"{name:<14}{workers:>8}{rate:>11.1f}{first:>15.2f}{rate / folder_rate[workers]:>10.2f}x"
              f"{rate / consume:>8.2f}x")
    print(f"\ndistill-step stand-in (timm vit_small_patch16_224 fwd+bwd+AdamW, batch {args.batch}, 224px, "
          f"{args.device}): {consume:.1f} images/s")
    print("'vs step' > 1: the loader outpaces the step. Built-in teachers/students are placeholders, so the "
          "step is a stand-in, not the bench recipe.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
