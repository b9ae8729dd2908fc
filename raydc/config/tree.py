"""YAML-shaped dicts onto a tree of typed dataclasses, and dotted ``key=value`` overrides.

The mechanics under ``raydc.config``: each leaf is checked (and converted) against its
annotation, each nested section starts from its parent's default for it (so
``score: {engine: {dtype: bfloat16}}`` keeps score's own engine defaults), and unknown
keys fail naming the field, with the nested field of that name when one exists
(``score.dtype``: did you mean ``score.engine.dtype``?).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the dotted field."""


def positive(path: str, value, strict: bool = True) -> None:
    if value is None:
        return
    if (strict and value <= 0) or (not strict and value < 0):
        raise ConfigError(f"{path}={value!r}: must be {'> 0' if strict else '>= 0'}")


def choice(path: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{path}={value!r}: must be one of {list(choices)}")


def coerce(path: str, tp: Any, value: Any) -> Any:
    """Check/convert one leaf value against its annotation; errors name the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(path, a, value)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{path}={value!r}: invalid")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r}: must be true or false")
    if tp in (int, float):
        if not isinstance(value, bool):
            if isinstance(value, str):
                try:
                    return tp(value)
                except ValueError:
                    pass
            elif tp is float and isinstance(value, (int, float)):
                return float(value)
            elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
        raise ConfigError(f"{path}={value!r}: must be {'an integer' if tp is int else 'a number'}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r}: must be a string")
    if origin in (dict,) or tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}={value!r}: must be a mapping")
    if origin in (list,) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: must be a list")
        (item,) = typing.get_args(tp) or (Any,)
        if dataclasses.is_dataclass(item):
            return [
                v if isinstance(v, item) else build(item, v, f"{path}[{i}]")
                for i, v in enumerate(value)
            ]
        return list(value)
    return value


def _nested_field(hints: dict, name: str) -> str | None:
    """``engine.dtype`` for ``dtype`` when a section of these fields has a field ``dtype``."""
    for section, tp in hints.items():
        if dataclasses.is_dataclass(tp) and name in {f.name for f in dataclasses.fields(tp)}:
            return f"{section}.{name}"
    return None


def build(cls, data: dict, path: str, base=None):
    """An instance of dataclass ``cls`` from ``data``: ``base`` (or the class defaults)
    with the given fields replaced; nested sections are built the same way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{path}." if path else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        meant = [where + m for m in (_nested_field(hints, u) for u in unknown) if m]
        raise ConfigError(
            f"unknown config field(s) {[where + u for u in unknown]}"
            + (f" (did you mean {', '.join(meant)}?)" if meant else "")
            + f"; known in {path or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if not dataclasses.is_dataclass(tp):
            kwargs[name] = coerce(where + name, tp, value)
        elif isinstance(value, tp):
            kwargs[name] = value
        else:
            start = getattr(base, name) if base is not None else None
            if start is None and fields[name].default_factory is not dataclasses.MISSING:
                start = fields[name].default_factory()
            kwargs[name] = build(tp, value, where + name, start)
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 3e-4); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value
