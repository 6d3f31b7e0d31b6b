"""Config as data: strict loading of dataclasses from YAML files, dicts and ``key=value`` overrides.

Every config in deepslicing is a dataclass whose fields carry a ``help`` string in their metadata
(use :func:`option`). This module turns mappings into those dataclasses and refuses anything it
does not understand: an unknown key, a wrong type, or a value a ``validate()`` method rejects raises
:class:`ConfigError` naming the dotted key, before any work (or Ray) starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message names the key."""


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer (not a bool) in range."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name}: must be an integer {rule}, got {value!r}")


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and the help text the CLI and YAML comments show."""
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def from_mapping(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build ``cls`` from a mapping, recursing into nested dataclasses, checking every key and type."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys are {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # validation in __post_init__ names the field
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {options}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {args}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_mapping(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: must be {tp.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain YAML-friendly data (tuples become lists)."""
    return _plain(obj)


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict, values parsed as YAML scalars (``1`` is an int)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: must look like key=value")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {pair!r}: empty key")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {p} is both a value and a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple = ()) -> T:
    """Defaults, then the YAML file, then ``key=value`` overrides; strict at every step."""
    data = read_yaml(path) if path is not None else {}
    return from_mapping(cls, merge(data, parse_overrides(list(overrides))))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; its keys are checked later, after merging."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config: {path} must hold a mapping of keys, not {type(data).__name__}"
        )
    return data


def commented_yaml(obj: Any, indent: int = 0) -> str:
    """The config as YAML with each field's help as a comment above it (for shipped YAML files)."""
    pad = " " * indent
    lines: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        help_text = f.metadata.get("help", "")
        if help_text:
            lines.append(f"{pad}# {help_text}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.append(commented_yaml(value, indent + 2).rstrip("\n"))
        else:
            dumped = yaml.safe_dump({f.name: _plain(value)}, default_flow_style=True, width=1000)
            lines.append(pad + dumped.strip().removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"
