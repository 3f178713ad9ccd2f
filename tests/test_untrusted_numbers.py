"""Numbers from files are checked before they are used: widths in an export's config.json against
the teacher's and the weights file's shapes before anything is allocated (a 16,384-wide PHI-S
asked for by a 16-wide teacher used to allocate gigabytes first), and values for finiteness
in every weights file read (transformers-format folders through ``radio export``, ``RadioModel.load``
and ``student.args.pretrained``; our own checkpoints)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import env
from test_export_safety import export_with_target_norms

from radio_core.cli import main as radio
from radio_core.model import ExportError, RadioModel
from radio_core.registry import PluginError


@pytest.fixture(scope="module")
def phi_s_export(tmp_path_factory):
    """An export whose dino teacher (16 wide) has PHI-S normalisers with estimated statistics."""
    return export_with_target_norms(tmp_path_factory.mktemp("export"), dino={"target_norm": "phi_s"})


def _edit(export, tmp_path, change):
    out = tmp_path / "edited"
    shutil.copytree(export, out)
    config = json.loads((out / "config.json").read_text())
    change(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


LOAD_AND_MEASURE = """
import resource, sys, time
from radio_core.model import ExportError, RadioModel
start = time.perf_counter()
try:
    RadioModel.load(sys.argv[1])
    print("LOADED")
except ExportError as exc:
    print("REFUSED", exc)
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "SECONDS", time.perf_counter() - start)
"""


def _widen_norm(config):
    config["target_norms"]["dino"]["spatial"]["args"]["dim"] = 16384


def _widen_teacher_and_norm(config):  # a consistent lie: only the weights file can tell
    config["teachers"]["dino"]["spatial_dim"] = 16384
    config["target_norms"]["dino"]["spatial"]["args"]["dim"] = 16384


@pytest.mark.parametrize("change,fragment", [
    (_widen_norm, "dim 16384 is not the width of the teacher's target (16)"),
    (_widen_teacher_and_norm, "in the weights file, the config asks for (16384, 24)"),
])
def test_a_config_asking_for_a_huge_phi_s_is_refused_before_allocating(change, fragment, phi_s_export, tmp_path):
    def load(folder):
        out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(folder)], env=env(), capture_output=True,
                             text=True, timeout=300)
        return out.stdout + out.stderr[-2000:], float(out.stdout.split("PEAK_MB")[1].split()[0])

    said, peak = load(_edit(phi_s_export, tmp_path, change))
    assert "REFUSED" in said and fragment in said, said
    fine, baseline = load(phi_s_export)  # the same process loading the export as written
    assert "LOADED" in fine, fine
    # one 16384x16384 float32 matrix alone is 1024 MiB: refused long before any such allocation
    assert peak < baseline + 300, (peak, baseline)


def test_the_phi_s_export_itself_loads(phi_s_export):
    model = RadioModel.load(phi_s_export)
    assert model(torch.rand(1, 3, 64, 64))[0].isfinite().all()


# ------------------------------------------------------------------------ finiteness
@pytest.fixture(scope="module")
def transformers_export(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "RadioModel"):
        pytest.skip("this transformers has no RadioModel")
    from test_transformers_format import tiny_model
    from radio_core.registry import get_registry

    out = tmp_path_factory.mktemp("hf") / "hf"
    tiny_model(get_registry()).save_transformers(out)
    return out


def _poison(folder, tmp_path):
    out = tmp_path / "poisoned"
    shutil.copytree(folder, out)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in sorted(state) if state[k].is_floating_point() and state[k].numel() > 8)
    state[key][0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    return out


def test_nan_weights_in_a_transformers_folder_are_refused_everywhere(transformers_export, registry, tmp_path,
                                                                      capsys):
    from test_transformers_format import ARCH

    bad = _poison(transformers_export, tmp_path)
    with pytest.raises(ExportError, match="non-finite values"):
        RadioModel.load(bad)
    assert radio(["export", str(bad), "--format", "radio-distill", "--out", str(tmp_path / "out")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "non-finite values" in lines[0] and "model.safetensors" in lines[0]
    with pytest.raises(PluginError, match="non-finite values") as e:
        registry.build("student", "vit", **ARCH, num_cls_tokens=2, num_registers=3, pretrained=str(bad))
    assert "\n" not in str(e.value)


def test_nan_weights_in_a_checkpoint_are_refused_on_resume(tmp_path, capsys):
    from helpers import tiny_recipe
    from test_train import train
    from radio_core.recipe import load_recipe
    from radio_core.formats.checkpoints import write_checksums
    from radio_core.train.loop import Trainer

    path = tiny_recipe(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    train(path, stop_at=4)
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    _poison(newest, tmp_path)  # (a poisoned copy; now in place, checksums rewritten)
    shutil.copy(tmp_path / "poisoned" / "model.safetensors", newest / "model.safetensors")
    write_checksums(newest)
    trainer = Trainer(load_recipe(path, ["train.steps=6"]), resume=True)
    out = capsys.readouterr().out
    assert trainer.state.step == 2 and "step_00000004 could not be loaded" in out and "non-finite values" in out
