"""No file this project reads runs code. A crafted pickle (whose unpickling would create a marker
file) is put in the place of every file the project reads - checkpoints (replicated and sharded,
each file, checksums rewritten by the attacker), exports, transformers folders, official RADIO
checkpoints, ``student.args.pretrained``, the teacher-feature cache, shard tables, recipes and
sweep files (YAML tags) - and each load fails with one line while the marker never appears.
Our own files are safetensors + JSON; the formats that are pickles by definition (the official
RADIO ``.pth.tar``, a ``.pth`` given as ``pretrained``) go through torch's ``weights_only``
unpickler only. A scan of the source keeps new unpicklers from slipping in unreviewed."""
import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO
from test_loading_errors import export_dir  # noqa: F401 - a fixture
from test_never_lose_a_run import copy_run, stopped_run  # noqa: F401 - a fixture

from radio_core.formats.checkpoints import write_checksums
from radio_core.recipe import load_recipe
from radio_core.run import main
from radio_core.train.loop import Trainer


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, wrap=lambda p: {"state": p}) -> None:
    """A pickle payload at ``path``: as torch.save writes one (torch.load would open it), or a
    plain pickle for dcp's ``.metadata`` (which torch.save cannot name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.startswith("."):
        path.write_bytes(pickle.dumps(wrap(Payload(marker))))
    else:
        torch.save(wrap(Payload(marker)), path)


# (case, how the attacker changes the newest checkpoint folder, what the refusal says)
CHECKPOINT_ATTACKS = [
    ("accelerate_optimizer_bin", lambda c, m: plant(c / "optimizer.bin", m), "holds pickle files (optimizer.bin)"),
    ("accelerate_rng_pkl", lambda c, m: plant(c / "random_states_0.pkl", m), "holds pickle files (random_states_0.pkl)"),
    ("dcp_metadata", lambda c, m: plant(c / "sharded" / ".metadata", m), "holds pickle files (sharded/.metadata)"),
    ("dcp_shard", lambda c, m: plant(c / "pytorch_model_fsdp_0" / "__0_0.distcp", m), "holds pickle files"),
    ("model_is_a_pickle", lambda c, m: plant(c / "model.safetensors", m), "not a valid safetensors"),
    ("optimizer_is_a_pickle", lambda c, m: plant(c / "optimizer.safetensors", m), "not a valid safetensors"),
    ("rng_is_a_pickle", lambda c, m: plant(c / "rng_rank0.safetensors", m), "not a valid safetensors"),
    ("optimizer_json_is_a_pickle", lambda c, m: plant(c / "optimizer.json", m), "optimizer.json"),
    ("state_json_is_a_pickle", lambda c, m: plant(c / "trainer_state.json", m), "trainer_state.json"),
]


@pytest.mark.parametrize("case,attack,fragment", CHECKPOINT_ATTACKS, ids=[c[0] for c in CHECKPOINT_ATTACKS])
def test_a_planted_pickle_in_a_checkpoint_never_runs(case, attack, fragment, stopped_run, tmp_path, capsys):
    root, recipe = copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    newest = root / "run" / "checkpoints" / "step_00000004"
    attack(newest, marker)
    write_checksums(newest)  # whoever plants a payload rewrites the checksums too
    trainer = Trainer(load_recipe(recipe, ["train.steps=6"]), resume=True)
    out = capsys.readouterr().out
    assert not marker.exists()
    assert trainer.state.step == 2, out  # fell back to the older, clean checkpoint
    line = next(ln for ln in out.splitlines() if "step_00000004 could not be loaded" in ln)
    assert fragment in line, line


def test_a_resume_with_only_poisoned_checkpoints_is_one_error_line(stopped_run, tmp_path, capsys):
    root, recipe = copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    for ckpt in (root / "run" / "checkpoints").glob("step_*"):
        plant(ckpt / "optimizer.safetensors", marker)
        write_checksums(ckpt)
    assert main([str(recipe), "--resume"]) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] and "Traceback" not in err
    assert not marker.exists()


class FakeAccelerator:
    """What ``state_files`` asks of Accelerate, for one process without a process group."""

    is_main_process, process_index, num_processes, device, scaler = True, 0, 1, torch.device("cpu"), None


def test_sharded_checkpoints_are_safetensors_and_refuse_a_planted_dcp_metadata(tmp_path):
    """The sharded path (torch.distributed.checkpoint with its Hugging Face storage: a JSON
    header per safetensors shard, no metadata pickle) round-trips, and a planted ``.metadata``
    pickle is refused before anything reads it."""
    from radio_core.train.state_files import StateFileError, load_state, save_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_state(folder, FakeAccelerator(), model, opt, sharded=True)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["optimizer.json", "rng_rank0.safetensors", "sharded/shard-00001-model-00001-of-00001.safetensors"]
    again = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    load_state(folder, FakeAccelerator(), again, opt2, sharded=True)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        torch.testing.assert_close(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"])
    marker = tmp_path / "pwned"
    plant(folder / "sharded" / ".metadata", marker)
    with pytest.raises(StateFileError, match=r"holds pickle files \(sharded/.metadata\)"):
        load_state(folder, FakeAccelerator(), again, opt2, sharded=True)
    assert not marker.exists()


# ------------------------------------------------------------------------ exports and imports
def test_an_export_whose_weights_are_a_pickle_is_refused(export_dir, tmp_path):
    from radio_core.model import ExportError, RadioModel

    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    marker = tmp_path / "pwned"
    plant(folder / "model.safetensors", marker)
    with pytest.raises(ExportError) as e:
        RadioModel.load(folder)
    assert "\n" not in str(e.value) and "not a valid safetensors" in str(e.value)
    assert not marker.exists()


def test_a_transformers_folder_with_pickled_weights_is_refused(tmp_path):
    """Only safetensors are read from a transformers RADIO folder (``radio export`` input and
    ``student.args.pretrained``): a ``pytorch_model.bin`` is never opened."""
    from radio_core.formats.hf_transformers import TransformersFormatError, read_transformers_radio

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "radio"}))
    marker = tmp_path / "pwned"
    plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(TransformersFormatError, match="only safetensors weights are read"):
        read_transformers_radio(folder)
    plant(folder / "model.safetensors", marker)
    with pytest.raises(Exception) as e:
        read_transformers_radio(folder)
    assert "not a valid safetensors" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_foreign_pickle_formats_are_read_by_the_restricted_unpickler_only(tmp_path, registry):
    """The official RADIO checkpoint and a ``.pth`` named as ``student.args.pretrained`` are
    pickles by definition: torch's ``weights_only`` unpickler refuses the payload, in one line."""
    from radio_core.formats.radio_checkpoint import RadioFormatError
    from radio_core.model import RadioModel
    from radio_core.registry import PluginError

    marker = tmp_path / "pwned"
    radio = tmp_path / "radio.pth.tar"
    plant(radio, marker, lambda p: {"args": argparse.Namespace(model="vit_base_patch16_224"), "state_dict": {},
                                    "extra": p})
    with pytest.raises(RadioFormatError) as e:
        RadioModel.load(radio)
    assert "refused to unpickle" in str(e.value)
    pth = tmp_path / "student.pth"
    plant(pth, marker)
    with pytest.raises(PluginError) as e:
        registry.build("student", "vit", model="vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2,
                       pretrained=str(pth), num_cls_tokens=1)
    assert "\n" not in str(e.value) and "not a readable checkpoint" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("plugin,args,weights", [
    ("clip", {"model": "ViT-B-16"}, "open_clip_pytorch_model.bin"),  # open_clip: weights_only=True
    ("dinov2", {"model": "facebook/dinov2-small"}, "pytorch_model.bin"),  # transformers: weights_only=True
])
def test_teacher_weights_that_are_a_pickle_payload_never_run(plugin, args, weights, tmp_path, registry):
    from radio_core.registry import PluginError

    marker = tmp_path / "pwned"
    if plugin == "dinov2":
        from transformers import Dinov2Config

        folder = tmp_path / "dino"
        Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     image_size=56, patch_size=14).save_pretrained(folder)
        plant(folder / weights, marker)
        args = {"model": str(folder)}
    else:
        plant(tmp_path / weights, marker)
        args = {**args, "pretrained": str(tmp_path / weights)}
    with pytest.raises(PluginError) as e:
        registry.build("teacher", plugin, **args, resolution=None)
    assert "\n" not in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------ data files
