"""The bounded memo every cache of the online core is made of."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

__all__ = ["Cache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Cache(Generic[K, V]):
    """A memo of at most ``size`` entries: full, it forgets everything but its ``keep`` entries.

    Every cache of the online core is one of these, so none grows without bound whatever the
    callers send (sizes, confidences, job sizes).
    """

    __slots__ = ("_keep", "data", "size")

    def __init__(self, size: int, keep: Mapping[K, V] | None = None) -> None:
        self.size = size
        self._keep: dict[K, V] = dict(keep or {})
        self.data: dict[K, V] = dict(self._keep)

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value of ``key``, made (and kept) if missing."""
        value = self.data.get(key)
        if value is None:
            if len(self.data) >= len(self._keep) + self.size:
                self.data = dict(self._keep)
            value = self.data[key] = make()
        return value

    def clear(self) -> None:
        """Forget everything but the entries kept for good."""
        self.data = dict(self._keep)
