"""The training step's own work (issue 30): a non-finite step never updates the weights, whether
the fused optimiser skips it on the device or the host does; a step reads no float from the
device; ``train.compile`` compiles the student and heads in place (same keys, same losses as
an eager run, resume across multi-stage recipes and resolutions)."""
import json

import pytest
import torch
from helpers import metrics, tiny_recipe
from safetensors import safe_open
from test_train import train
from torch.utils._python_dispatch import TorchDispatchMode

from radio_core.recipe import load_recipe
from radio_core.train.guard import skips_on_device
from radio_core.train.loop import Trainer

QUIET = ["checkpoint.export=false", "checkpoint.every=1000", "train.log_every=1000"]


def _trainer(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Trainer(load_recipe(tiny_recipe(tmp_path, *QUIET, *overrides)))


def _snapshot(trainer):
    opt = trainer.optimizer.optimizer.state
    return ({k: v.clone() for k, v in trainer.unwrapped.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.items()},
            {k: v.clone() for k, v in trainer.mesa.ema.state_dict().items()})


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_changes_no_weight_moment_or_ema(tmp_path, capsys, fused):
    trainer = _trainer(tmp_path, f"optim.fused={str(fused).lower()}", "train.mesa={weight: 0.5, decay: 0.9}")
    assert skips_on_device(trainer.optimizer, trainer.accelerator) == fused
    rt = trainer.enter_stage(trainer.plans[0], 0)[0]
    batches = [next(rt.iterator) for _ in range(3)]
    for i in range(2):
        trainer.train_step([(rt, batches[i])], i)
    before = _snapshot(trainer)
    forward_losses = trainer.objective.forward_losses

    def poisoned(*args, **kwargs):  # what a diverging teacher does to the objective
        terms = forward_losses(*args, **kwargs)
        terms["dino/spatial"] = terms["dino/spatial"] * float("nan")
        terms["total"] = terms["total"] + terms["dino/spatial"]
        return terms

    trainer.objective.forward_losses = poisoned
    trainer.train_step([(rt, batches[2])], 2)
    trainer.guard.drain()
    (w0, m0, e0), (w1, m1, e1) = before, _snapshot(trainer)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(m0[p][k], m1[p][k]) for p in m0 for k in m0[p])  # moments and step counts
    assert all(torch.equal(e0[k], e1[k]) for k in e0)
    assert trainer.state.skipped_steps == 1 and trainer.state.nonfinite_in_row == 1
    assert trainer.state.learned_steps == 2
    assert "step 2: non-finite loss from dino/spatial; step skipped (1 in a row)" in capsys.readouterr().out
    trainer.objective.forward_losses = forward_losses  # the next finite step updates again
    trainer.train_step([(rt, batches[0])], 3)
    trainer.guard.drain()
    assert trainer.state.nonfinite_in_row == 0 and trainer.state.learned_steps == 3
    assert any(not torch.equal(w0[k], v) for k, v in trainer.unwrapped.state_dict().items())


