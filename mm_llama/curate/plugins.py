"""Loading user plug-ins named `package.module:factory` in a config."""
from __future__ import annotations

import importlib

from ..config import ConfigError


def load_plugin(spec: str, key: str, options: dict):
    """Import `package.module:factory` and call `factory(**options)`; errors name the config key."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: expected a built-in name or 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot load {spec!r}: {e}") from e
    return factory(**options)
