"""Tiny random models written once to disk, for offline tests and quickstarts: transformers
models (``save_pretrained``) and open_clip models, with deterministic weights
(``seeded_random``) cached by config fingerprint (``tiny_dir``).

Not a plugin (no entry point): teacher plugins import it as ``radio_plugins._tiny_models``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


TINY_CACHE = "~/.cache/radio_distill/tiny"


def tiny_dir(plugin: str, cache_dir: Optional[str], cfg: dict) -> Path:
    """Where a tiny model of ``plugin`` with config ``cfg`` is cached."""
    root = Path(os.path.expanduser(cache_dir or TINY_CACHE))
    return root / f"{plugin}-{config_hash(cfg)}"


def write_atomically(directory: Path, write) -> None:
    """Fill a temporary sibling directory, then rename it into place (a concurrent writer of the
    same content may win; its copy is kept)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def randomize_(model: nn.Module, seed: int) -> None:
    """Deterministic random weights for a tiny test model: fan-in scaled normals for matrices,
    1 + noise for parameters initialised to ones (norm scales, layer scales), small noise else."""
    gen = torch.Generator().manual_seed(seed)
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                owner = owners.get(id(p))
                fan_in = p[0].numel() if isinstance(owner, (nn.Linear, nn.Conv2d)) else p.shape[-1]
                p.copy_(noise / fan_in ** 0.5)
            elif p.numel() and bool((p == 1).all()):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)



def tiny_config(plugin: str, defaults: dict, overrides: dict) -> dict:
    """A tiny model's config: ``defaults`` with ``overrides``, refusing keys it does not have."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"{plugin} tiny: unknown options {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **overrides}


def seeded_random(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` under ``seed`` (the global RNG left as it was), then every parameter drawn by
    ``randomize_``: libraries initialise some tables to zero, which would hide layout errors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build()
    randomize_(net, seed)
    return net


def save_tiny_pretrained(directory: Union[str, Path], seed: int, build: Callable[[], nn.Module]) -> dict:
    """A tiny random transformers model written with ``save_pretrained`` into ``directory``
    (atomically; nothing is built when it is already there). Returns the factory args that load
    it: ``{"model": dir}``."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        write_atomically(directory, lambda tmp: seeded_random(build, seed).save_pretrained(tmp))
    return {"model": str(directory)}


# --------------------------------------------------------------------------- open_clip tiny models

#: the tiny open_clip models' weights: safetensors (open_clip reads them), never a pickle
OPEN_CLIP_CHECKPOINT = "open_clip_model.safetensors"
#: a tiny SigLIP-like timm trunk (no class token, attention-pool head) for offline tests
TINY_SIGLIP_TIMM_MODEL = "radio_tiny_siglip_patch16_64"


def tiny_siglip_config(text_cfg: dict) -> dict:
    """An open_clip config of a tiny SigLIP-like model around ``text_cfg``. As open_clip's SigLIP
    configs: a timm trunk (``TINY_SIGLIP_TIMM_MODEL``) with 'map' pooling and no extra
    projection, so the embedding width is the trunk width, and a ``CustomTextCLIP``."""
    vision = {"image_size": 64, "timm_model_name": TINY_SIGLIP_TIMM_MODEL, "timm_model_pretrained": False,
              "timm_pool": "map", "timm_proj": "none"}
    return {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True, "vision_cfg": vision, "text_cfg": text_cfg}


def save_tiny_open_clip(directory: Union[str, Path], name: str, model_cfg: dict, seed: int) -> dict:
    """A tiny random open_clip model as open_clip stores one: ``<name>.json`` (its model config)
    and its state dict in ``OPEN_CLIP_CHECKPOINT``, written atomically into ``directory`` (nothing
    is built when both are there). ``model_cfg["custom_text"]`` picks ``CustomTextCLIP``, as
    open_clip's own ``create_model`` does. Returns the factory args that load it:
    ``{"model": <config json>, "pretrained": <checkpoint>}``."""
    import open_clip

    directory = Path(directory)
    from radio_core import safetensors_from_legacy_pickle
    from safetensors.torch import save_file

    spec = {"model": str(directory / f"{name}.json"), "pretrained": str(directory / OPEN_CLIP_CHECKPOINT)}
    safetensors_from_legacy_pickle(directory / "open_clip_pytorch_model.bin", directory / OPEN_CLIP_CHECKPOINT)
    if (directory / OPEN_CLIP_CHECKPOINT).is_file() and Path(spec["model"]).is_file():
        return spec

    def write(tmp: Path) -> None:
        (tmp / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
        # (the config is registered with open_clip only when loaded, from its final location)
        kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        model_cls = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
        state = seeded_random(lambda: model_cls(**kwargs), seed).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / OPEN_CLIP_CHECKPOINT))

    write_atomically(directory, write)
    return spec


def register_tiny_timm_models() -> None:
    """Register the tiny SigLIP-like timm trunk (idempotent)."""
    import timm
    from timm.models import register_model

    if TINY_SIGLIP_TIMM_MODEL in timm.list_models(TINY_SIGLIP_TIMM_MODEL):
        return

    def radio_tiny_siglip_patch16_64(pretrained: bool = False, **kwargs):
        from timm.models.vision_transformer import VisionTransformer

        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False,
                    global_pool="map")
        return VisionTransformer(**{**args, **kwargs})

    radio_tiny_siglip_patch16_64.__module__ = __name__
    register_model(radio_tiny_siglip_patch16_64)
