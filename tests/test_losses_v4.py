"""Loss plugins of the later RADIO recipes: angle-balanced summary loss, shift-equivariant
spatial loss, teacher dropping. Numbers, not smoke: statistics against closed forms, alignment
against the framework's own grid rule, a shifted view whose aligned loss vanishes."""
import math

import pytest
import torch
import torch.nn.functional as F

from radio_core import CropGeometry, PluginError
from radio_core.models.losses import CosineSmoothL1Loss, match_grids


def cone(n: int, dim: int, spread: float, seed: int = 0) -> torch.Tensor:
    """n vectors around a common direction; larger spread = wider cone."""
    g = torch.Generator().manual_seed(seed)
    axis = F.normalize(torch.randn(dim, generator=g), dim=0)
    return axis + spread * torch.randn(n, dim, generator=g)


# --------------------------------------------------------------------------- angle balanced


def test_angle_balanced_statistics_and_scale(registry):
    narrow, wide = registry.build("loss", "angle_balanced"), registry.build("loss", "angle_balanced")
    a, b = cone(512, 64, 0.05), cone(512, 64, 0.5, seed=1)
    for chunk in a.split(100):
        narrow.observe(chunk)
    wide.observe(b)
    narrow.finalize(), wide.finalize()
    unit = F.normalize(a.double(), dim=-1)
    assert float(narrow.resultant) == pytest.approx(float(unit.mean(0).norm()), rel=1e-6)
    assert float(narrow.resultant) > 0.9 > float(wide.resultant)
    # the same prediction error costs the narrow-cone teacher more: loss = (1 - cos) / (1 - R)
    pred, target = cone(8, 64, 0.3, seed=2), cone(8, 64, 0.3, seed=3)
    plain = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    assert narrow(pred, target).item() == pytest.approx(plain.item() / (1 - float(narrow.resultant)), rel=1e-5)
    assert narrow(pred, target) > wide(pred, target)


def test_angle_mode_and_buffers_survive_a_checkpoint(registry):
    loss = registry.build("loss", "angle_balanced", mode="angle")
    loss.observe(cone(256, 16, 0.2))
    loss.finalize()
    restored = registry.build("loss", "angle_balanced", mode="angle")
    restored.load_state_dict(loss.state_dict())
    assert bool(restored.ready) and float(restored.resultant) == float(loss.resultant)
    assert sorted(loss.state_dict()) == ["ready", "resultant"]
    pred, target = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16)
    value = restored(pred, target)
    angle = torch.acos(F.cosine_similarity(pred, target, dim=-1)).mean() / math.acos(float(loss.resultant))
    assert value.item() == pytest.approx(angle.item(), rel=1e-5)
    value.backward()
    assert torch.isfinite(pred.grad).all()


def test_angle_balanced_refuses_to_run_unestimated(registry):
    loss = registry.build("loss", "angle_balanced")
    with pytest.raises(RuntimeError, match="not estimated yet"):
        loss(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="at least 2 summary targets"):
        loss.finalize()
    with pytest.raises(PluginError, match="mode must be one of cosine, angle"):
        registry.build("loss", "angle_balanced", mode="sine")


# --------------------------------------------------------------------------- shift equivariant


def field(box: torch.Tensor, grid: tuple[int, int], channels: int = 6) -> torch.Tensor:
    """A smooth 'image content' feature map sampled at the cell centres of ``grid`` over ``box``
    (crop fractions): what an ideal, shift-equivariant feature extractor returns for that view."""
    h, w = grid
    out = []
    for x0, y0, x1, y1 in box.tolist():
        ys = y0 + (torch.arange(h) + 0.5) / h * (y1 - y0)
        xs = x0 + (torch.arange(w) + 0.5) / w * (x1 - x0)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([torch.sin(3 * xx + k) + torch.cos(2 * yy - k) for k in range(channels)]))
    return torch.stack(out)


