"""SAM2 / SAM2.1 Hiera image encoders as teachers, through ``transformers``.

Target: spatial = the stride-16 level of the image encoder's FPN neck (256 channels, 64x64 for a
1024 px input): ``Sam2VisionModel(...).fpn_hidden_states[-1]``, the image embedding SAM2's mask
decoder attends to (``Sam2Model.get_image_embeddings`` adds only a constant "no memory"
vector to it); no summary target.

Preprocessing as SAM2's own processor: the crop is resized (squashed) to a square 1024x1024,
ImageNet mean/std; Hiera's position embedding is resampled bicubically by the model for other
sizes, so ``resolution`` may be any (H, W) that are multiples of 32 (the encoder's stride).

Recipe args::

    model: facebook/sam2.1-hiera-large   # hub id (local HF cache) or a local Sam2Model /
                                         # Sam2VisionModel save_pretrained directory
    pretrained: /data/sam2.1-hiera-large # optional: a local directory with the weights
    # tiny: true                         # offline: a small random SAM2 saved and reloaded

A full ``Sam2Model`` checkpoint (the hub layout) is loaded whole and only its vision encoder kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput, hookimpl

from ._hf_loading import hf_vision_encoder, load_hf_config, resolve_model
from ._teacher_base import teacher_facts
from ._tiny_models import save_tiny_pretrained, tiny_config, tiny_dir

PLUGIN = "sam2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 32


def _hiera(hidden: int, blocks: list, global_blocks: list, windows: list, background: list) -> dict:
    dims = [hidden * 2 ** i for i in range(4)]
    heads = 1 if hidden < 112 else 2  # doubled at every stage
    return dict(model_type="sam2_vision_model", fpn_hidden_size=256, backbone_channel_list=dims[::-1],
                backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=hidden, num_attention_heads=heads,
                                     blocks_per_stage=blocks, embed_dim_per_stage=dims,
                                     num_attention_heads_per_stage=[heads * 2 ** i for i in range(4)],
                                     global_attention_blocks=global_blocks, window_size_per_stage=windows,
                                     window_positional_embedding_background_size=background))


# Published SAM2.1 image encoders (the SAM2 release's Hiera configs), used only when the hub's
# config.json is not in the local HF cache (offline).
PUBLISHED_CONFIGS = {
    "facebook/sam2.1-hiera-tiny": _hiera(96, [1, 2, 7, 2], [5, 7, 9], [8, 4, 14, 7], [7, 7]),
    "facebook/sam2.1-hiera-small": _hiera(96, [1, 2, 11, 2], [7, 10, 13], [8, 4, 14, 7], [7, 7]),
    "facebook/sam2.1-hiera-base-plus": _hiera(112, [2, 3, 16, 3], [12, 16, 20], [8, 4, 14, 7], [14, 14]),
    "facebook/sam2.1-hiera-large": _hiera(144, [2, 6, 36, 4], [23, 33, 43], [8, 4, 16, 8], [7, 7]),
}
for _name in list(PUBLISHED_CONFIGS):
    PUBLISHED_CONFIGS[_name.replace("sam2.1-", "sam2-")] = PUBLISHED_CONFIGS[_name]

TINY_SAM2 = dict(hidden_size=16, blocks_per_stage=[1, 1, 2, 1], global_attention_blocks=[3],
                 window_size_per_stage=[4, 2, 2, 2], image_size=128, fpn_hidden_size=32)


class Sam2Teacher(Teacher):
    """transformers' Sam2VisionModel: forward returns the stride-16 FPN level."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.input_size = tuple(input_size)
        self.patch_size = 16  # output stride of the target level
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.summary_dim = None
        self.spatial_dim = int(model.config.fpn_hidden_size)
        self.resize_mode = "resize"

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        return TeacherOutput(summary=None, spatial=self.model(pixel_values=images).fpn_hidden_states[-1])


