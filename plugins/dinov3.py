"""DINOv3 ViT teachers (S/B/L/H+/7B, patch 16, 4 registers, RoPE) through ``transformers``.

Targets, as for DINOv2: summary = the CLS token after the final layernorm
(``last_hidden_state[:, 0]``, what ``pooler_output`` returns); spatial = the patch tokens of
``last_hidden_state`` (registers excluded) as a (B, C, h, w) grid. DINOv3 positions are RoPE on
normalised patch-centre coordinates, so any H, W that are multiples of 16 run without resampling
a table (the training-time coordinate jitter is off in eval mode, where a teacher always is).

Recipe args::

    model: facebook/dinov3-vit7b16-pretrain-lvd1689m   # hub id (local HF cache) or a local
                                                       # save_pretrained directory
    pretrained: /data/dinov3-vit7b16                   # optional: local weights of `model`
    upsample_to: 64                                    # optional: bilinear upsampling of the grid
    # tiny: true                                       # offline: a small random DINOv3

Runs at 224 by default (the published preprocessing's size); ``resolution`` changes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

from radio_core import hookimpl

from ._hf_loading import hf_network, load_hf_config, resolve_model
from ._teacher_base import ClsTokenViTTeacher, grid_size, teacher_facts
from ._tiny_models import save_tiny_pretrained, tiny_config, tiny_dir

PLUGIN = "dinov3"
DEFAULT_RESOLUTION = (224, 224)
MODEL_TYPES = ("dinov3_vit",)

# Published architectures (DINOv3 paper, Table of model sizes; hub configs), used only when the
# hub's config.json is not in the local HF cache (offline): enough to build the architecture on
# the meta device or to load a local copy of the weights given as `pretrained`.
_COMMON = dict(model_type="dinov3_vit", patch_size=16, num_register_tokens=4, layer_norm_eps=1e-5,
               rope_theta=100.0, image_size=224, key_bias=False, pos_embed_rescale=2.0)
PUBLISHED_CONFIGS = {
    "facebook/dinov3-vits16-pretrain-lvd1689m": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                                     num_attention_heads=6, **_COMMON),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                     num_attention_heads=12, **_COMMON),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                     num_attention_heads=16, **_COMMON),
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": dict(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         use_gated_mlp=True, hidden_act="silu", **_COMMON),
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": dict(hidden_size=4096, intermediate_size=8192, num_hidden_layers=40,
                                                      num_attention_heads=32, use_gated_mlp=True, hidden_act="silu",
                                                      layerscale_value=1e-5, **_COMMON),
}

TINY_DINOV3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                   image_size=224, num_register_tokens=4, use_gated_mlp=False)


class Dinov3Teacher(ClsTokenViTTeacher):
    """A transformers DINOv3ViTModel."""

    PLUGIN = PLUGIN

    def __init__(self, model: nn.Module, input_size: tuple[int, int],
                 upsample_to: Optional[tuple[int, int]] = None, layer: Optional[int] = None) -> None:
        super().__init__(model, input_size, int(model.config.num_register_tokens or 0), upsample_to, layer)

    def blocks(self) -> nn.ModuleList:
        return self.model.model.layer

    def final_norm(self) -> nn.Module:
        return self.model.norm


def build_dinov3_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                         resolution: Optional[Sequence[int]] = None,
                         upsample_to: Optional[Union[int, Sequence[int]]] = None,
                         layer: Optional[int] = None, tiny: Union[bool, dict] = False,
                         cache_dir: Optional[str] = None, meta: bool = False) -> Dinov3Teacher:
    """DINOv3 via transformers: summary = CLS after the final norm, spatial = patch tokens.

    model: hub id (``facebook/dinov3-vit7b16-pretrain-lvd1689m``, ``-vitl16-``, ``-vith16plus-``,
    ...) or a local directory. pretrained: optional local directory with the weights of `model`.
    resolution: (H, W), multiples of 16 (default 224). upsample_to: output grid (h, w) or one int.
    tiny: a small random DINOv3 written under ``cache_dir`` (a dict overrides ``TINY_DINOV3``).
    meta: architecture only, no weights.
    """
    model = resolve_model(PLUGIN, model, pretrained, tiny, "facebook/dinov3-vit7b16-pretrain-lvd1689m",
                          lambda o: make_tiny_dinov3(tiny_dir(PLUGIN, cache_dir, {**TINY_DINOV3, **o}), **o))
    from transformers import DINOv3ViTModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, MODEL_TYPES)
    size = tuple(resolution) if resolution is not None else DEFAULT_RESOLUTION
    patch = int(config.patch_size)
    if size[0] % patch or size[1] % patch:
        raise ValueError(f"{PLUGIN} teacher {model!r}: resolution {size} must be multiples of the patch size {patch}")
    net = hf_network(PLUGIN, DINOv3ViTModel, model, pretrained, config, meta)
    return Dinov3Teacher(net, input_size=size, upsample_to=grid_size(upsample_to), layer=layer).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a DINOv3 teacher, built on the meta device."""
    return teacher_facts(build_dinov3_teacher(model, pretrained, meta=True, **kwargs))


def make_tiny_dinov3(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random-initialised DINOv3 into ``directory`` with ``save_pretrained`` (unless
    it is already there); returns ``{"model": dir}``."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = tiny_config(PLUGIN, TINY_DINOV3, overrides)
    return save_tiny_pretrained(directory, seed, lambda: DINOv3ViTModel(DINOv3ViTConfig(**cfg)))


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "dinov3", build_dinov3_teacher)


__all__ = ["Dinov3Teacher", "build_dinov3_teacher", "describe", "make_tiny_dinov3", "PUBLISHED_CONFIGS", "TINY_DINOV3"]
