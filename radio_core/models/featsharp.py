"""FeatSharp: a learned upsampler of one teacher's spatial features.

Ranzinger, Heinrich, Molchanov, Catanzaro, Tao, "FeatSharp: Your Vision Model Features, Sharper",
ICML 2025; reference code NVlabs/FeatSharp (read for facts, not copied). C-RADIOv4 uses it to
give SigLIP2 (native 384 px) features at 3x its grid.

Facts taken from the reference code (``upsampler_modules/featsharp.py``, ``featup.py``,
``training_harness.py``, ``layers.py``, ``configs/upsampler/featsharp-3x.yaml``):

* for an upsampling factor ``u`` the input image is ``u`` times the teacher's resolution; the
  teacher runs once on it downsampled to its own resolution (the low-resolution features and
  the summary) and once on each of the ``u x u`` tiles of it, each at its own resolution; the
  tiles' feature maps are stitched into a ``u``-times finer grid (all in one batch);
* a learned per-tile position embedding (``tile_pos``, C x u x u) is added to the stitched tiles;
* the low-resolution features are upsampled by FeatUp's joint bilateral upsampler (JBU): per
  prime factor of ``u`` one level with a 7 x 7 window (radius 3), a spatial Gaussian with a
  learned sigma times a range kernel: softmax over the window of a learned temperature x the dot
  product of 32-d keys projected from the guidance image (1x1 conv, GELU, 1x1 conv);
* the upsampled and the tiled features are concatenated (2C channels) and fused by one
  transformer block with local attention (a 7 x 7 window around each cell) and a SwiGLU FFN
  (hidden 4C) whose output has C channels; the block's residual keeps the first C channels (the
  JBU output), and its layer scales start at 1e-6, so an untrained FeatSharp is the JBU. The 3x
  config uses no LayerNorm in the block (``no-ln``);
* de-biasing: a learned buffer (C x h x w at the teacher's grid, ``BiasBuffer``) is added to
  every teacher output (the low-resolution view, every tile and every training view) so that
  the teacher's fixed-pattern (position-locked) noise cancels;
* features are handled in PHI-S-standardised space (``layers.PHI_Standardize``) and mapped back
  at the output.

Our choices where the code does more than this file: the 3x config feeds JAFAR features in
place of the JBU (``inputs-jafar-tiles``); we keep the paper's JBU + tiles for every factor.
The attention uses a local-window mask through ``scaled_dot_product_attention`` instead of
FlexAttention, without the ALiBi distance bias; the heads are ``gcd(16, 2C)``.
The training procedure is in ``radio_core.train.featsharp``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..protocols import Teacher, TeacherOutput
from ..utils import WeightsError, read_safetensors
from .target_norm import PHIS

FORMAT = "radio-distill featsharp"
FORMAT_VERSION = 1
CACHE_ENV = "RADIO_FEATSHARP_CACHE"
DEFAULT_CACHE = "~/.cache/radio_distill/featsharp"


def prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


class JointBilateralUpsampler(nn.Module):
    """One FeatUp JBU level: ``source`` (B, C, h, w) -> (B, C, f h, f w), each output cell a
    normalised window sum of the bilinearly upsampled source, weighted by a spatial Gaussian
    and by the similarity of guidance-image keys."""

    def __init__(self, factor: int, key_dim: int = 32, radius: int = 3) -> None:
        super().__init__()
        self.factor, self.radius = factor, radius
        self.range_proj = nn.Sequential(nn.Conv2d(3, key_dim, 1), nn.GELU(), nn.Conv2d(key_dim, key_dim, 1))
        self.range_temp = nn.Parameter(torch.zeros(()))  # log temperature
        self.sigma_spatial = nn.Parameter(torch.ones(()))

    def forward(self, source: Tensor, guidance: Tensor) -> Tensor:
        b, c, h, w = source.shape
        size = (h * self.factor, w * self.factor)
        r, d = self.radius, 2 * self.radius + 1
        keys = self.range_proj(F.adaptive_avg_pool2d(guidance, size))
        padded = F.pad(keys, [r] * 4, mode="reflect")
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        offsets = [(dy, dx) for dy in range(d) for dx in range(d)]
        logits = torch.stack([(keys * padded[..., dy:dy + size[0], dx:dx + size[1]]).sum(1) for dy, dx in offsets], 1)
        grid = torch.linspace(-1, 1, d, device=source.device, dtype=keys.dtype)
        spatial = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * self.sigma_spatial ** 2)).reshape(1, -1, 1, 1)
        kernel = F.softmax(temp * logits, dim=1) * spatial
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        up = F.pad(F.interpolate(source, size=size, mode="bilinear", align_corners=False), [r] * 4, mode="reflect")
        out = torch.zeros(b, c, *size, device=source.device, dtype=up.dtype)
        for k, (dy, dx) in enumerate(offsets):  # a window sum without materialising the unfolded tensor
            out = out + kernel[:, k:k + 1].to(up.dtype) * up[..., dy:dy + size[0], dx:dx + size[1]]
        return out


def local_window_mask(h: int, w: int, window: int, device: Any = None) -> Tensor:
    """(h w, h w) booleans: cell i may attend to cell j when j lies in the ``window`` x ``window``
    square around i."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    half = window // 2
    return ((ys[:, None] - ys[None, :]).abs() <= half) & ((xs[:, None] - xs[None, :]).abs() <= half)


