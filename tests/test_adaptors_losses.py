"""Adaptor and loss math against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from radio_core.models.adaptors import MLPAdaptor
from radio_core.models.losses import CosineLoss, CosineSmoothL1Loss, L1Loss, MSELoss, SmoothL1Loss, match_grids


def test_mlp_adaptor_is_linear_layernorm_gelu_linear():
    torch.manual_seed(0)
    head = MLPAdaptor(in_dim=5, out_dim=3, hidden_dim=7)
    x = torch.randn(4, 5)
    h = x @ head.fc1.weight.T + head.fc1.bias
    ln = head.final[0]
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    expected = h @ head.final[2].weight.T + head.final[2].bias
    torch.testing.assert_close(head(x), expected, atol=1e-6, rtol=1e-5)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 2


def test_mlp_v2_residual_blocks_and_token_shapes():
    head = MLPAdaptor(in_dim=8, out_dim=6, hidden_dim=16, num_inner=2)
    assert head(torch.randn(2, 10, 8)).shape == (2, 10, 6)
    with pytest.raises(ValueError, match="activation"):
        MLPAdaptor(8, 6, 16, activation="tanh")


def test_cosine_loss_hand_values():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # cos = 0 and 1 -> distances 1 and 0 -> mean 0.5
    assert CosineLoss()(pred, target).item() == pytest.approx(0.5)
    # on grids the distance is per cell: (B, C, h, w) with C the feature axis
    g_pred = pred.T.reshape(1, 2, 1, 2)
    g_target = target.T.reshape(1, 2, 1, 2)
    assert CosineLoss()(g_pred, g_target).item() == pytest.approx(0.5)


def test_smooth_l1_mse_l1_hand_values():
    pred = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([[0.5, 3.0]])
    # smooth-L1 (beta 1): 0.5*0.25 = 0.125 and 3 - 0.5 = 2.5 -> mean 1.3125
    assert SmoothL1Loss()(pred, target).item() == pytest.approx(1.3125)
    assert MSELoss()(pred, target).item() == pytest.approx((0.25 + 9) / 2)
    assert L1Loss()(pred, target).item() == pytest.approx(1.75)


def test_spatial_loss_is_weighted_cosine_plus_smooth_l1():
    torch.manual_seed(0)
    p, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    cos = 1 - F.cosine_similarity(p, t, dim=1).mean()
    sl1 = F.smooth_l1_loss(p, t)
    assert CosineSmoothL1Loss(0.9, 0.1)(p, t).item() == pytest.approx((0.9 * cos + 0.1 * sl1).item(), rel=1e-6)


def test_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="prediction"):
        CosineLoss()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_match_grids_interpolates_the_smaller_grid_to_the_larger():
    small = torch.arange(4.0).reshape(1, 1, 2, 2)
    large = torch.zeros(1, 1, 4, 4)
    a, b = match_grids(small, large)
    assert a.shape == b.shape == (1, 1, 4, 4)
    assert b is large
    torch.testing.assert_close(a, F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False))
    # and the other way round: the teacher grid is upsampled when the student's is larger
    a, b = match_grids(large, small)
    assert a is large and b.shape == (1, 1, 4, 4)
    # mixed: 2x8 vs 4x4 -> 4x8 on both sides
    a, b = match_grids(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 4, 4))
    assert a.shape == b.shape == (1, 1, 4, 8)


def test_golden_loss_values():
    """Fixed inputs -> stored values: catches silent changes in the loss math."""
    g = torch.Generator().manual_seed(1234)
    p, t = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    golden = {"cosine": 0.9601818919181824, "smooth_l1": 0.7146735191345215, "spatial": 0.9356310367584229}
    got = {"cosine": CosineLoss()(p, t).item(), "smooth_l1": SmoothL1Loss()(p, t).item(),
           "spatial": CosineSmoothL1Loss()(p, t).item()}
    for k in golden:
        assert got[k] == pytest.approx(golden[k], abs=1e-6), (k, got[k])
