"""SAM's ViTDet image encoder as a teacher, through ``transformers``.

Target (AM-RADIO): spatial = the neck output of SAM's image encoder (256 channels on a 64x64
grid for a 1024px input), what ``SamModel.get_image_embeddings`` returns; no summary target.

SAM runs at one fixed square size (1024 for the published models): the framework resizes the
longest side of the shared crop to it and pads bottom/right (``resize_mode =
"longest_side_pad"``), as SAM's own preprocessing does, and crops the padded part of the output
grid away. Normalisation: SAM's pixel statistics (123.675, 116.28, 103.53) / (58.395, 57.12,
57.375), divided by 255.

Recipe args::

    model: facebook/sam-vit-huge      # HF hub id (local HF cache) or a local SamModel directory
    pretrained: /data/sam-vit-huge    # optional: a local directory with the weights of `model`
    # tiny: true                      # offline: a small random SAM saved and reloaded

Only the vision encoder is loaded (``SamVisionModel``); a full ``SamModel`` checkpoint's prompt
encoder and mask decoder weights are skipped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput, hookimpl

from ._hf_loading import hf_network, load_hf_config, resolve_model
from ._teacher_base import teacher_facts
from ._tiny_models import config_hash, save_tiny_pretrained, tiny_config

PLUGIN = "sam"
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)

# Published vision-encoder configs, used only when the hub's config.json is not in the local HF
# cache (offline).
_COMMON = dict(image_size=1024, patch_size=16, output_channels=256, window_size=14, mlp_ratio=4.0,
               qkv_bias=True, use_abs_pos=True, use_rel_pos=True, layer_norm_eps=1e-6)
PUBLISHED_CONFIGS = {
    "facebook/sam-vit-base": dict(model_type="sam_vision_model", hidden_size=768, num_hidden_layers=12,
                                  num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11], **_COMMON),
    "facebook/sam-vit-large": dict(model_type="sam_vision_model", hidden_size=1024, num_hidden_layers=24,
                                   num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23], **_COMMON),
    "facebook/sam-vit-huge": dict(model_type="sam_vision_model", hidden_size=1280, num_hidden_layers=32,
                                  num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31], **_COMMON),
}

TINY_SAM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
                output_channels=32, window_size=4, global_attn_indexes=[1], mlp_dim=128)


class SamTeacher(Teacher):
    """transformers' SamVisionModel: forward returns the neck output grid."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.input_size = (int(config.image_size), int(config.image_size))
        self.patch_size = int(config.patch_size)
        self.mean, self.std = SAM_MEAN, SAM_STD
        self.summary_dim = None
        self.spatial_dim = int(config.output_channels)
        self.resize_mode = "longest_side_pad"

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        return TeacherOutput(summary=None, spatial=self.model(pixel_values=images).last_hidden_state)


def build_sam_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                      resolution: Optional[Sequence[int]] = None, tiny: Union[bool, dict] = False,
                      cache_dir: Optional[str] = None, meta: bool = False) -> SamTeacher:
    """SAM ViTDet image encoder via transformers: spatial = neck output, no summary.

    model: hub id (``facebook/sam-vit-huge``, ``-large``, ``-base``) or a local SamModel /
    SamVisionModel directory. pretrained: optional local directory holding the weights of the
    architecture `model` names. resolution: must be the model's own size (default) since SAM's
    position and relative-position tables are fixed. tiny: build (once, cached under
    ``cache_dir``) and load a small random SAM (a dict overrides ``TINY_SAM``). meta:
    architecture only, no weights.
    """
    model = resolve_model(PLUGIN, model, pretrained, tiny, "facebook/sam-vit-huge",
                          lambda o: make_tiny_sam(_tiny_dir(cache_dir, o), **o))
    from transformers import SamVisionModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, ("sam_vision_model",),
                            sub_config="vision_config", local_only=meta)
    side = config.image_size
    if resolution is not None and tuple(resolution) != (side, side):
        raise ValueError(f"{PLUGIN} teacher {model!r} runs at its fixed size {side}x{side} (the framework "
                         f"resizes the longest side and pads); resolution {tuple(resolution)} is not "
                         "supported: drop `resolution` for this teacher")
    net = hf_network(PLUGIN, SamVisionModel, model, pretrained, config, meta)
    return SamTeacher(net).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a SAM teacher, built on the meta device."""
    return teacher_facts(build_sam_teacher(model, pretrained, meta=True, **kwargs))


def make_tiny_sam(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random-initialised *full* ``SamModel`` (image encoder, prompt encoder, mask
    decoder: the layout of the hub checkpoints) into ``directory`` with ``save_pretrained``
    (unless it is already there); returns the factory args that load it: ``{"model": dir}``."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    cfg = tiny_config(PLUGIN, TINY_SAM, overrides)

    def build() -> nn.Module:  # SAM initialises position tables to zero: seeded_random draws them all
        channels = cfg["output_channels"]
        prompt = SamPromptEncoderConfig(hidden_size=channels, image_size=cfg["image_size"],
                                        patch_size=cfg["patch_size"], mask_input_channels=4)
        decoder = SamMaskDecoderConfig(hidden_size=channels, num_hidden_layers=1, num_attention_heads=2,
                                       mlp_dim=2 * channels, iou_head_hidden_dim=channels)
        return SamModel(SamConfig(vision_config=SamVisionConfig(**cfg).to_dict(), prompt_encoder_config=prompt.to_dict(),
                                  mask_decoder_config=decoder.to_dict()))

    return save_tiny_pretrained(directory, seed, build)


def _tiny_dir(cache_dir: Optional[str], overrides: dict) -> Path:
    root = Path(os.path.expanduser(cache_dir or "~/.cache/radio_distill/tiny"))
    return root / f"{PLUGIN}-{config_hash({**TINY_SAM, **overrides})}"


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "sam", build_sam_teacher)


__all__ = ["SamTeacher", "build_sam_teacher", "describe", "make_tiny_sam", "PUBLISHED_CONFIGS", "TINY_SAM"]
