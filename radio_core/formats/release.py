"""Start a run from a released model: ``student.init`` in a recipe.

The source is anything ``RadioModel.load`` reads: an official RADIO checkpoint (``.pth.tar``, e.g.
a C-RADIO release), a transformers RadioModel folder (C-RADIO as transformers converts it: the
backbone alone), or a radio-distill export. Two steps, both by the trainer (``radio_core.run`` and
``eval.loading`` see the result through the run's recipe):

* ``resolve_release(recipe)``: the recipe with the release's architecture filled in. The student
  is the release's plugin and arguments (recipe ``student.args`` override them: windows, drop
  path, ...); a ViT keeps the release's count of prefix tokens, registers taking the places of
  CLS tokens no teacher reads (so the function of the backbone is unchanged, see below). Teachers
  the release knows (same name, or ``init.teachers``) get its head architectures
  (``summary_adaptor`` / ``spatial_adaptor``), and must agree with it on dimensions and target
  normalisation; ``init.teachers`` then lists every reused teacher.
* ``load_release_weights(distiller, recipe)``: the release's backbone, the reused heads and their
  target statistics into the freshly built distiller. A ViT's token table is re-ordered: every
  reused teacher's CLS row goes to its slot, a new teacher takes a released register (the
  function of the backbone stays the same: prefix tokens carry no position, so their order is
  free), and what is left fills the registers. A release with a RADIO feature normaliser has it
  folded into each reused spatial head's first layer (exact; the backbone features are then the
  un-normalised ones). With LoRA the weights go under the adapters' base layers.

So step 0 of a continued run computes exactly what the release computes for every teacher it
knows (tests/test_release_init.py). What trains is ``init.train`` (``models.distiller.set_trainable``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..models.distiller import Distiller
from ..utils import real_path
from .export import FeatureNormalizer


class ReleaseError(ValueError):
    """A released model that cannot start this recipe (missing, unreadable, or not matching it)."""


@dataclass
class Release:
    source: str
    #: the released model, fp32, eval, σReparam baked
    model: Any

    @property
    def student(self) -> dict:
        return dict(self.model.config.get("student", {}))

    @property
    def teachers(self) -> dict[str, dict]:
        """Released teachers that have a head: name -> export-config entry."""
        d = self.model.distiller
        return {name: entry for name, entry in self.model.config.get("teachers", {}).items()
                if name in d.summary_heads or name in d.spatial_heads}


_LOADED: dict[tuple, Release] = {}


def load_release(source: str | os.PathLike) -> Release:
    """The released model at ``source`` (kept for the next call with the same unchanged file)."""
    from .radio_model import RadioModel

    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        raise ReleaseError(f"student.init.source: {path} does not exist (an official RADIO checkpoint, a "
                           f"transformers RadioModel folder or a radio-distill export)")
    key = (str(real_path(path)), path.stat().st_mtime_ns)
    if key not in _LOADED:
        try:
            model = RadioModel.load(path)
        except ValueError as exc:  # ExportError, RadioFormatError, TransformersFormatError: one line
            raise ReleaseError(f"student.init.source: {exc}") from None
        _LOADED.clear()  # one at a time: a released model can be large
        _LOADED[key] = Release(str(path), model)
    return _LOADED[key]


def forget_releases() -> None:
    """Drop the kept release (the trainer calls it once the weights are loaded)."""
    _LOADED.clear()


# ----------------------------------------------------------------------------- the recipe
def resolve_release(recipe: Any, registry: Any = None) -> Any:
    """``recipe`` with the release's architecture filled in (see the module docstring); a recipe
    without ``student.init`` is returned as it is. Idempotent."""
    from ..models.teachers import build_teacher
    from ..recipe import Recipe
    from ..registry import get_registry

    init = recipe.student.init
    if init is None:
        return recipe
    registry = registry or get_registry()
    release = load_release(init.source)
    released = release.student
    if recipe.student.name != released.get("name"):
        raise ReleaseError(f"student.name: {recipe.student.name!r}, but the release {release.source} holds a "
                           f"{released.get('name')!r} student; name that plugin")
    dims = {name: _dims(build_teacher(recipe, name, registry, meta=True)) for name in recipe.teachers}
    data = recipe.model_dump(mode="python")
    reused = _reused_teachers(recipe, init, release)
    for name, source in reused.items():
        data["teachers"][name].update(_released_heads(recipe, name, source, release, dims[name]))
    summary_teachers = sum(1 for name, t in recipe.teachers.items() if t.use_summary and dims[name][0] is not None)
    data["student"]["args"] = {**_released_student_args(release, summary_teachers), **recipe.student.args}
    data["student"]["init"]["teachers"] = reused
    return Recipe.model_validate(data)


def _dims(teacher: Any) -> tuple[Optional[int], Optional[int]]:
    return teacher.summary_dim, teacher.spatial_dim


def _reused_teachers(recipe: Any, init: Any, release: Release) -> dict[str, str]:
    """This recipe's teacher -> the released teacher whose heads it reuses."""
    known = release.teachers
    for name, source in init.teachers.items():
        if name not in recipe.teachers:
            raise ReleaseError(f"student.init.teachers.{name}: the recipe has no teacher {name!r}")
        if source not in known:
            raise ReleaseError(f"student.init.teachers.{name}: the release has no heads for {source!r} "
                               f"(it has: {', '.join(known) or 'none'})")
    return {name: init.teachers.get(name, name) for name in recipe.teachers
            if name in init.teachers or name in known}


