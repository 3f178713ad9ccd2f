"""DINOv2 teacher: tiny transformers models saved with save_pretrained and loaded back give
exactly Dinov2Model's own last_hidden_state (CLS, patch tokens without registers)."""
import pytest
import torch
import torch.nn.functional as F
from radio_core.registry import PluginError
from radio_plugins.dinov2 import make_tiny_dinov2
from tiny_teachers import assert_max_abs, teacher_pixels, tokens_to_grid

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dinov2")


@pytest.fixture(scope="module", params=[0, 4], ids=["plain", "registers4"])
def tiny_dino(request, tiny_dir):
    registers = request.param
    spec = make_tiny_dinov2(tiny_dir / f"reg{registers}", registers=registers)
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    # The reference: the library's own model with its plain (eager) attention.
    ref = model_cls.from_pretrained(spec["model"], attn_implementation="eager").eval()
    return spec, ref, registers


@pytest.mark.parametrize("size", [None, (112, 112), (84, 140)], ids=["default224", "square112", "nonsquare84x140"])
def test_matches_dinov2_last_hidden_state(registry, tiny_dino, size):
    spec, ref, registers = tiny_dino
    teacher = registry.build("teacher", "dinov2", **spec, resolution=size)
    expect = size or (224, 224)
    assert teacher.input_size == expect and teacher.patch_size == 14 and teacher.num_registers == registers
    assert (teacher.summary_dim, teacher.spatial_dim) == (64, 64)
    assert teacher.model.config._attn_implementation == "sdpa"

    x = teacher_pixels(teacher)
    out = teacher(x)
    with torch.no_grad():
        tokens = ref(pixel_values=x).last_hidden_state  # [CLS, registers..., patches], final norm applied
    assert_max_abs(out.summary, tokens[:, 0])
    assert_max_abs(out.spatial, tokens_to_grid(tokens[:, 1 + registers:], (expect[0] // 14, expect[1] // 14)))


def test_run_low_and_upsample_the_grid(registry, tiny_dino):
    spec, _, _ = tiny_dino
    plain = registry.build("teacher", "dinov2", **spec, resolution=(112, 112))
    upsampled = registry.build("teacher", "dinov2", **spec, resolution=(112, 112), upsample_to=[16, 16])
    x = teacher_pixels(plain)
    low, high = plain(x), upsampled(x)
    assert high.spatial.shape == (2, 64, 16, 16)
    assert_max_abs(high.summary, low.summary, atol=0)
    expected = F.interpolate(low.spatial, size=(16, 16), mode="bilinear", align_corners=False)
    assert_max_abs(high.spatial, expected, atol=0)


def test_tiny_flag_builds_once_into_the_cache(registry, tmp_path):
    a = registry.build("teacher", "dinov2", tiny=True, cache_dir=str(tmp_path), resolution=None)
    b = registry.build("teacher", "dinov2", tiny={"registers": 4}, cache_dir=str(tmp_path), resolution=None)
    registry.build("teacher", "dinov2", tiny=True, cache_dir=str(tmp_path), resolution=None)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["dinov2", "dinov2"]
    assert (a.num_registers, b.num_registers) == (0, 4)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_checkpoint_of_another_architecture_is_refused_naming_both(registry, tiny_dir):
    small = make_tiny_dinov2(tiny_dir / "small")
    wide = make_tiny_dinov2(tiny_dir / "wide", hidden_size=96)
    with pytest.raises(PluginError) as e:
        registry.build("teacher", "dinov2", model=wide["model"], pretrained=small["model"], resolution=None)
    msg = str(e.value)
    assert f"checkpoint {small['model']!r}" in msg and f"architecture {wide['model']!r}" in msg
    assert "hidden_size=96" in msg and "checkpoint (64,) vs model (96,)" in msg


def test_missing_paths_and_wrong_model_types_are_clear_errors(registry, tmp_path, tiny_dir):
    with pytest.raises(PluginError, match="FileNotFoundError: dinov2 teacher: local model directory .* does not exist"):
        registry.build("teacher", "dinov2", model=str(tmp_path / "nope"), resolution=None)
    with pytest.raises(PluginError, match="FileNotFoundError: .*checkpoint directory .* does not exist"):
        registry.build("teacher", "dinov2", model="facebook/dinov2-small", pretrained=str(tmp_path / "nope"),
                       resolution=None)
    with pytest.raises(PluginError, match="neither a local directory nor a hub id"):
        registry.build("teacher", "dinov2", model="facebook/dinov2-huge", resolution=None)
    from radio_plugins.sam import make_tiny_sam

    sam = make_tiny_sam(tiny_dir / "sam", image_size=64)
    with pytest.raises(PluginError, match="is a 'sam' model, not one of dinov2"):
        registry.build("teacher", "dinov2", **sam, resolution=None)


def test_intermediate_layer_target_matches_hidden_states(registry, tiny_dino):
    spec, ref, registers = tiny_dino
    teacher = registry.build("teacher", "dinov2", **spec, resolution=(112, 112), layer=1)
    x = teacher_pixels(teacher)
    with torch.no_grad():
        tokens = ref.layernorm(ref(pixel_values=x, output_hidden_states=True).hidden_states[1])
    out = teacher(x)
    assert_max_abs(out.summary, tokens[:, 0])
    assert_max_abs(out.spatial, tokens_to_grid(tokens[:, 1 + registers:], (8, 8)))
