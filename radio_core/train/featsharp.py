"""``radio featsharp RECIPE --teacher NAME``: train one teacher's FeatSharp upsampler (see
``radio_core.models.featsharp``) and save it, fingerprinted, where the recipe's
``teachers.NAME.upsampler`` finds it (its ``path``, else the cache keyed by the teacher's
weights, resolution and factor).

The training follows the reference (NVlabs/FeatSharp ``training_harness.py``, ``train.py``,
``configs/base_config.yaml``, ``downsamplers.py``), a multi-view consistency objective inherited
from FeatUp:

* data: the recipe's data source as random resized crops (``augment.scale`` / ``ratio``) at
  ``factor`` times the teacher's resolution; batch 4 (the reference's per-GPU batch);
* the teacher's features are PHI-S-standardised with statistics estimated before training
  (the reference estimates them over as many batches as it trains; here ``norm_batches``);
* each step, ``jitters`` (5) views of the crop are made by a small random warp (rotation up to
  5 degrees and zoom up to 1/0.95, the reference's individual deformations; its 0.01-0.05
  perspective is left out, our choice) and seen by the teacher at its resolution; the
  upsampled features, warped the same way and brought to the view's grid by a learned
  attention downsampler (9 x 9 kernel on blurred features, 20% logit dropout), must match
  them: MSE (``distance_fn: mse``) weighted by a grid that counts cells on tile boundaries
  twice (``grid_weight``, 2 in the 3x config) and by a predicted per-cell uncertainty
  (``exp(-u)`` with ``u / 2`` added, FeatUp's outlier detection); the de-biasing buffer is added
  to every teacher output on both sides;
* NAdam, learning rate 5e-4 (the JBU at 1e-4, the uncertainty net at 1e-5), linear warmup
  from 0.1x over 100 steps, then cosine; the reference trains 3000 (config) to 9000 (README)
  steps. Its σReparam on the upsampler is left out (our choice).

At the end the upsampler is judged on held-out crops against what it imitates: the teacher's
own features at ``factor`` times its resolution (for teachers that run at other sizes),
compared with bilinear upsampling of the low-resolution features (mean squared error in the
PHI-S space, and cosine similarity), before training (an untrained FeatSharp is its JBU) and
after. All are printed and stored in the file's JSON.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import AugmentedImages, collate
from ..data.sampling import StepBatchSampler, _mix, sampling_kwargs
from ..models import featsharp as fs
from ..models import preprocess
from ..models.teachers import build_teacher
from ..plan.partition import plan_stages
from ..protocols import Teacher
from ..recipe import Recipe, RecipeError
from ..registry import PluginError, Registry

VAL_STREAM = 0xF5A1  # held-out crops come from their own sample stream


@dataclass
class Settings:
    steps: int = 3000
    batch_size: int = 4
    lr: float = 5e-4
    warmup: int = 100
    jitters: int = 5
    norm_batches: int = 8
    val_batches: int = 4
    grid_weight: float = 2.0
    downsampler_kernel: int = 9
    seed: int = 0


class AttentionDownsampler(nn.Module):
    """Fine features -> a ``stride``-times coarser grid: each output cell a softmax-weighted sum
    of a ``kernel`` x ``kernel`` neighbourhood of the (blurred) fine features, the weights
    predicted from that neighbourhood (reference ``AttentionDownsampler``)."""

    def __init__(self, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.attn_kernel = nn.Parameter(torch.randn(kernel * kernel, dim, kernel, kernel) * 0.01 + 1)
        self.kernel_bias = nn.Parameter(torch.randn(kernel * kernel) * 0.01)
        self.logit_bias = nn.Parameter(torch.randn(1, kernel * kernel, 1, 1) * 0.1)
        g = torch.exp(-torch.arange(-2, 3, dtype=torch.float32) ** 2 / math.sqrt(0.5))
        self.register_buffer("blur", (g[:, None] * g[None, :] / (g.sum() ** 2)).reshape(1, 1, 5, 5))

    def forward(self, fine: Tensor) -> Tensor:
        b, c, hh, ww = fine.shape
        x = F.conv2d(fine, self.blur.expand(c, -1, -1, -1).to(fine.dtype), groups=c, padding=2)
        pad = self.kernel // 2
        logits = F.conv2d(x, self.attn_kernel, self.kernel_bias, stride=self.stride, padding=pad)
        if self.training:
            logits = logits * (torch.rand_like(logits) > 0.2)
        attn = F.softmax(logits + self.logit_bias, dim=1)
        h, w = attn.shape[-2:]
        patches = F.unfold(x, self.kernel, padding=pad, stride=self.stride).reshape(b, c, -1, h, w)
        return torch.einsum("bckhw,bkhw->bchw", patches, attn)


class UncertaintyNet(nn.Module):
    """Per-cell log-uncertainty ``u`` of the fine features (starts at 0: every cell counts)."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        last = nn.Conv2d(hidden, 1, 1, bias=False)
        nn.init.zeros_(last.weight)
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 5, padding=2, padding_mode="reflect"), nn.GELU(), last)

    def forward(self, fine: Tensor) -> Tensor:
        return self.net(fine)


