"""Target statistics on staged recipes: each teacher's estimated when it first trains,
re-estimated over its first steps, and resumed exactly from the checkpoint."""
import torch

from radio_core.recipe import load_recipe
from radio_core.train.loop import Trainer

from helpers import metrics, tiny_recipe

STAGED = ["stages=[{name: low, steps: 3, teachers: [clip, dino]}, {name: high, steps: 4}]", "train.steps=7",
          "teachers.sam.target_norm=phi_s", "teachers.clip.target_norm=phi_s",
          "train.target_norm_batches=1", "train.target_norm_steps=4", "train.target_norm_every=2",
          "checkpoint.every=2", "eval.every=0"]


def _run(path, resume=False, stop_at=None):
    trainer = Trainer(load_recipe(path), resume=resume)
    if stop_at is not None:
        class Stop:
            @staticmethod
            def radio_step_end(trainer, step, metrics):
                if step == stop_at:
                    trainer.request_stop()
        from radio_core.hookspecs import hookimpl

        Stop.radio_step_end = hookimpl(Stop.radio_step_end)
        trainer.registry.plugin_manager.register(Stop, name=f"stop-{id(trainer)}")
        try:
            trainer.fit()
        finally:  # the registry is shared: a stop hook left behind would stop later runs
            trainer.registry.plugin_manager.unregister(name=f"stop-{id(trainer)}")
        return trainer
    trainer.fit()
    return trainer


def _norms(trainer):
    return {k: v.clone() for k, v in trainer.unwrapped.state_dict().items() if k.startswith("target_norms.")}


def test_sam_only_in_stage_two_with_reestimation_and_exact_resume(tmp_path, capsys):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    full = _run(tiny_recipe(full_dir, *STAGED))
    out = capsys.readouterr().out
    assert "target statistics estimated for clip (1 batch(es) per rank)" in out  # stage low: SAM waits
    assert "target statistics estimated for sam (1 batch(es) per rank)" in out  # SAM when it first trains
    assert full.first_steps == {"clip": 0, "dino": 0, "sam": 3}
    rows = metrics(full_dir / "run")
    assert rows[-1]["step"] == 7 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)

    # stop at step 4 (between re-estimations of SAM at steps 5 and of clip at 2) and resume
    _run(tiny_recipe(cut_dir, *STAGED), stop_at=4)
    resumed = _run(tiny_recipe(cut_dir, *STAGED), resume=True)
    a, b = metrics(full_dir / "run"), metrics(cut_dir / "run")
    assert [r["step"] for r in b][-3:] == [5, 6, 7]
    for x, y in zip(a[-3:], b[-3:]):
        assert abs(x["loss/total"] - y["loss/total"]) <= 1e-6 * max(1.0, abs(x["loss/total"])), (x, y)
    for k, v in _norms(full).items():
        assert torch.equal(v, _norms(resumed)[k]), k


def test_reestimation_changes_the_statistics(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    once = _run(tiny_recipe(tmp_path / "a", *STAGED, "train.target_norm_steps=0"))
    again = _run(tiny_recipe(tmp_path / "b", *STAGED))
    a, b = _norms(once), _norms(again)
    assert not torch.equal(a["target_norms.clip.summary.mean"], b["target_norms.clip.summary.mean"])
