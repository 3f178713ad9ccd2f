"""Official RADIO checkpoints (``.pth.tar``) in and out.

Read (``load_radio_checkpoint``) an official RADIO training/release checkpoint into this
framework's ``vit`` student + ``mlp`` adaptor heads (a ``Distiller``, wrapped by
``radio_core.model.RadioModel``), and write (``save_radio_checkpoint``) a trained ViT-CPE model
back in that layout, so official tooling (NVlabs/RADIO ``hubconf.radio_model(version=<file>)``)
can load it.

Layout (facts from the official code, NVlabs/RADIO; no code taken from it)
-----------------------------------------------------------------------
The file is a pickled dict ``{"args": argparse.Namespace, "state_dict" | "state_dict_ema": ...}``
(``state_dict_ema`` is preferred when present, as the official loader does).

* ``base_model.patch_generator.embedder.weight`` (D, 3*p*p): bias-free patch projection;
  ``base_model.patch_generator.pos_embed`` (1, (cpe_max_size/p)^2, D): the CPE grid;
  ``base_model.patch_generator.cls_token.token`` (cls + registers, D); ``base_model.blocks.N.*``:
  timm ViT blocks; ``base_model.norm.*`` only when ``args.model_norm``.
* ``input_conditioner.norm_mean`` / ``norm_std`` (3, 1, 1).
* ``_heads.<name|index>.*``: summary MLP; ``_feature_projections.<name|index>.*``: feature MLP.
  MLP v2 = ``fc1``, ``blocks.i.{0: LN, 2: Linear}`` (residual), ``final.{0: LN, 2: Linear}``
  (GELU), i.e. exactly ``radio_core.adaptors.MLPAdaptor``; MLP v1 = ``fc1``, ``norm``, ReLU,
  ``inner.*``, ``fc2``.
* ``_feature_normalizer.{mean, tx}``: applied to the backbone's patch features (and so before
  the feature heads): ``(x - mean) @ tx.T``. ``_intermediate_feature_normalizer.*`` only serves
  intermediate-layer outputs and is ignored here.
* ``args.teachers``: list of dicts (``name``, ``type``, ``use_summary``, ``token_slot``,
  ``mlp_version``, ``fd_upsample_factor``...); ``args.cls_token_per_teacher`` gives one CLS token
  per unique teacher name (else one); registers = the remaining rows of the token table
  (``register_multiple`` / ``cpe_num_registers``). A teacher's summary head reads CLS token
  ``token_slot`` (default: its index in the list); the backbone summary concatenates the CLS
  tokens of teachers with ``use_summary`` (rows = the first list index of each such name, whichever
  heads are imported). A teacher's ``mlp_version`` sets its summary head only; its feature head
  uses its ``spatial_mlp_version``, else ``args.spatial_mlp_version``, else ``args.mlp_version``.
  ``cpe_max_size`` becomes round(cpe_max_size / p) positions per side.
* CLS tokens here: one per teacher with a summary target (officially: one per teacher name, so a
  spatial-only teacher like SAM holds an unread one); written files list teachers in slot order.
* Target normalisation (``phi_s``, ``standardize``) has no place in the format: the writer folds
  each head's de-normalisation x = A y + c into its last linear layer (or refuses to write).
* σReparam in training checkpoints: ``<layer>.parametrizations.weight.original`` plus
  ``...weight.0.{_u,_v,scale,_sn_version}`` (or ``...weight.0.parts.<i>.*`` for per-chunk
  reparametrisation of qkv / w12); folded here into plain weights
  (W * s / (uᵀWv + eps), s = softplus(scale) + 0.05 for version 2, scale for version 1), with
  (u, v) first advanced by ``n_power_iterations`` steps (u first, as torch's spectral_norm) when
  the file is a training state (``state_dict`` and ``args.spectral_reparam``): the official
  loader bakes the parametrisation while its model is in train mode.

Which official versions load
----------------------------
Expected to load: ViT students with CPE built from timm ``vit_{tiny,small,base,large,huge}
_patch<p>_<res>[_mlpnorm]`` names with standard blocks (optional layer scale and MLP norm), MLP
v1 (without inner layers) / v2 heads without feature upsampling. That covers ``radio_v2.5-b``,
``radio_v2.5-l``, ``radio_v2.5-h`` (and ``-h-norm``), ``radio_v2`` / ``radio_v2.1`` (ViT-H/16) and
``radio_v1`` (ViT-H/14). Not supported, refused with an error naming the cause: E-RADIO
(``eradio_v2``: a different backbone), ``radio_v2.5-g`` (DINOv2-architecture wrapper), C-RADIO v2-v4
(SigLIP/so400m, hybrid, qk-norm or HF safetensors variants), heads with ``fd_upsample_factor`` > 1,
MLP v1 heads with inner layers, and attention heads; unsupported heads are skipped with a warning
(an error when asked for by name). None of the real files can be downloaded here: the tests check
files built to this key layout against an independent re-implementation of the official forward.

Safety
------
The official loader unpickles with ``weights_only=False`` (any code in the file runs). Here
``torch.load(weights_only=True)`` is used with only ``argparse.Namespace`` added to torch's
allow-list (tensors, containers, numbers, strings and dtypes are already in it); any other
global is refused with ``RadioFormatError``.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from ..models.activations import HIDDEN_ACTS, from_timm_activation, timm_activation
from ..models.distiller import Distiller
from .export import FeatureNormalizer, build_distiller_from_config

#: what the format needs beyond torch's own weights-only allow-list.
SAFE_GLOBALS: tuple = (argparse.Namespace,)
#: the official version-2 σReparam adds this to softplus(scale).
_SN_ALPHA = 0.05


class RadioFormatError(ValueError):
    """A RADIO-format file that is unsafe, malformed, or uses a model this importer doesn't support."""


