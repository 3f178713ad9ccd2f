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

import fcntl
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

from .world import CLASSES, SHAPES, ProxyWorld, cache_root, world_from_args

#: bump when a training objective changes: cached teachers then stop matching.
TRAINING_VERSION = 1
KINDS = ("clip", "dinov2", "sam")
LOW_RES = 64  # CLIP- and DINOv2-like teachers see the world at half size; SAM at full size

# Presets: 'standard' (the quickstart's and the benchmark's: each trains in well under a minute
# of one CPU core's time) and 'tiny' (a few steps, for tests of the caching and loading machinery).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "standard": {
        "clip": dict(width=64, layers=2, text_width=64, text_layers=1, embed_dim=64, steps=300, batch=64, lr=2e-3),
        "dinov2": dict(hidden=64, layers=2, steps=600, batch=32, lr=2e-3),
        "sam": dict(hidden=64, layers=2, channels=32, steps=500, batch=12, lr=2e-3),
    },
}
#: a few steps each, for tests of the caching and loading machinery.
PRESETS["tiny"] = {
    "clip": dict(width=32, layers=1, text_width=32, text_layers=1, embed_dim=16, steps=2, batch=8, lr=1e-3),
    "dinov2": dict(hidden=32, layers=1, steps=2, batch=8, lr=1e-3),
    "sam": dict(hidden=32, layers=1, channels=16, steps=2, batch=4, lr=1e-3),
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
    w = world_from_args(world)
    cfg = teacher_config(kind, preset, config)
    directory = teacher_dir(kind, preset, cfg, w)
    if (directory / "trained.json").is_file():
        return directory, False
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent runs (parallel sweep arms) wait for one trainer instead of all training.
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / "trained.json").is_file():
            return directory, False
        _train_into(kind, preset, cfg, w, directory, log)
    return directory, True


