"""Teacher-target normalisation: standardisation and PHI-S statistics, inversion, checkpoints."""
import pytest
import torch

from radio_core.models.target_norm import PHIS, Standardize, build_target_norm, hadamard


def anisotropic_features(n=4096, dim=48, seed=0) -> torch.Tensor:
    """Correlated features with eigenvalues spanning four orders of magnitude and an offset."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    scales = torch.logspace(-2, 2, dim, dtype=torch.float64).sqrt()
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    offset = torch.linspace(-3, 5, dim, dtype=torch.float64)
    return (z * scales @ q.T + offset).float()


def fitted(norm, x, batches=4):
    for chunk in x.chunk(batches):  # statistics accumulate over several calls
        norm.update(chunk)
    norm.finalize()
    return norm


def covariance(y: torch.Tensor) -> torch.Tensor:
    y = y.double() - y.double().mean(0)
    return y.T @ y / (y.shape[0] - 1)


def test_standardize_gives_zero_mean_unit_variance_per_channel():
    x = anisotropic_features()
    y = fitted(Standardize(48), x).normalize_summary(x)
    assert y.double().mean(0).abs().max() < 1e-5
    torch.testing.assert_close(covariance(y).diagonal(), torch.ones(48, dtype=torch.float64), atol=1e-4, rtol=0)


def test_phi_s_gives_zero_mean_and_equal_variance_in_every_dimension():
    x = anisotropic_features()
    norm = fitted(PHIS(48), x)
    y = norm.normalize_summary(x)
    cov = covariance(y)
    assert y.double().mean(0).abs().max() < 1e-5
    # isotropic: every dimension has the same variance (1), although the input's principal
    # variances span four orders of magnitude
    torch.testing.assert_close(cov.diagonal(), torch.ones(48, dtype=torch.float64), atol=1e-4, rtol=0)
    spectrum = torch.linalg.eigvalsh(covariance(x))
    assert spectrum.max() / spectrum.min() > 1e3
    # a rotation and one scalar: distances shrink uniformly (no dimension is distorted)
    d_in, d_out = torch.pdist(x[:64].double()), torch.pdist(y[:64].double())
    torch.testing.assert_close(d_out / d_in, torch.full_like(d_in, 1 / float(norm.scale)), atol=1e-4, rtol=1e-4)
    rot = norm.rotation.double()
    torch.testing.assert_close(rot @ rot.T, torch.eye(48, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["standardize", "phi_s"])
def test_denormalize_inverts_and_spatial_matches_rows(kind):
    x = anisotropic_features(n=1024, dim=12)
    norm = fitted(build_target_norm(kind, 12), x)
    torch.testing.assert_close(norm.denormalize(norm.normalize_summary(x)), x, atol=1e-5, rtol=1e-5)
    grid = x[:2 * 4 * 6].reshape(2, 4, 6, 12).permute(0, 3, 1, 2)  # (B, C, h, w)
    y = norm.normalize_spatial(grid)
    assert y.shape == grid.shape
    torch.testing.assert_close(y.permute(0, 2, 3, 1).reshape(-1, 12), norm.normalize_summary(x[:48]))
    # the distiller maps a spatial prediction back channels-last
    back = norm.denormalize(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(back, grid, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["standardize", "phi_s"])
def test_statistics_round_trip_through_a_state_dict(kind):
    x = anisotropic_features(n=512, dim=20)
    norm = fitted(build_target_norm(kind, 20), x)
    state = norm.state_dict()
    assert "ready" in state and not any(k.startswith("_") for k in state)  # running sums stay out
    fresh = build_target_norm(kind, 20)
    assert not bool(fresh.ready)
    fresh.load_state_dict(state)
    assert bool(fresh.ready)
    torch.testing.assert_close(fresh.normalize_summary(x), norm.normalize_summary(x), atol=0, rtol=0)


def test_update_spatial_equals_rows_and_float64_sums_keep_precision():
    gen = torch.Generator().manual_seed(1)
    grid = torch.randn(3, 8, 5, 7, generator=gen) + 1e4  # large offset: float32 sums of squares fail
    a, b = Standardize(8), Standardize(8)
    a.update_spatial(grid)
    a.finalize()
    fitted(b, grid.permute(0, 2, 3, 1).reshape(-1, 8), batches=3)
    torch.testing.assert_close(a.std, b.std)
    expected = grid.double().permute(0, 2, 3, 1).reshape(-1, 8).std(0)
    torch.testing.assert_close(a.std.double(), expected, atol=1e-4, rtol=1e-4)


def test_misuse_is_reported():
    norm = PHIS(16)
    with pytest.raises(RuntimeError, match="call update"):
        norm.normalize_summary(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="at least 2"):
        norm.finalize()
    with pytest.raises(ValueError, match=r"rows \(N, 16\)"):
        norm.update(torch.randn(4, 15))
    with pytest.raises(ValueError, match="Hadamard matrix of order 10.*standardize"):
        PHIS(10)
    with pytest.raises(ValueError, match="unknown target normalisation 'whiten'"):
        build_target_norm("whiten", 8)
    assert build_target_norm("none", 8) is None


@pytest.mark.parametrize("n", [2, 4, 12, 20, 32, 36, 48, 256, 768])
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes(n):
    h = hadamard(n).double()
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(h.abs(), torch.full_like(h, n ** -0.5), atol=1e-7, rtol=0)


def test_running_sums_all_reduce_over_a_process_group(tmp_path):
    import torch.distributed as dist

    x = anisotropic_features(n=256, dim=8)
    alone = fitted(Standardize(8), x)
    norm = Standardize(8)
    norm.update(x)
    norm.all_reduce_()  # no process group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        norm.all_reduce_()
    finally:
        dist.destroy_process_group()
    norm.finalize()
    torch.testing.assert_close(norm.std, alone.std, atol=0, rtol=0)