@dataclass
class RadioImport:
    distiller: Distiller
    config: dict
    feature_normalizer: Optional[nn.Module]
    args: Any
    #: teacher -> why its heads (or one of them) were not imported
    skipped: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike, extra_safe_globals: Iterable[Any] = ()) -> dict:
    """``torch.load`` with ``weights_only=True`` and the format's allow-list; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RADIO checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_safe_globals]):
            chk = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()), str(exc).splitlines()[0])
        raise RadioFormatError(
            f"{path}: refused to unpickle: the file references code outside the RADIO-format allow-list "
            f"(argparse.Namespace, tensors, containers, dtypes). {detail}. Loading it would execute that code; "
            f"if you trust the file and know the object is harmless, pass it in extra_safe_globals") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a pickle, ...: one line naming the file
        from ..utils import short_repr

        raise RadioFormatError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                               f"{short_repr(exc, 200, quote=False)})") from None
    if not isinstance(chk, dict) or "args" not in chk or not ({"state_dict", "state_dict_ema"} & set(chk)):
        keys = sorted(chk) if isinstance(chk, dict) else type(chk).__name__
        raise RadioFormatError(f"{path}: not a RADIO checkpoint (expected a dict with 'args' and 'state_dict' or "
                               f"'state_dict_ema'; got {keys})")
    return chk


def _arg(args: Any, name: str, default: Any = None) -> Any:
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


def fold_official_spectral(state: dict[str, Tensor], eps: float = 1e-6,
                           power_iterations: int = 0) -> dict[str, Tensor]:
    """Replace official σReparam parametrisation keys by the realised plain ``weight``.

    ``power_iterations``: iterations run on (u, v) before σ is read. The official loader bakes a
    training checkpoint's parametrisation while the model is in train mode, so σ comes after
    ``n_power_iterations`` more steps (1 by default); 0 reads the stored estimates as they are."""
    marker = ".parametrizations.weight.original"
    out = {k: v for k, v in state.items() if ".parametrizations.weight." not in k}
    for key in [k for k in state if k.endswith(marker)]:
        layer = key[: -len(marker)]
        pre = f"{layer}.parametrizations.weight.0."
        sub = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
        weight = state[key].float()
        if any(k.startswith("parts.") for k in sub):
            indices = {int(k.split(".")[1]) for k in sub if k.startswith("parts.")}
            n = 3 if layer.endswith("qkv") else 2 if layer.endswith("w12") else max(indices) + 1
            chunks = weight.split(weight.shape[0] // n, dim=0)
            folded = []
            for i, chunk in enumerate(chunks):
                p = {k[len(f"parts.{i}."):]: v for k, v in sub.items() if k.startswith(f"parts.{i}.")}
                folded.append(_sn_realise(chunk, p, eps, power_iterations) if p else chunk)  # no keys: Identity
            weight = torch.cat(folded, dim=0)
        elif sub:
            weight = _sn_realise(weight, sub, eps, power_iterations)
        out[f"{layer}.weight"] = weight.to(state[key].dtype)
    return out


def _sn_realise(weight: Tensor, p: dict[str, Tensor], eps: float, power_iterations: int) -> Tensor:
    from ..models.spectral import power_iteration, realise

    version = int(p["_sn_version"]) if "_sn_version" in p else 1
    if version not in (1, 2):
        raise RadioFormatError(f"unsupported σReparam version {version}")
    u, v = power_iteration(weight, p["_u"], p["_v"], power_iterations, eps)
    return realise(weight, u, v, p["scale"], version, eps, alpha=_SN_ALPHA)


def _convert_mlp(state: dict[str, Tensor], version: str, where: str) -> tuple[dict[str, Tensor], dict]:
    """Official summary/feature MLP state -> (MLPAdaptor state, MLPAdaptor args + dims)."""
    if version == "v2":
        if any(k.startswith("pre_norm.") for k in state):
            raise RadioFormatError(f"{where}: MLP v2 with pre_norm is not supported")
        num_inner = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        out, args = dict(state), {"num_inner": num_inner, "activation": "gelu"}
        final = "final.2.weight"
    elif version == "v1":
        if any(k.startswith("inner.") for k in state):
            raise RadioFormatError(f"{where}: MLP v1 with inner layers is not supported")
        rename = {"fc1.": "fc1.", "norm.": "final.0.", "fc2.": "final.2."}
        out = {}
        for k, v in state.items():
            prefix = next((p for p in rename if k.startswith(p)), None)
            if prefix is None:
                raise RadioFormatError(f"{where}: unexpected MLP v1 key {k!r}")
            out[rename[prefix] + k[len(prefix):]] = v
        args, final = {"num_inner": 0, "activation": "relu"}, "final.2.weight"
    else:
        raise RadioFormatError(f"{where}: MLP version {version!r} is not supported (v1 and v2 are)")
    if "fc1.weight" not in out or final not in out:
        raise RadioFormatError(f"{where}: incomplete MLP weights (keys {sorted(state)[:6]})")
    dims = {"in_dim": out["fc1.weight"].shape[1], "hidden_dim": out["fc1.weight"].shape[0],
            "out_dim": out[final].shape[0]}
    return out, {**args, **dims}


def _split_heads(state: dict[str, Tensor], prefix: str) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for k, v in state.items():
        if k.startswith(prefix + "."):
            ident, _, rest = k[len(prefix) + 1:].partition(".")
            out.setdefault(ident, {})[rest] = v
    return out


#: the official E-RADIO model names (radio/eradio_model.py); ``model_kwargs`` cannot resize them
ERADIO_MODELS = ("eradio", "eradio_large_fullres_ws16", "eradio_xxxtiny", "eradio_xxxtiny_8x_ws12",
                 "eradio_xxxtiny_8x_ws16")
#: E-RADIO arguments some presets leave open, which a file's ``model_kwargs`` may set
ERADIO_OPEN_KWARGS = ("cpb_mlp_hidden", "conv_groups_ratio", "conv_base")
#: E-RADIO arguments that change its function in ways the ``eradio`` student does not have
ERADIO_REFUSED_KWARGS = ("qkv_bias", "qk_scale", "layer_scale", "layer_scale_conv", "multi_query", "use_shift",
                         "downsample_shuffle", "layer_norm_last", "max_depth", "norm_layer")


def _student_of(args: Any, bb: dict[str, Tensor], num_cls: int) -> tuple[str, dict]:
    """(student plugin, its arguments) for the backbone in the file: ``eradio`` for the official
    E-RADIO, else ``vit`` (ViT with CPE)."""
    model = str(_arg(args, "model", ""))
    if model in ERADIO_MODELS:
        return "eradio", _eradio_student_args(args, model)
    return "vit", _student_args(args, bb, num_cls)


def _eradio_student_args(args: Any, model: str) -> dict:
    kwargs = dict(_arg(args, "model_kwargs", None) or {})
    refused = sorted(k for k in ERADIO_REFUSED_KWARGS if kwargs.get(k) not in (None, False))
    if refused:
        raise RadioFormatError(f"model {model!r}: model_kwargs {refused} change E-RADIO in ways the 'eradio' student "
                               f"does not have")
    student = {"model": model, "model_norm": bool(_arg(args, "model_norm", False))}
    student.update({k: kwargs[k] for k in ERADIO_OPEN_KWARGS if k in kwargs})
    return student


def _student_args(args: Any, bb: dict[str, Tensor], num_cls: int) -> dict:
    model = str(_arg(args, "model", ""))
    if "patch_generator.embedder.weight" not in bb or "patch_generator.pos_embed" not in bb:
        raise RadioFormatError(f"model {model!r} is not supported: ViT students with CPE (base_model.patch_generator.*)"
                               f" and the official E-RADIO ({', '.join(ERADIO_MODELS)}) load into this framework")
    if _arg(args, "cpe_max_size") is None:
        raise RadioFormatError(f"model {model!r} was trained without CPE (args.cpe_max_size is None): not supported")
    if "patch_generator.patch_normalizer.weight" in bb:
        raise RadioFormatError("patch normalisation (patch_generator.patch_normalizer) is not supported")
    emb = bb["patch_generator.embedder.weight"]
    dim, patch = emb.shape[0], math.isqrt(emb.shape[1] // 3)
    if 3 * patch * patch != emb.shape[1]:
        raise RadioFormatError(f"patch embedder weight {tuple(emb.shape)} is not (D, 3*p*p)")
    side = math.isqrt(bb["patch_generator.pos_embed"].shape[1])
    depth = len({k.split(".")[1] for k in bb if k.startswith("blocks.")})
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in bb or "blocks.0.attn.qkv.weight" not in bb:
        raise RadioFormatError(f"model {model!r}: blocks are not timm ViT blocks (no blocks.0.attn.qkv / mlp.fc1)")
    rows = bb["patch_generator.cls_token.token"].shape[0] if "patch_generator.cls_token.token" in bb else 0
    if rows < num_cls:
        raise RadioFormatError(f"the checkpoint has {rows} summary-token rows for {num_cls} teacher CLS tokens")
    kwargs = dict(_arg(args, "model_kwargs", None) or {})
    name = re.sub(r"^(vit_[a-z]+)_patch\d+", rf"\1_patch{patch}", model)
    student = dict(model=name, embed_dim=dim, depth=depth, patch_size=patch,
                   mlp_ratio=bb["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                   qkv_bias="blocks.0.attn.qkv.bias" in bb,
                   init_values=1e-5 if "blocks.0.ls1.gamma" in bb else None,
                   mlp_norm="blocks.0.mlp.norm.weight" in bb, final_norm="norm.weight" in bb,
                   num_registers=rows - num_cls, cpe_max_size=side * patch)
    if kwargs.get("num_heads"):
        student["num_heads"] = int(kwargs["num_heads"])
    if kwargs.get("act_layer") not in (None, "gelu"):
        act = from_timm_activation(str(kwargs["act_layer"]))
        if act is None:
            raise RadioFormatError(f"model {model!r}: model_kwargs.act_layer {kwargs['act_layer']!r} is not one the "
                                   f"'vit' student has ({', '.join(HIDDEN_ACTS.values())})")
        student["hidden_act"] = act
    changed = sorted(k for k in FORWARD_CHANGING_KWARGS if kwargs.get(k) not in (None, False))
    if changed:
        raise RadioFormatError(f"model {model!r}: model_kwargs {changed} change the ViT's forward in ways the 'vit' "
                               f"student does not have")
    return student


#: timm VisionTransformer arguments that change its blocks' function and that no key of the file shows
FORWARD_CHANGING_KWARGS = ("qk_norm", "pre_norm", "norm_layer", "mlp_layer", "block_fn", "attn_layer",
                           "scaled_ln", "proj_bias")


def load_radio_checkpoint(path: str | os.PathLike, registry=None, adaptor_names: Optional[list[str]] = None,
                          extra_safe_globals: Iterable[Any] = ()) -> RadioImport:
    """Official RADIO checkpoint -> ``vit`` student + ``mlp`` heads (fp32), built by the registry.

    ``adaptor_names``: teachers whose heads to import (default: every head that can be; an
    unsupported head is then skipped with a warning instead of an error).
    """
    chk = read_checkpoint(path, extra_safe_globals)
    args = chk["args"]
    state = _model_state(chk, path, args)
    table = _TeacherTable.of(args)
    backbone = {k[len("base_model."):]: v.float() if v.is_floating_point() else v for k, v in state.items()
                if k.startswith("base_model.")}
    plugin, student_args = _student_of(args, backbone, table.num_cls)
    student_args.update(_input_conditioner_args(state))
    embed_dim = _embed_dim(plugin, backbone, student_args)
    heads = _import_heads(path, state, args, table, embed_dim, adaptor_names)
    # E-RADIO's summary is one vector (the mean feature), whatever the teacher list says
    rows = [0] if plugin == "eradio" else _summary_rows(path, table)
    config = _import_config(plugin, student_args, table, heads, rows)
    distiller = _build_imported(path, args, config, registry, backbone, student_args, heads)
    return RadioImport(distiller, config, _feature_normalizer(state, embed_dim), args, heads.skipped)


def _embed_dim(plugin: str, backbone: dict[str, Tensor], student_args: dict) -> int:
    """Width of the backbone's features: the ViT's, or the last E-RADIO neck projection's output."""
    if plugin == "vit":
        return int(student_args["embed_dim"])
    convs = sorted(k for k in backbone if k.startswith("high_res_neck.neck_features_proj.") and k.endswith("conv2.weight"))
    if not convs:
        raise RadioFormatError("an E-RADIO file without its high-resolution neck (high_res_neck.*): the official loader "
                               "reads the neck's features, this one has none")
    return int(backbone[convs[-1]].shape[0])


