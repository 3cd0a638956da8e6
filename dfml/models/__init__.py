"""Few-shot architectures (Conv4, ResNet-10/18), the name registry and pool parameter averaging."""

from dfml.models.averaging import average_state_dicts, load_average_into
from dfml.models.base import FewShotNet, count_parameters
from dfml.models.registry import MODEL_NAMES, POOLINGS, build_model

__all__ = [
    "FewShotNet",
    "MODEL_NAMES",
    "POOLINGS",
    "average_state_dicts",
    "build_model",
    "count_parameters",
    "load_average_into",
]
