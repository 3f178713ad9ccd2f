"""Attention backends of the students (sdpa | xformers | math): same weights, same outputs."""
import warnings

import pytest
import torch

from radio_core.registry import PluginError, get_registry
import radio_core.models.attention as common
from radio_core.models.attention import attend, xformers_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
XFORMERS_SKIP = xformers_unavailable(DEVICE)


def vit(**kw):
    torch.manual_seed(0)
    return get_registry().build("student", "vit", model="vit_tiny", embed_dim=64, depth=2, num_heads=4,
                                num_cls_tokens=2, **kw).eval().to(DEVICE)


def eradio(**kw):
    torch.manual_seed(0)
    return get_registry().build("student", "eradio_lite", variant="tiny", num_cls_tokens=2, **kw).eval().to(DEVICE)


def eradio_official(**kw):
    from official_fixtures import ERADIO_TINY

    torch.manual_seed(0)
    return get_registry().build("student", "eradio", **ERADIO_TINY["conv"], num_cls_tokens=2, **kw).eval().to(DEVICE)


def outputs(model, backend, x):
    model.set_attention_backend(backend)
    with torch.no_grad():
        out = model(x)
    return out.summary, out.patches


@pytest.mark.parametrize("build,size", [(vit, 64), (eradio, 224), (eradio_official, 224)])
def test_sdpa_and_math_backends_agree(build, size):
    # E-RADIO at 224: its 14x14 stride-16 map does not tile into 4x4 windows, so the padding
    # mask is exercised too.
    model = build()
    x = torch.rand(2, 3, size, size, device=DEVICE)
    ref = outputs(model, "sdpa", x)
    for a, b in zip(ref, outputs(model, "math", x)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_masked_attention_matches_between_backends():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 16, 8) for _ in range(3))
    mask = torch.rand(3, 1, 1, 16) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attend(q, k, v, mask, "sdpa"), attend(q, k, v, mask, "math"), rtol=1e-4, atol=1e-5)
    # a masked key has no influence
    v2 = torch.where(mask.view(3, 1, 16, 1), v, torch.full_like(v, 100.0))
    torch.testing.assert_close(attend(q, k, v, mask, "math"), attend(q, k, v2, mask, "math"))
    bias = torch.randn(1, 2, 16, 16)  # a floating mask is added to the logits (E-RADIO's position bias)
    torch.testing.assert_close(attend(q, k, v, bias, "sdpa"), attend(q, k, v, bias, "math"), rtol=1e-4, atol=1e-5)
    expect = ((q @ k.transpose(-2, -1)) * 8 ** -0.5 + bias).softmax(-1) @ v
    torch.testing.assert_close(attend(q, k, v, bias, "math"), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(XFORMERS_SKIP is not None, reason=f"xformers backend not testable here: {XFORMERS_SKIP}")
@pytest.mark.parametrize("build,size", [(vit, 64), (eradio, 224), (eradio_official, 224)])
def test_xformers_agrees_with_sdpa(build, size):
    model = build()
    x = torch.rand(2, 3, size, size, device=DEVICE)
    for a, b in zip(outputs(model, "sdpa", x), outputs(model, "xformers", x)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(XFORMERS_SKIP is None, reason="xformers runs here; the fallback is not taken")
def test_xformers_falls_back_to_sdpa_with_one_warning_line():
    model = vit()
    x = torch.rand(1, 3, 64, 64, device=DEVICE)
    ref = outputs(model, "sdpa", x)
    common._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = outputs(model, "xformers", x)
        outputs(model, "xformers", x)
    lines = [str(w.message) for w in caught if "xformers" in str(w.message)]
    assert len(lines) == 1 and "using sdpa" in lines[0] and "\n" not in lines[0], lines
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)


def test_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(PluginError, match="attention must be one of sdpa, xformers, math"):
        vit(attention="flash")
    with pytest.raises(PluginError, match="student .eradio_lite.: attention must be one of"):
        eradio(attention="flash")
