"""A policy's interface: four hooks, and the narrow view of the core it decides on.

A policy is one object per scheduler, called under the driver's lock at four moments:

* :meth:`Policy.initial`: a task's initial option at admission;
* :meth:`Policy.replan`: whenever the queue changed (an arrival, a completion, the watchdog);
* :meth:`Policy.dispatch`: the device is free; bind options and choose the tasks of one batch;
* :meth:`Policy.alone`: a lone job is about to run at once on an idle device.

It sees the core only through :class:`Core`: the queue and its columns (read-only), prices, and
a few actions (choose an option, take a task for the batch, fail a job, ask for a solve). The
building blocks every policy combines (predicting the batched queue, repairing it, binding the
head, forming a batch) are :mod:`mosel.policies.blocks`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from mosel.jobs import Batch, Failure, Job, Task
from mosel.plan import CostModel
from mosel.policies.blocks import bind_head, take_batch

if TYPE_CHECKING:
    from mosel.chains import LaterRows
    from mosel.errors import DeadlineError
    from mosel.pricing import BatchLatency, Delayed
    from mosel.queue import IntArray
    from mosel.scheduler import SchedulerConfig

__all__ = ["Core", "Policy"]


class Core(Protocol):
    """What a policy may read of the scheduler's core, and the actions it may take."""

    @property
    def queue(self) -> Sequence[Task]:
        """The queued tasks in key order (read-only)."""

    @property
    def latency_us(self) -> IntArray:
        """Each queued task's current option's price, queue order."""

    @property
    def deadlines_us(self) -> IntArray:
        """Each queued task's deadline (absolute µs)."""

    @property
    def cheapest_us(self) -> IntArray:
        """Each queued task's cheapest admissible option's price."""

    @property
    def save_us(self) -> IntArray:
        """What each queued task's next step down saves (0: none)."""

    @property
    def loss_units(self) -> IntArray:
        """And what that step loses, in accuracy units."""

    @property
    def lenient(self) -> npt.NDArray[np.bool_]:
        """Best-effort tasks: served late rather than failed."""

    @property
    def config(self) -> SchedulerConfig:
        """The scheduler's knobs."""

    @property
    def max_batch_size(self) -> int:
        """Most rows one batch may hold."""

    @property
    def busy(self) -> bool:
        """A batch is running."""

    @property
    def version(self) -> int:
        """Bumped whenever prices move (a solve started before is stale)."""

    @property
    def solve_async(self) -> Callable[[Callable[[], Any]], None] | None:
        """Run a function off the driver's lock; its return reaches :meth:`Policy.solved` (None: cannot)."""

    def start(self, now: float) -> float:
        """When the next batch could start: now, or when the running one is predicted to end."""

    def finishes_us(self, now: float) -> IntArray:
        """Predicted finish of every queued task run one after another (absolute µs)."""

    def batch_latency(self, cost: CostModel | None = None) -> BatchLatency:
        """An empty batch whose price grows as tasks join."""

    def merged_latency_us(self, tasks: Sequence[Task]) -> int:
        """The price of ``tasks`` run as one batch at their current options."""

    def typical(self, priced_us: float) -> float:
        """The median time of a span priced ``priced_us``."""

    def corrected_us(
        self,
        groups: Sequence[tuple[frozenset[str], int]],
        cost: CostModel | None = None,
        later: LaterRows | None = None,
    ) -> float:
        """A strategy's corrected median execution, before the tail (see :class:`mosel.pricing.Pricer`)."""

    def expected_misses(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        delayed: Delayed | None = None,
    ) -> npt.NDArray[np.float64]:
        """Expected missed requests for each candidate batch (``Pricer.expected_misses``)."""

    def first_within(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        credit: float,
        delayed: Delayed | None = None,
    ) -> tuple[int, float]:
        """The first candidate whose added expected misses fit ``credit`` (``Pricer.first_within``)."""

    def doomed(self, finish_us: int, deadline_us: int, now: float) -> bool:
        """Would a task priced to finish at ``finish_us`` miss ``deadline_us`` even at the median?"""

    def count(self, name: str, by: int = 1) -> None:
        """Add to one of the model's counters."""

    def observe(self, histogram: str, value_ms: float) -> None:
        """Record a time in one of the model's histograms."""

    def set_option(self, task: Task, k: int, position: int | None = None) -> None:
        """Choose option ``k`` for ``task`` (``position``: its index in the queue, if known)."""

    def take(self, task: Task) -> None:
        """Take a queued task out of the queue, into the batch being formed."""

    def fail(self, job: Job[Any], error: BaseException, reason: str) -> Failure:
        """Fail a job (its queued tasks leave the queue); counted as ``failed_<reason>``."""

    def deadline_error(self, job: Job[Any], now: float, predicted_us: int) -> DeadlineError:
        """The error of a job that cannot make its deadline (``predicted_us`` from ``now``)."""

    def doom_certain(self, now: float) -> list[Failure]:
        """Fail every queued job that would miss its deadline even if it started alone now."""


