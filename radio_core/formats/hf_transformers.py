"""transformers' native RADIO format (``transformers.RadioModel``, the C-RADIO backbone), in and out.

Out: ``save_transformers(model, DIR)`` writes a ``radio_core.model.RadioModel`` whose student is
the ViT-CPE student (plugin ``vit``) as a directory that ``transformers.AutoModel.from_pretrained
(DIR)`` loads with no remote code (``config.json`` with ``model_type: radio`` +
``model.safetensors``), giving the same backbone outputs: ``out.summary`` = our ``summary`` and
``out.features`` (B, h*w, D) = our ``spatial`` (B, D, h, w) flattened. Beside them, transformers
ignores ``radio_distill.json`` (this framework's export config) and ``radio_adaptors.safetensors``
(adaptor heads and target statistics), with which ``RadioModel.load(DIR)`` restores the heads.

In: ``read_transformers_radio(DIR)`` reads such a directory (ours, or a C-RADIO checkpoint
converted by transformers) into the ``vit`` student's key layout, without importing transformers;
the ``vit`` plugin uses it for ``student.args.pretrained: DIR``.

Key mapping (ours -> transformers; facts from transformers' ``modeling_radio.py``):

* ``norm_mean`` / ``norm_std`` -> ``input_conditioner.norm_mean`` / ``norm_std`` (3, 1, 1);
* ``patch_generator.embedder.weight`` -> ``embeddings.patch_projection.weight`` (bias-free);
* ``patch_generator.pos_embed`` -> ``embeddings.position_embedding`` (1, (max_img_size/p)^2, D):
  both resize the grid bilinearly (align_corners=False) to max(h, w)^2 and crop the top-left;
* ``patch_generator.cls_token.token`` -> ``embeddings.cls_register_token`` (cls + registers, D);
* ``blocks.i.attn.qkv`` -> ``encoder.layer.i.attention.{q,k,v}_proj`` (split in thirds),
  ``attn.proj`` -> ``attention.o_proj``, ``norm1/2``, ``mlp.fc1/fc2`` keep their names,
  ``ls1/ls2.gamma`` -> ``layer_scale1/2.lambda1`` (ones without layer scale; on the way in a
  layer scale the student lacks is folded into ``o_proj`` / ``fc2``, which is exact);
* ``summary_idxs`` (buffer): the CLS tokens concatenated into ``summary`` (our ``summary_idxs``).

What transformers' class cannot express is refused in one line: E-RADIO (not a ViT), fixed
windowed attention (``window_size``; every transformers block attends globally), a final
LayerNorm (``final_norm: true``; C-RADIO has none), an MLP LayerNorm (``mlp_norm``) and a RADIO
feature normaliser. ``max_img_size`` is written as the student's grid times the patch size, so
every ``cpe_max_size`` works (1000 at patch 16: 63 positions per side, written as 1008).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HF_MODEL_TYPE = "radio"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
#: this framework's export config (student plugin + args, heads) inside a transformers directory
SIDECAR_CONFIG = "radio_distill.json"
#: the distiller's state without the student (adaptor heads, target statistics)
SIDECAR_WEIGHTS = "radio_adaptors.safetensors"


class TransformersFormatError(ValueError):
    """A model transformers' RadioModel cannot express, or a directory that is not a RADIO one."""


def is_transformers_radio_dir(path: str | os.PathLike) -> bool:
    """A directory whose config.json says ``model_type: radio``."""
    from ..utils import UserFileError, read_user_json

    config = Path(path) / HF_CONFIG
    if not config.is_file():
        return False
    try:
        return read_user_json(config, "transformers config").get("model_type") == HF_MODEL_TYPE
    except (UserFileError, AttributeError):
        return False