def _model_state(chk: dict, path: str | os.PathLike, args: Any) -> dict[str, Tensor]:
    """The checkpoint's weights (EMA preferred, as the official loader does): tensors only, finite,
    σReparam folded into plain weights, the old layer-scale name read as ``gamma``."""
    from ..utils import WeightsError, check_finite

    raw = chk["state_dict_ema"] if "state_dict_ema" in chk else chk["state_dict"]
    if not isinstance(raw, dict):
        raise RadioFormatError(f"{path}: state_dict is a {type(raw).__name__}, not a dict of tensors")
    state = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, Tensor)}
    try:
        check_finite(state, str(path))
    except WeightsError as exc:
        raise RadioFormatError(str(exc)) from None
    sr = _arg(args, "spectral_reparam", False)
    eps = float(sr.get("eps", 1e-12)) if isinstance(sr, dict) else 1e-6
    # The official loader parametrises a training state (state_dict with spectral_reparam) and
    # bakes it in train mode: one more power iteration (n_power_iterations) before σ is read.
    steps = int(sr.get("n_power_iterations", 1)) if isinstance(sr, dict) else 1
    state = fold_official_spectral(state, eps, power_iterations=steps if sr and "state_dict_ema" not in chk else 0)
    return {k.replace(".grandma", ".gamma"): v for k, v in state.items()}


