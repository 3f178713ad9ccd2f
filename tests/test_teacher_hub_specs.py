"""The real hub teachers of the paper's recipe, built on the meta device (no weights, no
download, offline): declared dims and resolutions match the published models, and a meta
forward gives the published output shapes."""
from pathlib import Path

import pytest
import torch

PAPER_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "dfn_dino_sam.yaml"

# name in the registry, factory args, expected declared attributes, expected output grid
HUB_TEACHERS = {
    "dfn-clip-vit-h-14-378": (
        "clip", dict(model="ViT-H-14-378-quickgelu", pretrained="dfn5b"),
        dict(input_size=(378, 378), patch_size=14, summary_dim=1024, spatial_dim=1280), (27, 27)),
    "openai-clip-vit-l-14-336": (
        "clip", dict(model="ViT-L-14-336", pretrained="openai"),
        dict(input_size=(336, 336), patch_size=14, summary_dim=768, spatial_dim=1024), (24, 24)),
    "metaclip-vit-h-14": (
        "clip", dict(model="ViT-H-14-quickgelu", pretrained="metaclip_fullcc"),
        dict(input_size=(224, 224), patch_size=14, summary_dim=1024, spatial_dim=1280), (16, 16)),
    "siglip-so400m-14-384": (
        "clip", dict(model="ViT-SO400M-14-SigLIP-384", pretrained="webli"),
        dict(input_size=(384, 384), patch_size=14, summary_dim=1152, spatial_dim=1152,
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), (27, 27)),
    "dinov2-vit-g-14": (
        "dinov2", dict(model="facebook/dinov2-giant"),
        dict(input_size=(224, 224), patch_size=14, summary_dim=1536, spatial_dim=1536, num_registers=0), (16, 16)),
    "dinov2-vit-g-14-registers": (
        "dinov2", dict(model="facebook/dinov2-with-registers-giant"),
        dict(input_size=(224, 224), patch_size=14, summary_dim=1536, spatial_dim=1536, num_registers=4), (16, 16)),
    "sam-vit-h": (
        "sam", dict(model="facebook/sam-vit-huge"),
        dict(input_size=(1024, 1024), patch_size=16, summary_dim=None, spatial_dim=256,
             resize_mode="longest_side_pad"), (64, 64)),
}


@pytest.mark.parametrize("key", list(HUB_TEACHERS))
def test_hub_teacher_declares_the_published_dims(registry, key):
    plugin, args, expected, grid = HUB_TEACHERS[key]
    teacher = registry.build("teacher", plugin, **args, resolution=None, meta=True)
    for attr, value in expected.items():
        assert getattr(teacher, attr) == value, (key, attr)
    assert all(p.device.type == "meta" for p in teacher.parameters())

    out = teacher(torch.empty(1, 3, *teacher.input_size, device="meta"))
    assert tuple(out.spatial.shape) == (1, teacher.spatial_dim, *grid)
    if teacher.summary_dim is None:
        assert out.summary is None
    else:
        assert tuple(out.summary.shape) == (1, teacher.summary_dim)


def test_every_teacher_of_the_paper_recipe_is_a_published_model(registry):
    """The recipe's teachers, built the way the trainer builds them for planning (meta)."""
    if not PAPER_RECIPE.is_file():
        pytest.skip("recipes/dfn_dino_sam.yaml is not there")
    from radio_core.models.teachers import build_teacher
    from radio_core.recipe import load_recipe

    recipe = load_recipe(PAPER_RECIPE)
    published = {(plugin, args["model"]): expected for plugin, args, expected, _ in HUB_TEACHERS.values()}
    assert recipe.teachers
    for name, spec in recipe.teachers.items():
        expected = published[(spec.plugin, spec.args["model"])]
        teacher = build_teacher(recipe, name, registry, meta=True)
        got = {attr: getattr(teacher, attr) for attr in expected}
        assert got == expected, name


