"""Name registries filled by decorators (as lm-evaluation-harness does): duplicates rejected, close names suggested."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown method or task name; str() is one line with close-name suggestions."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to registered objects of one kind ("method", "task")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the object under `name`; a second registration of a name is an error."""

        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return decorate

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self._items)} "
                                   f"(see `unimem-bench list`)")
        return self._items[name]

    def resolve(self, spec: str) -> list[str]:
        """`all` or a comma list -> registered names in order, each checked."""
        if spec.strip() == "all":
            return self.names()
        names = [part.strip() for part in spec.split(",") if part.strip()]
        if not names:
            raise UnknownNameError(f"no {self.kind} given: name one or more ({', '.join(self._items)}) or `all`")
        for name in names:
            self.get(name)
        return list(dict.fromkeys(names))
