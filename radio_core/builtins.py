"""The core's own generic components (adaptors, losses, data sources, evaluators).

Registered through the ``radio_core`` entry-point group exactly like any third-party plugin.
"""
from __future__ import annotations

from .data import shards, sources
from .eval.evaluators import BUILTIN as EVALUATORS
from .hookspecs import hookimpl
from .models import adaptors, losses


@hookimpl
def radio_register(registry) -> None:
    registry.add("adaptor", "mlp", adaptors.build_mlp)
    registry.add("adaptor", "linear", adaptors.build_linear)
    registry.add("loss", "cosine", losses.build_cosine)
    registry.add("loss", "smooth_l1", losses.build_smooth_l1)
    registry.add("loss", "mse", losses.build_mse)
    registry.add("loss", "l1", losses.build_l1)
    registry.add("loss", "cosine_smooth_l1", losses.build_cosine_smooth_l1)
    registry.add("dataset", "image_folder", sources.build_image_folder)
    registry.add("dataset", "skimage_samples", sources.build_skimage_samples)
    registry.add("dataset", "synthetic", sources.build_synthetic)
    registry.add("dataset", "webdataset", shards.build_webdataset)
    registry.add("dataset", "hf_datasets", shards.build_hf_datasets)
    for name, factory in EVALUATORS.items():
        registry.add("evaluator", name, factory)
