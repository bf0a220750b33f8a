"""One way to register extensions by name: model adapters, importance criteria and allocators.

A :class:`Registry` maps names to objects (usually classes). An extension registers itself with the
``register`` decorator where it is defined; callers look it up with ``get`` (an error that lists the known
names) or ``find`` (``None`` when absent), and list them with ``names``. Each registry raises the error class
its room uses for a bad name (``OptionError``, ``UnsupportedModelError``), passed in by the owner.

A leaf module: it imports nothing from the engine, so every room may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named extensions of one kind (``kind`` names them in error messages, e.g. "criterion")."""

    def __init__(self, kind: str, error: type[Exception] = KeyError) -> None:
        self.kind = kind
        self._error = error
        self._entries: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under each of ``names``; returns it unchanged."""
        if not names:
            raise ValueError(f"register a {self.kind} under at least one name")

        def decorate(obj: T) -> T:
            for name in names:
                self.add(name, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; the same object again is a no-op, a different one is a mistake."""
        existing = self._entries.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered to {existing!r}")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        """The object registered under ``name``; the registry's error, listing the known names, otherwise."""
        if name not in self._entries:
            raise self._error(f"unknown {self.kind} {name!r}; use one of {', '.join(self._entries)}")
        return self._entries[name]

    def find(self, name: str) -> T | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