def test_a_feature_cache_holding_pickled_object_arrays_is_refused(tmp_path):
    from radio_core.data.cache import CacheMismatchError, FeatureCache

    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    (cache / "clip").mkdir(parents=True)
    (cache / "index.json").write_text(json.dumps({"version": 2, "views": 1, "data": {"length": 1},
                                                  "teachers": {"clip": {"summary_dim": 4, "spatial_dim": 4}}}))
    from radio_core.data import cache as cache_module

    index = json.loads((cache / "index.json").read_text())
    index["version"] = cache_module.CACHE_VERSION
    (cache / "index.json").write_text(json.dumps(index))
    np.save(cache / "clip" / "spatial.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.savez(cache / "clip" / "pca.npz", basis=np.array([Payload(marker)], dtype=object),
             mean=np.zeros(4, np.float32))
    reader = FeatureCache(cache)
    with pytest.raises(CacheMismatchError, match="is not a feature array"):
        reader._array("clip", "spatial")
    with pytest.raises(CacheMismatchError, match="is not a PCA basis"):
        reader._basis("clip")
    (cache / "index.json").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="not UTF-8 text|not valid JSON"):
        FeatureCache(cache)
    assert not marker.exists()


def test_a_shard_table_holding_pickled_objects_is_not_unpickled(tmp_path):
    from radio_core.data.shard_index import TABLE, ShardTable

    marker = tmp_path / "pwned"
    np.savez(tmp_path / TABLE, format=np.array([Payload(marker)], dtype=object), names=np.array(["a"]),
             counts=np.array([1]), sizes=np.array([1]), image_keys=np.array(["jpg"]))
    assert ShardTable.load(tmp_path) is None  # not a table: the shards would be scanned instead
    assert not marker.exists()


