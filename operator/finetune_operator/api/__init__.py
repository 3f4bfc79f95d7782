"""The FineTuneJob API: typed models, constants and naming rules."""

from finetune_operator.api.constants import API_VERSION, GROUP, KIND, PLURAL, VERSION
from finetune_operator.api.types import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, StageSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "StageSpec",
]
