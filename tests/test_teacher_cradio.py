"""C-RADIO teacher: a tiny transformers RadioModel saved with save_pretrained and loaded back
gives exactly the library's own summary and patch features on [0, 1] pixels (the teacher gets
them normalised by the framework with the model's own conditioner statistics), at two
resolutions (one non-square)."""
import pytest
import torch

from radio_core import PluginError

from radio_core.models.preprocess import group_input, to_float
from radio_plugins.cradio import make_tiny_cradio
from tiny_teachers import assert_max_abs, photos, teacher_pixels, tokens_to_grid

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = make_tiny_cradio(tmp_path_factory.mktemp("cradio") / "tiny")
    ref = transformers.RadioModel.from_pretrained(spec["model"], attn_implementation="eager").eval()
    return spec, ref


@pytest.mark.parametrize("size", [(64, 64), (48, 112)], ids=["square64", "nonsquare48x112"])
def test_matches_radio_model_on_unnormalised_pixels(registry, tiny, size):
    spec, ref = tiny
    teacher = registry.build("teacher", "cradio", **spec, resolution=size)
    assert teacher.input_size == size and teacher.patch_size == 16
    assert (teacher.summary_dim, teacher.spatial_dim) == (128, 64)  # summary_idxs [0, 1]
    assert teacher.mean == pytest.approx(tuple(ref.config.norm_mean))
    raw = group_input(to_float(photos()), size, "resize").images  # [0, 1], what RadioModel takes
    out = teacher(teacher_pixels(teacher))
    with torch.no_grad():
        expected = ref(pixel_values=raw)
    assert_max_abs(out.summary, expected.summary)
    assert_max_abs(out.spatial, tokens_to_grid(expected.features, (size[0] // 16, size[1] // 16)))

    one = registry.build("teacher", "cradio", **spec, resolution=size, summary_token=2)
    assert one.summary_dim == 64
    assert_max_abs(one(teacher_pixels(one)).summary, expected.last_hidden_state[:, 2])


def test_bad_arguments_are_clear(registry, tiny):
    spec, _ = tiny
    with pytest.raises(PluginError, match="multiples of the patch size 16"):
        registry.build("teacher", "cradio", **spec, resolution=(50, 64))
    with pytest.raises(PluginError, match="exceeds the position grid's max_img_size 256"):
        registry.build("teacher", "cradio", **spec, resolution=(512, 512))
    with pytest.raises(PluginError, match="summary_token 3 is not one of the 3 class tokens"):
        registry.build("teacher", "cradio", **spec, resolution=None, summary_token=3)
