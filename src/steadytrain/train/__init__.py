"""TrainState and the loop; ``run_training`` assembles and runs a job from its config."""

from steadytrain.train.loop import FitResult, TrainingParts, fit
from steadytrain.train.optim import (
    WarmupCosine,
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
)
from steadytrain.train.planning import (
    ConfigMemoryPlan,
    gpt_shape,
    memory_flag_overrides,
    plan_config_memory,
)
from steadytrain.train.preflight import preflight
from steadytrain.train.report import FINAL_WEIGHTS
from steadytrain.train.session import (
    build_parts,
    checkpoint_contents,
    run_training,
)
from steadytrain.train.state import TrainState

__all__ = [
    "FINAL_WEIGHTS",
    "ConfigMemoryPlan",
    "FitResult",
    "TrainState",
    "TrainingParts",
    "WarmupCosine",
    "apply_hyperparameters",
    "build_optimizer",
    "build_parts",
    "build_scheduler",
    "checkpoint_contents",
    "fit",
    "gpt_shape",
    "memory_flag_overrides",
    "plan_config_memory",
    "preflight",
    "run_training",
]
