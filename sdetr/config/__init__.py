"""Typed run configuration: schema, YAML loading with ``_base_`` diffs, dotted overrides."""

from sdetr.config.errors import ConfigError
from sdetr.config.loader import (
    build_typed,
    config_from_dict,
    flatten,
    load_config,
    parse_override,
    preset_names,
    preset_path,
    to_dict,
    to_yaml,
    unflatten,
)
from sdetr.config.schema import (
    BackboneConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    ProfileConfig,
    TrainConfig,
)

__all__ = [
    "BackboneConfig", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig",
    "LossConfig", "ModelConfig", "ProfileConfig", "TrainConfig", "build_typed", "config_from_dict", "flatten", "load_config",
    "parse_override", "preset_names", "preset_path", "to_dict", "to_yaml", "unflatten",
]
