"""radio_core: the plugin-agnostic engine of radio-distill."""
from .hookspecs import hookimpl
from .protocols import Adaptor, Loss, Student, StudentOutput, Teacher, TeacherOutput
from .registry import PluginError, Registry, get_registry

__all__ = ["hookimpl", "Adaptor", "Loss", "Student", "StudentOutput", "Teacher", "TeacherOutput",
           "PluginError", "Registry", "get_registry"]
__version__ = "0.1.0"
