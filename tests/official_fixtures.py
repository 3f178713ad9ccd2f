"""Facts the official RADIO code (NVlabs/RADIO) produced once, stored in tests/fixtures/official/,
and the deterministic recipes both sides use to build the same inputs.

The fixtures were written by ``tests/fixtures/official/make_fixtures.py`` with a checkout of the
official code on ``PYTHONPATH`` (never part of this repository; see the README beside them).
Weights are never stored: a module is filled by ``seeded_`` from its parameter *names*, so the
official module and ours, having the same names, get the same weights without sharing a file.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"


def fixture_json(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def fixture_tensors(name: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name))


@torch.no_grad()
def seeded_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and floating buffer of ``module`` from a generator seeded by ``seed`` and
    the tensor's name (so a tensor one model has and the other lacks shifts nothing): matrices ~
    N(0, 1/fan_in), vectors ~ 0.1 N(0, 1), norm scales and BatchNorm variances 1 + 0.1|N|. Integer
    buffers (BatchNorm counters, index tables), ``DERIVED`` tables and the input conditioner
    (``norm_mean`` / ``norm_std``, which the official backbones do not hold) are left alone."""
    tensors = dict(module.named_parameters())
    tensors.update({k: b for k, b in module.named_buffers() if b.is_floating_point()
                    and not k.endswith(DERIVED) and k not in ("norm_mean", "norm_std")})
    for name, t in tensors.items():
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if name.endswith("running_var"):
            t.copy_(1 + 0.1 * noise.abs())
        elif t.ndim >= 2:
            t.copy_(noise / max(t[0].numel(), 1) ** 0.5)
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "bn.weight")):
            t.copy_(1 + 0.1 * noise)
        else:
            t.copy_(0.1 * noise)
    return module


#: buffers that are functions of the architecture (E-RADIO's relative-position tables), not weights
DERIVED = ("relative_coords_table", "relative_bias", "relative_position_index")


# --------------------------------------------------------------------------- σReparam trajectories
#: weight updates applied between training forwards in the σReparam trajectory fixture
SIGMA_STEPS = 20
#: steps whose realised weights are stored
SIGMA_RECORDED = (1, 2, 10, 20)


