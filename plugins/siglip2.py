"""SigLIP2 teachers through ``open_clip_torch`` (C-RADIOv4's language-aligned teacher).

open_clip 3.x ships SigLIP2 as timm image towers (no class token, attention-pool ``map`` head,
no extra projection) beside a text tower with SigLIP2's options (no causal mask, last-token
pooling, biased projection). The targets are those of the ``clip`` teacher plugin, which this
plugin builds through the registry (as any recipe would) and wraps:

* summary = ``model.encode_image(x)`` unnormalised: the attention-pool output, the embedding
  the text tower shares (zero-shot);
* spatial = every token of the trunk after its final norm, as a (B, C, h, w) grid.

C-RADIOv4 distils SigLIP2-g-384 (``ViT-gopt-16-SigLIP2-384`` / ``webli``: width 1536, 40 blocks,
patch 16, 24x24 grid at 384 px) at its native 384 px and upsamples its features (the report uses
FeatSharp; ``upsample_to`` here is plain bilinear interpolation, the paper's AM-RADIO fallback,
since FeatSharp's trained upsampler is not an installable library).

Recipe args::

    model: ViT-gopt-16-SigLIP2-384    # any open_clip SigLIP2 name (default), or a config JSON
    pretrained: webli                 # open_clip tag (default for hub names) or a local file
    upsample_to: 72                   # optional: bilinear upsampling of the spatial grid
    text: false                       # free the text tower in training runs
    # tiny: true                      # offline: a small random SigLIP2 saved and reloaded
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from radio_core import Teacher, TeacherOutput, get_registry, hookimpl

from ._teacher_base import teacher_facts
from ._tiny_models import (config_hash, register_tiny_timm_models, save_tiny_open_clip, tiny_config, tiny_dir, tiny_siglip_config)

PLUGIN = "siglip2"
DEFAULT_MODEL, DEFAULT_TAG = "ViT-gopt-16-SigLIP2-384", "webli"

#: Tiny SigLIP2: the tiny SigLIP-like timm trunk (64 wide, 2 blocks, patch 16, ``map`` pool) and
#: a tiny text tower with SigLIP2's text options; open_clip's BPE tokenizer stands in for
#: SigLIP2's Gemma tokenizer (which needs a download).
TINY_SIGLIP2 = dict(text_width=32, text_layers=1, text_heads=2, context_length=16)


class Siglip2Teacher(Teacher):
    """The ``clip`` plugin's open_clip teacher for a SigLIP2 model, with optional bilinear
    upsampling of the spatial grid; ``encode_text``/``tokenizer`` are the wrapped teacher's."""

    def __init__(self, clip: Teacher, upsample_to: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.clip = clip
        for attr in ("input_size", "patch_size", "mean", "std", "summary_dim", "spatial_dim", "resize_mode"):
            setattr(self, attr, getattr(clip, attr))
        self.upsample_to = upsample_to

    @property
    def model(self):
        return self.clip.model

    @property
    def has_text(self) -> bool:
        return self.clip.has_text

    @property
    def tokenizer(self):
        return self.clip.tokenizer

    def encode_text(self, texts) -> Tensor:
        return self.clip.encode_text(texts)

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        out = self.clip(images)
        if self.upsample_to is not None and tuple(self.upsample_to) != out.grid:
            spatial = F.interpolate(out.spatial, size=self.upsample_to, mode="bilinear", align_corners=False)
            out = TeacherOutput(summary=out.summary, spatial=spatial)
        return out


def build_siglip2_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                          resolution: Optional[Sequence[int]] = None,
                          upsample_to: Optional[Union[int, Sequence[int]]] = None,
                          tiny: Union[bool, dict] = False, cache_dir: Optional[str] = None, meta: bool = False,
                          text: bool = True) -> Siglip2Teacher:
    """SigLIP2 via open_clip: summary = encode_image (attention pool), spatial = trunk tokens.

    model: an open_clip SigLIP2 name (default ``ViT-gopt-16-SigLIP2-384``) or a model-config JSON
    path. pretrained: open_clip tag (default ``webli`` for the published names) or a local
    checkpoint file. resolution: (H, W) to run at (default native; the position grid is
    resampled once at load by open_clip/timm). upsample_to: output grid (h, w) or one int.
    tiny: a small random SigLIP2 written under ``cache_dir`` (a dict overrides ``TINY_SIGLIP2``).
    meta: architecture only. text: keep the text tower (zero-shot).
    """
    if tiny or isinstance(tiny, dict):
        if model is not None or pretrained is not None:
            raise ValueError(f"{PLUGIN} teacher: give either tiny or model/pretrained, not both")
        overrides = dict(tiny) if isinstance(tiny, dict) else {}
        spec = make_tiny_siglip2(tiny_dir(PLUGIN, cache_dir, {**TINY_SIGLIP2, **overrides}), **overrides)
        model, pretrained = spec["model"], spec["pretrained"]
    model = model or DEFAULT_MODEL
    if not model.endswith(".json") and "SigLIP2" not in model:
        raise ValueError(f"{PLUGIN} teacher: {model!r} is not an open_clip SigLIP2 model (names contain "
                         f"'SigLIP2', e.g. {DEFAULT_MODEL!r}); use the clip plugin for other CLIP models")
    if pretrained is None and not model.endswith(".json"):
        pretrained = DEFAULT_TAG  # also on the meta device: the tag carries mean/std
    clip = get_registry().build("teacher", "clip", model=model, pretrained=pretrained, resolution=resolution,
                                meta=meta, text=text)
    if upsample_to is not None:
        upsample_to = tuple(upsample_to) if isinstance(upsample_to, (list, tuple)) else (upsample_to, upsample_to)
    return Siglip2Teacher(clip, upsample_to=upsample_to).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a SigLIP2 teacher, built on the meta device."""
    return teacher_facts(build_siglip2_teacher(model, pretrained, meta=True, **kwargs))


def make_tiny_siglip2(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random SigLIP2-shaped open_clip model into ``directory`` (unless already
    there): ``<name>.json`` (an open_clip config with SigLIP2's text options) and
    ``open_clip_pytorch_model.bin``. Returns ``{"model": <json>, "pretrained": <checkpoint>}``."""
    register_tiny_timm_models()
    cfg = tiny_config(PLUGIN, TINY_SIGLIP2, overrides)
    # SigLIP2's text options as open_clip's SigLIP2 configs spell them
    model_cfg = tiny_siglip_config({
        "context_length": cfg["context_length"], "vocab_size": 49408, "width": cfg["text_width"],
        "heads": cfg["text_heads"], "layers": cfg["text_layers"], "no_causal_mask": True, "proj_bias": True,
        "pool_type": "last", "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}})
    # (open_clip picks the Gemma tokenizer, a download, for names containing "siglip")
    return save_tiny_open_clip(directory, f"radio-tiny-sl2-{config_hash({**cfg, 'seed': seed})}", model_cfg, seed)


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "siglip2", build_siglip2_teacher)


__all__ = ["Siglip2Teacher", "build_siglip2_teacher", "describe", "make_tiny_siglip2", "TINY_SIGLIP2"]
