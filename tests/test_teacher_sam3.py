"""SAM3 teacher: a tiny full Sam3Model (the hub layout: ViT + neck, text encoder, detector) saved
with save_pretrained and loaded back gives exactly the library's own vision encoder output (ViT
tokens, or the stride-14 FPN level), at two resolutions (one non-square)."""
import pytest
import torch

from radio_core import PluginError

from radio_plugins.sam3 import make_tiny_sam3
from tiny_teachers import assert_max_abs, teacher_pixels, tokens_to_grid

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_sam3(tmp_path_factory.mktemp("sam3") / "tiny")


def reference(spec, size):
    """The library's own full model; another size is the config's image size, as for the plugin."""
    config = transformers.Sam3Config.from_pretrained(spec["model"])
    config.vision_config.backbone_config.image_size = list(size)
    return transformers.Sam3Model.from_pretrained(spec["model"], config=config, attn_implementation="eager").eval()


@pytest.mark.parametrize("size", [None, (84, 140)], ids=["native112", "nonsquare84x140"])
def test_matches_sam3_vision_encoder(registry, tiny, size):
    expect = size or (112, 112)
    teacher = registry.build("teacher", "sam3", **tiny, resolution=size)
    fpn = registry.build("teacher", "sam3", **tiny, resolution=size, feature="fpn")
    assert teacher.input_size == expect and teacher.patch_size == 14
    assert (teacher.summary_dim, teacher.spatial_dim, fpn.spatial_dim) == (None, 32, 16)
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.resize_mode == "resize"
    x = teacher_pixels(teacher)
    ref = reference(tiny, expect)
    with torch.no_grad():
        expected = ref.vision_encoder(pixel_values=x)
    grid = (expect[0] // 14, expect[1] // 14)
    assert_max_abs(teacher(x).spatial, tokens_to_grid(expected.last_hidden_state, grid))
    assert_max_abs(fpn(x).spatial, expected.fpn_hidden_states[2])  # scale 1.0
    assert fpn(x).grid == grid


def test_bad_feature_and_resolution(registry, tiny):
    with pytest.raises(PluginError, match="feature must be one of backbone, fpn"):
        registry.build("teacher", "sam3", **tiny, resolution=None, feature="neck")
    with pytest.raises(PluginError, match="multiples of the patch size 14"):
        registry.build("teacher", "sam3", **tiny, resolution=(100, 100))
