"""Read YAML configs, apply dotted `key=value` overrides, validate against a typed schema.

OmegaConf does the merging and override parsing; pydantic does the typing and validation.
A string where a section is expected (`model: tiny`) names a file under `configs/<section>s/`
(or a path), which is read and inlined so overrides like `model.lm.dim=128` still apply.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, explain

T = TypeVar("T", bound=BaseModel)

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
INCLUDABLE = {"model": "models"}


def find_config(name: str, folder: str, relative_to: Path | None = None) -> Path:
    """Resolve a config name (`tiny`, `tiny.yaml`, or a path) to an existing file."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    stem = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    candidates.append(CONFIG_ROOT / folder / stem)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config '{name}' not found (looked in: {', '.join(str(c) for c in candidates)})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        conf = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    data = OmegaConf.to_container(conf, resolve=False)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for section, folder in INCLUDABLE.items():
        if isinstance(data.get(section), str):
            data[section] = read_yaml(find_config(data[section], folder, path.parent))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> dict[str, Any]:
    """Merge `a.b=value` strings into `data`; values are parsed as YAML scalars."""
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"{source}: overrides must look like key=value, got {bad}")
    try:
        merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from e


def validate(schema: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise explain(e, schema, source) from None


def load_config(schema: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read, override and validate one config file."""
    return validate(schema, apply_overrides(read_yaml(path), overrides, str(path)), str(path))


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what a run directory stores as `config.yaml`)."""
    return OmegaConf.to_yaml(OmegaConf.create(config.model_dump(mode="json", by_alias=True)))
