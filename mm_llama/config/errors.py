"""Config errors that name the file, the key and what was expected."""
from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the (nested) model that `loc` points into."""
    model = schema
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def explain(err: ValidationError, schema: type[BaseModel], source: str) -> ConfigError:
    """Turn pydantic's error into one message per problem, with the closest valid key for typos."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _fields_at(schema, e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
            lines.append(f"unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            where = f"'{key}': " if key else ""
            got = e.get("input")
            lines.append(f"{where}{e['msg']}" + ("" if isinstance(got, (dict, list)) else f" (got {got!r})"))
    return ConfigError(f"{source}: " + "; ".join(lines))