def build_sam2_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                       resolution: Optional[Sequence[int]] = None, tiny: Union[bool, dict] = False,
                       cache_dir: Optional[str] = None, meta: bool = False) -> Sam2Teacher:
    """SAM2 Hiera image encoder via transformers: spatial = stride-16 FPN level, no summary.

    model: hub id (``facebook/sam2.1-hiera-large``, ``-base-plus``, ``-small``, ``-tiny``) or a
    local Sam2Model / Sam2VisionModel directory. pretrained: optional local weights directory.
    resolution: (H, W), multiples of 32 (default: the config's image size, 1024). tiny: a small
    random SAM2 under ``cache_dir`` (a dict overrides ``TINY_SAM2``). meta: architecture only.
    """
    model = resolve_model(PLUGIN, model, pretrained, tiny, "facebook/sam2.1-hiera-large",
                          lambda o: make_tiny_sam2(tiny_dir(PLUGIN, cache_dir, {**TINY_SAM2, **o}), **o))
    from transformers import Sam2Model, Sam2VisionModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, ("sam2_vision_model",), sub_config="vision_config")
    native = config.backbone_config.image_size
    size = tuple(resolution) if resolution is not None else tuple(native)
    if size[0] % STRIDE or size[1] % STRIDE:
        raise ValueError(f"{PLUGIN} teacher {model!r}: resolution {size} must be multiples of {STRIDE} "
                         "(the Hiera encoder's output stride)")
    net = hf_vision_encoder(PLUGIN, Sam2VisionModel, Sam2Model, "sam2", model, pretrained, config, meta)
    return Sam2Teacher(net, input_size=size).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a SAM2 teacher, built on the meta device."""
    return teacher_facts(build_sam2_teacher(model, pretrained, meta=True, **kwargs))


def make_tiny_sam2(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random *full* ``Sam2Model`` (Hiera encoder + FPN neck, prompt encoder, mask
    decoder: the hub layout) into ``directory`` with ``save_pretrained`` (unless it is already
    there); returns ``{"model": dir}``."""
    from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2Model,
                              Sam2PromptEncoderConfig, Sam2VisionConfig)

    cfg = tiny_config(PLUGIN, TINY_SAM2, overrides)

    def build() -> nn.Module:
        hidden, side, fpn = cfg["hidden_size"], cfg["image_size"], cfg["fpn_hidden_size"]
        dims = [hidden * 2 ** i for i in range(4)]
        hiera = Sam2HieraDetConfig(hidden_size=hidden, num_attention_heads=1, image_size=[side, side],
                                   blocks_per_stage=cfg["blocks_per_stage"], embed_dim_per_stage=dims,
                                   num_attention_heads_per_stage=[1, 1, 2, 2],
                                   window_size_per_stage=cfg["window_size_per_stage"],
                                   global_attention_blocks=cfg["global_attention_blocks"],
                                   window_positional_embedding_background_size=[4, 4])
        sizes = [[side // s, side // s] for s in (4, 8, 16)]
        vision = Sam2VisionConfig(backbone_config=hiera.to_dict(), backbone_channel_list=dims[::-1],
                                  fpn_hidden_size=fpn, backbone_feature_sizes=sizes)
        prompt = Sam2PromptEncoderConfig(hidden_size=fpn, image_size=side, patch_size=16)
        decoder = Sam2MaskDecoderConfig(hidden_size=fpn, num_hidden_layers=1, num_attention_heads=2,
                                        mlp_dim=2 * fpn, iou_head_hidden_dim=fpn)
        return Sam2Model(Sam2Config(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                                    mask_decoder_config=decoder.to_dict()))

    return save_tiny_pretrained(directory, seed, build)


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "sam2", build_sam2_teacher)


__all__ = ["Sam2Teacher", "build_sam2_teacher", "describe", "make_tiny_sam2", "PUBLISHED_CONFIGS", "TINY_SAM2"]
