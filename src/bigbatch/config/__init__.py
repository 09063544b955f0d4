"""Typed run configuration: every key in schema.py, TOML and ``--set`` in loading.py, checks in
validation.py.

Every value has a default, so an empty config is a valid run. Unknown keys and bad values are
rejected before any work with a :class:`ConfigError` that names the key and the fix.
"""

from bigbatch.config.loading import (
    MOVED_TO_RUNTIME,
    config_from_dict,
    deep_merge,
    load_config,
    merge_overrides,
    parse_override,
    read_run_config,
    read_toml,
)
from bigbatch.config.schema import (
    DATA_FORMATS,
    FISHER_TYPES,
    INVERSE_METHODS,
    MODELS,
    OPTIMIZERS,
    SWITCH_MODES,
    AugmentConfig,
    Config,
    DataConfig,
    KFACConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    RuntimeConfig,
    ScheduleConfig,
    TrainConfig,
    default_cache_dir,
)
from bigbatch.config.validation import validate, validate_against_data

__all__ = [
    "DATA_FORMATS",
    "FISHER_TYPES",
    "INVERSE_METHODS",
    "MODELS",
    "MOVED_TO_RUNTIME",
    "OPTIMIZERS",
    "SWITCH_MODES",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "KFACConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "deep_merge",
    "default_cache_dir",
    "load_config",
    "merge_overrides",
    "parse_override",
    "read_run_config",
    "read_toml",
    "validate",
    "validate_against_data",
]
