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
from typing_extensions import Unpack

from mosel.errors import SLOError
from mosel.slo import SLO, SLOKeywords

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
_KEYWORDS: Final = frozenset(SLOKeywords.__annotations__)
_NO_SLO: Final = SLO()


def register(serving: Serving) -> None:
    """Install the serving implementation (once, by :mod:`mosel.runtime` at import)."""
    _serving[:] = [serving]


def _implementation() -> Serving:
    if not _serving:  # pragma: no cover - import mosel registers it
        raise RuntimeError("mosel's serving runtime is not loaded; import mosel")
    return _serving[0]


def slo_of(slo: SLO | None, keywords: SLOKeywords) -> SLO:
    """The call's SLO: ``slo`` as given, or the keywords validated (:meth:`SLO.of`).

    Raises:
        SLOError: a bad value, or both ``slo`` and a keyword.
    """
    if slo is None:
        if not keywords:
            return _NO_SLO
        if not keywords.keys() <= _KEYWORDS:
            unknown = sorted(keywords.keys() - _KEYWORDS)
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the SLO's are {sorted(_KEYWORDS)}")
        return SLO.of(**keywords)
    if not isinstance(slo, SLO):
        raise SLOError(f"slo must be a mosel.slo.SLO (or leave it out and use keywords), got {slo!r}")
    if keywords:
        raise SLOError(
            f"give the SLO either as slo= or as keywords, not both (also given: {sorted(keywords)})"
        )
    return slo


def infer(
    self: nn.Module,
    inputs: Mapping[str, Tree],
    *,
    present: Mapping[str, Tensor] | None = None,
    slo: SLO | None = None,
    **keywords: Unpack[SLOKeywords],
) -> Result:
    """Serve one job (the rows of ``inputs``) under an optional deadline and accuracy floor.

    Args:
        self: the model.
        inputs: modality name -> tensor (or dict/tuple/list of tensors) whose batch dimension
            holds the requests. A modality left out (or None) is not computed for any request.
        present: modality -> bool tensor of the job's size: which rows really have it (a camera
            off for some requests). Each row is planned within the modalities it has; a
            missing one is never computed for it.
        slo: the SLO as one :class:`mosel.slo.SLO`, instead of the keywords.
        **keywords: the SLO's values (:class:`mosel.slo.SLOKeywords`): ``deadline_ms`` (from
            the moment of the call, queueing included), ``min_accuracy`` (a floor on the job's
            expected accuracy), ``best_effort`` (serve late instead of raising
            :class:`mosel.DeadlineError`), ``confidence`` (the floor holds for each
            configuration's lower bound at this confidence, e.g. 0.95) and ``per_request``
            (every request's configuration meets the floor).

    Returns:
        A :class:`mosel.Result`. With neither a deadline nor a floor, every available modality
        is computed.

    Thread-safe: concurrent callers share the model's queue (earliest deadline first).
    """
    return _implementation().infer(self, inputs, slo_of(slo, keywords), present)


def submit(
    self: nn.Module,
    inputs: Mapping[str, Tree],
    *,
    present: Mapping[str, Tensor] | None = None,
    slo: SLO | None = None,
    **keywords: Unpack[SLOKeywords],
) -> Future[Result]:
    """Like ``infer``, but return a ``concurrent.futures.Future`` at once.

    Bad inputs or SLO values, an unreachable floor, a deadline the job cannot meet even alone,
    and a full queue raise here; anything after admission resolves the future with the error.
    Cancelling the future takes the job out of the queue.
    """
    return _implementation().submit(self, inputs, slo_of(slo, keywords), present)


async def ainfer(
    self: nn.Module,
    inputs: Mapping[str, Tree],
    *,
    present: Mapping[str, Tensor] | None = None,
    slo: SLO | None = None,
    **keywords: Unpack[SLOKeywords],
) -> Result:
    """``await model.ainfer(...)``: ``infer`` for asyncio code; the event loop is never blocked.

    Cancelling the awaiting task takes a queued job out of the queue.
    """
    return await _implementation().ainfer(self, inputs, slo_of(slo, keywords), present)


PROVIDED: Final[dict[str, Any]] = {"infer": infer, "submit": submit, "ainfer": ainfer}
"""The methods ``@mosel.multimodal`` installs, by name."""
for _function in PROVIDED.values():
    setattr(_function, PROVIDED_ATTR, True)
