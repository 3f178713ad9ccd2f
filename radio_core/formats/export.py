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
  "resolution": [h, w] | null, optional "target_norms": {teacher: {kind: {"class", "args"}}},
  optional "summary_idxs": [slot, ...] (the backbone summary's CLS rows, kept from an imported
  official checkpoint)}``. Adaptor heads output normalised targets; the target norms map them back
  (an export with a norm that was never estimated is refused). ``save_radio`` instead folds the
  de-normalisation into each head's last linear layer, since the official format has no place for it.

Everything is rebuilt by plugin name through ``radio_core.registry`` (this module knows no
plugin). No file chooses code: target-normalisation modules (``target_norms``) are named in
config.json by a fixed name looked up in a table of allowed classes (``Standardize``, ``PHIS``;
``"standardize"`` / ``"phi_s"`` are accepted too), and their arguments are validated (``dim``: a
positive int, ``eps``: a positive finite float, nothing else); anything else is refused naming
the file. The shape of config.json is checked before anything is built, and the weights are read
with safetensors and checked before loading: dtypes as the model expects (no integer or mixed
floating dtypes) and finite values. Every problem is one ExportError line naming the file.
"""
from __future__ import annotations

import contextlib
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
        if h.student_layer is not None:
            entry["student_layer"] = int(h.student_layer)
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
    from ..models.lora import merged_state_dict

    # Loss modules (and their statistics) are training state, not part of the model; LoRA
    # adapters are merged into their layers (the export loads without peft).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in merged_state_dict(distiller).items()
             if not k.startswith("losses.")}
    tmp_w, tmp_c = path / (WEIGHTS_NAME + ".tmp"), path / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp_w, path / WEIGHTS_NAME)
    os.replace(tmp_c, path / CONFIG_NAME)
    return path


def load_export(path: str | os.PathLike, registry=None) -> tuple[Distiller, dict]:
    """Rebuild the distiller of an export (by plugin name, through the registry) and load its
    weights. ``path``: the export directory, or its config.json / model.safetensors. Every
    problem is one ExportError line naming the file."""
    from ..utils import UserFileError, WeightsError, read_safetensors, read_user_json

    path = Path(path)
    folder = path.parent if path.is_file() else path
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if (not f.exists() and not f.is_symlink()) or f.is_dir():  # (a FIFO or a device: refused when read)
            raise ExportError(f"{folder}: not an export directory (missing {f.name})")
    try:  # a FIFO, a device or a huge file: one line, never a hang
        config = read_user_json(config_file, "export config", 16 << 20)
    except UserFileError as exc:
        raise ExportError(str(exc)) from None
    check_export_config(config, str(config_file))
    try:
        state = read_safetensors(weights_file, "export weights")
    except WeightsError as exc:
        raise ExportError(str(exc)) from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    registry = registry or get_registry()
    try:
        distiller = build_distiller_from_config(config, registry, state, origin=str(config_file))
    except (PluginError, WeightsError) as exc:
        raise ExportError(f"{config_file}: {exc}") from None
    return distiller, config


def check_export_config(config: Any, origin: str) -> None:
    """The shape of ``config.json`` (types of the fields ``_build`` reads); one ExportError line."""
    from ..recipe.schema import teacher_name_problem

    def fail(field: str, what: str) -> None:
        raise ExportError(f"{origin}: {field}: {what}")

    def is_int(v: Any, lo: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 2**31

    def component(v: Any, field: str) -> None:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"]:
            fail(field, "must be a mapping with a plugin name")
        if not isinstance(v.get("args", {}), dict):
            fail(f"{field}.args", "must be a mapping")
        if "hidden_dim" in v and not is_int(v["hidden_dim"], 1):
            fail(f"{field}.hidden_dim", "must be a positive integer")

    if not isinstance(config, dict):
        fail("(top level)", f"must be a JSON object, got {type(config).__name__}")
    if config.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
        fail("format", f"{config.get('format')!r:.80} is not {EXPORT_FORMAT!r}")
    for key in ("student", "teachers"):
        if key not in config:
            fail(key, "missing")
    component(config["student"], "student")
    if not is_int(config["student"].get("num_cls_tokens", 1), 1):
        fail("student.num_cls_tokens", "must be a positive integer")
    if config.get("adaptor") is not None:
        component(config["adaptor"], "adaptor")
    if config.get("hidden_dim") is not None and not is_int(config["hidden_dim"], 1):
        fail("hidden_dim", "must be a positive integer")
    teachers = config["teachers"]
    if not isinstance(teachers, dict) or not teachers:
        fail("teachers", "must be a non-empty mapping")
    for name, entry in teachers.items():
        problem = teacher_name_problem(name)
        if problem:
            fail("teachers", problem)
        if not isinstance(entry, dict):
            fail(f"teachers.{name}", "must be a mapping")
        dims = [entry.get("summary_dim"), entry.get("spatial_dim")]
        if any(d is not None and not is_int(d, 1) for d in dims) or dims == [None, None]:
            fail(f"teachers.{name}", "summary_dim / spatial_dim must be positive integers (at least one)")
        for key in ("adaptor", "summary_adaptor", "spatial_adaptor"):
            if entry.get(key) is not None:
                component(entry[key], f"teachers.{name}.{key}")
    slots = config.get("summary_slots")
    if slots is not None and (not isinstance(slots, dict) or not all(is_int(v) for v in slots.values())):
        fail("summary_slots", "must map teacher names to non-negative integers")
    norms = config.get("target_norms", {})
    if not isinstance(norms, dict) or not all(isinstance(v, dict) and all(isinstance(e, dict) for e in v.values())
                                              for v in norms.values()):
        fail("target_norms", "must map teachers to {part: {class, args}}")



def build_distiller_from_config(config: dict, registry, state: Optional[dict[str, Tensor]] = None,
                                origin: str = "config") -> Distiller:
    """Student + heads (+ target norms) described by an export ``config``; loads ``state`` if given.

    Modules are first built on the meta device and the weights assigned (fast for big models);
    if anything is left unmaterialised the model is rebuilt normally and loaded.
    """
    def build(device: Optional[str], norms_device: Optional[str] = "cpu") -> Distiller:
        if device == "meta":
            with torch.device("meta"):
                return _build(config, registry, origin, norms_device)
        return _build(config, registry, origin, norms_device)

    if state is None:
        return build(None)
    from ..utils import check_dtypes

    # Names and shapes against a build that allocates nothing (target norms on meta too): a
    # config asking for more than the weights file holds is refused before any real tensor exists.
    expected = build("meta", norms_device=None).state_dict()
    _check_shapes(state, expected, origin)
    check_dtypes(state, expected, origin)
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


def _check_shapes(state: dict[str, Tensor], reference: dict[str, Tensor], origin: str) -> None:
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise ExportError(f"{origin}: weights do not match the config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    for key, ref in reference.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ExportError(f"{origin}: weights do not match the config: {key!r} is {tuple(state[key].shape)} in "
                              f"the weights file, the config asks for {tuple(ref.shape)}")


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


def _build(config: dict, registry, origin: str, norms_device: Optional[str] = "cpu") -> Distiller:
    """``norms_device``: where target norms are built (their non-persistent buffers are not in the
    weights file, so a meta-built model that is then assigned keeps them real); None: as the rest."""
    sconf = config["student"]
    try:
        student = registry.build("student", sconf["name"], **dict(sconf.get("args", {})),
                                 num_cls_tokens=int(sconf.get("num_cls_tokens", 1)))
    except PluginError as exc:
        raise ExportError(f"{origin}: student: {exc}") from None
    heads, summary_heads, spatial_heads = [], {}, {}
    for name, entry in config["teachers"].items():
        sdim, pdim = entry.get("summary_dim"), entry.get("spatial_dim")
        layer = entry.get("student_layer")
        heads.append(HeadSpec(name, sdim, pdim, int(layer) if layer is not None else None))
        for kind, dim, table in (("summary", sdim, summary_heads), ("spatial", pdim, spatial_heads)):
            if dim is None:
                continue
            adaptor, args, hidden = _head_spec(config, name, kind)
            try:
                table[name] = registry.build("adaptor", adaptor, in_dim=student.embed_dim, out_dim=int(dim),
                                             hidden_dim=hidden, **args)
            except PluginError as exc:
                raise ExportError(f"{origin}: teacher {name!r} {kind} adaptor: {exc}") from None
    with torch.device(norms_device) if norms_device else contextlib.nullcontext():
        widths = {n: {"summary": e.get("summary_dim"), "spatial": e.get("spatial_dim")}
                  for n, e in config["teachers"].items()}
        norms = _build_target_norms(config.get("target_norms", {}), origin, widths)
    distiller = Distiller(student, heads, summary_heads, spatial_heads, norms)
    distiller.student_name = sconf["name"]
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
            ready = getattr(module, "ready", None)
            if ready is not None and not bool(ready):
                raise ExportError(f"target_norms[{teacher!r}][{kind!r}]: statistics were never estimated, so the "
                                  f"{kind} head's outputs cannot be mapped back to the teacher's space; export "
                                  f"refused (train the teacher, or drop its target_norm)")
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


#: other names a config.json may use for the same classes (short names; the module path after
#: the package layout changed).
_TARGET_NORM_ALIASES = {"standardize": Standardize, "phi_s": PHIS,
                        "radio_core.models.target_norm.Standardize": Standardize,
                        "radio_core.models.target_norm.PHIS": PHIS}


def _target_norm_args(args: Any, where: str, expected_dim: Optional[int] = None) -> dict:
    """``{"dim": positive int, "eps": positive finite float (optional)}`` and nothing else; ``dim``
    must be ``expected_dim``, its teacher's width (a normaliser cannot ask for more)."""
    import math

    if not isinstance(args, dict):
        raise ExportError(f"{where}: args must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - {"dim", "eps"})
    if unknown:
        raise ExportError(f"{where}: unexpected argument(s) {unknown[:5]} (allowed: dim, eps)")
    dim, eps = args.get("dim"), args.get("eps", 1e-6)
    if not (isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= 1 << 20):
        raise ExportError(f"{where}: dim must be an integer in [1, {1 << 20}], got {dim!r:.60}")
    if expected_dim is not None and dim != expected_dim:
        raise ExportError(f"{where}: dim {dim} is not the width of the teacher's target ({expected_dim})")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and 0 < eps <= 1):
        raise ExportError(f"{where}: eps must be a number in (0, 1], got {eps!r:.60}")
    return {"dim": dim, "eps": float(eps)}


