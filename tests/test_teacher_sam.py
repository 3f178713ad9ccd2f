"""SAM teacher: tiny SamModel checkpoints (the hub layout) saved with save_pretrained and loaded
back give exactly SamModel.get_image_embeddings (the neck output)."""
import pytest
import torch
from radio_core.registry import PluginError
from radio_plugins.sam import SAM_MEAN, SAM_STD, make_tiny_sam
from tiny_teachers import assert_max_abs, photos, teacher_pixels

from radio_core.models.preprocess import crop_valid, group_input, teacher_input, to_float

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sam")


@pytest.mark.parametrize("image_size", [128, 64])
def test_matches_sam_get_image_embeddings(registry, tiny_dir, image_size):
    spec = make_tiny_sam(tiny_dir / f"sam{image_size}", image_size=image_size)
    teacher = registry.build("teacher", "sam", **spec, resolution=None)
    grid = image_size // 16
    assert teacher.input_size == (image_size, image_size) and teacher.patch_size == 16
    assert (teacher.summary_dim, teacher.spatial_dim, teacher.resize_mode) == (None, 32, "longest_side_pad")
    assert teacher.mean == pytest.approx([0.485, 0.456, 0.406]) and teacher.std == pytest.approx(SAM_STD)
    assert teacher.model.config._attn_implementation == "sdpa"

    x = teacher_pixels(teacher)
    out = teacher(x)
    ref = transformers.SamModel.from_pretrained(spec["model"], attn_implementation="eager").eval()
    assert out.summary is None and out.grid == (grid, grid)
    assert_max_abs(out.spatial, ref.get_image_embeddings(x))


def test_non_square_crop_is_padded_by_the_framework_and_the_padding_cropped(registry, tiny_dir):
    spec = make_tiny_sam(tiny_dir / "sam128", image_size=128)
    teacher = registry.build("teacher", "sam", **spec, resolution=None)
    wide = to_float(photos())[..., 75:225, :]  # 150 x 300: longest side 300 -> 128, short side 64
    group = group_input(wide, teacher.input_size, teacher.resize_mode)
    x = teacher_input(group, teacher.mean, teacher.std)
    assert x.shape[-2:] == (128, 128) and bool((x[..., 64:, :] == 0).all())
    spatial = crop_valid(teacher(x).spatial, group.valid_fraction)
    assert spatial.shape == (2, 32, 4, 8)
    ref = transformers.SamModel.from_pretrained(spec["model"]).eval()
    assert_max_abs(spatial, ref.get_image_embeddings(x)[..., :4, :8])


def test_other_resolutions_are_refused(registry, tiny_dir):
    spec = make_tiny_sam(tiny_dir / "sam64", image_size=64)
    with pytest.raises(PluginError, match="fixed size 64x64.*drop `resolution`"):
        registry.build("teacher", "sam", **spec, resolution=(128, 128))


def test_tiny_flag_builds_once_into_the_cache(registry, tmp_path):
    a = registry.build("teacher", "sam", tiny=True, cache_dir=str(tmp_path), resolution=None)
    b = registry.build("teacher", "sam", tiny=True, cache_dir=str(tmp_path), resolution=None)
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["sam"]
    assert a.input_size == (128, 128)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_checkpoint_of_another_architecture_is_refused_naming_both(registry, tiny_dir):
    small = make_tiny_sam(tiny_dir / "small", image_size=64)
    wide = make_tiny_sam(tiny_dir / "wide", image_size=64, hidden_size=96)
    with pytest.raises(PluginError) as e:
        registry.build("teacher", "sam", model=wide["model"], pretrained=small["model"], resolution=None)
    msg = str(e.value)
    assert f"checkpoint {small['model']!r}" in msg and f"architecture {wide['model']!r}" in msg
    assert "hidden_size=96" in msg


def test_missing_directory_is_a_clear_error(registry, tmp_path):
    with pytest.raises(PluginError, match="local model directory .* does not exist"):
        registry.build("teacher", "sam", model=str(tmp_path / "sam-vit-huge"), resolution=None)
    assert SAM_MEAN == pytest.approx((123.675 / 255, 116.28 / 255, 103.53 / 255))
