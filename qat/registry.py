"""A small name -> object registry. DiffQAT keeps three of them: quantizers, losses and methods."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase names to objects; a failed lookup lists the known names.

    Args:
        kind: what is registered (``"quantizer"``, ``"loss"``, ``"method"``), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; duplicate or non-lowercase names raise."""
        if name != name.lower():
            raise ValueError(f"{self.kind} names must be lowercase, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"there is already a {self.kind} called {name!r}")
            self._items[name] = obj
            return obj

        return decorator

    def register_config(self, config_cls: type) -> Callable[[type], type]:
        """Class decorator for a config dataclass's module: registers ``(config_cls, cls)`` under
        ``config_cls.name`` (quantizers and loss terms: a config names what it configures)."""

        def decorator(cls: type) -> type:
            self.register(config_cls.name)((config_cls, cls))
            return cls

        return decorator

    def unregister(self, name: str) -> T:
        """Removes ``name`` and returns what was registered (a plugin's teardown, e.g. in tests)."""
        self.get(name)  # an unknown name raises, listing the known ones
        return self._items.pop(name)

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``.

        Raises:
            KeyError: ``name`` is unknown; the message lists the known names.
        """
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
