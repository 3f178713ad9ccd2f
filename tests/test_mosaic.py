"""Mosaic augmentation for a teacher group (groups.NAME.mosaic): k x k images per canvas, which
the student and the group's teachers all see, so their grids stay aligned; the planner counts
canvases, not images; recipes that cannot work are refused naming the field."""
import numpy as np
import pytest
import torch
from helpers import tiny_recipe
from PIL import Image

from radio_core.data.mosaic import make_mosaic, mosaic_valid, tile_box
from radio_core.models import preprocess
from radio_core.plan.planner import plan
from radio_core.recipe import load_recipe
from radio_core.recipe.schema import RecipeError
from radio_core.registry import get_registry
from radio_core.train.loop import Trainer

GROUPS = ["groups={low: {teachers: [clip, dino]}, high: {teachers: [sam], batch_size: 8, mosaic: 2}}"]


def photos(size=64):
    from skimage import data

    ims = [np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB").resize((size, size), Image.BICUBIC))
           for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255


def test_canvas_tiles_are_the_images_in_row_major_order():
    images = photos()
    canvas = make_mosaic(images, 2)
    assert canvas.shape == (1, 3, 64, 64)
    small = preprocess.resize(images, (32, 32))
    for i in range(4):
        x0, y0, x1, y1 = (int(v * 64) for v in tile_box(2, i))
        assert torch.equal(canvas[0, :, y0:y1, x0:x1], small[i])
    assert make_mosaic(torch.cat([images, images.flip(0)]), 2).shape == (2, 3, 64, 64)
    assert mosaic_valid(torch.tensor([True, True, True, True, True, False, True, True]), 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="whole canvases"):
        make_mosaic(images[:3], 2)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two training steps with the SAM group on 2x2 mosaics; the inputs each model received."""
    tmp = tmp_path_factory.mktemp("mosaic")
    trainer = Trainer(load_recipe(tiny_recipe(tmp, "train.steps=2", "checkpoint.export=false", *GROUPS)))
    seen = {"sam": [], "student": [], "batch": []}
    sam = trainer.teachers["sam"]
    hooks = [sam.register_forward_pre_hook(lambda m, a: seen["sam"].append(a[0].detach().clone())),
             trainer.unwrapped.student.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].detach().clone()))]
    forward = trainer.objective.forward_losses

    def spy(model, distiller, rt, batch, step, stage):
        seen["batch"].append((rt.slot.group, batch["image"].clone()))
        return forward(model, distiller, rt, batch, step, stage)

    trainer.objective.forward_losses = spy
    trainer.fit()
    for h in hooks:
        h.remove()
    return trainer, seen


def test_student_and_teacher_see_the_same_canvases(recorded):
    trainer, seen = recorded
    sam = trainer.teachers["sam"]
    high = [b for g, b in seen["batch"] if g == "high"]
    assert len(high) == 2 and high[0].shape[0] == 8
    assert [x.shape[0] for x in seen["sam"]] == [2, 2]  # 8 images -> 2 canvases per step
    # the student's inputs alternate: low group (4 images) then high group (2 canvases)
    student_high = [x for x in seen["student"] if x.shape[0] == 2]
    assert len(student_high) == 2
    for crops, teacher_in, student_in in zip(high, seen["sam"], student_high):
        canvases = make_mosaic(preprocess.to_float(crops), 2)
        mean = torch.tensor(sam.mean).view(1, 3, 1, 1)
        std = torch.tensor(sam.std).view(1, 3, 1, 1)
        teacher01 = teacher_in * std + mean
        assert torch.allclose(teacher01, preprocess.resize(canvases, tuple(teacher01.shape[-2:])), atol=1e-5)
        assert torch.allclose(student_in, preprocess.resize(canvases, tuple(student_in.shape[-2:])), atol=1e-5)
        # the same canvas at two sizes: the teacher's input brought to the student's size matches
        assert float((preprocess.resize(teacher01.clamp(0, 1), tuple(student_in.shape[-2:])) - student_in)
                     .abs().mean()) < 0.02


def test_a_known_mark_lands_in_the_same_cell_for_student_and_teacher():
    """A bright dot in image 2 (row 1, column 0 of the canvas) lands at the same canvas fraction
    in the student's and the teacher's inputs, whatever their sizes."""
    images = torch.zeros(4, 3, 96, 96)
    images[2, :, 30:36, 60:66] = 1.0
    canvas = make_mosaic(images, 2)
    at = {}
    for who, size in (("student", (64, 64)), ("teacher", (112, 112))):
        x = preprocess.resize(canvas, size)[0, 0]
        y, xx = np.unravel_index(int(x.argmax()), x.shape)
        at[who] = ((y + 0.5) / size[0], (xx + 0.5) / size[1])
    expect = (0.5 + 33 / 96 / 2, 63 / 96 / 2)  # image 2 fills the bottom-left quarter
    for who, (fy, fx) in at.items():
        assert abs(fy - expect[0]) < 0.02 and abs(fx - expect[1]) < 0.02, (who, fy, fx, expect)


def test_the_plan_counts_canvases(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, *GROUPS))
    rows, layout, _ = plan(recipe, get_registry(), 2)
    assert "batch 8/rank in 2 mosaic(s) of 2x2" in layout
    high = next(r for r in rows if r.group == "high")
    assert high.inputs == 2 and high.mosaic == 2
    per_input = high.student.flops_per_image + sum(t.flops_per_image for t in high.teachers.values())
    assert high.flops_per_rank_step == pytest.approx(2 * per_input)


def test_bad_mosaic_recipes_are_refused_naming_the_field(tmp_path):
    with pytest.raises(RecipeError, match=r"groups\.high\.mosaic: batch size 6 is not a multiple of 2x2=4"):
        load_recipe(tiny_recipe(tmp_path, GROUPS[0].replace("batch_size: 8", "batch_size: 6")))
    with pytest.raises(RecipeError, match=r"groups\.high\.mosaic"):
        load_recipe(tiny_recipe(tmp_path, GROUPS[0].replace("mosaic: 2", "mosaic: 1")))


def test_a_mosaic_group_cannot_read_cached_features(tmp_path):
    from radio_core.plan.checks import check_mosaic_cache
    from radio_core.plan.partition import plan_stages

    plans = plan_stages(load_recipe(tiny_recipe(tmp_path, *GROUPS)), 1)
    check_mosaic_cache(plans, {"clip"})  # clip's group has no mosaic
    with pytest.raises(RecipeError, match=r"groups\.high\.mosaic: teachers \['sam'\] are read from the feature cache"):
        check_mosaic_cache(plans, {"sam"})