@dataclass
class _TeacherTable:
    """``args.teachers`` as the official loader reads it."""

    teachers: list[dict]
    #: one CLS token per unique teacher name (else one for all)
    per_teacher: bool
    num_cls: int
    #: ``args.radio_distill``: what this framework adds (spatial-only teachers, plugins)
    extension: dict

    @classmethod
    def of(cls, args: Any) -> "_TeacherTable":
        teachers = [dict(vars(t)) if isinstance(t, argparse.Namespace) else dict(t)
                    for t in _arg(args, "teachers", []) or []]
        per_teacher = bool(_arg(args, "cls_token_per_teacher", True))
        unique = list(dict.fromkeys(t["name"] for t in teachers))
        num_cls = max(len(unique), 1) if per_teacher else 1
        return cls(teachers, per_teacher, num_cls, _arg(args, "radio_distill", None) or {})

    def known(self) -> set[str]:
        return {t["name"] for t in self.teachers} | set(self.extension.get("teachers", {}))


@dataclass
class _Heads:
    """The imported adaptor heads: export-config entries, their weights (our layout) and slots."""

    entries: dict[str, dict] = field(default_factory=dict)
    states: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)
    #: teacher -> why its heads (or one of them) were not imported
    skipped: dict[str, str] = field(default_factory=dict)

    def hidden_dim(self) -> int:
        return max((e[f"{k}_adaptor"]["hidden_dim"] for e in self.entries.values() for k in ("summary", "spatial")
                    if f"{k}_adaptor" in e), default=0)


