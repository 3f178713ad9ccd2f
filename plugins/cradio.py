"""C-RADIO itself as a teacher, through ``transformers`` ``RadioModel`` (distil a RADIO into a
smaller or differently shaped student, or keep a released RADIO in the teacher set).

Targets: summary = ``RadioModel(...).summary`` (the class tokens of ``summary_idxs``
concatenated, e.g. the SigLIP2 and DINOv3 slots of C-RADIOv4) or one chosen class token;
spatial = ``features`` (the patch tokens, no class/register tokens) as a (B, C, h, w) grid.

The model's input conditioner (mean/std buffers) is taken out of the network and declared as
the teacher's ``mean``/``std``, so the framework normalises once per teacher group as for every
other teacher; the features are those of ``RadioModel`` on [0, 1] pixels. CPE positions make any
(H, W) multiple of the patch size valid.

Recipe args::

    model: nvidia/C-RADIOv4-H         # hub id (local HF cache) or a local save_pretrained dir
    pretrained: /data/c-radio-v4-h    # optional: a local directory with the weights
    summary_token: null               # null: the model's own summary; an int: that CLS token
    # tiny: true                      # offline: a small random RadioModel saved and reloaded

Runs at 512 px by default (at most the position grid's ``max_img_size``); ``resolution``
changes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput, hookimpl

from ._hf_loading import hf_network, load_hf_config, resolve_model
from ._teacher_base import teacher_facts
from ._tiny_models import save_tiny_pretrained, tiny_config, tiny_dir

PLUGIN = "cradio"
DEFAULT_RESOLUTION = (512, 512)
MODEL_TYPES = ("radio",)

# Published C-RADIOv4 backbones (model card: -H 631M ViT-H/16, -SO400M 412M), used only when the
# hub's config.json is not in the local HF cache (offline). transformers' RadioConfig defaults are
# the -H model's.
PUBLISHED_CONFIGS = {
    "nvidia/C-RADIOv4-H": dict(model_type="radio", hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                               mlp_ratio=4.0, patch_size=16, max_img_size=2048, num_cls_tokens=3, num_registers=7,
                               summary_idxs=[0, 1]),
    "nvidia/C-RADIOv4-SO400M": dict(model_type="radio", hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                                    mlp_ratio=4304 / 1152, patch_size=16, max_img_size=2048, num_cls_tokens=3,
                                    num_registers=7, summary_idxs=[0, 1]),
}

TINY_CRADIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=16, max_img_size=256,
                   num_cls_tokens=3, num_registers=1, summary_idxs=[0, 1])


class CRadioTeacher(Teacher):
    """A transformers RadioModel with its input conditioner moved out to the framework."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 summary_token: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.input_size = tuple(input_size)
        self.patch_size = int(config.patch_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.summary_token = summary_token
        width = int(config.hidden_size)
        self.summary_dim = width if summary_token is not None else width * len(config.summary_idxs)
        self.spatial_dim = width
        self.resize_mode = "resize"

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        out = self.model(pixel_values=images)
        b, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        spatial = out.features.transpose(1, 2).reshape(b, -1, *grid)
        summary = out.summary if self.summary_token is None else out.last_hidden_state[:, self.summary_token]
        return TeacherOutput(summary=summary, spatial=spatial)


def build_cradio_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                         resolution: Optional[Sequence[int]] = None, summary_token: Optional[int] = None,
                         tiny: Union[bool, dict] = False, cache_dir: Optional[str] = None,
                         meta: bool = False) -> CRadioTeacher:
    """C-RADIO via transformers RadioModel: summary = its summary (or one CLS token), spatial =
    patch features.

    model: hub id (``nvidia/C-RADIOv4-H``, ``nvidia/C-RADIOv4-SO400M``) or a local directory.
    pretrained: optional local weights directory. resolution: (H, W), multiples of the patch
    (default 512). summary_token: index of one class token to use as the summary instead of the
    model's concatenated ``summary``. tiny: a small random RadioModel under ``cache_dir`` (a dict
    overrides ``TINY_CRADIO``). meta: architecture only.
    """
    model = resolve_model(PLUGIN, model, pretrained, tiny, "nvidia/C-RADIOv4-H",
                          lambda o: make_tiny_cradio(tiny_dir(PLUGIN, cache_dir, {**TINY_CRADIO, **o}), **o))
    from transformers import RadioModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, MODEL_TYPES)
    # default 512, or the whole position grid of a smaller model
    size = tuple(resolution) if resolution is not None else tuple(min(s, config.max_img_size) for s in DEFAULT_RESOLUTION)
    patch = int(config.patch_size)
    if size[0] % patch or size[1] % patch:
        raise ValueError(f"{PLUGIN} teacher {model!r}: resolution {size} must be multiples of the patch size {patch}")
    if max(size) > config.max_img_size:
        raise ValueError(f"{PLUGIN} teacher {model!r}: resolution {size} exceeds the position grid's "
                         f"max_img_size {config.max_img_size}")
    if summary_token is not None and not 0 <= summary_token < config.num_cls_tokens:
        raise ValueError(f"{PLUGIN} teacher {model!r}: summary_token {summary_token} is not one of the "
                         f"{config.num_cls_tokens} class tokens")
    net = hf_network(PLUGIN, RadioModel, model, pretrained, config, meta)
    net.make_preprocessor_external()  # the framework normalises with the declared mean/std
    return CRadioTeacher(net, input_size=size, mean=config.norm_mean, std=config.norm_std,
                         summary_token=summary_token).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a C-RADIO teacher, built on the meta device."""
    return teacher_facts(build_cradio_teacher(model, pretrained, meta=True, **kwargs))


def make_tiny_cradio(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random-initialised RadioModel into ``directory`` with ``save_pretrained``
    (unless it is already there); returns ``{"model": dir}``."""
    from transformers import RadioConfig, RadioModel

    cfg = tiny_config(PLUGIN, TINY_CRADIO, overrides)
    return save_tiny_pretrained(directory, seed, lambda: RadioModel(RadioConfig(**cfg)))


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "cradio", build_cradio_teacher)


__all__ = ["CRadioTeacher", "build_cradio_teacher", "describe", "make_tiny_cradio", "PUBLISHED_CONFIGS",
           "TINY_CRADIO"]
