"""ViT student with Cropped Position Embedding (CPE), as in AM-RADIO.

Registered as student ``vit``. Built from timm ViT ``Block``s; the rest follows RADIO so that
official RADIO checkpoints map onto it key for key (``radio_core.formats.radio_checkpoint``):

* input conditioner: buffers ``norm_mean``/``norm_std`` (3, 1, 1); the model takes [0, 1] images.
* patch embedding ``patch_generator.embedder``: ``b c (py p) (px p) -> b (py px) (c p p)`` then a
  Linear without bias.
* CPE ``patch_generator.pos_embed``: (cpe_max_size / patch)^2 learned positions (128x128 for
  2048 / 16). Training: per sample a random crop of the grid (side scale ~ U[sqrt(0.1), 1], i.e.
  area in [0.1, 1]; aspect log-uniform in [3/4, 4/3]; random offset) is resampled with
  ``grid_sample`` (bilinear, align_corners=True) onto the token grid, and with probability
  ``pos_dropout`` (0.1) a sample's whole position encoding is dropped. Eval: the full grid is
  resized (bilinear, align_corners=False) to max(h, w)^2 and cropped top-left to (h, w), so every
  multiple of the patch size and any aspect ratio works with the same weights.
* summary tokens ``patch_generator.cls_token.token``: ``num_cls_tokens`` CLS tokens (one per
  teacher with a summary target) followed by registers; registers appear in no output.
* ViTDet windowed attention as a training augmentation: ``window_sizes`` lists the choices
  (``None``/0 = global); each training forward draws one from torch's global RNG (the trainer
  reseeds per step, so resume is exact). A window that does not tile the token grid into more
  than one window is left out of that draw (with no choice left: global attention), so
  ``size_multiple`` stays the patch size in training and ``window_sizes: [16]`` windows only
  high-resolution inputs (e.g. 1024 px, 64x64 tokens) while 256 or 432 px stay global. Blocks are windowed except
  every ``global_every``-th block and the last one; summary tokens skip windowed blocks (they
  rejoin at the next global block), as in RADIO. ``set_window_size(ws)`` fixes the mode for
  inference (then inputs must be multiples of ``patch * ws``).
* ``spectral_reparam``: σReparam (``radio_core.models.spectral``, the official v2 form: a 2-D gain that
  weight decay reaches, one σ per q, k and v of the fused qkv) on every Linear of the blocks.

Randomness in training mode (CPE crop, position dropout, window draw) uses torch's global RNG;
eval mode is deterministic.

Recipe arguments (``student.args``; ``num_cls_tokens`` comes from the framework):

* ``model``: ``vit_{tiny,small,base,large,huge}`` or a timm-style name such as
  ``vit_huge_patch16_224`` (patch from the name, default 16; ``_mlpnorm`` adds a LayerNorm,
  eps 1e-5, on the MLP's hidden features as RADIO's ``-norm`` models have);
  ``embed_dim``, ``depth``, ``num_heads``, ``patch_size``, ``mlp_ratio``, ``qkv_bias``,
  ``init_values`` (layer scale), ``final_norm`` override the preset; ``hidden_act`` (the MLP
  activation, transformers' names: ``gelu`` (exact, the default), ``gelu_pytorch_tanh``,
  ``quick_gelu``, ``relu``, ``silu``) and ``layer_norm_eps`` (1e-6) match other checkpoints.
* ``cpe_max_size`` (2048), ``pos_dropout`` (0.1), ``num_registers`` or ``register_multiple``.
* ``pos_embed: learned`` (with ``pos_grid``): timm's standard learned absolute position
  embedding resampled to the input's grid instead of CPE (the CPE ablation's baseline).
* ``window_sizes`` (e.g. ``[8, 16, null]``; list ``null`` to keep global among the choices),
  ``global_every`` (default depth // 4), ``window_size`` (fixed mode, e.g. for eval).
* ``spectral_reparam``, ``drop_path_rate``, ``grad_checkpointing``, ``pretrained`` (a local
  timm ViT checkpoint, or a transformers ``RadioModel`` directory such as a converted C-RADIO), ``mean`` / ``std`` (input conditioner, OpenAI CLIP statistics by default).
* ``attention``: ``sdpa`` (default), ``xformers`` (memory-efficient kernels on CUDA when the
  ``xformers`` extra is installed; otherwise one warning line and sdpa) or ``math`` (reference);
  ``set_attention_backend`` changes it on a built model. The weights are the same for all three.

The paper's student is ``{model: vit_huge_patch16_224, cpe_max_size: 2048, register_multiple: 8,
spectral_reparam: true}``; a CPU quickstart uses e.g. ``{model: vit_tiny, embed_dim: 96,
depth: 4, num_heads: 3}``.
"""
from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radio_core import Student, StudentOutput, hookimpl
from radio_core.models.activations import timm_activation
from radio_core.models.attention import attend, check_attention_backend

