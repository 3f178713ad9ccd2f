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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="not available offline"):
        registry.build("teacher", "clip", model="ViT-H-14-378-quickgelu", pretrained="dfn5b", resolution=None)
    with pytest.raises(OSError, match="local HF cache"):
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
