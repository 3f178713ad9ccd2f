"""The user-facing model: a trained student with its adaptor heads, loaded from an export.

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

Export format (written by the trainer through ``save_export``, read by ``load_export``): a
directory with

* ``model.safetensors``: the state dict of ``radio_core.distiller.Distiller`` (``student.*``,
  ``summary_heads.<teacher>.*``, ``spatial_heads.<teacher>.*``, ``target_norms.<teacher>.*``);
  safetensors, so loading runs no code from the file;
* ``config.json``: ``{"format": "radio-distill-export", "version": 1,
  "student": {"name", "args", "num_cls_tokens"}, "teachers": {name: {"summary_dim",
  "spatial_dim", "plugin", "use_summary", optional "adaptor" | "summary_adaptor" |
  "spatial_adaptor": {"name", "args", optional "hidden_dim"}, optional "input_size"}},
  "adaptor": {"name", "args"}, "hidden_dim", "summary_slots": {teacher: slot},
  "resolution": [h, w] | null, optional "target_norms": {teacher: {kind: {"class", "args"}}}}``.

Everything is rebuilt by plugin name through ``radio_core.registry`` (this module knows no
plugin). Target-normalisation modules (``target_norms``) are rebuilt from the class path that was
recorded, restricted to classes under ``radio_core.`` (a config file must not choose code to
import), with ``cls.from_export(args)`` when the class defines it, else ``cls(**args)``; ``args``
come from the module's ``export_args()`` or, without one, from the constructor arguments it keeps
as same-named attributes (``Standardize``/``PHIS``: ``dim``, ``eps``).
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .distiller import Distiller, HeadSpec
from .protocols import StudentOutput

EXPORT_FORMAT = "radio-distill-export"
EXPORT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RADIO_SUFFIXES = (".tar", ".pth", ".pt")


class ExportError(ValueError):
    """An export directory that is missing, malformed, or does not match its weights."""


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


class FeatureNormalizer(nn.Module):
    """RADIO's feature normaliser: ``(x - mean) @ tx.T`` on (..., D) tokens (identity by default)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("tx", torch.eye(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) @ self.tx.to(x.dtype).T


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


class RadioModel(nn.Module):
    """A student plus its per-teacher adaptor heads; see the module docstring."""

    def __init__(self, distiller: Distiller, config: Optional[dict] = None,
                 feature_normalizer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.distiller = distiller
        self.config = dict(config or {})
        self.feature_normalizer = feature_normalizer if feature_normalizer is not None else nn.Identity()
        teachers = self.config.get("teachers", {})
        slots = {t: s for t, s in distiller.summary_slots.items() if t in distiller.summary_heads
                 and teachers.get(t, {}).get("use_summary", True)}
        self.summary_idxs: list[int] = sorted(set(slots.values())) or [0]

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
        """Load an export directory (or its config.json / model.safetensors), or an official
        RADIO ``.pth.tar`` checkpoint (``radio_kwargs`` go to ``radio_format.load_radio_checkpoint``).
        The model is returned in eval mode; σReparam layers are baked into plain weights."""
        from .spectral import remove_spectral_reparam

        p = Path(path)
        if p.name.endswith(RADIO_SUFFIXES):
            from .radio_format import load_radio_checkpoint

            imported = load_radio_checkpoint(p, registry=registry, **radio_kwargs)
            model = cls(imported.distiller, imported.config, imported.feature_normalizer)
        else:
            if radio_kwargs:
                raise TypeError(f"unexpected arguments for an export directory: {sorted(radio_kwargs)}")
            distiller, config = load_export(p, registry=registry)
            model = cls(distiller, config)
        remove_spectral_reparam(model)
        return model.to(device).eval()

    def save(self, path: str | os.PathLike) -> Path:
        """Write this model in the export format (directory)."""
        if not isinstance(self.feature_normalizer, nn.Identity):
            raise ExportError("this model carries a RADIO feature normaliser, which the export format does not "
                              "hold; save it with save_radio() instead")
        return write_export(self.distiller, self.config, path)

    def save_radio(self, path: str | os.PathLike) -> Path:
        """Write this model as an official-RADIO-layout ``.pth.tar`` (ViT-CPE students only)."""
        from .radio_format import save_radio_checkpoint

        return save_radio_checkpoint(self, path)


# ----------------------------------------------------------------------------------- export
def export_config(distiller: Distiller, recipe: Any = None, teachers: Optional[Mapping[str, Any]] = None) -> dict:
    """The ``config.json`` of an export of ``distiller`` trained with ``recipe`` (a
    ``radio_core.recipe.Recipe``; None records what the distiller alone tells)."""
    student_name, student_args, resolution = None, {}, None
    adaptor = {"name": "mlp", "args": {}}
    teacher_specs: dict = {}
    if recipe is not None:
        student_name = recipe.student.name
        student_args = dict(recipe.student.args)
        student_args.pop("pretrained", None)  # the export holds the weights; do not re-read a file
        resolution = list(recipe.student.resolution[0])
        adaptor = {"name": recipe.adaptor.name, "args": dict(recipe.adaptor.args)}
        teacher_specs = dict(recipe.teachers)
    if student_name is None:
        raise ExportError("export_config: the student's plugin name is unknown; pass the recipe")
    hidden = max((d for h in distiller.heads for d in (h.summary_dim, h.spatial_dim) if d is not None), default=0)
    entries = {}
    for h in distiller.heads:
        spec = teacher_specs.get(h.name)
        entry: dict[str, Any] = {
            "summary_dim": h.summary_dim if h.name in distiller.summary_heads else None,
            "spatial_dim": h.spatial_dim if h.name in distiller.spatial_heads else None,
            "plugin": getattr(spec, "plugin", None),
            "use_summary": h.name in distiller.summary_heads,
        }
        if spec is not None and getattr(spec, "adaptor", None) is not None:
            entry["adaptor"] = {"name": spec.adaptor.name, "args": dict(spec.adaptor.args)}
        teacher = (teachers or {}).get(h.name)
        if teacher is not None and hasattr(teacher, "input_size"):
            entry["input_size"] = list(teacher.input_size)
        entries[h.name] = entry
    config = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "student": {"name": student_name, "args": student_args,
                    "num_cls_tokens": int(distiller.student.num_cls_tokens)},
        "teachers": entries, "adaptor": adaptor, "hidden_dim": hidden,
        "summary_slots": {k: int(v) for k, v in distiller.summary_slots.items() if k in distiller.summary_heads},
        "resolution": resolution,
    }
    norms = _target_norm_config(distiller)
    if norms:
        config["target_norms"] = norms
    return config


