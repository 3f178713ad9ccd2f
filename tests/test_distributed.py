"""Teacher groups on two CPU ranks, multi-stage recipes, and the dry-run planner."""
import json
import subprocess

import pytest
import torch
from helpers import REPO, env_with, install_recorder, metrics, tiny_recipe, torchrun_cmd

GROUPS = ["groups={clip_dino: {teachers: [clip, dino], share: 0.5, batch_size: 4},"
          " sam: {teachers: [sam], share: 0.5, batch_size: 2, student_resolution: 64}}"]


def launch(cmd, env, timeout=240):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    site = install_recorder(tmp)
    recipe = tiny_recipe(tmp, *GROUPS, "train.steps=12")
    log = launch(torchrun_cmd(2, str(recipe)), env_with(site))
    return tmp, site, recipe, log


@pytest.mark.slow
def test_two_ranks_two_groups_share_one_student(two_rank_run):
    tmp, _, _, log = two_rank_run
    assert "2 process(es)" in log and "effective batch 6" in log
    rec = [json.loads((tmp / "run" / f"record_rank{r}.json").read_text()) for r in range(2)]
    assert rec[0]["world"] == rec[1]["world"] == 2
    # each rank built only its own group's teachers
    assert rec[0]["teachers"] == ["clip", "dino"] and rec[1]["teachers"] == ["sam"]
    # DDP kept the student and every head identical, including heads of absent teachers
    assert rec[0]["digest"] == rec[1]["digest"]
    # the run destroyed its process group itself, before the interpreter's teardown
    assert [json.loads((tmp / "run" / f"exit_rank{r}.json").read_text()) for r in range(2)] \
        == [{"process_group_alive": False}] * 2
    rows = metrics(tmp / "run")
    assert rows[-1]["loss/total"] < 0.7 * rows[0]["loss/total"]
    assert {"loss/clip/summary", "loss/sam/spatial"} <= set(rows[-1])  # gathered from both ranks


@pytest.mark.slow
def test_partition_does_not_change_the_objective(two_rank_run, tmp_path):
    """One process running both groups in turn follows the same loss curve as two ranks
    running one group each: each teacher's loss is its mean over the batches that ran it."""
    tmp, site, recipe, _ = two_rank_run
    import yaml

    from radio_core.recipe import load_raw

    data = load_raw(recipe)
    data["output_dir"] = str(tmp_path / "run")
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(data))
    launch([*torchrun_cmd(1, str(single))], env_with(site))
    two, one = metrics(tmp / "run"), metrics(tmp_path / "run")
    for a, b in zip(two, one):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-4, abs=1e-5), a["step"]
    assert json.loads((tmp_path / "run" / "record_rank0.json").read_text())["digest"] is not None


TWO_STAGES = ["stages=[{name: first, steps: 6, teachers: [clip, dino]}, {name: second, steps: 6}]",
              "train.steps=12"]


@pytest.mark.parametrize("stop_at", [4, 6])
def test_two_stage_recipe_resumes_in_the_right_stage(tmp_path, stop_at):
    from test_train import train

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    train(tiny_recipe(full_dir, *TWO_STAGES))
    path = tiny_recipe(cut_dir, *TWO_STAGES)
    train(path, stop_at=stop_at)
    trainer, _ = train(path, resume=True)
    full, cut = metrics(full_dir / "run"), metrics(cut_dir / "run")
    assert [r["stage"] for r in full] == [0] * 6 + [1] * 6
    assert "loss/sam/spatial" not in full[5] and "loss/sam/spatial" in full[6]
    assert [r["step"] for r in cut] == list(range(1, 13))
    for a, b in zip(full, cut):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5, abs=1e-6), a["step"]