@pytest.mark.parametrize("key", ["dfn-clip-vit-h-14-378", "openai-clip-vit-l-14-336"])
def test_openai_style_tags_get_quick_gelu(registry, key):
    """Both checkpoints were trained with QuickGELU; plain GELU would silently change features."""
    _, args, _, _ = HUB_TEACHERS[key]
    teacher = registry.build("teacher", "clip", **args, resolution=None, meta=True)
    act = teacher.model.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"


def test_other_resolutions_size_the_position_grid(registry):
    dfn = registry.build("teacher", "clip", model="ViT-H-14-378-quickgelu", pretrained="dfn5b",
                         resolution=(448, 224), meta=True)
    assert dfn.input_size == (448, 224)
    assert tuple(dfn.model.visual.positional_embedding.shape) == (32 * 16 + 1, 1280)
    dino = registry.build("teacher", "dinov2", model="facebook/dinov2-giant", resolution=(448, 448), meta=True)
    assert dino(torch.empty(1, 3, 448, 448, device="meta")).grid == (32, 32)


def test_describe_helpers_report_without_weights():
    from radio_plugins import clip, dinov2, sam

    assert clip.describe("ViT-H-14-378-quickgelu", "dfn5b")["summary_dim"] == 1024
    assert dinov2.describe("facebook/dinov2-large")["spatial_dim"] == 1024
    assert sam.describe("facebook/sam-vit-base")["spatial_dim"] == 256


def test_hub_weights_are_not_fetched_offline(registry, monkeypatch):
    from radio_core import PluginError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PluginError, match="RuntimeError: clip teacher: .* not available offline"):
        registry.build("teacher", "clip", model="ViT-H-14-378-quickgelu", pretrained="dfn5b", resolution=None)
    with pytest.raises(PluginError, match="local HF cache"):
        registry.build("teacher", "sam", model="facebook/sam-vit-huge", resolution=None)


