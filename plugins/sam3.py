"""SAM3's ViT image encoder as a teacher, through ``transformers``.

SAM3's vision encoder is a plain ViT (patch 14, RoPE, windowed blocks with a global block every
8, tiled absolute positions) followed by a simple FPN neck. Targets, by ``feature``:

* ``backbone`` (default): the ViT's final tokens (1024 channels, 72x72 for 1008 px),
  ``Sam3VisionModel(...).last_hidden_state`` as a grid: what a student must reproduce to stand
  in for SAM3's encoder in front of SAM3's own neck and heads (C-RADIOv4's "drop-in" use);
* ``fpn``: the neck's stride-14 level (256 channels, same grid).

No summary target. Preprocessing as SAM3's processor: resize (squash) to 1008x1008,
mean/std 0.5. ``resolution`` rebuilds the global blocks' RoPE grid for another (H, W) (multiples
of 14); the windowed blocks and the tiled position table need nothing else.

Recipe args::

    model: facebook/sam3              # hub id (local HF cache) or a local Sam3Model /
                                      # Sam3VisionModel save_pretrained directory
    pretrained: /data/sam3            # optional: a local directory with the weights
    feature: backbone                 # or fpn
    # tiny: true                      # offline: a small random SAM3 saved and reloaded

A full ``Sam3Model`` checkpoint (the hub layout, with text encoder and detector) is loaded whole
and only its vision encoder kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput, hookimpl

from ._hf_loading import hf_vision_encoder, load_hf_config, resolve_model
from ._teacher_base import teacher_facts
from ._tiny_models import save_tiny_pretrained, tiny_config, tiny_dir

PLUGIN = "sam3"
SAM3_MEAN = SAM3_STD = (0.5, 0.5, 0.5)
FEATURES = ("backbone", "fpn")

# The published encoder (facebook/sam3; transformers' Sam3ViTConfig defaults), used only when the
# hub's config.json is not in the local HF cache (offline).
PUBLISHED_CONFIGS = {
    "facebook/sam3": dict(model_type="sam3_vision_model", fpn_hidden_size=256, scale_factors=[4.0, 2.0, 1.0, 0.5],
                          backbone_config=dict(model_type="sam3_vit_model", hidden_size=1024, intermediate_size=4736,
                                               num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                                               image_size=1008, window_size=24, global_attn_indexes=[7, 15, 23, 31],
                                               pretrain_image_size=336)),
}

TINY_SAM3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112,
                 window_size=4, global_attn_indexes=[1], pretrain_image_size=56, fpn_hidden_size=16)


class Sam3Teacher(Teacher):
    """transformers' Sam3VisionModel: forward returns the ViT's tokens or the stride-14 FPN level."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int], feature: str = "backbone") -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.input_size = tuple(input_size)
        self.patch_size = int(config.backbone_config.patch_size)
        self.mean, self.std = SAM3_MEAN, SAM3_STD
        self.summary_dim = None
        self.feature = feature
        self.fpn_level = list(config.scale_factors).index(1.0) if feature == "fpn" else None
        self.spatial_dim = int(config.fpn_hidden_size if feature == "fpn" else config.backbone_config.hidden_size)
        self.resize_mode = "resize"

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        out = self.model(pixel_values=images)
        if self.fpn_level is not None:
            return TeacherOutput(summary=None, spatial=out.fpn_hidden_states[self.fpn_level])
        b, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        return TeacherOutput(summary=None, spatial=out.last_hidden_state.transpose(1, 2).reshape(b, -1, *grid))


def build_sam3_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                       resolution: Optional[Sequence[int]] = None, feature: Literal["backbone", "fpn"] = "backbone",
                       tiny: Union[bool, dict] = False, cache_dir: Optional[str] = None,
                       meta: bool = False) -> Sam3Teacher:
    """SAM3 ViT image encoder via transformers: spatial = ViT tokens (or FPN level), no summary.

    model: hub id (``facebook/sam3``) or a local Sam3Model / Sam3VisionModel directory.
    pretrained: optional local weights directory. resolution: (H, W), multiples of the patch
    (default: the config's 1008). feature: ``backbone`` or ``fpn``. tiny: a small random SAM3
    under ``cache_dir`` (a dict overrides ``TINY_SAM3``). meta: architecture only.
    """
    if feature not in FEATURES:
        raise ValueError(f"{PLUGIN} teacher: feature must be one of {', '.join(FEATURES)}, got {feature!r}")
    model = resolve_model(PLUGIN, model, pretrained, tiny, "facebook/sam3",
                          lambda o: make_tiny_sam3(tiny_dir(PLUGIN, cache_dir, {**TINY_SAM3, **o}), **o))
    from transformers import Sam3Model, Sam3VisionModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, ("sam3_vision_model",), sub_config="vision_config")
    backbone = config.backbone_config
    native = backbone.image_size if isinstance(backbone.image_size, (list, tuple)) else (backbone.image_size,) * 2
    size = tuple(resolution) if resolution is not None else tuple(native)
    patch = int(backbone.patch_size)
    if size[0] % patch or size[1] % patch:
        raise ValueError(f"{PLUGIN} teacher {model!r}: resolution {size} must be multiples of the patch size {patch}")
    if size != tuple(native):
        # The global blocks precompute their RoPE positions for the config's grid at build time.
        backbone.image_size = list(size)
    net = hf_vision_encoder(PLUGIN, Sam3VisionModel, Sam3Model, "sam3", model, pretrained, config, meta)
    return Sam3Teacher(net, input_size=size, feature=feature).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a SAM3 teacher, built on the meta device."""
    return teacher_facts(build_sam3_teacher(model, pretrained, meta=True, **kwargs))


def make_tiny_sam3(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random *full* ``Sam3Model`` (ViT + neck, CLIP text encoder, DETR detector,
    mask decoder: the hub layout) into ``directory`` with ``save_pretrained`` (unless it is already
    there); returns ``{"model": dir}``."""
    from transformers import Sam3Config, Sam3Model, Sam3VisionConfig, Sam3ViTConfig

    cfg = tiny_config(PLUGIN, TINY_SAM3, overrides)

    def build() -> nn.Module:
        vit_cfg = dict(cfg)
        fpn = vit_cfg.pop("fpn_hidden_size")
        side = vit_cfg["image_size"]
        vit = Sam3ViTConfig(patch_size=14, **vit_cfg)
        vision = Sam3VisionConfig(backbone_config=vit.to_dict(), fpn_hidden_size=fpn,
                                  backbone_feature_sizes=[[side // 14 * 4] * 2, [side // 14 * 2] * 2, [side // 14] * 2])
        small = dict(hidden_size=fpn, num_layers=1, num_attention_heads=2, intermediate_size=2 * fpn)
        text = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=fpn, intermediate_size=2 * fpn,
                    projection_dim=fpn, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
        return Sam3Model(Sam3Config(vision_config=vision.to_dict(), text_config=text, geometry_encoder_config=small,
                                    detr_encoder_config=small, detr_decoder_config=small,
                                    mask_decoder_config=dict(hidden_size=fpn, num_upsampling_stages=3)))

    return save_tiny_pretrained(directory, seed, build)


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "sam3", build_sam3_teacher)


__all__ = ["Sam3Teacher", "build_sam3_teacher", "describe", "make_tiny_sam3", "PUBLISHED_CONFIGS", "TINY_SAM3"]
