"""A job's service-level objective: one frozen value, one validator, one rule for time spent upstream.

Every way into mosel (``model.infer``/``submit``/``ainfer``, the simulator's :class:`mosel.Arrival`,
the HTTP front door, Ray Serve replicas, routers) reads a caller's deadline, floor and their
options through :meth:`SLO.of`, so they accept and refuse exactly the same values, and charges the
time a request spent before reaching the model through :meth:`SLO.charged`.
"""

from __future__ import annotations

import decimal
import math
import numbers
from dataclasses import dataclass
from typing import Any, Final, TypedDict

import numpy as np

from mosel.errors import DeadlineError, SLOError

__all__ = ["MAX_DEADLINE_MS", "SLO", "SPENT_MS", "SLOKeywords", "real"]

MAX_DEADLINE_MS: Final = 1e15
"""Deadlines beyond this (about 31,700 years) are served as this: no clock gets there."""
SPENT_MS: Final = 1e-3
"""The deadline left to a best-effort job whose whole deadline was spent upstream."""


def real(value: object) -> float | None:
    """``value`` as a float if it is a real number, else None.

    Python, numpy and ``Decimal`` numbers, and 0-d numpy arrays or tensors of a real dtype, are
    real numbers here; bools are not.
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
        value = value.item()
    elif _is_tensor(value):
        tensor: Any = value
        if tensor.dim() != 0 or tensor.dtype.is_complex or str(tensor.dtype) == "torch.bool":
            return None
        value = tensor.item()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() or value.is_infinite() else math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        huge: Any = value
        return math.inf if huge > 0 else -math.inf


def _is_tensor(value: object) -> bool:
    """A ``torch.Tensor``, recognised without importing torch (this module sits below it)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "dim")


def _deadline(value: object) -> float | None:
    if value is None:
        return None
    deadline = real(value)
    if (
        deadline is None
        or math.isnan(deadline)
        or deadline <= 0
        or (deadline == math.inf and isinstance(value, (float, np.floating)))
    ):
        raise SLOError(f"deadline_ms must be a positive finite number of milliseconds, got {value!r}")
    return min(deadline, MAX_DEADLINE_MS)


def _floor(value: object) -> float | None:
    if value is None:
        return None
    floor = real(value)
    if floor is None or not 0.0 <= floor <= 1.0:
        raise SLOError(f"min_accuracy must be a number in [0, 1], got {value!r}")
    return floor


def _confidence(value: object, floor: float | None) -> float | None:
    if value is None:
        return None
    confidence = real(value)
    if confidence is None or not 0.5 <= confidence < 1.0:
        raise SLOError(f"confidence must be a number in [0.5, 1) (e.g. 0.95), got {value!r}")
    if floor is None:
        raise SLOError(f"confidence={value!r} applies to min_accuracy, which was not given")
    return confidence


class SLOKeywords(TypedDict, total=False):
    """The SLO's values as keywords (``model.infer(x, deadline_ms=40.0, min_accuracy=0.7)``)."""

    deadline_ms: float | None
    min_accuracy: float | None
    best_effort: bool
    confidence: float | None
    per_request: bool


@dataclass(frozen=True, slots=True)
class SLO:
    """What one job asks for.

    Attributes:
        deadline_ms: latency objective from the job's arrival, queueing included (None: none).
        min_accuracy: floor on the job's expected accuracy, in [0, 1] (None: none).
        best_effort: when the deadline cannot be met, serve late instead of failing.
        confidence: plan the floor against each configuration's lower bound at this
            confidence, in [0.5, 1) (None: on the profiled means).
        per_request: every request's configuration meets the floor, not just the job's mean.
    """

    deadline_ms: float | None = None
    min_accuracy: float | None = None
    best_effort: bool = False
    confidence: float | None = None
    per_request: bool = False

    @classmethod
    def of(
        cls,
        deadline_ms: object = None,
        min_accuracy: object = None,
        best_effort: object = False,
        confidence: object = None,
        per_request: object = False,
    ) -> SLO:
        """The SLO of a caller's values, validated (None means "not given").

        Any real number is accepted (numpy scalars, 0-d tensors, ``Decimal``), never a bool; a
        huge deadline is served as :data:`MAX_DEADLINE_MS`. ``per_request`` without a floor
        means nothing and is dropped.

        Raises:
            SLOError: a deadline that is not a positive finite number, a floor outside [0, 1],
                a confidence outside [0.5, 1) or without a floor.
        """
        floor = _floor(min_accuracy)
        return cls(
            _deadline(deadline_ms),
            floor,
            bool(best_effort),
            _confidence(confidence, floor),
            bool(per_request) and floor is not None,
        )

    @property
    def empty(self) -> bool:
        """Neither a deadline nor a floor: every available modality is computed."""
        return self.deadline_ms is None and self.min_accuracy is None

    def charged(self, upstream_ms: float, *, where: str = "the model") -> SLO:
        """This SLO with ``upstream_ms`` already spent before the job reached ``where``.

        A best-effort job whose deadline was spent upstream is served at once, as fast as its
        floor allows (its deadline becomes :data:`SPENT_MS`).

        Raises:
            DeadlineError: nothing is left of the deadline, and the job is not best-effort.
        """
        if self.deadline_ms is None or not upstream_ms > 0.0:
            return self
        why = f"{upstream_ms:.1f} ms upstream of a {self.deadline_ms:g} ms deadline"
        return self.within(self.deadline_ms - upstream_ms, where=where, why=why)

    def within(self, left_ms: float, *, where: str, why: str) -> SLO:
        """This SLO with at most ``left_ms`` left of its deadline (``why``: how it was spent).

        The one rule for a deadline spent before the job reached ``where`` (upstream time, an
        absolute deadline that passed): a best-effort job is served at once (its deadline
        becomes :data:`SPENT_MS`), any other is refused.

        Raises:
            DeadlineError: nothing is left, and the job is not best-effort.
        """
        if self.deadline_ms is not None and self.deadline_ms <= left_ms:
            return self
        if left_ms <= 0.0:
            if not self.best_effort:
                raise DeadlineError(
                    f"the deadline passed before the request reached {where} ({why}); send it with a "
                    f"longer deadline, sooner, or with best_effort to be served late",
                    deadline_ms=self.deadline_ms or 0.0,
                    predicted_ms=(self.deadline_ms or 0.0) - left_ms,
                    best_accuracy_within_deadline=None,
                )
            left_ms = SPENT_MS
        return SLO(left_ms, self.min_accuracy, self.best_effort, self.confidence, self.per_request)