# --------------------------------------------------------------------------------- out
def student_to_transformers(student: Any, summary_idxs: list[int]) -> tuple[dict, dict[str, Tensor]]:
    """(``RadioConfig`` arguments, state dict in transformers' layout) of a ViT-CPE student."""
    from ..models.spectral import folded_state_dict

    name = type(student).__name__
    if getattr(student, "arch", None) is None or not hasattr(student, "patch_generator"):
        raise TransformersFormatError(
            f"student {name} cannot be written for transformers: its RadioModel is a plain ViT with CPE "
            f"(the 'vit' student); E-RADIO and other backbones have no transformers class, use --format radio-distill")
    if getattr(student, "window_size", None):
        raise TransformersFormatError(
            f"student {name} runs windowed attention (window_size={student.window_size}), which transformers' "
            f"RadioModel cannot express (all its blocks are global); call set_window_size(None) first")
    # transformers sizes its position grid as max_img_size // patch_size: write the exact multiple
    # of the grid this student has (cpe_max_size 1000 at patch 16 is a 63-position grid: 1008)
    patch, max_size = int(student.patch_size), int(student.patch_generator.grid_side) * int(student.patch_size)
    state = {k: v.detach().to("cpu") for k, v in folded_state_dict(student).items()}
    arch = student.arch
    block0 = student.blocks[0]
    config = dict(
        hidden_size=int(student.embed_dim), num_hidden_layers=int(student.depth),
        num_attention_heads=int(student.num_heads), mlp_ratio=float(arch["mlp_ratio"]),
        hidden_act=str(arch.get("hidden_act", "gelu")),
        layer_norm_eps=float(block0.norm1.eps), qkv_bias=bool(arch["qkv_bias"]), use_swiglu_ffn=False,
        layerscale_value=1.0, num_channels=3, patch_size=patch, max_img_size=max_size,
        num_cls_tokens=int(student.num_cls_tokens), num_registers=int(student.num_registers),
        summary_idxs=[int(i) for i in summary_idxs],
        norm_mean=[float(x) for x in state["norm_mean"].flatten()],
        norm_std=[float(x) for x in state["norm_std"].flatten()])
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return state[key]

    out = {"input_conditioner.norm_mean": take("norm_mean").float().view(3, 1, 1),
           "input_conditioner.norm_std": take("norm_std").float().view(3, 1, 1),
           "embeddings.patch_projection.weight": take("patch_generator.embedder.weight"),
           "embeddings.position_embedding": take("patch_generator.pos_embed"),
           "embeddings.cls_register_token": take("patch_generator.cls_token.token"),
           "summary_idxs": torch.tensor(config["summary_idxs"], dtype=torch.long)}
    dim = config["hidden_size"]
    for i in range(config["num_hidden_layers"]):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{dst}{part}.{p}"] = take(f"{src}{part}.{p}")
        for p in ("weight", "bias"):
            if f"{src}attn.qkv.{p}" in state:
                for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), take(f"{src}attn.qkv.{p}").chunk(3, dim=0)):
                    out[f"{dst}attention.{proj}.{p}"] = chunk.clone()
            out[f"{dst}attention.o_proj.{p}"] = take(f"{src}attn.proj.{p}")
        for j in (1, 2):
            gamma = state.get(f"{src}ls{j}.gamma")
            out[f"{dst}layer_scale{j}.lambda1"] = take(f"{src}ls{j}.gamma") if gamma is not None else torch.ones(dim)
    leftover = sorted(set(state) - used)
    if leftover:
        raise TransformersFormatError(f"student {name} cannot be written for transformers: {_why(leftover)}")
    return config, {k: v.contiguous() for k, v in out.items()}


def _why(keys: list[str]) -> str:
    if any(k.startswith("norm.") for k in keys):
        return ("it ends with a LayerNorm (student.args.final_norm: true) and transformers' RadioModel, like C-RADIO, "
                "has none; train with final_norm: false")
    if any(".mlp.norm." in k for k in keys):
        return "its MLPs hold a LayerNorm (mlp_norm / _mlpnorm), which transformers' RadioModel lacks"
    return f"tensors with no place in transformers' RadioModel: {', '.join(keys[:4])}"


