"""The state of a scheduler's core, and the narrow view of it that policies decide on.

:class:`CoreView` holds what the online stage knows at one moment: the queue (:mod:`mosel.queue`),
the prices (:mod:`mosel.pricing`), admission's caches (:mod:`mosel.admission`) and the running
batch. It implements :class:`mosel.policies.Core`: read-only views of the queue and prices, and
the few actions a policy may take. :class:`mosel.scheduler.Scheduler` adds the sequencing a
driver calls (admit, dispatch, complete).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from mosel.admission import Admission
from mosel.chains import LaterRows
from mosel.errors import DeadlineError
from mosel.jobs import NO_DEADLINE_US, Batch, Failure, Job, Task, deadline_us, time_us
from mosel.plan import CostModel, Plan
from mosel.pricing import BatchLatency, Delayed, Pricer
from mosel.profiles import BucketKey, Profile
from mosel.queue import EdfQueue, IntArray
from mosel.stats import Stats
from mosel.tail import TailModel

if TYPE_CHECKING:
    from mosel.policies import Policy
    from mosel.scheduler import SchedulerConfig

__all__ = ["DEADLINE_REASONS", "CoreView"]

DEADLINE_REASONS: Final = frozenset({"doomed", "shed", "late"})
"""The reasons a job fails for its deadline: a miss, for the policy's books."""


