"""Teacher-feature cache: bit-for-bit fp16 targets, training that matches online teachers, and
stale caches refused with the reason."""
import pytest
import torch
from helpers import metrics, tiny_recipe

from radio_core.data.augment import AugmentedImages
from radio_core.data.cache import CacheMismatchError, FeatureCache, build_cache
from radio_core.data.sampling import SampleRef, view_seed
from radio_core.models import preprocess
from radio_core.models.teachers import build_teacher, compute_targets, group_teachers
from radio_core.recipe import load_recipe
from radio_core.registry import get_registry
from radio_core.train.loop import Trainer

VIEWS = 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    path = tiny_recipe(tmp, f"augment.views={VIEWS}")
    recipe = load_recipe(path)
    out = build_cache(recipe, get_registry(), tmp / "features", VIEWS, batch_size=4, progress=False)
    return tmp, path, recipe, out


def test_cache_holds_the_online_teacher_outputs_bit_for_bit_in_fp16(cache):
    tmp, _, recipe, out = cache
    fc = FeatureCache(out)
    reg = get_registry()
    teachers = {n: build_teacher(recipe, n, reg) for n in recipe.teachers}
    source = reg.build("dataset", recipe.data.source.name, **recipe.data.source.args)
    crop = tuple(fc.index["augment"]["crop_size"])
    ds = AugmentedImages(source, crop, recipe.augment.scale, recipe.augment.ratio, recipe.augment.hflip)
    assert fc.index["entries"] == len(source) * VIEWS
    # Recompute online the cache's first batch of 4 crops (entries 0..3: images 0 and 1, views 0
    # and 1), as the cache builder batched them: CPU GEMMs are only bit-reproducible per batch shape.
    refs = [SampleRef(e, e // VIEWS, view_seed(recipe.train.seed, e // VIEWS, e % VIEWS), e % VIEWS) for e in range(4)]
    images01 = preprocess.to_float(torch.stack([ds[r]["image"] for r in refs]))
    online = compute_targets(teachers, group_teachers(teachers), images01)
    for i, ref in enumerate(refs):
        cached = fc.read(ref.index, ref.view)
        for name, target in online.items():
            summary, spatial = cached[name]
            assert spatial.dtype == torch.float16
            assert torch.equal(spatial, target.spatial[i].half()), (name, i)
            if target.summary is not None:
                assert torch.equal(summary, target.summary[i].half()), (name, i)
            else:
                assert summary is None
    # and two views of one image are different crops, hence different targets
    assert not torch.equal(fc.read(0, 0)["clip"][1], fc.read(0, 1)["clip"][1])


def test_training_from_the_cache_matches_online_teachers(cache, tmp_path):
    tmp, path, _, out = cache
    online = Trainer(load_recipe(path, [f"output_dir={tmp_path / 'online'}"]))
    online.fit()
    cached = Trainer(load_recipe(path, [f"output_dir={tmp_path / 'cached'}", f"cache.path={out}"]))
    assert cached.teachers == {}  # no teacher is built, let alone run
    cached.fit()
    a, b = metrics(tmp_path / "online"), metrics(tmp_path / "cached")
    assert len(a) == len(b) == 20
    # identical crops and models; the only difference is fp16 rounding of the targets
    for x, y in zip(a, b):
        assert y["loss/total"] == pytest.approx(x["loss/total"], rel=2e-3), x["step"]


def test_a_changed_teacher_or_preprocessing_invalidates_the_cache(cache, tmp_path):
    _, path, _, out = cache
    with pytest.raises(CacheMismatchError) as e:
        Trainer(load_recipe(path, [f"output_dir={tmp_path}", f"cache.path={out}",
                                   "teachers.clip.args={tiny: {seed: 1}}"]))
    assert "teachers.clip.fingerprint" in str(e.value) and "stale" in str(e.value)
    with pytest.raises(CacheMismatchError, match=r"augment.hflip: cache has 0.5, this run has 0.0"):
        Trainer(load_recipe(path, [f"output_dir={tmp_path}", f"cache.path={out}", "augment.hflip=0.0"]))
    with pytest.raises(CacheMismatchError, match="teachers.dino.input_size"):
        Trainer(load_recipe(path, [f"output_dir={tmp_path}", f"cache.path={out}", "teachers.dino.resolution=42",
                                   "data.crop_size=[128, 128]"]))
    with pytest.raises(CacheMismatchError, match="augment.views is 3 but the cache"):
        Trainer(load_recipe(path, [f"output_dir={tmp_path}", f"cache.path={out}", "augment.views=3"]))
    with pytest.raises(FileNotFoundError, match="no complete teacher-feature cache"):
        FeatureCache(tmp_path / "nothing")


def test_cache_reads_are_zero_copy_views_of_the_memory_maps(cache):
    import numpy as np

    fc = FeatureCache(cache[3])
    summary, spatial = fc.read(1, 1)["clip"]
    assert np.shares_memory(spatial.numpy(), fc._array("clip", "spatial"))
    assert np.shares_memory(summary.numpy(), fc._array("clip", "summary"))
    assert sum(fc.bytes_per_entry().values()) == sum(
        (meta["spatial_dim"] * int(np.prod(fc._array(n, "spatial").shape[2:])) + (meta["summary_dim"] or 0)) * 2
        for n, meta in fc.teachers.items())


def test_pca_compressed_cache_records_and_meets_its_fidelity(cache, tmp_path):
    from radio_core.data.cache import compress_cache

    tmp, path, _, out = cache
    fp16 = FeatureCache(out)
    dims = {n: max(1, m["spatial_dim"] // 4) for n, m in fp16.teachers.items()}
    pca = FeatureCache(compress_cache(out, tmp_path / "pca", dims, fit_entries=fp16.index["entries"] // 2))
    assert set(pca.codec) == set(dims)
    assert sum(pca.bytes_per_entry().values()) < 0.5 * sum(fp16.bytes_per_entry().values())
    # the recorded held-out fidelity is what a reader gets back
    n_fit = fp16.index["entries"] // 2
    for name, f in pca.index["fidelity"].items():
        assert f["held_out"] and f["fit_entries"] == n_fit
        coss = []
        for e in range(n_fit, fp16.index["entries"]):
            ref = fp16.read(e // VIEWS, e % VIEWS)[name][1].float()
            rec = pca.read(e // VIEWS, e % VIEWS)[name][1]
            assert rec.shape == ref.shape and rec.dtype == torch.float32
            coss.append(torch.nn.functional.cosine_similarity(rec, ref, dim=0).flatten())
        assert float(torch.cat(coss).mean()) == pytest.approx(f["mean_cosine"], abs=2e-3)
        assert 0 < f["mean_cosine"] <= 1
    # a basis as wide as the features is exact up to fp16 rounding of the coefficients
    full = {n: m["spatial_dim"] - 1 for n, m in fp16.teachers.items()}
    near = FeatureCache(compress_cache(out, tmp_path / "near", full))
    assert all(f["mean_cosine"] > 0.98 for f in near.index["fidelity"].values())
    # same identity: training accepts the compressed cache and reads reconstructed targets
    tr = Trainer(load_recipe(path, [f"output_dir={tmp_path / 'run'}", f"cache.path={tmp_path / 'pca'}",
                                    "train.steps=2"]))
    tr.fit()
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_prefetcher_keeps_the_order_and_raises_the_loaders_error():
    from radio_core.train.stages import Prefetcher

    assert list(Prefetcher(iter(range(7)), depth=2)) == list(range(7))

    def broken():
        yield 1
        raise OSError("disk gone")

    it = Prefetcher(broken(), depth=3)
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
