"""FSDP (FSDP2 through Accelerate) on two CPU ranks over gloo: the sharded student follows the
DDP run's loss curve, writes sharded checkpoints, resumes from them after a SIGTERM, and exports
gathered full weights equal to the DDP run's."""
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import env_with, install_recorder, metrics, tiny_recipe, torchrun_cmd

pytestmark = pytest.mark.slow

# One tiny teacher keeps the three launches short; the teacher count does not touch sharding.
STEPS = ["train.steps=6", "checkpoint.every=100", "teachers={clip: {plugin: clip, args: {tiny: true}, resolution: 64}}"]
FSDP = "train.fsdp={enabled: true, wrap: [Block]}"  # each timm ViT block its own unit


def launch(recipe, env, *args, stopped=False):
    out = subprocess.run(torchrun_cmd(2, str(recipe), *args), env=env, capture_output=True, text=True, timeout=400)
    log = out.stdout + out.stderr
    if stopped:  # a stop after a checkpoint: the ranks exit 75 (EX_TEMPFAIL), torchrun reports it
        assert out.returncode != 0 and "exitcode  : 75" in out.stderr, log[-6000:]
    else:
        assert out.returncode == 0, log[-6000:]
    return log


def test_fsdp_matches_ddp_and_resumes_from_sharded_checkpoints(tmp_path):
    site = install_recorder(tmp_path)
    (tmp_path / "ddp").mkdir()
    (tmp_path / "fsdp").mkdir()
    ddp = tiny_recipe(tmp_path / "ddp", *STEPS)
    fsdp = tiny_recipe(tmp_path / "fsdp", *STEPS, FSDP)
    launch(ddp, env_with(site))
    out = launch(fsdp, env_with(site, RADIO_TEST_SIGTERM="3:1"), stopped=True)
    assert "stop requested: checkpoint written at step 3" in out
    ckpt = tmp_path / "fsdp" / "run" / "checkpoints" / "step_00000003"
    # Sharded state (torch.distributed.checkpoint's Hugging Face storage: one safetensors file per
    # rank, offsets in its JSON header), no replicated weights file, and no pickle anywhere.
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in ckpt.iterdir() if p.is_file()) == [
        "checksums.json", "optimizer.json", "rng_rank0.safetensors", "rng_rank1.safetensors", "trainer_state.json"]
    out = launch(fsdp, env_with(site), "--resume")
    assert "resumed from" in out and "step_00000003" in out

    a, b = metrics(tmp_path / "ddp" / "run"), metrics(tmp_path / "fsdp" / "run")
    assert [m["step"] for m in b] == list(range(1, 7)) and b[-1]["loss/total"] < b[0]["loss/total"]
    for x, y in zip(a, b):  # same objective, same data: only the reduction order differs
        assert y["loss/total"] == pytest.approx(x["loss/total"], rel=1e-5), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), x["step"]

    # The export gathers the shards into the full state dict: the DDP run's weights.
    wa = load_file(tmp_path / "ddp" / "run" / "export" / "model.safetensors")
    wb = load_file(tmp_path / "fsdp" / "run" / "export" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert wb[k].shape == wa[k].shape
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    rec = json.loads((tmp_path / "fsdp" / "run" / "record_rank0.json").read_text())
    assert rec["world"] == 2 and rec["step"] == 6
    assert not (tmp_path / "fsdp" / "run" / "record_rank1.json").exists()  # gathered on rank 0 only


def test_fsdp_wrap_names_a_missing_class(tmp_path):
    from radio_core.recipe import load_recipe
    from radio_core.train.setup import check_fsdp_wrap

    recipe = load_recipe(str(tiny_recipe(tmp_path, "train.fsdp={enabled: true, wrap: [Block, NoSuchBlock]}")))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with pytest.raises(ValueError, match=r"train.fsdp.wrap: no module of class Block, NoSuchBlock .*Linear"):
        check_fsdp_wrap(recipe, model)


def test_planner_reports_per_rank_memory_under_fsdp(tmp_path, registry):
    from radio_core.plan.planner import format_plan, fsdp_gathered_params, plan
    from radio_core.recipe import load_recipe

    world = 4
    ddp = load_recipe(str(tiny_recipe(tmp_path, name="ddp.yaml")))
    fsdp = load_recipe(str(tiny_recipe(tmp_path, "train.fsdp={enabled: true, wrap: [Block]}", name="fsdp.yaml")))
    (a, *_), _, _ = plan(ddp, registry, world)
    rows, layout, _ = plan(fsdp, registry, world)
    b = rows[0]
    assert "FSDP: student + heads sharded over all 4 ranks" in format_plan(rows, layout, world, fsdp)
    params = a.student.params
    assert b.optimizer_bytes == pytest.approx(a.optimizer_bytes / world) == pytest.approx(params * 12 / world)
    # The gathered part: every parameter outside the 2 ViT blocks, plus two blocks.
    with torch.device("meta"):
        from radio_core.models.distiller import build_distiller
        from radio_core.models.teachers import build_teacher

        teachers = {n: build_teacher(fsdp, n, registry, meta=True) for n in fsdp.teachers}
        model = build_distiller(fsdp, {n: (t.summary_dim, t.spatial_dim) for n, t in teachers.items()}, registry)
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ == "Block"]
    assert len(blocks) == 2
    gathered = fsdp_gathered_params(model, fsdp.train.fsdp)
    assert gathered == params - sum(blocks) + 2 * max(blocks)
    teacher_part = a.weight_bytes - params * 4
    assert b.weight_bytes == pytest.approx(params * 4 / world + gathered * 4 + teacher_part)