def _import_heads(path, state: dict[str, Tensor], args: Any, table: _TeacherTable, embed_dim: int,
                  adaptor_names: Optional[list[str]]) -> _Heads:
    """Every teacher's summary and feature heads (those in ``adaptor_names``, when given), in list
    order, then the spatial-only teachers this framework records in ``args.radio_distill``."""
    wanted = set(adaptor_names) if adaptor_names is not None else None
    if wanted is not None and wanted - table.known():
        raise RadioFormatError(f"{path}: no teacher {sorted(wanted - table.known())} in this checkpoint; "
                               f"it has {sorted(table.known())}")
    versions = _MLPVersions.of(args)
    found = {"summary": _split_heads(state, "_heads"), "spatial": _split_heads(state, "_feature_projections")}
    heads = _Heads()
    seen: set[str] = set()
    listed = [(t["name"], i, t) for i, t in enumerate(table.teachers)]
    extra = [(name, None, {"type": t.get("plugin"), "use_summary": False, **t})
             for name, t in table.extension.get("teachers", {}).items()
             if name in found["spatial"] or name in found["summary"]]
    for name, tidx, tconf in listed + extra:
        if name in seen or (wanted is not None and name not in wanted):
            continue
        seen.add(name)
        _import_teacher_heads(path, heads, found, name, tidx, tconf, table, versions, embed_dim,
                              strict=wanted is not None)
    if heads.skipped and wanted is None:
        warnings.warn(f"{path}: heads not imported: " + "; ".join(f"{k}: {v}" for k, v in heads.skipped.items()),
                      stacklevel=3)
    return heads


@dataclass
class _MLPVersions:
    """Official fallback: a teacher's summary head uses its own ``mlp_version`` else the file's;
    its feature head its own ``spatial_mlp_version`` else the file's spatial (or main) version;
    a teacher-level ``mlp_version`` does not reach the feature head."""

    summary: str
    spatial: str

    @classmethod
    def of(cls, args: Any) -> "_MLPVersions":
        main = str(_arg(args, "mlp_version", "v1") or "v1")
        return cls(main, str(_arg(args, "spatial_mlp_version", None) or main))

    def of_teacher(self, tconf: dict, kind: str) -> str:
        if kind == "summary":
            return str(tconf.get("mlp_version") or self.summary)
        return str(tconf.get("spatial_mlp_version") or self.spatial)


def _import_teacher_heads(path, heads: _Heads, found: dict, name: str, tidx: Optional[int], tconf: dict,
                          table: _TeacherTable, versions: _MLPVersions, embed_dim: int, strict: bool) -> None:
    """One teacher's heads into ``heads``; a head this importer cannot read is an error when the
    teacher was asked for by name (``strict``), else recorded in ``heads.skipped``."""
    entry = {"summary_dim": None, "spatial_dim": None, "plugin": tconf.get("type"),
             "use_summary": bool(tconf.get("use_summary", True))}
    for kind in ("summary", "spatial"):
        sd = found[kind].get(name) or (found[kind].get(str(tidx)) if tidx is not None else None)
        if not sd:
            continue
        where = f"{path}: teacher {name!r} {kind} head"
        try:
            converted, info = _read_head(sd, kind, tconf, versions.of_teacher(tconf, kind), embed_dim, where)
        except RadioFormatError as exc:
            if strict:
                raise
            heads.skipped[name] = f"{heads.skipped[name]}; {exc}" if name in heads.skipped else str(exc)
            continue
        entry[f"{kind}_dim"] = info["out_dim"]
        entry[f"{kind}_adaptor"] = {"name": "mlp", "hidden_dim": info["hidden_dim"],
                                    "args": {"num_inner": info["num_inner"], "activation": info["activation"]}}
        heads.states.setdefault(name, {})[kind] = converted
    if entry["summary_dim"] is not None:
        slot = int(tconf.get("token_slot", tidx if tidx is not None else 0)) if table.per_teacher else 0
        if not 0 <= slot < table.num_cls:
            raise RadioFormatError(f"{path}: teacher {name!r}: token_slot {slot} outside the {table.num_cls} "
                                   f"CLS tokens")
        heads.slots[name] = slot
    if entry["summary_dim"] is not None or entry["spatial_dim"] is not None:
        heads.entries[name] = entry


def _read_head(sd: dict[str, Tensor], kind: str, tconf: dict, version: str, embed_dim: int,
               where: str) -> tuple[dict[str, Tensor], dict]:
    if kind == "spatial" and (tconf.get("fd_upsample_factor") or 1) > 1:
        raise RadioFormatError(f"{where}: feature upsampling (fd_upsample_factor={tconf['fd_upsample_factor']}) "
                               f"is not supported")
    converted, info = _convert_mlp({k: v.float() for k, v in sd.items()}, version, where)
    if info["in_dim"] != embed_dim:
        raise RadioFormatError(f"{where}: input dim {info['in_dim']} != backbone dim {embed_dim}")
    return converted, info