class FusionBlock(nn.Module):
    """One transformer block over the cells of the fine grid: local attention on the 2C-channel
    input, then a SwiGLU FFN to C channels added to the input's first C channels."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, window: int, layer_norm: bool = False,
                 init_scale: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.window, self.out_dim = heads, window, out_dim
        self.norm1 = nn.LayerNorm(in_dim) if layer_norm else nn.Identity()
        self.qkv = nn.Linear(in_dim, 3 * in_dim)
        self.proj = nn.Linear(in_dim, in_dim)
        self.scale1 = nn.Parameter(torch.full((in_dim,), init_scale))
        self.norm2 = nn.LayerNorm(in_dim) if layer_norm else nn.Identity()
        hidden = (int(2 * 4 * out_dim / 3) + 7) // 8 * 8  # SwiGLU at hidden 4C (DINOv2's fused sizing)
        self.w12 = nn.Linear(in_dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, out_dim)
        self.scale2 = nn.Parameter(torch.full((out_dim,), init_scale))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = local_window_mask(*grid, self.window, x.device)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)
        x = x + self.scale1 * self.proj(attn)
        a, g = self.w12(self.norm2(x)).chunk(2, dim=-1)
        return x[..., :self.out_dim] + self.scale2 * self.w3(F.silu(a) * g)


@dataclass
class FeatSharpConfig:
    """What fixes a FeatSharp's architecture (stored in its JSON file)."""

    dim: int
    grid: tuple[int, int]  # the teacher's feature grid at its resolution
    factor: int
    window: int = 7
    radius: int = 3
    key_dim: int = 32
    layer_norm: bool = False

    @property
    def heads(self) -> int:
        return math.gcd(16, 2 * self.dim)


class FeatSharp(nn.Module):
    """The upsampler: PHI-S normaliser, de-biasing buffer, tile position embedding, JBU levels and
    the fusion block. ``forward`` takes the guidance image and the normalised, de-biased
    low-resolution and stitched tile features, and returns normalised features ``factor`` times
    finer."""

    def __init__(self, config: FeatSharpConfig) -> None:
        super().__init__()
        self.config = config
        c, (h, w), u = config.dim, config.grid, config.factor
        self.normalizer = PHIS(c)
        self.bias = nn.Parameter(torch.zeros(1, c, h, w))
        self.tile_pos = nn.Parameter(torch.zeros(1, c, u, u))
        self.jbu = nn.ModuleList(JointBilateralUpsampler(f, config.key_dim, config.radius)
                                 for f in prime_factors(u))
        self.fuse = FusionBlock(2 * c, c, config.heads, config.window, config.layer_norm)

    def debias(self, features: Tensor) -> Tensor:
        """Normalised teacher features (any batch, the teacher's grid) + the learned bias."""
        bias = self.bias
        if bias.shape[-2:] != features.shape[-2:]:
            bias = F.interpolate(bias, size=features.shape[-2:], mode="bilinear", align_corners=False)
        return features + bias.to(features.dtype)

    def forward(self, guidance: Tensor, low: Tensor, tiles: Tensor) -> Tensor:
        up = low
        for level in self.jbu:
            up = level(up, guidance)
        h, w = low.shape[-2:]
        tiles = tiles + self.tile_pos.repeat_interleave(h, 2).repeat_interleave(w, 3).to(tiles.dtype)
        x = torch.cat([up, tiles], dim=1)
        b, c2, hh, ww = x.shape
        out = self.fuse(x.flatten(2).transpose(1, 2), (hh, ww))
        return out.transpose(1, 2).reshape(b, -1, hh, ww)


def tile(images: Tensor, u: int) -> Tensor:
    """(B, C, u H, u W) -> (B u^2, C, H, W): row-major tiles of each image."""
    b, c, hh, ww = images.shape
    h, w = hh // u, ww // u
    return images.reshape(b, c, u, h, u, w).permute(0, 2, 4, 1, 3, 5).reshape(b * u * u, c, h, w)