#: RADIO's input conditioner defaults (OpenAI CLIP statistics).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ViT sizes (embed_dim, depth, num_heads), patch 16 unless the name says otherwise.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
_NAME = re.compile(r"^vit_(?P<size>tiny|small|base|large|huge)(?:_patch(?P<patch>\d+))?(?:_(?P<res>\d+))?"
                   r"(?P<mlpnorm>_mlpnorm)?$")


def parse_model_name(model: str) -> tuple[tuple[int, int, int], int, bool]:
    """``vit_base``, ``vit_base_patch16_224``, ``vit_huge_patch16_224_mlpnorm`` ->
    ((embed_dim, depth, num_heads), patch_size, mlp_norm)."""
    m = _NAME.match(model)
    if m is None:
        raise ValueError(f"student 'vit': unknown model {model!r}; use vit_tiny, vit_small, vit_base, "
                         f"vit_large or vit_huge, optionally with _patch<N>[_<res>] (timm style), e.g. "
                         f"vit_base_patch16_224")
    return VIT_SIZES[m["size"]], int(m["patch"] or 16), bool(m["mlpnorm"])


def activation_layer(hidden_act: str) -> type:
    """The MLP activation class of ``hidden_act`` (transformers' name, ``radio_core.models.activations``)."""
    from timm.layers import get_act_layer

    return get_act_layer(timm_activation(hidden_act, "student 'vit'"))


class ClsToken(nn.Module):
    """``num_cls`` summary tokens followed by ``num_registers`` registers: ``token`` (S+R, D)."""

    def __init__(self, embed_dim: int, num_cls: int, num_registers: int) -> None:
        super().__init__()
        self.num_cls, self.num_registers = num_cls, num_registers
        self.token = nn.Parameter(torch.randn(num_cls + num_registers, embed_dim) * embed_dim ** -0.5)

    def forward(self, patches: Tensor) -> Tensor:
        return torch.cat([self.token.unsqueeze(0).expand(patches.shape[0], -1, -1), patches], dim=1)


