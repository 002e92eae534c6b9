"""A small name -> factory registry shared by divergences, tasks and strategies.

One implementation so that every pluggable family has the same error messages and the
same `register` / `get` / `names` API, and so configs can validate names before any work.
"""

from __future__ import annotations

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
        self._factories: dict[str, Callable[..., T]] = {}

    def register(
        self, name: str, factory: Callable[..., T] | None = None, *, overwrite: bool = False
    ) -> Any:
        """Register `factory` under `name`; usable as a decorator when `factory` is omitted."""

        def _add(f: Callable[..., T]) -> Callable[..., T]:
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
        """The factory registered under `name`, or UnknownNameError listing the allowed names."""
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}"
            ) from None

    def get(self, name: str, **params: Any) -> T:
        """Build the object registered under `name` with keyword parameters."""
        f = self.factory(name)
        try:
            return f(**params)
        except TypeError as e:  # unknown / missing keyword: say which family and name
            raise TypeError(f"{self.kind} {name!r}: {e}") from e
