"""A small name -> factory registry shared by every pluggable family (divergences, tasks,
strategies, search spaces, executors, evaluators).

One implementation so that every family has the same error messages and the same `register` /
`get` / `names` API, and so configs can validate names before any work. A factory may be given
as a `"package.module:attr"` string: the name is known at once and the module is imported on
first use (for implementations that are slow to import, like nevergrad, or that live in a
higher layer, like the GBMPO evaluator; the same form users write in configs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) that build a `T`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T] | str] = {}

    def register(
        self, name: str, factory: Callable[..., T] | str | None = None, *, overwrite: bool = False
    ) -> Any:
        """Register `factory` (or a lazy `"module:attr"` path) under `name`; usable as a decorator
        when `factory` is omitted."""

        def _add(f: Callable[..., T] | str) -> Callable[..., T] | str:
            if not overwrite and name in self._factories and self._factories[name] is not f:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass overwrite=True)")
            self._factories[name] = f
            return f

        return _add(factory) if factory is not None else _add

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def factory(self, name: str) -> Callable[..., T]:
        """The factory registered under `name` (a lazy path is imported now), or UnknownNameError
        listing the allowed names."""
        try:
            f = self._factories[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None
        if isinstance(f, str):
            f = self._factories[name] = import_path(f)
        return f

    def get(self, name: str, **params: Any) -> T:
        """Build the object registered under `name` with keyword parameters."""
        f = self.factory(name)
        try:
            return f(**params)
        except TypeError as e:  # unknown / missing keyword: say which family and name
            raise TypeError(f"{self.kind} {name!r}: {e}") from e


def import_path(path: str) -> Any:
    """The object at `"package.module:attr"` (dotted attributes allowed after the colon)."""
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"expected package.module:attr, got {path!r}")
    obj: Any = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