def test_planner_flops_match_a_real_forward(registry):
    """Meta-device FLOPs of the planner vs FlopCounterMode on a real forward + backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from radio_core.models.distiller import build_distiller
    from radio_core.models.teachers import build_teacher
    from radio_core.plan.planner import student_cost, teacher_cost
    from radio_core.recipe import validate

    recipe = validate({"student": {"name": "vit", "args": {"model": "vit_small_patch16_224", "depth": 4}},
                       "teachers": {"clip": {"plugin": "clip", "args": {"tiny": True}}}})
    teacher = build_teacher(recipe, "clip", registry)
    dims = {"clip": (teacher.summary_dim, teacher.spatial_dim)}
    torch.manual_seed(0)
    real = build_distiller(recipe, dims, registry)
    with torch.device("meta"):
        meta = build_distiller(recipe, dims, registry)
    planned = student_cost(meta, (224, 224)).flops_per_image
    x = torch.rand(1, 3, 224, 224)
    real.train()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out, preds = real(x, return_predictions=True)
        sum(p.sum() for pair in preds.values() for p in pair if p is not None).backward()
    measured = counter.get_total_flops()
    assert measured > 1e9
    assert abs(planned - measured) / measured < 0.05, (planned, measured)
    # and for a teacher's forward (nn.MultiheadAttention's fused inference fast path is
    # invisible to FlopCounterMode, like the fused SDPA kernels: count the plain path)
    t_meta = build_teacher(recipe, "clip", registry, meta=True)
    torch.backends.mha.set_fastpath_enabled(False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(torch.rand(1, 3, *teacher.input_size))
    torch.backends.mha.set_fastpath_enabled(True)
    assert abs(teacher_cost(t_meta).flops_per_image - counter.get_total_flops()) / counter.get_total_flops() < 0.05


def test_dry_run_of_the_paper_recipe_at_64_ranks(capsys):
    from radio_core.run import main

    assert main([str(REPO / "recipes" / "dfn_dino_sam.yaml"), "--dry-run", "--world-size", "64",
                 "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    # the paper's recipe (ViT-H/16-CPE, σReparam, ViTDet windows at 1024 px) fits its 80 GB GPUs
    rows = [line for line in out.splitlines() if line.startswith(("low_res ", "high_res "))]
    assert len(rows) == 3 and all(line.split()[-1] == "yes" for line in rows), rows
    assert "WARNING" not in out
    assert "effective batch 1024" in out and "effective batch 1088" in out
    assert "group sam: 32 rank(s) [32-63]" in out
    assert "teacher dino: 1136M params" in out  # DINOv2 ViT-g/14
    kept = (REPO / "docs" / "dry_run_dfn_dino_sam.txt").read_text()
    assert out.strip() in kept  # the documented output is current


@pytest.mark.slow
@pytest.mark.parametrize("name", ["radio_v25", "c_radio_v4"])
def test_dry_runs_of_the_recipes_with_window_draws_are_current(name, capsys):
    """Their students draw ViTDet window sizes at random per step; the plan costs the most
    expensive draw, so it is the same on every call (here: another RNG state than the one that
    wrote docs/) and matches the documented output."""
    from radio_core.run import main

    torch.manual_seed(12345)
    assert main([str(REPO / "recipes" / f"{name}.yaml"), "--dry-run", "--world-size", "64", "--gpu-memory", "80"]) == 0
    assert capsys.readouterr().out.strip() in (REPO / "docs" / f"dry_run_{name}.txt").read_text()


def test_planner_costs_the_most_expensive_window_draw(registry):
    from radio_core.models.distiller import build_distiller
    from radio_core.plan.planner import student_cost
    from radio_core.recipe import validate

    def cost(window_sizes):
        recipe = validate({"student": {"name": "vit", "args": {"model": "vit_small_patch16_224", "depth": 4,
                                                                "global_every": 4, "window_sizes": window_sizes}},
                           "teachers": {"clip": {"plugin": "clip", "args": {"tiny": True}}}})
        with torch.device("meta"):
            distiller = build_distiller(recipe, {"clip": (32, 64)}, registry)
        return student_cost(distiller, (512, 512)), distiller.student

    drawn, student = cost([8, None])
    assert student.window_sizes == [8, None]  # left as it was
    windowed, global_ = cost([8])[0], cost([])[0]
    assert windowed.flops_per_image < global_.flops_per_image
    for _ in range(3):  # whatever the draw would have been
        assert cost([8, None])[0] == drawn == global_
    assert cost([4, 8])[0].flops_per_image == cost([8])[0].flops_per_image > cost([4])[0].flops_per_image

