"""The export format (written by the trainer through ``save_export``, read by ``load_export``): a
directory with

* ``model.safetensors``: the state dict of ``radio_core.models.distiller.Distiller`` (``student.*``,
  ``summary_heads.<teacher>.*``, ``spatial_heads.<teacher>.*``, ``target_norms.<teacher>.*``);
  safetensors, so loading runs no code from the file;
* ``config.json``: ``{"format": "radio-distill-export", "version": 1,
  "student": {"name", "args", "num_cls_tokens"}, "teachers": {name: {"summary_dim",
  "spatial_dim", "plugin", "use_summary", optional "adaptor" | "summary_adaptor" |
  "spatial_adaptor": {"name", "args", optional "hidden_dim"}, optional "input_size"}},
  "adaptor": {"name", "args"}, "hidden_dim", "summary_slots": {teacher: slot},
  "resolution": [h, w] | null, optional "target_norms": {teacher: {kind: {"class", "args"}}}}``.

Everything is rebuilt by plugin name through ``radio_core.registry`` (this module knows no
plugin). Target-normalisation modules (``target_norms``) are named in config.json by a fixed
name that is looked up in a table of allowed classes (``Standardize``, ``PHIS``): a config file
never chooses code to import. They are rebuilt with ``cls.from_export(args)`` when the class
defines it, else ``cls(**args)``; ``args`` come from the module's ``export_args()`` or, without
one, from the constructor arguments it keeps as same-named attributes (``dim``, ``eps``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..models.distiller import Distiller, HeadSpec
from ..models.target_norm import PHIS, Standardize
from ..registry import PluginError, get_registry

EXPORT_FORMAT = "radio-distill-export"
EXPORT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ExportError(ValueError):
    """An export directory that is missing, malformed, or does not match its weights."""


class FeatureNormalizer(nn.Module):
    """RADIO's feature normaliser: ``(x - mean) @ tx.T`` on (..., D) tokens (identity by default)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("tx", torch.eye(dim))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) @ self.tx.to(x.dtype).T


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
            name = _TARGET_NORM_NAMES.get(type(module))
            if name is None:
                raise ExportError(f"target_norms[{teacher!r}][{kind!r}]: {type(module).__name__} is not one of the "
                                  f"target normalisers an export can hold ({', '.join(_TARGET_NORM_NAMES.values())})")
            args = module.export_args() if hasattr(module, "export_args") else _constructor_args(module)
            out.setdefault(teacher, {})[kind] = {"class": name, "args": args}
    return out


# The names config.json uses for target normalisers. A config file never chooses code: a name is
# looked up in this table, nothing is imported. The names are the classes' original module paths
# (exports written before the package layout changed carry them) and stay fixed.
_TARGET_NORM_NAMES = {Standardize: "radio_core.normalize.Standardize", PHIS: "radio_core.normalize.PHIS"}
_TARGET_NORM_CLASSES = {name: cls for cls, name in _TARGET_NORM_NAMES.items()}


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
            cls = _TARGET_NORM_CLASSES.get(path)
            if cls is None:
                raise ExportError(f"{origin}: target_norms[{teacher!r}][{kind!r}]: unknown class {path!r} (an export may "
                                  f"name only {', '.join(sorted(set(_TARGET_NORM_NAMES.values())))})")
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


__all__ = ["ExportError", "FeatureNormalizer", "save_export", "write_export", "load_export", "export_config",
           "build_distiller_from_config", "CONFIG_NAME", "WEIGHTS_NAME"]
