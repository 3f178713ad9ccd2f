"""Helpers shared by the built-in teacher plugins: tiny random models written once to disk,
config fingerprints, and loading transformers models from local directories or the HF cache.

Not a plugin (no entry point): plugins import it as ``radio_plugins._common``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radio_core import Teacher, TeacherOutput


def teacher_facts(teacher: Teacher) -> dict:
    return {k: getattr(teacher, k) for k in
            ("input_size", "patch_size", "summary_dim", "spatial_dim", "mean", "std", "resize_mode")}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


TINY_CACHE = "~/.cache/radio_distill/tiny"


def tiny_dir(plugin: str, cache_dir: Optional[str], cfg: dict) -> Path:
    """Where a tiny model of ``plugin`` with config ``cfg`` is cached."""
    root = Path(os.path.expanduser(cache_dir or TINY_CACHE))
    return root / f"{plugin}-{config_hash(cfg)}"


def write_atomically(directory: Path, write) -> None:
    """Fill a temporary sibling directory, then rename it into place (a concurrent writer of the
    same content may win; its copy is kept)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def randomize_(model: nn.Module, seed: int) -> None:
    """Deterministic random weights for a tiny test model: fan-in scaled normals for matrices,
    1 + noise for parameters initialised to ones (norm scales, layer scales), small noise else."""
    gen = torch.Generator().manual_seed(seed)
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                owner = owners.get(id(p))
                fan_in = p[0].numel() if isinstance(owner, (nn.Linear, nn.Conv2d)) else p.shape[-1]
                p.copy_(noise / fan_in ** 0.5)
            elif p.numel() and bool((p == 1).all()):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)



def tiny_config(plugin: str, defaults: dict, overrides: dict) -> dict:
    """A tiny model's config: ``defaults`` with ``overrides``, refusing keys it does not have."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"{plugin} tiny: unknown options {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **overrides}


def seeded_random(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` under ``seed`` (the global RNG left as it was), then every parameter drawn by
    ``randomize_``: libraries initialise some tables to zero, which would hide layout errors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build()
    randomize_(net, seed)
    return net


def save_tiny_pretrained(directory: Union[str, Path], seed: int, build: Callable[[], nn.Module]) -> dict:
    """A tiny random transformers model written with ``save_pretrained`` into ``directory``
    (atomically; nothing is built when it is already there). Returns the factory args that load
    it: ``{"model": dir}``."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        write_atomically(directory, lambda tmp: seeded_random(build, seed).save_pretrained(tmp))
    return {"model": str(directory)}

# --------------------------------------------------------------------------- open_clip tiny models

#: the tiny open_clip models' weights: safetensors (open_clip reads them), never a pickle
OPEN_CLIP_CHECKPOINT = "open_clip_model.safetensors"
#: a tiny SigLIP-like timm trunk (no class token, attention-pool head) for offline tests
TINY_SIGLIP_TIMM_MODEL = "radio_tiny_siglip_patch16_64"


def tiny_siglip_config(text_cfg: dict) -> dict:
    """An open_clip config of a tiny SigLIP-like model around ``text_cfg``. As open_clip's SigLIP
    configs: a timm trunk (``TINY_SIGLIP_TIMM_MODEL``) with 'map' pooling and no extra
    projection, so the embedding width is the trunk width, and a ``CustomTextCLIP``."""
    vision = {"image_size": 64, "timm_model_name": TINY_SIGLIP_TIMM_MODEL, "timm_model_pretrained": False,
              "timm_pool": "map", "timm_proj": "none"}
    return {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True, "vision_cfg": vision, "text_cfg": text_cfg}


def save_tiny_open_clip(directory: Union[str, Path], name: str, model_cfg: dict, seed: int) -> dict:
    """A tiny random open_clip model as open_clip stores one: ``<name>.json`` (its model config)
    and its state dict in ``OPEN_CLIP_CHECKPOINT``, written atomically into ``directory`` (nothing
    is built when both are there). ``model_cfg["custom_text"]`` picks ``CustomTextCLIP``, as
    open_clip's own ``create_model`` does. Returns the factory args that load it:
    ``{"model": <config json>, "pretrained": <checkpoint>}``."""
    import open_clip

    from radio_core import safetensors_from_legacy_pickle
    from safetensors.torch import save_file

    directory = Path(directory)
    spec = {"model": str(directory / f"{name}.json"), "pretrained": str(directory / OPEN_CLIP_CHECKPOINT)}
    safetensors_from_legacy_pickle(directory / "open_clip_pytorch_model.bin", directory / OPEN_CLIP_CHECKPOINT)
    if (directory / OPEN_CLIP_CHECKPOINT).is_file() and Path(spec["model"]).is_file():
        return spec

    def write(tmp: Path) -> None:
        (tmp / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
        # (the config is registered with open_clip only when loaded, from its final location)
        kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
        model_cls = open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP
        state = seeded_random(lambda: model_cls(**kwargs), seed).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / OPEN_CLIP_CHECKPOINT))

    write_atomically(directory, write)
    return spec


def register_tiny_timm_models() -> None:
    """Register the tiny SigLIP-like timm trunk (idempotent)."""
    import timm
    from timm.models import register_model

    if TINY_SIGLIP_TIMM_MODEL in timm.list_models(TINY_SIGLIP_TIMM_MODEL):
        return

    def radio_tiny_siglip_patch16_64(pretrained: bool = False, **kwargs):
        from timm.models.vision_transformer import VisionTransformer

        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, class_token=False,
                    global_pool="map")
        return VisionTransformer(**{**args, **kwargs})

    radio_tiny_siglip_patch16_64.__module__ = __name__
    register_model(radio_tiny_siglip_patch16_64)


