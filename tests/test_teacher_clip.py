"""CLIP teacher: tiny open_clip models saved to disk and loaded back through the real loader
give exactly open_clip's own encode_image / final patch tokens, at several resolutions."""
from pathlib import Path

import pytest
import torch
from radio_core.registry import PluginError
from radio_plugins.clip import make_tiny_clip
from tiny_teachers import assert_max_abs, teacher_pixels, tokens_to_grid

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def tiny_clip(tiny_dir):
    return make_tiny_clip(tiny_dir / "clip")


@pytest.fixture(scope="module")
def tiny_siglip(tiny_dir):
    return make_tiny_clip(tiny_dir / "siglip", family="siglip")


def reference(spec: dict, size) -> torch.nn.Module:
    """The same checkpoint loaded by open_clip itself, at ``size``."""
    name = Path(spec["model"]).stem
    return open_clip.create_model(name, pretrained=spec["pretrained"], force_image_size=size).eval()


@pytest.mark.parametrize("size", [None, (96, 96), (48, 80)], ids=["native64", "square96", "nonsquare48x80"])
def test_matches_open_clip_encode_image_and_final_tokens(registry, tiny_clip, size):
    teacher = registry.build("teacher", "clip", **tiny_clip, resolution=size)
    expect = size or (64, 64)
    assert teacher.input_size == expect and teacher.patch_size == 16
    assert (teacher.summary_dim, teacher.spatial_dim, teacher.resize_mode) == (32, 64, "resize")

    x = teacher_pixels(teacher)
    out = teacher(x)
    ref = reference(tiny_clip, expect)
    with torch.no_grad():
        embedding = ref.encode_image(x)  # normalize=False: the summary target is unnormalised
        ref.visual.output_tokens = True  # the tower's own forward also returns its tokens
        _, tokens = ref.visual(x)
    grid = (expect[0] // 16, expect[1] // 16)
    assert_max_abs(out.summary, embedding)
    assert_max_abs(out.spatial, tokens_to_grid(tokens, grid))  # after ln_post, no projection


@pytest.mark.parametrize("size", [None, (48, 80)], ids=["native64", "nonsquare48x80"])
def test_siglip_like_tower_has_no_cls_and_pools_by_attention(registry, tiny_siglip, size):
    teacher = registry.build("teacher", "clip", **tiny_siglip, resolution=size)
    expect = size or (64, 64)
    x = teacher_pixels(teacher)
    out = teacher(x)
    ref = reference(tiny_siglip, expect)
    trunk = ref.visual.trunk
    assert trunk.num_prefix_tokens == 0 and trunk.global_pool == "map"
    with torch.no_grad():
        embedding = ref.encode_image(x)  # the attention-pool output
        tokens = trunk.forward_features(x)  # every token is a patch token, after the final norm
    assert_max_abs(out.summary, embedding)
    assert_max_abs(out.spatial, tokens_to_grid(tokens, (expect[0] // 16, expect[1] // 16)))
    assert (teacher.summary_dim, teacher.spatial_dim) == (64, 64)


def test_text_tower_and_tokenizer_match_open_clip(registry, tiny_clip):
    teacher = registry.build("teacher", "clip", **tiny_clip, resolution=None)
    texts = ["a photo of a cat.", "a photo of an astronaut."]
    ref = reference(tiny_clip, (64, 64))
    with torch.no_grad():
        expected = ref.encode_text(open_clip.get_tokenizer(Path(tiny_clip["model"]).stem)(texts))
    assert_max_abs(teacher.encode_text(texts), expected)
    assert teacher.tokenizer(texts).shape == (2, 16)


def test_text_tower_can_be_dropped_without_changing_image_targets(registry, tiny_clip):
    full = registry.build("teacher", "clip", **tiny_clip, resolution=None)
    image_only = registry.build("teacher", "clip", **tiny_clip, resolution=None, text=False)
    x = teacher_pixels(full)
    assert_max_abs(image_only(x).spatial, full(x).spatial, atol=0)
    assert sum(p.numel() for p in image_only.parameters()) < sum(p.numel() for p in full.parameters()) / 2
    with pytest.raises(RuntimeError, match="text=false"):
        image_only.encode_text(["a cat"])


def test_teacher_is_frozen_and_stays_in_eval(registry, tiny_clip):
    teacher = registry.build("teacher", "clip", **tiny_clip, resolution=None)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training


def test_tiny_flag_caches_once_and_reloads_the_same_weights(registry, tmp_path):
    first = registry.build("teacher", "clip", tiny=True, cache_dir=str(tmp_path), resolution=None)
    second = registry.build("teacher", "clip", tiny={}, cache_dir=str(tmp_path), resolution=None)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].startswith("clip-"), entries  # no temp dirs left behind
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = registry.build("teacher", "clip", tiny={"width": 32, "head_width": 16}, cache_dir=str(tmp_path),
                           resolution=None)
    assert other.spatial_dim == 32 and len(list(tmp_path.iterdir())) == 2


def test_checkpoint_of_another_architecture_is_refused_naming_both(registry, tiny_dir, tiny_clip):
    wider = make_tiny_clip(tiny_dir / "wider", width=96)
    with pytest.raises(PluginError) as e:
        registry.build("teacher", "clip", model=wider["model"], pretrained=tiny_clip["pretrained"], resolution=None)
    msg = str(e.value)
    assert wider["model"] in msg and tiny_clip["pretrained"] in msg and "size mismatch" in msg


def test_missing_checkpoint_and_unknown_model_are_clear_errors(registry, tmp_path):
    with pytest.raises(PluginError, match="is neither an open_clip tag of 'ViT-B-32'"):
        registry.build("teacher", "clip", model="ViT-B-32", pretrained=str(tmp_path / "nope.bin"),
                       resolution=None)
    with pytest.raises(PluginError, match="unknown open_clip model 'ViT-B-33'"):
        registry.build("teacher", "clip", model="ViT-B-33", resolution=None)
    with pytest.raises(PluginError, match="does not exist"):
        registry.build("teacher", "clip", model=str(tmp_path / "cfg.json"), resolution=None)
    with pytest.raises(PluginError, match="needs `model`"):
        registry.build("teacher", "clip", resolution=None)
