"""A tiny name -> builder registry (timm style): every model is built the same way, by name.

Models outside the registry are named ``package.module:callable`` (user code, e.g. in a YAML).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builder functions; ``register`` is a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder
        return decorate

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def names(self) -> list[str]:
        return sorted(self._builders)

    def build(self, name: str, **kwargs) -> T:
        """Build ``name`` with ``kwargs``; an unknown name or option is an error naming the choices."""
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        builder = self._builders[name]
        parameters = inspect.signature(builder).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            unknown = sorted(set(kwargs) - set(parameters))
            if unknown:
                raise TypeError(f"unknown option(s) of {self.kind} {name!r}: {', '.join(unknown)}; "
                                f"known: {', '.join(parameters) or 'none'}")
        return builder(**kwargs)


def is_callable_spec(name: str) -> bool:
    """Whether ``name`` reads as ``package.module:callable`` (dotted identifiers on both sides)."""
    module, colon, attribute = name.partition(":")
    parts = [*module.split("."), *attribute.split(".")]
    return bool(colon) and all(part.isidentifier() for part in parts)


def build_from_spec(spec: str, expected: type[T], kind: str, **kwargs: Any) -> T:
    """Import the module of a ``module:callable`` spec, call the callable with ``kwargs`` and
    check that it returned an ``expected`` (user code named in a config)."""
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"{kind} {spec!r}: cannot import module {module_name!r} ({error}); "
                          "is it installed or on PYTHONPATH?") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ImportError(f"{kind} {spec!r}: {getattr(target, '__name__', module_name)!r} "
                              f"has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{kind} {spec!r}: {attribute!r} is not callable (a {type(target).__name__})")
    result = target(**kwargs)
    if not isinstance(result, expected):
        raise TypeError(f"{kind} {spec!r} returned a {type(result).__module__}."
                        f"{type(result).__qualname__}; expected a {expected.__module__}."
                        f"{expected.__qualname__}")
    return result
