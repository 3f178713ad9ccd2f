"""The later RADIO training methods wired into the objective, end to end on CPU with the tiny
teachers: shifted views with the shift-equivariant loss, the angle-balanced summary loss (its
statistics estimated before step 0, checkpointed, kept out of exports), teacher dropping, and
an intermediate-layer target; clear errors for the combinations that cannot work."""
import pytest
import torch
from helpers import metrics, tiny_recipe
from safetensors.torch import load_file

from radio_core.recipe import load_recipe
from radio_core.recipe.schema import RecipeError
from radio_core.train.loop import Trainer

SHIFT = "{name: shift_equivariant, args: {base: {name: cosine_smooth_l1}}}"
METHODS = [
    "train.steps=12", "augment.shift=0.125",
    f"teachers.clip.spatial_loss={SHIFT}", f"teachers.dino.spatial_loss={SHIFT}", f"teachers.sam.spatial_loss={SHIFT}",
    "teachers.clip.summary_loss={name: angle_balanced}", "teachers.dino.summary_loss={name: angle_balanced}",
    "balance={name: teacher_dropping, args: {p: 0.5}}",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v4")
    trainer = Trainer(load_recipe(tiny_recipe(tmp, *METHODS)))
    trainer.fit()
    return tmp, trainer, metrics(tmp / "run")


def test_loss_falls_with_shifted_views_balanced_summaries_and_dropping(run):
    tmp, trainer, rows = run
    assert len(rows) == 12
    early = sum(r["loss/total"] for r in rows[:3]) / 3
    late = sum(r["loss/total"] for r in rows[-3:]) / 3
    assert late < 0.8 * early, (early, late)
    # teacher dropping: a slot of three teachers keeps, per image, the worst one plus ~half the others
    kept = [r[f"loss/{t}/kept"] for r in rows for t in ("clip", "dino", "sam")]
    assert 0.4 < sum(kept) / len(kept) < 0.9


def test_angle_statistics_are_estimated_checkpointed_and_not_exported(run):
    tmp, trainer, rows = run
    losses = trainer.unwrapped.losses
    for t in ("clip", "dino"):
        assert bool(losses[t]["summary"].ready) and 0 < float(losses[t]["summary"].resultant) < 1
    ckpt = load_file(str(tmp / "run" / "checkpoints" / "step_00000012" / "model.safetensors"))
    assert float(ckpt["losses.clip.summary.resultant"]) == float(losses["clip"]["summary"].resultant)
    exported = load_file(str(tmp / "run" / "export" / "model.safetensors"))
    assert not any(k.startswith("losses.") for k in exported)
    resumed = Trainer(load_recipe(tiny_recipe(tmp, *METHODS)), resume=True)
    assert float(resumed.unwrapped.losses["dino"]["summary"].resultant) == float(losses["dino"]["summary"].resultant)


def test_shifted_views_give_each_teacher_group_its_own_window(run):
    tmp, trainer, _ = run
    rt = trainer.enter_stage(trainer.plans[0], 0)[0]
    images01 = torch.rand(3, 3, *trainer.crop_size(rt.slot))
    torch.manual_seed(0)
    targets, student_in, geometry = trainer.objective.shifted_views(rt, images01, (64, 64))
    assert student_in.shape == (3, 3, 64, 64) and set(targets) == {"clip", "dino", "sam"}
    sides = {n: g.teacher_box[:, 2:] - g.teacher_box[:, :2] for n, g in geometry.items()}
    assert all(torch.allclose(s, torch.full_like(s, 0.875)) for s in sides.values())
    assert not torch.equal(geometry["clip"].teacher_box, geometry["clip"].student_box)
    assert not torch.equal(geometry["clip"].teacher_box, geometry["sam"].teacher_box)  # different groups


def test_intermediate_layer_target_trains_its_head_on_that_block(tmp_path):
    import yaml

    path = tiny_recipe(tmp_path, "train.steps=3",
                       "teachers.dino_mid={plugin: dinov2, args: {tiny: true, layer: 1}, resolution: 56, "
                       "use_summary: false, student_layer: 1}")
    data = yaml.safe_load(path.read_text())
    del data["teachers"]["sam"]  # faster
    path.write_text(yaml.safe_dump(data))
    trainer = Trainer(load_recipe(path))
    trainer.fit()
    assert trainer.unwrapped.student.intermediate_layers == (1,)
    assert trainer.unwrapped.spatial_layers == {"dino_mid": 1}
    assert "loss/dino_mid/spatial" in metrics(tmp_path / "run")[-1]


def test_intermediate_layer_head_of_a_teacher_absent_from_the_batch_still_touches_its_parameters(tmp_path, registry):
    """A rank group without the intermediate-layer teacher (e.g. the SAM group) runs its head on
    one stand-in token, which must carry the intermediate layer too (it once raised KeyError)."""
    from radio_core.models.distiller import build_distiller

    recipe = load_recipe(tiny_recipe(tmp_path, "teachers.dino_mid={plugin: dinov2, args: {tiny: true, layer: 1}, "
                                               "use_summary: false, student_layer: 1}"))
    distiller = build_distiller(recipe, {"clip": (32, 64), "dino": (64, 64), "sam": (None, 32),
                                         "dino_mid": (None, 64)}, registry)
    _, preds = distiller(torch.rand(2, 3, 64, 64), return_predictions=True, active={"sam"})
    assert preds["sam"][1].shape[0] == 2 and preds["dino_mid"][1].shape == (1, 64, 1, 1)
    preds["dino_mid"][1].sum().backward()  # the stand-in reaches the head's parameters
    assert all(p.grad is not None for p in distiller.spatial_heads["dino_mid"].parameters())


def test_combinations_that_cannot_work_are_refused(tmp_path):
    from radio_core.plan.checks import check_recipe
    from radio_core.registry import get_registry

    recipe = load_recipe(tiny_recipe(tmp_path, "augment.shift=0.1"))
    with pytest.raises(RecipeError, match="teachers.clip.spatial_loss: augment.shift is 0.1.*shift_equivariant"):
        check_recipe(recipe, get_registry())
    with pytest.raises(RecipeError, match="student_layer .* needs use_summary: false"):
        load_recipe(tiny_recipe(tmp_path, "teachers.dino.student_layer=1"))
    bad = load_recipe(tiny_recipe(tmp_path, "balance={name: teacher_droping}"))
    with pytest.raises(RecipeError, match="balance.name: unknown balancer 'teacher_droping'"):
        check_recipe(bad, get_registry())


def test_target_norm_per_part_keeps_summaries_uncentred(tmp_path, registry):
    from radio_core.models.distiller import build_distiller
    from radio_core.models.target_norm import PHIS

    recipe = load_recipe(tiny_recipe(tmp_path, "teachers.clip.target_norm={summary: none, spatial: phi_s}",
                                     "teachers.dino.target_norm=standardize"))
    distiller = build_distiller(recipe, {"clip": (32, 64), "dino": (64, 64), "sam": (None, 32)}, registry)
    assert list(distiller.target_norms["clip"]) == ["spatial"] and isinstance(distiller.target_norms["clip"]["spatial"], PHIS)
    assert sorted(distiller.target_norms["dino"]) == ["spatial", "summary"] and "sam" not in distiller.target_norms