# --------------------------------------------------------------------------- transformers loading


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


class LayerTap:
    """Captures the output of block ``index`` (1-based, as ``hidden_states[index]`` counts;
    negative counts from the end) of ``blocks`` during a forward: intermediate-layer targets."""

    def __init__(self, plugin: str, blocks: nn.ModuleList, index: Optional[int]) -> None:
        self.index = None
        if index is not None:
            n = len(blocks)
            i = index + n + 1 if index < 0 else index
            if not 1 <= i <= n:
                raise ValueError(f"{plugin} teacher: layer {index} is not a block of this {n}-block model "
                                 f"(1..{n}, or negative from the end)")
            self.index = i
        self._blocks, self._out = blocks, None

    def __enter__(self) -> "LayerTap":
        if self.index is not None:
            def hook(_module, _inputs, output):
                self._out = output[0] if isinstance(output, tuple) else output

            self._handle = self._blocks[self.index - 1].register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.index is not None:
            self._handle.remove()

    @property
    def output(self):
        return self._out


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


# --------------------------------------------------------------------------- attention backends
#: ``sdpa``: torch's scaled_dot_product_attention (fused kernels where available);
#: ``xformers``: xformers' memory_efficient_attention (CUDA only; optional extra);
#: ``math``: softmax(q k^T / sqrt(d) + mask) v written out (a reference; what FLOP counters see).
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
_warned: set[str] = set()


def check_attention_backend(plugin: str, backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"student '{plugin}': attention must be one of {', '.join(ATTENTION_BACKENDS)}, "
                         f"got {backend!r}")
    return backend


def xformers_unavailable(device: torch.device) -> Optional[str]:
    """Why xformers cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"xformers needs a CUDA device, the model runs on {device.type}"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install (torch mismatch) falls back too
        return f"xformers is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
           backend: str = "sdpa", dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention of (B, H, N, D) queries, keys and values; ``mask`` is a boolean
    keep-mask broadcastable to (B, H, N, M) (True = attend), as for SDPA. Returns (B, H, N, D).

    ``xformers`` where it cannot run (no CUDA, not installed) falls back to ``sdpa`` with one
    warning line per reason."""
    if backend == "xformers":
        reason = xformers_unavailable(q.device)
        if reason is None:
            return _xformers_attention(q, k, v, mask, dropout)
        if reason not in _warned:
            _warned.add(reason)
            import warnings

            warnings.warn(f"attention backend xformers unavailable ({reason}); using sdpa", stacklevel=2)
        backend = "sdpa"
    if backend == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    attn = scores.softmax(dim=-1)
    if dropout:
        attn = torch.nn.functional.dropout(attn, dropout)
    return attn @ v


def _xformers_attention(q, k, v, mask, dropout):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        b, h, n, m = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers wants an additive bias whose last dimension is 8-aligned in memory
        store = torch.zeros(b, h, n, (m + 7) // 8 * 8, dtype=q.dtype, device=q.device)[..., :m]
        bias = store.masked_fill_(~mask.expand(b, h, n, m), float("-inf"))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, p=dropout)
    return out.transpose(1, 2)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClsTokenViTTeacher(Teacher):
    """A transformers ViT whose ``last_hidden_state`` is ``[CLS, registers..., patches]`` after a
    final norm (DINOv2, DINOv3): summary = CLS, spatial = the patch grid, optionally upsampled;
    ``layer`` taps an intermediate block instead (through the same final norm). Subclasses say
    where the blocks and the final norm are (``PLUGIN``, ``blocks``, ``final_norm``)."""

    PLUGIN = "vit"

    def __init__(self, model: nn.Module, input_size: tuple[int, int], num_registers: int,
                 upsample_to: Optional[tuple[int, int]] = None, layer: Optional[int] = None) -> None:
        super().__init__()
        self.model = model
        #: intermediate-layer target: block ``layer``'s tokens through the final norm
        self.layer = LayerTap(self.PLUGIN, self.blocks(), layer).index
        config = model.config
        self.num_registers = num_registers
        self.input_size = tuple(input_size)
        self.patch_size = int(config.patch_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.summary_dim = self.spatial_dim = int(config.hidden_size)
        self.resize_mode = "resize"
        self.upsample_to = upsample_to

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def fingerprint(self) -> str:
        base = super().fingerprint()
        return base if self.layer is None else f"{base}-layer{self.layer}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        with LayerTap(self.PLUGIN, self.blocks(), self.layer) as tap:
            tokens = self.model(pixel_values=images).last_hidden_state
        if tap.index is not None:  # the tapped block's tokens, normalised like the final ones
            tokens = self.final_norm()(tap.output)
        b, _, height, width = images.shape
        h, w = height // self.patch_size, width // self.patch_size
        spatial = tokens[:, 1 + self.num_registers:].transpose(1, 2).reshape(b, -1, h, w)
        if self.upsample_to is not None and tuple(self.upsample_to) != (h, w):
            spatial = F.interpolate(spatial, size=self.upsample_to, mode="bilinear", align_corners=False)
        return TeacherOutput(summary=tokens[:, 0], spatial=spatial)


def grid_size(value: Optional[Union[int, Sequence[int]]]) -> Optional[tuple[int, int]]:
    """An ``upsample_to`` argument (one int or (h, w)) as (h, w)."""
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)