class PatchGenerator(nn.Module):
    """Image -> [summary tokens, registers, patch tokens + CPE positions]."""

    def __init__(self, patch_size: int, embed_dim: int, cpe_max_size: int, num_cls: int, num_registers: int,
                 pos_dropout: float, cpe: bool = True, pos_embed: str = "cpe", pos_grid: Optional[int] = None) -> None:
        super().__init__()
        if pos_embed not in ("cpe", "learned"):
            raise ValueError(f"student 'vit': pos_embed must be 'cpe' or 'learned', got {pos_embed!r}")
        self.patch_size = patch_size
        #: "learned": timm's standard ViT position embedding, a (pos_grid x pos_grid) table
        #: resampled (bicubic, timm.layers.resample_abs_pos_embed) to every input's token grid,
        #: in training as at inference: the usual baseline CPE is compared against.
        self.pos_embed_kind = pos_embed
        #: False: no random crop in training, the CPE grid is resized to the tokens as at inference.
        self.cpe = cpe and pos_embed == "cpe"
        self.grid_side = int(pos_grid) if pos_embed == "learned" else math.ceil(cpe_max_size / patch_size)
        self.pos_dropout = pos_dropout if pos_embed == "cpe" else 0.0
        self.embedder = nn.Linear(3 * patch_size * patch_size, embed_dim, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid_side ** 2, embed_dim) * embed_dim ** -0.5)
        self.cls_token = ClsToken(embed_dim, num_cls, num_registers)

    def patchify(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        return x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)

    def position_grid(self, batch: int, h: int, w: int) -> Tensor:
        """Positions for an (h, w) token grid: (B or 1, h*w, D)."""
        side = self.grid_side
        if self.pos_embed_kind == "learned":
            from timm.layers import resample_abs_pos_embed

            if (h, w) == (side, side):
                return self.pos_embed
            return resample_abs_pos_embed(self.pos_embed, new_size=[h, w], old_size=[side, side], num_prefix_tokens=0)
        grid = self.pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.training and self.cpe:
            pos = self._random_crop(grid, batch, h, w)
            if self.pos_dropout > 0:
                keep = torch.rand(batch, 1, 1, 1, device=pos.device) >= self.pos_dropout
                pos = pos * keep.to(pos.dtype)
        else:
            m = max(h, w)
            pos = F.interpolate(grid.float(), size=(m, m), mode="bilinear", align_corners=False)
            pos = pos[..., :h, :w].to(grid.dtype)
        return pos.flatten(2).transpose(1, 2)

    def _random_crop(self, grid: Tensor, batch: int, h: int, w: int) -> Tensor:
        dev = grid.device
        min_scale = math.sqrt(0.1)
        scale = torch.rand(batch, 1, 1, device=dev) * (1 - min_scale) + min_scale
        log_aspect = math.log(4 / 3)
        aspect = torch.exp(torch.rand(batch, 1, 1, device=dev) * 2 * log_aspect - log_aspect)
        scale_xy = torch.stack([scale * aspect, scale / aspect], dim=-1).clamp(0, 1)  # (B, 1, 1, 2)
        offset = torch.rand(batch, 1, 1, 2, device=dev) * (1 - scale_xy)
        lin_x = torch.linspace(0, 1, w, device=dev).view(1, 1, w).expand(batch, h, w)
        lin_y = torch.linspace(0, 1, h, device=dev).view(1, h, 1).expand(batch, h, w)
        coords = (torch.stack([lin_x, lin_y], dim=-1) * scale_xy + offset) * 2 - 1
        return F.grid_sample(grid.float().expand(batch, -1, -1, -1), coords, mode="bilinear",
                             padding_mode="zeros", align_corners=True).to(grid.dtype)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.embedder(self.patchify(x))
        patches = patches + self.position_grid(x.shape[0], h, w).to(patches.dtype)
        return self.cls_token(patches)


