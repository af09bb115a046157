"""Named implementations found by name: tasks, pruning scorers, weight quantizers, KV schemes,
samplers. Each kind has one `Registry`, filled where the implementations are written, so adding
one touches no central list.

A name is registered once. A second registration under a taken name is a bug (two
implementations claiming one name), not an override, so it raises at import time. Looking up a
name nobody registered is the user's mistake, so it raises `UserError`, naming every choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kvpareto.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations of one kind (e.g. "prune scorer"), by name, in registration order."""

    def __init__(self, kind: str, plural: str | None = None):
        self.kind, self.plural = kind, plural or f"{kind}s"
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; return it."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator: `@SCORERS.register("knorm")` above a class or function."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UserError(f"unknown {self.kind} {name!r}; known {self.plural}: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