def test_a_local_copy_of_published_weights_gets_the_published_settings(registry, tmp_path):
    """QuickGELU and mean/std come from the tags the model was published with, also when the
    weights are a local file (the architecture is checked here; meta builds load nothing)."""
    local = tmp_path / "open_clip_pytorch_model.bin"
    local.write_bytes(b"")
    openai = registry.build("teacher", "clip", model="ViT-L-14-336", pretrained=str(local), resolution=None,
                            meta=True)
    assert type(openai.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    siglip = registry.build("teacher", "clip", model="ViT-SO400M-14-SigLIP-384", pretrained=str(local),
                            resolution=None, meta=True)
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.std == (0.5, 0.5, 0.5)


# The later RADIO teachers (RADIOv2.5 / C-RADIOv4): SigLIP2-g, DINOv3, SAM2.1, SAM3, C-RADIO.
LATER_HUB_TEACHERS = {
    "siglip2-g-16-384": (
        "siglip2", dict(model="ViT-gopt-16-SigLIP2-384", pretrained="webli"),
        dict(input_size=(384, 384), patch_size=16, summary_dim=1536, spatial_dim=1536,
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), (24, 24)),
    "siglip2-so400m-16-512": (
        "siglip2", dict(model="ViT-SO400M-16-SigLIP2-512"),
        dict(input_size=(512, 512), patch_size=16, summary_dim=1152, spatial_dim=1152), (32, 32)),
    "dinov3-vit7b16": (
        "dinov3", dict(model="facebook/dinov3-vit7b16-pretrain-lvd1689m"),
        dict(input_size=(224, 224), patch_size=16, summary_dim=4096, spatial_dim=4096, num_registers=4), (14, 14)),
    "dinov3-vitl16": (
        "dinov3", dict(model="facebook/dinov3-vitl16-pretrain-lvd1689m", resolution=(512, 384)),
        dict(input_size=(512, 384), patch_size=16, summary_dim=1024, spatial_dim=1024), (32, 24)),
    "sam2.1-hiera-large": (
        "sam2", dict(model="facebook/sam2.1-hiera-large"),
        dict(input_size=(1024, 1024), summary_dim=None, spatial_dim=256, resize_mode="resize"), (64, 64)),
    "sam3": (
        "sam3", dict(model="facebook/sam3"),
        dict(input_size=(1008, 1008), patch_size=14, summary_dim=None, spatial_dim=1024, mean=(0.5, 0.5, 0.5)),
        (72, 72)),
    "sam3-fpn": (
        "sam3", dict(model="facebook/sam3", feature="fpn"), dict(spatial_dim=256), (72, 72)),
    "c-radio-v4-h": (
        "cradio", dict(model="nvidia/C-RADIOv4-H"),
        dict(input_size=(512, 512), patch_size=16, summary_dim=2560, spatial_dim=1280), (32, 32)),
    "c-radio-v4-so400m": (
        "cradio", dict(model="nvidia/C-RADIOv4-SO400M", summary_token=0),
        dict(summary_dim=1152, spatial_dim=1152), (32, 32)),
}


@pytest.mark.parametrize("key", list(LATER_HUB_TEACHERS))
def test_later_hub_teachers_declare_the_published_dims(registry, key):
    plugin, args, expected, grid = LATER_HUB_TEACHERS[key]
    args = {"resolution": None, **args}
    teacher = registry.build("teacher", plugin, **args, meta=True)
    for attr, value in expected.items():
        assert getattr(teacher, attr) == value, (key, attr)
    assert all(p.device.type == "meta" for p in teacher.parameters())
    out = teacher(torch.empty(1, 3, *teacher.input_size, device="meta"))
    assert tuple(out.spatial.shape) == (1, teacher.spatial_dim, *grid)
    if teacher.summary_dim is None:
        assert out.summary is None
    else:
        assert tuple(out.summary.shape) == (1, teacher.summary_dim)


def test_later_describe_helpers_and_offline_errors(registry):
    from radio_plugins import cradio, dinov3, sam2, sam3, siglip2

    assert siglip2.describe()["summary_dim"] == 1536  # the default is C-RADIOv4's SigLIP2-g-384
    assert dinov3.describe("facebook/dinov3-vith16plus-pretrain-lvd1689m")["spatial_dim"] == 1280
    assert sam2.describe("facebook/sam2.1-hiera-base-plus")["spatial_dim"] == 256
    assert sam3.describe("facebook/sam3")["patch_size"] == 14
    assert cradio.describe("nvidia/C-RADIOv4-H")["summary_dim"] == 2560
    from radio_core import PluginError

    with pytest.raises(PluginError, match="local HF cache"):
        registry.build("teacher", "dinov3", model="facebook/dinov3-vit7b16-pretrain-lvd1689m", resolution=None)
    with pytest.raises(PluginError, match="local HF cache"):
        registry.build("teacher", "sam3", model="facebook/sam3", resolution=None)


@pytest.mark.parametrize("name", ["radio_v25.yaml", "c_radio_v4.yaml"])
def test_later_recipes_validate_for_64_ranks_with_published_teachers(registry, name):
    """The RADIOv2.5 and C-RADIOv4 recipes: valid for 64 ranks (plugins, partition, student
    resolution multiples, shifted views only with geometry-aware spatial losses), and every
    teacher a published model (their dry runs are in docs/)."""
    from radio_core.plan.checks import check_recipe
    from radio_core.recipe import load_recipe

    path = PAPER_RECIPE.parent / name
    recipe = load_recipe(path)
    check_recipe(recipe, registry, world_size=64, origin=str(path))
    published = {(p, a.get("model")) for p, a, _, _ in list(HUB_TEACHERS.values()) + list(LATER_HUB_TEACHERS.values())}
    for tname, spec in recipe.teachers.items():
        assert (spec.plugin, spec.args["model"]) in published, tname
    assert (PAPER_RECIPE.parents[1] / "docs" / f"dry_run_{name[:-5]}.txt").is_file()
    if name == "c_radio_v4.yaml":
        assert recipe.resolution_sets == {"low": [(s, s) for s in (128, 192, 224, 256, 384, 432)],
                                          "high": [(s, s) for s in (512, 768, 1024, 1152)]}
