"""A job on its way to a Ray Serve replica: its inputs, its SLO and when it was sent.

The SLO is validated where the request is made (:meth:`mosel.slo.SLO.of`: the rules of
``model.infer``), so a bad value fails on the caller's side before anything travels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from torch import Tensor

from mosel.slo import SLO
from mosel.trees import Tree

__all__ = ["IDS_KEY", "LOAD_KEY", "Feedback", "Request"]

_log = logging.getLogger("mosel")

LOAD_KEY: Final = "mosel.load"
"""The key of a replica's :class:`mosel.Load` (its JSON form) in its Serve routing stats."""
IDS_KEY: Final = "mosel.ids"
"""The key of the prefix of a replica's result ids (its process token) in its Serve routing stats."""


@dataclass(frozen=True, slots=True)
class Request:
    """One job on its way to a replica: its inputs, its SLO, and when it was sent.

    Attributes:
        inputs: modality name -> tensor (or tree of tensors), as for ``model.infer``.
        deadline_ms: latency SLO counted from ``sent_at_s``; None: no deadline.
        min_accuracy: floor on the job's expected accuracy; None: no floor.
        best_effort: serve late rather than fail when the deadline cannot be met.
        confidence: plan the floor against the lower confidence bound of each accuracy.
        per_request: every request's configuration meets the floor on its own.
        present: modality -> bool tensor: which rows really have the modality.
        sent_at_s: wall-clock time (``time.time()``) the job entered the system, e.g. when the
            ingress received it; everything from then on counts against the deadline.
        rows: the job's number of requests (the router prices it); default: the first
            dimension of the first tensor in ``inputs``.
        request_id: the caller's own id for the job: with monitoring on, the replica takes its
            labels under it too (see :meth:`Client.feedback`).
    """

    inputs: Mapping[str, Tree]
    deadline_ms: float | None = None
    min_accuracy: float | None = None
    best_effort: bool = False
    confidence: float | None = None
    per_request: bool = False
    present: Mapping[str, Tensor] | None = None
    sent_at_s: float = field(default_factory=time.time)
    rows: int = 0
    request_id: str | None = None
    slo: SLO = field(init=False, repr=False, compare=False)
    """The SLO values as one validated :class:`mosel.slo.SLO` (deadline from ``sent_at_s``)."""

    def __post_init__(self) -> None:
        slo = SLO.of(self.deadline_ms, self.min_accuracy, self.best_effort, self.confidence, self.per_request)
        object.__setattr__(self, "slo", slo)
        if self.rows <= 0:
            object.__setattr__(self, "rows", _rows(self.inputs))

    def remaining_ms(self, now_s: float) -> float | None:
        """Deadline left at wall-clock ``now_s`` (None without a deadline)."""
        deadline_ms = self.slo.deadline_ms
        if deadline_ms is None:
            return None
        return deadline_ms - max(now_s - self.sent_at_s, 0.0) * 1000.0


def _rows(inputs: Mapping[str, Tree]) -> int:
    """The first dimension of the first tensor among the inputs (1 if there is none)."""
    pending: list[Any] = list(inputs.values())
    while pending:
        item = pending.pop(0)
        if isinstance(item, Tensor):
            return int(item.shape[0]) if item.dim() else 1
        if isinstance(item, Mapping):
            pending[:0] = list(item.values())
        elif isinstance(item, (list, tuple)):
            pending[:0] = list(item)
    return 1


@dataclass(frozen=True, slots=True)
class Feedback:
    """The labels of a served job on their way to the replica that served it (``Client.feedback``).

    Attributes:
        result_id: the job's :attr:`mosel.Result.id` (its prefix names the replica's process,
            which the slack router sends it to), or a ``request_id`` the job was sent with.
        labels: as for :func:`mosel.feedback`.
    """

    result_id: str
    labels: Any

    @property
    def token(self) -> str:
        """The process token a result id starts with (``""`` for another id)."""
        head, sep, _ = self.result_id.partition("-")
        return head if sep else ""
