"""What the official RADIO loader builds from a ``.pth.tar``, reconstructed from published facts.

Used to cross-check files that ``radio_core.radio_format`` writes (and reads): a file is right
when this loader computes exactly (max |diff| 0) what ``RadioModel`` computes from it. Written
from the facts in /work/shared/DESIGN.md and the behaviour of ``hubconf.radio_model(version=<file>,
adaptor_names=...)`` (NVlabs/RADIO, non-commercial licence: no code taken):

* the backbone is ``timm.create_model(args.model, **args.model_kwargs)`` for a name in the official
  table (``create_official_vit``; any other name is "Unknown model"); the one ``_mlpnorm`` name is
  ViT-H/16 with ``nn.LayerNorm(hidden)`` (torch default eps) as every ``Mlp.norm``; the final norm is
  an Identity unless ``args.model_norm``;
* CPE: ``max = round(cpe_max_size / p) * p`` (Python rounding), grid ``ceil(max / p)`` per side;
  ``len(set(teacher names))`` CLS tokens (1 without ``cls_token_per_teacher``), then
  ``cpe_num_registers`` or ``register_multiple - cls % register_multiple`` registers;
* σReparam keys are realised as W * (softplus(s) + 0.05) / (uᵀWv + eps) (v2) or W * s / (uᵀWv + eps)
  (v1), per row part for ``parts.<i>``; eps 1e-6 (1e-12 when ``args.spectral_reparam`` is a dict);
  a training state (``state_dict``) is baked in train mode, after one power iteration (u, then v);
* backbone summary: CLS rows at the first list index of each teacher name with ``use_summary``
  (sorted); features: tokens after CLS + registers, through ``_feature_normalizer`` if present;
* adaptors: ``_heads.<index|name>`` / ``_feature_projections.<index|name>``; summary MLP version =
  the teacher's ``mlp_version`` else ``args.mlp_version``; feature MLP version = the teacher's
  ``spatial_mlp_version`` else ``args.spatial_mlp_version or args.mlp_version``; a head reads CLS
  row ``token_slot`` (default: the teacher's list index); MLP v1 = fc1, LN, ReLU, fc2; v2 = fc1,
  residual ``x + Linear(GELU(LN(x)))`` blocks, LN, GELU, Linear.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _realise(weight: Tensor, p: dict, eps: float) -> Tensor:
    version = int(p.get("_sn_version", 1))
    scale = p["scale"].float()
    scale = F.softplus(scale) + 0.05 if version == 2 else scale
    sigma = torch.dot(p["_u"], torch.mv(weight, p["_v"])) + eps
    return weight * (scale.float() / sigma.float()).reshape(())


def _power_step(weight: Tensor, p: dict, eps: float) -> dict:
    """One power iteration (torch's spectral_norm order: u, then v), as the official loader's
    train-mode bake of a training state runs before reading σ."""
    u = F.normalize(torch.mv(weight, p["_v"]), dim=0, eps=eps)
    v = F.normalize(torch.mv(weight.T, u), dim=0, eps=eps)
    return {**p, "_u": u, "_v": v}


def _plain_weights(state: dict, eps: float, iterate: bool) -> dict:
    out = {k: v for k, v in state.items() if ".parametrizations." not in k}
    for key in [k for k in state if k.endswith(".parametrizations.weight.original")]:
        layer = key[: -len(".parametrizations.weight.original")]
        pre = f"{layer}.parametrizations.weight.0."
        sub = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
        w = state[key]
        if any(k.startswith("parts.") for k in sub):
            n = 3 if layer.endswith("qkv") else 2
            rows = w.shape[0] // n
            parts = []
            for i in range(n):
                p = {k[len(f"parts.{i}."):]: v for k, v in sub.items() if k.startswith(f"parts.{i}.")}
                chunk = w[i * rows:(i + 1) * rows]
                parts.append(_realise(chunk, _power_step(chunk, p, eps) if iterate else p, eps) if p else chunk)
            w = torch.cat(parts, 0)
        else:
            w = _realise(w, _power_step(w, sub, eps) if iterate else sub, eps)
        out[f"{layer}.weight"] = w
    return out


class _MLP(nn.Module):
    def __init__(self, version: str, state: dict) -> None:
        super().__init__()
        self.version = version
        lin = lambda prefix: _linear(state, prefix)  # noqa: E731
        ln = lambda prefix: _layernorm(state, prefix)  # noqa: E731
        if version == "v1":
            assert not any(k.startswith("inner.") for k in state)
            self.fc1, self.norm, self.fc2 = lin("fc1"), ln("norm"), lin("fc2")
        elif version == "v2":
            self.fc1 = lin("fc1")
            n = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
            self.blocks = nn.ModuleList(nn.Sequential(ln(f"blocks.{i}.0"), nn.GELU(), lin(f"blocks.{i}.2"))
                                        for i in range(n))
            self.final = nn.Sequential(ln("final.0"), nn.GELU(), lin("final.2"))
        else:
            raise ValueError(version)

    def forward(self, x: Tensor) -> Tensor:
        if self.version == "v1":
            return self.fc2(F.relu(self.norm(self.fc1(x))))
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


def _linear(state: dict, prefix: str) -> nn.Linear:
    w = state[f"{prefix}.weight"]
    layer = nn.Linear(w.shape[1], w.shape[0], bias=f"{prefix}.bias" in state)
    layer.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    return layer


def _layernorm(state: dict, prefix: str) -> nn.LayerNorm:
    layer = nn.LayerNorm(state[f"{prefix}.weight"].shape[0])
    layer.load_state_dict({k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
    return layer


#: ViT names the official code registers itself (radio/extra_timm_models.py), with what each fixes;
#: every other name is timm's own.
OFFICIAL_REGISTERED = {
    "vit_tiny_patch14_224": dict(patch_size=14, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch14_224": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_224": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "vit_huge_patch16_224": dict(patch_size=16, embed_dim=1280, depth=32, num_heads=16),
}


def create_official_vit(name: str, model_kwargs: dict) -> nn.Module:
    """``timm.create_model(name, **model_kwargs)`` as it runs once the official modules registered
    their names: a name outside the official table (tests/fixtures/official/model_names.json) is
    the official loader's "Unknown model"; ``vit_huge_patch16_224_mlpnorm`` is that ViT-H/16 preset
    (sizes overridden by model_kwargs) with ``nn.LayerNorm(hidden)`` in every MLP."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from official_fixtures import fixture_json

    if name not in fixture_json("model_names.json")["names"]:
        raise RuntimeError(f"Unknown model ({name})")
    base = name.removesuffix("_mlpnorm") if name == "vit_huge_patch16_224_mlpnorm" else name
    if base in OFFICIAL_REGISTERED:
        vit = VisionTransformer(num_classes=0, **{**OFFICIAL_REGISTERED[base], **model_kwargs})
    else:
        vit = timm.create_model(base, pretrained=False, num_classes=0, **model_kwargs)
    if base != name:
        for m in vit.modules():
            if isinstance(m, timm.layers.Mlp) and not isinstance(m.norm, nn.LayerNorm):
                m.norm = nn.LayerNorm(m.fc1.out_features)
    return vit


class OfficialRadio(nn.Module):
    def __init__(self, path, adaptor_names=None) -> None:
        super().__init__()
        with torch.serialization.safe_globals([argparse.Namespace]):
            chk = torch.load(path, map_location="cpu", weights_only=True)
        args = chk["args"]
        state = chk["state_dict_ema"] if "state_dict_ema" in chk else chk["state_dict"]
        sr = getattr(args, "spectral_reparam", False)
        state = _plain_weights(state, float(sr.get("eps", 1e-12)) if isinstance(sr, dict) else 1e-6,
                               iterate=bool(sr) and "state_dict_ema" not in chk)
        bb = {k[len("base_model."):]: v for k, v in state.items() if k.startswith("base_model.")}

        vit = create_official_vit(args.model, dict(args.model_kwargs))
        if not getattr(args, "model_norm", False):
            vit.norm = nn.Identity()
        self.blocks, self.norm = vit.blocks, vit.norm
        p = vit.patch_embed.patch_size[0]
        dim = vit.embed_dim
        biggest = int(round(args.cpe_max_size / p) * p)
        self.rows = math.ceil(biggest / p)
        teachers = list(args.teachers)
        per_teacher = getattr(args, "cls_token_per_teacher", True)
        self.num_cls = len({t["name"] for t in teachers}) if per_teacher else 1
        regs = getattr(args, "cpe_num_registers", None)
        rm = getattr(args, "register_multiple", None)
        self.num_reg = regs or (rm - self.num_cls % rm if rm else 0)
        self.patch = p
        self.embedder = nn.Linear(3 * p * p, dim, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.rows * self.rows, dim))
        self.token = nn.Parameter(torch.zeros(self.num_cls + self.num_reg, dim))
        own = {"embedder.weight": bb.pop("patch_generator.embedder.weight"),
               "pos_embed": bb.pop("patch_generator.pos_embed"),
               "token": bb.pop("patch_generator.cls_token.token")}
        own.update({f"blocks.{k[len('blocks.'):]}": v for k, v in bb.items() if k.startswith("blocks.")})
        own.update({f"norm.{k[len('norm.'):]}": v for k, v in bb.items() if k.startswith("norm.")})
        left = [k for k in bb if not k.startswith(("blocks.", "norm."))]
        assert not left, f"backbone keys the official model does not have: {left}"
        self.load_state_dict(own, strict=True)  # shapes must match exactly
        self.register_buffer("mean", state["input_conditioner.norm_mean"])
        self.register_buffer("std", state["input_conditioner.norm_std"])

        first = {}
        for i, t in enumerate(teachers):
            if t.get("use_summary", True) and t["name"] not in first:
                first[t["name"]] = i
        self.summary_idxs = sorted(first.values()) if per_teacher else [0]
        self.feature_normalizer = None
        if "_feature_normalizer.mean" in state:
            self.register_buffer("fn_mean", state["_feature_normalizer.mean"])
            self.register_buffer("fn_tx", state["_feature_normalizer.tx"])
            self.feature_normalizer = True

        names = adaptor_names if adaptor_names is not None else list(dict.fromkeys(t["name"] for t in teachers))
        self.heads, self.feats, self.head_idx = nn.ModuleDict(), nn.ModuleDict(), {}
        main_spatial = getattr(args, "spatial_mlp_version", None) or args.mlp_version
        for wanted in names:
            tidx, tconf = next((i, t) for i, t in enumerate(teachers) if t["name"] == wanted)
            summary_v = tconf.get("mlp_version", args.mlp_version)
            feature_v = tconf.get("spatial_mlp_version", main_spatial)
            for table, prefixes, version in ((self.heads, ("_heads",), summary_v),
                                             (self.feats, ("_feature_projections",), feature_v)):
                sub = {}
                for prefix in prefixes:
                    for ident in (str(tidx), wanted):
                        pre = f"{prefix}.{ident}."
                        sub.update({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})
                if sub:
                    table[wanted] = _MLP(version, sub)
            self.head_idx[wanted] = tconf.get("token_slot", tidx) if per_teacher else 0

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict:
        x = (images - self.mean) / self.std
        b, c, hh, ww = x.shape
        p = self.patch
        h, w = hh // p, ww // p
        patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        patches = self.embedder(patches)
        if (self.rows, self.rows) == (h, w):
            pos = self.pos_embed
        else:
            grid = self.pos_embed.reshape(1, self.rows, self.rows, -1).permute(0, 3, 1, 2)
            m = max(h, w)
            grid = F.interpolate(grid.float(), size=(m, m), align_corners=False, mode="bilinear")[..., :h, :w]
            pos = grid.flatten(2).permute(0, 2, 1)
        tokens = torch.cat([self.token.unsqueeze(0).expand(b, -1, -1), patches + pos], dim=1)
        y = self.norm(self.blocks(tokens))
        all_summary = y[:, :self.num_cls]
        feats = y[:, self.num_cls + self.num_reg:]
        if self.feature_normalizer:
            feats = (feats - self.fn_mean) @ self.fn_tx.T
        nchw = lambda t: t.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # noqa: E731
        out = {"backbone": (all_summary[:, self.summary_idxs].flatten(1), nchw(feats))}
        for name in dict.fromkeys([*self.heads, *self.feats]):
            s = self.heads[name](all_summary[:, self.head_idx[name]]) if name in self.heads else None
            f = nchw(self.feats[name](feats)) if name in self.feats else None
            out[name] = (s, f)
        return out


def max_abs_diff(ours: dict, official: dict) -> float:
    """Largest |difference| over every output both models give (outputs must match in kind)."""
    worst = 0.0
    for name, (s, f) in official.items():
        got = ours[name]
        for a, e in zip(got, (s, f)):
            if e is None:
                continue
            assert a is not None and a.shape == e.shape, (name, None if a is None else a.shape, e.shape)
            worst = max(worst, float((a - e).abs().max()))
    return worst
