"""Shifted views (augment.shift): window sampling and the batched cut of each sample's window."""
import pytest
import torch

from radio_core.train.views import cut_windows, sample_windows, window_size


def test_windows_have_the_right_size_and_stay_inside_the_crop():
    g = torch.Generator().manual_seed(0)
    boxes = sample_windows(1000, 0.25, g)
    assert torch.allclose(boxes[:, 2:] - boxes[:, :2], torch.full((1000, 2), 0.75))
    assert boxes.min() >= 0 and boxes.max() <= 1
    spread = boxes[:, :2]
    assert spread.min() < 0.01 and spread.max() > 0.24  # offsets cover [0, shift]
    again = sample_windows(1000, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)
    assert torch.equal(sample_windows(3, 0.0), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3))
    with pytest.raises(ValueError, match=r"augment.shift must be in \[0, 1\)"):
        sample_windows(2, 1.0)


def test_cut_windows_is_an_exact_slice_for_pixel_aligned_windows_and_identity_for_the_crop():
    images = torch.rand(2, 3, 64, 80)
    full = sample_windows(2, 0.0)
    assert cut_windows(images, full, (64, 80)) is images
    boxes = torch.tensor([[8 / 80, 4 / 64, 56 / 80, 52 / 64], [0.0, 16 / 64, 48 / 80, 64 / 64]])
    out = cut_windows(images, boxes, (48, 48))
    torch.testing.assert_close(out[0], images[0, :, 4:52, 8:56])
    torch.testing.assert_close(out[1], images[1, :, 16:64, 0:48])
    half = cut_windows(images, full, (32, 40))  # shrinking: 2x2 samples per pixel, a box filter
    torch.testing.assert_close(half, torch.nn.functional.avg_pool2d(images, 2))
    assert window_size((432, 432), 0.125) == (378, 378)
