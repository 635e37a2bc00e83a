"""Plain-dataclass configuration read from YAML files and ``key=value`` overrides."""
from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading exponent floats without a dot (``2e-4``) as floats, as
    YAML 1.2 and every researcher typing a learning rate do (YAML 1.1 makes them strings)."""


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting strings that ``_Loader`` would read as floats (``"1e5"``)."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def _parse_yaml(text: str) -> Any:
    """YAML text as Python values, exponent floats included."""
    return yaml.load(text, Loader=_Loader)


def dump_yaml(values: Any) -> str:
    """``values`` as YAML that ``load_yaml`` reads back unchanged (keys sorted)."""
    return yaml.dump(values, Dumper=_Dumper, sort_keys=True)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        content = _parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(content).__name__}")
    return content


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML).

    A key may name an item of a list by its ``name`` (``attacks.pgd-eot.eot=8``): ``merge``
    applies it to that item."""
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
            node[leaf] = _parse_yaml(value)
        except yaml.YAMLError as error:
            raise ValueError(f"override {pair!r}: the value is not valid YAML ({error})") from error
    return result


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dictionary merge; ``update`` wins. A mapping merged into a list of named
    mappings (``defenses``, ``attacks``) updates the items it names."""
    merged = dict(base)
    for key, value in update.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = merge(current, value)
        elif isinstance(value, dict) and _is_named_list(current):
            merged[key] = _merge_by_name(key, current, value)
        else:
            merged[key] = value
    return merged


def _is_named_list(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of mappings that each have a ``name``."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(item, dict) and "name" in item for item in value)


def _merge_by_name(section: str, items: list[dict], update: dict[str, Any]) -> list[dict]:
    """``items`` with ``update[name]`` merged into the item of that name; an unknown name is an
    error naming the known ones."""
    names = [item["name"] for item in items]
    for name, settings in update.items():
        if name not in names:
            raise ValueError(f"{section} has no item named {name!r}; known: {', '.join(map(str, names))}")
        if not isinstance(settings, dict):
            raise ValueError(f"{section}.{name} is an item: set its settings ({section}.{name}.key=value), "
                             f"got {settings!r}")
    return [merge(item, update[item["name"]]) if item["name"] in update else item for item in items]


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
            try:
                value = from_dict(kind, value)
            except ValueError as error:
                raise ValueError(f"{cls.__name__}.{name}: {error}") from error
        elif typing.get_origin(kind) is list and not isinstance(value, list):
            raise ValueError(f"{cls.__name__}.{name} is a list: expected [...], got {value!r}")
        elif isinstance(value, dict) and not _takes_mapping(kind):
            raise ValueError(f"{cls.__name__}.{name} is a single setting, not a section "
                             f"(got sub-keys {', '.join(map(str, value))})")
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        if not _fits(kind, value):
            raise ValueError(f"{cls.__name__}.{name} must be {_type_name(kind)}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _fits(kind: Any, value: Any) -> bool:
    """Whether ``value`` has the type annotated ``kind`` (scalars, ``None``, dicts, sections, and
    unions and lists of them; other annotations are not checked). An int is a float; a bool is no
    number; a section (a dataclass) is given as a mapping."""
    if dataclasses.is_dataclass(kind):
        return isinstance(value, (kind, dict))
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(option, value) for option in typing.get_args(kind))
    if origin in (list, tuple):
        item_kind = next((arg for arg in typing.get_args(kind) if arg is not Ellipsis), Any)
        return isinstance(value, (list, tuple)) and all(_fits(item_kind, item) for item in value)
    if kind is dict or origin is dict:
        return isinstance(value, dict)
    if kind in (int, float):
        number = numbers.Integral if kind is int else numbers.Real
        return isinstance(value, number) and not isinstance(value, bool)
    if kind in (bool, str, type(None)):
        return isinstance(value, kind)
    return True


def _type_name(kind: Any) -> str:
    """An annotation as a reader of config files says it: ``int | None``, ``list[DefenseConfig]``."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " | ".join(map(_type_name, args))
    if args:
        return f"{typing.get_origin(kind).__name__}[{', '.join(map(_type_name, args))}]"
    return {type(None): "None", Ellipsis: "..."}.get(kind) or getattr(kind, "__name__", str(kind))


def _takes_mapping(kind: Any) -> bool:
    """Whether a field annotated ``kind`` takes a dict (``dict[...]``, ``Any``, a union with one)."""
    if kind is dict or kind is Any or typing.get_origin(kind) is dict:
        return True
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return union and any(map(_takes_mapping, typing.get_args(kind)))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
