"""The user-facing model: a trained student with its adaptor heads, loaded from an export
(``radio_core.formats.export``) or an official RADIO checkpoint (``radio_core.formats.radio_checkpoint``).

    from radio_core.model import RadioModel
    model = RadioModel.load("runs/quickstart/export")          # or an official RADIO .pth.tar
    h, w = model.nearest_supported_resolution(500, 333)         # (496, 336) for patch 16
    summary, spatial = model(images01)                         # [0, 1] images; normalised inside
    features = model.forward_features(images01)                # raw StudentOutput
    clip_summary, clip_spatial = model.adaptors["clip"](features)
    everything = model.adaptor_outputs(images01)               # {"backbone": ..., teacher: ...}

``summary`` is the concatenation, in slot order, of the CLS tokens read by teachers that use a
summary target (RADIO's backbone summary), shape (B, k * embed_dim); ``summary_dim`` gives k *
embed_dim. With no such teacher it is the first CLS token. ``spatial`` is (B, embed_dim, h, w).
Adaptor outputs are in each teacher's own feature space (target normalisation undone).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from huggingface_hub import ModelHubMixin
from torch import Tensor, nn

from ..models.distiller import Distiller
from ..models.spectral import remove_spectral_reparam
from ..protocols import StudentOutput
from .export import ExportError, FeatureNormalizer, load_export, write_export
from .radio_checkpoint import RadioFormatError, load_radio_checkpoint, save_radio_checkpoint

RADIO_SUFFIXES = (".tar", ".pth", ".pt")


class RadioOutput(NamedTuple):
    summary: Optional[Tensor]
    spatial: Optional[Tensor]


def nearest_supported_resolution(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Round (height, width) to the nearest multiples of ``multiple`` (at least one multiple):
    (500, 333) -> (496, 336) for patch 16."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    h = max(multiple, int(round(height / multiple)) * multiple)
    w = max(multiple, int(round(width / multiple)) * multiple)
    return h, w


class TeacherAdaptor:
    """One teacher's heads: ``adaptor(features: StudentOutput) -> RadioOutput(summary, spatial)``
    (either is None when the teacher has no such head)."""

    def __init__(self, model: "RadioModel", name: str) -> None:
        self._model, self.name = model, name

    @property
    def summary_head(self) -> Optional[nn.Module]:
        heads = self._model.distiller.summary_heads
        return heads[self.name] if self.name in heads else None

    @property
    def spatial_head(self) -> Optional[nn.Module]:
        heads = self._model.distiller.spatial_heads
        return heads[self.name] if self.name in heads else None

    @property
    def slot(self) -> Optional[int]:
        return self._model.distiller.summary_slots.get(self.name)

    def __call__(self, features: StudentOutput) -> RadioOutput:
        model, d = self._model, self._model.distiller
        summary = spatial = None
        if self.summary_head is not None:
            summary = self.summary_head(features.summary[:, d.summary_slots[self.name]])
        if self.spatial_head is not None:
            b = features.patches.shape[0]
            h, w = features.grid
            tokens = self.spatial_head(model.feature_normalizer(features.patches))
            spatial = tokens.transpose(1, 2).reshape(b, -1, h, w)
        summary, spatial = d.denormalize_predictions(self.name, summary, spatial)
        return RadioOutput(summary, spatial)

    def __repr__(self) -> str:
        return f"TeacherAdaptor({self.name!r}, summary={self.summary_head is not None}, " \
               f"spatial={self.spatial_head is not None})"


class Adaptors(Mapping):
    """Read-only ``{teacher: TeacherAdaptor}`` view of a model's heads."""

    def __init__(self, model: "RadioModel") -> None:
        self._model = model

    def _names(self) -> list[str]:
        d = self._model.distiller
        return [h.name for h in d.heads if h.name in d.summary_heads or h.name in d.spatial_heads]

    def __getitem__(self, name: str) -> TeacherAdaptor:
        names = self._names()
        if name not in names:
            raise KeyError(f"no adaptor for teacher {name!r}; this model has: {', '.join(names) or '(none)'}")
        return TeacherAdaptor(self._model, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class RadioModel(nn.Module, ModelHubMixin, library_name="radio-distill", tags=["radio-distill", "agglomerative-distillation"],
                 repo_url="https://github.com/radio-distill/radio-distill"):
    """A student plus its per-teacher adaptor heads; see the module docstring.

    ``save_pretrained(DIR)`` / ``from_pretrained(DIR)`` follow ``huggingface_hub``'s
    ``ModelHubMixin`` (the export format plus a model card; ``push_to_hub`` only when you call it).
    ``from_pretrained`` with a hub id downloads through the HF cache (honours ``HF_HUB_OFFLINE``).
    ``save_transformers(DIR)`` writes a directory ``transformers.AutoModel`` loads.
    """

    def __init__(self, distiller: Distiller, config: Optional[dict] = None,
                 feature_normalizer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.distiller = distiller
        self.config = dict(config or {})
        self.feature_normalizer = feature_normalizer if feature_normalizer is not None else nn.Identity()
        teachers = self.config.get("teachers", {})
        slots = {t: s for t, s in distiller.summary_slots.items() if t in distiller.summary_heads
                 and teachers.get(t, {}).get("use_summary", True)}
        # An imported official checkpoint names its summary rows (from its teacher list, whichever
        # heads were imported); otherwise: the slots of the teachers that use a summary target.
        # A student whose summary slots all hold one vector (E-RADIO's mean feature) has that one.
        shared = getattr(distiller.student, "shared_summary", False)
        self.summary_idxs: list[int] = list(self.config.get("summary_idxs") or
                                            ([0] if shared else sorted(set(slots.values()))) or [0])

    # -- properties -------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    @property
    def adaptors(self) -> Adaptors:
        return Adaptors(self)

    @property
    def embed_dim(self) -> int:
        return self.student.embed_dim

    @property
    def summary_dim(self) -> int:
        return self.embed_dim * len(self.summary_idxs)

    @property
    def patch_size(self) -> int:
        return self.student.patch_size

    @property
    def size_multiple(self) -> int:
        return self.student.size_multiple

    def nearest_supported_resolution(self, height: int, width: int) -> tuple[int, int]:
        return nearest_supported_resolution(height, width, self.size_multiple)

    def set_window_size(self, window_size: Optional[int]) -> None:
        fn = getattr(self.student, "set_window_size", None)
        if fn is None:
            raise AttributeError(f"student {type(self.student).__name__} has no windowed-attention mode")
        fn(window_size)

    # -- forward ----------------------------------------------------------------------------
    def forward_features(self, images: Tensor) -> StudentOutput:
        """The student's raw output for [0, 1] images (B, 3, H, W)."""
        h, w = images.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            nh, nw = self.nearest_supported_resolution(h, w)
            raise ValueError(f"input {h}x{w} is not a multiple of {m}; resize to a supported resolution, e.g. "
                             f"the nearest: {nh}x{nw} (model.nearest_supported_resolution)")
        return self.student(images)

    def backbone(self, features: StudentOutput) -> RadioOutput:
        b = features.patches.shape[0]
        h, w = features.grid
        summary = features.summary[:, self.summary_idxs].flatten(1)
        patches = self.feature_normalizer(features.patches)
        return RadioOutput(summary, patches.transpose(1, 2).reshape(b, -1, h, w))

    def forward(self, images: Tensor) -> RadioOutput:
        """(summary (B, summary_dim), spatial (B, embed_dim, h, w))."""
        return self.backbone(self.forward_features(images))

    def adaptor_outputs(self, images: Tensor, names: Optional[list[str]] = None) -> dict[str, RadioOutput]:
        """``{"backbone": RadioOutput, teacher: RadioOutput, ...}`` from one student forward."""
        features = self.forward_features(images)
        out = {"backbone": self.backbone(features)}
        for name in names if names is not None else list(self.adaptors):
            out[name] = self.adaptors[name](features)
        return out

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", registry=None,
             **radio_kwargs: Any) -> "RadioModel":
        """Load an export directory (or its config.json / model.safetensors), a transformers
        RadioModel folder (a converted C-RADIO: the backbone, no heads), or an official
        RADIO ``.pth.tar`` checkpoint (``radio_kwargs`` go to ``radio_format.load_radio_checkpoint``).
        The model is returned in eval mode; σReparam layers are baked into plain weights."""
        p = Path(path)
        if radio_kwargs and not p.name.endswith(RADIO_SUFFIXES):
            raise TypeError(f"unexpected arguments for an export directory: {sorted(radio_kwargs)}")
        try:
            model = cls._load(p, registry, **radio_kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is one line naming the file
            from ..utils import short_repr

            msg = short_repr(exc, 600, quote=False) if isinstance(exc, (ExportError, RadioFormatError)) else \
                f"cannot load ({type(exc).__name__}: {short_repr(exc, 400, quote=False)})"
            if str(p) not in msg:
                msg = f"{p}: {msg}"
            raise (RadioFormatError if isinstance(exc, RadioFormatError) else ExportError)(msg) from None
        return model.to(device).eval()

    @classmethod
    def _load(cls, p: Path, registry, **radio_kwargs: Any) -> "RadioModel":
        if not p.exists():
            raise ExportError(f"{p}: no such file or directory")
        if p.name.endswith(RADIO_SUFFIXES):
            imported = load_radio_checkpoint(p, registry=registry, **radio_kwargs)
            model = cls(imported.distiller, imported.config, imported.feature_normalizer)
        else:
            from .hf_transformers import (SIDECAR_CONFIG, is_transformers_radio_dir, load_transformers_export,
                                          load_transformers_radio_model)

            if p.is_dir() and (p / SIDECAR_CONFIG).is_file():  # written by save_transformers
                distiller, config = load_transformers_export(p, registry=registry)
            elif is_transformers_radio_dir(p):  # a transformers RadioModel (C-RADIO): the backbone alone
                distiller, config = load_transformers_radio_model(p, registry=registry)
            else:
                distiller, config = load_export(p, registry=registry)
            model = cls(distiller, config)
        remove_spectral_reparam(model)
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write this model in the export format (directory)."""
        if not isinstance(self.feature_normalizer, nn.Identity):
            raise ExportError("this model carries a RADIO feature normaliser, which the export format does not "
                              "hold; save it with save_radio() instead")
        return write_export(self.distiller, self.config, path)

    def save_radio(self, path: str | os.PathLike) -> Path:
        """Write this model as an official-RADIO-layout ``.pth.tar`` (ViT-CPE students only)."""
        return save_radio_checkpoint(self, path)

    def save_onnx(self, path: str | os.PathLike, resolution: Optional[tuple[int, int]] = None) -> Path:
        """Write this model (student and every head) as ONNX (``radio_core.formats.onnx``)."""
        from .onnx import save_onnx

        return save_onnx(self, path, resolution)

    def save_transformers(self, path: str | os.PathLike) -> Path:
        """Write this model as a directory ``transformers.AutoModel.from_pretrained`` loads (the
        backbone as transformers' ``RadioModel``), with the adaptor heads beside it for ``load``."""
        from .hf_transformers import save_transformers

        return save_transformers(self, path)

    # huggingface_hub.ModelHubMixin hooks: save_pretrained / from_pretrained / push_to_hub
    def _save_pretrained(self, save_directory: Path) -> None:
        from .model_card import write_model_card

        self.save(save_directory)
        write_model_card(save_directory, self.config)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str] = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False, token: Any = None,
                         device: str | torch.device = "cpu", registry=None, config: Any = None,
                         **kwargs: Any) -> "RadioModel":
        del config  # the mixin passes config.json's content; load() reads it itself
        path = Path(model_id)
        if not path.exists():
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                          force_download=force_download, local_files_only=local_files_only,
                                          token=token))
        return cls.load(path, device=device, registry=registry, **kwargs)


__all__ = ["RadioModel", "RadioOutput", "TeacherAdaptor", "Adaptors", "nearest_supported_resolution",
           "FeatureNormalizer", "ExportError"]