class Policy:
    """Base class of scheduling policies; by default EDF, deadline-fitting options, no re-planning.

    Class attributes say what the core must know up front. Subclasses override the hooks they
    need and combine the building blocks of :mod:`mosel.policies.blocks`.
    """

    name: ClassVar[str] = "custom"
    every_modality: ClassVar[bool] = False
    """Every task runs every available modality (its one fixed strategy)."""
    fifo: ClassVar[bool] = False
    """Queue in arrival order rather than earliest deadline first."""
    refuse_late: ClassVar[bool] = True
    """Refuse (at admission) and drop (at dispatch) jobs that cannot make their deadline."""
    merge_always: ClassVar[bool] = False
    """Merge consecutive queued jobs into a batch even when the cost model says it does not help."""
    merge_skips: ClassVar[bool] = True
    """A batch may take queued jobs out of order, when the jobs it overtakes keep their deadlines."""
    horizon: ClassVar[int] = 64
    """Queued tasks whose batching the blocks follow exactly (behind them: one after another)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        rule = (type(self).__doc__ or "").strip().split("\n")[0]
        self.rule = f"policy {self.name!r}: {rule}"
        """Why a job this policy kept below its best option stayed there, when no other reason was given."""

    def initial(self, task: Task, now: float, share: float) -> int:
        """The initial option of a task: the most accurate that meets the job's own deadline.

        ``share`` is the task's share of the job's time when the job is split into chunks.
        """
        job = task.job
        if math.isinf(job.deadline):
            return len(task.lat) - 1
        return max(bisect.bisect_right(task.lat, (job.deadline - now) * 1e6 * share) - 1, 0)

    def observe_arrival(self, job: Job[Any], now: float, cheapest_us: int) -> None:
        """An accepted job arrived; its cheapest strategies are priced ``cheapest_us`` in all."""

    def observe_launch(self, batch: Batch, now: float) -> None:
        """A batch started running."""

    def observe_outcome(self, job: Job[Any], missed: bool) -> None:
        """A job finished, failed for its deadline or was refused; ``missed``: not on time."""

    def replan(self, now: float) -> list[Failure]:
        """The queue changed: re-assign options, fail jobs that cannot make it."""
        return []

    def solved(self, now: float, result: Any) -> list[Failure]:
        """What a function given to ``core.solve_async`` returned (None if it failed or was dropped)."""
        return []

    def alone(self, task: Task, now: float) -> None:
        """A lone job is about to run at once on an idle device (its option can still change)."""

    def victim(self, late: int) -> int:
        """Which job a repair fails when queued job ``late`` cannot be saved: by default, that one."""
        return late

    def dispatch(self, now: float) -> tuple[list[Task], list[Failure]]:
        """Bind the head's option, drop what cannot make it, and take the next batch's tasks."""
        failures = bind_head(self, now)
        if not self.core.queue:
            return [], failures
        return take_batch(self, now), failures
