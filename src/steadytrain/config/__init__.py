"""Typed configuration, overrides and the identity fingerprint. Imports nothing else."""

from steadytrain.config.errors import (
    EXIT_AUDIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    DataError,
    FactoryError,
    UserError,
)
from steadytrain.config.load import (
    config_from_dict,
    dump_config,
    identity_differences,
    identity_fields,
    identity_fingerprint,
    load_config,
)
from steadytrain.config.models import (
    BatchLayout,
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
    batch_layout,
)

__all__ = [
    "EXIT_AUDIT_FAILED",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_USAGE",
    "BatchLayout",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DistConfig",
    "FactoryError",
    "LogConfig",
    "ModelConfig",
    "TrainConfig",
    "UserError",
    "batch_layout",
    "config_from_dict",
    "dump_config",
    "identity_differences",
    "identity_fields",
    "identity_fingerprint",
    "load_config",
]
