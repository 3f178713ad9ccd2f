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

The helpers ``load_hf_config`` / ``hf_from_pretrained`` are shared with the SAM plugin.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput, hookimpl

from .clip import config_hash, randomize_, teacher_facts, write_atomically

PLUGIN = "dinov2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


class Dinov2Teacher(Teacher):
    """A transformers Dinov2Model / Dinov2WithRegistersModel."""

    def __init__(self, model: nn.Module, input_size: tuple[int, int],
                 upsample_to: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.num_registers = int(getattr(config, "num_register_tokens", 0) or 0)
        self.input_size = tuple(input_size)
        self.patch_size = int(config.patch_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.summary_dim = self.spatial_dim = int(config.hidden_size)
        self.resize_mode = "resize"
        self.upsample_to = upsample_to

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        tokens = self.model(pixel_values=images).last_hidden_state  # after the final layernorm
        b, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        patches = tokens[:, 1 + self.num_registers:]
        spatial = patches.transpose(1, 2).reshape(b, -1, h, w)
        if self.upsample_to is not None and tuple(self.upsample_to) != (h, w):
            spatial = F.interpolate(spatial, size=self.upsample_to, mode="bilinear", align_corners=False)
        return TeacherOutput(summary=tokens[:, 0], spatial=spatial)


def build_dinov2_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                         resolution: Optional[Sequence[int]] = None,
                         upsample_to: Optional[Union[int, Sequence[int]]] = None,
                         tiny: Union[bool, dict] = False, cache_dir: Optional[str] = None,
                         meta: bool = False) -> Dinov2Teacher:
    """DINOv2 via transformers: summary = CLS after the final norm, spatial = patch tokens.

    model: hub id (``facebook/dinov2-giant``, ``facebook/dinov2-with-registers-giant``, small /
    base / large) or a local directory. pretrained: optional local directory holding the
    weights of the architecture `model` names. resolution: (H, W) to run at (default 224).
    upsample_to: output grid (h, w) (or one int) to bilinearly upsample the spatial target to.
    tiny: build (once, cached under ``cache_dir``) and load a small random DINOv2 (a dict
    overrides ``TINY_DINOV2``; ``registers: 4`` gives the with-registers model). meta:
    architecture only, no weights.
    """
    model = resolve_model(PLUGIN, model, pretrained, tiny, "facebook/dinov2-giant",
                          lambda o: make_tiny_dinov2(_tiny_dir(cache_dir, o), **o))
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config = load_hf_config(PLUGIN, model, PUBLISHED_CONFIGS, MODEL_TYPES)
    model_cls = Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model
    net = hf_network(PLUGIN, model_cls, model, pretrained, config, meta)
    size = tuple(resolution) if resolution is not None else DEFAULT_RESOLUTION
    if upsample_to is not None:
        upsample_to = tuple(upsample_to) if isinstance(upsample_to, (list, tuple)) else (upsample_to, upsample_to)
    return Dinov2Teacher(net, input_size=size, upsample_to=upsample_to).freeze()


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a DINOv2 teacher, built on the meta device."""
    return teacher_facts(build_dinov2_teacher(model, pretrained, meta=True, **kwargs))


# --------------------------------------------------------------------------- tiny models


def make_tiny_dinov2(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random-initialised DINOv2 into ``directory`` with ``save_pretrained``
    (unless it is already there); returns the factory args that load it: ``{"model": dir}``."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    unknown = set(overrides) - set(TINY_DINOV2)
    if unknown:
        raise ValueError(f"{PLUGIN} tiny: unknown options {sorted(unknown)}; known: {sorted(TINY_DINOV2)}")
    cfg = {**TINY_DINOV2, **overrides}
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        registers = cfg.pop("registers")

        def write(tmp: Path) -> None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if registers:
                    net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **cfg))
                else:
                    net = Dinov2Model(Dinov2Config(**cfg))
            randomize_(net, seed)
            net.save_pretrained(tmp)

        write_atomically(directory, write)
    return {"model": str(directory)}


def _tiny_dir(cache_dir: Optional[str], overrides: dict) -> Path:
    root = Path(os.path.expanduser(cache_dir or "~/.cache/radio_distill/tiny"))
    return root / f"{PLUGIN}-{config_hash({**TINY_DINOV2, **overrides})}"


# --------------------------------------------------------------------------- transformers loading


def is_local_path(model: str) -> bool:
    """A path (existing, or written like one) rather than a hub id such as 'facebook/x'."""
    return os.path.exists(os.path.expanduser(model)) or model.startswith(("/", ".", "~"))


def load_hf_config(plugin: str, model: str, published: dict, model_types: Sequence[str],
                   sub_config: Optional[str] = None):
    """The config of `model`: from a local directory, the local HF cache, or (offline, for the
    hub ids in ``published``) the published values. ``sub_config`` picks a nested config
    (SAM's ``vision_config``) when the file holds the full model's config."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if is_local_path(model):
        path = Path(os.path.expanduser(model))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{plugin} teacher: local model directory {model!r} does not exist "
                                    "or has no config.json (expected a save_pretrained directory)")
        config = AutoConfig.from_pretrained(path)
    else:
        try:
            config = AutoConfig.from_pretrained(model)
        except OSError as exc:
            if model not in published:
                raise OSError(f"{plugin} teacher: {model!r} is neither a local directory nor a hub id whose "
                              f"files are in the local HF cache (offline). Known offline: "
                              f"{', '.join(published)}") from exc
            values = dict(published[model])
            config = CONFIG_MAPPING[values.pop("model_type")](**values)
    if sub_config and config.model_type not in model_types and hasattr(config, sub_config):
        config = getattr(config, sub_config)
    if config.model_type not in model_types:
        raise ValueError(f"{plugin} teacher: {model!r} is a {config.model_type!r} model, not one of "
                         f"{', '.join(model_types)}")
    return config


def resolve_model(plugin: str, model: Optional[str], pretrained: Optional[str], tiny: Union[bool, dict],
                  example: str, make_tiny) -> str:
    """``model``, or (``tiny``) the directory of a small random model written by
    ``make_tiny(overrides)``; shared by the transformers-based teachers."""
    if tiny or isinstance(tiny, dict):  # `tiny: {}` = the defaults
        if model is not None or pretrained is not None:
            raise ValueError(f"{plugin} teacher: give either tiny or model/pretrained, not both")
        model = make_tiny(dict(tiny) if isinstance(tiny, dict) else {})["model"]
    if not model:
        raise ValueError(f"{plugin} teacher needs `model` (a hub id such as {example!r} or a local directory) "
                         "or `tiny: true`")
    return model


def hf_network(plugin: str, model_cls, model: str, pretrained: Optional[str], config, meta: bool) -> nn.Module:
    """The teacher's transformers network: the architecture alone on the meta device, or the
    weights of ``pretrained`` (else ``model``)."""
    if meta:
        with torch.device("meta"):
            return model_cls._from_config(config, attn_implementation="sdpa")
    return hf_from_pretrained(plugin, model_cls, pretrained or model, config, label=model)


def hf_from_pretrained(plugin: str, model_cls, source: str, config, label: str) -> nn.Module:
    """``model_cls.from_pretrained(source, config=config)`` with SDPA attention, refusing a
    checkpoint whose tensors don't fit the architecture (naming both) or that lacks some."""
    if is_local_path(source) and not os.path.isdir(os.path.expanduser(source)):
        raise FileNotFoundError(f"{plugin} teacher: checkpoint directory {source!r} does not exist")
    with _quiet_transformers():
        try:
            # fp32 weights whatever the file holds (transformers 5 defaults to the file's dtype);
            # reduced precision is the framework's autocast.
            net, info = model_cls.from_pretrained(os.path.expanduser(source), config=config, dtype=torch.float32,
                                                  attn_implementation="sdpa", ignore_mismatched_sizes=True,
                                                  output_loading_info=True)
        except OSError as exc:
            raise OSError(f"{plugin} teacher: cannot load weights from {source!r}: {exc}. Offline, hub "
                          "weights must already be in the local HF cache; or pass `pretrained` as a local "
                          "directory") from exc
    mismatched = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info["mismatched_keys"])]
    missing = sorted(info["missing_keys"])
    if mismatched or missing:
        arch = f"hidden_size={config.hidden_size}, layers={config.num_hidden_layers}"
        problems = mismatched[:3] + [f"missing {k}" for k in missing[:3]]
        raise ValueError(f"{plugin} teacher: checkpoint {source!r} does not match the architecture "
                         f"{label!r} ({arch}): {'; '.join(problems)}"
                         f"{' ...' if len(mismatched) + len(missing) > 3 else ''}")
    return net


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report (SAM's prompt-encoder/mask-decoder keys are expected leftovers;
    real problems are raised by the caller) and the progress bar."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "dinov2", build_dinov2_teacher)


__all__ = ["Dinov2Teacher", "build_dinov2_teacher", "describe", "make_tiny_dinov2", "PUBLISHED_CONFIGS",
           "TINY_DINOV2", "load_hf_config", "hf_from_pretrained"]
