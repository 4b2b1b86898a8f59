"""Typed configs: YAML files, dotted overrides, strict validation."""
from .errors import ConfigError
from .load import CONFIG_ROOT, apply_overrides, dump_config, find_config, load_config, read_yaml, validate
from .model import ModelConfig

__all__ = [
    "CONFIG_ROOT",
    "ConfigError",
    "ModelConfig",
    "apply_overrides",
    "dump_config",
    "find_config",
    "load_config",
    "read_yaml",
    "validate",
]