def untile(tiles: Tensor, u: int) -> Tensor:
    """Inverse of ``tile``: (B u^2, C, h, w) -> (B, C, u h, u w)."""
    n, c, h, w = tiles.shape
    return tiles.reshape(n // (u * u), u, u, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n // (u * u), c, u * h, u * w)


def teacher_views(teacher: Teacher, upsampler: FeatSharp, images: Tensor, debias: bool = True
                  ) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """The teacher on ``images`` (B, 3, u H, u W, normalised for it) downsampled to its own
    resolution and on the ``u x u`` tiles, in one batch: (summary, low, stitched tiles), the
    features PHI-S-normalised and (``debias``) de-biased."""
    u = upsampler.config.factor
    size = tuple(teacher.input_size)
    low_in = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = teacher(torch.cat([low_in, tile(images, u)]))
    feats = upsampler.normalizer.normalize_spatial(out.spatial.float())
    if debias:
        feats = upsampler.debias(feats)
    b = images.shape[0]
    summary = None if out.summary is None else out.summary[:b]
    return summary, feats[:b], untile(feats[b:], u)


class FeatSharpTeacher(Teacher):
    """A teacher whose spatial target is upsampled by FeatSharp: it takes a ``factor``-times
    larger input than ``base`` and returns a ``factor``-times finer grid (in the base teacher's
    feature space) and the base's summary of the whole image."""

    def __init__(self, base: Teacher, upsampler: FeatSharp) -> None:
        super().__init__()
        u = upsampler.config.factor
        self.base, self.upsampler = base, upsampler
        self.input_size = (base.input_size[0] * u, base.input_size[1] * u)
        self.patch_size = base.patch_size
        self.mean, self.std, self.resize_mode = base.mean, base.std, base.resize_mode
        self.summary_dim, self.spatial_dim = base.summary_dim, base.spatial_dim

    def _apply(self, fn: Any, recurse: bool = True) -> "FeatSharpTeacher":
        # .to(device, bf16) moves the upsampler but keeps it in fp32: its PHI-S rotation in bf16
        # would add noise to every target
        self.base._apply(fn, recurse)
        self.upsampler._apply(lambda t: fn(t).to(t.dtype), recurse)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> TeacherOutput:
        summary, low, tiles = teacher_views(self.base, self.upsampler, images)
        fine = self.upsampler(images.to(low.dtype), low, tiles)
        spatial = self.upsampler.normalizer.denormalize(fine.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return TeacherOutput(summary=summary, spatial=spatial)


# --------------------------------------------------------------------------- files
def feature_grid(teacher: Teacher) -> tuple[int, int]:
    """The teacher's spatial grid at its resolution (one forward of a blank image)."""
    p = next(iter(teacher.parameters()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return tuple(teacher(torch.zeros(1, 3, *teacher.input_size, device=device, dtype=dtype)).spatial.shape[-2:])


def default_path(plugin: str, fingerprint: str, input_size: tuple[int, int], factor: int) -> Path:
    """Where ``radio featsharp`` writes a teacher's upsampler unless told otherwise."""
    root = Path(os.path.expanduser(os.environ.get(CACHE_ENV, DEFAULT_CACHE)))
    return root / f"{plugin}-{fingerprint}-{input_size[0]}x{input_size[1]}-x{factor}.safetensors"


def identity(plugin: str, args: dict, teacher: Teacher) -> dict:
    """What a FeatSharp file is keyed by: the teacher's plugin, weights + preprocessing fingerprint,
    resolution and feature dimension."""
    return {"plugin": plugin, "args": args, "fingerprint": teacher.fingerprint(),
            "input_size": list(teacher.input_size), "spatial_dim": teacher.spatial_dim}


def save(path: Path, upsampler: FeatSharp, teacher_identity: dict, training: dict) -> Path:
    """``path`` (safetensors: the weights and normaliser) and ``path.json`` beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in upsampler.state_dict().items()}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "teacher": teacher_identity,
            "factor": upsampler.config.factor, "architecture": asdict(upsampler.config), "training": training}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    json_path(path).write_text(json.dumps(meta, indent=1))
    return path


def json_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def load(path: Path, teacher: Teacher, teacher_identity: dict, factor: int, where: str) -> FeatSharp:
    """The FeatSharp at ``path`` for ``teacher``, refusing (one line naming ``where`` and the
    file) a file made for other weights, preprocessing, resolution or factor."""
    path = Path(path)
    meta_file = json_path(path)
    if not path.is_file() or not meta_file.is_file():
        raise WeightsError(f"{where}: no FeatSharp upsampler at {path} (and {meta_file.name}); train it with "
                           f"`radio featsharp RECIPE --teacher NAME`")
    try:
        meta = json.loads(meta_file.read_text())
        arch = dict(meta["architecture"])
        arch["grid"] = tuple(arch["grid"])
        config = FeatSharpConfig(**arch)
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{where}: {meta_file} is not a FeatSharp description ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise WeightsError(f"{where}: {meta_file} is not a {FORMAT} file of version {FORMAT_VERSION}")
    found = meta.get("teacher", {})
    for key in ("fingerprint", "input_size", "spatial_dim"):
        if found.get(key) != teacher_identity[key]:
            raise WeightsError(f"{where}: {path} was trained for another teacher: {key} is {found.get(key)!r} there, "
                               f"{teacher_identity[key]!r} here; retrain it with `radio featsharp`")
    if meta.get("factor") != factor:
        raise WeightsError(f"{where}: {path} upsamples {meta.get('factor')}x, the recipe asks for {factor}x")
    upsampler = FeatSharp(config)
    state = read_safetensors(path, "FeatSharp")
    own = upsampler.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise WeightsError(f"{where}: {path} does not hold the weights its {meta_file.name} describes")
    upsampler.load_state_dict(state)
    return upsampler


__all__ = ["FeatSharp", "FeatSharpConfig", "FeatSharpTeacher", "JointBilateralUpsampler", "default_path",
           "feature_grid", "identity", "load", "save", "teacher_views", "tile", "untile"]
