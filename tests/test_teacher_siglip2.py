"""SigLIP2 teacher: a tiny SigLIP2-shaped open_clip model (timm trunk with attention pool, text
tower with SigLIP2's options) saved to disk and loaded back through the real loader gives exactly
open_clip's own encode_image and the trunk's final tokens, at two resolutions (one non-square)."""
from pathlib import Path

import pytest
import torch

from radio_core import PluginError
import torch.nn.functional as F

from radio_plugins.siglip2 import make_tiny_siglip2
from tiny_teachers import assert_max_abs, teacher_pixels, tokens_to_grid

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_siglip2(tmp_path_factory.mktemp("siglip2"))


def reference(spec: dict, size) -> torch.nn.Module:
    return open_clip.create_model(Path(spec["model"]).stem, pretrained=spec["pretrained"], force_image_size=size).eval()


@pytest.mark.parametrize("size", [None, (48, 80)], ids=["native64", "nonsquare48x80"])
def test_matches_open_clip_encode_image_and_trunk_tokens(registry, tiny, size):
    teacher = registry.build("teacher", "siglip2", **tiny, resolution=size)
    expect = size or (64, 64)
    assert teacher.input_size == expect and teacher.patch_size == 16
    assert (teacher.summary_dim, teacher.spatial_dim, teacher.resize_mode) == (64, 64, "resize")
    x = teacher_pixels(teacher)
    out = teacher(x)
    ref = reference(tiny, expect)
    text_cfg = ref.text
    assert ref.visual.trunk.global_pool == "map" and ref.visual.trunk.num_prefix_tokens == 0
    assert text_cfg.pool_type == "last" and text_cfg.attn_mask is None  # SigLIP2's text options
    with torch.no_grad():
        embedding = ref.encode_image(x)
        tokens = ref.visual.trunk.forward_features(x)
    assert_max_abs(out.summary, embedding)
    assert_max_abs(out.spatial, tokens_to_grid(tokens, (expect[0] // 16, expect[1] // 16)))


def test_upsample_and_text_tower(registry, tiny):
    plain = registry.build("teacher", "siglip2", **tiny, resolution=None)
    up = registry.build("teacher", "siglip2", **tiny, resolution=None, upsample_to=12, text=False)
    x = teacher_pixels(plain)
    low, high = plain(x), up(x)
    assert_max_abs(high.spatial, F.interpolate(low.spatial, size=(12, 12), mode="bilinear", align_corners=False), 0)
    texts = ["a photo of a cat.", "a photo of an astronaut."]
    ref = reference(tiny, (64, 64))
    with torch.no_grad():
        expected = ref.encode_text(open_clip.get_tokenizer(Path(tiny["model"]).stem)(texts))
    assert_max_abs(plain.encode_text(texts), expected)
    assert not up.has_text


def test_other_clip_models_are_refused(registry):
    with pytest.raises(PluginError, match="not an open_clip SigLIP2 model"):
        registry.build("teacher", "siglip2", model="ViT-SO400M-14-SigLIP-384", resolution=None, meta=True)
