"""E-RADIO, the official architecture: a hybrid convolution + windowed-attention student.

Registered as student ``eradio``. The module tree and parameter names are those of the official
``ERADIO`` (NVlabs/RADIO ``radio/eradio_model.py``; facts read from it, code written here), so an
official E-RADIO checkpoint's ``base_model.*`` weights load key for key
(``radio_core.formats.radio_checkpoint``) and this model computes what the official one does
(tests/test_student_eradio.py compares against outputs the official code produced):

    patch_embed  conv3x3/2-BN-ReLU (3 -> in_dim), conv3x3/2-BN-ReLU (-> dim)         stride 4
    levels 0, 1  C2f blocks (YOLOv8 CSP: 1x1 conv, ``depth`` 3x3 bottlenecks on half the
                 channels, concat, 1x1 conv; convs with BatchNorm and SiLU), then a
                 3x3/2 conv-BN downsample                                           stride 4, 8
    levels 2, 3  ``depth`` multi-resolution attention blocks. Each runs, in turn, one
                 attention block per entry of ``sr_ratio``: ratio 2 subsamples the map with
                 a 2x2/2 conv, attends in windows, and upsamples with a 2x2/2 transposed
                 conv; ratio 1 starts with a full 3x3 conv + BatchNorm (``pre_conv``). The
                 attention is windowed (``window_size`` tokens per side), its qkv, proj and
                 MLP linears have no bias, and its position information is a Swin-v2
                 continuous position bias: a 2-layer MLP (``cpb_mlp_hidden``) over log-spaced
                 relative coordinates, 16 * sigmoid(.) added to the logits. Every block ends
                 0.5 * x + 0.5 * input. A level whose map is not a multiple of its largest
                 window (window x ratio) is resized (nearest) up to one for the blocks and
                 back after them                                                     stride 16, 32
    neck         from level ``neck_start_stage`` on: each level's map (before its
                 downsample) through nearest upsampling to the neck's stride, a depthwise 3x3
                 conv, BatchNorm and a 1x1 conv to ``full_features_head_dim``, summed   stride 4 * 2^start
    summary      the mean of the neck features (every teacher's summary head reads it)

Inputs must be multiples of 32. The patch tokens are the neck features (``patch_size`` = their
stride: 16 for the published ``neck_start_stage`` 2, 8 for 1). At 224 px the published window
(16 tokens, 32 with the 2x branch) does not tile level 2's 14x14 map, so it is resized to 32x32:
``window_size`` (or ``set_window_size``, the official ``change_window_size``) picks a window that
tiles the input, as the official ``set_optimal_window_size`` does (7 at 224 px, 16 at 512 px).

Presets (``model``): the official names ``eradio_large_fullres_ws16`` (= ``eradio``; 389.6M
parameters), ``eradio_xxxtiny``, ``eradio_xxxtiny_8x_ws12``, ``eradio_xxxtiny_8x_ws16``; every
architectural field can be overridden. ``model_norm`` keeps the final BatchNorm of the last level
(its output is not used; official files have it when trained with ``model_norm``).

Attention backend (``attention``): ``sdpa`` (default), ``xformers`` (CUDA with the optional
extra; otherwise one warning line and sdpa) or ``math`` (the official order of operations).
``radio_plugins.eradio_lite`` is this project's own lighter re-design (student ``eradio_lite``).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radio_core import Student, StudentOutput, hookimpl
from radio_core.models.attention import attend, check_attention_backend

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: the official presets (NVlabs/RADIO ``eradio_model.py``); window_size / sr_ratio are per level
PRESETS: dict[str, dict[str, Any]] = {
    "eradio_large_fullres_ws16": dict(dim=192, in_dim=64, depths=[3, 3, 5, 5], num_heads=[2, 4, 8, 16],
                                      window_size=[None, None, [16, 16], 16], sr_ratio=[1, 1, [2, 1], 1],
                                      conv_base=True, full_features_head_dim=1536, neck_start_stage=2,
                                      cpb_mlp_hidden=512, conv_groups_ratio=0),
    "eradio_xxxtiny": dict(dim=32, in_dim=32, depths=[1, 3, 4, 5], num_heads=[2, 4, 8, 16],
                           window_size=[None, None, [16, 16], 16], sr_ratio=[1, 1, [2, 1], 1], conv_base=True,
                           full_features_head_dim=256, neck_start_stage=2, cpb_mlp_hidden=512, conv_groups_ratio=0),
    "eradio_xxxtiny_8x_ws12": dict(dim=32, in_dim=32, depths=[1, 3, 4, 5], num_heads=[2, 4, 8, 16],
                                   window_size=[None, None, [12, 12], 12], sr_ratio=[1, 1, [2, 1], 1],
                                   conv_base=False, full_features_head_dim=256, neck_start_stage=2,
                                   cpb_mlp_hidden=64, conv_groups_ratio=1),
    "eradio_xxxtiny_8x_ws16": dict(dim=32, in_dim=32, depths=[1, 3, 4, 5], num_heads=[2, 4, 8, 16],
                                   window_size=[None, None, [16, 16], 16], sr_ratio=[1, 1, [2, 1], 1],
                                   conv_base=False, full_features_head_dim=256, neck_start_stage=1,
                                   cpb_mlp_hidden=64, conv_groups_ratio=1),
}
PRESETS["eradio"] = PRESETS["eradio_large_fullres_ws16"]
#: what each preset leaves to ``model_kwargs`` (the rest it fixes: a file cannot change it)
OPEN_FIELDS = {"eradio_large_fullres_ws16": ("cpb_mlp_hidden", "conv_groups_ratio"),
               "eradio_xxxtiny": ("cpb_mlp_hidden", "conv_groups_ratio"),
               "eradio_xxxtiny_8x_ws12": ("conv_base",), "eradio_xxxtiny_8x_ws16": ("conv_base",)}
OPEN_FIELDS["eradio"] = OPEN_FIELDS["eradio_large_fullres_ws16"]


# ----------------------------------------------------------------------------- convolutions
class Conv2d_BN(nn.Module):  # noqa: N801 - the official class's name, for its state-dict keys' sake
    """Conv2d without bias, then BatchNorm (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, 1, groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class ConvBNSiLU(Conv2d_BN):
    """YOLOv8's ``Conv``: same-padded conv, BatchNorm, SiLU (keys ``conv.*``, ``bn.*``)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1) -> None:
        super().__init__(c_in, c_out, kernel_size, 1, kernel_size // 2)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(c, c, 3), ConvBNSiLU(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP block: split the channels of a 1x1 conv in two, run ``n`` bottlenecks on one half,
    concatenate every intermediate, fuse with a 1x1 conv."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.c = c // 2
        self.cv1 = ConvBNSiLU(c, 2 * self.c, 1)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class PatchEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(Conv2d_BN(3, in_dim, 3, 2, 1), nn.ReLU(), Conv2d_BN(in_dim, dim, 3, 2, 1),
                                       nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_down(self.proj(x))


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.Identity()
        self.reduction = Conv2d_BN(dim, 2 * dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(x))


# ----------------------------------------------------------------------------- windowed attention
def window_partition(x: Tensor, ws: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, H, W) -> (B * windows, ws * ws, C) in raster order of windows and of tokens within a
    window (a map that is not a multiple of ``ws`` is reflect-padded); ws 0 or the whole map: one
    window."""
    b, c, h, w = x.shape
    if ws == 0 or (ws == h and ws == w):
        return x.flatten(2).transpose(1, 2), (h, w)
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    hp, wp = h + ph, w + pw
    x = x.view(b, c, hp // ws, ws, wp // ws, ws).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def window_reverse(windows: Tensor, ws: int, h: int, w: int, padded: tuple[int, int]) -> Tensor:
    """The inverse of ``window_partition``: (B * windows, ws * ws, C) -> (B, C, H, W)."""
    hp, wp = padded
    c = windows.shape[2]
    if ws == 0 or (ws == h and ws == w):
        return windows.transpose(1, 2).reshape(-1, c, h, w)
    b = windows.shape[0] // ((hp // ws) * (wp // ws))
    x = windows.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hp, wp)
    return x[:, :, :h, :w].contiguous() if (hp > h or wp > w) else x


class PosEmbMLPSwinv2D(nn.Module):  # noqa: N801 - the official class's name
    """Swin-v2 continuous position bias of a ``window_size`` window: ``cpb_mlp`` maps the
    log-spaced relative coordinates of every token pair to one logit bias per head, squashed to
    16 * sigmoid. Coordinates are normalised by the window the model was built with
    (``pretrained_window_size``), so a changed window reads the same MLP further out."""

    def __init__(self, window_size: list[int], pretrained_window_size: list[int], num_heads: int, seq_length: int,
                 cpb_mlp_hidden: int = 512) -> None:
        super().__init__()
        self.window_size, self.pretrained_window_size = list(window_size), list(pretrained_window_size)
        self.num_heads, self.seq_length = num_heads, seq_length
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_mlp_hidden, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_mlp_hidden, num_heads, bias=False))
        coords, index = self._tables(self.window_size)
        self.register_buffer("relative_coords_table", coords)
        self.register_buffer("relative_position_index", index)
        # kept (and saved) as the official module keeps it: the last bias computed, which its deploy
        # mode reads; refreshed before every state_dict() so a saved file holds the current one
        self.register_buffer("relative_bias", torch.zeros(1, num_heads, seq_length, seq_length))
        self._table_window = list(self.window_size)
        self.register_state_dict_pre_hook(lambda module, *_: module.refresh_bias())

    @torch.no_grad()
    def refresh_bias(self) -> None:
        if not self.relative_coords_table.is_meta:
            self.bias()

    def _tables(self, window: list[int]) -> tuple[Tensor, Tensor]:
        wh, ww = window
        rel_h = torch.arange(-(wh - 1), wh, dtype=torch.float32)
        rel_w = torch.arange(-(ww - 1), ww, dtype=torch.float32)
        table = torch.stack(torch.meshgrid([rel_h, rel_w], indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
        norm = self.pretrained_window_size if self.pretrained_window_size[0] > 0 else window
        table[:, :, :, 0] /= norm[0] - 1
        table[:, :, :, 1] /= norm[1] - 1
        table *= 8  # to [-8, 8], then log-spaced into [-1, 1]
        table = torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)
        coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += wh - 1
        rel[:, :, 1] += ww - 1
        rel[:, :, 0] *= 2 * ww - 1
        return table, rel.sum(-1)

    def bias(self) -> Tensor:
        """(1, heads, N, N): the bias of the current window."""
        if self.window_size != self._table_window:  # set_window_size changed it
            coords, index = self._tables(self.window_size)
            self.relative_coords_table = coords.to(self.relative_coords_table.device)
            self.relative_position_index = index.to(self.relative_position_index.device)
            self._table_window = list(self.window_size)
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        bias = (16 * torch.sigmoid(bias)).unsqueeze(0)
        self.relative_bias = bias.detach()  # as the official module keeps its last bias (read in deploy mode)
        return bias

    def forward(self, logits: Tensor) -> Tensor:
        return logits + self.bias()


class WindowAttention(nn.Module):
    """Multi-head attention over the tokens of a window, bias-free projections, the continuous
    position bias on the logits."""

    def __init__(self, dim: int, num_heads: int, resolution: int, cpb_mlp_hidden: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"student 'eradio': level dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = "sdpa"  # see ERADIOStudent.set_attention_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.pos_emb_funct = PosEmbMLPSwinv2D([resolution, resolution], [resolution, resolution], num_heads,
                                              resolution ** 2, cpb_mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.pos_emb_funct.bias()
        if self.backend == "math":  # the official order of operations
            attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
            y = attn @ v
        else:
            y = attend(q, k, v, bias.to(q.dtype), self.backend)
        return self.proj(y.transpose(1, 2).reshape(b, -1, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GRAAttentionBlock(nn.Module):  # noqa: N801 - the official class's name
    """One attention block at ``subsample_ratio``: resample, window, attend, MLP, un-window, resample
    back; 0.5 * output + 0.5 * input. Ratio 1 starts with a residual 3x3 conv + BN (``pre_conv``:
    full, depthwise for ``conv_groups_ratio`` 1, none for -1)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, subsample_ratio: int, conv_base: bool,
                 do_windowing: bool, cpb_mlp_hidden: int, conv_groups_ratio: float, drop_path: float) -> None:
        super().__init__()
        from timm.layers import DropPath

        self.do_windowing, self.subsample_ratio, self.window_size = do_windowing, subsample_ratio, window_size
        r = subsample_ratio
        if do_windowing:
            if conv_base:
                self.downsample_op = nn.Conv2d(dim, dim, kernel_size=r, stride=r) if r > 1 else nn.Identity()
                self.downsample_mixer = nn.Identity()
                self.upsample_mixer = nn.Identity()
                self.upsample_op = nn.ConvTranspose2d(dim, dim, kernel_size=r, stride=r) if r > 1 else nn.Identity()
            else:
                self.downsample_op = nn.AvgPool2d(kernel_size=r, stride=r) if r > 1 else nn.Identity()
                self.downsample_mixer = Conv2d_BN(dim, dim) if r > 1 else nn.Identity()
                self.upsample_mixer = nn.Upsample(scale_factor=r, mode="nearest") if r > 1 else nn.Identity()
                self.upsample_op = Conv2d_BN(dim, dim) if r > 1 else nn.Identity()
        if r == 1:
            groups = max(1, int(conv_groups_ratio * dim))
            self.pre_conv = Conv2d_BN(dim, dim, 3, 1, 1, groups=groups) if conv_groups_ratio != -1 else nn.Identity()
            self.pre_conv_act = nn.Identity()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, cpb_mlp_hidden)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        skip = x
        if self.subsample_ratio == 1:
            x = self.pre_conv_act(self.pre_conv(x)) + skip
        if self.do_windowing:
            x = self.downsample_mixer(self.downsample_op(x))
            h, w = x.shape[2], x.shape[3]
            x, padded = window_partition(x, self.window_size)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        if self.do_windowing:
            x = window_reverse(x, self.window_size, h, w, padded)
            x = self.upsample_op(self.upsample_mixer(x))
            if x.shape[2:] != skip.shape[2:]:  # odd maps: the resampled one is cut or reflected to size
                x = F.pad(x, (0, skip.shape[3] - x.shape[3], 0, skip.shape[2] - x.shape[2]), mode="reflect")
        return 0.5 * x + 0.5 * skip


class MultiResolutionAttention(nn.Module):
    """One ``GRAAttentionBlock`` per entry of ``sr_ratio``, in turn."""

    def __init__(self, dim: int, num_heads: int, window_size: list[int], sr_ratio: list[int], **kwargs: Any) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            GRAAttentionBlock(dim, num_heads, window_size[i] if len(window_size) > i else window_size[0], r, **kwargs)
            for i, r in enumerate(sr_ratio))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.attention_blocks:
            x = block(x)
        return x


class ERADIOLayer(nn.Module):
    """A level: C2f convolutions (``conv``) or multi-resolution attention blocks, then an optional
    downsample; returns (downsampled, before the downsample)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Any, conv: bool, downsample: bool,
                 sr_ratio: Any, conv_base: bool, cpb_mlp_hidden: int, conv_groups_ratio: float,
                 drop_path: list[float]) -> None:
        super().__init__()
        self.transformer = not conv
        if conv:
            self.blocks = C2f(dim, depth)
        else:
            windows = window_size if isinstance(window_size, list) else [window_size]
            self.sr_ratio = sr_ratio if isinstance(sr_ratio, list) else [sr_ratio]
            self.window_size = windows[0]
            # one windowing around all blocks only when nothing resamples and convs are off
            single = all(r == 1 for r in self.sr_ratio) and len(set(windows)) == 1 and conv_groups_ratio == -1
            self.do_single_windowing = single
            self.blocks = nn.Sequential(*[
                MultiResolutionAttention(dim, num_heads, windows, self.sr_ratio, conv_base=conv_base,
                                         do_windowing=not single, cpb_mlp_hidden=cpb_mlp_hidden,
                                         conv_groups_ratio=conv_groups_ratio, drop_path=drop_path[i])
                for i in range(depth)])
        self.downsample = Downsample(dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2], x.shape[3]
        if self.transformer:
            step = max(r * self.window_size for r in self.sr_ratio)
            if h % step or w % step:  # windows must tile the map: resize up to the next multiple
                x = F.interpolate(x, size=(math.ceil(h / step) * step, math.ceil(w / step) * step), mode="nearest")
            if self.do_single_windowing:
                hh, ww = x.shape[2], x.shape[3]
                x, padded = window_partition(x, self.window_size)
        x = self.blocks(x)
        if self.transformer:
            if self.do_single_windowing:
                x = window_reverse(x, self.window_size, hh, ww, padded)
            x = F.interpolate(x, size=(h, w), mode="nearest")
        return (x if self.downsample is None else self.downsample(x)), x


class InterpolateLayer(nn.Module):
    def __init__(self, scale_factor: int) -> None:
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: Tensor) -> Tensor:
        if self.scale_factor == 1:
            return x
        return F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")


class HiResNeck(nn.Module):
    """Levels ``neck_start_stage``.. projected to ``full_features_head_dim`` channels at the stride of
    the first of them and summed."""

    def __init__(self, dim: int, depths: Sequence[int], neck_start_stage: int, head_dim: int,
                 downsample_enabled: list[bool]) -> None:
        super().__init__()
        self.neck_start_stage = neck_start_stage
        self.neck_features_proj = nn.ModuleList()
        upsample = 1
        for i in range(len(depths)):
            level_dim = int(dim * 2 ** i)
            if i < neck_start_stage:
                continue
            proj = nn.Sequential()
            if upsample > 1 or head_dim != level_dim:
                proj.add_module("upsample", InterpolateLayer(upsample))
                proj.add_module("conv1", nn.Conv2d(level_dim, level_dim, 3, 1, 1, groups=level_dim))
                proj.add_module("norm", nn.BatchNorm2d(level_dim))
                proj.add_module("conv2", nn.Conv2d(level_dim, head_dim, 1))
            self.neck_features_proj.append(proj)
            if i > 0 and downsample_enabled[i]:
                upsample *= 2

    def forward(self, x: Tensor, level: int, full: Optional[Tensor]) -> Optional[Tensor]:
        if level < self.neck_start_stage:
            return full
        proj = self.neck_features_proj[level - self.neck_start_stage](x)
        if full is None:
            return proj
        if proj.shape[2:] != full.shape[2:]:
            proj = F.pad(proj, (0, full.shape[3] - proj.shape[3], 0, full.shape[2] - proj.shape[2]))
        return full + proj


# ----------------------------------------------------------------------------- the student
class ERADIOStudent(Student):
    """The official E-RADIO backbone as a student; see the module docstring. Its state-dict keys are
    the official ``base_model.*`` keys (plus ``norm_mean`` / ``norm_std``, the input conditioner)."""

    def __init__(self, *, dim: int, in_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                 window_size: Sequence[Any], sr_ratio: Sequence[Any], conv_base: bool, full_features_head_dim: int,
                 neck_start_stage: int, cpb_mlp_hidden: int, conv_groups_ratio: float, num_cls_tokens: int = 1,
                 model_norm: bool = False, drop_path_rate: float = 0.0, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, attention: str = "sdpa", model_name: str = "") -> None:
        super().__init__()
        n = len(depths)
        for field, value in (("num_heads", num_heads), ("window_size", window_size), ("sr_ratio", sr_ratio)):
            if len(value) != n:
                raise ValueError(f"student 'eradio': {field} needs one entry per level ({n}), got {list(value)}")
        if num_cls_tokens < 1:
            raise ValueError(f"student 'eradio': num_cls_tokens must be >= 1, got {num_cls_tokens}")
        if not 0 <= neck_start_stage < n:
            raise ValueError(f"student 'eradio': neck_start_stage must be a level (0..{n - 1}), got {neck_start_stage}")
        self.num_cls_tokens, self.embed_dim = num_cls_tokens, full_features_head_dim
        self.patch_size = 4 * 2 ** neck_start_stage  # the neck's stride
        #: the architecture, for exporters (radio_core.formats.radio_checkpoint)
        self.arch = dict(model=model_name, dim=dim, in_dim=in_dim, depths=list(depths), num_heads=list(num_heads),
                         window_size=list(window_size), sr_ratio=list(sr_ratio), conv_base=conv_base,
                         full_features_head_dim=full_features_head_dim, neck_start_stage=neck_start_stage,
                         cpb_mlp_hidden=cpb_mlp_hidden, conv_groups_ratio=conv_groups_ratio, model_norm=model_norm)
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
        self.patch_embed = PatchEmbed(in_dim, dim)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.levels = nn.ModuleList(
            ERADIOLayer(int(dim * 2 ** i), depths[i], num_heads[i], window_size[i], conv=i < 2, downsample=i < n - 1,
                        sr_ratio=sr_ratio[i], conv_base=conv_base, cpb_mlp_hidden=cpb_mlp_hidden,
                        conv_groups_ratio=conv_groups_ratio, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])])
            for i in range(n))
        downsample_enabled = [self.levels[i - 1].downsample is not None for i in range(n)]
        self.high_res_neck = HiResNeck(dim, depths, neck_start_stage, full_features_head_dim, downsample_enabled)
        if model_norm:  # the official model's final norm (of the last level; no output reads it)
            self.norm = nn.BatchNorm2d(int(dim * 2 ** (n - 1)))
        self.apply(_init_weights)
        self.set_attention_backend(attention)

    #: every summary slot holds the same vector (the mean feature): the backbone summary is one of them
    shared_summary = True

    @property
    def size_multiple(self) -> int:
        return 32

    def official_model(self) -> tuple[str, dict]:
        """(model name, model_kwargs) with which the official loader builds this architecture: a
        preset (this student's own first) whose fixed fields all match, the open ones in
        model_kwargs; ValueError naming the differences when no preset matches."""
        arch = {k: v for k, v in self.arch.items() if k not in ("model", "model_norm")}
        names = [self.arch["model"]] + [n for n in PRESETS if n != self.arch["model"]]
        for name in names:
            if name not in PRESETS:
                continue
            fixed = [k for k in arch if k not in OPEN_FIELDS[name] and arch[k] != PRESETS[name][k]]
            if not fixed:
                open_kwargs = {k: arch[k] for k in OPEN_FIELDS[name] if arch[k] != PRESETS[name][k]}
                return name, {"return_full_features": True, **open_kwargs}
        own = PRESETS.get(self.arch["model"], PRESETS["eradio_large_fullres_ws16"])
        differ = ", ".join(f"{k}={arch[k]} (preset {own[k]})" for k in arch if arch[k] != own[k])
        raise ValueError(f"student 'eradio': the official loader builds E-RADIO only at its presets "
                         f"({', '.join(OPEN_FIELDS)}; model_kwargs cannot resize them) and this one differs from "
                         f"{self.arch['model'] or 'eradio_large_fullres_ws16'} in {differ}")

    def set_attention_backend(self, backend: str) -> None:
        """``sdpa`` (default), ``xformers`` (CUDA, optional extra; else one warning line and sdpa)
        or ``math`` (the official order of operations) for every window attention."""
        self.attention = check_attention_backend("eradio", backend)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.backend = backend

    def set_window_size(self, window_size: int) -> None:
        """Attend in ``window_size`` x ``window_size`` windows in every attention level (the
        official ``change_window_size``; the position-bias MLP is kept and read at the new
        coordinates). ``optimal_window_size(image_side)`` gives the official choice for an input."""
        if int(window_size) < 1:
            raise ValueError(f"window_size must be a positive number of tokens, got {window_size}")
        ws = int(window_size)
        for m in self.modules():
            if isinstance(m, (ERADIOLayer, GRAAttentionBlock)) and hasattr(m, "window_size"):
                m.window_size = ws
            elif isinstance(m, PosEmbMLPSwinv2D):
                m.window_size = [ws, ws]

    @staticmethod
    def optimal_window_size(image_side: int, max_window_size: int = 16) -> int:
        """The official ``set_optimal_window_size``: the largest divisor of side / 32 up to
        ``max_window_size`` (7 at 224 px, 16 at 512 px)."""
        n = max(image_side // 32, 1)
        return max(d for d in range(1, min(n, max_window_size) + 1) if n % d == 0)

    def forward(self, images: Tensor) -> StudentOutput:
        b, _, hh, ww = images.shape
        if hh % 32 or ww % 32:
            raise ValueError(f"student 'eradio': input {hh}x{ww} is not a multiple of 32")
        x = (images - self.norm_mean.to(images.dtype)) / self.norm_std.to(images.dtype)
        x = self.patch_embed(x)
        full = None
        for i, level in enumerate(self.levels):
            x, before = level(x)
            full = self.high_res_neck(before, i, full)
        if hasattr(self, "norm") and self.training:
            self.norm(x)  # no output reads it; in training it keeps its running statistics as the official one
        h, w = full.shape[2], full.shape[3]
        patches = full.flatten(2).transpose(1, 2)
        summary = patches.mean(dim=1, keepdim=True).expand(-1, self.num_cls_tokens, -1)
        return StudentOutput(summary=summary, patches=patches, grid=(h, w))


def _init_weights(m: nn.Module) -> None:  # the official initialisation
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_eradio_student(model: str = "eradio_large_fullres_ws16", *, num_cls_tokens: int = 1,
                         dim: Optional[int] = None, in_dim: Optional[int] = None,
                         depths: Optional[Sequence[int]] = None, num_heads: Optional[Sequence[int]] = None,
                         window_size: Optional[Any] = None, sr_ratio: Optional[Sequence[Any]] = None,
                         conv_base: Optional[bool] = None, full_features_head_dim: Optional[int] = None,
                         neck_start_stage: Optional[int] = None, cpb_mlp_hidden: Optional[int] = None,
                         conv_groups_ratio: Optional[float] = None, model_norm: bool = False,
                         drop_path_rate: float = 0.0, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                         std: Sequence[float] = OPENAI_CLIP_STD, attention: str = "sdpa") -> ERADIOStudent:
    """The official E-RADIO: conv levels, windowed multi-resolution attention with a Swin-v2
    continuous position bias, a high-resolution neck, the mean as summary; inputs multiples of 32.

    Args:
        model: official preset: eradio_large_fullres_ws16 (= eradio), eradio_xxxtiny,
        eradio_xxxtiny_8x_ws12 or eradio_xxxtiny_8x_ws16. dim: channels of level 0 (doubling per
        level). in_dim: channels of the first stem conv. depths: blocks per level.
        num_heads: attention heads per level. window_size: an int (every attention level's
        window, in tokens) or one entry per level as the official list ([None, None, [16, 16], 16]).
        sr_ratio: per level, the subsampling ratio of each attention block of a group ([2, 1]).
        conv_base: learned (conv) resampling around subsampled attention, else pooling.
        full_features_head_dim: channels of the neck (the patch tokens). neck_start_stage: first
        level the neck reads (its stride is the patch size: 2 -> 16, 1 -> 8).
        cpb_mlp_hidden: hidden width of the position-bias MLP. conv_groups_ratio: 0 full 3x3
        convs before attention, 1 depthwise, -1 none. model_norm: keep the final BatchNorm.
        drop_path_rate: stochastic depth at the last block. mean: input conditioner mean.
        std: input conditioner std. attention: sdpa, xformers or math kernels.
    """
    if model not in PRESETS:
        raise ValueError(f"student 'eradio': unknown model {model!r}; official presets: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[model])
    if isinstance(window_size, int):  # one window for every attention level (each block of a group alike)
        ratios = list(sr_ratio or cfg["sr_ratio"])
        window_size = [None, None] + [[window_size] * len(r) if isinstance(r, list) else window_size
                                      for r in ratios[2:]]
    overrides = dict(dim=dim, in_dim=in_dim, depths=depths, num_heads=num_heads, window_size=window_size,
                     sr_ratio=sr_ratio, conv_base=conv_base, full_features_head_dim=full_features_head_dim,
                     neck_start_stage=neck_start_stage, cpb_mlp_hidden=cpb_mlp_hidden,
                     conv_groups_ratio=conv_groups_ratio)
    cfg.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides.items() if v is not None})
    return ERADIOStudent(**cfg, num_cls_tokens=num_cls_tokens, model_norm=model_norm, drop_path_rate=drop_path_rate,
                         mean=mean, std=std, attention=attention, model_name=model)


@hookimpl
def radio_register(registry) -> None:
    registry.add("student", "eradio", build_eradio_student)
