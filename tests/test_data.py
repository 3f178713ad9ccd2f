"""Data: real packaged photos, seeded augmentation, deterministic resumable sampling."""
import numpy as np
import pytest
import torch
from PIL import Image

from radio_core.data.augment import AugmentedImages, crop_params
from radio_core.data.sampling import SampleRef, StepBatchSampler
from radio_core.data.sources import ImageFolderSource, SkimageSamplesSource, to_rgb


def test_skimage_samples_are_real_rgb_photos():
    src = SkimageSamplesSource()
    assert len(src) >= 12
    keys = [src.key(i) for i in range(len(src))]
    assert "skimage/astronaut" in keys and "skimage/stereo_motorcycle_left" in keys
    img = src.load(keys.index("skimage/astronaut"))
    assert img.mode == "RGB" and img.size == (512, 512)
    assert np.asarray(img).std() > 20  # a photograph, not a flat image


def test_sampler_is_a_pure_function_of_step_and_covers_each_epoch():
    a = StepBatchSampler(10, batch_size=3, seed=7)
    b = StepBatchSampler(10, batch_size=3, seed=7, start=5)
    first = [r for step in range(5) for r in a.refs(step)]
    assert next(iter(b)) == a.refs(5)  # resuming at step 5 yields what step 5 would have
    # one epoch (10 samples) is a permutation of the dataset
    assert sorted(r.index for r in first[:10]) == list(range(10))
    assert [r.index for r in first[:10]] != list(range(10))
    # different epochs are shuffled differently, seeds differ per sample
    assert [r.index for r in first[10:15]] != [r.index for r in first[:5]]
    assert len({r.aug_seed for r in first}) == len(first)


def test_ranks_draw_disjoint_samples():
    r0 = StepBatchSampler(100, batch_size=4, seed=0, rank=0, world_size=2)
    r1 = StepBatchSampler(100, batch_size=4, seed=0, rank=1, world_size=2)
    n0 = {r.number for s in range(5) for r in r0.refs(s)}
    n1 = {r.number for s in range(5) for r in r1.refs(s)}
    assert not n0 & n1 and len(n0 | n1) == 40


def test_augmentation_is_fixed_by_its_seed():
    ds = AugmentedImages(SkimageSamplesSource(names=["astronaut"]), (32, 48))
    a = ds[SampleRef(0, 0, 123)]["image"]
    b = ds[SampleRef(0, 0, 123)]["image"]
    c = ds[SampleRef(0, 0, 124)]["image"]
    assert a.shape == (3, 32, 48) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_params_respect_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_params(400, 300, (0.25, 1.0), (0.75, 4 / 3), g)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.24 <= h * w / (400 * 300) <= 1.0


def test_odd_image_modes_become_rgb(tmp_path):
    arr16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(arr16).save(tmp_path / "a16.png")
    Image.new("CMYK", (40, 30), (10, 20, 30, 40)).save(tmp_path / "b.jpg")
    Image.new("P", (20, 20)).save(tmp_path / "c.gif")
    Image.new("LA", (20, 20)).save(tmp_path / "d.png")
    src = ImageFolderSource(str(tmp_path))
    for i in range(len(src)):
        assert src.load(i).mode == "RGB"
    assert to_rgb(Image.open(tmp_path / "a16.png")).getextrema()[0][1] == 255


def test_unreadable_images_are_flagged_not_fatal(tmp_path):
    Image.new("RGB", (50, 50), (200, 10, 10)).save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = AugmentedImages(ImageFolderSource(str(tmp_path)), (16, 16))
    keys = [ds.source.key(i) for i in range(len(ds))]
    items = {k: ds[SampleRef(i, i, i)] for i, k in enumerate(keys)}
    assert items["good.png"]["valid"]
    for bad in ("empty.jpg", "garbage.png", "truncated.png"):
        assert not items[bad]["valid"] and items[bad]["error"], bad


def test_image_folder_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source.args.root"):
        ImageFolderSource(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderSource(str(tmp_path))