def test_without_shift_it_is_the_frameworks_grid_rule(registry):
    loss = registry.build("loss", "shift_equivariant")
    base = CosineSmoothL1Loss()
    pred, target = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 12, 12)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    expected = base(*match_grids(pred, target))
    assert loss(pred, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(pred, target, geometry=CropGeometry(full, full)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_shifted_views_align_on_their_overlap(registry):
    loss = registry.build("loss", "shift_equivariant", base={"name": "mse"})
    student = torch.tensor([[0.0, 0.0, 0.875, 0.875], [0.1, 0.05, 0.975, 0.925]])
    teacher = torch.tensor([[0.125, 0.0625, 1.0, 0.9375], [0.0, 0.1, 0.875, 0.975]])
    pred = field(student, (28, 28)).requires_grad_(True)
    target = field(teacher, (14, 14))  # a coarser teacher grid over its own, shifted window
    aligned = loss(pred, target, geometry=CropGeometry(student, teacher))
    naive = F.mse_loss(*match_grids(pred, target))  # what a loss blind to the shift compares
    assert aligned.item() < 0.01 * naive.item()
    aligned.backward()
    assert pred.grad.abs().sum() > 0


def test_grid_locked_teacher_noise_cannot_be_matched_across_shifts(registry):
    """A teacher artefact fixed to its token grid moves relative to the image when views shift:
    the aligned target of two shifted views differs exactly where the artefact sits."""
    from radio_plugins.shift_equivariant import align_on_overlap

    student = torch.tensor([[0.0, 0.0, 0.75, 0.75]] * 2)
    teacher = torch.tensor([[0.0, 0.0, 0.75, 0.75], [0.25, 0.25, 1.0, 1.0]])
    target = field(teacher, (12, 12))
    target[:, :, 2, 3] += 5.0  # the same grid cell in both views
    _, aligned = align_on_overlap(field(student, (12, 12)), target, CropGeometry(student, teacher))
    assert aligned.shape[-2:] == (12, 12)  # the finer lattice over the larger overlap of the batch
    region = aligned.shape[-1]
    peak0 = divmod(int(aligned[0, 0].argmax()), region)
    peak1 = divmod(int(aligned[1, 0].argmax()), region)
    assert peak0 != peak1


def test_shift_equivariant_bad_specs(registry):
    with pytest.raises(PluginError, match="base must be"):
        registry.build("loss", "shift_equivariant", base={"loss": "mse"})
    with pytest.raises(ValueError, match="do not overlap"):
        from radio_plugins.shift_equivariant import overlap_boxes

        overlap_boxes(torch.tensor([[0.0, 0.0, 0.4, 0.4]]), torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


# --------------------------------------------------------------------------- teacher dropping


def test_teacher_dropping_keeps_the_worst_matched_teacher(registry):
    balancer = registry.build("balancer", "teacher_dropping", p=0.5)
    losses = {"clip": torch.tensor([0.9, 0.1, 0.5] * 400), "dino": torch.tensor([0.2, 0.8, 0.5] * 400),
              "sam": torch.tensor([0.1, 0.2, 0.7] * 400)}
    w = balancer(losses, torch.Generator().manual_seed(0))
    worst = torch.stack(list(losses.values())).argmax(0)
    names = list(losses)
    for i in range(1200):
        assert w[names[int(worst[i])]][i] == 1
    dropped = 1 - torch.stack([w[n][worst != k] for k, n in enumerate(names)]).mean()
    assert dropped.item() == pytest.approx(0.5, abs=0.05)
    again = balancer(losses, torch.Generator().manual_seed(0))
    assert all(torch.equal(w[n], again[n]) for n in names)
    only = registry.build("balancer", "teacher_dropping", mode="max_only")(losses)
    assert torch.stack(list(only.values())).sum(0).eq(1).all()
    single = balancer({"clip": torch.rand(5)})
    assert torch.equal(single["clip"], torch.ones(5))
