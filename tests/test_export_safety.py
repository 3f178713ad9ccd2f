"""No file chooses code: an export's config.json names target-normalisation classes from a
fixed table only, with validated arguments. A crafted export that tries to run a function of
the project (or anything else) is refused naming the file, and its payload never runs."""
import importlib
import json
import shutil

import pytest
import torch

from radio_core.model import ExportError, RadioModel, save_export

from test_model_api import make_recipe, trained_distiller

#: project functions that write a file from JSON-able keyword arguments (where each lives
#: depends on the package layout; the test uses every one that exists).
PAYLOADS = [("radio_core.shards", "write_manifest"), ("radio_core.data.shards", "write_manifest"),
            ("radio_core.sweep", "write_json"), ("radio_core.sweep.state", "write_json")]


def _payload_args(name, directory):
    """Arguments with which the payload writes a file into ``directory``."""
    return {"out": str(directory), "manifest": {"shards": [], "image_keys": ["jpg"]}} if name == "write_manifest" else \
        {"path": str(directory / "m"), "data": {"pwned": True}}


def live_payloads(tmp_path):
    """The payload functions that exist and really write their marker when called."""
    found = []
    for module, name in PAYLOADS:
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        probe = tmp_path / f"probe-{module}-{name}"
        probe.mkdir()
        fn(**{k: (type(probe)(v) if k == "path" else v) for k, v in _payload_args(name, probe).items()})
        assert any(probe.iterdir()), (module, name)  # the payload is live: calling it writes
        found.append((module, name))
    return found


def export_with_target_norms(folder, **teachers):
    """An export of ``make_recipe(**teachers)`` whose target norms have estimated statistics."""
    from radio_core.registry import get_registry

    recipe = make_recipe(**teachers)
    distiller = trained_distiller(recipe, get_registry())
    for parts in distiller.target_norms.values():
        for norm in parts.values():
            norm.update(torch.randn(64, norm.dim))
            norm.finalize()
    path = folder / "export"
    save_export(distiller, recipe, None, path)
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_with_target_norms(tmp_path_factory.mktemp("export"), clip={"target_norm": "standardize"})


def crafted(export_dir, tmp_path, entry):
    out = tmp_path / "crafted"
    shutil.copytree(export_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["target_norms"]["clip"]["summary"] = entry
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_crafted_export_cannot_run_project_code(export_dir, tmp_path):
    payloads = live_payloads(tmp_path)
    assert payloads, "no payload function found in this layout"
    marker_dir = tmp_path / "marker"
    marker_dir.mkdir()
    for module, name in payloads:
        for cls in (f"{module}.{name}", f"{module}:{name}"):
            out = crafted(export_dir, tmp_path, {"class": cls, "args": _payload_args(name, marker_dir)})
            with pytest.raises(ExportError) as e:
                RadioModel.load(out)
            assert str(out / "config.json") in str(e.value) and "refusing class" in str(e.value)
            shutil.rmtree(out)
    assert list(marker_dir.iterdir()) == [], "the crafted export ran code"


REFUSED = [
    ({"class": "os.system", "args": {"command": "touch pwned"}}, "refusing class 'os.system'"),
    ({"class": "builtins.exec", "args": {}}, "refusing class"),
    ({"class": "radio_core.run.main", "args": {"argv": ["x"]}}, "refusing class"),
    ({"class": "radio_core.normalize._TargetNorm", "args": {"dim": 24}}, "refusing class"),
    ({"class": ["standardize"], "args": {"dim": 24}}, "refusing class"),
    ({"args": {"dim": 24}}, "refusing class None"),
    ({"class": "standardize", "args": {"dim": 24, "__class__": "x"}}, "unexpected argument(s) ['__class__']"),
    ({"class": "standardize", "args": {"dim": True}}, "dim must be an integer"),
    ({"class": "standardize", "args": {"dim": 2**40}}, "dim must be an integer"),
    ({"class": "standardize", "args": {"dim": 24, "eps": float("nan")}}, "eps must be a number"),
    ({"class": "standardize", "args": "dim=24"}, "args must be a mapping"),
    ({"class": "phi_s", "args": {"dim": 24, "eps": 0}}, "eps must be a number"),
]


@pytest.mark.parametrize("entry,fragment", REFUSED, ids=[f"case{i}" for i in range(len(REFUSED))])
def test_target_norm_entries_outside_the_table_are_refused(entry, fragment, export_dir, tmp_path):
    out = crafted(export_dir, tmp_path, entry)
    with pytest.raises(ExportError) as e:
        RadioModel.load(out)
    msg = str(e.value)
    assert fragment in msg and str(out / "config.json") in msg and "\n" not in msg, msg
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("path", ["standardize", "radio_core.normalize.Standardize",
                                  "radio_core.models.target_norm.Standardize"])
def test_table_names_and_recorded_class_paths_load(path, export_dir, tmp_path):
    reference = RadioModel.load(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    entry = dict(config["target_norms"]["clip"]["summary"], **{"class": path})
    model = RadioModel.load(crafted(export_dir, tmp_path, entry))
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.adaptors["clip"](model.forward_features(images)).summary,
                           reference.adaptors["clip"](reference.forward_features(images)).summary)
