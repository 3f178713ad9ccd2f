"""SAM2 teacher: a tiny full Sam2Model (the hub layout) saved with save_pretrained and loaded back
gives exactly the library's own vision encoder output (the stride-16 FPN level), at two
resolutions (one non-square)."""
import pytest
import torch

from radio_core import PluginError

from radio_plugins.sam2 import make_tiny_sam2
from tiny_teachers import assert_max_abs, teacher_pixels

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = make_tiny_sam2(tmp_path_factory.mktemp("sam2") / "tiny")
    ref = transformers.Sam2Model.from_pretrained(spec["model"], attn_implementation="eager").eval()
    return spec, ref


@pytest.mark.parametrize("size", [None, (96, 160)], ids=["native128", "nonsquare96x160"])
def test_matches_sam2_vision_encoder(registry, tiny, size):
    spec, ref = tiny
    teacher = registry.build("teacher", "sam2", **spec, resolution=size)
    expect = size or (128, 128)
    assert teacher.input_size == expect and teacher.patch_size == 16
    assert (teacher.summary_dim, teacher.spatial_dim, teacher.resize_mode) == (None, 32, "resize")
    assert teacher.mean == pytest.approx((0.485, 0.456, 0.406))
    x = teacher_pixels(teacher)
    out = teacher(x)
    with torch.no_grad():
        expected = ref.vision_encoder(pixel_values=x).fpn_hidden_states[-1]
        # what the mask decoder sees is this level plus a constant vector
        decoder_input = ref.get_image_embeddings(x)[-1] if size is None else None
    assert out.summary is None and out.grid == (expect[0] // 16, expect[1] // 16)
    assert_max_abs(out.spatial, expected)
    if decoder_input is not None:
        assert_max_abs(out.spatial + ref.no_memory_embedding.view(1, -1, 1, 1), decoder_input)


def test_bad_resolution_is_refused(registry, tiny):
    spec, _ = tiny
    with pytest.raises(PluginError, match="multiples of 32"):
        registry.build("teacher", "sam2", **spec, resolution=(112, 112))