def to_windows(patches: Tensor, h: int, w: int, ws: int) -> Tensor:
    """(B, h*w, D) raster order -> (B, h*w, D) window-major order (each window contiguous)."""
    b, _, d = patches.shape
    x = patches.reshape(b, h // ws, ws, w // ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, d)


def from_windows(patches: Tensor, h: int, w: int, ws: int) -> Tensor:
    b, _, d = patches.shape
    x = patches.reshape(b, h // ws, w // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, d)


def _backend_attention_class():
    """timm's ViT ``Attention`` (same parameters, same state-dict keys) whose attention product
    goes through ``radio_core.models.attention.attend`` with a selectable backend."""
    from timm.models.vision_transformer import Attention

    class BackendAttention(Attention):
        backend = "sdpa"

        def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
            if is_causal:
                raise ValueError("student 'vit': causal attention is not supported")
            b, n, _ = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            y = attend(q, k, v, attn_mask, self.backend, self.attn_drop.p if self.training else 0.0)
            y = self.norm(y.transpose(1, 2).reshape(b, n, -1))
            if getattr(self, "gate", None) is not None:
                y = y * self.gate(x).sigmoid()
            return self.proj_drop(self.proj(y))

    return BackendAttention


class ViTCPEStudent(Student):
    """A timm-block ViT with CPE; see the module docstring."""

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16,
                 num_cls_tokens: int = 1, num_registers: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: Optional[float] = None, mlp_norm: bool = False, final_norm: bool = True,
                 cpe_max_size: int = 2048, pos_dropout: float = 0.1, drop_path_rate: float = 0.0,
                 window_sizes: Sequence[Optional[int]] = (), global_every: Optional[int] = None,
                 window_size: Optional[int] = None, grad_checkpointing: bool = False,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 model_name: str = "", cpe: bool = True, pos_embed: str = "cpe",
                 pos_grid: Optional[int] = None, attention: str = "sdpa", hidden_act: str = "gelu",
                 layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"student 'vit': embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_cls_tokens < 1:
            raise ValueError(f"student 'vit': num_cls_tokens must be >= 1, got {num_cls_tokens}")
        self.embed_dim, self.patch_size, self.num_cls_tokens = embed_dim, patch_size, num_cls_tokens
        self.num_registers, self.depth, self.num_heads = num_registers, depth, num_heads
        self.cpe_max_size, self.model_name = cpe_max_size, model_name
        #: the architecture, for exporters (radio_core.formats.radio_checkpoint)
        self.arch = dict(model=model_name, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         patch_size=patch_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
                         mlp_norm=mlp_norm, final_norm=final_norm, num_registers=num_registers,
                         cpe_max_size=cpe_max_size, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
        self.patch_generator = PatchGenerator(patch_size, embed_dim, cpe_max_size, num_cls_tokens, num_registers,
                                              pos_dropout, cpe=cpe, pos_embed=pos_embed, pos_grid=pos_grid)
        norm_layer = partial(nn.LayerNorm, eps=layer_norm_eps)  # timm ViT's (and RADIO's): eps 1e-6
        self.blocks = _blocks(embed_dim, depth, num_heads, mlp_ratio, qkv_bias, init_values, mlp_norm,
                              activation_layer(hidden_act), norm_layer, drop_path_rate)
        self.norm = norm_layer(embed_dim) if final_norm else nn.Identity()
        self._set_windows(window_sizes, global_every, window_size)
        self.grad_checkpointing = grad_checkpointing
        #: 1-based blocks whose patch tokens forward also returns (intermediate-layer targets)
        self.intermediate_layers: tuple[int, ...] = ()
        self.set_attention_backend(attention)

    def _set_windows(self, window_sizes: Sequence[Optional[int]], global_every: Optional[int],
                     window_size: Optional[int]) -> None:
        self.window_sizes = [int(ws) if ws else None for ws in window_sizes]
        for ws in self.window_sizes:
            if ws is not None and ws < 1:
                raise ValueError(f"student 'vit': window_sizes must be positive (or null for global), got {ws}")
        self.global_every = int(global_every) if global_every else max(self.depth // 4, 1)
        self.window_size: Optional[int] = None
        self.set_window_size(window_size)

    # -- contract ----------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        return self.patch_size * (self.window_size or 1)

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls_tokens + self.num_registers

    def set_window_size(self, window_size: Optional[int]) -> None:
        """Fix ViTDet windowed attention (``window_size`` tokens per side) for eval; None = global."""
        if window_size is not None and int(window_size) < 1:
            raise ValueError(f"window_size must be a positive number of tokens or None, got {window_size}")
        self.window_size = int(window_size) if window_size else None

    def set_attention_backend(self, backend: str) -> None:
        """``sdpa``, ``xformers`` or ``math`` for every block (see the module docstring)."""
        self.attention = check_attention_backend("vit", backend)
        for block in self.blocks:
            block.attn.backend = backend

    def is_global_block(self, index: int) -> bool:
        return index == self.depth - 1 or index % self.global_every == self.global_every - 1

    def no_weight_decay(self) -> set[str]:
        return {"patch_generator.pos_embed", "patch_generator.cls_token.token"}

    def forward(self, images: Tensor) -> StudentOutput:
        b, _, hh, ww = images.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"student 'vit': input {hh}x{ww} is not a multiple of the patch size {p}")
        h, w = hh // p, ww // p
        window = self._choose_window(h, w)
        x = (images - self.norm_mean.to(images.dtype)) / self.norm_std.to(images.dtype)
        tokens = self.patch_generator(x)
        taps: dict[int, Tensor] = {}
        tokens = self._run_blocks(tokens, h, w, window, taps)
        tokens = self.norm(tokens)
        return StudentOutput(summary=tokens[:, :self.num_cls_tokens],
                             patches=tokens[:, self.num_prefix_tokens:], grid=(h, w), intermediates=taps)

    # -- internals -----------------------------------------------------------------------------
    def window_options(self, h: int, w: int) -> list[Optional[int]]:
        """The window sizes a training step can draw for an h x w token grid (None: global)."""
        # A window must tile the grid into more than one window: one window covering the whole
        # grid is global attention that the summary tokens would skip.
        return [ws for ws in self.window_sizes
                if ws is None or (h % ws == 0 and w % ws == 0 and (h > ws or w > ws))] or [None]

    def _choose_window(self, h: int, w: int) -> Optional[int]:
        if self.training and self.window_sizes:
            options = self.window_options(h, w)
            if options == [None] and None not in self.window_sizes:
                return None  # no window tiles this grid: global, no draw
            # CPU generator: no device sync, and meta-device planning works too.
            return options[int(torch.randint(len(options), (1,), device="cpu"))]
        ws = self.window_size
        if ws and (h % ws or w % ws):
            raise ValueError(f"student 'vit': window size {ws} needs inputs that are multiples of "
                             f"{self.patch_size * ws} px; got a {h}x{w} token grid")
        return ws

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _run_blocks(self, tokens: Tensor, h: int, w: int, ws: Optional[int], taps: dict[int, Tensor]) -> Tensor:
        """The blocks; ``taps`` receives the raster-order patch tokens after each block in
        ``intermediate_layers`` (1-based)."""
        k = self.num_prefix_tokens
        if not ws:
            for i, block in enumerate(self.blocks):
                tokens = self._block(block, tokens)
                if i + 1 in self.intermediate_layers:
                    taps[i + 1] = tokens[:, k:]
            return tokens
        b, _, d = tokens.shape
        n, t = h * w, ws * ws
        prefix, patches = tokens[:, :k], to_windows(tokens[:, k:], h, w, ws)
        for i, block in enumerate(self.blocks):
            if self.is_global_block(i):  # every token attends globally (window order is harmless)
                x = self._block(block, torch.cat([prefix, patches], dim=1))
                prefix, patches = x[:, :k], x[:, k:]
            else:  # patches attend within their window; summary tokens skip the block
                patches = self._block(block, patches.reshape(b * n // t, t, d)).reshape(b, n, d)
            if i + 1 in self.intermediate_layers:
                taps[i + 1] = from_windows(patches, h, w, ws)
        return torch.cat([prefix, from_windows(patches, h, w, ws)], dim=1)

    # -- initialisation from a checkpoint -----------------------------------------------------
    def load_pretrained(self, path: str | Path) -> list[str]:
        """A transformers RADIO directory (config.json with ``model_type: radio``) or a timm file."""
        if Path(path).expanduser().is_dir():
            return self.load_transformers_weights(Path(path).expanduser())
        return self.load_timm_weights(path)

    @torch.no_grad()
    def load_transformers_weights(self, path: str | Path) -> list[str]:
        """Initialise from a transformers ``RadioModel`` directory (C-RADIO, or an export of this
        framework): the same backbone function when the architectures match (a mismatch is an
        error naming both sides). CLS token i comes from the checkpoint's CLS token i mod its
        count; a final LayerNorm (``final_norm``), which the checkpoint cannot have, is left as
        initialised. Returns the keys of this model that the checkpoint did not provide."""
        from radio_core import transformers_student_state

        own = self.state_dict()
        new = transformers_student_state(path, self, origin=f"student 'vit': pretrained {path}")
        unexpected = [k for k in new if k not in own]
        if unexpected:
            raise ValueError(f"student 'vit': pretrained {path}: keys not in this model: {unexpected[:4]}")
        self.load_state_dict(new, strict=False)
        return sorted(k for k in own if k not in new)

    @torch.no_grad()
    def load_timm_weights(self, path: str | Path) -> list[str]:
        """Initialise from a local timm VisionTransformer state dict (safetensors or torch file).

        Blocks and final norm are copied; the conv patch embedding becomes the bias-free linear
        embedder (its bias is folded into the positions, which is exact); the position grid is
        resized (bicubic) to the CPE grid and the class token seeds every summary token.
        Returns the keys of this model that the file did not provide.
        """
        state = _read_state_dict(Path(path))
        own = self.state_dict()
        new = {k: v for k, v in state.items() if k.startswith(("blocks.", "norm."))}
        unexpected = [k for k in new if k not in own]
        if unexpected:
            raise ValueError(f"student 'vit': pretrained {path}: keys not in this model: {unexpected[:4]}")
        # (file key, file shape, model key, model shape) of every tensor that cannot be used as is
        mismatched = [(k, tuple(v.shape), k, tuple(own[k].shape)) for k, v in new.items()
                      if tuple(v.shape) != tuple(own[k].shape)]
        for convert in (self._timm_patch_embedding, self._timm_positions, self._timm_cls_token):
            found, bad = convert(state, own)
            new.update(found)
            mismatched += bad
        if mismatched:
            fk, fs, mk, ms = mismatched[0]
            raise ValueError(f"student 'vit': pretrained {path}: shapes differ for {len(mismatched)} tensor(s), e.g. "
                             f"{fk} {fs} in the file vs {mk} {ms} in the model; does 'model' (and embed_dim/depth/"
                             f"num_heads) match the checkpoint?")
        self.load_state_dict(new, strict=False)
        return sorted(k for k in own if k not in new and k not in ("norm_mean", "norm_std"))

    def _timm_patch_embedding(self, state: dict[str, Tensor], own: dict[str, Tensor]) -> tuple[dict, list]:
        """timm's conv patch embedding as the bias-free linear embedder (bias: ``_timm_positions``)."""
        proj, key = state.get("patch_embed.proj.weight"), "patch_generator.embedder.weight"
        if proj is None:
            return {}, []
        emb = proj.reshape(proj.shape[0], -1)
        if tuple(emb.shape) != tuple(own[key].shape):
            return {}, [("patch_embed.proj.weight", tuple(proj.shape), key, tuple(own[key].shape))]
        return {key: emb}, []

    def _timm_positions(self, state: dict[str, Tensor], own: dict[str, Tensor]) -> tuple[dict, list]:
        """timm's position table (prefix rows dropped) resized bicubically to the CPE grid, with the
        patch embedding's bias added (exact: every patch token receives both)."""
        pos, key = state.get("pos_embed"), "patch_generator.pos_embed"
        if pos is None:
            return {}, []
        if pos.shape[-1] != self.embed_dim:
            return {}, [("pos_embed", tuple(pos.shape), key, tuple(own[key].shape))]
        n_prefix = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2
        side = math.isqrt(pos.shape[1] - n_prefix)
        grid = pos[:, n_prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        target = self.patch_generator.grid_side
        grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=True)
        grid = grid.flatten(2).transpose(1, 2)
        bias = state.get("patch_embed.proj.bias")
        if bias is not None and bias.numel() == self.embed_dim:
            grid = grid + bias.float()
        return {key: grid}, []

    def _timm_cls_token(self, state: dict[str, Tensor], own: dict[str, Tensor]) -> tuple[dict, list]:
        """timm's class token seeds every summary token; registers keep their initialisation."""
        cls, key = state.get("cls_token"), "patch_generator.cls_token.token"
        if cls is None:
            return {}, []
        if cls.numel() != self.embed_dim:
            return {}, [("cls_token", tuple(cls.shape), key, tuple(own[key].shape))]
        token = own[key].clone()
        token[:self.num_cls_tokens] = cls.reshape(1, -1)
        return {key: token}, []


#: RADIO's ``vit_*_mlpnorm`` models add ``nn.LayerNorm(hidden)`` with torch's default eps.
MLP_NORM_EPS = 1e-5


def _blocks(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
            init_values: Optional[float], mlp_norm: bool, act_layer: type, norm_layer: Any,
            drop_path_rate: float) -> nn.Sequential:
    """``depth`` timm ViT blocks (attention through ``attend``), stochastic depth rising linearly
    to ``drop_path_rate``, Linear layers truncated-normal initialised."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")] if depth else []
    blocks = nn.Sequential(*[
        Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
              drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer,
              mlp_layer=_mlp_with_norm if mlp_norm else Mlp, attn_layer=_backend_attention_class())
        for i in range(depth)])
    blocks.apply(_init_linear)
    return blocks


def _mlp_with_norm(**kwargs: Any) -> nn.Module:
    """timm ``Mlp`` with a LayerNorm on its hidden features (between the activation and fc2).

    timm's ``Block`` passes ``norm_layer=None`` to its MLP explicitly, so a ``partial(Mlp,
    norm_layer=...)`` would silently build an Identity; the norm is set here instead."""
    from timm.layers import Mlp

    kwargs["norm_layer"] = partial(nn.LayerNorm, eps=MLP_NORM_EPS)
    return Mlp(**kwargs)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The file's tensors; refused in one line naming the file when it is missing, unreadable,
    not a dict of tensors, not floating point, mixed in dtype, or not finite."""
    where = f"student 'vit': pretrained {path}"
    return {k.removeprefix("module."): v for k, v in _checked_state(_load_file(path, where), where).items()}


def _load_file(path: Path, where: str) -> Any:
    """What a safetensors or torch file holds (``weights_only``: no code runs from the file)."""
    from radio_core import WeightsError, read_safetensors

    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path, "checkpoint")
        return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError as exc:
        raise ValueError(f"student 'vit': pretrained {exc}") from None
    except Exception as exc:  # noqa: BLE001 - not a torch file, truncated, a refused pickle global: one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{where}: not a readable checkpoint ({type(exc).__name__}: {first})") from None


def _checked_state(state: Any, where: str) -> dict[str, Tensor]:
    """The state dict in ``state`` (possibly under ``state_dict`` / ``model``): names to tensors of
    one floating dtype, all finite."""
    from radio_core import WeightsError, check_finite

    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{where}: not a state dict (a mapping of names to tensors)")
    dtypes = {v.dtype for v in state.values()}
    if any(not d.is_floating_point for d in dtypes) or len(dtypes) > 1:
        raise ValueError(f"{where}: tensors must all share one floating dtype, found "
                         f"{sorted(str(d).removeprefix('torch.') for d in dtypes)}")
    try:
        check_finite(state, where)
    except WeightsError as exc:
        raise ValueError(str(exc)) from None
    return state


def build_vit_student(model: str = "vit_base_patch16_224", *, num_cls_tokens: int = 1,
                      embed_dim: Optional[int] = None, depth: Optional[int] = None, num_heads: Optional[int] = None,
                      patch_size: Optional[int] = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                      init_values: Optional[float] = None, mlp_norm: Optional[bool] = None, final_norm: bool = True,
                      num_registers: int = 0, register_multiple: Optional[int] = None,
                      cpe_max_size: int = 2048, pos_dropout: float = 0.1, drop_path_rate: float = 0.0,
                      window_sizes: Optional[Sequence[Optional[int]]] = None, global_every: Optional[int] = None,
                      window_size: Optional[int] = None, spectral_reparam: bool = False,
                      grad_checkpointing: bool = False, pretrained: Optional[str] = None,
                      mean: Sequence[float] = OPENAI_CLIP_MEAN,
                      std: Sequence[float] = OPENAI_CLIP_STD, cpe: bool = True, pos_embed: str = "cpe",
                      pos_grid: Optional[int] = None, attention: str = "sdpa", hidden_act: str = "gelu",
                      layer_norm_eps: float = 1e-6) -> ViTCPEStudent:
    """ViT with CPE (any resolution/aspect), optional ViTDet windows and σReparam (RADIO's student).

    Args:
        model: vit_{tiny,small,base,large,huge}[_patch<N>[_<res>]][_mlpnorm], the size preset.
        embed_dim: width (overrides the preset). depth: number of blocks (overrides the preset).
        num_heads: attention heads (overrides the preset). patch_size: patch side in pixels.
        mlp_ratio: MLP hidden size / width. qkv_bias: bias on the qkv projection.
        init_values: layer-scale initial value (None: no layer scale).
        mlp_norm: LayerNorm inside each MLP. final_norm: LayerNorm after the last block.
        num_registers: register tokens after the summary tokens.
        register_multiple: pad summary tokens + registers to a multiple of this (RADIO).
        cpe_max_size: side in pixels of the learned CPE position grid.
        pos_dropout: probability of dropping a sample's position encoding in training.
        drop_path_rate: stochastic depth at the last block. window_sizes: ViTDet window sizes
        drawn per training step (null = global). global_every: every n-th block stays global.
        window_size: fixed windowed attention for inference. spectral_reparam: σReparam on the
        blocks' Linear layers. grad_checkpointing: recompute blocks in backward to save memory.
        pretrained: a local timm ViT checkpoint or a transformers RADIO directory to start from.
        mean: input conditioner mean (OpenAI CLIP). std: input conditioner std (OpenAI CLIP).
        cpe: false trains with the plain interpolated position embedding instead of random
        crops of the position grid.
        pos_embed: cpe (RADIO's cropped position embedding) or learned (timm's standard learned
        absolute position embedding: a pos_grid x pos_grid table, default the model name's
        resolution / patch else 14, bicubically resampled to each input's token grid; the CPE
        ablation's baseline). pos_grid: side of that table in tokens.
        attention: sdpa (default), xformers (CUDA, when installed) or math (reference) kernels.
        hidden_act: the MLP activation by transformers' name: gelu (exact), gelu_pytorch_tanh,
        quick_gelu, relu or silu. layer_norm_eps: epsilon of every LayerNorm.
    """
    (dim0, depth0, heads0), patch0, mlp_norm0 = parse_model_name(model)
    if pos_embed == "learned" and pos_grid is None:
        m = _NAME.match(model)
        pos_grid = int(m["res"]) // (patch_size or patch0) if m and m["res"] else 14
    if register_multiple:
        # RADIO: pad summary tokens + registers up to a multiple of register_multiple.
        num_registers = register_multiple - (num_cls_tokens % register_multiple)
    student = ViTCPEStudent(
        embed_dim=embed_dim or dim0, depth=depth if depth is not None else depth0, num_heads=num_heads or heads0,
        patch_size=patch_size or patch0, num_cls_tokens=num_cls_tokens, num_registers=num_registers,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
        mlp_norm=mlp_norm0 if mlp_norm is None else mlp_norm, final_norm=final_norm, cpe_max_size=cpe_max_size,
        pos_dropout=pos_dropout, drop_path_rate=drop_path_rate, window_sizes=list(window_sizes or ()),
        global_every=global_every, window_size=window_size, grad_checkpointing=grad_checkpointing,
        mean=mean, std=std, model_name=model, cpe=cpe, pos_embed=pos_embed, pos_grid=pos_grid,
        attention=attention, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    if pretrained and student.norm_mean.device.type != "meta":
        student.load_pretrained(pretrained)
    if spectral_reparam:
        from radio_core.models.spectral import apply_spectral_reparam

        apply_spectral_reparam(student.blocks)
    return student


@hookimpl
def radio_register(registry) -> None:
    registry.add("student", "vit", build_vit_student)