def save_export(distiller: Distiller, recipe: Any, teachers: Optional[Mapping[str, Any]],
                path: str | os.PathLike) -> Path:
    """Write the standalone export of a trained ``distiller`` to the directory ``path``.

    ``recipe``: the run's ``Recipe`` (student plugin name/args/resolution, adaptor spec, teacher
    plugins); ``teachers``: optional ``{name: Teacher}`` whose ``input_size`` is recorded.
    Weights are the distiller's state dict as is (σReparam layers keep their parametrisation so
    that ``eval.loading.load_run`` can load the export into a distiller built from the recipe;
    ``RadioModel.load`` bakes them). Returns ``path``.
    """
    return write_export(distiller, export_config(distiller, recipe, teachers), path)


def write_export(distiller: Distiller, config: dict, path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in distiller.state_dict().items()}
    tmp_w, tmp_c = path / (WEIGHTS_NAME + ".tmp"), path / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp_w, path / WEIGHTS_NAME)
    os.replace(tmp_c, path / CONFIG_NAME)
    return path


def load_export(path: str | os.PathLike, registry=None) -> tuple[Distiller, dict]:
    """Rebuild the distiller of an export (by plugin name, through the registry) and load its
    weights. ``path``: the export directory, or its config.json / model.safetensors."""
    from safetensors.torch import load_file

    from .registry import get_registry

    path = Path(path)
    folder = path.parent if path.is_file() else path
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ExportError(f"{folder}: not an export directory (missing {f.name})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_file}: not valid JSON ({exc})") from None
    if config.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
        raise ExportError(f"{config_file}: format {config.get('format')!r} is not {EXPORT_FORMAT!r}")
    for key in ("student", "teachers"):
        if key not in config:
            raise ExportError(f"{config_file}: missing field {key!r}")
    state = load_file(str(weights_file))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    registry = registry or get_registry()
    distiller = build_distiller_from_config(config, registry, state, origin=str(config_file))
    return distiller, config


def build_distiller_from_config(config: dict, registry, state: Optional[dict[str, Tensor]] = None,
                                origin: str = "config") -> Distiller:
    """Student + heads (+ target norms) described by an export ``config``; loads ``state`` if given.

    Modules are first built on the meta device and the weights assigned (fast for big models);
    if anything is left unmaterialised the model is rebuilt normally and loaded.
    """
    def build(device: Optional[str]) -> Distiller:
        if device == "meta":
            with torch.device("meta"):
                return _build(config, registry, origin)
        return _build(config, registry, origin)

    if state is None:
        return build(None)
    try:
        distiller = build("meta")
        _load(distiller, state, origin, assign=True)
        if any(t.is_meta for t in list(distiller.parameters()) + list(distiller.buffers())):
            raise RuntimeError("unmaterialised tensors")
        _materialise_plain_attributes(distiller)
    except ExportError:
        raise
    except Exception:  # noqa: BLE001 - a student that can't be built on meta: build it for real
        distiller = build(None)
        _load(distiller, state, origin, assign=False)
    return distiller


def _materialise_plain_attributes(distiller: Distiller) -> None:
    """Meta-built modules may keep plain tensor attributes (not buffers) on meta: none are
    expected; fail loudly (the caller falls back to a real build) if one is found."""
    for module in distiller.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.is_meta:
                raise RuntimeError("meta tensor attribute")