def save_transformers(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` (a ``radio_core.model.RadioModel``) as a transformers RADIO directory,
    with its adaptor heads and export config beside it; returns ``path``."""
    from safetensors.torch import save_file
    from torch import nn

    try:
        from transformers import RadioConfig
        from transformers import RadioModel as HFRadioModel
    except ImportError as exc:
        raise TransformersFormatError(f"--format transformers needs a transformers release with RadioModel "
                                      f"(5.x); this one has none ({exc})") from None
    if not isinstance(model.feature_normalizer, nn.Identity):
        raise TransformersFormatError("this model applies a RADIO feature normaliser to its patch features, which "
                                      "transformers' RadioModel does not hold")
    hf_config, hf_state = student_to_transformers(model.student, list(model.summary_idxs))
    resolution = model.config.get("resolution") or [224, 224]
    config = RadioConfig(image_size=int(resolution[0]), **hf_config)
    config.architectures = ["RadioModel"]
    with torch.device("meta"):
        hf_model = HFRadioModel(config)
    result = hf_model.load_state_dict(hf_state, strict=True, assign=True)
    del result
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(path), safe_serialization=True)
    heads = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.distiller.state_dict().items()
             if not k.startswith("student.")}
    save_file(heads, str(path / SIDECAR_WEIGHTS), metadata={"format": "pt"})
    sidecar = dict(model.config, format="radio-distill-transformers", summary_idxs=list(model.summary_idxs))
    # the weights are written with σReparam folded in: rebuild the student without it
    sidecar["student"] = dict(sidecar["student"], args={**sidecar["student"].get("args", {}), "spectral_reparam": False})
    (path / SIDECAR_CONFIG).write_text(json.dumps(sidecar, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def load_transformers_export(path: str | os.PathLike, registry: Any = None) -> tuple[Any, dict]:
    """(distiller, export config) of a directory written by ``save_transformers``: the student
    from the transformers weights, the heads from ``radio_adaptors.safetensors``."""
    from ..registry import get_registry
    from ..utils import UserFileError, WeightsError, read_safetensors, read_user_json
    from .export import ExportError, build_distiller_from_config

    path = Path(path)
    sidecar, heads_file = path / SIDECAR_CONFIG, path / SIDECAR_WEIGHTS
    for f in (sidecar, heads_file):
        if not f.is_file():
            raise ExportError(f"{path}: a transformers directory without this framework's {f.name}; load it with "
                              f"transformers.AutoModel, or initialise a student from it (student.args.pretrained)")
    try:
        config = read_user_json(sidecar, "export config")
        heads = read_safetensors(heads_file, "adaptor weights")
    except (UserFileError, WeightsError) as exc:
        raise ExportError(str(exc)) from None
    hf_config, hf_state = read_transformers_radio(path)
    layer_scale = bool(config.get("student", {}).get("args", {}).get("init_values"))
    state = {f"student.{k}": v for k, v in transformers_to_student(hf_config, hf_state, layer_scale=layer_scale).items()}
    state.update(heads)
    distiller = build_distiller_from_config(config, registry or get_registry(), state, origin=str(sidecar))
    return distiller, config


#: vit size presets by width (the official exporter names a file's model by its size)
_SIZES = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1280: "vit_huge"}


def load_transformers_radio_model(path: str | os.PathLike, registry: Any = None) -> tuple[Any, dict]:
    """(distiller, export config) of a transformers RadioModel folder without this framework's
    sidecar (a C-RADIO checkpoint as transformers converts it): the ``vit`` student its config
    describes, with its weights (layer scales folded into the layers before them, exactly), and no
    adaptor heads (transformers' class holds none). ``summary_idxs`` is the folder's."""
    from ..registry import get_registry
    from .export import build_distiller_from_config

    config, hf_state = read_transformers_radio(path)
    refuse_unsupported(config)
    hidden, patch = int(config.get("hidden_size", 1280)), int(config.get("patch_size", 16))
    filled = _with_config_defaults(config, hf_state)
    args = dict(model=_SIZES.get(hidden, "vit_base"), embed_dim=hidden, depth=int(config.get("num_hidden_layers", 32)),
                num_heads=int(config.get("num_attention_heads", 16)), patch_size=patch,
                mlp_ratio=float(config.get("mlp_ratio", 4.0)), qkv_bias=bool(config.get("qkv_bias", True)),
                final_norm=False, num_registers=int(config.get("num_registers", 7)),
                cpe_max_size=int(config.get("max_img_size", 2048)) // patch * patch,
                hidden_act=str(config.get("hidden_act", "gelu")),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
                mean=[float(x) for x in filled["input_conditioner.norm_mean"].flatten()],
                std=[float(x) for x in filled["input_conditioner.norm_std"].flatten()])
    export = {"format": "radio-distill-export", "version": 1, "source": "transformers",
              "summary_idxs": summary_rows(config, hf_state),
              "student": {"name": "vit", "args": args, "num_cls_tokens": int(config.get("num_cls_tokens", 3))},
              "teachers": {}, "adaptor": {"name": "mlp", "args": {}}, "hidden_dim": None, "summary_slots": {},
              "resolution": [int(config.get("image_size", 224))] * 2}
    state = {f"student.{k}": v.float() for k, v in transformers_to_student(config, hf_state, layer_scale=False).items()}
    distiller = build_distiller_from_config(export, registry or get_registry(), state, origin=str(path))
    return distiller, export


# ---------------------------------------------------------------------------------- in
def read_transformers_radio(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(config.json as a dict, state dict in transformers' layout) of a transformers RADIO
    directory; safetensors only (no code runs from the files), one file or an index of shards,
    every file checked (regular, finite values) before use."""
    from ..utils import UserFileError, WeightsError, read_safetensors, read_user_json

    path = Path(path)
    config = _radio_config(path)
    if (path / HF_WEIGHTS).is_file():
        files = [path / HF_WEIGHTS]
    elif (path / HF_WEIGHTS_INDEX).is_file():
        try:
            index = read_user_json(path / HF_WEIGHTS_INDEX, "weights index")
            names = sorted(set(index["weight_map"].values()))
        except (UserFileError, KeyError, TypeError, AttributeError) as exc:
            raise TransformersFormatError(f"{path / HF_WEIGHTS_INDEX}: not a weights index ({exc})") from None
        # shard names stay inside the folder: an index cannot point at files elsewhere
        if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                   for n in names):
            raise TransformersFormatError(f"{path / HF_WEIGHTS_INDEX}: shard names must be file names in {path}")
        files = [path / f for f in names]
    else:
        raise TransformersFormatError(f"{path}: no {HF_WEIGHTS} (or {HF_WEIGHTS_INDEX}); only safetensors weights "
                                      f"are read")
    state: dict[str, Tensor] = {}
    for f in files:
        try:  # NaN/inf weights are refused here, whichever command reads the folder
            state.update(read_safetensors(f, "transformers weights"))
        except WeightsError as exc:
            raise TransformersFormatError(str(exc)) from None
    return config, _from_disk_layout(state)


def _radio_config(path: Path) -> dict:
    """config.json of a transformers RadioModel directory, or one line saying what ``path`` is
    instead and what reads it."""
    from ..utils import UserFileError, read_user_json

    if not path.is_dir():
        raise TransformersFormatError(f"{path}: not a directory (a transformers RadioModel is a folder with "
                                      f"{HF_CONFIG} and {HF_WEIGHTS})")
    if not (path / HF_CONFIG).exists():
        raise TransformersFormatError(f"{path}: not a transformers model directory (no {HF_CONFIG}); expected a "
                                      f"RadioModel folder as save_pretrained writes it")
    try:  # a FIFO, a huge file, bad JSON: one line
        config = read_user_json(path / HF_CONFIG, "transformers config")
    except UserFileError as exc:
        raise TransformersFormatError(str(exc)) from None
    if not isinstance(config, dict):
        raise TransformersFormatError(f"{path / HF_CONFIG}: not a JSON object")
    if config.get("format") == "radio-distill-export":
        raise TransformersFormatError(f"{path}: a radio-distill export, not a transformers RadioModel; load it with "
                                      f"RadioModel.load, or start a run from it with student.init")
    if config.get("model_type") != HF_MODEL_TYPE:
        kind = config.get("model_type") or config.get("architectures") or "no model_type"
        raise TransformersFormatError(f"{path}: a transformers {kind!r} model, not a RadioModel (config.json "
                                      f"model_type {config.get('model_type')!r}, expected {HF_MODEL_TYPE!r})")
    return config


#: Every field of transformers' ``RadioConfig`` and what an import does with it; a test holds this
#: table against RadioConfig's fields, so a new field cannot pass unhandled.
#:   student  - the student's architecture must match (``check_student_architecture`` names both)
#:   tokens   - the student's own count; its table is seeded from the checkpoint's (``copy_summary_tokens``)
#:   weights  - a value the weights file holds; the config's where the file lacks it, as transformers does
#:   refused  - anything but the default is refused (the student has no such path)
#:   training - acts in training only (dropout, stochastic depth): no effect on the imported function
#:   none     - no effect on an image forward (metadata, video input, derived sizes, initialisation)
CONFIG_FIELDS = {
    "hidden_size": "student", "num_hidden_layers": "student", "num_attention_heads": "student",
    "mlp_ratio": "student", "qkv_bias": "student", "patch_size": "student", "max_img_size": "student",
    "hidden_act": "student", "layer_norm_eps": "student",
    "num_cls_tokens": "tokens", "num_registers": "tokens",
    "norm_mean": "weights", "norm_std": "weights", "layerscale_value": "weights", "summary_idxs": "weights",
    "use_swiglu_ffn": "refused", "num_channels": "refused",
    "attention_probs_dropout_prob": "training", "drop_path_rate": "training",
    "hidden_dropout_prob": "none", "image_size": "none", "video_temporal_patch_size": "none", "patch_dim": "none",
    "video_patch_dim": "none", "initializer_range": "none",
}


#: transformers stores RADIO weights under the original C-RADIO names and renames them on load
#: (``conversion_mapping.py``, "radio"); the same renames, as prefixes, applied in order.
_DISK_PREFIXES = (("radio_model.model.patch_generator.embedder.", "embeddings.patch_projection."),
                  ("radio_model.model.patch_generator.pos_embed", "embeddings.position_embedding"),
                  ("radio_model.model.patch_generator.cls_token.token", "embeddings.cls_register_token"),
                  ("radio_model.model.blocks.", "encoder.layer."),
                  ("radio_model.input_conditioner.", "input_conditioner."),
                  ("radio_model.summary_idxs", "summary_idxs"))


def _from_disk_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weights as stored on disk (original names, fused qkv) -> transformers' module names; files
    already in module names pass through. Other tensors (C-RADIO's own adaptors, video) are dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in _DISK_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if not key.startswith(("embeddings.", "encoder.layer.", "input_conditioner.", "summary_idxs")) \
                or key.startswith("embeddings.video"):
            continue
        key = key.replace(".attn.proj.", ".attention.o_proj.")
        if ".attn.qkv." in key:
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[key.replace("attn.qkv.", f"attention.{name}.")] = chunk
            continue
        out[key] = value
    return out


def transformers_to_student(config: dict, state: dict[str, Tensor], *, layer_scale: bool) -> dict[str, Tensor]:
    """transformers-layout ``state`` -> the ``vit`` student's layout. ``layer_scale``: whether
    the student has ``ls1/ls2.gamma``; without, each block's ``lambda1`` is folded into the
    linear layer before it (exact)."""
    refuse_unsupported(config)
    state = _with_config_defaults(config, state)
    need = ["embeddings.patch_projection.weight", "embeddings.position_embedding", "embeddings.cls_register_token"]
    for i in range(int(config.get("num_hidden_layers", 32))):
        need += [f"encoder.layer.{i}.{part}.{p}" for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2",
                                                              "attention.o_proj") for p in ("weight", "bias")]
        need += [f"encoder.layer.{i}.attention.{q}_proj.weight" for q in "qkv"]
    missing = [k for k in need if k not in state]
    if missing:
        raise TransformersFormatError(f"the checkpoint lacks {len(missing)} tensor(s) of its architecture, e.g. "
                                      f"{', '.join(missing[:3])}")
    out = {"norm_mean": state["input_conditioner.norm_mean"].float().view(3, 1, 1),
           "norm_std": state["input_conditioner.norm_std"].float().view(3, 1, 1),
           "patch_generator.embedder.weight": state["embeddings.patch_projection.weight"],
           "patch_generator.pos_embed": state["embeddings.position_embedding"],
           "patch_generator.cls_token.token": state["embeddings.cls_register_token"]}
    for i in range(int(config.get("num_hidden_layers", 32))):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{dst}{part}.{p}"] = state[f"{src}{part}.{p}"]
        att = f"{src}attention."
        out[f"{dst}attn.qkv.weight"] = torch.cat([state[f"{att}{q}_proj.weight"] for q in "qkv"], dim=0)
        if f"{att}q_proj.bias" in state:
            out[f"{dst}attn.qkv.bias"] = torch.cat([state[f"{att}{q}_proj.bias"] for q in "qkv"], dim=0)
        out[f"{dst}attn.proj.weight"], out[f"{dst}attn.proj.bias"] = state[f"{att}o_proj.weight"], state[f"{att}o_proj.bias"]
        for j, layer in ((1, "attn.proj"), (2, "mlp.fc2")):
            lam = state.get(f"{src}layer_scale{j}.lambda1")
            if layer_scale:
                out[f"{dst}ls{j}.gamma"] = lam if lam is not None else torch.ones(int(config["hidden_size"]))
            elif lam is not None:
                out[f"{dst}{layer}.weight"] = out[f"{dst}{layer}.weight"] * lam[:, None].to(out[f"{dst}{layer}.weight"])
                out[f"{dst}{layer}.bias"] = out[f"{dst}{layer}.bias"] * lam.to(out[f"{dst}{layer}.bias"])
    return out


def summary_rows(config: dict, state: dict[str, Tensor]) -> list[int]:
    """The CLS rows a transformers RadioModel concatenates into its summary: its ``summary_idxs``
    buffer as saved, else the config's (what transformers initialises the buffer with)."""
    if "summary_idxs" in state:
        return [int(i) for i in state["summary_idxs"].flatten()]
    return [int(i) for i in (config.get("summary_idxs") or [0, 1])]


def refuse_unsupported(config: dict) -> None:
    """The ``refused`` fields of ``CONFIG_FIELDS`` (and ``head_dim``, which transformers' attention
    reads when a config.json sets it), in one line naming the field."""
    if config.get("use_swiglu_ffn"):
        raise TransformersFormatError("the checkpoint uses SwiGLU MLPs (use_swiglu_ffn), which the 'vit' student "
                                      "does not have")
    if int(config.get("num_channels", 3)) != 3:
        raise TransformersFormatError(f"the checkpoint takes num_channels={config['num_channels']} input channels; "
                                      f"the 'vit' student takes RGB (3)")
    hidden, heads = int(config.get("hidden_size", 1280)), int(config.get("num_attention_heads", 16))
    if config.get("head_dim") is not None and int(config["head_dim"]) != hidden // heads:
        raise TransformersFormatError(f"the checkpoint sets head_dim={config['head_dim']} (not hidden_size / "
                                      f"num_attention_heads = {hidden // heads}), which the 'vit' student cannot do")


def _with_config_defaults(config: dict, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What transformers fills from the config when the weights file lacks it: the input
    conditioner (``norm_mean`` / ``norm_std``) and every layer scale (``layerscale_value``)."""
    state = dict(state)
    for key, field, default in (("input_conditioner.norm_mean", "norm_mean", _OPENAI_CLIP_MEAN),
                                ("input_conditioner.norm_std", "norm_std", _OPENAI_CLIP_STD)):
        if key not in state:
            state[key] = torch.tensor(config.get(field) or default, dtype=torch.float32).view(-1, 1, 1)
    value, hidden = float(config.get("layerscale_value", 1.0)), int(config.get("hidden_size", 1280))
    for i in range(int(config.get("num_hidden_layers", 32))):
        for j in (1, 2):
            state.setdefault(f"encoder.layer.{i}.layer_scale{j}.lambda1", torch.full((hidden,), value))
    return state


_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def student_state_from_transformers(path: str | os.PathLike, student: Any, origin: str) -> dict[str, Tensor]:
    """The state dict (``vit`` layout) that gives ``student`` the backbone of the transformers
    RADIO directory ``path``: architectures must match; CLS token i comes from the checkpoint's
    CLS token i mod its count (``copy_summary_tokens``)."""
    config, hf_state = read_transformers_radio(path)
    check_student_architecture(student, config, origin)
    own = student.state_dict()
    new = transformers_to_student(config, hf_state, layer_scale="blocks.0.ls1.gamma" in own)
    key = "patch_generator.cls_token.token"
    new[key] = copy_summary_tokens(own[key], new[key], student.num_cls_tokens, int(config.get("num_cls_tokens", 1)))
    return new


def check_student_architecture(student: Any, config: dict, origin: str) -> None:
    """The student's ViT shape must be the checkpoint's; names both sides of the first difference."""
    try:
        refuse_unsupported(config)
    except TransformersFormatError as exc:
        raise TransformersFormatError(f"{origin}: {exc}") from None
    arch = getattr(student, "arch", {})
    pairs = [("hidden_act", config.get("hidden_act", "gelu"), "hidden_act", arch.get("hidden_act", "gelu")),
             ("layer_norm_eps", float(config.get("layer_norm_eps", 1e-6)), "layer_norm_eps",
              float(arch.get("layer_norm_eps", 1e-6))),
             ("hidden_size", config.get("hidden_size"), "embed_dim", student.embed_dim),
             ("num_hidden_layers", config.get("num_hidden_layers"), "depth", student.depth),
             ("num_attention_heads", config.get("num_attention_heads"), "num_heads", student.num_heads),
             ("patch_size", config.get("patch_size"), "patch_size", student.patch_size),
             ("mlp_ratio", float(config.get("mlp_ratio", 4.0)), "mlp_ratio", float(arch.get("mlp_ratio", 4.0))),
             ("qkv_bias", bool(config.get("qkv_bias", True)), "qkv_bias", bool(arch.get("qkv_bias", True))),
             ("max_img_size // patch_size", int(config.get("max_img_size", 2048)) // int(config.get("patch_size", 16)),
              "cpe_max_size // patch_size", student.patch_generator.grid_side)]
    for theirs, a, ours, b in pairs:
        if a != b:
            raise TransformersFormatError(f"{origin}: {theirs} is {a} in the checkpoint but the student has {ours} "
                                          f"{b}; set student.args to the checkpoint's architecture")


def copy_summary_tokens(ours: Tensor, theirs: Tensor, num_cls: int, their_cls: int) -> Tensor:
    """Our (S + R, D) token table seeded from theirs (S' + R', D): CLS token i from CLS
    ``i mod S'``, registers in order as far as both have them."""
    table = ours.clone()
    for i in range(num_cls):
        table[i] = theirs[i % max(their_cls, 1)]
    regs = min(ours.shape[0] - num_cls, theirs.shape[0] - their_cls)
    if regs > 0:
        table[num_cls:num_cls + regs] = theirs[their_cls:their_cls + regs]
    return table


__all__ = ["TransformersFormatError", "save_transformers", "read_transformers_radio", "student_to_transformers",
           "CONFIG_FIELDS", "summary_rows", "refuse_unsupported",
           "student_state_from_transformers",
           "transformers_to_student", "check_student_architecture", "copy_summary_tokens",
           "is_transformers_radio_dir", "SIDECAR_CONFIG", "SIDECAR_WEIGHTS"]
