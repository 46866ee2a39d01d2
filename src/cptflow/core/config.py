"""Turning validated config sections into typed, frozen dataclasses.

The workflow validates the whole YAML against ``config/schema.yaml`` (filling defaults) and hands
each stage its own section as JSON. Inside Python the section becomes a frozen dataclass through
``from_dict``, which rejects unknown keys by name: a typo is an error before any data is read,
never a silently ignored setting. Cross-field rules live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error, missing ones take defaults.

    Nested dataclass fields (and lists of them) are built recursively.
    """
    data = dict(data or {})
    where = where or cls.__name__
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_dict(tp, value, where)
    if origin in (list, tuple) and args and isinstance(value, list):
        inner = args[0]
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if dataclasses.is_dataclass(a) and isinstance(value, Mapping):
                return from_dict(a, value, where)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass → plain dict (tuples become lists), for manifests and JSON."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def load_params(text_or_path: str | None) -> dict[str, Any]:
    """Parse ``--params``: inline JSON, or ``@file`` holding JSON/YAML."""
    if not text_or_path:
        return {}
    if text_or_path.startswith("@"):
        raw = Path(text_or_path[1:]).read_text(encoding="utf-8")
        return yaml.safe_load(raw) or {}
    try:
        return json.loads(text_or_path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--params is not valid JSON: {e}") from e
