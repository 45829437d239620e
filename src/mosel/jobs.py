"""Jobs and tasks as the scheduler sees them: the requests of one call, their chunks and batches.

A :class:`Job` is one ``infer``/``submit`` call: what the caller asked for (its rows, modalities,
arrival and :class:`~mosel.slo.SLO`, written once by the driver that builds it) and what the
scheduler made of it (tasks, timings, outcome). A :class:`Task` is one chunk of a job (at most
``max_batch_size`` rows) with its admissible options; a :class:`Batch` is what the executor runs
next. The driver's own data about a job (a future and tensors in the threaded server, a trace
index in the simulator) travels as its ``payload``; the core never looks at it.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from mosel.assign import Item
from mosel.plan import ACCURACY_SCALE, CostModel, Frontier, Plan, Strategy
from mosel.slo import SLO

if TYPE_CHECKING:
    from mosel.chains import StageBudget

__all__ = [
    "NO_DEADLINE_US",
    "Batch",
    "Failure",
    "Job",
    "Reason",
    "Task",
    "chunk_sizes",
    "deadline_us",
    "floor_units",
    "merged_groups",
    "mergeable",
    "time_us",
]

Configuration = frozenset[str]
BucketKey = tuple[int, ...]
P = TypeVar("P")
NO_DEADLINE_US: Final = 2**62
"""The deadline, in integer microseconds, of a job without one."""


class Reason(enum.Enum):
    """Why a job was served below the most accurate strategy its floor and modalities allowed.

    The value is the text :attr:`mosel.Result.reason` carries.
    """

    DEADLINE = "deadline: a more accurate strategy would finish too late"
    ONLY_CHEAPEST = "deadline: only the cheapest strategy may make it"
    QUEUE_LOWERED = "queue: lowered so that the jobs queued with it make their deadlines"
    QUEUE = "queue: jobs waiting behind it need the time"
    SPARE_CAPACITY = "spare capacity: recent arrivals leave too little device time"
    MISS_BUDGET = "miss budget: the on-time promise leaves no room for the misses it would risk"
    OVERLOAD = "overload: recent arrivals need the whole device at their cheapest strategies"
    UNSEEN_LOAD = "arrivals: too few seen yet to rule out that they need the whole device"


class Job(Generic[P]):
    """The requests of one call: one deadline, one floor, one or more tasks (chunks).

    The request (``n``, ``available``, ``arrival``, ``slo``, ``deadline``, ``groups``,
    ``batch_key``, ``priced``, ``payload``) is set at construction; the rest is the scheduler's.
    """

    __slots__ = (
        "arrival", "available", "batch_key", "bucket", "cost", "deadline", "error", "finished", "groups",
        "id", "measured_us", "n", "payload", "pending", "predicted_us", "priced", "reason", "slo", "started",
        "tasks",
    )  # fmt: skip

    def __init__(
        self,
        *,
        n: int,
        available: Configuration,
        arrival: float,
        slo: SLO | None = None,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
        confidence: float | None = None,
        per_request: bool = False,
        payload: P = None,  # type: ignore[assignment]
        bucket: BucketKey | None = None,
        groups: tuple[tuple[Configuration, int], ...] | None = None,
        batch_key: object = None,
        priced: tuple[Plan, CostModel] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.n = n
        self.available = available
        self.arrival = arrival
        if slo is None:  # a validated SLO given by its parts (tests, simulations)
            slo = SLO(deadline_ms, min_accuracy, best_effort, confidence, per_request)
        self.slo = slo
        self.deadline = math.inf if slo.deadline_ms is None else arrival + slo.deadline_ms / 1000.0
        # Rows grouped by the modalities they have (a presence mask): (modalities, rows).
        self.groups = ((available, n),) if groups is None else groups
        self.batch_key = batch_key  # jobs merge into one batch only if their keys are equal
        # The plan and cost model of its size bucket, when priced before admission outside any
        # lock (Pricer.plan_outside_lock); None: the scheduler prices it.
        self.priced = priced
        self.payload: P = payload
        # The scheduler's: the size bucket it is priced at (the profile's reference for a
        # fixed-shape model) and that bucket's cost model, set at admission; its tasks; progress.
        self.bucket = bucket
        self.cost: CostModel | None = None
        self.tasks: list[Task] = []
        self.pending = 0
        self.started = math.nan
        self.finished = math.nan
        self.predicted_us = 0
        self.measured_us = 0.0
        self.error: BaseException | None = None
        self.reason: Reason | str | None = None  # why a policy kept the job below its best option

    @property
    def deadline_ms(self) -> float | None:
        """The job's deadline from its arrival (None: none)."""
        return self.slo.deadline_ms

    @property
    def min_accuracy(self) -> float | None:
        """The job's accuracy floor (None: none)."""
        return self.slo.min_accuracy

    @property
    def best_effort(self) -> bool:
        """Served late rather than failed."""
        return self.slo.best_effort

    @property
    def confidence(self) -> float | None:
        """The floor holds for this lower confidence bound of accuracy (None: on the means)."""
        return self.slo.confidence

    @property
    def per_request(self) -> bool:
        """Every request's configuration meets the floor."""
        return self.slo.per_request

    @property
    def strategies(self) -> tuple[Strategy, ...]:
        """Each task's current (or final) strategy."""
        return tuple(t.strategy for t in self.tasks)

    @property
    def expected_accuracy(self) -> float:
        """Request-weighted expected accuracy of the job's strategies."""
        return sum(t.strategy.accuracy_units for t in self.tasks) / (self.n * ACCURACY_SCALE)

    @property
    def reason_text(self) -> str | None:
        """:attr:`reason` as the text a result carries."""
        reason = self.reason
        return reason.value if isinstance(reason, Reason) else reason


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

    def __init__(
        self, job: Job[Any], index: int, offset: int, n: int, frontier: Frontier, first: int
    ) -> None:
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
        fixed = self.fixed
        return fixed if fixed is not None else self.frontier.strategies[self.first + self.k]

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


def deadline_us(job: Job[Any]) -> int:
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


def chunk_sizes(n: int, max_batch_size: int) -> list[int]:
    """The near-equal chunks a job of ``n`` rows is split into (each at most ``max_batch_size``)."""
    parts = -(-n // max_batch_size)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def merged_groups(tasks: Sequence[Task]) -> dict[Configuration, int]:
    """Rows per configuration over ``tasks`` at their current options."""
    groups: dict[Configuration, int] = {}
    for task in tasks:
        for config, count in task.strategy.groups:
            groups[config] = groups.get(config, 0) + count
    return groups


def mergeable(head: Task, other: Task) -> bool:
    """Whether two tasks may run in one batch: the same available modalities and inputs alike.

    Inputs alike (the driver's ``Job.batch_key``: structure, dtypes and trailing shapes) keeps a
    job's rows from being cast or padded to fit another tenant's; one size bucket, one price.
    """
    return (
        head.frontier.available == other.frontier.available
        and head.job.batch_key == other.job.batch_key
        and head.job.bucket == other.job.bucket
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """What the executor runs next: one or more tasks, and the strategy covering all their rows.

    ``later`` is set when a task runs an escalation chain: how the executor prices its later
    stages and when the batch must be done (``merged`` then groups the first stage's rows).
    """

    tasks: tuple[Task, ...]
    strategies: tuple[Strategy, ...]  # per task
    merged: Strategy  # the rows of all tasks, grouped by configuration
    predicted_us: int
    started: float
    later: StageBudget | None = None


Failure = tuple[Job[Any], BaseException]
