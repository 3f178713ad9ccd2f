"""FeatSharp (radio_core.models.featsharp, radio_core.train.featsharp): trained on a tiny real
teacher it upsamples closer to the teacher's own high-resolution features than bilinear
interpolation (and than its untrained self); the file is fingerprinted and refused for another
teacher or factor; a recipe's teacher uses it where its groups say; the plan counts it."""
import json

import pytest
import torch
from helpers import tiny_recipe

from radio_core.models import featsharp as fs
from radio_core.models.teachers import build_teacher
from radio_core.plan.planner import plan
from radio_core.recipe import load_recipe
from radio_core.recipe.schema import RecipeError
from radio_core.registry import get_registry
from radio_core.train import featsharp as train_fs
from radio_core.train.loop import Trainer
from radio_core.utils import WeightsError

pytestmark = pytest.mark.slow  # the module trains one FeatSharp (about 20 s of CPU)

# a one-block tiny DINOv2 at 56 px (4x4 grid), upsampled 2x; short training at a higher learning
# rate than the reference's 5e-4 so that a CPU test sees the fusion block move
DINO = ["teachers.dino.resolution=56", "teachers.dino.args={tiny: {num_hidden_layers: 1}}"]
FAST = train_fs.Settings(steps=80, lr=5e-3, warmup=10, jitters=3, downsampler_kernel=5, norm_batches=4)


def upsampler(path, groups=None):
    extra = f", groups: {groups}" if groups else ""
    return f"teachers.dino.upsampler={{name: featsharp, factor: 2, path: {path}{extra}}}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("featsharp")
    path = tmp / "dino.safetensors"
    recipe = load_recipe(tiny_recipe(tmp, *DINO, upsampler(path)))
    lines = []
    [result] = train_fs.train(recipe, "dino", get_registry(), FAST, say=lines.append)
    return tmp, path, recipe, result, lines


def test_trained_featsharp_is_closer_to_the_teachers_high_resolution_features_than_bilinear(trained):
    _, path, _, result, lines = trained
    after, before = result["held_out"], result["held_out_untrained"]
    assert after["judged"] and before["judged"]
    # against the teacher's own features of the 112-px image (an 8x8 grid), held-out crops
    assert after["featsharp_mse"] < 0.9 * after["bilinear_mse"], after
    assert after["featsharp_cosine"] > after["bilinear_cosine"] + 0.02, after
    assert after["featsharp_mse"] < before["featsharp_mse"] - 0.01, (before, after)  # training, not only the JBU
    assert result["loss_last"] < 0.9 * result["loss_first"]
    assert any("held-out error" in line for line in lines) and any(str(path) in line for line in lines)


def test_the_file_is_fingerprinted_safetensors_and_json(trained):
    tmp, path, recipe, _, _ = trained
    meta = json.loads(fs.json_path(path).read_text())
    teacher = build_teacher(recipe, "dino", get_registry())
    assert meta["format"] == fs.FORMAT and meta["factor"] == 2
    assert meta["teacher"]["fingerprint"] == teacher.fingerprint() and meta["teacher"]["input_size"] == [56, 56]
    assert meta["architecture"]["grid"] == [4, 4] and meta["training"]["steps"] == FAST.steps
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\nl\xfc\x9c"  # not a pickle: safetensors opens it
    ident = fs.identity("dinov2", recipe.teachers["dino"].args, teacher)
    up = fs.load(path, teacher, ident, 2, "teachers.dino.upsampler")
    assert bool(up.normalizer.ready) and up.config.factor == 2
    with pytest.raises(WeightsError, match="upsamples 2x, the recipe asks for 3x"):
        fs.load(path, teacher, ident, 3, "teachers.dino.upsampler")
    other = dict(ident, fingerprint="0" * 16)
    with pytest.raises(WeightsError, match=r"teachers\.dino\.upsampler: .* another teacher: fingerprint"):
        fs.load(path, teacher, other, 2, "teachers.dino.upsampler")
    with pytest.raises(WeightsError, match="radio featsharp"):
        fs.load(tmp / "missing.safetensors", teacher, ident, 2, "teachers.dino.upsampler")


