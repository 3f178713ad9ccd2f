"""Plugin discovery through the radio_core entry-point group."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import fake_distribution, install_example_plugin

from radio_core.registry import PluginError, Registry

REPO = Path(__file__).resolve().parents[1]
BUILTIN = {
    "teacher": {"clip", "dinov2", "sam"},
    "student": {"vit", "eradio", "eradio_lite"},
    "adaptor": {"mlp", "linear"},
    "loss": {"cosine", "smooth_l1", "mse", "l1", "cosine_smooth_l1"},
    "dataset": {"image_folder", "skimage_samples", "synthetic", "webdataset", "hf_datasets"},
}


def test_builtins_are_discovered_through_entry_points(registry):
    for kind, names in BUILTIN.items():
        assert names <= set(registry.names(kind)), kind
    by_name = {(c.kind, c.name): c for c in registry.components()}
    assert by_name[("teacher", "clip")].distribution == "radio-distill"
    assert by_name[("teacher", "clip")].plugin == "clip"
    assert registry.failures == []


def test_listing_does_not_import_model_libraries():
    code = ("import sys; from radio_core.plugins import format_table; format_table(); "
            "print(sorted(m for m in ('open_clip', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unknown_name_lists_available_names(registry):
    with pytest.raises(PluginError) as e:
        registry.get("teacher", "dinov9")
    msg = str(e.value)
    assert "unknown teacher 'dinov9'" in msg and "clip, cradio, dinov2, dinov3, proxy_clip" in msg and ", sam," in msg
    assert "Did you mean 'dinov3'" in msg


def _fake_distribution(root: Path, dist: str, module: str, body: str) -> None:
    fake_distribution(root, dist, module, body)


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_keep_working(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken-teachers", "broken_teachers", """
        import not_a_real_module_xyz  # the plugin's missing dependency
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    assert [(f.entry_point, f.distribution) for f in reg.failures] == [("broken_teachers", "broken-teachers")]
    assert "ModuleNotFoundError" in reg.failures[0].error
    assert "clip" in reg.names("teacher")  # the others still load
    with pytest.raises(PluginError) as e:
        reg.get("teacher", "fancy")
    assert "plugin 'broken_teachers' from distribution 'broken-teachers' failed to import" in str(e.value)


def test_third_party_plugin_installs_and_is_discovered(tmp_path):
    """pip-install examples/third_party_plugin and find its teacher through discovery."""
    target = install_example_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "radio_core.plugins", "--kind", "teacher"], env=env,
                             capture_output=True, text=True, check=True).stdout
    line = next(l for l in listing.splitlines() if l.startswith("teacher  timm_vit"))
    assert "radio-timm-teacher (timm_teacher)" in line
    # Build it by name through the registry and check it reproduces timm's own forward.
    code = textwrap.dedent("""
        import json, timm, torch
        from radio_core import get_registry
        torch.manual_seed(0)
        ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64, depth=2)
        torch.save(ref.state_dict(), "%s")
        t = get_registry().build("teacher", "timm_vit", model="vit_tiny_patch16_224", checkpoint="%s",
                                 img_size=64, depth=2, resolution=None).freeze()
        x = torch.randn(2, 3, 64, 64)
        out, feats = t(x), ref.eval().forward_features(x)
        print(json.dumps({"dist": get_registry().get("teacher", "timm_vit").distribution,
                          "summary_err": (out.summary - feats[:, 0]).abs().max().item(),
                          "spatial_shape": list(out.spatial.shape)}))
    """ % (tmp_path / "w.pth", tmp_path / "w.pth"))
    res = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    assert res["dist"] == "radio-timm-teacher"
    assert res["summary_err"] < 1e-5
    assert res["spatial_shape"] == [2, 192, 4, 4]