class HostReads(TorchDispatchMode):
    """Every tensor value read on the host (``.item()``, ``bool()``, ``float()``...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


SHIFT = "{name: shift_equivariant, args: {base: {name: cosine_smooth_l1}}}"


def test_a_training_step_reads_no_float_from_the_device(tmp_path):
    """Floats read on the host would each wait for a GPU: a non-logging step reads none (the
    only reads left are the loader's CPU flags and the CPU-drawn window size). Covers target
    statistics, angle-balanced and shift-equivariant losses, MESA and DAMP."""
    trainer = _trainer(tmp_path, "teachers.clip.target_norm=phi_s", "teachers.dino.target_norm=standardize",
                       "teachers.clip.summary_loss={name: angle_balanced}", "augment.shift=0.125",
                       f"teachers.clip.spatial_loss={SHIFT}", f"teachers.dino.spatial_loss={SHIFT}",
                       f"teachers.sam.spatial_loss={SHIFT}", "train.mesa={weight: 0.5}", "train.damp={std: 0.1}",
                       "student.args.window_sizes=[2]")
    runtimes = trainer.enter_stage(trainer.plans[0], 0)
    trainer.objective.estimate_target_norms(trainer.unwrapped, runtimes, trainer.plans[0], trainer.source)
    rt = runtimes[0]
    batches = [next(rt.iterator) for _ in range(3)]
    trainer.train_step([(rt, batches[0])], 0)  # the first step checks values once (a sync per model)
    with HostReads() as mode:
        trainer.train_step([(rt, batches[1])], 1)
        trainer.train_step([(rt, batches[2])], 2)
    floats = [d for d in mode.reads if d.is_floating_point]
    assert not floats, floats
    assert len(trainer.guard.pending) == 1 and trainer.state.learned_steps == 2  # read one step late ...
    trainer.guard.drain()
    assert trainer.state.learned_steps == 3  # ... and exact when needed


def test_compile_is_in_place_and_keeps_every_name(tmp_path):
    eager = _trainer(tmp_path / "eager")
    compiled = _trainer(tmp_path / "compiled", "train.compile=true", "train.mesa={weight: 0.5}")
    d = compiled.unwrapped
    modules = [d.student, *d.summary_heads.values(), *d.spatial_heads.values()]
    assert all(m._compiled_call_impl is not None for m in modules)
    assert compiled.mesa.ema.student._compiled_call_impl is None  # the EMA only runs forward: eager
    assert list(d.state_dict()) == list(eager.unwrapped.state_dict())
    assert list(compiled.mesa.ema.state_dict()) == list(eager.unwrapped.state_dict())
    assert not any("_orig_mod" in k for k in d.state_dict())


STAGED = ["stages=[{name: low, steps: 2, teachers: [clip, dino], student_resolution: 48}, "
          "{name: high, steps: 2, student_resolution: 64}]", "train.steps=4", "checkpoint.every=2",
          "train.damp={std: 0.1}", "train.mesa={weight: 0.5, decay: 0.9, start_step: 1}", "checkpoint.export=true",
          "train.log_every=1", "eval.every=4"]


@pytest.mark.slow
def test_a_compiled_run_gives_the_eager_losses_and_resumes(tmp_path):
    """Compiled vs eager, same seeds, over two stages at two resolutions (the SAM heads see only
    their one-token shape in the first): losses equal within 1e-4 relative (float reordering
    in fused kernels); a compiled run stopped and resumed continues the same curve; checkpoint
    and export keys are the eager run's."""
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    eager_dir.mkdir()
    compiled_dir.mkdir()
    train(tiny_recipe(eager_dir, *STAGED))
    path = tiny_recipe(compiled_dir, *STAGED, "train.compile=true")
    train(path, stop_at=0)  # checkpoint after step 1, mid-stage
    train(path, resume=True)
    a, b = metrics(eager_dir / "run"), {r["step"]: r for r in metrics(compiled_dir / "run")}
    assert [r["step"] for r in a] == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for row in a:
        for key in ("loss/total", "loss/clip/spatial", "loss/mesa"):
            if key in row:
                assert b[row["step"]][key] == pytest.approx(row[key], rel=1e-4), (row["step"], key)

    def keys(run, name):
        with safe_open(str(run / "run" / name), "pt") as f:
            return sorted(f.keys())

    for name in ("checkpoints/step_00000004/model.safetensors", "export/model.safetensors"):
        assert keys(compiled_dir, name) == keys(eager_dir, name), name
    config = json.loads((compiled_dir / "run" / "export" / "config.json").read_text())
    assert config == json.loads((eager_dir / "run" / "export" / "config.json").read_text())


@pytest.mark.slow
def test_compiled_fsdp_gives_the_eager_fsdp_losses(tmp_path):
    """train.compile under FSDP2 (two CPU ranks over gloo): the same loss curve as eager FSDP."""
    from helpers import env
    from test_fsdp import FSDP, STEPS, launch

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        (tmp_path / name).mkdir()
        launch(tiny_recipe(tmp_path / name, *STEPS, FSDP, "train.steps=3", "checkpoint.export=false", *extra), env())
        runs[name] = [r["loss/total"] for r in metrics(tmp_path / name / "run")]
    assert len(runs["eager"]) == 3
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
