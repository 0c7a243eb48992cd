"""TrainState and the loop; ``run_training`` assembles and runs a job from its config."""

from steadytrain.train.checkpointing import ResumeRequest, open_storage
from steadytrain.train.inspection import CheckpointStatus, inspect_checkpoints
from steadytrain.train.loop import FitResult, TrainingParts, fit
from steadytrain.train.optim import WarmupCosine, build_optimizer, build_scheduler
from steadytrain.train.preflight import preflight
from steadytrain.train.session import FINAL_WEIGHTS, build_parts, run_training, save_final_weights
from steadytrain.train.state import TrainState

__all__ = [
    "FINAL_WEIGHTS",
    "CheckpointStatus",
    "FitResult",
    "ResumeRequest",
    "TrainState",
    "TrainingParts",
    "WarmupCosine",
    "build_optimizer",
    "build_parts",
    "build_scheduler",
    "fit",
    "inspect_checkpoints",
    "open_storage",
    "preflight",
    "run_training",
    "save_final_weights",
]
