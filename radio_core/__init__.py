"""radio_core: the plugin-agnostic engine of radio-distill.

The public names below are imported on first use (PEP 562): ``import radio_core.cli`` (the
``radio`` command) stays light, so the command installs its signal handling before anything
heavy (torch) is imported, and an interrupted start-up is one line, not a traceback.
"""
from __future__ import annotations

from typing import Any

#: public name -> the module that defines it
_EXPORTS = {
    "hookimpl": "hookspecs",
    **dict.fromkeys(["Adaptor", "CropGeometry", "Loss", "Student", "StudentOutput", "Teacher", "TeacherOutput"],
                    "protocols"),
    **dict.fromkeys(["PluginError", "Registry", "get_registry"], "registry"),
    **dict.fromkeys(["WeightsError", "check_finite", "read_safetensors", "safetensors_from_legacy_pickle"], "utils"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'radio_core' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def transformers_student_state(path, student, origin: str = "pretrained"):
    """For student plugins: the state dict (ViT-CPE ``vit`` layout) that gives ``student`` the
    backbone of a transformers ``RadioModel`` directory (C-RADIO); see
    ``radio_core.formats.hf_transformers``. Raises ValueError naming the first mismatch."""
    from .formats.hf_transformers import student_state_from_transformers

    return student_state_from_transformers(path, student, origin)


__all__ = [*_EXPORTS, "transformers_student_state"]
__version__ = "0.1.0"