def tile_boundary_grid(grid: tuple[int, int], factor: int, weight: float) -> Tensor:
    """(1, 1, u h, u w) loss weights: ``weight`` on the cells either side of a tile boundary, 1
    elsewhere, scaled to mean 1 (the reference's ``loss_grid``)."""
    h, w = grid
    g = torch.ones(1, 1, h * factor, w * factor)
    for off in range(h, h * factor, h):
        g[..., off - 1:off + 1, :] = weight
    for off in range(w, w * factor, w):
        g[..., :, off - 1:off + 1] = weight
    return g * (g.numel() / g.sum())


def random_warps(batch: int, generator: torch.Generator, max_degrees: float = 5.0,
                 min_zoom: float = 0.95) -> Tensor:
    """(B, 2, 3) affine maps (output -> input, normalised coordinates) of small jitters: a
    rotation, a zoom-in and a shift that keeps the view inside the image."""
    u = torch.rand(batch, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_degrees)
    scale = min_zoom + (1 - min_zoom) * u[:, 1]
    shift = (u[:, 2:] * 2 - 1) * (1 - scale)[:, None]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def shrink(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of normalised images (no [0, 1] clamp), as ``teacher_views``
    makes the low-resolution view."""
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def warp(x: Tensor, theta: Tensor, mode: str = "bilinear", padding: str = "zeros") -> Tensor:
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


class Trainer:
    """Trains one FeatSharp for one teacher instance (its resolution)."""

    def __init__(self, teacher: Teacher, factor: int, settings: Settings, device: torch.device) -> None:
        self.teacher, self.settings, self.device = teacher, settings, device
        grid = fs.feature_grid(teacher)
        self.upsampler = fs.FeatSharp(fs.FeatSharpConfig(teacher.spatial_dim, grid, factor)).to(device)
        self.downsampler = AttentionDownsampler(teacher.spatial_dim, settings.downsampler_kernel, factor).to(device)
        self.uncertainty = UncertaintyNet(teacher.spatial_dim).to(device)
        self.loss_grid = tile_boundary_grid(grid, factor, settings.grid_weight).to(device)
        jbu = [p for n, p in self.upsampler.named_parameters() if n.startswith("jbu.")]
        rest = [p for n, p in self.upsampler.named_parameters() if not n.startswith("jbu.")]
        rest += list(self.downsampler.parameters())
        self.optimizer = torch.optim.NAdam([{"params": rest, "lr": settings.lr},
                                            {"params": jbu, "lr": 1e-4},
                                            {"params": list(self.uncertainty.parameters()), "lr": 1e-5}])
        warm = max(1, min(settings.warmup, settings.steps - 1))
        self.scheduler = torch.optim.lr_scheduler.SequentialLR(self.optimizer, [
            torch.optim.lr_scheduler.LinearLR(self.optimizer, 0.1, 1.0, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, settings.steps - warm))],
            milestones=[warm])

    def prepare(self, images01: Tensor) -> Tensor:
        """[0, 1] crops at factor x the teacher's size -> the teacher's normalised input."""
        size = tuple(s * self.upsampler.config.factor for s in self.teacher.input_size)
        return preprocess.normalize(preprocess.resize(images01, size), self.teacher.mean, self.teacher.std)

    @torch.no_grad()
    def estimate_normalizer(self, batches: Sequence[Tensor]) -> None:
        norm = self.upsampler.normalizer
        for images01 in batches:
            norm.update_spatial(self.teacher(shrink(self.prepare(images01), tuple(self.teacher.input_size))
                                             ).spatial.float())
        norm.finalize()

    def features(self, images: Tensor) -> Tensor:
        """The teacher's normalised, de-biased features of normalised images at its size."""
        return self.upsampler.debias(self.upsampler.normalizer.normalize_spatial(self.teacher(images).spatial.float()))

    def step(self, images01: Tensor, generator: torch.Generator) -> float:
        s, up = self.settings, self.upsampler
        for m in (up, self.downsampler, self.uncertainty):
            m.train()
        images = self.prepare(images01)
        _, low, tiles = fs.teacher_views(self.teacher, up, images)
        fine = up(images, low, tiles)
        log_unc = self.uncertainty(fine.detach())
        total = 0.0
        for _ in range(s.jitters):
            theta = random_warps(images.shape[0], generator).to(self.device)
            view = warp(images, theta)
            target = self.features(shrink(view, tuple(self.teacher.input_size)))
            valid = warp(torch.ones_like(images[:, :1]), theta, mode="nearest")
            coarse = self.downsampler(warp(fine, theta, padding="reflection"))
            cell = F.adaptive_avg_pool2d
            grid = target.shape[-2:]
            weight = (cell(valid, grid) > 0.999).float() * cell(warp(self.loss_grid.expand(len(images), -1, -1, -1),
                                                                     theta), grid)
            scale = torch.exp(-cell(warp(log_unc, theta, padding="reflection"), grid))
            mse = (coarse - target).pow(2).mean(1, keepdim=True)
            loss = (weight * scale * mse).sum() / weight.sum().clamp_min(1) + log_unc.mean() / 2
            total = total + loss / s.jitters
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        return float(total.detach())

    @torch.no_grad()
    def judge(self, batches: Sequence[Tensor]) -> dict:
        """FeatSharp and bilinear upsampling against the teacher's features at factor x its size."""
        up = self.upsampler.eval()
        sums = {"featsharp_mse": 0.0, "bilinear_mse": 0.0, "featsharp_cosine": 0.0, "bilinear_cosine": 0.0}
        n = 0
        for images01 in batches:
            images = self.prepare(images01)
            summary, low, tiles = fs.teacher_views(self.teacher, up, images)
            fine = up(images, low, tiles)
            real = up.normalizer.normalize_spatial(self.teacher(images).spatial.float())
            if real.shape[-2:] != fine.shape[-2:]:
                return {"judged": False, "why": f"the teacher gives a {tuple(real.shape[-2:])} grid at "
                                                f"{tuple(images.shape[-2:])} px, not {tuple(fine.shape[-2:])}"}
            plain = up.normalizer.normalize_spatial(self.teacher(shrink(images, tuple(self.teacher.input_size))
                                                                 ).spatial.float())
            bilinear = F.interpolate(plain, size=real.shape[-2:], mode="bilinear", align_corners=False)
            for name, pred in (("featsharp", fine), ("bilinear", bilinear)):
                sums[f"{name}_mse"] += float((pred - real).pow(2).mean())
                sums[f"{name}_cosine"] += float(F.cosine_similarity(pred, real, dim=1).mean())
            n += 1
        return {"judged": True, **{k: v / max(n, 1) for k, v in sums.items()}}


def images_batches(recipe: Recipe, source, crop: tuple[int, int], batch: int, count: int, seed: int):
    """``count`` batches of [0, 1] crops (the recipe's augmentation, seeded)."""
    a = recipe.augment
    dataset = AugmentedImages(source, crop, a.scale, a.ratio, a.hflip)
    sampler = StepBatchSampler(len(source), batch, seed, stop=count, **sampling_kwargs(source))
    for refs in sampler:
        yield preprocess.to_float(collate([dataset[ref] for ref in refs])["image"])


def upsampled_resolutions(recipe: Recipe, name: str) -> list[Optional[tuple[int, int]]]:
    """The resolutions (None: the teacher's own) at which the recipe upsamples ``name``."""
    found = set()
    for plan in plan_stages(recipe, 1):
        for slot in plan.rank_slots[0]:
            if name in slot.upsample:
                found.add(slot.teacher_resolution.get(name))
    return sorted(found, key=lambda r: r or (0, 0))


def train(recipe: Recipe, name: str, registry: Registry, settings: Settings, out: Optional[Path] = None,
          say: Callable[[str], None] = print) -> list[dict]:
    """Train and save the upsampler of teacher ``name`` for every resolution the recipe runs it
    at with its upsampler; returns one summary per file written."""
    spec = recipe.teachers.get(name)
    if spec is None:
        raise RecipeError(f"--teacher: {name!r} is not a teacher of this recipe ({', '.join(recipe.teachers)})")
    if spec.upsampler is None:
        raise RecipeError(f"teachers.{name}.upsampler is not set; add e.g. `upsampler: {{name: featsharp, factor: 3}}`")
    resolutions = upsampled_resolutions(recipe, name)
    if not resolutions:
        raise RecipeError(f"teachers.{name}.upsampler.groups: no group of this recipe that runs {name} uses it")
    if out is not None and len(resolutions) > 1:
        raise RecipeError(f"--out: teacher {name} is upsampled at {len(resolutions)} resolutions; leave --out "
                          "out (each gets its fingerprinted file)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = registry.build("dataset", recipe.data.source.name, **recipe.data.source.args)
    factor = spec.upsampler.factor
    results = []
    for res in resolutions:
        torch.manual_seed(settings.seed)
        teacher = build_teacher(recipe, name, registry, resolution=res).to(device)
        trainer = Trainer(teacher, factor, settings, device)
        crop = tuple(s * factor for s in teacher.input_size)
        ident = fs.identity(spec.plugin, spec.args, teacher)
        path = Path(out or spec.upsampler.path or fs.default_path(spec.plugin, ident["fingerprint"],
                                                                  tuple(teacher.input_size), factor))
        say(f"featsharp: teacher {name} at {teacher.input_size[0]}x{teacher.input_size[1]}, {factor}x -> "
            f"{crop[0]}x{crop[1]} px, grid {trainer.upsampler.config.grid} -> "
            f"{tuple(g * factor for g in trainer.upsampler.config.grid)}, {settings.steps} steps")
        trainer.estimate_normalizer(list(images_batches(recipe, source, crop, settings.batch_size,
                                                        settings.norm_batches, _mix(settings.seed, 0x9C5))))
        val = list(images_batches(recipe, source, crop, settings.batch_size, settings.val_batches,
                                  _mix(settings.seed, VAL_STREAM)))
        val = [v.to(device) for v in val]
        untrained = trainer.judge(val)  # an untrained FeatSharp is its JBU (layer scales start at 1e-6)
        generator = torch.Generator().manual_seed(settings.seed)
        losses, start = [], time.perf_counter()
        for i, images01 in enumerate(images_batches(recipe, source, crop, settings.batch_size, settings.steps,
                                                    settings.seed)):
            losses.append(trainer.step(images01.to(device), generator))
            if (i + 1) % max(1, settings.steps // 10) == 0 or i == 0:
                say(f"  step {i + 1}/{settings.steps}: loss {losses[-1]:.4f}")
        verdict = trainer.judge(val)
        if verdict["judged"]:
            say(f"  held-out error against the teacher at {crop[0]}x{crop[1]} px (PHI-S space): FeatSharp "
                f"mse {verdict['featsharp_mse']:.4f} cos {verdict['featsharp_cosine']:.4f} (untrained "
                f"{untrained['featsharp_mse']:.4f}, {untrained['featsharp_cosine']:.4f}); bilinear mse "
                f"{verdict['bilinear_mse']:.4f} cos {verdict['bilinear_cosine']:.4f}")
        else:
            say(f"  not judged: {verdict['why']}")
        k = max(1, len(losses) // 10)
        training = {**asdict(settings), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                    "seconds": time.perf_counter() - start, "data": recipe.data.source.model_dump(),
                    "held_out": verdict, "held_out_untrained": untrained}
        fs.save(path, trainer.upsampler, ident, training)
        say(f"  wrote {path} (+ {fs.json_path(path).name})")
        results.append({"path": str(path), "resolution": list(teacher.input_size), **training})
    return results


def main(argv: Optional[Sequence[str]] = None, prog: str = "radio featsharp") -> int:
    p = argparse.ArgumentParser(prog=prog, description="train a teacher's FeatSharp upsampler (the recipe's "
                                "teachers.NAME.upsampler) and save it where the recipe finds it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    p.add_argument("--teacher", required=True, help="the recipe's name of the teacher to upsample")
    d = Settings()
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"crops per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--jitters", type=int, default=d.jitters, help=f"warped views per step (default {d.jitters})")
    p.add_argument("--norm-batches", type=int, default=d.norm_batches,
                   help=f"batches for the PHI-S statistics (default {d.norm_batches})")
    p.add_argument("--out", default=None, help="file to write (default: the recipe's upsampler.path, else the "
                   "fingerprinted cache, $RADIO_FEATSHARP_CACHE or ~/.cache/radio_distill/featsharp)")
    args = p.parse_intermixed_args(argv)  # overrides may come after the options
    for flag in ("steps", "batch_size", "jitters", "norm_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    from ..recipe import load_recipe
    from ..registry import get_registry

    try:
        recipe = load_recipe(args.recipe, list(args.overrides))
        settings = Settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, jitters=args.jitters,
                            norm_batches=args.norm_batches, seed=recipe.train.seed)
        train(recipe, args.teacher, get_registry(), settings, Path(args.out) if args.out else None)
    except (RecipeError, PluginError, ValueError, OSError) as exc:  # bad recipe, plugin, data: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