def _build_target_norms(spec: dict, origin: str, dims: Optional[dict] = None) -> dict[str, nn.Module]:
    """``dims``: {teacher: {"summary": int | None, "spatial": int | None}} from the config."""
    from ..utils import short_repr

    table = {**_TARGET_NORM_CLASSES, **_TARGET_NORM_ALIASES}
    out: dict[str, nn.Module] = {}
    for teacher, kinds in spec.items():
        parts = {}
        for kind, entry in kinds.items():
            where = f"{origin}: target_norms[{short_repr(teacher)}][{short_repr(kind)}]"
            name = entry.get("class")
            cls = table.get(name) if isinstance(name, str) else None
            if cls is None:
                raise ExportError(f"{where}: refusing class {short_repr(name)}: an export may only name "
                                  f"{', '.join(sorted(set(_TARGET_NORM_NAMES.values())))}")
            if kind not in ("summary", "spatial", ""):
                raise ExportError(f"{where}: the part must be 'summary' or 'spatial'")
            expected = None
            if dims is not None:
                widths = dims.get(teacher) or {}
                expected = widths.get(kind) if kind else (widths.get("spatial") or widths.get("summary"))
                if expected is None:
                    raise ExportError(f"{where}: teacher {short_repr(teacher)} has no {kind or 'target'} of its own")
            try:
                parts[kind] = cls(**_target_norm_args(entry.get("args", {}), where, expected))
            except ValueError as exc:
                raise ExportError(f"{where}: {short_repr(exc, 200, quote=False)}") from None
        out[teacher] = nn.ModuleDict(parts) if "" not in parts else parts[""]
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
