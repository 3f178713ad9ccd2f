"""Bad inputs that only show at run time: samples the decoder refuses (any reason, any source)
are skipped, counted and named; teacher outputs that are not floating point or not finite are
caught at the first batch, naming the teacher and its plugin."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from radio_core import Teacher, TeacherOutput, hookimpl
from radio_core.data.augment import AugmentedImages
from radio_core.data.sampling import SampleRef
from radio_core.data.sources import ImageFolderSource
from radio_core.models.teachers import check_teacher_output
from radio_core.recipe import load_recipe
from radio_core.registry import PluginError, Registry
from radio_core.train.loop import Trainer

from helpers import tiny_recipe


def bomb_png(path, side=40000):
    """A PNG header claiming side x side pixels (PIL refuses it as a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def folder_cases(root):
    Image.new("RGB", (48, 40), (10, 200, 30)).save(root / "good.png")
    good = (root / "good.png").read_bytes()
    bomb_png(root / "bomb.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPnonsense")
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "zero_size.gif").write_bytes(b"GIF89a\x00\x00\x00\x00\x00\x00\x00;")
    return {"bomb.png", "empty.jpg", "garbage.webp", "truncated.png", "zero_size.gif"}


def test_image_folder_skips_whatever_the_decoder_refuses(tmp_path):
    bad = folder_cases(tmp_path)
    ds = AugmentedImages(ImageFolderSource(str(tmp_path)), (16, 16))
    items = {ds.source.key(i): ds[SampleRef(i, i, i)] for i in range(len(ds))}
    assert items["good.png"]["valid"]
    for name in bad:
        assert not items[name]["valid"], name
        assert name in items[name]["error"] and "\n" not in items[name]["error"], items[name]["error"]
        assert items[name]["image"].shape == (3, 16, 16) and not items[name]["image"].any()


class OddSource:
    """A third-party source whose load fails in ways no one lists in advance."""

    failures = {1: RuntimeError("codec crashed"), 2: KeyError("missing"), 3: ZeroDivisionError("0"),
                4: MemoryError("too big"), 5: None, 6: "not an image"}

    def __len__(self):
        return 8

    def key(self, index):
        return f"odd/{index}"

    def load(self, index):
        if index in (5, 6):
            return self.failures[index]  # returns a non-image
        if index in self.failures:
            raise self.failures[index]
        return Image.fromarray(np.full((20, 30, 3), index * 20, dtype=np.uint8))


def test_any_source_failure_is_counted_not_fatal():
    ds = AugmentedImages(OddSource(), (8, 8))
    items = [ds[SampleRef(i, i, i)] for i in range(len(ds))]
    assert [it["valid"] for it in items] == [True, False, False, False, False, False, False, True]
    for i in range(1, 7):
        assert items[i]["error"].startswith(f"odd/{i}: "), items[i]["error"]


def test_a_bomb_inside_a_shard_is_counted(tmp_path):
    from radio_core.data.shards import TarShardSource, pack_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(photos / "a.png")
    bomb_png(photos / "b.png")
    pack_folder(str(photos), str(tmp_path / "shards"), shard_size=5, progress=False)
    src = TarShardSource(str(tmp_path / "shards"))
    ds = AugmentedImages(src, (8, 8))
    items = {src.key(i): ds[SampleRef(i, i, i)] for i in range(len(src))}
    assert sum(not it["valid"] for it in items.values()) == 1
    bad = next(it for it in items.values() if not it["valid"])
    assert "b" in bad["error"] and "DecompressionBomb" in bad["error"], bad["error"]


class FakeTeacher(Teacher):
    def __init__(self, mode):
        super().__init__()
        self.input_size, self.patch_size = (32, 32), 16
        self.mean = self.std = (0.5, 0.5, 0.5)
        self.summary_dim, self.spatial_dim = 8, 8
        self.proj = torch.nn.Conv2d(3, 8, 16, 16)
        self.mode = mode

    def forward(self, x):
        spatial = self.proj(x)
        summary = spatial.mean((2, 3))
        if self.mode == "nan_spatial":
            spatial = spatial * float("nan")
        elif self.mode == "inf_summary":
            summary = summary + float("inf")
        elif self.mode == "int_spatial":
            spatial = spatial.round().to(torch.int32)
        elif self.mode == "bool_summary":
            summary = summary > 0
        elif self.mode == "list_summary":
            summary = summary.tolist()
        return TeacherOutput(summary=summary, spatial=spatial)


OUTPUT_CASES = [("nan_spatial", "spatial output holds"), ("inf_summary", "summary output holds"),
                ("int_spatial", "spatial output has dtype int32"), ("bool_summary", "summary output has dtype bool"),
                ("list_summary", "summary output is list")]


@pytest.mark.parametrize("mode,fragment", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_teacher_outputs_are_checked_naming_teacher_and_plugin(mode, fragment):
    teacher = FakeTeacher(mode)
    out = teacher(torch.rand(2, 3, 32, 32))
    with pytest.raises(PluginError) as e:
        check_teacher_output("odd", "fake_teacher", teacher, out, 2, finite=True)
    assert "teachers.odd (plugin 'fake_teacher')" in str(e.value) and fragment in str(e.value), str(e.value)
    if mode in ("nan_spatial", "inf_summary"):  # values are checked only when asked (the first batch)
        check_teacher_output("odd", "fake_teacher", teacher, out, 2, finite=False)


def test_a_teacher_with_nan_outputs_stops_training_at_the_first_batch(tmp_path):
    class Plugin:
        @staticmethod
        @hookimpl
        def radio_register(registry):
            registry.add("teacher", "nan_teacher", lambda resolution=None: FakeTeacher("nan_spatial"))

    reg = Registry()
    reg.load_entry_points()
    reg.register_plugin(Plugin, name="nan_plugin")
    recipe = load_recipe(tiny_recipe(tmp_path, "teachers={bad: {plugin: nan_teacher}}", "train.steps=3"))
    trainer = Trainer(recipe, registry=reg)
    with pytest.raises(PluginError, match=r"teachers\.bad \(plugin 'nan_teacher'\): spatial output holds 128 non-finite"):
        trainer.fit()
    assert trainer.state.step == 0


def test_a_teacher_left_with_no_target_is_named_before_the_student_is_built(registry):
    from radio_core.models.distiller import build_distiller
    from radio_core.recipe import validate

    recipe = validate({"student": {"name": "vit", "args": {"model": "vit_tiny"}, "resolution": 64},
                       "teachers": {"sam": {"plugin": "sam", "use_spatial": False}}})
    with pytest.raises(PluginError, match=r"teachers\.sam: nothing to learn: plugin 'sam' gives no summary target"):
        build_distiller(recipe, {"sam": (None, 12)}, registry)