def sigma_module() -> nn.Module:
    """A timm attention + MLP (qkv: one σ per q, k, v; proj, fc1, fc2: one each): what both
    implementations parametrise."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    return nn.ModuleDict({"attn": Attention(16, num_heads=2, qkv_bias=True), "mlp": Mlp(16, 32)})


def sigma_updates(shapes: dict[str, torch.Size], seed: int = 7) -> list[dict[str, Tensor]]:
    """The additive weight updates of every step, per parametrised layer (sorted names)."""
    gen = torch.Generator().manual_seed(seed)
    return [{name: 0.05 * torch.randn(shapes[name], generator=gen) for name in sorted(shapes)}
            for _ in range(SIGMA_STEPS)]


SIGMA_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def run_sigma_trajectory(module: nn.Module) -> dict[str, Tensor]:
    """Train-mode forwards with weight updates in between, then two eval-mode reads: the realised
    weights at ``SIGMA_RECORDED`` steps, in eval, and the final (u, v) of every part."""
    layers = {name: module.get_submodule(name) for name in SIGMA_LAYERS}
    shapes = {name: layer.parametrizations.weight.original.shape for name, layer in layers.items()}
    out: dict[str, Tensor] = {}
    module.train()
    for step, update in enumerate(sigma_updates(shapes), start=1):
        with torch.no_grad():
            for name, layer in layers.items():
                layer.parametrizations.weight.original.add_(update[name])
        for name, layer in layers.items():
            w = layer.weight.detach().clone()  # a train-mode read: one power iteration
            if step in SIGMA_RECORDED:
                out[f"{name}.step{step}"] = w
    module.eval()
    for name, layer in layers.items():
        first, second = layer.weight.detach().clone(), layer.weight.detach().clone()
        assert torch.equal(first, second)  # eval reads do not iterate
        out[f"{name}.eval"] = first
    for key, value in module.state_dict().items():
        if key.endswith(("._u", "._v")):
            out[f"final.{key}"] = value.clone()
    return out


# --------------------------------------------------------------------------- E-RADIO
#: two small E-RADIOs that between them take every code path of the official presets: learned
#: (conv) resampling, full 3x3 pre-convs, the neck from level 2 (patch 16), window 16 (which 224 px
#: does not tile: the official resize); pooled resampling, depthwise pre-convs, the neck from level
#: 1 (patch 8), window 12
ERADIO_TINY = {
    "conv": dict(dim=16, in_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=[None, None, [16, 16], 16],
                 sr_ratio=[1, 1, [2, 1], 1], conv_base=True, full_features_head_dim=48, neck_start_stage=2,
                 cpb_mlp_hidden=32, conv_groups_ratio=0),
    "pool": dict(dim=16, in_dim=8, depths=[1, 2, 1, 2], num_heads=[1, 2, 2, 4], window_size=[None, None, [12, 12], 12],
                 sr_ratio=[1, 1, [2, 1], 1], conv_base=False, full_features_head_dim=40, neck_start_stage=1,
                 cpb_mlp_hidden=24, conv_groups_ratio=1),
}
#: input sizes of the E-RADIO fixture: square at the published sizes, and non-square
ERADIO_SIZES = ((224, 224), (512, 512), (256, 384))
#: channels of the neck features stored (the summary keeps all)
ERADIO_STORED_CHANNELS = 4


def eradio_images(size: tuple[int, int]) -> Tensor:
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 1000 + size[1]))


#: an official-format E-RADIO file (the ``eradio_xxxtiny_8x_ws12`` preset) written by this project
ERADIO_RELEASE_IMAGES = (1, 3, 256, 384)


def write_eradio_release(path) -> None:
    """Our exporter's official-layout file of a seeded ``eradio_xxxtiny_8x_ws12`` student with two
    teachers' heads (the official loader builds every adaptor it is asked for from a summary and
    a feature head)."""
    from radio_core.model import RadioModel
    from radio_core.models.distiller import Distiller, HeadSpec
    from radio_core.registry import get_registry

    registry = get_registry()
    student = seeded_(registry.build("student", "eradio", model="eradio_xxxtiny_8x_ws12", num_cls_tokens=2), 5)
    dims = {"clip": (24, 20), "dino": (16, 16)}
    heads = [HeadSpec(name, *d) for name, d in dims.items()]
    mlp = lambda out: registry.build("adaptor", "mlp", in_dim=student.embed_dim, out_dim=out,  # noqa: E731
                                     hidden_dim=32, num_inner=1)
    distiller = Distiller(student, heads, {n: mlp(d[0]) for n, d in dims.items()},
                          {n: mlp(d[1]) for n, d in dims.items()})
    for name in ("summary_heads", "spatial_heads"):
        seeded_(getattr(distiller, name), 6)
    config = {"student": {"name": "eradio", "args": {"model": "eradio_xxxtiny_8x_ws12"}},
              "teachers": {"clip": {"plugin": "clip"}, "dino": {"plugin": "dinov2"}}}
    RadioModel(distiller.eval(), config).save_radio(path)


def eradio_release_images() -> Tensor:
    return torch.rand(*ERADIO_RELEASE_IMAGES, generator=torch.Generator().manual_seed(11))


# --------------------------------------------------------------------------- a ViT file we write
def write_vit_release(path) -> None:
    """Our exporter's official-layout file of a seeded ViT-CPE student with what the format has to
    carry: registers, layer scale, an MLP norm (the one ``_mlpnorm`` name), a non-default
    activation, a grid that is not cpe_max_size / patch (200 px at patch 16: 13 positions), and
    three teachers' heads."""
    from radio_core.model import RadioModel
    from radio_core.models.distiller import Distiller, HeadSpec
    from radio_core.registry import get_registry

    registry = get_registry()
    student = registry.build("student", "vit", model="vit_small_mlpnorm", embed_dim=32, depth=2, num_heads=2,
                             cpe_max_size=200, num_registers=3, init_values=0.5, hidden_act="quick_gelu",
                             final_norm=False, num_cls_tokens=2)
    seeded_(student, 7)
    dims = {"clip": (24, 20), "dino": (16, 16)}
    mlp = lambda out: registry.build("adaptor", "mlp", in_dim=32, out_dim=out, hidden_dim=40, num_inner=1)  # noqa: E731
    distiller = Distiller(student, [HeadSpec(n, *d) for n, d in dims.items()],
                          {n: mlp(d[0]) for n, d in dims.items()}, {n: mlp(d[1]) for n, d in dims.items()})
    for name in ("summary_heads", "spatial_heads"):
        seeded_(getattr(distiller, name), 8)
    config = {"student": {"name": "vit"}, "teachers": {"clip": {"plugin": "clip"}, "dino": {"plugin": "dinov2"}}}
    RadioModel(distiller.eval(), config).save_radio(path)


def vit_release_images() -> Tensor:
    return torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(12))
