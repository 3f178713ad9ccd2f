"""σReparam (radio_core.models.spectral): W_hat = (softplus(s) + 0.05)/σ(W)·W with σ by power iteration."""
import torch
from torch import nn
from torch.nn.utils import parametrize

from radio_core.models.spectral import (
    SpectralReparam,
    apply_spectral_reparam,
    folded_state_dict,
    has_spectral_reparam,
    remove_spectral_reparam,
)


def _layer(seed=0, shape=(24, 16)):
    torch.manual_seed(seed)
    return nn.Linear(shape[1], shape[0])


def _reparam(layer) -> SpectralReparam:
    return layer.parametrizations.weight[0]


def test_initial_function_unchanged_and_gain_is_sigma():
    plain = _layer()
    wrapped = _layer()
    names = apply_spectral_reparam(nn.Sequential(wrapped))
    assert names == ["0"] and parametrize.is_parametrized(wrapped, "weight")
    x = torch.randn(5, 16)
    for mode in (False, True):  # eval, then train (one more power iteration on a converged estimate)
        wrapped.train(mode)
        torch.testing.assert_close(wrapped(x), plain(x), rtol=1e-5, atol=1e-6)
    true_sigma = torch.linalg.matrix_norm(plain.weight.detach(), ord=2)
    torch.testing.assert_close(_reparam(wrapped).gain.detach(), true_sigma, rtol=1e-4, atol=1e-6)


def test_sigma_times_normalised_weight_is_consistent():
    layer = _layer(1)
    apply_spectral_reparam(layer)
    rp = _reparam(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3.0)  # W changes: σ must follow, W_hat must not
    layer.train()
    for _ in range(30):
        layer(torch.zeros(1, 16))
    w = layer.parametrizations.weight.original.detach()
    sigma = rp.sigma(w).detach()
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(w, ord=2), rtol=1e-4, atol=1e-6)
    # σ(W) · (W / σ) reproduces W, and W_hat = gain · W/σ has spectral norm gain.
    torch.testing.assert_close(sigma * (w / sigma), w)
    layer.eval()
    torch.testing.assert_close(torch.linalg.matrix_norm(layer.weight.detach(), ord=2), rp.gain.detach(),
                               rtol=1e-4, atol=1e-6)


def test_power_iteration_only_in_training():
    layer = _layer(2)
    apply_spectral_reparam(layer)
    rp = _reparam(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(torch.randn(24, 16))
    u0 = rp._u.clone()
    layer.eval()
    layer(torch.randn(2, 16))
    assert torch.equal(rp._u, u0)
    layer.train()
    layer(torch.randn(2, 16))
    assert not torch.equal(rp._u, u0)


def test_gradients_reach_scale_and_weight():
    layer = _layer(3)
    apply_spectral_reparam(layer)
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    assert _reparam(layer).scale.grad is not None
    assert layer.parametrizations.weight.original.grad.abs().sum() > 0


def test_fold_and_remove_bake_plain_weights():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 6))
    apply_spectral_reparam(net, filter=lambda name, m: name == "2")
    assert has_spectral_reparam(net) and not parametrize.is_parametrized(net[0])
    with torch.no_grad():
        net[2].parametrizations.weight.original.mul_(0.5)
    net.train()
    net(torch.randn(3, 8))
    net.eval()
    x = torch.randn(3, 8)
    before = net(x)
    folded = folded_state_dict(net)
    assert set(folded) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    plain = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 6))
    plain.load_state_dict(folded)
    torch.testing.assert_close(plain(x), before)
    assert has_spectral_reparam(net)  # folded_state_dict left the module alone
    assert remove_spectral_reparam(net) == 1
    assert not has_spectral_reparam(net) and not parametrize.is_parametrized(net[2])
    torch.testing.assert_close(net(x), before)


def test_scale_is_2d_with_official_keys_and_qkv_gets_one_sigma_per_part():
    """v2 form: a (1, 1) ``scale`` (so weight decay reaches it); q, k and v of a fused qkv each have
    their own σ and gain, under the official key names."""
    from timm.models.vision_transformer import Attention

    torch.manual_seed(5)
    attn = Attention(16, num_heads=2, qkv_bias=True)
    with torch.no_grad():  # q, k, v with very different norms: one σ for all would hide k and v
        attn.qkv.weight[16:32].mul_(10.0)
        attn.qkv.weight[32:].mul_(0.1)
    plain_w = attn.qkv.weight.detach().clone()
    assert sorted(apply_spectral_reparam(attn)) == ["proj", "qkv"]
    keys = {k for k in attn.state_dict() if k.startswith("qkv.")}
    assert keys == {"qkv.bias", "qkv.parametrizations.weight.original",
                    *(f"qkv.parametrizations.weight.0.parts.{i}.{n}" for i in range(3)
                      for n in ("scale", "_u", "_v", "_sn_version"))}
    assert attn.state_dict()["proj.parametrizations.weight.0.scale"].shape == (1, 1)
    attn.eval()
    torch.testing.assert_close(attn.qkv.weight, plain_w, rtol=1e-4, atol=1e-6)  # function unchanged at wrap
    chunked = attn.qkv.parametrizations.weight[0]
    with torch.no_grad():
        for i, part in enumerate(chunked.parts):
            part.scale.fill_(float(i))  # gains softplus(0, 1, 2) + 0.05
    w_hat = attn.qkv.weight.detach()
    for i, rows in enumerate(w_hat.split(16)):
        norm = torch.linalg.matrix_norm(rows, ord=2)
        torch.testing.assert_close(norm, torch.nn.functional.softplus(torch.tensor(float(i))) + 0.05,
                                   rtol=1e-4, atol=1e-6)


