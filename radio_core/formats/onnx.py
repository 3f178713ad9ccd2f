"""ONNX export: ``radio export RUN --format onnx`` writes ``model.onnx``, the student with every
adaptor head, for onnxruntime / TensorRT.

Input ``images``: (B, 3, H, W) RGB in [0, 1] (the input conditioner is inside). Outputs, in this
order: ``summary`` (B, k * D) and ``spatial`` (B, D, h, w), the backbone's; then per teacher
``<teacher>.summary`` (B, C) and ``<teacher>.spatial`` (B, C', h, w) for the heads it has (the
teacher's own feature space: target normalisation undone). ``model.onnx.json`` beside it lists
the outputs, the input size rule and the teachers.

Batch is dynamic. H and W are dynamic, any multiple of the student's ``size_multiple`` (a ViT's
patch size; times the window in a fixed ViTDet mode), for a ViT student, whose function is the
same at every size; other students (E-RADIO, whose levels resize their maps by input-dependent
rules) are written for one size (``resolution``, default the run's student resolution). Written
with torch's dynamo exporter (``onnxscript``; the ``onnx`` extra); tests/test_onnx.py runs the
file with onnxruntime against PyTorch at two resolutions.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn


class OnnxExportError(ValueError):
    """A model that cannot be written as ONNX here (missing exporter, unsupported student)."""


class _Flat(nn.Module):
    """A ``RadioModel`` with a flat tuple of outputs (ONNX has no nested ones)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.names = ["summary", "spatial"]
        self.heads: list[tuple[str, str]] = []
        for teacher in model.adaptors:
            adaptor = model.adaptors[teacher]
            for kind, head in (("summary", adaptor.summary_head), ("spatial", adaptor.spatial_head)):
                if head is not None:
                    self.heads.append((teacher, kind))
                    self.names.append(f"{teacher}.{kind}")

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.model.student(images)
        backbone = self.model.backbone(features)
        out = [backbone.summary, backbone.spatial]
        per_teacher = {t: self.model.adaptors[t](features) for t in dict.fromkeys(t for t, _ in self.heads)}
        out += [getattr(per_teacher[t], kind) for t, kind in self.heads]
        return tuple(out)


def dynamic_size(student: nn.Module) -> bool:
    """Whether the student's ONNX graph can take any multiple of its size_multiple: a ViT with CPE."""
    return hasattr(student, "patch_generator")


def save_onnx(model: Any, path: str | os.PathLike, resolution: Optional[tuple[int, int]] = None,
              opset: Optional[int] = None) -> Path:
    """Write ``model`` (a ``radio_core.model.RadioModel``) to ``path`` (a ``.onnx`` file); see the
    module docstring. ``resolution``: the example (and, for fixed-size students, the only) input
    size; default the run's student resolution, else 224 (rounded to the size multiple)."""
    try:
        import onnxscript  # noqa: F401 - torch's dynamo exporter needs it
    except ImportError as exc:
        raise OnnxExportError(f"--format onnx needs onnx and onnxscript (pip install 'radio-distill[onnx]'): "
                              f"{exc}") from None
    model = model.eval()
    flat = _Flat(model).eval()
    multiple = int(model.size_multiple)
    h, w = resolution or tuple(model.config.get("resolution") or (224, 224))
    h, w = model.nearest_supported_resolution(int(h), int(w))
    example = torch.rand(2, 3, h, w)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    dynamic = dynamic_size(model.student)
    if dynamic:
        dims[2] = multiple * torch.export.Dim("rows", min=1, max=4096 // multiple)
        dims[3] = multiple * torch.export.Dim("cols", min=1, max=4096 // multiple)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written in a sibling folder under the final name (a large model's weights go to NAME.data,
    # which the graph names), then moved into place
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with torch.no_grad():
            torch.onnx.export(flat, (example,), str(tmp / path.name), dynamo=True, input_names=["images"],
                              output_names=flat.names, dynamic_shapes={"images": dims}, opset_version=opset,
                              verbose=False, report=False)
        for f in tmp.iterdir():
            os.replace(f, path.parent / f.name)
    except Exception as exc:  # noqa: BLE001 - the exporter's failures are many kinds: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise OnnxExportError(f"ONNX export of {type(model.student).__name__} failed: {first}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"input": "images: (batch, 3, H, W) RGB in [0, 1]",
            "size": f"H, W: any multiple of {multiple}" if dynamic else f"H, W: {h} x {w} only",
            "outputs": flat.names, "teachers": list(model.adaptors), "summary_idxs": list(model.summary_idxs)}
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


__all__ = ["save_onnx", "OnnxExportError", "dynamic_size"]