def _input_conditioner_args(state: dict[str, Tensor]) -> dict:
    """The student's ``mean`` / ``std`` from ``input_conditioner.norm_mean`` / ``norm_std``."""
    out = {}
    for arg, key in (("mean", "input_conditioner.norm_mean"), ("std", "input_conditioner.norm_std")):
        if key in state:
            out[arg] = [float(x) for x in state[key].flatten()]
    return out


def _summary_rows(path, table: _TeacherTable) -> list[int]:
    """The backbone summary's CLS rows: the first list index of every teacher name with
    use_summary, whichever heads were imported (as the official loader gathers them)."""
    first: dict[str, int] = {}
    for i, t in enumerate(table.teachers):
        if t.get("use_summary", True):
            first.setdefault(t["name"], i)
    rows = sorted(first.values()) if table.per_teacher and first else [0]
    if max(rows) >= table.num_cls:
        raise RadioFormatError(f"{path}: teachers with use_summary name CLS rows {rows} but the model has "
                               f"{table.num_cls} CLS token(s)")
    return rows


def _import_config(plugin: str, student_args: dict, table: _TeacherTable, heads: _Heads,
                   summary_idxs: list[int]) -> dict:
    """The export config (``radio_core.formats.export``) of the imported model."""
    return {
        "format": "radio-distill-export", "version": 1, "source": "radio", "summary_idxs": summary_idxs,
        "student": {"name": plugin, "args": student_args, "num_cls_tokens": table.num_cls},
        "teachers": heads.entries, "adaptor": {"name": "mlp", "args": {}}, "hidden_dim": heads.hidden_dim(),
        "summary_slots": heads.slots, "resolution": None,
    }


def _build_imported(path, args: Any, config: dict, registry, backbone: dict[str, Tensor], student_args: dict,
                    heads: _Heads) -> Distiller:
    """The distiller of ``config`` with the imported weights, built through the registry."""
    from ..registry import PluginError, get_registry

    state = {f"student.{k}": v for k, v in backbone.items()}
    state["student.norm_mean"] = torch.tensor(student_args.get("mean", _default_mean())).view(3, 1, 1)
    state["student.norm_std"] = torch.tensor(student_args.get("std", _default_std())).view(3, 1, 1)
    for name, kinds in heads.states.items():
        for kind, sd in kinds.items():
            state.update({f"{kind}_heads.{name}.{k}": v for k, v in sd.items()})
    try:
        return build_distiller_from_config(config, registry or get_registry(), state, origin=str(path))
    except PluginError as exc:
        raise RadioFormatError(f"{path}: {exc}") from None
    except ValueError as exc:  # e.g. the vit factory refusing the model name
        raise RadioFormatError(f"{path}: cannot build the student for model {_arg(args, 'model')!r}: {exc}") from None


def _feature_normalizer(state: dict[str, Tensor], dim: int) -> Optional[FeatureNormalizer]:
    if "_feature_normalizer.mean" not in state or "_feature_normalizer.tx" not in state:
        return None
    normalizer = FeatureNormalizer(dim)
    normalizer.load_state_dict({"mean": state["_feature_normalizer.mean"].float(),
                                "tx": state["_feature_normalizer.tx"].float()})
    return normalizer


def _default_mean() -> list[float]:
    return [0.48145466, 0.4578275, 0.40821073]


