"""The proxy benchmark's probes: closed-form ridge read-outs equal the explicit least-squares
problems they stand for, choose their penalty by cross-validation, have no seed, and score
real structure (a linear probe separates what is linear; it cannot see a random-sign texture)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radio_proxy import probes as P


def _explicit_ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> torch.Tensor:
    """argmin |[x 1] w - y|^2 + penalty * mean(diag(x^T x)) * |w without bias|^2, by lstsq."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    d = xb.shape[1]
    scale = float((x * x).sum(0).mean())
    reg = torch.full((d,), (penalty * scale) ** 0.5, dtype=x.dtype)
    reg[-1] = 0
    aug_x = torch.cat([xb, torch.diag(reg)], 0)
    aug_y = torch.cat([y, torch.zeros(d, y.shape[1], dtype=y.dtype)], 0)
    return torch.linalg.lstsq(aug_x, aug_y).solution


def test_normal_equations_solve_the_ridge_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = torch.randn(60, 3, generator=g, dtype=torch.float64)
    eq = P.NormalEquations(5, 3)
    folds = P.fold_of(60)
    xb = P.with_bias(x)
    for f in range(P.FOLDS):
        sel = folds == f
        eq.add(f, xb[sel].T @ xb[sel], xb[sel].T @ y[sel], float(y[sel].square().sum()))
    for penalty in (1e-3, 0.1):
        w = eq._solve(eq.xtx.sum(0), eq.xty.sum(0), penalty)
        assert torch.allclose(w, _explicit_ridge(x, y, penalty), atol=1e-9)
    # held-out error from the statistics equals refitting without each fold and predicting it
    penalty = 0.01
    direct = 0.0
    for f in range(P.FOLDS):
        sel = folds == f
        w = _explicit_ridge(x[~sel], y[~sel], penalty)  # the penalty's scale: the training folds' own
        direct += float(((xb[sel] @ w - y[sel]) ** 2).sum())
    assert eq.held_out_error(penalty) == pytest.approx(direct, rel=1e-6)


def test_segmentation_probe_equals_least_squares_on_upsampled_features():
    """The A^T A trick: fitting logits = upsample(W f) by normal equations of the small grid is
    the same least-squares problem as fitting W on the bilinearly upsampled features."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(10, 4, 3, 3, generator=g)
    masks = torch.randint(3, (10, 12, 12), generator=g)
    a = P.interpolation_matrix((3, 3), (12, 12))
    up = F.interpolate(feats, size=(12, 12), mode="bilinear", align_corners=False)
    assert torch.allclose((a @ feats.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(10, 4, 12, 12), up, atol=1e-6)
    out = P.segmentation_probe(feats, masks, feats, masks, 3)
    norm = P.Standardiser(feats, 1)
    x = norm(up).permute(0, 2, 3, 1).reshape(-1, 4).double()
    y = F.one_hot(masks.flatten(), 3).double()
    w = _explicit_ridge(x, y, out["penalty"])
    scores = (P.with_bias(x) @ w).view(10, 12, 12, 3).permute(0, 3, 1, 2)
    pred = P.balanced_argmax(scores.float(), P.class_prior(masks, 3))
    from torchmetrics.functional.classification import multiclass_jaccard_index

    assert out["miou"] == pytest.approx(float(multiclass_jaccard_index(pred, masks, 3, average="macro")), abs=1e-6)


def test_probes_have_no_seed_and_read_linear_structure():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(4, (400,), generator=g)
    centres = torch.randn(4, 16, generator=g) * 2
    x = centres[labels] + torch.randn(400, 16, generator=g)
    first, info = P.class_probe(x[:300], labels[:300], x[300:], 4)
    torch.manual_seed(123)  # the global RNG plays no part
    again, _ = P.class_probe(x[:300], labels[:300], x[300:], 4)
    assert torch.equal(first, again) and info["penalty"] in P.PENALTIES
    assert float((first.argmax(1) == labels[300:]).float().mean()) > 0.9
    # a random-sign pattern: the class is in the sign's energy, not in any linear function
    sign = torch.randint(2, (400, 1), generator=g) * 2 - 1
    has = torch.randint(2, (400,), generator=g)
    pattern = torch.randn(1, 16, generator=g)
    z = sign * has[:, None] * pattern + 0.1 * torch.randn(400, 16, generator=g)
    linear, _ = P.class_probe(z[:300], has[:300], z[300:], 2)
    energy, _ = P.class_probe(z[:300].abs(), has[:300], z[300:].abs(), 2)
    assert float((linear.argmax(1) == has[300:]).float().mean()) < 0.7
    assert float((energy.argmax(1) == has[300:]).float().mean()) > 0.95


def test_bootstrap_is_the_binomial_standard_error():
    correct = torch.from_numpy(np.random.default_rng(0).random(2000) < 0.3)
    p = float(correct.float().mean())
    assert P.bootstrap_se(correct) == pytest.approx((p * (1 - p) / 2000) ** 0.5, rel=0.15)


def test_confusions_and_miou_match_torchmetrics():
    from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_jaccard_index

    g = torch.Generator().manual_seed(3)
    pred, target = torch.randint(4, (6, 9, 9), generator=g), torch.randint(4, (6, 9, 9), generator=g)
    target[target == 3] = 2  # a class never true, sometimes predicted
    per_image = P.confusion_per_image(pred, target, 4)
    for i in range(6):
        assert torch.equal(per_image[i], multiclass_confusion_matrix(pred[i].flatten(), target[i].flatten(), 4))
    assert P.miou_of(per_image.sum(0))[0] == pytest.approx(
        float(multiclass_jaccard_index(pred, target, 4, average="macro")), abs=1e-6)
