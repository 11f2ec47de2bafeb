"""Name -> plugin registries: losses, cutout schemes and generators each register themselves in their own module."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plugins of one kind.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("cosine")
    ... def cosine(a, b): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name`` (a name may be registered once)."""
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item
        return add

    def get(self, name: str) -> T:
        """The plugin called ``name``; :class:`UnknownNameError` listing the known names if there is none."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
