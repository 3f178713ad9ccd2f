"""Heads of teachers without targets in a batch only touch their parameters (for DDP)."""
import torch

from radio_core.models.distiller import build_distiller
from radio_core.plan.activations import saved_bytes
from radio_core.recipe import load_recipe
from radio_core.train.objective import Objective
from radio_core.protocols import TeacherOutput

from helpers import tiny_recipe


def test_a_sam_group_batch_runs_only_the_sam_heads_over_its_tokens(tmp_path, registry):
    recipe = load_recipe(tiny_recipe(tmp_path))
    torch.manual_seed(0)
    d = build_distiller(recipe, {"clip": (24, 32), "dino": (16, 16), "sam": (None, 12)}, registry, losses=True).train()
    x = torch.rand(2, 3, 128, 128)
    torch.manual_seed(1)
    _, full = d(x, return_predictions=True)
    torch.manual_seed(1)
    _, sam_only = d(x, return_predictions=True, active={"sam"})
    assert torch.equal(full["sam"][1], sam_only["sam"][1])
    assert sam_only["clip"][1].shape == (1, 32, 1, 1) and sam_only["clip"][0].shape == (1, 24)

    objective = Objective(recipe, registry, {}, set(), None)
    target = {"sam": TeacherOutput(None, torch.randn(2, 12, 8, 8))}
    torch.manual_seed(1)
    terms = objective.losses(d, d(x, return_predictions=True, active={"sam"})[1], target, {})
    terms["total"].backward()
    for name, p in d.named_parameters():  # DDP: every parameter used, the idle heads with zero gradient
        assert p.grad is not None, name
        if name.startswith(("summary_heads.clip", "spatial_heads.dino")):
            assert not p.grad.any(), name
    assert d.spatial_heads["sam"].fc1.weight.grad.any()

    def kept(active):
        return saved_bytes(lambda: d(x, return_predictions=True, active=active), None, d)

    assert kept({"sam"}) < kept(None) - 2 * 64 * 16  # clip + dino heads no longer over 2 x 64 tokens
