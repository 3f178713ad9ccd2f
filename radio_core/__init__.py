"""radio_core: the plugin-agnostic engine of radio-distill."""
from .hookspecs import hookimpl
from .protocols import Adaptor, CropGeometry, Loss, Student, StudentOutput, Teacher, TeacherOutput
from .registry import PluginError, Registry, get_registry
from .utils import WeightsError, check_finite, read_safetensors

__all__ = ["hookimpl", "Adaptor", "CropGeometry", "Loss", "Student", "StudentOutput", "Teacher", "TeacherOutput",
           "PluginError", "Registry", "get_registry", "WeightsError", "check_finite", "read_safetensors"]
__version__ = "0.1.0"
