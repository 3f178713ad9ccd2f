"""E-RADIO lite: this project's re-design of E-RADIO, a hybrid convolution + windowed-attention
student built for throughput (the official architecture is student ``eradio``).

Registered as student ``eradio_lite``. Same contract as every student: [0, 1] images in (the input
conditioner ``norm_mean``/``norm_std`` is inside), ``StudentOutput`` out with patch tokens at
stride 16 (``patch_size``; 8 halves every stride, for small inputs) and ``num_cls_tokens``
summary tokens. Inputs must be multiples of twice the patch stride (32).

Layout (after the official E-RADIO, ``eradio_large_fullres_ws16``; our code, our choices)::

    stem      conv3x3/2-BN-SiLU (3 -> stem_dim), conv3x3/2-BN-SiLU (-> dims[0])      stride 4
    stage 0   C2f block: depths[0] residual 3x3 bottlenecks on half the channels       stride 4
    stage 1   C2f block, depths[1] bottlenecks                                          stride 8
    stage 2   depths[2] transformer blocks, window attention (window_size tokens),      stride 16
              alternating a 2x-subsampled branch (strided 2x2 conv down -> attention
              over windows twice as wide -> transposed 2x2 conv up, as the published
              design resamples) with a full-resolution one
    stage 3   depths[3] transformer blocks, window attention                            stride 32
    neck      1x1 conv (stage 2) + transposed-conv 2x (stage 3) -> depthwise 3x3 + 1x1
              conv -> LayerNorm: ``embed_dim`` features at stride 16 = the patch tokens
    summary   one per teacher: a learned query per summary slot attends over the neck
              features (``summary="attention"``, default); ``"project"``: a learned Linear
              per slot of the mean feature; ``"repeat"``: the mean feature for every slot
              (what the official model returns, so every teacher's head reads one vector)

Choices and why:

* Convolutions where the maps are large (stride 4 and 8): attention there would be quadratic in
  a huge token count; convolutions are linear in it. C2f (YOLOv8's CSP block) is what the
  official model uses in those stages: it keeps half the channels on an identity path, so it is
  cheap for its width.
* Windowed attention at stride 16/32 keeps the cost linear in image area; the 2x-subsampled
  branch in stage 2 and the stride-32 stage 3 see 2x and 4x wider context per window than the
  full-resolution branch (at <= 512 px input, stage 3 windows cover the whole image: global).
  Windows that overrun the map are zero-padded and the padding is masked out of the keys.
* Position information comes from a depthwise 3x3 convolution at the start of every transformer
  block (conditional position encoding) instead of the official Swin-v2 continuous relative bias:
  it is resolution-free, needs no tables and costs almost nothing.
* Neck fuses stages 2 and 3 at stride 16 so the patch grid matches a patch-16 ViT's and every
  teacher head/loss works unchanged. ``patch_size=8`` (first stem convolution at stride 1) gives
  a patch-8 ViT's grid instead: what small inputs need (the proxy benchmark's 64 px images).

Attention backend (``attention``): ``sdpa`` (default), ``xformers`` (CUDA with the optional
extra; otherwise one warning line and sdpa) or ``math``; ``set_attention_backend`` changes it.

Variants (``variant`` argument; every field can be overridden). Parameters and forward GFLOP
per image (FlopCounterMode, 2 per multiply-add) at 224 / 512 / 1024 px, ViT-CPE for scale:

=========  ======  ==========================  ===========================================
variant    params  GFLOP 224 / 512 / 1024      sizing
=========  ======  ==========================  ===========================================
``s``       47M     9 / 46 / 183               stem 32, dims 96/192/384/768, depths 2/2/4/4,
                                               heads 6/12, embed 768 (our throughput pick)
``b``      229M    42 / 219 / 877              stem 64, dims 192/384/768/1536, depths
                                               3/3/5/5, heads 8/16, window 16, embed 1536
``l``      541M    93 / 489 / 1958             dims 256/512/1024/2048, depths 3/3/7/7,
                                               heads 8/16, embed 2048
ViT-B/16    98M    36 / 215 / 1321             (``vit`` student, for comparison)
ViT-L/16   320M   124 / 726 / 4134
ViT-H/16   652M   257 / 1467 / 7919
=========  ======  ==========================  ===========================================

``b`` has the sizing of ``eradio_large_fullres_ws16`` in the official release (its E-RADIO
model), which the design notes call E-RADIO-B. Its FLOPs equal ViT-B/16's up to ~512 px and grow linearly beyond
(windowed attention), so its advantage is at high resolution (0.66x ViT-B's FLOPs at 1024 px,
0.11x ViT-H's) and on GPUs, where its convolutions and short attention windows run at higher
utilisation than long-sequence attention. Measured on 2 CPU cores, fp32 (docs/performance.md):
0.62x / 0.94x / 1.58x ViT-B/16-CPE's images/s at 224 / 512 / 1024 px, against FLOP bounds of
0.85x / 0.98x / 1.51x (0.77x at 224 px with channels_last weights, for inference); the official model built with its published defaults counts 304 GFLOP at
224 px (ours: 42) and ran 1.6x slower than ours at 512 px. Most of its parameters sit in stage 3 (1536 channels at
stride 32), which costs few FLOPs. ``l`` is our scale-up (wider, deeper stages 2-3) for capacity
at ~2.2x ``b``'s cost; ``s`` costs a fifth of ``b``, for throughput-bound uses. ``tiny`` (dims
16/32/64/128, depths 1/1/2/2, window 4) is for tests.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radio_core import Student, StudentOutput, hookimpl
from radio_core.models.attention import attend, check_attention_backend

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: how the summary tokens are made: a learned query per teacher attending over the patch tokens
#: (default), a learned Linear per slot of the mean token, or the mean token for every slot.
SUMMARY_MODES = ("attention", "project", "repeat")

VARIANTS: dict[str, dict] = {
    "b": dict(stem_dim=64, dims=(192, 384, 768, 1536), depths=(3, 3, 5, 5), num_heads=(8, 16), window_size=16,
              embed_dim=1536, mlp_ratio=4.0),
    "s": dict(stem_dim=32, dims=(96, 192, 384, 768), depths=(2, 2, 4, 4), num_heads=(6, 12), window_size=16,
              embed_dim=768, mlp_ratio=4.0),
    "l": dict(stem_dim=64, dims=(256, 512, 1024, 2048), depths=(3, 3, 7, 7), num_heads=(8, 16), window_size=16,
              embed_dim=2048, mlp_ratio=4.0),
    "tiny": dict(stem_dim=8, dims=(16, 32, 64, 128), depths=(1, 1, 2, 2), num_heads=(2, 4), window_size=4,
                 embed_dim=64, mlp_ratio=2.0),
}


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> optional SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, act: bool = True, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                         nn.SiLU() if act else nn.Identity())


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP block: split channels, run ``n`` bottlenecks on one half, concat every output, 1x1 fuse."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.hidden = c // 2
        self.cv1 = ConvBN(c, 2 * self.hidden, 1)
        self.m = nn.ModuleList(Bottleneck(self.hidden) for _ in range(n))
        self.cv2 = ConvBN((2 + n) * self.hidden, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        ys = list(self.cv1(x).chunk(2, dim=1))
        for block in self.m:
            ys.append(block(ys[-1]))
        return self.cv2(torch.cat(ys, dim=1))


class WindowAttention(nn.Module):
    """Multi-head self-attention within non-overlapping ``window`` x ``window`` windows of a
    (B, H, W, C) map; padding needed to tile the map is excluded from the keys."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"student 'eradio_lite': stage dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.window = num_heads, window
        self.backend = "sdpa"  # see ERADIOStudent.set_attention_backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        ws = self.window
        if h <= ws and w <= ws:  # one window covers the map: plain global attention
            return self._attend(x.reshape(b, h * w, c), None).reshape(b, h, w, c)
        ph, pw = (-h) % ws, (-w) % ws
        hp, wp = h + ph, w + pw
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        nh, nw = hp // ws, wp // ws
        windows = x.reshape(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, ws * ws, c)
        mask = None
        if ph or pw:
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.reshape(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(1, nh * nw, 1, 1, ws * ws)
            mask = valid.expand(b, -1, -1, -1, -1).reshape(b * nh * nw, 1, 1, ws * ws)
        out = self._attend(windows, mask)
        out = out.reshape(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w]

    def _attend(self, tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
        n, t, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, mask, self.backend)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class AttentionBlock(nn.Module):
    """Conv position encoding -> (optionally 2x-subsampled) window attention -> MLP, all residual.
    Works on channels-last maps (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window: int, subsample: int, mlp_ratio: float,
                 drop_path: float) -> None:
        super().__init__()
        from timm.layers import DropPath, Mlp

        self.subsample = subsample
        if subsample > 1:  # learned resampling, as the published design: strided conv down, transposed conv up
            self.down = nn.Conv2d(dim, dim, subsample, stride=subsample)
            self.up = nn.ConvTranspose2d(dim, dim, subsample, stride=subsample)
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.norm1(x)
        if self.subsample > 1:
            h, w = y.shape[1:3]
            r = self.subsample
            y = F.pad(y.permute(0, 3, 1, 2), (0, (-w) % r, 0, (-h) % r))  # maps at stride 16 are even already
            y = self.attn(self.down(y).permute(0, 2, 3, 1))
            y = self.up(y.permute(0, 3, 1, 2))[..., :h, :w].permute(0, 2, 3, 1)
        else:
            y = self.attn(y)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Neck(nn.Module):
    """Stage 2 (stride 16) + stage 3 upsampled 2x -> ``embed_dim`` features at stride 16."""

    def __init__(self, dim2: int, dim3: int, embed_dim: int) -> None:
        super().__init__()
        self.lateral = ConvBN(dim2, embed_dim, 1, act=False)
        self.up = nn.Sequential(nn.ConvTranspose2d(dim3, embed_dim, 2, 2, bias=False), nn.BatchNorm2d(embed_dim))
        self.fuse = nn.Sequential(ConvBN(embed_dim, embed_dim, 3, groups=embed_dim), nn.Conv2d(embed_dim, embed_dim, 1))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, s2: Tensor, s3: Tensor) -> Tensor:
        x = self.lateral(s2) + self.up(s3)
        x = self.fuse(x)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, h, w, D)


class AttentionPool(nn.Module):
    """One learned query per summary slot attends over the (normalised) patch tokens: each teacher
    reads its own summary from the feature map, as each reads its own CLS token in a ViT.

    Computed with the key and value projections moved onto the few queries instead of the many
    tokens: ``q . (W_k x + b_k) = (W_k^T q) . x + const`` (the constant cancels in the softmax)
    and ``sum_i a_i (W_v x_i + b_v) = W_v (sum_i a_i x_i) + b_v`` (weights sum to 1). The same
    parameters and the same function as projecting every token (``reference``), at
    ``heads * queries * tokens * dim`` multiply-adds instead of ``2 * tokens * dim^2``: at 512 px
    E-RADIO-B's pool fell from 4.8 GMAC (0.1 s of a 2.5 s CPU forward) to 0.15 GMAC."""

    def __init__(self, dim: int, num_queries: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"student 'eradio_lite': embed_dim {dim} is not divisible by {num_heads} summary heads")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(num_queries, dim) * dim ** -0.5)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, patches: Tensor) -> Tensor:
        b, n, d = patches.shape
        heads, hd = self.num_heads, d // self.num_heads
        x = self.norm(patches)
        w_k, w_v = self.kv.weight.reshape(2, heads, hd, d).unbind(0)
        b_v = self.kv.bias.reshape(2, heads, hd)[1]
        q = self.query.reshape(-1, heads, hd)                                   # (Q, heads, hd)
        q_in_x = torch.einsum("qhe,hed->hqd", q, w_k) * hd ** -0.5              # queries in token space
        attn = torch.einsum("hqd,bnd->bhqn", q_in_x, x).softmax(dim=-1)
        pooled = torch.einsum("bhqn,bnd->bhqd", attn, x)                       # per head, in token space
        y = torch.einsum("bhqd,hed->bqhe", pooled, w_v) + b_v                  # (b, Q, heads, hd)
        return patches.mean(dim=1, keepdim=True) + self.proj(y.reshape(b, -1, d))  # starts near the pooled feature

    def reference(self, patches: Tensor) -> Tensor:
        """The textbook form (every token projected to keys and values): tests compare against it."""
        b, n, d = patches.shape
        heads, hd = self.num_heads, d // self.num_heads
        k, v = self.kv(self.norm(patches)).reshape(b, n, 2, heads, hd).permute(2, 0, 3, 1, 4)
        q = self.query.reshape(1, -1, heads, hd).transpose(1, 2).expand(b, -1, -1, -1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        return patches.mean(dim=1, keepdim=True) + self.proj(y)


class ERADIOStudent(Student):
    """Hybrid conv + windowed-attention student; see the module docstring."""

    def __init__(self, *, stem_dim: int, dims: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 window_size: int, embed_dim: int, mlp_ratio: float = 4.0, num_cls_tokens: int = 1,
                 summary: str = "attention", drop_path_rate: float = 0.0,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 attention: str = "sdpa", patch_size: int = 16) -> None:
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f"student 'eradio_lite': patch_size (the stride of its patch tokens) must be 8 or 16, "
                             f"got {patch_size!r}")
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"student 'eradio_lite': dims and depths need 4 entries (one per stage), got {dims}, {depths}")
        if len(num_heads) != 2:
            raise ValueError(f"student 'eradio_lite': num_heads needs 2 entries (stages 2 and 3), got {num_heads}")
        if summary not in SUMMARY_MODES:
            raise ValueError(f"student 'eradio_lite': summary must be one of {', '.join(SUMMARY_MODES)}, got {summary!r}")
        if num_cls_tokens < 1:
            raise ValueError(f"student 'eradio_lite': num_cls_tokens must be >= 1, got {num_cls_tokens}")
        self.embed_dim, self.num_cls_tokens, self.summary_mode = embed_dim, num_cls_tokens, summary
        self.patch_size = patch_size
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
        # patch_size 8: the first stem convolution keeps the full resolution, so every stage (and
        # the patch tokens) sits at half the stride of the published layout
        self.stem = nn.Sequential(ConvBN(3, stem_dim, 3, patch_size // 8), ConvBN(stem_dim, dims[0], 3, 2))
        self.stage0 = C2f(dims[0], depths[0])
        self.down0 = ConvBN(dims[0], dims[1], 3, 2)
        self.stage1 = C2f(dims[1], depths[1])
        self.down1 = ConvBN(dims[1], dims[2], 3, 2)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depths[2] + depths[3], device="cpu")]
        self.stage2 = nn.Sequential(*[
            AttentionBlock(dims[2], num_heads[0], window_size, 2 if i % 2 == 0 else 1, mlp_ratio, dpr[i])
            for i in range(depths[2])])
        self.down2 = ConvBN(dims[2], dims[3], 3, 2)
        self.stage3 = nn.Sequential(*[
            AttentionBlock(dims[3], num_heads[1], window_size, 1, mlp_ratio, dpr[depths[2] + i])
            for i in range(depths[3])])
        self.neck = Neck(dims[2], dims[3], embed_dim)
        self.summary_proj = nn.Linear(embed_dim, num_cls_tokens * embed_dim) if summary == "project" else None
        self.summary_pool = AttentionPool(embed_dim, num_cls_tokens, num_heads[1]) if summary == "attention" else None
        self.apply(_init_weights)
        self.set_attention_backend(attention)

    @property
    def size_multiple(self) -> int:
        return 2 * self.patch_size  # stage 3 sits at twice the patch stride

    def set_attention_backend(self, backend: str) -> None:
        """``sdpa`` (default), ``xformers`` (CUDA, optional extra; else one warning line and sdpa)
        or ``math`` (reference) for every window attention."""
        self.attention = check_attention_backend("eradio_lite", backend)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.backend = backend

    def set_window_size(self, window_size: int) -> None:
        """Change the attention window (tokens per side) of every transformer block."""
        if int(window_size) < 1:
            raise ValueError(f"window_size must be a positive number of tokens, got {window_size}")
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.window = int(window_size)

    def forward(self, images: Tensor) -> StudentOutput:
        b, _, hh, ww = images.shape
        m = self.size_multiple
        if hh % m or ww % m:
            raise ValueError(f"student 'eradio_lite': input {hh}x{ww} is not a multiple of {m}")
        x = (images - self.norm_mean.to(images.dtype)) / self.norm_std.to(images.dtype)
        # Channels-last throughout: the oneDNN/cuDNN convolutions run NHWC natively, and every
        # permute between the conv stages and the (B, H, W, C) attention stages is then a view,
        # not a copy.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.down1(self.stage1(self.down0(self.stage0(self.stem(x)))))
        s2 = self.stage2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        s3 = self.stage3(self.down2(s2).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        feats = self.neck(s2, s3)  # (B, h, w, D)
        h, w = feats.shape[1:3]
        patches = feats.reshape(b, h * w, self.embed_dim)
        if self.summary_pool is not None:
            summary = self.summary_pool(patches)
        elif self.summary_proj is not None:
            summary = self.summary_proj(patches.mean(dim=1)).reshape(b, self.num_cls_tokens, self.embed_dim)
        else:
            summary = patches.mean(dim=1, keepdim=True).expand(-1, self.num_cls_tokens, -1)
        return StudentOutput(summary=summary, patches=patches, grid=(h, w))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_eradio_lite_student(variant: str = "b", *, num_cls_tokens: int = 1, stem_dim: Optional[int] = None,
                         dims: Optional[Sequence[int]] = None, depths: Optional[Sequence[int]] = None,
                         num_heads: Optional[Sequence[int]] = None, window_size: Optional[int] = None,
                         embed_dim: Optional[int] = None, mlp_ratio: Optional[float] = None,
                         summary: str = "attention", drop_path_rate: float = 0.0,
                         mean: Sequence[float] = OPENAI_CLIP_MEAN,
                         std: Sequence[float] = OPENAI_CLIP_STD, attention: str = "sdpa",
                         patch_size: Optional[int] = None) -> ERADIOStudent:
    """E-RADIO: conv stages + windowed attention, patch tokens at stride ``patch_size`` (16, the
    published layout; or 8) and inputs a multiple of twice that."""
    if variant not in VARIANTS:
        raise ValueError(f"student 'eradio_lite': unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    cfg = dict(VARIANTS[variant])
    overrides = dict(stem_dim=stem_dim, dims=dims, depths=depths, num_heads=num_heads, window_size=window_size,
                     embed_dim=embed_dim, mlp_ratio=mlp_ratio, patch_size=patch_size)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return ERADIOStudent(**cfg, num_cls_tokens=num_cls_tokens, summary=summary, drop_path_rate=drop_path_rate,
                         mean=mean, std=std, attention=attention)


@hookimpl
def radio_register(registry) -> None:
    registry.add("student", "eradio_lite", build_eradio_lite_student)