def _default_std() -> list[float]:
    return [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------ writing
def fold_denormalization(state: dict[str, Tensor], prefix: str, norm: Optional[nn.Module],
                         where: str) -> dict[str, Tensor]:
    """``state`` with the target de-normalisation x = A y + c folded into the linear layer
    ``prefix`` (W' = A W, b' = A b + c, in float64): the head then outputs the teacher's own space."""
    if norm is None:
        return state
    affine = getattr(norm, "inverse_affine", None)
    if affine is None:
        raise RadioFormatError(f"{where}: its target normaliser {type(norm).__name__} has no inverse_affine(), so "
                               f"it cannot be folded into the head; without it the exported head would output "
                               f"normalised targets, not the teacher's features. Export refused")
    try:
        a, c = affine()
    except RuntimeError as exc:
        raise RadioFormatError(f"{where}: {exc}; export refused (the head's outputs cannot be mapped back to the "
                               f"teacher's space)") from None
    w, b = state[f"{prefix}.weight"], state.get(f"{prefix}.bias")
    bias = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    out = dict(state)
    out[f"{prefix}.weight"] = (a @ w.double()).to(w.dtype)
    out[f"{prefix}.bias"] = (a @ bias + c).to(w.dtype)
    return out


def _mlp_state_for_radio(head: nn.Module, where: str,
                         norm: Optional[nn.Module] = None) -> tuple[dict[str, Tensor], str]:
    from ..models.adaptors import MLPAdaptor

    if not isinstance(head, MLPAdaptor):
        raise RadioFormatError(f"{where}: only 'mlp' adaptors have a RADIO layout (got {type(head).__name__})")
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    state = fold_denormalization(state, "final.2", norm, where)
    if isinstance(head.final[1], nn.GELU):
        return state, "v2"
    if len(head.blocks):
        raise RadioFormatError(f"{where}: a ReLU MLP with inner blocks has no RADIO layout (MLP v1 inner layers "
                               f"are not residual)")
    rename = {"final.0.": "norm.", "final.2.": "fc2."}
    out = {}
    for k, v in state.items():
        prefix = next((p for p in rename if k.startswith(p)), None)
        out[(rename[prefix] + k[len(prefix):]) if prefix else k] = v
    return out, "v1"


def save_radio_checkpoint(model, path: str | os.PathLike) -> Path:
    """Write a ``RadioModel`` whose student is the ``vit`` plugin or the official E-RADIO
    (``eradio``, at an official preset) as an official-layout ``.pth.tar``.

    Teachers with a summary head get a CLS slot in ``args.teachers`` (in slot order, so the official
    loader builds the same token count); teachers without one are stored under
    ``_feature_projections.<name>`` and described in ``args.radio_distill`` (the official loader
    ignores both; ``load_radio_checkpoint`` reads them back).
    """
    student = _writable_student(model)
    state = _backbone_state_out(student)
    listed, extension = _teacher_list(model)
    state.update(_heads_out(model.distiller, listed, extension))
    normalizer = model.feature_normalizer
    if isinstance(normalizer, FeatureNormalizer):
        state["_feature_normalizer.mean"] = normalizer.mean.detach().cpu()
        state["_feature_normalizer.tx"] = normalizer.tx.detach().cpu()
    args = _official_args(student, model.config, listed, extension)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"args": args, "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def _writable_student(model):
    """The student, if the official loader can build it: a ViT with CPE (``vit``), or a student
    that names its official model itself (``official_model()``: the official E-RADIO)."""
    student = model.student
    eps = getattr(student, "arch", {}).get("layer_norm_eps", 1e-6)
    if eps != 1e-6:
        raise RadioFormatError(f"the student's LayerNorms use layer_norm_eps={eps}; the official loader builds "
                               f"timm's (1e-6) and its file cannot say otherwise. Use RadioModel.save or "
                               f"save_transformers instead")
    if hasattr(student, "official_model"):
        try:
            student.official_model()
        except ValueError as exc:
            raise RadioFormatError(f"{exc}. Use RadioModel.save (the project's export) instead") from None
        return student
    if getattr(student, "arch", None) is None or not hasattr(student, "patch_generator"):
        plugin = model.config.get("student", {}).get("name")
        raise RadioFormatError(f"only the ViT-CPE student ('vit') and the official E-RADIO ('eradio') have an "
                               f"official RADIO layout; this model's student is {type(student).__name__} (plugin "
                               f"{plugin!r}). Use RadioModel.save (the project's export) instead")
    return student


def _backbone_state_out(student: nn.Module) -> dict[str, Tensor]:
    """The student's plain weights (σReparam folded) under ``base_model.``; its input
    conditioner under ``input_conditioner.``."""
    from ..models.spectral import folded_state_dict

    state: dict[str, Tensor] = {}
    for k, v in folded_state_dict(student).items():
        if k in ("norm_mean", "norm_std"):
            state[f"input_conditioner.{k}"] = v.detach().cpu().float().view(3, 1, 1)
        else:
            state[f"base_model.{k}"] = v.detach().cpu()
    return state


def _teacher_list(model) -> tuple[list[dict], dict[str, dict]]:
    """(``args.teachers``: one entry per CLS slot, in slot order; spatial-only teachers left
    without a slot, for ``args.radio_distill``)."""
    d, teacher_cfg = model.distiller, model.config.get("teachers", {})
    by_slot: dict[int, str] = {}
    for name, slot in sorted(d.summary_slots.items(), key=lambda kv: kv[1]):
        if name in d.summary_heads:
            by_slot.setdefault(slot, name)
    names = [h.name for h in d.heads if h.name in d.summary_heads or h.name in d.spatial_heads]
    spatial_only = [n for n in names if n not in by_slot.values()]
    listed = []
    for slot in range(model.student.num_cls_tokens):
        name = by_slot.get(slot) or (spatial_only.pop(0) if spatial_only else f"unused_slot_{slot}")
        plugin = teacher_cfg.get(name, {}).get("plugin") or "generic"
        use_summary = name in by_slot.values() and teacher_cfg.get(name, {}).get("use_summary", True)
        listed.append({"name": name, "type": plugin, "use_summary": bool(use_summary), "token_slot": slot})
    extension = {name: {"plugin": teacher_cfg.get(name, {}).get("plugin")} for name in spatial_only}
    return listed, extension


def _heads_out(d: Distiller, listed: list[dict], extension: dict[str, dict]) -> dict[str, Tensor]:
    """``_heads.<name>`` / ``_feature_projections.<name>`` with the target de-normalisation folded
    in; records each head's MLP version in its ``listed`` / ``extension`` entry."""
    def target_norm(name: str, kind: str) -> Optional[nn.Module]:
        norms = d.target_norms[name] if name in d.target_norms else {}
        return norms[kind] if kind in norms else None

    state: dict[str, Tensor] = {}
    for entry in listed:
        name, versions = entry["name"], {}
        for kind, table, prefix in (("summary", d.summary_heads, "_heads"),
                                    ("spatial", d.spatial_heads, "_feature_projections")):
            if name in table:
                sd, versions[kind] = _mlp_state_for_radio(table[name], f"teacher {name!r} {kind} head",
                                                          target_norm(name, kind))
                state.update({f"{prefix}.{name}.{k}": v for k, v in sd.items()})
        if "summary" in versions:
            entry["mlp_version"] = versions["summary"]
        if "spatial" in versions:
            entry["spatial_mlp_version"] = versions["spatial"]
            entry.setdefault("mlp_version", versions["spatial"])
    for name, entry in extension.items():
        sd, entry["spatial_mlp_version"] = _mlp_state_for_radio(d.spatial_heads[name], f"teacher {name!r} spatial "
                                                                f"head", target_norm(name, "spatial"))
        state.update({f"_feature_projections.{name}.{k}": v for k, v in sd.items()})
    return state


#: Plain ViT presets the official loader builds (``timm.create_model`` once the official modules
#: registered theirs; tests/fixtures/official/model_names.json), by size: the patch sizes of the
#: ``vit_<size>_patch<p>_224`` names. Each fixes only patch, width, depth and heads, which the
#: written ``model_kwargs`` override, so any of them builds the model the file describes.
OFFICIAL_VIT_PRESETS = {"tiny": (14, 16), "small": (8, 14, 16, 32), "base": (8, 14, 16, 32),
                        "large": (14, 16, 32), "huge": (14, 16)}
#: the one ``_mlpnorm`` name: ``vit_huge_patch16_224`` (sizes from model_kwargs) with a LayerNorm in
#: every MLP
OFFICIAL_MLPNORM_NAME = "vit_huge_patch16_224_mlpnorm"


def official_vit_name(size: str, patch_size: int, mlp_norm: bool) -> str:
    """The model name to write for a ViT student: a name the official loader knows (a preset of
    the student's size and patch, else its size at patch 16; ``OFFICIAL_MLPNORM_NAME`` with an MLP
    norm); the real sizes go into ``model_kwargs``."""
    if mlp_norm:
        return OFFICIAL_MLPNORM_NAME
    size = size if size in OFFICIAL_VIT_PRESETS else "base"
    patch = patch_size if patch_size in OFFICIAL_VIT_PRESETS[size] else 16
    return f"vit_{size}_patch{patch}_224"


def _official_args(student, config: dict, listed: list[dict], extension: dict[str, dict]) -> argparse.Namespace:
    """The ``args`` namespace the official loader builds the model from."""
    if hasattr(student, "official_model"):
        model_name, model_kwargs = student.official_model()
        backbone = dict(cpe_max_size=None, cpe_num_registers=None, model_norm=bool(student.arch["model_norm"]))
    else:
        model_name, model_kwargs, backbone = _official_vit(student)
    teacher_cfg = config.get("teachers", {})
    plugins = {e["name"]: {"plugin": teacher_cfg.get(e["name"], {}).get("plugin")} for e in listed}
    return argparse.Namespace(
        model=model_name, model_kwargs=model_kwargs, pretrained=False, in_chans=None, input_size=None,
        num_classes=0, drop=0.0, drop_path=None, drop_block=None, gp=None, bn_momentum=None, bn_eps=None,
        torchscript=False, initial_checkpoint="", teachers=listed, cls_token_per_teacher=True,
        register_multiple=None, spectral_reparam=False, spectral_heads=False, mlp_version="v2", dtype=torch.float32,
        radio_distill={"format_version": 1, "teachers": {**plugins, **extension}, "student": config.get("student")},
        **backbone,
    )


def _official_vit(student) -> tuple[str, dict, dict]:
    """(model name, model_kwargs, CPE and norm args) of a ViT student."""
    arch = student.arch
    # The official loader makes round(cpe_max_size / p) positions per side: write the exact
    # multiple of the grid this model has (e.g. 1008, not 1000 -> 62 instead of 63).
    cpe_max_size = student.patch_generator.grid_side * arch["patch_size"]
    size = re.match(r"^vit_([a-z]+)", arch["model"] or "vit_base")
    model_name = official_vit_name(size.group(1) if size else "base", arch["patch_size"], arch["mlp_norm"])
    model_kwargs = {"embed_dim": arch["embed_dim"], "depth": arch["depth"], "num_heads": arch["num_heads"],
                    "mlp_ratio": arch["mlp_ratio"], "qkv_bias": arch["qkv_bias"], "patch_size": arch["patch_size"]}
    if arch["init_values"] is not None:
        model_kwargs["init_values"] = arch["init_values"]
    if arch.get("hidden_act", "gelu") != "gelu":
        model_kwargs["act_layer"] = timm_activation(arch["hidden_act"], "student")
    return model_name, model_kwargs, dict(cpe_max_size=cpe_max_size, cpe_num_registers=arch["num_registers"] or None,
                                          model_norm=bool(arch["final_norm"]))


__all__ = ["RadioFormatError", "RadioImport", "SAFE_GLOBALS", "read_checkpoint", "load_radio_checkpoint",
           "save_radio_checkpoint", "fold_official_spectral"]
