"""Robustness corruptions (radio_core.eval.corruptions) on a real photo, checked against the
reference implementation's own operations (ImageNet-C: numpy noise, skimage blur, JPEG)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from radio_core.eval.corruptions import SEVERITIES, corrupt, corrupted_sets


@pytest.fixture(scope="module")
def photo():
    from skimage.data import astronaut

    im = Image.fromarray(astronaut()).resize((224, 224), Image.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255


def psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_gaussian_noise_has_the_imagenet_c_std_and_is_seeded(photo):
    x = photo.numpy()
    rng = np.random.default_rng(0)
    for severity, c in enumerate(SEVERITIES["gaussian_noise"], 1):
        noisy = corrupt(photo, "gaussian_noise", severity, seed=1)
        ref = np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)  # ImageNet-C's gaussian_noise
        assert float((noisy - photo).std()) == pytest.approx(float((ref - x).std()), rel=0.02)
        if c < 0.15:  # little clipping: the std is the severity's
            assert float((noisy - photo)[(photo > 0.4) & (photo < 0.6)].std()) == pytest.approx(c, rel=0.03)
    assert torch.equal(corrupt(photo, "gaussian_noise", 3, seed=1), corrupt(photo, "gaussian_noise", 3, seed=1))
    assert not torch.equal(corrupt(photo, "gaussian_noise", 3, seed=1), corrupt(photo, "gaussian_noise", 3, seed=2))


def test_gaussian_blur_matches_skimage_at_224_and_scales_with_the_image(photo):
    from skimage.filters import gaussian

    ours = corrupt(photo, "gaussian_blur", 2)[0].permute(1, 2, 0).numpy()
    ref = gaussian(photo[0].permute(1, 2, 0).numpy(), sigma=2, channel_axis=2)  # ImageNet-C's call
    inner = (slice(12, -12), slice(12, -12))  # borders: reflect vs nearest padding
    assert np.abs(ours[inner] - ref[inner]).max() < 0.01
    sharp = [float((corrupt(photo, "gaussian_blur", s) - photo).abs().mean()) for s in range(1, 6)]
    assert sharp == sorted(sharp) and sharp[0] > 0.005
    # the same photo at half the size loses the same detail at the same severity
    small = torch.nn.functional.interpolate(photo, size=(112, 112), mode="area")
    blurred_big = torch.nn.functional.interpolate(corrupt(photo, "gaussian_blur", 4), size=(112, 112), mode="area")
    assert (corrupt(small, "gaussian_blur", 4) - blurred_big).abs().mean() < 0.02


def test_jpeg_matches_pil_and_degrades_with_severity(photo):
    quality = SEVERITIES["jpeg"][0]
    buf = io.BytesIO()
    Image.fromarray((photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buf, format="JPEG", quality=quality)
    pil = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1)[None].float() / 255
    ours = corrupt(photo, "jpeg", 1)
    assert torch.equal(ours, pil)  # ImageNet-C's reference encodes with PIL at this quality
    scores = [psnr(corrupt(photo, "jpeg", s), photo) for s in range(1, 6)]
    assert scores == sorted(scores, reverse=True) and 20 < scores[-1] < scores[0] < 40


def test_corrupted_sets_and_bad_arguments(photo):
    sets = corrupted_sets(photo, severities=(1, 5))
    assert set(sets) == {"clean", "gaussian_noise/1", "gaussian_noise/5", "gaussian_blur/1", "gaussian_blur/5",
                         "jpeg/1", "jpeg/5"}
    assert all(v.shape == photo.shape and float(v.min()) >= 0 and float(v.max()) <= 1 for v in sets.values())
    with pytest.raises(ValueError, match="fog"):
        corrupt(photo, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(photo, "jpeg", 6)
