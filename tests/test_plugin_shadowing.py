"""Plugin shadowing and plugins that kill their importer.

A name registered by two distributions is never won by entry-point sort order: both stay
listed, the plain name is an error naming both distributions, and ``DIST:NAME`` picks one. A
plugin whose import raises anything, ``sys.exit`` included, is reported by name and does not end
``plugins``, ``validate`` or ``train``."""
import re
import subprocess
import sys

import pytest
import yaml

from radio_core.registry import PluginError, Registry

from helpers import QUICKSTART, TINY, env_with, fake_distribution

COPYCAT = """
    from radio_core import hookimpl

    def impostor(**kwargs):
        '''An impostor.'''
        raise RuntimeError("the impostor was built")

    @hookimpl
    def radio_register(registry):
        registry.add("{kind}", "{name}", impostor)
        registry.add("loss", "{dist}_own_loss", impostor)
"""

# (entry-point module name sorting before / after the built-ins, kind, taken name)
SHADOW_CASES = [("aaa_first", "teacher", "clip"), ("zzz_last", "teacher", "clip"), ("aaa_first", "loss", "cosine"),
                ("zzz_last", "adaptor", "mlp"), ("mmm_mid", "dataset", "image_folder"), ("aaa_first", "student", "vit")]


@pytest.mark.parametrize("module,kind,name", SHADOW_CASES, ids=[f"{m}-{k}-{n}" for m, k, n in SHADOW_CASES])
def test_a_taken_name_is_an_error_naming_both_distributions(module, kind, name, tmp_path, monkeypatch):
    module = f"{module}_{kind}_{name}"  # one module per case: imports are cached per process
    dist = f"evil-{module.replace('_', '-')}"
    fake_distribution(tmp_path, dist, module, COPYCAT.format(kind=kind, name=name, dist=module))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    assert reg.failures == []  # neither plugin is dropped
    assert [(k, n) for k, n, _ in reg.conflicts] == [(kind, name)]
    with pytest.raises(PluginError) as e:
        reg.get(kind, name)
    msg = str(e.value)
    assert "radio-distill" in msg and dist in msg and f"'radio-distill:{name}'" in msg and f"'{dist}:{name}'" in msg
    # explicit choice, by distribution (any spelling) or entry-point name
    assert reg.get(kind, f"radio-distill:{name}").distribution == "radio-distill"
    assert reg.get(kind, f"Radio_Distill:{name}").distribution == "radio-distill"
    assert reg.get(kind, f"{dist}:{name}").plugin == module
    assert reg.get(kind, f"{module}:{name}").distribution == dist
    with pytest.raises(PluginError, match="no distribution or entry point 'nobody' provides"):
        reg.get(kind, f"nobody:{name}")
    # the rest of both plugins is unaffected
    assert reg.get("loss", f"{module}_own_loss").distribution == dist
    assert "clip" in reg.names("teacher") or name == "clip"


