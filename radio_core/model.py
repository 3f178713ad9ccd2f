"""The user-facing model API, kept at this path for users and plugin authors:
``from radio_core.model import RadioModel``. It lives in ``radio_core.formats``."""
from .formats.export import (
                             ExportError,
                             FeatureNormalizer,
                             build_distiller_from_config,
                             export_config,
                             load_export,
                             save_export,
                             write_export,
)
from .formats.radio_model import RadioModel, RadioOutput, TeacherAdaptor, nearest_supported_resolution

__all__ = ["RadioModel", "RadioOutput", "TeacherAdaptor", "FeatureNormalizer", "ExportError",
           "nearest_supported_resolution", "save_export", "write_export", "load_export", "export_config",
           "build_distiller_from_config"]
