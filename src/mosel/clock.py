"""Clocks the scheduler reads: the real monotonic one, and a virtual one for simulations."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "MonotonicClock", "VirtualClock"]


class Clock(Protocol):
    """A source of time in seconds (any origin; only differences matter)."""

    def now(self) -> float:
        """The current time in seconds."""
        ...


class MonotonicClock:
    """``time.perf_counter`` (called directly: a clock is read several times per served call)."""

    now = staticmethod(time.perf_counter)


class VirtualClock:
    """Simulated time that moves only when told to: deterministic runs of the real scheduler."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        """The current simulated time in seconds."""
        return self._now

    def advance_to(self, t: float) -> None:
        """Move time forward to ``t`` (never backwards)."""
        if t < self._now:
            raise ValueError(f"virtual time cannot go back from {self._now} to {t}")
        self._now = t
