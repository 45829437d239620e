"""The serving methods ``@mosel.multimodal`` gives a class: ``infer``, ``submit`` and ``ainfer``.

They are plain functions of the model (``mosel.methods.infer(model, inputs, ...)`` is
``model.infer(inputs, ...)``, and typed), so mosel's own integrations call them directly. They
turn the caller's keywords into one validated :class:`~mosel.slo.SLO` and hand the call to the
serving implementation, which :mod:`mosel.runtime` registers when it is imported (``import mosel``
does it): this module, like the declaration of a model, depends on nothing above it.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Final, Protocol

from torch import Tensor, nn

from mosel.errors import SLOError
from mosel.slo import SLO

if TYPE_CHECKING:
    from mosel.execution import Result
    from mosel.trees import Tree

__all__ = ["PROVIDED_ATTR", "Serving", "ainfer", "infer", "register", "slo_of", "submit"]

PROVIDED_ATTR: Final = "__mosel_provided__"
"""Marks the functions mosel installs on a class (a user attribute of the same name is refused)."""


class Serving(Protocol):
    """What serves a call: one job of ``inputs`` under ``slo`` (see :mod:`mosel.runtime`)."""

    def infer(self, model: nn.Module, inputs: object, slo: SLO, present: object) -> Result:
        """Serve and wait."""

    def submit(self, model: nn.Module, inputs: object, slo: SLO, present: object) -> Future[Result]:
        """Queue; a future of the result."""

    async def ainfer(self, model: nn.Module, inputs: object, slo: SLO, present: object) -> Result:
        """Serve from asyncio code."""


_serving: list[Serving] = []


def register(serving: Serving) -> None:
    """Install the serving implementation (once, by :mod:`mosel.runtime` at import)."""
    _serving[:] = [serving]


def _implementation() -> Serving:
    if not _serving:  # pragma: no cover - import mosel registers it
        raise RuntimeError("mosel's serving runtime is not loaded; import mosel")
    return _serving[0]


def slo_of(
    slo: SLO | None,
    deadline_ms: object = None,
    min_accuracy: object = None,
    best_effort: object = False,
    confidence: object = None,
    per_request: object = False,
) -> SLO:
    """The call's SLO: ``slo`` as given, or the keywords validated (:meth:`SLO.of`).

    Raises:
        SLOError: a bad value, or both ``slo`` and a keyword.
    """
    if slo is None:
        return SLO.of(deadline_ms, min_accuracy, best_effort, confidence, per_request)
    if not isinstance(slo, SLO):
        raise SLOError(f"slo must be a mosel.slo.SLO (or leave it out and use keywords), got {slo!r}")
    given = [
        name
        for name, value, default in (
            ("deadline_ms", deadline_ms, None),
            ("min_accuracy", min_accuracy, None),
            ("best_effort", best_effort, False),
            ("confidence", confidence, None),
            ("per_request", per_request, False),
        )
        if value is not default
    ]
    if given:
        raise SLOError(f"give the SLO either as slo= or as keywords, not both (also given: {given})")
    return slo


def infer(
    self: nn.Module,
    inputs: Mapping[str, Tree],
    *,
    deadline_ms: float | None = None,
    min_accuracy: float | None = None,
    best_effort: bool = False,
    confidence: float | None = None,
    per_request: bool = False,
    present: Mapping[str, Tensor] | None = None,
    slo: SLO | None = None,
) -> Result:
    """Serve one job (the rows of ``inputs``) under an optional deadline and accuracy floor.

    Args:
        self: the model.
        inputs: modality name -> tensor (or dict/tuple/list of tensors) whose batch dimension
            holds the requests. A modality left out (or None) is not computed for any request.
        deadline_ms: latency SLO from the moment of the call, queueing included. None: no
            deadline.
        min_accuracy: floor on the job's expected accuracy (from the profile). None: no floor.
        best_effort: when the deadline cannot be met, serve late with the fastest strategy that
            meets the floor instead of raising :class:`mosel.DeadlineError`.
        confidence: plan the floor against each configuration's lower ``confidence`` bound of
            accuracy (Wilson, from the profile's validation size), not its mean; e.g. 0.95.
        per_request: every request's configuration meets the floor, not just the job's average.
        present: modality -> bool tensor of the job's size: which rows really have it (a camera
            off for some requests). Each row is planned within the modalities it has; a
            missing one is never computed for it.
        slo: the four SLO values as one :class:`mosel.slo.SLO`, instead of the keywords.

    Returns:
        A :class:`mosel.Result`. With neither SLO, every available modality is computed.

    Thread-safe: concurrent callers share the model's queue (earliest deadline first).
    """
    job_slo = slo_of(slo, deadline_ms, min_accuracy, best_effort, confidence, per_request)
    return _implementation().infer(self, inputs, job_slo, present)


def submit(
    self: nn.Module,
    inputs: Mapping[str, Tree],
    *,
    deadline_ms: float | None = None,
    min_accuracy: float | None = None,
    best_effort: bool = False,
    confidence: float | None = None,
    per_request: bool = False,
    present: Mapping[str, Tensor] | None = None,
    slo: SLO | None = None,
) -> Future[Result]:
    """Like ``infer``, but return a ``concurrent.futures.Future`` at once.

    Bad inputs or SLO values, an unreachable floor, a deadline the job cannot meet even alone,
    and a full queue raise here; anything after admission resolves the future with the error.
    Cancelling the future takes the job out of the queue.
    """
    job_slo = slo_of(slo, deadline_ms, min_accuracy, best_effort, confidence, per_request)
    return _implementation().submit(self, inputs, job_slo, present)


async def ainfer(
    self: nn.Module,
    inputs: Mapping[str, Tree],
    *,
    deadline_ms: float | None = None,
    min_accuracy: float | None = None,
    best_effort: bool = False,
    confidence: float | None = None,
    per_request: bool = False,
    present: Mapping[str, Tensor] | None = None,
    slo: SLO | None = None,
) -> Result:
    """``await model.ainfer(...)``: ``infer`` for asyncio code; the event loop is never blocked.

    Cancelling the awaiting task takes a queued job out of the queue.
    """
    job_slo = slo_of(slo, deadline_ms, min_accuracy, best_effort, confidence, per_request)
    return await _implementation().ainfer(self, inputs, job_slo, present)


PROVIDED: Final[dict[str, Any]] = {"infer": infer, "submit": submit, "ainfer": ainfer}
"""The methods ``@mosel.multimodal`` installs, by name."""
for _function in PROVIDED.values():
    setattr(_function, PROVIDED_ATTR, True)