def _head_spec(config: dict, teacher: str, kind: str) -> tuple[str, dict, int]:
    entry = config["teachers"][teacher]
    spec = entry.get(f"{kind}_adaptor") or entry.get("adaptor") or config.get("adaptor") or {"name": "mlp"}
    hidden = spec.get("hidden_dim", config.get("hidden_dim"))
    if hidden is None:
        raise ExportError(f"teacher {teacher!r}: no hidden_dim for its {kind} adaptor")
    return spec["name"], dict(spec.get("args", {})), int(hidden)


def _build(config: dict, registry, origin: str) -> Distiller:
    from .registry import PluginError

    sconf = config["student"]
    try:
        student = registry.build("student", sconf["name"], **dict(sconf.get("args", {})),
                                 num_cls_tokens=int(sconf.get("num_cls_tokens", 1)))
    except PluginError as exc:
        raise ExportError(f"{origin}: student: {exc}") from None
    heads, summary_heads, spatial_heads = [], {}, {}
    for name, entry in config["teachers"].items():
        sdim, pdim = entry.get("summary_dim"), entry.get("spatial_dim")
        heads.append(HeadSpec(name, sdim, pdim))
        for kind, dim, table in (("summary", sdim, summary_heads), ("spatial", pdim, spatial_heads)):
            if dim is None:
                continue
            adaptor, args, hidden = _head_spec(config, name, kind)
            try:
                table[name] = registry.build("adaptor", adaptor, in_dim=student.embed_dim, out_dim=int(dim),
                                             hidden_dim=hidden, **args)
            except PluginError as exc:
                raise ExportError(f"{origin}: teacher {name!r} {kind} adaptor: {exc}") from None
    with torch.device("cpu"):  # small; and their non-persistent buffers are not in the weights file
        norms = _build_target_norms(config.get("target_norms", {}), origin)
    distiller = Distiller(student, heads, summary_heads, spatial_heads, norms)
    slots = config.get("summary_slots")
    if slots is not None:
        for name, slot in slots.items():
            if not 0 <= int(slot) < student.num_cls_tokens:
                raise ExportError(f"{origin}: summary_slots[{name!r}] = {slot} but the student has "
                                  f"{student.num_cls_tokens} summary token(s)")
        distiller.summary_slots = {k: int(v) for k, v in slots.items()}
    return distiller


def _load(distiller: Distiller, state: dict[str, Tensor], origin: str, assign: bool) -> None:
    try:
        result = distiller.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ExportError(f"{origin}: weights do not match the config: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{origin}: weights do not match the config (missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]})")


# ------------------------------------------------------------------------- target norms
def _target_norm_config(distiller: Distiller) -> dict:
    out: dict = {}
    for teacher, norms in distiller.target_norms.items():
        items = norms.items() if isinstance(norms, (nn.ModuleDict, Mapping)) else [("", norms)]
        for kind, module in items:
            cls = type(module)
            args = module.export_args() if hasattr(module, "export_args") else _constructor_args(module)
            out.setdefault(teacher, {})[kind] = {"class": f"{cls.__module__}.{cls.__qualname__}", "args": args}
    return out


def _constructor_args(module: nn.Module) -> dict:
    """The ``__init__`` arguments a module kept as same-named attributes (e.g. ``dim``, ``eps``)."""
    import inspect

    args = {}
    for name, param in inspect.signature(type(module).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(module, name, None)
        if isinstance(value, (bool, int, float, str)) or value is None:
            args[name] = value
        elif param.default is param.empty:
            raise ExportError(f"cannot record how to rebuild {type(module).__name__}: its argument {name!r} is not "
                              f"kept as a plain attribute; give the class an export_args() method")
    return args


def _build_target_norms(spec: dict, origin: str) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for teacher, kinds in spec.items():
        table = {}
        for kind, entry in kinds.items():
            path = str(entry.get("class", ""))
            module_name, _, cls_name = path.rpartition(".")
            if not module_name.startswith("radio_core."):
                raise ExportError(f"{origin}: target_norms[{teacher!r}][{kind!r}]: refusing to import {path!r} "
                                  f"(only classes under radio_core. are rebuilt from an export)")
            try:
                cls = getattr(importlib.import_module(module_name), cls_name)
            except (ImportError, AttributeError) as exc:
                raise ExportError(f"{origin}: target_norms[{teacher!r}][{kind!r}]: cannot find {path!r} "
                                  f"({exc})") from None
            args = dict(entry.get("args", {}))
            table[kind] = cls.from_export(args) if hasattr(cls, "from_export") else cls(**args)
        out[teacher] = nn.ModuleDict(table) if "" not in table else table[""]
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to config.json")


__all__ = ["RadioModel", "RadioOutput", "TeacherAdaptor", "FeatureNormalizer", "ExportError",
           "nearest_supported_resolution", "save_export", "write_export", "load_export", "export_config",
           "build_distiller_from_config"]