def _released_heads(recipe: Any, name: str, source: str, release: Release,
                    dims: tuple[Optional[int], Optional[int]]) -> dict:
    """The teacher's recipe fields that make its heads the released ones: per-head adaptor specs;
    its dimensions and target normalisation must be the release's."""
    from .export import _head_spec

    entry, config = release.teachers[source], release.model.config
    teacher = recipe.teachers[name]
    update = {}
    for kind, dim in zip(("summary", "spatial"), dims):
        released_dim = entry.get(f"{kind}_dim")
        wanted = dim if getattr(teacher, f"use_{kind}") else None
        if released_dim is None or wanted is None:
            continue
        if int(released_dim) != int(wanted):
            raise ReleaseError(f"teachers.{name}: plugin {teacher.plugin!r} gives {kind} features of {wanted} "
                               f"channels but the released {source!r} {kind} head outputs {released_dim}")
        adaptor, args, hidden = _head_spec(config, source, kind)
        update[f"{kind}_adaptor"] = {"name": adaptor, "args": {**args, "hidden_dim": hidden}}
    released_norms = {part: spec.get("class") for part, spec in config.get("target_norms", {}).get(source, {}).items()}
    kind = teacher.target_norm
    wanted_norms = {part: kind.get(part, "none") if isinstance(kind, dict) else kind for part in ("summary", "spatial")}
    for part in ("summary", "spatial"):
        have = _NORM_NAMES.get(released_norms.get(part), "none")
        if wanted_norms[part] != have:
            raise ReleaseError(f"teachers.{name}.target_norm: the released {source!r} {part} head predicts "
                               f"{'targets normalised by ' + have if have != 'none' else 'the teacher space'}; "
                               f"set {part}: {have} for it (or rename the teacher to train a fresh head)")
    return update


#: target-norm classes an export names -> the recipe's kind
_NORM_NAMES = {"Standardize": "standardize", "standardize": "standardize", "PHIS": "phi_s", "phi_s": "phi_s",
               None: "none"}


def _released_student_args(release: Release, summary_teachers: int) -> dict:
    """The release's student arguments; a ViT keeps its count of prefix tokens (registers fill
    what the recipe's CLS tokens do not)."""
    args = dict(release.student.get("args", {}))
    args.pop("pretrained", None)
    student = release.model.student
    if hasattr(student, "num_registers") and hasattr(student, "patch_generator"):
        total = int(student.num_cls_tokens) + int(student.num_registers)
        args.pop("register_multiple", None)
        args["num_registers"] = max(total - max(summary_teachers, 1), 0)
    return args


def describe_reuse(recipe: Any) -> str:
    """One line: which teachers reuse released heads, which get fresh ones, which released heads
    no teacher uses (a teacher named differently from the release's is a new one, unless mapped
    in ``student.init.teachers``)."""
    init = recipe.student.init
    release = load_release(init.source)
    reused = init.teachers
    fresh = [name for name in recipe.teachers if name not in reused]
    unused = [name for name in release.teachers if name not in reused.values()]
    parts = [f"student.init: {release.source} ({release.student.get('name')} student, train: {init.train})",
             "reused heads: " + (", ".join(f"{k}<-{v}" if k != v else k for k, v in reused.items()) or "none"),
             "fresh heads: " + (", ".join(fresh) or "none")]
    if unused:
        parts.append(f"released heads not used: {', '.join(unused)} (map them with student.init.teachers)")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the weights
