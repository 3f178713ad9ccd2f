"""Specialist teachers trained from scratch on the proxy world, each through the real library
code path of the teacher it stands in for, and cached on disk by fingerprint.

* ``clip``: an ``open_clip.CLIP`` (ViT image tower + text transformer, open_clip's BPE
  tokenizer) trained contrastively on the world's image-caption pairs (symmetric InfoNCE with
  the learned temperature), so zero-shot through its own text tower is real. Saved as an
  open_clip model-config JSON + ``open_clip_model.safetensors`` and loaded back by the
  ``clip`` plugin (``model: <json>, pretrained: <bin>``).
* ``dinov2``: a transformers ``Dinov2Model`` trained with a dense objective: a linear head on
  its patch tokens predicts each patch's share of every shape category (soft cross-entropy),
  and a linear head on the CLS token the set of shapes present. Its patch features therefore
  segment linearly. Saved with ``save_pretrained``; loaded by the ``dinov2`` plugin.
* ``sam``: a transformers ``SamVisionModel`` (ViTDet with windowed + global attention and the
  neck) at the world's full resolution, trained so that a *linear* pixel-shuffle head on its
  neck output predicts the fine part boundaries pixel by pixel. Loaded by the ``sam`` plugin.

The training heads are dropped: only the backbone the plugin loads is saved. A teacher's
directory is named by a fingerprint of (kind, preset config, world fingerprint, code
version); a changed world or config gives a new directory, hence a retrained teacher.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from .world import CLASSES, PART_CLASSES, SEGMENT_CLASSES, SHAPE_OFFSET, SHAPES, ProxyWorld, cache_root, world_from_args

#: bump when a training objective changes: cached teachers then stop matching.
TRAINING_VERSION = 2
KINDS = ("clip", "dinov2", "sam")
LOW_RES = 64  # CLIP- and DINOv2-like teachers see the world at half size; SAM at full size

# Presets. 'standard' is the benchmark's: each teacher trained until its own downstream score
# stops moving (the learning curve is saved in trained.json; docs/proxy_benchmark.md shows it).
# 'quick' is the quickstart's: smaller and shorter, well short of the plateau. 'tiny' trains a
# few steps, for tests of the caching and loading machinery. Curve settings: the speciality is
# scored every ``eval_every`` steps on ``eval_images`` held-out val images; ``patience`` and
# ``min_delta`` define a plateau.
_CURVE = dict(eval_images=1000, patience=2, min_delta=0.01)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "standard": {
        "clip": dict(width=64, layers=2, text_width=64, text_layers=1, embed_dim=64, steps=2400, batch=64, lr=2e-3,
                     eval_every=200, **_CURVE),
        "dinov2": dict(hidden=64, layers=2, steps=3000, batch=32, lr=2e-3, eval_every=300, **_CURVE),
        "sam": dict(hidden=64, layers=2, channels=32, patch=8, detail_weight=1.0, steps=3000, batch=12, lr=2e-3,
                    eval_every=300, **_CURVE),
    },
    "quick": {
        "clip": dict(width=64, layers=2, text_width=64, text_layers=1, embed_dim=64, steps=500, batch=64, lr=2e-3,
                     eval_every=0, **_CURVE),
        "dinov2": dict(hidden=64, layers=2, steps=500, batch=32, lr=2e-3, eval_every=0, **_CURVE),
        "sam": dict(hidden=64, layers=2, channels=32, patch=8, detail_weight=1.0, steps=800, batch=12, lr=2e-3,
                    eval_every=0, **_CURVE),
    },
    "tiny": {
        "clip": dict(width=32, layers=1, text_width=32, text_layers=1, embed_dim=16, steps=2, batch=8, lr=1e-3,
                     eval_every=0, **_CURVE),
        "dinov2": dict(hidden=32, layers=1, steps=2, batch=8, lr=1e-3, eval_every=0, **_CURVE),
        "sam": dict(hidden=32, layers=1, channels=16, patch=8, detail_weight=1.0, steps=2, batch=4, lr=1e-3,
                    eval_every=0, **_CURVE),
    },
}
CLIP_CONTEXT = 32
PATCH = 8


def teacher_config(kind: str, preset: str, overrides: Optional[dict] = None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"proxy teacher: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if preset not in PRESETS:
        raise ValueError(f"proxy teacher {kind}: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    cfg = dict(PRESETS[preset][kind])
    unknown = set(overrides or {}) - set(cfg) - {"seed"}
    if unknown:
        raise ValueError(f"proxy teacher {kind}: unknown config keys {sorted(unknown)}; known: {sorted(cfg)}, seed")
    return {"seed": 0, **cfg, **(overrides or {})}


def teacher_fingerprint(kind: str, cfg: dict, world: ProxyWorld) -> str:
    blob = json.dumps({"kind": kind, "cfg": cfg, "world": world.fingerprint, "version": TRAINING_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def teacher_dir(kind: str, preset: str, cfg: dict, world: ProxyWorld) -> Path:
    return cache_root() / "teachers" / f"{kind}-{preset}-{teacher_fingerprint(kind, cfg, world)}"


def ensure_teacher(kind: str, preset: str = "standard", world: Optional[dict] = None,
                   config: Optional[dict] = None, log=print) -> tuple[Path, bool]:
    """The directory of the trained teacher (trained now if not cached): (dir, trained_now)."""
    from radio_core.locks import file_lock

    w = world_from_args(world)
    cfg = teacher_config(kind, preset, config)
    directory = teacher_dir(kind, preset, cfg, w)
    if (directory / "trained.json").is_file():
        return directory, False
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent runs (parallel sweep arms) wait for one trainer instead of all training; a
    # waiter is told which teacher it waits for and which process trains it.
    with file_lock(directory.parent / f".{directory.name}.lock", f"the proxy {kind} teacher ({preset}) {directory}"):
        if (directory / "trained.json").is_file():
            return directory, False
        _train_into(kind, preset, cfg, w, directory, log)
    return directory, True


def _ensure_in_child(job: tuple) -> str:
    torch.set_num_threads(1)
    kind, preset, world, config = job
    directory, _ = ensure_teacher(kind, preset, world, config,
                                  log=lambda m: print(f"[{kind}] {m}", flush=True))
    return str(directory)


def prepare_teachers(jobs: list[tuple[str, str, Optional[dict], Optional[dict]]], workers: Optional[int] = None,
                     log=print) -> None:
    """Train the missing teachers of ``jobs`` ((kind, preset, world, config) each) at once, one
    process per core: a cold start (the quickstart's first run) then takes the time of the
    slowest teacher, not of all three. The world is generated first, once."""
    missing = []
    for kind, preset, world, config in jobs:
        w = world_from_args(world)  # generated here, before any child needs it
        if not (teacher_dir(kind, preset, teacher_config(kind, preset, config), w) / "trained.json").is_file():
            missing.append((kind, preset, world, config))
    workers = min(len(missing), workers or len(os.sched_getaffinity(0)))
    if len(missing) < 2 or workers < 2:
        return  # one at a time, as each factory asks for its teacher
    import multiprocessing

    log(f"proxy teachers: training {', '.join(k for k, *_ in missing)} in {workers} processes")
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        pool.map(_ensure_in_child, missing, chunksize=1)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _train_into(kind: str, preset: str, cfg: dict, w: ProxyWorld, directory: Path, log) -> None:
    log(f"proxy teacher {kind} ({preset}): training from scratch on the proxy world -> {directory}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            info = TRAINERS[kind](w, cfg, tmp, log)
        info = {"kind": kind, "preset": preset, "config": cfg, "world": w.fingerprint,
                "fingerprint": teacher_fingerprint(kind, cfg, w), "train_seconds": time.perf_counter() - start,
                "train_cpu_seconds": time.process_time() - cpu, "load_avg_1min": os.getloadavg()[0],
                "torch_threads": torch.get_num_threads(), **info}
        (tmp / "trained.json").write_text(json.dumps(info, indent=1))
        os.rename(tmp, directory)
        log(f"proxy teacher {kind}: trained in {info['train_seconds']:.0f} s wall, {info['train_cpu_seconds']:.0f} s "
            f"cpu (final loss {info['final_loss']:.3f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: the proxy CLIP's weights: safetensors, so reading the cache never unpickles anything
CLIP_WEIGHTS = "open_clip_model.safetensors"


def _clip_weights(directory: Path) -> Path:
    """The CLIP teacher's safetensors file (a cache written before it existed is converted once)."""
    from radio_core.utils import safetensors_from_legacy_pickle

    safetensors_from_legacy_pickle(directory / "open_clip_pytorch_model.bin", directory / CLIP_WEIGHTS)
    return directory / CLIP_WEIGHTS


def build_proxy_teacher(kind: str, preset: str = "standard", world: Optional[dict] = None, resolution=None,
                        meta: bool = False, config: Optional[dict] = None, **kwargs: Any):
    """A trained proxy teacher, loaded by the built-in plugin of its family."""
    if meta:  # architecture only (planning): no training needed
        directory = _arch_dir(kind, preset, world, config)
    else:
        directory, _ = ensure_teacher(kind, preset, world, config)
    if kind == "clip":
        from radio_plugins.clip import build_clip_teacher

        return build_clip_teacher(model=str(directory / "proxy-clip.json"),
                                  pretrained=None if meta else str(_clip_weights(directory)),
                                  resolution=resolution, meta=meta, **kwargs)
    if kind == "dinov2":
        from radio_plugins.dinov2 import build_dinov2_teacher

        return build_dinov2_teacher(model=str(directory), resolution=resolution or (LOW_RES, LOW_RES), meta=meta,
                                    **kwargs)
    from radio_plugins.sam import build_sam_teacher

    return build_sam_teacher(model=str(directory), resolution=resolution, meta=meta, **kwargs)


def _arch_dir(kind: str, preset: str, world: Optional[dict], config: Optional[dict]) -> Path:
    """Config files only (no weights, no world needed), for meta-device builds."""
    cfg = teacher_config(kind, preset, config)
    blob = hashlib.sha256(json.dumps({"kind": kind, "cfg": cfg}, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_root() / "arch" / f"{kind}-{blob}"
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        if kind == "clip":
            (directory / "proxy-clip.json").write_text(json.dumps(_clip_model_config(cfg)))
        else:
            with torch.device("meta"):
                net = _dinov2_network(cfg) if kind == "dinov2" else _sam_network(cfg)
            net.config.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- shared helpers


def pixels_u8(world: ProxyWorld, split: str = "train") -> Tensor:
    """(N, 3, H, W) uint8 of a split, in memory (200 MB for 4,000 images of 128 px)."""
    return torch.from_numpy(np.array(world.images(split))).permute(0, 3, 1, 2)


def downsample(u8: Tensor, size: int) -> Tensor:
    """uint8 (N, 3, H, W) -> float [0, 1] (N, 3, size, size), antialiased, in chunks."""
    return torch.cat([F.interpolate(u8[i:i + 256].float().div_(255), size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False) for i in range(0, len(u8), 256)])


def _normalise(x: Tensor, mean, std) -> Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _optimiser(params, cfg: dict):
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.05)
    warmup = max(cfg["steps"] // 20, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(cfg["steps"] - warmup, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _flip(x: Tensor, flags: Tensor) -> Tensor:
    return torch.where(flags.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


class _Trainer:
    """One teacher's training: ``loss(idx, flip)`` per step, ``score()`` of its speciality on
    held-out val images for the learning curve, ``save(out)``. Subclasses set ``modules``."""

    #: the downstream metric of the learning curve
    metric = ""
    modules: list[nn.Module]

    def loss(self, idx: Tensor, flip: Tensor) -> Tensor:
        raise NotImplementedError

    def score(self) -> float:
        raise NotImplementedError

    def save(self, out: Path) -> None:
        raise NotImplementedError


def train_teacher(trainer: _Trainer, n: int, cfg: dict, log=print) -> dict:
    """The shared loop: seeded batches and flips, AdamW with warmup + cosine decay, the
    speciality score on held-out val images every ``eval_every`` steps (the learning curve,
    scored with the modules in eval mode; it draws no random numbers, so the training is the same
    with or without it), and whether the curve has flattened by the end (the last ``patience``
    evaluations gained less than ``min_delta`` in all)."""
    params = [p for m in trainer.modules for p in m.parameters()]
    opt, sched = _optimiser(params, cfg)
    gen = torch.Generator().manual_seed(cfg["seed"])
    losses, curve = [], []
    start, cpu = time.perf_counter(), time.process_time()

    def evaluate(step: int) -> None:
        for m in trainer.modules:
            m.eval()
        with torch.no_grad():
            value = trainer.score()
        for m in trainer.modules:
            m.train()
        curve.append({"step": step, trainer.metric: value, "wall_s": time.perf_counter() - start,
                      "cpu_s": time.process_time() - cpu})
        log(f"  step {step}/{cfg['steps']}: {trainer.metric} {value:.3f} (loss {np.mean(losses[-50:]) if losses else float('nan'):.3f}, "
            f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s cpu)")

    from radio_core.progress import progress

    for m in trainer.modules:
        m.train()
    every = cfg.get("eval_every", 0)
    bar = progress(cfg["steps"], f"proxy {type(trainer).__name__.removesuffix('Trainer').lower()} teacher", "step", every_s=30)
    for step in range(cfg["steps"]):
        bar.update(1)
        if every and step and step % every == 0:
            evaluate(step)
        idx = torch.randint(n, (cfg["batch"],), generator=gen)
        flip = torch.rand(cfg["batch"], generator=gen) < 0.5
        loss = trainer.loss(idx, flip)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        trainer.after_step() if hasattr(trainer, "after_step") else None
        losses.append(loss.item())
    bar.close()
    if every:
        evaluate(cfg["steps"])
    patience, min_delta = cfg.get("patience", 2), cfg.get("min_delta", 0.01)
    values = [c[trainer.metric] for c in curve]
    plateau = len(values) > patience and values[-1] - values[-1 - patience] < min_delta
    return {"final_loss": float(np.mean(losses[-20:])), "curve": curve, "metric": trainer.metric,
            "plateau": plateau if every else None,
            "plateau_rule": f"the last {patience} evaluations gained < {min_delta} in all"}


def _held_out(world: ProxyWorld, count: int) -> tuple[slice, slice]:
    """The learning curve's probe-fitting and scoring images: two disjoint halves of the first
    ``count`` val images (the test split is never looked at while teachers train)."""
    count = min(count, world.cfg.val)
    return slice(0, count // 2), slice(count // 2, count)


# --------------------------------------------------------------------------- CLIP (open_clip)


def _clip_model_config(cfg: dict) -> dict:
    vision = {"image_size": LOW_RES, "layers": cfg["layers"], "width": cfg["width"], "head_width": 32,
              "patch_size": PATCH}
    text = {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": cfg["text_width"],
            "heads": max(cfg["text_width"] // 32, 1), "layers": cfg["text_layers"]}
    return {"embed_dim": cfg["embed_dim"], "vision_cfg": vision, "text_cfg": text}


class ClipTrainer(_Trainer):
    """Symmetric InfoNCE on image-caption pairs (identical captions in a batch are positives of
    each other); the curve is zero-shot top-1 on held-out val images through its own text tower."""

    metric = "zeroshot"

    def __init__(self, world: ProxyWorld, cfg: dict) -> None:
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        self.model_cfg = _clip_model_config(cfg)
        self.model = open_clip.CLIP(**self.model_cfg)
        self.modules = [self.model]
        self.tokenizer = SimpleTokenizer(context_length=CLIP_CONTEXT)
        self.tokens = self.tokenizer(world.captions("train"))
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
        self.images = _normalise(downsample(pixels_u8(world), LOW_RES), mean, std)
        _, held = _held_out(world, cfg.get("eval_images", 1000))
        self.val_images = _normalise(downsample(pixels_u8(world, "val")[held], LOW_RES), mean, std)
        self.val_labels = torch.from_numpy(np.array(world.labels("val")[held]))

    def loss(self, idx: Tensor, flip: Tensor) -> Tensor:
        img_f, txt_f, scale = self.model(_flip(self.images[idx], flip), self.tokens[idx])
        logits = scale * img_f @ txt_f.T
        same = (self.tokens[idx][:, None, :] == self.tokens[idx][None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.log_softmax(0), 0).mean())

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def score(self) -> float:
        text = F.normalize(self.model.encode_text(self.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        image = torch.cat([F.normalize(self.model.encode_image(self.val_images[i:i + 250]), dim=-1)
                           for i in range(0, len(self.val_images), 250)])
        return float(((image @ text.T).argmax(1) == self.val_labels).float().mean())

    def save(self, out: Path) -> None:
        (out / "proxy-clip.json").write_text(json.dumps(self.model_cfg, indent=1))
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(out / CLIP_WEIGHTS))


def train_clip(world: ProxyWorld, cfg: dict, out: Path, log=print) -> dict:
    trainer = ClipTrainer(world, cfg)
    info = train_teacher(trainer, len(trainer.images), cfg, log)
    trainer.save(out)
    return {**info, "classes": CLASSES}


# --------------------------------------------------------------------------- DINOv2 (transformers)


def _dinov2_network(cfg: dict):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                          num_attention_heads=max(cfg["hidden"] // 32, 1), patch_size=PATCH, image_size=LOW_RES,
                          mlp_ratio=4)
    return Dinov2Model(config)


def _patch_shares(semantic: Tensor, grid: int, classes: int) -> Tensor:
    """(N, H, W) class ids -> (N, classes, grid, grid): each patch's share of every class."""
    return torch.stack([F.adaptive_avg_pool2d((semantic == c).float()[:, None], grid)[:, 0]
                        for c in range(classes)], 1)


def _semantic_masks(world: ProxyWorld, split: str, part: slice = slice(None)) -> Tensor:
    """Class-id masks at the segmentation size (64 px), long."""
    sem = torch.from_numpy(np.array(world.semantic(split)[part])).long()
    step = max(sem.shape[-1] // LOW_RES, 1)
    return sem[:, step // 2::step, step // 2::step]


class Dinov2Trainer(_Trainer):
    """A linear head on the patch tokens predicts each patch's share of every semantic class
    (soft cross-entropy: sky, ground, the five shapes), one on CLS the set of shapes present; the
    curve is a linear segmentation probe's mIoU on held-out val images."""

    metric = "miou"

    def __init__(self, world: ProxyWorld, cfg: dict) -> None:
        from radio_plugins.dinov2 import IMAGENET_MEAN, IMAGENET_STD

        self.net = _dinov2_network(cfg)
        self.classes = len(SEGMENT_CLASSES)
        grid = LOW_RES // PATCH
        self.images = _normalise(downsample(pixels_u8(world), LOW_RES), IMAGENET_MEAN, IMAGENET_STD)
        semantic = _semantic_masks(world, "train")
        self.shares = torch.cat([_patch_shares(semantic[i:i + 512], grid, self.classes)
                                 for i in range(0, len(semantic), 512)])
        self.present = (self.shares.amax((2, 3))[:, SHAPE_OFFSET:] > 0).float()  # which shapes occur
        self.patch_head = nn.Linear(cfg["hidden"], self.classes)
        self.cls_head = nn.Linear(cfg["hidden"], len(SHAPES))
        self.modules = [self.net, self.patch_head, self.cls_head]
        fit, held = _held_out(world, cfg.get("eval_images", 1000))
        val = _normalise(downsample(pixels_u8(world, "val")[:held.stop], LOW_RES), IMAGENET_MEAN, IMAGENET_STD)
        self.val = (val[fit], _semantic_masks(world, "val", fit), val[held], _semantic_masks(world, "val", held))

    def loss(self, idx: Tensor, flip: Tensor) -> Tensor:
        tokens = self.net(pixel_values=_flip(self.images[idx], flip)).last_hidden_state
        target = _flip(self.shares[idx], flip).flatten(2).transpose(1, 2)  # (B, grid*grid, classes)
        seg = torch.sum(-target * self.patch_head(tokens[:, 1:]).log_softmax(-1), -1).mean()
        cls = F.binary_cross_entropy_with_logits(self.cls_head(tokens[:, 0]), self.present[idx])
        return seg + 0.5 * cls

    def features(self, images: Tensor) -> Tensor:
        grid = LOW_RES // PATCH
        out = torch.cat([self.net(pixel_values=images[i:i + 250]).last_hidden_state[:, 1:]
                         for i in range(0, len(images), 250)])
        return out.transpose(1, 2).reshape(len(images), -1, grid, grid)

    def score(self) -> float:
        from .probes import segmentation_probe

        fit_x, fit_y, held_x, held_y = self.val
        return segmentation_probe(self.features(fit_x), fit_y, self.features(held_x), held_y, self.classes)["miou"]

    def save(self, out: Path) -> None:
        self.net.save_pretrained(out)


def train_dinov2(world: ProxyWorld, cfg: dict, out: Path, log=print) -> dict:
    trainer = Dinov2Trainer(world, cfg)
    info = train_teacher(trainer, len(trainer.images), cfg, log)
    trainer.save(out)
    return info


# --------------------------------------------------------------------------- SAM (transformers)


def _sam_network(cfg: dict, size: int = 128):
    from transformers import SamVisionConfig, SamVisionModel

    layers = cfg["layers"]
    config = SamVisionConfig(hidden_size=cfg["hidden"], num_hidden_layers=layers,
                             num_attention_heads=max(cfg["hidden"] // 32, 1), image_size=size,
                             patch_size=cfg["patch"], output_channels=cfg["channels"], window_size=32 // cfg["patch"], mlp_dim=4 * cfg["hidden"],
                             global_attn_indexes=list(range(1, layers, 2)) or [0])  # every second block global
    return SamVisionModel(config)


def parts_logits(head: nn.Conv2d, features: Tensor, classes: int) -> Tensor:
    """A linear pixel-shuffle read-out: each feature vector predicts the class logits of the
    r x r pixels of its cell: (B, classes, grid * r, grid * r)."""
    r = math.isqrt(head.out_channels // classes)
    return F.pixel_shuffle(head(features), r)


def fine_detail(u8: Tensor) -> Tensor:
    """(B, H, W): the grey level (in units of its standard deviation, ~0.1) minus the mean of its
    2 x 2 block: the 1-px structure that halving the resolution removes."""
    grey = u8.float().mean(1, keepdim=True) / 255
    block = F.interpolate(F.avg_pool2d(grey, 2), scale_factor=2, mode="nearest")
    return ((grey - block) / 0.1)[:, 0]


class SamTrainer(_Trainer):
    """Two linear pixel-shuffle heads on the neck output, at full resolution: one predicts the
    parts map (the fine texture of every object part, or background; cross-entropy), one the
    image's 1-px detail (grey level minus its 2 x 2 block mean; mean squared error). The detail
    target is linear in the pixels, so the patch embedding learns the 1-px filters fast; telling
    textures apart from those filters' energies is then learnable too (with a random-sign
    texture, the parts loss alone gives the first layer no first-order signal and stalls). The
    curve is the parts mIoU of a linear pixel-shuffle probe on held-out val images."""

    metric = "parts_miou"

    def __init__(self, world: ProxyWorld, cfg: dict) -> None:
        from radio_plugins.sam import SAM_MEAN, SAM_STD

        self.size = world.cfg.size
        self.net = _sam_network(cfg, self.size)
        self.mean, self.std = SAM_MEAN, SAM_STD
        self.images = pixels_u8(world)  # normalised per batch: the whole split in float would be 800 MB
        self.parts = torch.from_numpy(np.array(world.parts("train"))).long()
        self.classes = len(PART_CLASSES)
        r = self.size // (self.size // cfg["patch"])
        self.head = nn.Conv2d(cfg["channels"], r * r * self.classes, 1)
        self.detail_head = nn.Conv2d(cfg["channels"], r * r, 1)
        self.detail_weight = cfg.get("detail_weight", 1.0)
        self.modules = [self.net, self.head, self.detail_head]
        fit, held = _held_out(world, cfg.get("eval_images", 1000))
        val = pixels_u8(world, "val")
        val_parts = torch.from_numpy(np.array(world.parts("val")[:held.stop])).long()
        self.val = (val[fit], val_parts[fit], val[held], val_parts[held])

    def forward(self, u8: Tensor) -> Tensor:
        return self.net(pixel_values=_normalise(u8.float().div(255), self.mean, self.std)).last_hidden_state

    def loss(self, idx: Tensor, flip: Tensor) -> Tensor:
        u8 = _flip(self.images[idx], flip)
        features = self.forward(u8)
        parts = F.cross_entropy(parts_logits(self.head, features, self.classes), _flip(self.parts[idx], flip))
        detail = F.mse_loss(F.pixel_shuffle(self.detail_head(features), self.size // features.shape[-1])[:, 0],
                            fine_detail(u8))
        return parts + self.detail_weight * detail

    def score(self) -> float:
        from .probes import shuffle_segmentation_probe

        fit_x, fit_y, held_x, held_y = self.val
        feats = lambda u8: torch.cat([self.forward(u8[i:i + 100]) for i in range(0, len(u8), 100)])
        return shuffle_segmentation_probe(feats(fit_x), fit_y, feats(held_x), held_y, self.classes,
                                          scored=list(range(1, self.classes)))["miou"]

    def save(self, out: Path) -> None:
        self.net.save_pretrained(out)


def train_sam(world: ProxyWorld, cfg: dict, out: Path, log=print) -> dict:
    trainer = SamTrainer(world, cfg)
    info = train_teacher(trainer, len(trainer.images), cfg, log)
    trainer.save(out)
    return info


TRAINERS = {"clip": train_clip, "dinov2": train_dinov2, "sam": train_sam}

__all__ = ["ensure_teacher", "build_proxy_teacher", "teacher_config", "teacher_fingerprint", "PRESETS", "KINDS",
           "parts_logits"]
