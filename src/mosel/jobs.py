"""Jobs and tasks as the scheduler sees them: the requests of one call, their chunks and batches.

A :class:`Job` is one ``infer``/``submit`` call; a :class:`Task` is one chunk of it (at most
``max_batch_size`` rows) with its admissible options; a :class:`Batch` is what the executor runs
next. These are the scheduler's working objects (mutable, slotted), shared by the scheduler core,
the policies and the drivers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Final

from mosel.assign import Item
from mosel.plan import ACCURACY_SCALE, CostModel, Frontier, Plan, Strategy

__all__ = ["NO_DEADLINE_US", "Batch", "Failure", "Job", "Task", "deadline_us", "floor_units", "time_us"]

Configuration = frozenset[str]
NO_DEADLINE_US: Final = 2**62
"""The deadline, in integer microseconds, of a job without one."""


class Job:
    """The requests of one call: one deadline, one floor, one or more tasks (chunks)."""

    __slots__ = (
        "arrival", "available", "batch_key", "best_effort", "bucket", "confidence", "cost", "deadline",
        "deadline_ms", "error", "finished", "groups", "id", "inputs", "measured_us", "min_accuracy", "n",
        "order", "outputs", "payload", "pending", "per_request", "predicted_us", "priced", "reason",
        "started", "tasks",
    )  # fmt: skip

    def __init__(
        self,
        *,
        n: int,
        available: Configuration,
        arrival: float,
        deadline_ms: float | None,
        min_accuracy: float | None,
        best_effort: bool = False,
        inputs: Any = None,
        payload: Any = None,
        confidence: float | None = None,
        per_request: bool = False,
        bucket: tuple[int, ...] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.n = n
        self.available = available
        self.arrival = arrival
        self.deadline_ms = deadline_ms
        self.deadline = math.inf if deadline_ms is None else arrival + deadline_ms / 1000.0
        self.min_accuracy = min_accuracy
        self.best_effort = best_effort
        self.confidence = confidence  # the floor holds for this lower confidence bound of accuracy
        self.per_request = per_request  # every request's configuration meets the floor
        self.inputs = inputs
        self.payload = payload
        self.batch_key: object = None  # jobs merge into one batch only if their keys are equal
        # The size bucket its sized modalities are priced at (None: the profile's reference), and
        # the cost model of that bucket (set on admission).
        self.bucket = bucket
        self.cost: CostModel | None = None
        # Its bucket's plan and cost model when priced before admission, outside any lock (see
        # Scheduler.pricing); None: the scheduler prices it.
        self.priced: tuple[Plan, CostModel] | None = None
        self.tasks: list[Task] = []
        self.pending = 0
        self.outputs: list[Any] = []
        self.started = math.nan
        self.finished = math.nan
        self.predicted_us = 0
        self.measured_us = 0.0
        self.error: BaseException | None = None
        self.reason: str | None = None  # why a policy kept the job below its best option
        # Rows grouped by the modalities they have (a presence mask): (modalities, rows) in row
        # order of ``inputs``; ``order`` gathers outputs back into the caller's row order.
        self.groups: tuple[tuple[Configuration, int], ...] = ((available, n),)
        self.order: Any = None

    @property
    def strategies(self) -> tuple[Strategy, ...]:
        """Each task's current (or final) strategy."""
        return tuple(t.strategy for t in self.tasks)

    @property
    def expected_accuracy(self) -> float:
        """Request-weighted expected accuracy of the job's strategies."""
        return sum(t.strategy.accuracy_units for t in self.tasks) / (self.n * ACCURACY_SCALE)


_ids = itertools.count()


class Task:
    """A chunk of a job (at most ``max_batch_size`` rows) and its admissible strategies.

    ``lat`` and ``acc`` are the corrected latency and the accuracy units of each admissible
    option (the frontier from ``first`` on, or the one ``fixed`` strategy), ``k`` the chosen one.
    """

    __slots__ = (
        "acc", "first", "fixed", "frontier", "index", "job", "k", "key", "lat", "n", "offset", "queued",
        "version",
    )  # fmt: skip

    def __init__(self, job: Job, index: int, offset: int, n: int, frontier: Frontier, first: int) -> None:
        self.job = job
        self.index = index
        self.offset = offset
        self.n = n
        self.frontier = frontier
        self.first = first  # frontier index of the cheapest admissible strategy
        self.k = 0  # chosen option, relative to ``first``
        self.fixed: Strategy | None = None  # set for jobs that must compute every modality
        self.key = (job.deadline, job.id, index)  # EDF: deadline, then arrival order
        self.lat: tuple[int, ...] = ()
        self.acc: tuple[int, ...] = ()
        self.version = -1
        self.queued = False

    @property
    def strategy(self) -> Strategy:
        """The currently chosen strategy."""
        return self.option(self.k)

    def option(self, k: int) -> Strategy:
        """The strategy of option ``k`` (relative to the cheapest admissible one)."""
        return self.fixed if self.fixed is not None else self.frontier.strategies[self.first + k]

    @property
    def item(self) -> Item:
        """The task as the assignment solvers see it."""
        return Item(self.lat, self.acc, deadline_us(self.job))


def time_us(t: float) -> int:
    """A time (start or now, seconds) in integer microseconds, rounded up.

    Starts round up and deadlines down (:func:`deadline_us`), so a finish planned within the
    deadline in microseconds is within it in seconds too.
    """
    return math.ceil(t * 1e6)


def deadline_us(job: Job) -> int:
    """The job's absolute deadline in integer microseconds (:data:`NO_DEADLINE_US` for none)."""
    if math.isinf(job.deadline):
        return NO_DEADLINE_US
    return min(int(job.deadline * 1e6), NO_DEADLINE_US)


def floor_units(min_accuracy: float | None, n: int) -> int:
    """The least accuracy units ``n`` requests must reach to meet ``min_accuracy``.

    The smallest ``u`` whose expected accuracy ``u / (n * ACCURACY_SCALE)``, as reported, is at
    least the floor: 0.7000004 is not met by 0.7, and 0.9 is met by 0.9.
    """
    if not min_accuracy:
        return 0
    scale = ACCURACY_SCALE * n
    units = math.ceil(min_accuracy * scale)
    while units / scale < min_accuracy:
        units += 1
    while units > 0 and (units - 1) / scale >= min_accuracy:
        units -= 1
    return units


@dataclass(frozen=True, slots=True)
class Batch:
    """What the executor runs next: one or more tasks, and the strategy covering all their rows."""

    tasks: tuple[Task, ...]
    strategies: tuple[Strategy, ...]  # per task
    merged: Strategy  # the rows of all tasks, grouped by configuration
    predicted_us: int
    started: float


Failure = tuple[Job, BaseException]