class CoreView:
    """The core's state, read through views and changed through a policy's few actions.

    Args:
        profile: the model's profile.
        config: the online stage's knobs.
        stats: the model's statistics (counters, histograms, prices).
        solve_async: runs a function off the driver's lock (CP-SAT on a helper thread); None in
            a driver that cannot (a simulation solves inline).
        priced: plans and cost models of size buckets priced ahead (at attach).
    """

    def __init__(
        self,
        profile: Profile,
        config: SchedulerConfig,
        stats: Stats,
        solve_async: Callable[[Callable[[], Any]], None] | None = None,
        priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None,
    ) -> None:
        self.profile = profile
        self.config = config
        self.stats = stats
        escalation = config.escalation_quantile if config.escalation else None
        self.pricer = Pricer(
            profile, config.latency_quantile, config.correction_alpha, stats, priced, escalation
        )
        self.admission = Admission(profile, self.pricer)
        calibration = self.pricer.calibration
        if calibration is not None:
            stats.set_calibration({profile.key(c): calibration.histogram(c) for c in calibration.edges})
        self.edf = EdfQueue()
        self.in_flight: Batch | None = None
        self.busy_until = -math.inf
        self.overrun = False
        """The running batch went past its predicted end (set by ``Scheduler.expire``)."""
        self.lent = False
        """The device is lent to work outside the queue (a shadow evaluation, :meth:`lend`)."""
        self.solve_async = solve_async
        self.policy: Policy  # set by the scheduler, which knows the policy's class
        self.typical: Callable[[float], float] = self.pricer.tail.typical
        """The median time of a span priced ``priced_us`` (throughput estimates)."""

    def set_profile(
        self, profile: Profile, priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None
    ) -> None:
        """Serve on with ``profile``: the same latencies, other accuracies and plans (live floors).

        Admission and prices read it from now on (the online correction and the tail model are
        kept). Queued jobs take the new plan's options that meet their floors, at the cheapest
        (policies upgrade them at dispatch); one whose floor is now beyond reach, its best.
        """
        self.profile = profile
        self.pricer.set_profile(profile, priced)
        self.admission = Admission(profile, self.pricer)
        for task in self.edf.tasks:  # queued jobs take the new plan's options (a floor still holds)
            job = task.job
            if task.fixed is not None:
                continue
            plan, job.cost = self.pricer.plan(job.bucket or self.pricer.reference)
            frontier = plan.frontier(task.frontier.available, task.n)
            task.frontier, task.k = frontier, 0
            task.first = min(self.admission.first(frontier, job), len(frontier.strategies) - 1)
        self.edf.repriced(self.pricer.refresh)

    def lend(self, now: float, busy_us: float) -> None:
        """Lend the idle device for about ``busy_us`` (a shadow evaluation): jobs arriving meanwhile queue.

        Admission then sees the device busy until the loan's predicted end, as behind a batch.
        """
        self.lent = True
        self.busy_until = max(self.busy_until, now + busy_us / 1e6)

    def lend_back(self, now: float) -> None:
        """The loan ended at ``now``."""
        self.lent = False
        if self.in_flight is None:
            self.busy_until = min(self.busy_until, now)

    @property
    def queue(self) -> list[Task]:
        """The queued tasks in key order (read-only)."""
        return self.edf.tasks

    @property
    def latency_us(self) -> IntArray:
        """Each queued task's current option's price, queue order (a view)."""
        return self.edf.latency_us

    @property
    def deadlines_us(self) -> IntArray:
        """Each queued task's deadline (absolute µs; :data:`NO_DEADLINE_US` for none)."""
        return self.edf.deadlines_us

    @property
    def cheapest_us(self) -> IntArray:
        """Each queued task's cheapest admissible option's price."""
        return self.edf.cheapest_us

    @property
    def save_us(self) -> IntArray:
        """What each queued task's next step down saves (0: none)."""
        return self.edf.save_us

    @property
    def loss_units(self) -> IntArray:
        """And what that step loses, in accuracy units."""
        return self.edf.loss_units

    @property
    def lenient(self) -> npt.NDArray[np.bool_]:
        """Best-effort tasks: served late rather than failed (a copy)."""
        return self.edf.lenient

    @property
    def queued_requests(self) -> int:
        """Rows waiting in the queue."""
        return self.edf.requests

    @property
    def max_batch_size(self) -> int:
        """Most rows one batch may hold."""
        return self.profile.max_batch_size

    @property
    def busy(self) -> bool:
        """A batch is running."""
        return self.in_flight is not None

    @property
    def version(self) -> int:
        """Bumped whenever prices move."""
        return self.pricer.version

    @property
    def tail(self) -> TailModel:
        """The tail model prices are taken at."""
        return self.pricer.tail

    @property
    def correction(self) -> dict[str, float]:
        """The online correction per branch and ``"fusion"`` (measured over predicted)."""
        return self.pricer.correction

    @property
    def cost(self) -> CostModel:
        """The reference size bucket's cost model (the profile's)."""
        return self.pricer.cost

    def start(self, now: float) -> float:
        """When the next batch could start: now, or when the running one is predicted to end."""
        return max(now, self.busy_until)

    def finishes_us(self, now: float) -> IntArray:
        """Predicted finish of every queued task run one after another (absolute microseconds)."""
        finish: IntArray = time_us(self.start(now)) + np.cumsum(self.latency_us)
        return finish

    def batch_latency(self, cost: CostModel | None = None) -> BatchLatency:
        """An empty batch whose price grows as tasks join (``cost``: its jobs' size bucket's)."""
        return self.pricer.batch(cost)

    def merged_latency_us(self, tasks: Sequence[Task]) -> int:
        """The price of ``tasks`` run as one batch at their current options."""
        return self.pricer.merged_latency_us(tasks)

    def corrected_us(
        self,
        groups: Sequence[tuple[frozenset[str], int]],
        cost: CostModel | None = None,
        later: LaterRows | None = None,
    ) -> float:
        """A strategy's corrected median execution, before the tail."""
        return self.pricer.corrected_us(groups, cost, later)

    def expected_misses(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        delayed: Delayed | None = None,
    ) -> npt.NDArray[np.float64]:
        """Expected missed requests for each candidate batch (:meth:`Pricer.expected_misses`)."""
        return self.pricer.expected_misses(corrected_us, thresholds_us, weights, delayed)

    def first_within(
        self,
        corrected_us: npt.NDArray[np.float64],
        thresholds_us: npt.NDArray[np.float64],
        weights: npt.NDArray[np.float64],
        credit: float,
        delayed: Delayed | None = None,
    ) -> tuple[int, float]:
        """The first candidate whose added expected misses fit ``credit`` (:meth:`Pricer.first_within`)."""
        return self.pricer.first_within(corrected_us, thresholds_us, weights, credit, delayed)

    def doomed(self, finish_us: int, deadline_us: int, now: float) -> bool:
        """Would a task priced to finish at ``finish_us`` miss ``deadline_us`` even at the median?"""
        start_us = time_us(self.start(now))
        return start_us + self.pricer.tail.typical(max(finish_us - start_us, 0)) > deadline_us

    def count(self, name: str, by: int = 1) -> None:
        """Add to one of the model's counters."""
        self.stats.count(name, by)

    def observe(self, histogram: str, value_ms: float) -> None:
        """Record a time in one of the model's histograms."""
        self.stats.observe(histogram, value_ms)

    def finish_by(self, tasks: Sequence[Task], now: float, price_us: int) -> float:
        """When a batch of ``tasks`` priced ``price_us`` and starting ``now`` must end (seconds).

        Its jobs' earliest deadline, and no later than the queued jobs' slack allows (the queue
        after it one task after another at its current options); never before its own price.
        What the later stages of its chains may use beyond the rows they were priced at.
        """
        start_us = time_us(now)
        own = [deadline_us(t.job) for t in tasks if not t.job.best_effort]
        limit = min(own) if own else NO_DEADLINE_US
        if self.edf.tasks:
            slack = self.deadlines_us - (start_us + price_us + np.cumsum(self.latency_us))
            slack = slack[~self.lenient & (slack >= 0)]
            if len(slack):
                limit = min(limit, start_us + price_us + int(slack.min()))
        return max(limit, start_us + price_us) / 1e6

    # ------------------------------------------------------------------ the actions a policy takes

    def set_option(self, task: Task, k: int, position: int | None = None) -> None:
        """Choose option ``k`` for ``task`` (late binding: until it is dispatched)."""
        self.edf.set_option(task, k, position)

    def take(self, task: Task) -> None:
        """Take a task out of the queue (to run it, or because its job failed)."""
        self.edf.remove(task)

    def fail(self, job: Job[Any], error: BaseException, reason: str) -> Failure:
        """Fail a job: its queued tasks leave the queue; counted as ``failed_<reason>``."""
        for task in job.tasks:
            if task.queued:
                self.edf.remove(task)
        if job.error is None:
            job.error = error
            self.stats.count(f"failed_{reason}")
            if reason in DEADLINE_REASONS:
                self.policy.observe_outcome(job, missed=True)
        return (job, error)

    def deadline_error(self, job: Job[Any], now: float, predicted_us: int) -> DeadlineError:
        """The error of a job that cannot make its deadline (``predicted_us`` from ``now``)."""
        return self.admission.deadline_error(job, now, predicted_us)

    def doom_certain(self, now: float) -> list[Failure]:
        """Fail every queued job that would miss its deadline even if it started alone now."""
        start_us = time_us(self.start(now))
        late = (self.deadlines_us < start_us + self.pricer.typical_us(self.cheapest_us)) & ~self.lenient
        doomed = {id(self.queue[i].job): self.queue[i] for i in np.flatnonzero(late).tolist()}
        failures = []
        for task in doomed.values():  # a job of several chunks fails once, all its chunks with it
            if task.job.error is None:
                error = self.deadline_error(task.job, now, task.lat[0])
                failures.append(self.fail(task.job, error, "doomed"))
        return failures
