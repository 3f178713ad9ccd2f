"""Loading transformers models for teacher plugins: configs from a local directory, the local HF
cache or published values (offline), weights with SDPA attention and a one-line refusal of a
checkpoint that does not fit the architecture.

Not a plugin (no entry point): teacher plugins import it as ``radio_plugins._hf_loading``."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn


def is_local_path(model: str) -> bool:
    """A path (existing, or written like one) rather than a hub id such as 'facebook/x'."""
    return os.path.exists(os.path.expanduser(model)) or model.startswith(("/", ".", "~"))


def load_hf_config(plugin: str, model: str, published: dict, model_types: Sequence[str],
                   sub_config: Optional[str] = None, local_only: bool = False):
    """The config of `model`: from a local directory, the local HF cache, or (offline, for the
    hub ids in ``published``) the published values. ``sub_config`` picks a nested config
    (SAM's ``vision_config``) when the file holds the full model's config. ``local_only``
    (meta-device builds: dry runs, dimension checks) never contacts the hub, whatever
    ``HF_HUB_OFFLINE`` says: the local cache, else the published values; a real build may
    download (the recipe asked for those weights)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if is_local_path(model):
        path = Path(os.path.expanduser(model))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{plugin} teacher: local model directory {model!r} does not exist "
                                    "or has no config.json (expected a save_pretrained directory)")
        config = AutoConfig.from_pretrained(path)
    else:
        try:
            config = _cached_config(model) if local_only else AutoConfig.from_pretrained(model)
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


def _cached_config(model: str):
    """The config of hub id ``model`` from the local HF cache, without any HTTP request (even
    ``local_files_only`` downloads build telemetry headers that contact the hub); OSError if absent."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    cached = try_to_load_from_cache(model, "config.json")
    if not isinstance(cached, str):
        raise OSError(f"{model}: config.json is not in the local HF cache")
    return AutoConfig.from_pretrained(Path(cached).parent)


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
        arch = describe_architecture(config)
        problems = mismatched[:3] + [f"missing {k}" for k in missing[:3]]
        raise ValueError(f"{plugin} teacher: checkpoint {source!r} does not match the architecture "
                         f"{label!r} ({arch}): {'; '.join(problems)}"
                         f"{' ...' if len(mismatched) + len(missing) > 3 else ''}")
    return net


def hf_vision_encoder(plugin: str, vision_cls, full_cls, full_type: str, model: str, pretrained: Optional[str],
                      config, meta: bool) -> nn.Module:
    """A vision encoder (``vision_cls`` with ``config``) from either a vision-only checkpoint or a
    full-model one (``full_cls``, model type ``full_type``: the hub layout of SAM2/SAM3, whose keys
    carry a ``vision_encoder.`` prefix that the vision class does not strip). The full model is
    loaded with ``config`` as its vision config, so a mismatching checkpoint is refused, and only
    its ``vision_encoder`` is kept."""
    if meta:
        return hf_network(plugin, vision_cls, model, pretrained, config, meta=True)
    from transformers import AutoConfig

    source = pretrained or model
    try:
        with _quiet_transformers():
            source_config = AutoConfig.from_pretrained(os.path.expanduser(source))
    except (OSError, ValueError):
        source_config = None  # hf_from_pretrained reports the missing directory / offline hub id
    if source_config is not None and source_config.model_type == full_type:
        source_config.vision_config = config
        full = hf_from_pretrained(plugin, full_cls, source, source_config, label=model)
        return full.vision_encoder
    return hf_from_pretrained(plugin, vision_cls, source, config, label=model)


def describe_architecture(config) -> str:
    """``hidden_size=..., layers=...`` of a config, or of its (vision) backbone for nested configs."""
    inner = getattr(config, "vision_config", None) or config
    inner = getattr(inner, "backbone_config", None) or inner
    parts = [f"{k}={getattr(inner, a)}" for k, a in (("hidden_size", "hidden_size"), ("layers", "num_hidden_layers"))
             if getattr(inner, a, None) is not None]
    return ", ".join(parts) or type(config).__name__


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