@torch.no_grad()
def load_release_weights(distiller: Distiller, recipe: Any) -> None:
    """The release's backbone, the reused teachers' heads and their target statistics into
    ``distiller`` (built from ``resolve_release(recipe)``); see the module docstring."""
    from ..models.lora import plain_keys

    init = recipe.student.init
    release = load_release(init.source)
    source = release.model.distiller
    state = _student_state(source, distiller, init.teachers)
    state = plain_keys(state, distiller.student)
    result = distiller.student.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if ".lora_" not in k]  # LoRA adapters start as initialised
    if missing or result.unexpected_keys:
        raise ReleaseError(f"student.init.source: {release.source}: the student does not match the release's "
                           f"(missing {missing[:4]}, unexpected {result.unexpected_keys[:4]})")
    normalizer = release.model.feature_normalizer
    for name, released in init.teachers.items():
        for kind in ("summary", "spatial"):
            ours, theirs = getattr(distiller, f"{kind}_heads"), getattr(source, f"{kind}_heads")
            if name in ours and released in theirs:
                head = dict(theirs[released].state_dict())
                if kind == "spatial" and isinstance(normalizer, FeatureNormalizer):
                    head = fold_feature_normalizer(head, normalizer)
                _load_part(ours[name], head, f"teachers.{name} {kind} head")
        if name in distiller.target_norms and released in source.target_norms:
            for part, module in distiller.target_norms[name].items():
                if part in source.target_norms[released]:
                    _load_part(module, source.target_norms[released][part].state_dict(), f"teachers.{name} {part} "
                               f"target statistics")


def _load_part(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ReleaseError(f"{what}: does not match the release's: {detail}") from None


def _student_state(source: Distiller, target: Distiller, reused: dict[str, str]) -> dict[str, Tensor]:
    """The released student's weights for ``target``'s student; a ViT's token table re-ordered."""
    state = {k: v.clone() for k, v in source.student.state_dict().items()}
    key = "patch_generator.cls_token.token"
    own = target.student.state_dict()
    if key in state and key in own:
        state[key] = _token_table(state[key], own[key], source, target, reused)
    return state


def _token_table(theirs: Tensor, ours: Tensor, source: Distiller, target: Distiller,
                 reused: dict[str, str]) -> Tensor:
    """Our (CLS + registers, D) table from the released one: a reused teacher's CLS row at its slot,
    a new teacher's slot from a released register (then an unread released CLS row), the rest of
    the released rows as registers; rows with no released row left keep ours."""
    released_cls = int(source.student.num_cls_tokens)
    read = {name: slot for name, slot in source.summary_slots.items() if name in source.summary_heads}
    rows = {slot: read[reused[name]] for name, slot in target.summary_slots.items()
            if reused.get(name) in read}  # our slot -> released row
    free = [r for r in range(released_cls, theirs.shape[0])] + [r for r in range(released_cls)
                                                               if r not in read.values()]
    free += [r for r in read.values() if r not in rows.values()]
    for _, slot in sorted(target.summary_slots.items(), key=lambda kv: kv[1]):
        if slot not in rows and free:  # a new teacher
            rows[slot] = free.pop(0)
    table = ours.clone()
    for slot, row in rows.items():
        table[slot] = theirs[row]
    first_register = int(target.student.num_cls_tokens)
    for i, row in enumerate(free[:max(table.shape[0] - first_register, 0)]):
        table[first_register + i] = theirs[row]
    return table


def fold_feature_normalizer(head: dict[str, Tensor], normalizer: FeatureNormalizer) -> dict[str, Tensor]:
    """A head reading ``(x - mean) @ tx.T`` as one reading ``x``: its first layer ``fc1`` becomes
    W tx, b - W tx mean (float64, exact up to rounding)."""
    w, b = head["fc1.weight"].double(), head["fc1.bias"].double()
    tx, mean = normalizer.tx.double(), normalizer.mean.double()
    folded = w @ tx
    return {**head, "fc1.weight": folded.to(head["fc1.weight"].dtype),
            "fc1.bias": (b - folded @ mean).to(head["fc1.bias"].dtype)}


__all__ = ["Release", "ReleaseError", "load_release", "forget_releases", "resolve_release", "load_release_weights",
           "fold_feature_normalizer", "describe_reuse"]
