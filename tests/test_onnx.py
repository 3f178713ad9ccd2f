"""``radio export RUN --format onnx``: the student with every head, run by onnxruntime against
PyTorch; a ViT at two resolutions and batch sizes from one file (dynamic sizes), E-RADIO at its size."""
import json

import numpy as np
import pytest
import torch

from radio_core.cli import main as radio
from radio_core.model import RadioModel

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def run_onnx(path, images: torch.Tensor) -> dict:
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images.numpy()})))


def expected(model: RadioModel, images: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model.adaptor_outputs(images)
    flat = {"summary": out["backbone"].summary, "spatial": out["backbone"].spatial}
    for name in model.adaptors:
        for kind, value in (("summary", out[name].summary), ("spatial", out[name].spatial)):
            if value is not None:
                flat[f"{name}.{kind}"] = value
    return flat


def compare(path, model, images) -> float:
    got, want = run_onnx(path, images), expected(model, images)
    assert list(got) == list(want)  # every head, in the documented order
    return max(float(np.abs(got[k] - want[k].numpy()).max()) for k in want)


@pytest.mark.slow  # an ONNX export takes ~20 s here
def test_a_vit_exports_with_dynamic_sizes_and_every_head(registry, tmp_path):
    from test_transformers_format import tiny_model

    model = tiny_model(registry)
    model.save(tmp_path / "export")
    assert radio(["export", str(tmp_path / "export"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    path = tmp_path / "onnx" / "model.onnx"
    meta = json.loads((tmp_path / "onnx" / "model.onnx.json").read_text())
    assert meta["outputs"] == ["summary", "spatial", "clip.summary", "clip.spatial", "sam.spatial"]
    assert meta["size"] == "H, W: any multiple of 16"
    assert "onnxruntime" in (tmp_path / "onnx" / "README.md").read_text()
    loaded = RadioModel.load(tmp_path / "export")
    for batch, (h, w) in ((1, (64, 96)), (3, (112, 48))):
        assert compare(path, loaded, torch.rand(batch, 3, h, w)) <= 1e-4, (h, w)


@pytest.mark.slow
def test_e_radio_exports_at_its_size(registry, tmp_path):
    from official_fixtures import ERADIO_TINY
    from radio_core.models.distiller import Distiller, HeadSpec

    torch.manual_seed(0)
    student = registry.build("student", "eradio", **{**ERADIO_TINY["pool"], "window_size": 2}, num_cls_tokens=1)
    head = registry.build("adaptor", "mlp", in_dim=student.embed_dim, out_dim=12, hidden_dim=16)
    model = RadioModel(Distiller(student, [HeadSpec("dino", None, 12)], {}, {"dino": head}),
                       {"student": {"name": "eradio"}, "resolution": [64, 96]}).eval()
    path = model.save_onnx(tmp_path / "eradio.onnx")
    assert json.loads((tmp_path / "eradio.onnx.json").read_text())["size"] == "H, W: 64 x 96 only"
    assert compare(path, model, torch.rand(2, 3, 64, 96)) <= 1e-4