def test_official_fold_uses_the_same_formula(tmp_path):
    """A layer of ours, written with its parametrisation keys, folds to the same plain weight in
    the official-checkpoint importer (both forms: single and per-part)."""
    from radio_core.formats.radio_checkpoint import fold_official_spectral
    from timm.models.vision_transformer import Attention

    torch.manual_seed(6)
    attn = Attention(16, num_heads=2)
    apply_spectral_reparam(attn)
    attn.train()
    with torch.no_grad():
        attn.proj.parametrizations.weight[0].scale.add_(0.3)
        attn.qkv.parametrizations.weight.original.mul_(1.5)
    attn(torch.randn(2, 5, 16))  # one power iteration
    state = {f"base_model.{k}": v for k, v in attn.state_dict().items()}
    folded = fold_official_spectral(state, eps=1e-6)
    ours = folded_state_dict(attn)
    for name in ("qkv.weight", "proj.weight"):
        assert torch.equal(folded[f"base_model.{name}"], ours[name]), name


# ------------------------------------------------------------------ against torch and the official code
def test_power_iteration_order_and_modes_match_torch_spectral_norm():
    """torch's spectral_norm is the reference for the power iteration (the official σReparam
    subclasses it): from the same (u, v), the same u then v updates in train mode, none in eval."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(8)
    theirs = spectral_norm(nn.Linear(16, 24), eps=1e-6)
    ours = nn.Linear(16, 24)
    ours.load_state_dict({"weight": theirs.parametrizations.weight.original.detach(), "bias": theirs.bias.detach()})
    apply_spectral_reparam(ours, eps=1e-6)
    mine, ref = _reparam(ours), theirs.parametrizations.weight[0]
    with torch.no_grad():
        mine._u.copy_(ref._u)
        mine._v.copy_(ref._v)
    gen = torch.Generator().manual_seed(9)
    for step in range(30):
        if step == 20:
            theirs.eval(), ours.eval()
        delta = 0.05 * torch.randn(24, 16, generator=gen)
        with torch.no_grad():
            theirs.parametrizations.weight.original.add_(delta)
            ours.parametrizations.weight.original.add_(delta)
        w_theirs, w_ours = theirs.weight, ours.weight  # one read: one iteration in train mode, none in eval
        assert torch.equal(mine._u, ref._u) and torch.equal(mine._v, ref._v), step
        # torch divides by uᵀWv, σReparam by uᵀWv + eps, times its gain
        sigma = torch.dot(ref._u, torch.mv(theirs.parametrizations.weight.original, ref._v))
        torch.testing.assert_close(w_ours * (sigma + 1e-6) / mine.gain, w_theirs * sigma, rtol=1e-6, atol=1e-7)


def test_trajectory_matches_the_official_sigma_reparam():
    """The official σReparam's own initial state (u, v, gain) on a timm attention + MLP, then 20
    weight updates with a train-mode read after each and two eval reads (fixture written by the
    official code: tests/fixtures/official). Every realised weight and the final (u, v) agree."""
    from official_fixtures import fixture_tensors, run_sigma_trajectory, sigma_module

    fixture = fixture_tensors("spectral_reparam.safetensors")
    module = sigma_module()
    apply_spectral_reparam(module)
    init = {k[len("init."):]: v for k, v in fixture.items() if k.startswith("init.")}
    module.load_state_dict(init, strict=True)  # the official key names, one for one
    got = run_sigma_trajectory(module)
    expected = {k[len("expected."):]: v for k, v in fixture.items() if k.startswith("expected.")}
    assert set(got) == set(expected)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, worst


def test_an_official_training_checkpoint_with_sigma_reparam_imports_as_the_official_loader_builds_it(tmp_path):
    """The official loader bakes a training state's σReparam in train mode (one more power
    iteration); the import does the same: outputs agree with what hubconf.radio_model computed."""
    from official_fixtures import fixture_tensors
    from radio_core.model import RadioModel
    from test_radio_format import official_checkpoint

    expected = fixture_tensors("vit_training_checkpoint.safetensors")
    path = tmp_path / "official.pth.tar"
    official_checkpoint(path, "state_dict")
    model = RadioModel.load(path)
    with torch.no_grad():
        got = model.adaptor_outputs(expected["images"])
    worst = 0.0
    for name in ("backbone", "clip", "dino_v2"):
        worst = max(worst, float((got[name].summary - expected[f"{name}.summary"]).abs().max()),
                    float((got[name].spatial.flatten(2).transpose(1, 2) - expected[f"{name}.features"]).abs().max()))
    assert worst <= 1e-6, worst