# ------------------------------------------------------------------------ YAML files
def test_recipes_and_sweep_files_cannot_name_python_objects(tmp_path, capsys):
    from radio_core.sweep.spec import SweepError, load_sweep

    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tag}\nstudent: {{name: vit}}\nteachers: {{a: {{plugin: clip}}}}\n")
    assert main([str(recipe), "--validate"]) == 2
    assert "could not determine a constructor" in capsys.readouterr().err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"recipe: {tag}\noutput_dir: x\n")
    with pytest.raises(SweepError, match="could not determine a constructor"):
        load_sweep(sweep)
    assert not marker.exists()


# ------------------------------------------------------------------------ the source itself
#: every place the code may unpickle, and why it is acceptable (the format is a pickle by
#: definition and torch's restricted unpickler reads it; or numpy with allow_pickle=False).
REVIEWED_LOADERS = {
    ("radio_core/formats/radio_checkpoint.py", "torch.load"): "official RADIO .pth.tar, weights_only=True",
    ("plugins/vit.py", "torch.load"): "a .pth named as student.args.pretrained, weights_only=True",
    ("radio_core/utils.py", "torch.load"): "one-time conversion of our own legacy cache pickles, weights_only=True",
    ("radio_core/data/shard_index.py", "np.load"): "allow_pickle=False",
    ("radio_core/data/cache.py", "np.load"): "allow_pickle=False",
    ("proxy/world.py", "np.load"): "numpy's default allow_pickle=False (mmap of the proxy world's arrays)",
}
#: calls that unpickle, or may: module-qualified names, and methods by name
UNPICKLING_CALLS = {"torch.load", "pickle.load", "pickle.loads", "np.load", "numpy.load", "dill.load", "dill.loads",
                    "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads", "shelve.open",
                    "joblib.load", "FileSystemReader", ".load_state"}


def _call_name(node) -> str:
    import ast

    f = node.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else ""
        return f"{base}.{f.attr}"
    return ""


def test_every_unpickler_in_the_source_is_reviewed():
    import ast

    found = {}
    for folder in ("radio_core", "plugins", "proxy"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = _call_name(node)
                method = "." + name.rpartition(".")[2] if "." in name else None  # x.load_state(...)
                hit = name if name in UNPICKLING_CALLS else (method if method in UNPICKLING_CALLS else None)
                kwargs = {k.arg: k.value for k in node.keywords}
                unsafe = [k for k, bad in (("allow_pickle", True), ("weights_only", False))
                          if isinstance(kwargs.get(k), ast.Constant) and kwargs[k].value is bad]
                if hit or unsafe:
                    found[(str(path.relative_to(REPO)), hit or unsafe[0])] = (node, kwargs, unsafe)
    unreviewed = sorted(k for k in found if k not in REVIEWED_LOADERS)
    assert not unreviewed, f"new unpickling code; make it safetensors/JSON or review it here: {unreviewed}"
    for (path, what), (node, kwargs, unsafe) in found.items():
        assert not unsafe, (path, node.lineno, unsafe)
        if what == "torch.load":  # never the full unpickler
            assert isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True, \
                (path, node.lineno)
