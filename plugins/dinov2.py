"""DINOv2 teachers (ViT-S/B/L/g, with or without registers) through ``transformers``.

Targets (AM-RADIO): summary = the CLS token after the final layernorm
(``last_hidden_state[:, 0]``); spatial = the patch tokens of ``last_hidden_state`` (registers
excluded) as a (B, C, h, w) grid. Other resolutions than the position grid's use the model's
own bicubic position interpolation (``Dinov2Embeddings.interpolate_pos_encoding``).

Recipe args::

    model: facebook/dinov2-giant      # HF hub id (read from the local HF cache), or a local
                                      # save_pretrained directory
    pretrained: /data/dinov2-giant    # optional: a local directory with the weights of `model`
    upsample_to: 32                   # optional: bilinearly upsample the output grid
    # tiny: true                      # offline: a small random DINOv2 saved and reloaded

The teacher runs at 224 by default (the published preprocessing's crop size, and the paper's
setting "run DINOv2 at 224 and upsample"); ``resolution`` in the recipe changes it.

"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

from radio_core import hookimpl

from ._hf_loading import hf_network, load_hf_config, resolve_model
from ._teacher_base import IMAGENET_MEAN, IMAGENET_STD, ClsTokenViTTeacher, grid_size, teacher_facts  # noqa: F401
from ._tiny_models import config_hash, save_tiny_pretrained, tiny_config

PLUGIN = "dinov2"
DEFAULT_RESOLUTION = (224, 224)
MODEL_TYPES = ("dinov2", "dinov2_with_registers")

# Published configs of the hub models, used only when the hub's config.json is not in the local
# HF cache (offline): enough to build the architecture (meta device), or to load a local copy
# of the weights given as `pretrained`.
_COMMON = dict(patch_size=14, image_size=518, mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0,
               qkv_bias=True, hidden_act="gelu")
_SIZES = {"small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
          "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
          "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
          "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True)}
PUBLISHED_CONFIGS = {
    **{f"facebook/dinov2-{k}": dict(model_type="dinov2", **_COMMON, **v) for k, v in _SIZES.items()},
    **{f"facebook/dinov2-with-registers-{k}": dict(model_type="dinov2_with_registers", num_register_tokens=4,
                                                   **_COMMON, **v) for k, v in _SIZES.items()},
}

TINY_DINOV2 = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=224,
                   mlp_ratio=4, registers=0)


class Dinov2Teacher(ClsTokenViTTeacher):
    """A transformers Dinov2Model / Dinov2WithRegistersModel."""

    PLUGIN = PLUGIN

    def __init__(self, model: nn.Module, input_size: tuple[int, int],
                 upsample_to: Optional[tuple[int, int]] = None, layer: Optional[int] = None) -> None:
        super().__init__(model, input_size, int(getattr(model.config, "num_register_tokens", 0) or 0),
                         upsample_to, layer)

    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def final_norm(self) -> nn.Module:
        return self.model.layernorm


def build_dinov2_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                         resolution: Optional[Sequence[int]] = None,
                         upsample_to: Optional[Union[int, Sequence[int]]] = None,
                         layer: Optional[int] = None, tiny: Union[bool, dict] = False,
                         cache_dir: Optional[str] = None, meta: bool = False) -> Dinov2Teacher:
    """DINOv2 via transformers: summary = CLS after the final norm, spatial = patch tokens.

    model: hub id (``facebook/dinov2-giant``, ``facebook/dinov2-with-registers-giant``, small /
    base / large) or a local directory. pretrained: optional local directory holding the
    weights of the architecture `model` names. resolution: (H, W) to run at (default 224).
    layer: intermediate-layer target: the tokens after block ``layer`` (1-based; negative from the
    end), through the model's final norm, instead of the last block's (one more teacher entry
    in the recipe, with ``student_layer`` naming the student block that learns it).
    upsample_to: output grid (h, w) (or one int) to bilinearly upsample the spatial target to.
    tiny: build (once, cached under ``cache_dir``) and load a small random DINOv2 (a dict
    overrides ``TINY_DINOV2``; ``registers: 4`` gives the with-registers model). meta:
    architecture only, no weights.
    """
    model = resolve_model(PLUGIN, model, pretrained, tiny, "facebook/dinov2-giant",
                          lambda o: make_tiny_dinov2(_tiny_dir(cache_dir, o), **o))
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, MODEL_TYPES, local_only=meta)
    model_cls = Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model
    net = hf_network(PLUGIN, model_cls, model, pretrained, config, meta)
    size = tuple(resolution) if resolution is not None else DEFAULT_RESOLUTION
    return Dinov2Teacher(net, input_size=size, upsample_to=grid_size(upsample_to), layer=layer).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a DINOv2 teacher, built on the meta device."""
    return teacher_facts(build_dinov2_teacher(model, pretrained, meta=True, **kwargs))


# --------------------------------------------------------------------------- tiny models


def make_tiny_dinov2(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random-initialised DINOv2 into ``directory`` with ``save_pretrained``
    (unless it is already there); returns the factory args that load it: ``{"model": dir}``."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = tiny_config(PLUGIN, TINY_DINOV2, overrides)
    registers = cfg.pop("registers")

    def build() -> nn.Module:
        if registers:
            return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **cfg))
        return Dinov2Model(Dinov2Config(**cfg))

    return save_tiny_pretrained(directory, seed, build)


def _tiny_dir(cache_dir: Optional[str], overrides: dict) -> Path:
    root = Path(os.path.expanduser(cache_dir or "~/.cache/radio_distill/tiny"))
    return root / f"{PLUGIN}-{config_hash({**TINY_DINOV2, **overrides})}"


# --------------------------------------------------------------------------- transformers loading


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "dinov2", build_dinov2_teacher)


__all__ = ["Dinov2Teacher", "build_dinov2_teacher", "describe", "make_tiny_dinov2", "PUBLISHED_CONFIGS",
           "TINY_DINOV2"]
