"""Typed configuration: dataclasses loaded from YAML, with dotted overrides and strict validation.

Why a small home-grown loader instead of a framework: every stage owns one small dataclass
(no global config that every component reaches into), and the loader only has to do four
things well, with error messages a user can act on:

* reject an unknown key, naming it and the closest valid spelling;
* reject a wrong type or an out-of-range value, naming the key, the value and what was expected;
* apply ``a.b.c=value`` overrides from the command line with the same checks;
* compose files with ``include:`` (paths relative to the including file, deep-merged underneath).

Field documentation lives in ``param(..., doc=...)`` so ``llmray <stage> --help`` can print it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

INCLUDE_KEY = "include"


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and what was expected."""


def param(default: Any = dataclasses.MISSING, *, doc: str, min: float | None = None,
          max: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its documentation and optional numeric bounds (inclusive)."""
    metadata = {"doc": doc, "min": min, "max": max}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Loading raw YAML (with includes) and applying overrides
# ---------------------------------------------------------------------------------------------

def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated by ``update``; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, resolving ``include:`` entries at any depth relative to the file."""
    path = Path(path)
    return _resolve_includes(_load_mapping(path), path.parent, seen=(path.resolve(),))


def _load_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _resolve_includes(data: dict, base_dir: Path, seen: tuple[Path, ...]) -> dict:
    resolved = {k: _resolve_includes(v, base_dir, seen) if isinstance(v, dict) else v
                for k, v in data.items() if k != INCLUDE_KEY}
    includes = data.get(INCLUDE_KEY)
    if includes is None:
        return resolved
    merged: dict = {}
    for item in [includes] if isinstance(includes, str) else includes:
        target = (base_dir / item).resolve()
        if target in seen:
            raise ConfigError(f"include cycle: {' -> '.join(map(str, seen + (target,)))}")
        included = _read_included(target, seen)
        merged = deep_merge(merged, included)
    return deep_merge(merged, resolved)


def _read_included(path: Path, seen: tuple[Path, ...]) -> dict:
    return _resolve_includes(_load_mapping(path), path.parent, seen + (path,))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so lists, numbers and booleans work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with every ``key.path=value`` override applied."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{key}' holds a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


# ---------------------------------------------------------------------------------------------
# Typing raw data into dataclasses
# ---------------------------------------------------------------------------------------------

def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, validating keys, types and bounds.

    ``where`` is the dotted path of ``data`` inside the whole config, used in messages.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(_join(where, str(key)), key, list(fields)))
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], _join(where, name), field)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing ({_doc(field)})")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"unknown config key '{path}'{hint}"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _doc(field: dataclasses.Field) -> str:
    return field.metadata.get("doc", "") if field else ""


def _coerce(tp: Any, value: Any, where: str, field: dataclasses.Field | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where, field)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: value {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: value {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp in (dict, list):  # untyped containers: checked for shape only, contents validated later
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected a {'mapping' if tp is dict else 'list'}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(args[0]) if args else 'values'}, "
                              f"got {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        val_type = args[1] if args else Any
        return {str(k): _coerce(val_type, v, f"{where}.{k}") for k, v in value.items()}
    return _check_bounds(_coerce_scalar(tp, value, where), where, field)


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        return as_number(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def as_number(value: Any, where: str) -> float:
    """A real number from config data; YAML 1.1 reads '3e-4' as a string, so numeric strings count."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")


def _check_bounds(value: Any, where: str, field: dataclasses.Field | None) -> Any:
    if field is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    low, high = field.metadata.get("min"), field.metadata.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(s for s in (f">= {low}" if low is not None else "",
                                          f"<= {high}" if high is not None else "") if s)
        raise ConfigError(f"{where}: value {value!r} is out of range; expected {bounds}")
    return value


def _type_name(tp: Any) -> str:
    """How ``--help`` and errors spell a type: ``bool | 'auto'``, not ``Union``."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is Union:
        return " | ".join(map(_type_name, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# ---------------------------------------------------------------------------------------------
# Serialising, hashing, documenting
# ---------------------------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict:
    """Plain data (JSON/YAML serialisable) for a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a resolved config: the config part of a stage's lineage key."""
    canonical = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict | None = None) -> Any:
    """Load ``cls`` from an optional YAML file, deep-merged over ``base``, then overrides."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type and default, doc) for every field, recursing into nested configs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = _join(prefix, field.name)
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        rows.append((key, f"{_type_name(tp)} = {default}", _doc(field)))
    return rows
