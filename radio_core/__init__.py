"""radio_core: the plugin-agnostic engine of radio-distill."""
from .hookspecs import hookimpl
from .protocols import Adaptor, CropGeometry, Loss, Student, StudentOutput, Teacher, TeacherOutput
from .registry import PluginError, Registry, get_registry
from .utils import WeightsError, check_finite, read_safetensors, safetensors_from_legacy_pickle



def transformers_student_state(path, student, origin: str = "pretrained"):
    """For student plugins: the state dict (ViT-CPE ``vit`` layout) that gives ``student`` the
    backbone of a transformers ``RadioModel`` directory (C-RADIO); see
    ``radio_core.formats.hf_transformers``. Raises ValueError naming the first mismatch."""
    from .formats.hf_transformers import student_state_from_transformers

    return student_state_from_transformers(path, student, origin)


__all__ = ["hookimpl", "Adaptor", "CropGeometry", "Loss", "Student", "StudentOutput", "Teacher", "TeacherOutput",
           "PluginError", "Registry", "get_registry", "WeightsError", "check_finite", "read_safetensors",
           "safetensors_from_legacy_pickle",
           "transformers_student_state"]
__version__ = "0.1.0"