def test_a_recipe_teacher_uses_it_where_its_groups_say(trained, tmp_path):
    _, path, _, _, _ = trained
    groups = "groups={low: {teachers: [clip, dino]}, high: {teachers: [dino, sam], student_resolution: 128}}"
    recipe = load_recipe(tiny_recipe(tmp_path, *DINO, upsampler(path, "[high]"), groups, "train.steps=2",
                                     "checkpoint.export=false"))
    trainer = Trainer(recipe)
    runtimes = {rt.slot.group: rt for rt in trainer.enter_stage(trainer.plans[0], 0)}
    low, high = runtimes["low"], runtimes["high"]
    assert "dino" in high.slot.upsample and "dino" not in low.slot.upsample
    sharp, plain = high.teachers["dino"], low.teachers["dino"]
    assert isinstance(sharp, fs.FeatSharpTeacher) and not isinstance(plain, fs.FeatSharpTeacher)
    assert sharp.base is plain  # one set of teacher weights
    assert sharp.input_size == (112, 112) and trainer.crop_size(high.slot) == (128, 128)
    x = torch.rand(2, 3, 112, 112)
    out = sharp(x)
    assert out.spatial.shape == (2, 64, 8, 8) and torch.isfinite(out.spatial).all()
    torch.testing.assert_close(out.summary, plain(torch.nn.functional.interpolate(
        x, size=(56, 56), mode="bilinear", align_corners=False, antialias=True)).summary)
    trainer.fit()
    assert trainer.state.step == 2


def test_the_upsampler_stays_fp32_when_the_teacher_moves_to_bf16(trained):
    _, path, recipe, _, _ = trained
    teacher = build_teacher(recipe, "dino", get_registry(), upsampled=True).to(torch.bfloat16)
    assert next(teacher.base.parameters()).dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in teacher.upsampler.state_dict().values() if t.is_floating_point())


def test_the_plan_counts_the_tiles_and_the_upsampler(trained, tmp_path):
    _, path, _, _, _ = trained
    plain = plan(load_recipe(tiny_recipe(tmp_path, *DINO)), get_registry(), 1)[0][0].teachers["dino"]
    rows, layout, _ = plan(load_recipe(tiny_recipe(tmp_path, *DINO, upsampler(tmp_path / "none.safetensors"))),
                           get_registry(), 1)
    sharp = rows[0].teachers["dino"]
    assert "dino+featsharp" in layout
    assert sharp.flops_per_image > 5 * plain.flops_per_image  # the image and its 4 tiles, then the upsampler
    assert sharp.params > plain.params


def test_bad_requests_are_one_line_errors(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, *DINO))
    with pytest.raises(RecipeError, match=r"teachers\.dino\.upsampler is not set"):
        train_fs.train(recipe, "dino", get_registry(), FAST)
    with pytest.raises(RecipeError, match="--teacher: 'dion'"):
        train_fs.train(recipe, "dion", get_registry(), FAST)
    with pytest.raises(RecipeError, match=r"upsampler\.groups: \['hgih'\] are not groups"):
        load_recipe(tiny_recipe(tmp_path, *DINO, upsampler(tmp_path / "x.safetensors", "[hgih]"),
                                "groups={high: {teachers: [clip, dino, sam]}}"))
    with pytest.raises(WeightsError, match=r"teachers\.dino\.upsampler: no FeatSharp upsampler"):
        Trainer(load_recipe(tiny_recipe(tmp_path, *DINO, upsampler(tmp_path / "absent.safetensors"))))
    from radio_core.train.featsharp import main

    assert main([str(tiny_recipe(tmp_path, *DINO)), "--teacher", "dino"]) == 2


def test_tiles_round_trip():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    t = fs.tile(x, 3)
    assert t.shape == (18, 3, 2, 2) and torch.equal(t[1], x[0, :, 0:2, 2:4]) and torch.equal(t[3], x[0, :, 2:4, 0:2])
    assert torch.equal(fs.untile(t, 3), x)


def test_a_bf16_run_checks_the_file_against_the_fp32_weights(trained, tmp_path):
    """Teachers are cast (train.teacher_dtype) after the upsampler's fingerprint check, so a
    file trained on the fp32 weights serves a bf16 run; the upsampler itself stays fp32."""
    _, path, _, _, _ = trained
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, *DINO, upsampler(path), "train.teacher_dtype=bf16")))
    sharp = trainer.teachers["dino"]
    assert isinstance(sharp, fs.FeatSharpTeacher)
    assert next(sharp.base.parameters()).dtype == torch.bfloat16
    assert next(sharp.upsampler.parameters()).dtype == torch.float32