def _recipe(tmp_path, *overrides):
    from radio_core.recipe import apply_overrides, load_raw

    data = apply_overrides(load_raw(QUICKSTART), TINY + list(overrides))
    data["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(site, *args, timeout=240):
    return subprocess.run([sys.executable, "-m", "radio_core.cli", *args], env=env_with(site), capture_output=True,
                          text=True, timeout=timeout)


def test_cli_refuses_the_ambiguous_name_and_accepts_the_qualified_one(tmp_path):
    site = fake_distribution(tmp_path / "site", "evil-clip", "aaa_evil", COPYCAT.format(kind="teacher", name="clip",
                                                                                         dist="aaa_evil"))
    listing = _cli(site, "plugins", "--kind", "teacher")
    assert listing.returncode == 1
    assert "radio-distill:clip" in listing.stdout and "evil-clip:clip" in listing.stdout
    assert "CONFLICT: teacher 'clip' is registered by more than one plugin" in listing.stdout
    bad = _cli(site, "validate", str(_recipe(tmp_path)))
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1, bad.stderr
    assert "teachers.clip.plugin" in errors[0] and "evil-clip" in errors[0] and "radio-distill" in errors[0]
    good = _cli(site, "validate", str(_recipe(tmp_path, "teachers.clip.plugin=radio-distill:clip")))
    assert good.returncode == 0, good.stderr
    assert "warning: teacher 'clip' is registered by more than one plugin" in good.stderr


EXITING = {
    "sys_exit_0": "import sys\nsys.exit(0)\n",
    "sys_exit_3": "import sys\nsys.exit(3)\n",
    "raise_base": "raise BaseException('odd')\n",
    "raise_value": "raise ValueError('broken plugin')\n",
    "exit_in_register": "import sys\nfrom radio_core import hookimpl\n@hookimpl\ndef radio_register(registry):\n"
                        "    registry.add('loss', 'half_registered', print)\n    sys.exit(4)\n",
    "bad_kind": "from radio_core import hookimpl\n@hookimpl\ndef radio_register(registry):\n"
                "    registry.add('gadget', 'x', print)\n",
}


@pytest.mark.parametrize("case", sorted(EXITING))
def test_a_plugin_that_exits_or_raises_on_import_is_named_in_process(case, tmp_path, monkeypatch):
    fake_distribution(tmp_path, "bad-plugin", f"aaa_bad_{case}", EXITING[case])
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()  # returns: nothing ended the process
    assert [(f.entry_point, f.distribution) for f in reg.failures] == [(f"aaa_bad_{case}", "bad-plugin")]
    assert "half_registered" not in reg.names("loss")  # a failed plugin registers nothing
    assert "clip" in reg.names("teacher")


def test_plugins_validate_and_train_go_on_when_a_plugin_calls_sys_exit(tmp_path):
    site = fake_distribution(tmp_path / "site", "exiting-plugin", "aaa_exit", EXITING["sys_exit_0"])
    listing = _cli(site, "plugins")
    assert listing.returncode == 1 and "FAILED to load plugin 'aaa_exit' from exiting-plugin: SystemExit(0)" \
        in listing.stdout, listing.stdout + listing.stderr
    assert re.search(r"teacher +clip ", listing.stdout)
    recipe = _recipe(tmp_path, "train.steps=2", "checkpoint.export=false")
    val = _cli(site, "validate", str(recipe))
    assert val.returncode == 0 and "OK (3 teachers" in val.stdout, val.stderr
    assert "warning: plugin 'aaa_exit' from distribution 'exiting-plugin' failed to load" in val.stderr
    train = _cli(site, "train", str(recipe))
    assert train.returncode == 0 and "done: step 2" in train.stdout, train.stdout[-2000:] + train.stderr[-2000:]


# A package whose *entry point* is named like a built-in one: importlib.metadata and pluggy both
# key plugins by that name, so such a package could replace the built-in CLIP plugin (``clip``)
# or every built-in adaptor, loss and data source (``core``). Identity is (distribution, name).
def impostor(kind, name, module):
    return COPYCAT.format(kind=kind, name=name, dist=module)


@pytest.mark.parametrize("entry_point,kind,name", [("clip", "teacher", "clip"), ("core", "adaptor", "mlp"),
                                                   ("core", "loss", "cosine"), ("vit", "student", "vit")])
def test_an_entry_point_named_like_a_built_in_drops_nothing(entry_point, kind, name, tmp_path, monkeypatch):
    module = f"impostor_{entry_point}_{kind}"
    fake_distribution(tmp_path, "evil-twin", module, impostor(kind, name, module), entry_point=entry_point)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    assert reg.failures == [] and reg.warnings == []
    # every built-in is still there: the whole core (adaptors, losses, data sources) and CLIP
    builtin = {(c.kind, c.name) for c in reg.components() if c.distribution == "radio-distill"}
    assert {("adaptor", "mlp"), ("loss", "cosine"), ("dataset", "image_folder"), ("teacher", "clip"),
            ("student", "vit")} <= builtin
    assert [(k, n) for k, n, _ in reg.conflicts] == [(kind, name)]
    with pytest.raises(PluginError, match="evil-twin"):
        reg.get(kind, name)
    assert reg.get(kind, f"radio-distill:{name}").distribution == "radio-distill"
    assert reg.get(kind, f"evil-twin:{name}").plugin == entry_point
    # the entry-point name alone does not pick one: both distributions have an entry point of that name
    with pytest.raises(PluginError, match="matches more than one"):
        reg.get(kind, f"{entry_point}:{name}")


def test_one_distribution_name_installed_twice_is_reported_not_silently_hidden(tmp_path, monkeypatch):
    """importlib.metadata.entry_points() keeps only the first distribution of a name on sys.path:
    a second ``radio-distill`` earlier on the path would hide every built-in."""
    fake_distribution(tmp_path, "radio-distill", "fake_core", impostor("adaptor", "mlp", "fake_core"),
                      entry_point="core")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.load_entry_points()
    assert "dinov2" in reg.names("teacher") and "image_folder" in reg.names("dataset")  # the real one loaded
    assert any("'radio-distill' is installed more than once" in w and str(tmp_path) in w for w in reg.warnings)
    assert [(k, n) for k, n, _ in reg.conflicts] == [("adaptor", "mlp")]
    with pytest.raises(PluginError, match="matches more than one"):
        reg.get("adaptor", "radio-distill:mlp")


def test_plugins_listing_names_the_distribution_of_each_component(tmp_path):
    site = fake_distribution(tmp_path / "site", "evil-twin", "impostor_cli", impostor("teacher", "clip", "impostor_cli"),
                             entry_point="clip")
    listing = _cli(site, "plugins", "--kind", "teacher")
    assert listing.returncode == 1
    rows = {ln.split()[1]: ln for ln in listing.stdout.splitlines() if ln.startswith("teacher")}
    assert "radio-distill (clip)" in rows["radio-distill:clip"] and "evil-twin (clip)" in rows["evil-twin:clip"]
    assert "radio-distill (dinov2)" in rows["dinov2"]
