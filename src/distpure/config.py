"""Plain-dataclass configuration read from YAML files and ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(content).__name__}")
    return content


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        node = result
        *parents, leaf = parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {pair!r} has an empty key (expected key=value or section.key=value)")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {pair!r}: {part!r} already has a value, "
                                 "so it cannot be a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"override {pair!r}: the value is not valid YAML ({error})") from error
    return result


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dictionary merge; ``update`` wins."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Unknown keys are an error naming the key, so a typo in a config never passes silently.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping of settings, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(map(str, unknown)))}; "
                         f"known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and not isinstance(value, kind):
            if not isinstance(value, dict):
                raise ValueError(f"{cls.__name__}.{name} is a section: expected a mapping, got {value!r}")
            value = from_dict(kind, value)
        elif typing.get_origin(kind) is list and not isinstance(value, list):
            raise ValueError(f"{cls.__name__}.{name} is a list: expected [...], got {value!r}")
        elif isinstance(value, dict) and not _takes_mapping(kind):
            raise ValueError(f"{cls.__name__}.{name} is a single setting, not a section "
                             f"(got sub-keys {', '.join(map(str, value))})")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _takes_mapping(kind: Any) -> bool:
    """Whether a field annotated ``kind`` takes a dict (``dict[...]``, ``Any``, a union with one)."""
    if kind is dict or kind is Any or typing.get_origin(kind) is dict:
        return True
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return union and any(map(_takes_mapping, typing.get_args(kind)))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
