"""DINOv3 teacher: tiny transformers DINOv3ViTModel checkpoints saved with save_pretrained and
loaded back give exactly the library's own last_hidden_state (CLS, patch tokens without the 4
registers), at two resolutions (one non-square; RoPE needs no position table)."""
import pytest
import torch

from radio_core import PluginError

from radio_plugins.dinov3 import make_tiny_dinov3
from tiny_teachers import assert_max_abs, teacher_pixels, tokens_to_grid

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = make_tiny_dinov3(tmp_path_factory.mktemp("dinov3") / "tiny")
    ref = transformers.DINOv3ViTModel.from_pretrained(spec["model"], attn_implementation="eager").eval()
    return spec, ref


@pytest.mark.parametrize("size", [None, (96, 160)], ids=["default224", "nonsquare96x160"])
def test_matches_dinov3_last_hidden_state(registry, tiny, size):
    spec, ref = tiny
    teacher = registry.build("teacher", "dinov3", **spec, resolution=size)
    expect = size or (224, 224)
    assert teacher.input_size == expect and teacher.patch_size == 16 and teacher.num_registers == 4
    assert (teacher.summary_dim, teacher.spatial_dim) == (64, 64)
    x = teacher_pixels(teacher)
    out = teacher(x)
    with torch.no_grad():
        tokens = ref(pixel_values=x).last_hidden_state
    assert_max_abs(out.summary, tokens[:, 0])
    assert_max_abs(out.spatial, tokens_to_grid(tokens[:, 5:], (expect[0] // 16, expect[1] // 16)))


def test_teacher_stays_in_eval_so_rope_is_not_jittered(registry, tiny):
    spec, _ = tiny
    teacher = registry.build("teacher", "dinov3", **spec, resolution=(64, 64))
    teacher.train()
    x = teacher_pixels(teacher)
    assert not teacher.model.training
    assert_max_abs(teacher(x).spatial, teacher(x).spatial, atol=0)


def test_bad_resolution_and_wrong_model_type(registry, tiny, tmp_path):
    spec, _ = tiny
    with pytest.raises(PluginError, match="multiples of the patch size 16"):
        registry.build("teacher", "dinov3", **spec, resolution=(100, 100))
    from radio_plugins.dinov2 import make_tiny_dinov2

    with pytest.raises(PluginError, match="is a 'dinov2' model, not one of dinov3_vit"):
        registry.build("teacher", "dinov3", **make_tiny_dinov2(tmp_path / "d2"), resolution=None)


def test_intermediate_layer_target_is_that_blocks_tokens_through_the_final_norm(registry, tiny):
    spec, ref = tiny
    teacher = registry.build("teacher", "dinov3", **spec, resolution=(64, 96), layer=1)
    last = registry.build("teacher", "dinov3", **spec, resolution=(64, 96), layer=-1)
    plain = registry.build("teacher", "dinov3", **spec, resolution=(64, 96))
    x = teacher_pixels(teacher)
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
        tokens = ref.norm(hidden[1])
    out = teacher(x)
    assert_max_abs(out.summary, tokens[:, 0])
    assert_max_abs(out.spatial, tokens_to_grid(tokens[:, 5:], (4, 6)))
    assert_max_abs(last(x).spatial, plain(x).spatial)
    assert teacher.fingerprint() != plain.fingerprint()  # caches keep the two targets apart
    with pytest.raises(PluginError, match="layer 3 is not a block of this 2-block model"):
        registry.build("teacher", "dinov3", **spec, resolution=None, layer=3)
