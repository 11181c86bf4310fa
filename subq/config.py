"""Config loading: a dataclass or pydantic model, filled from a YAML file then from CLI overrides.

`load_config(Cls, "job.yaml", {"rpm": 500})` validates with pydantic and raises ConfigError naming
the field (`field 'rpm': Input should be greater than 0`) before any work starts. Every config field
is documented where it is declared.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from subq.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config: {e.strerror}", source=str(path)) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=str(path)) from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a mapping of field: value", source=str(path))
    return raw


def field_names(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(cls.model_fields)


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build `cls` from YAML (optional) and overrides (None values are ignored: flag not given)."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    unknown = sorted(set(values) - field_names(cls))
    if unknown:
        raise ConfigError(f"unknown field; known fields: {', '.join(sorted(field_names(cls)))}",
                          field=unknown[0], source=str(path))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        raise ConfigError(err["msg"], field=loc, source=str(path) if path else None) from None


def to_dict(config) -> dict:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return config.model_dump()


def dump_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def merge_values(base: dict, over: dict) -> dict:
    """`over` merged into `base`, nested mappings merged key by key; None in `over` means "not given"."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[k] = merge_values(out[k] if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = v
    return out


def validate_values(cls: type[T], values: dict, source: str | None = None) -> T:
    """`cls` from field values; the first error names its field (ConfigError)."""
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        raise ConfigError(err["msg"], field=loc, source=source) from None

