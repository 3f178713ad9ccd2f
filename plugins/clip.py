"""CLIP-family teachers through ``open_clip_torch``: DFN CLIP, OpenAI CLIP, MetaCLIP, SigLIP.

Targets (AM-RADIO):
* summary = exactly what ``model.encode_image(x)`` returns, *unnormalised*
  (``normalize=False``): the image embedding in the space the text tower shares. The cosine
  summary loss ignores scale, and zero-shot code normalises both sides itself.
* spatial = the final-layer patch tokens after the image tower's final LayerNorm (``ln_post``
  for open_clip ViTs, ``norm`` for timm towers such as SigLIP), without the projection, as a
  (B, C, h, w) grid. SigLIP has no class token: its summary is the attention-pool output that
  ``encode_image`` returns and every token is a patch token.

Recipe args (``teachers.<name>.args``)::

    model: ViT-H-14-378-quickgelu     # open_clip model name, or a path to a model-config JSON,
                                      # or open_clip's 'local-dir:' / 'hf-hub:' schemas
    pretrained: dfn5b                 # open_clip tag, or a local checkpoint file
    # tiny: true                      # offline: a small random CLIP saved to and loaded from disk

The published teachers (model / pretrained): DFN CLIP ViT-H/14-378 ``ViT-H-14-378-quickgelu`` /
``dfn5b``; OpenAI CLIP ViT-L/14-336 ``ViT-L-14-336`` / ``openai`` (QuickGELU is switched on from
the tag); MetaCLIP ``ViT-H-14-quickgelu`` / ``metaclip_fullcc`` (or ``ViT-L-14-quickgelu``);
SigLIP ``ViT-SO400M-14-SigLIP-384`` / ``webli`` (or ``ViT-B-16-SigLIP``, ...). A local copy of
those weights: the same ``model`` with ``pretrained: /path/to/open_clip_pytorch_model.bin``.

Other resolutions than the native one resample the position embedding once, at load time, with
open_clip's own code (``force_image_size``; bicubic for open_clip ViTs, timm's
``set_input_size`` for timm towers). Only model-library imports happen inside the factory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput, hookimpl

from ._teacher_base import teacher_facts
from ._tiny_models import config_hash, register_tiny_timm_models, save_tiny_open_clip, tiny_config, tiny_siglip_config

PLUGIN = "clip"

#: Defaults of the tiny CLIP (family "clip": an open_clip ViT; family "siglip": a timm ViT
#: without class token and with an attention-pool head, as SigLIP's image tower).
TINY_CLIP = dict(family="clip", embed_dim=32, image_size=64, patch_size=16, width=64, layers=2,
                 head_width=32, text_width=32, text_layers=1, text_heads=2, context_length=16)


class ClipTeacher(Teacher):
    """An open_clip model; forward returns (encode_image, final patch tokens)."""

    def __init__(self, model: nn.Module, model_name: str, input_size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        visual = model.visual
        tower = _vit_tower(visual, model_name)
        self.input_size = tuple(input_size)
        self.patch_size = int(_pair(tower.patch_embed.patch_size if tower is not visual else visual.patch_size)[0])
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.summary_dim = _summary_dim(visual)
        self.spatial_dim = int(tower.num_features if tower is not visual else visual.transformer.width)
        self.resize_mode = "resize"
        self._tokenizer = None

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        # One pass gives both targets: the pooled+projected embedding (what encode_image
        # returns) and the last block's tokens with the final norm applied.
        out = self.model.visual.forward_intermediates(
            images, indices=1, normalize_intermediates=True, output_fmt="NCHW")
        return TeacherOutput(summary=out["image_features"], spatial=out["image_intermediates"][-1])

    # -- text tower, for zero-shot evaluation ---------------------------------------------
    @property
    def tokenizer(self):
        """open_clip's tokenizer for this model (built on first use: SigLIP's is a HF tokenizer
        that needs its files, which a distillation run never does)."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    @property
    def has_text(self) -> bool:
        return getattr(self.model, "text", None) is not None or getattr(self.model, "transformer", None) is not None

    def drop_text_tower(self) -> None:
        """Free the text tower (a third of DFN ViT-H's weights) when no zero-shot is needed."""
        for name in ("text", "transformer", "token_embedding", "ln_final", "positional_embedding",
                     "text_projection", "attn_mask"):
            if getattr(self.model, name, None) is not None:
                setattr(self.model, name, None)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Unnormalised text embeddings (N, summary_dim), in the space of the summary target."""
        if not self.has_text:
            raise RuntimeError(f"{PLUGIN} teacher {self.model_name}: built with text=false, so it has "
                               "no text tower for encode_text")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.model.encode_text(tokens)


# --------------------------------------------------------------------------- factory


def build_clip_teacher(model: Optional[str] = None, pretrained: Optional[str] = None, *,
                       resolution: Optional[Sequence[int]] = None, tiny: Union[bool, dict] = False,
                       cache_dir: Optional[str] = None, meta: bool = False, text: bool = True,
                       quick_gelu: Optional[bool] = None, mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None) -> ClipTeacher:
    """CLIP / SigLIP image tower via open_clip: summary = encode_image, spatial = patch tokens.

    model: open_clip name (``ViT-H-14-378-quickgelu``), a model-config JSON path, or a
    ``local-dir:``/``hf-hub:`` spec. pretrained: open_clip tag (``dfn5b``, ``openai``,
    ``metaclip_fullcc``, ``webli``) or a local checkpoint file. resolution: (H, W) to run at
    (default: the model's native size). tiny: build (once, cached under ``cache_dir``) and load
    a small random CLIP (a dict overrides ``TINY_CLIP``). meta: architecture only, no weights
    (dimension checks, planning). text: keep the text tower for ``encode_text`` (zero-shot);
    false frees its memory in training runs. quick_gelu: force QuickGELU (default: what the tag
    was trained with). mean/std: override the preprocessing statistics.
    """
    import open_clip

    source = _resolve_source(open_clip, model, pretrained, tiny, cache_dir)
    if quick_gelu is None:
        quick_gelu = bool(source.tag_cfg.get("quick_gelu", source.published.get("quick_gelu", False)))
    # The position grid is sized here and a checkpoint's is resampled to it by open_clip on
    # load. A size that is not a multiple of the patch (SigLIP-384 with patch 14) drops the
    # last partial patch, as the published model does: the grid is (H // patch, W // patch).
    native = _native_image_size(source.name) if source.schema is None else None
    size = tuple(resolution) if resolution is not None else native
    kwargs: dict[str, Any] = dict(force_quick_gelu=quick_gelu)
    if size is not None:
        kwargs["force_image_size"] = size
    if meta:
        clip = _create_on_meta(open_clip, source.name, kwargs)
    else:
        weights = source.pretrained if source.tag_cfg else source.checkpoint
        clip = _create_checked(open_clip, source.name, source.label, weights, source.schema, kwargs)

    preprocess = getattr(clip.visual, "preprocess_cfg", {}) or {}
    preprocess = {**preprocess, **{k: v for k, v in source.published.items() if k in ("mean", "std")}}
    if source.tag_cfg:
        preprocess = {**preprocess, "mean": source.tag_cfg["mean"], "std": source.tag_cfg["std"]}
    teacher = ClipTeacher(clip, source.name, input_size=_input_size(clip.visual),
                          mean=mean or preprocess["mean"], std=std or preprocess["std"])
    if not text:
        teacher.drop_text_tower()
    return teacher.freeze()


@dataclass
class _Source:
    """Where a CLIP teacher's architecture and weights come from."""

    name: str  # the open_clip model name (a config JSON registered under its stem)
    label: str  # ``model`` as the recipe gave it, for messages
    schema: Optional[str]  # "local-dir" / "hf-hub", else None (an open_clip name)
    pretrained: Optional[str]  # the recipe's ``pretrained``
    tag_cfg: dict  # open_clip's config of that tag ({} when it is a file or absent)
    checkpoint: Optional[str]  # a local checkpoint file given as ``pretrained``
    published: dict  # what every published tag of the model agrees on (for a local checkpoint)


def _resolve_source(open_clip, model: Optional[str], pretrained: Optional[str], tiny: Union[bool, dict],
                    cache_dir: Optional[str]) -> _Source:
    """Name resolution and checks, no model built: the tiny model (written once), the open_clip
    name, the tag or checkpoint file, with errors that name what is wrong."""
    if tiny or isinstance(tiny, dict):  # `tiny: {}` = the defaults
        if model is not None or pretrained is not None:
            raise ValueError(f"{PLUGIN} teacher: give either tiny or model/pretrained, not both")
        overrides = dict(tiny) if isinstance(tiny, dict) else {}
        spec = make_tiny_clip(_tiny_dir(cache_dir, overrides), **overrides)
        model, pretrained = spec["model"], spec["pretrained"]
    if not model:
        raise ValueError(f"{PLUGIN} teacher needs `model` (an open_clip model name such as "
                         "'ViT-H-14-378-quickgelu') or `tiny: true`")
    model_name = _resolve_model_name(model)
    schema = model_name.split(":", 1)[0] if model_name.startswith(("local-dir:", "hf-hub:")) else None
    if schema is None and open_clip.get_model_config(model_name) is None:
        raise ValueError(f"{PLUGIN} teacher: unknown open_clip model {model_name!r}; see "
                         "open_clip.list_models(), or pass a model-config JSON path")
    tag_cfg: dict = {}
    checkpoint: Optional[str] = None
    if pretrained and schema is None:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            checkpoint = os.path.expanduser(str(pretrained))
            if not os.path.isfile(checkpoint):
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise FileNotFoundError(
                    f"{PLUGIN} teacher: pretrained={pretrained!r} is neither an open_clip tag of "
                    f"{model_name!r} (tags: {', '.join(tags) or 'none'}) nor an existing checkpoint file")
    # A local copy of published weights gets what all of the model's published tags agree on
    # (OpenAI's ViT-L-14-336 weights need QuickGELU; SigLIP's need mean/std 0.5).
    published = _published_defaults(open_clip, model_name) if checkpoint is not None else {}
    return _Source(model_name, model, schema, pretrained, tag_cfg, checkpoint, published)


def _create_on_meta(open_clip, model_name: str, kwargs: dict) -> nn.Module:
    """The architecture alone, on the meta device (dimension checks, planning)."""
    import logging

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # "no pretrained weights loaded" is the point here
    try:
        with torch.device("meta"):
            return open_clip.create_model(model_name, pretrained=None, load_weights=False, device="meta", **kwargs)
    finally:
        root.setLevel(level)


def describe(model: Optional[str] = None, pretrained: Optional[str] = None, **kwargs: Any) -> dict:
    """Declared dimensions and preprocessing of a CLIP teacher, built on the meta device
    (no weights, no download)."""
    return teacher_facts(build_clip_teacher(model, pretrained, meta=True, **kwargs))


def _create_checked(open_clip, model_name: str, label: str, pretrained: Optional[str],
                    schema: Optional[str], kwargs: dict) -> nn.Module:
    """open_clip.create_model with errors that name the model (``label``, as the recipe gave it)
    and the checkpoint."""
    try:
        return open_clip.create_model(model_name, pretrained=pretrained if schema is None else None,
                                      require_pretrained=bool(pretrained) or schema == "local-dir",
                                      **kwargs)
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" in text or "Missing key" in text or "Unexpected key" in text:
            details = "; ".join(line.strip() for line in text.splitlines()[1:4])
            raise ValueError(f"{PLUGIN} teacher: checkpoint {pretrained!r} does not match the "
                             f"architecture {label!r}: {details}") from exc
        if "download" in text.lower() or "hf hub" in text.lower():
            raise RuntimeError(
                f"{PLUGIN} teacher: weights for {label!r} / {pretrained!r} are not available "
                f"offline ({text}). Fetch them where a hub is reachable (they are cached under "
                "HF_HOME), or pass `pretrained` as a local checkpoint file") from exc
        raise


# --------------------------------------------------------------------------- tiny models


def make_tiny_clip(directory: Union[str, Path], seed: int = 0, **overrides: Any) -> dict:
    """Write a small random-initialised CLIP into ``directory`` (unless it is already there):
    ``<name>.json`` (an open_clip model config) and ``open_clip_pytorch_model.bin`` (its state
    dict, open_clip's own checkpoint format). Returns the factory args that load it:
    ``{"model": <config json>, "pretrained": <checkpoint>}``.

    Overrides: any key of ``TINY_CLIP``; ``family="siglip"`` gives a timm image tower without
    class token and with an attention-pool head (fixed 64-wide, 2 blocks, patch 16).
    """
    register_tiny_timm_models()
    cfg = tiny_config(PLUGIN, TINY_CLIP, overrides)
    return save_tiny_open_clip(directory, f"radio-tiny-clip-{config_hash({**cfg, 'seed': seed})}",
                               _open_clip_config(cfg), seed)


def _open_clip_config(cfg: dict) -> dict:
    text = {"context_length": cfg["context_length"], "vocab_size": 49408, "width": cfg["text_width"],
            "heads": cfg["text_heads"], "layers": cfg["text_layers"]}
    if cfg["family"] == "clip":
        vision = {"image_size": cfg["image_size"], "layers": cfg["layers"], "width": cfg["width"],
                  "head_width": cfg["head_width"], "patch_size": cfg["patch_size"]}
        return {"embed_dim": cfg["embed_dim"], "vision_cfg": vision, "text_cfg": text}
    if cfg["family"] == "siglip":
        # The text tower stays a plain open_clip one (its BPE tokenizer ships with open_clip;
        # SigLIP's own needs a download).
        return tiny_siglip_config(text)
    raise ValueError(f"{PLUGIN} tiny: family must be 'clip' or 'siglip', got {cfg['family']!r}")


# --------------------------------------------------------------------------- helpers
# (config_hash, write_atomically, randomize_ and teacher_facts are shared with the dinov2 and
# sam plugins)


def _resolve_model_name(model: str) -> str:
    """A model-config JSON path is registered with open_clip under its file stem."""
    if model.endswith(".json"):
        import open_clip

        path = Path(os.path.expanduser(model))
        if not path.is_file():
            raise FileNotFoundError(f"{PLUGIN} teacher: model config {model!r} does not exist")
        register_tiny_timm_models()  # a custom config may name the tiny SigLIP-like trunk
        if open_clip.get_model_config(path.stem) is None:
            open_clip.add_model_config(path)
        return path.stem
    if model.startswith("local-dir:") and not Path(os.path.expanduser(model[len("local-dir:"):])).is_dir():
        raise FileNotFoundError(f"{PLUGIN} teacher: local directory {model!r} does not exist")
    return model


def _native_image_size(model_name: str) -> tuple[int, int]:
    import open_clip

    size = open_clip.get_model_config(model_name)["vision_cfg"].get("image_size", 224)
    return tuple(_pair(size))  # type: ignore[return-value]


def _published_defaults(open_clip, model_name: str) -> dict:
    """mean/std and quick_gelu on which all published tags of a model agree."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    cfgs = [open_clip.get_pretrained_cfg(model_name, t) for t in tags]
    found: dict = {}
    stats = {(tuple(c["mean"]), tuple(c["std"])) for c in cfgs if "mean" in c}
    if len(stats) == 1:
        found["mean"], found["std"] = stats.pop()
    gelu = {bool(c.get("quick_gelu", False)) for c in cfgs}
    if len(gelu) == 1:
        found["quick_gelu"] = gelu.pop()
    return found


def _vit_tower(visual: nn.Module, model_name: str) -> nn.Module:
    """The ViT whose tokens are the spatial target: open_clip's VisionTransformer itself, or the
    trunk of a timm image tower."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "patch_embed") and hasattr(trunk, "forward_intermediates"):
        return trunk
    if hasattr(visual, "transformer") and hasattr(visual, "forward_intermediates"):
        return visual
    raise ValueError(f"{PLUGIN} teacher: {model_name!r} has a {type(visual).__name__} image tower; only "
                     "ViT towers (open_clip VisionTransformer or timm ViT) give patch-token targets")


def _input_size(visual: nn.Module) -> tuple[int, int]:
    trunk = getattr(visual, "trunk", None)
    size = trunk.patch_embed.img_size if trunk is not None else visual.image_size
    return tuple(int(s) for s in _pair(size))  # type: ignore[return-value]


def _summary_dim(visual: nn.Module) -> int:
    if hasattr(visual, "output_dim"):
        return int(visual.output_dim)
    linears = [m for m in visual.head.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    return int(visual.trunk.num_classes or visual.trunk.num_features)


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _tiny_dir(cache_dir: Optional[str], overrides: dict) -> Path:
    root = Path(os.path.expanduser(cache_dir or "~/.cache/radio_distill/tiny"))
    return root / f"{PLUGIN}-{config_hash({**TINY_CLIP, **overrides})}"


@hookimpl
def radio_register(registry) -> None:
    registry.add("teacher", "clip", build_clip_teacher)


__all__ = ["ClipTeacher", "build_clip_teacher", "describe", "make_tiny_clip", "TINY_CLIP"]