def _train_into(kind: str, preset: str, cfg: dict, w: ProxyWorld, directory: Path, log) -> None:
    log(f"proxy teacher {kind} ({preset}): training from scratch on the proxy world -> {directory}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        start, cpu = time.perf_counter(), time.process_time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            info = TRAINERS[kind](w, cfg, tmp)
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


def _batches(n: int, cfg: dict, log=print):
    """Seeded batch indices and horizontal-flip flags for every step (progress logged)."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(cfg["steps"]):
        if step and step % 100 == 0:
            log(f"  step {step}/{cfg['steps']}: {time.perf_counter() - start:.0f} s wall, "
                f"{time.process_time() - cpu:.0f} s cpu")
        yield step, torch.randint(n, (cfg["batch"],), generator=gen), torch.rand(cfg["batch"], generator=gen) < 0.5


def _flip(x: Tensor, flags: Tensor) -> Tensor:
    return torch.where(flags.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


# --------------------------------------------------------------------------- CLIP (open_clip)


def _clip_model_config(cfg: dict) -> dict:
    vision = {"image_size": LOW_RES, "layers": cfg["layers"], "width": cfg["width"], "head_width": 32,
              "patch_size": PATCH}
    text = {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": cfg["text_width"],
            "heads": max(cfg["text_width"] // 32, 1), "layers": cfg["text_layers"]}
    return {"embed_dim": cfg["embed_dim"], "vision_cfg": vision, "text_cfg": text}


def train_clip(world: ProxyWorld, cfg: dict, out: Path) -> dict:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    model_cfg = _clip_model_config(cfg)
    model = open_clip.CLIP(**model_cfg)
    tokens = SimpleTokenizer(context_length=CLIP_CONTEXT)(world.captions("train"))
    images = _normalise(downsample(pixels_u8(world), LOW_RES), open_clip.OPENAI_DATASET_MEAN,
                        open_clip.OPENAI_DATASET_STD)
    opt, sched = _optimiser(model.parameters(), cfg)
    model.train()
    losses = []
    for step, idx, flip in _batches(len(images), cfg):
        img_f, txt_f, scale = model(_flip(images[idx], flip), tokens[idx])
        logits = scale * img_f @ txt_f.T
        # Identical captions in a batch are positives of each other (soft targets).
        same = (tokens[idx][:, None, :] == tokens[idx][None, :, :]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.log_softmax(0), 0).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    (out / "proxy-clip.json").write_text(json.dumps(model_cfg, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CLIP_WEIGHTS))
    return {"final_loss": float(np.mean(losses[-20:])), "classes": CLASSES}


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


def train_dinov2(world: ProxyWorld, cfg: dict, out: Path) -> dict:
    from radio_plugins.dinov2 import IMAGENET_MEAN, IMAGENET_STD

    net = _dinov2_network(cfg)
    n_seg = len(SHAPES) + 1
    grid = LOW_RES // PATCH
    images = _normalise(downsample(pixels_u8(world), LOW_RES), IMAGENET_MEAN, IMAGENET_STD)
    semantic = torch.from_numpy(np.array(world.semantic("train")))
    shares = torch.cat([_patch_shares(semantic[i:i + 512], grid, n_seg) for i in range(0, len(semantic), 512)])
    present = (shares.amax((2, 3))[:, 1:] > 0).float()  # which shapes occur: the CLS target
    patch_head, cls_head = nn.Linear(cfg["hidden"], n_seg), nn.Linear(cfg["hidden"], len(SHAPES))
    params = [*net.parameters(), *patch_head.parameters(), *cls_head.parameters()]
    opt, sched = _optimiser(params, cfg)
    net.train()
    losses = []
    for step, idx, flip in _batches(len(images), cfg):
        tokens = net(pixel_values=_flip(images[idx], flip)).last_hidden_state
        target = _flip(shares[idx], flip).flatten(2).transpose(1, 2)  # (B, grid*grid, classes)
        seg = torch.sum(-target * patch_head(tokens[:, 1:]).log_softmax(-1), -1).mean()
        cls = F.binary_cross_entropy_with_logits(cls_head(tokens[:, 0]), present[idx])
        loss = seg + 0.5 * cls
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.save_pretrained(out)
    return {"final_loss": float(np.mean(losses[-20:]))}


# --------------------------------------------------------------------------- SAM (transformers)


def _sam_network(cfg: dict, size: int = 128):
    from transformers import SamVisionConfig, SamVisionModel

    layers = cfg["layers"]
    config = SamVisionConfig(hidden_size=cfg["hidden"], num_hidden_layers=layers,
                             num_attention_heads=max(cfg["hidden"] // 32, 1), image_size=size, patch_size=PATCH,
                             output_channels=cfg["channels"], window_size=4, mlp_dim=4 * cfg["hidden"],
                             global_attn_indexes=list(range(1, layers, 2)) or [0])  # every second block global
    return SamVisionModel(config)


def boundary_logits(head: nn.Conv2d, features: Tensor, size: tuple[int, int]) -> Tensor:
    """A linear pixel-shuffle read-out: each feature vector predicts the r x r pixels of its cell
    (r = ceil(size / grid)); the logits are resized to ``size`` when r does not tile it exactly."""
    r = math.isqrt(head.out_channels)
    logits = F.pixel_shuffle(head(features), r)
    if logits.shape[-2:] != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[:, 0]


def train_sam(world: ProxyWorld, cfg: dict, out: Path) -> dict:
    from radio_plugins.sam import SAM_MEAN, SAM_STD

    size = world.cfg.size
    net = _sam_network(cfg, size)
    images = pixels_u8(world)  # normalised per batch: the whole split in float would be 800 MB
    boundary = torch.from_numpy(np.array(world.boundary("train")))
    r = size // (size // PATCH)
    head = nn.Conv2d(cfg["channels"], r * r, 1)
    share = float(boundary[:256].float().mean())
    pos_weight = torch.tensor(min((1 - share) / share, 20.0) ** 0.5)
    opt, sched = _optimiser([*net.parameters(), *head.parameters()], cfg)
    net.train()
    losses = []
    for step, idx, flip in _batches(len(images), cfg):
        x = _normalise(_flip(images[idx], flip).float().div_(255), SAM_MEAN, SAM_STD)
        logits = boundary_logits(head, net(pixel_values=x).last_hidden_state, (size, size))
        loss = F.binary_cross_entropy_with_logits(logits, _flip(boundary[idx], flip).float(), pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.save_pretrained(out)
    return {"final_loss": float(np.mean(losses[-20:]))}


TRAINERS = {"clip": train_clip, "dinov2": train_dinov2, "sam": train_sam}

__all__ = ["ensure_teacher", "build_proxy_teacher", "teacher_config", "teacher_fingerprint", "PRESETS", "KINDS",
           "boundary_logits"]
