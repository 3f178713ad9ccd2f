"""Stochastic multi-resolution schedules: named resolution sets, every teacher at a low and a high
resolution (RADIOv2.5) through per-group teacher resolutions, one shape per rank and step, and
the planner's throughput report."""
import pytest
import torch
from helpers import metrics, tiny_recipe

from radio_core.plan.partition import plan_stages
from radio_core.recipe import load_recipe
from radio_core.recipe.schema import RecipeError
from radio_core.train.loop import Trainer

MULTIRES = [
    "train.steps=6", "resolution_sets={low: [48, 64], high: [96, 112]}",
    "groups={low: {teachers: [clip, dino], student_resolution: low, batch_size: 4}, "
    "high: {teachers: [clip, dino, sam], student_resolution: high, batch_size: 2, teacher_resolution: {dino: 112}}}",
]


def test_sets_resolve_per_group_with_teacher_overrides(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, *MULTIRES))
    plan = plan_stages(recipe, 4)[0]
    slots = {slots[0].group: slots[0] for slots in plan.rank_slots}
    low, high = slots["low"], slots["high"]
    assert low.student_resolution == [(48, 48), (64, 64)] and high.student_resolution == [(96, 96), (112, 112)]
    assert low.teacher_resolution == {} and high.teacher_resolution == {"dino": (112, 112)}
    with pytest.raises(RecipeError, match="'mid' is not one of the recipe's resolution_sets \\(high, low\\)"):
        load_recipe(tiny_recipe(tmp_path, *MULTIRES, "groups.low.student_resolution=mid"))
    with pytest.raises(RecipeError, match="teacher_resolution: \\['sam'\\] are not teachers of this group"):
        load_recipe(tiny_recipe(tmp_path, *MULTIRES, "groups.low.teacher_resolution={sam: 64}"))


def test_training_draws_one_shape_per_step_and_runs_teachers_at_both_resolutions(tmp_path):
    trainer = Trainer(load_recipe(tiny_recipe(tmp_path, *MULTIRES)))
    assert trainer.teachers["dino"].input_size == (56, 56)
    assert trainer.teacher_variants[("dino", (112, 112), False)].input_size == (112, 112)
    runtimes = {rt.slot.group: rt for rt in trainer.enter_stage(trainer.plans[0], 0)}
    low, high = runtimes["low"], runtimes["high"]
    assert low.teachers["dino"].input_size == (56, 56) and high.teachers["dino"].input_size == (112, 112)
    draws = {(trainer.objective.student_resolution(low.slot, s), trainer.objective.student_resolution(high.slot, s))
             for s in range(40)}
    # both sets are fully used, and the draws of the two groups move together (same step number)
    assert {d[0] for d in draws} == {(48, 48), (64, 64)} and {d[1] for d in draws} == {(96, 96), (112, 112)}
    seen = []
    real = trainer.objective.forward_losses

    def spy(model, distiller, rt, batch, step, stage):
        seen.append((rt.slot.group, step, trainer.objective.student_resolution(rt.slot, step)))
        return real(model, distiller, rt, batch, step, stage)

    trainer.objective.forward_losses = spy
    trainer.fit()
    rows = metrics(tmp_path / "run")
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert {g for g, _, _ in seen} == {"low", "high"}
    assert "loss/sam/spatial" in rows[-1]


def test_dry_run_reports_the_throughput_cost_of_the_schedule(tmp_path, capsys):
    from radio_core.run import main

    assert main([str(tiny_recipe(tmp_path, *MULTIRES)), "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "teachers clip, dino@112x112, sam" in out
    assert "throughput (forward+backward FLOPs" in out
    assert "group low: student drawn from 2 resolutions" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("main: expected step"))
    expected, worst = (float(line.split(" TFLOP")[0].split()[-1]), float(line.split("worst draw ")[1].split(")")[0]))
    assert 0 < expected < worst
