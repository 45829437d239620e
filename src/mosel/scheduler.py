"""The online stage's core: an EDF queue with late binding, admission, completion and correction.

This module holds the scheduling *logic* only. It never sleeps, starts threads, touches tensors or
resolves futures: a driver calls :meth:`Scheduler.admit`, :meth:`Scheduler.dispatch` and
:meth:`Scheduler.complete` under its own lock and with its own clock. The threaded driver
(``mosel.server``) and the simulator (``mosel.simulate``) run this same code. The decisions (which
option, what to merge, whom to fail) belong to a policy object (:mod:`mosel.policies`).
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from mosel.assign import Item, step_down
from mosel.errors import AccuracyUnreachableError, DeadlineError, InputError, QueueFullError, ShutdownError
from mosel.jobs import NO_DEADLINE_US, Batch, Failure, Job, Task, deadline_us, floor_units, time_us
from mosel.plan import (
    ACCURACY_SCALE,
    CostModel,
    Frontier,
    Plan,
    Strategy,
    accuracy_units,
    configuration_key,
    execution_order,
)
from mosel.policies import Policy, policy_class
from mosel.profiles import BucketKey, Profile
from mosel.stats import DEGRADED_WINDOW, Load, Stats
from mosel.tail import TailModel, profile_sigma

__all__ = [
    "NO_DEADLINE_US",
    "Batch",
    "Failure",
    "Job",
    "Scheduler",
    "SchedulerConfig",
    "Task",
    "chunk_sizes",
    "floor_units",
    "merged_groups",
]

Configuration = frozenset[str]
CORRECTION_CLAMP: Final = 4.0
"""A single measurement counts as at most this factor above or below the current correction."""
PRICED_CACHE: Final = 256
"""Size buckets a scheduler keeps priced besides those priced ahead (then it drops them all)."""
_log = logging.getLogger("mosel")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Knobs of the online stage.

    Attributes:
        policy: a policy name from :data:`mosel.policies.POLICIES` (``"mosel"``, the default;
            ``"greedy"``, ``"aggressive"``, ``"agnostic"``, ``"agnostic_plus"``, ``"batcher"``),
            or a :class:`mosel.policies.Policy` subclass (one instance per scheduler).
        max_queued_requests: admission control; more waiting requests are refused.
        solver_time_limit_s: CP-SAT budget per re-assignment.
        solver_share: the CP-SAT helper thread may be busy at most this fraction of the time
            (after a solve of t ms it rests t * (1 / share - 1) ms, twice as long after each
            solve that found nothing better than greedy, up to 64 times): its Python model
            building and its search compete with the executor for the interpreter lock and the
            cores, and on common queues greedy is already optimal.
        deterministic: solve CP-SAT inline with a deterministic time limit (simulations, tests).
        batching: run consecutive queued jobs as one batch when it is predicted to help.
        max_merge: at most this many jobs per batch.
        correction_alpha: weight of a new measurement in the latency correction (EWMA).
        hedge: under load (jobs waiting at dispatch, on average), a dispatched batch may take
            at most this fraction of the typical headroom of arriving jobs (their deadline minus
            their cheapest strategy), so that a burst arriving meanwhile can still be served;
            0 disables it.
        risk: a dispatched batch may outlast the headroom of a tight arriving job (a low
            quantile of arrivals' headroom) only by so long that, at the recent arrival rate,
            this many jobs are expected to arrive in the excess; 0 disables it.
        reserve: every queued job keeps free, before its deadline, this multiple of the time
            that recent arrivals need at their cheapest strategies (their share of the device
            times the time left), for jobs that will arrive and run ahead of it; 0 disables it.
        load_window_s: time constant of the recent arrival rate and work (exponential decay).
        spare_margin: the mosel policy spends on accuracy only the device time that recent
            arrivals at their cheapest strategies leave free, less this share of the device (a
            safety margin against the arrival estimate's error; measured, 0 lost nothing
            against 0.1 on the benchmark's traces, see ``docs/online.md``).
        latency_quantile: every decision (admission, the doom test, late binding, dispatch)
            prices a batch at this quantile of its latency, not its median: the corrected
            median times a margin, plus the per-batch dispatch overhead, both measured over
            recent batches (:class:`mosel.tail.TailModel`; before enough batches ran, the
            profile's own spread). A deadline is a tail constraint: a batch planned at its
            median with no slack overruns about half the time. Higher values trade accuracy
            for fewer overruns below capacity, and shed more near it; the default 0.5 prices
            at the median plus the median overhead, which served best live on a shared CPU near
            capacity (``docs/benchmarks.md``). Throughput estimates always use the median.
        solver_window: CP-SAT re-assigns at most this many queued tasks at the head of the
            queue (the jobs behind them keep their slack), so that a solve's model building stays
            bounded however long the queue.

    ``hedge``, ``risk`` and ``reserve`` apply to the mosel and greedy policies: they trade a
    little accuracy for deadlines that late binding alone, which sees only the queue, would miss.
    """

    policy: str | type[Policy] = "mosel"
    max_queued_requests: int = 4096
    solver_time_limit_s: float = 0.02
    solver_share: float = 0.2
    deterministic: bool = False
    batching: bool = True
    max_merge: int = 8
    correction_alpha: float = 0.1
    hedge: float = 0.5
    risk: float = 0.05
    reserve: float = 1.0
    load_window_s: float = 0.5
    solver_window: int = 64
    spare_margin: float = 0.0
    latency_quantile: float = 0.5

    def __post_init__(self) -> None:
        policy_class(self.policy)  # raises ValueError for an unknown policy
        if self.max_queued_requests < 1 or self.max_merge < 1 or self.solver_window < 1:
            raise ValueError("max_queued_requests, max_merge and solver_window must be at least 1")
        if not 0.0 < self.correction_alpha <= 1.0:
            raise ValueError(f"correction_alpha must be in (0, 1], got {self.correction_alpha}")
        for name in ("hedge", "risk", "reserve"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be at least 0 (0 disables it), got {getattr(self, name)}")
        if not 0.0 < self.solver_share <= 1.0:
            raise ValueError(f"solver_share must be in (0, 1], got {self.solver_share}")
        if not 0.0 <= self.spare_margin <= 1.0:
            raise ValueError(f"spare_margin must be in [0, 1], got {self.spare_margin}")
        if not 0.5 <= self.latency_quantile < 1.0:
            raise ValueError(
                f"latency_quantile must be in [0.5, 1) (0.5 plans at the median), got {self.latency_quantile}"
            )
        if not self.load_window_s > 0.0:
            raise ValueError(f"load_window_s must be positive, got {self.load_window_s}")


IntArray = npt.NDArray[np.int64]


class Scheduler:
    """The policy-free core of the online stage for one model.

    It owns the queue (tasks in the policy's order, with parallel numpy arrays of each task's
    current latency, deadline, cheapest latency and the saving and loss of its next step down, so
    that predicting every queued job's finish is one cumulative sum), admission, late binding,
    completion, the online latency correction and the statistics. What to run, at which option,
    and whom to fail is the policy's (:mod:`mosel.policies`); the core knows no policy by name.
    """

    def __init__(
        self,
        profile: Profile,
        config: SchedulerConfig | None = None,
        stats: Stats | None = None,
        solve_async: Callable[[Callable[[], None]], None] | None = None,
        priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or SchedulerConfig()
        self.stats = stats or Stats()
        self.cost: CostModel = profile.cost_model()
        self.queue: list[Task] = []
        self._keys: list[tuple[float, int, int]] = []
        # One row per column (latency, deadline, cheapest, save, loss, lenient), one column per
        # queued task, with spare capacity: an insertion is one memmove, not a new array.
        self._columns: IntArray = np.zeros((6, 64), dtype=np.int64)
        self.in_flight: Batch | None = None
        self.busy_until = -math.inf
        self.overrun = False
        """The running batch went past its predicted end (set by :meth:`expire`)."""
        self.queued_requests = 0
        self._queued_jobs: dict[int, int] = {}  # job id -> its queued tasks
        self.closed = False
        self.correction: dict[str, float] = dict.fromkeys((*profile.modalities, "fusion"), 1.0)
        everything = frozenset(profile.modalities)
        self._correction_weights = {m: float(self.cost.branch_us[m][1]) for m in profile.modalities} | {
            "fusion": float(self.cost.fusion_us[everything][1])
        }
        self._measured_parts: set[str] = set()  # parts the correction has measured (latency_correction)
        self.version = 0
        """Bumped whenever the correction or the tail model moves option latencies."""
        self.solve_async = solve_async
        self._published = dict(self.correction)
        self._latency_cache: dict[tuple[Configuration, int, BucketKey | None], tuple[int, ...]] = {}
        self._full_strategies: dict[tuple[Configuration, int, BucketKey | None], Strategy] = {}
        self._reference = profile.reference_bucket
        # The plan and cost model per size bucket: the reference's and those priced ahead
        # (``priced``, from :func:`mosel.profiles.priced_ahead` at attach) for the scheduler's
        # life; others as jobs bring them (see :meth:`priced`).
        self._ahead: dict[BucketKey, tuple[Plan, CostModel]] = {self._reference: (profile.plan, self.cost)}
        self._ahead.update(priced or {})
        self._priced = dict(self._ahead)
        self._keys_text: dict[Configuration, str] = {}
        self._parts: dict[tuple[tuple[tuple[Configuration, int], ...], BucketKey | None], dict[str, int]] = {}
        self._bounds: dict[float | None, dict[Configuration, int]] = {}
        self._admissible: dict[tuple[object, ...], int] = {}
        self._measured: tuple[Batch, float, float, float] | None = None  # for settled(): the last
        # completed batch, its measured time, and its corrected and raw predictions
        self._degraded: collections.deque[bool] = collections.deque(maxlen=DEGRADED_WINDOW)
        self._degraded_count = 0  # True entries in _degraded
        self.tail = TailModel(self.config.latency_quantile, profile_sigma(profile))
        """The margin and overhead that turn a corrected median into the price decisions use."""
        self.stats.set_tail(self.tail)
        self.stats.set_correction(self.correction)
        self.policy: Policy = policy_class(self.config.policy)(self)

    # ------------------------------------------------------------------ the queue's columns

    @property
    def latency_us(self) -> IntArray:
        """Each queued task's current option's latency, queue order (a view)."""
        return self._columns[0, : len(self.queue)]

    @property
    def deadlines_us(self) -> IntArray:
        """Each queued task's deadline (absolute µs; :data:`NO_DEADLINE_US` for none)."""
        return self._columns[1, : len(self.queue)]

    @property
    def cheapest_us(self) -> IntArray:
        """Each queued task's cheapest admissible option's latency."""
        return self._columns[2, : len(self.queue)]

    @property
    def save_us(self) -> IntArray:
        """What each queued task's next step down saves (0: none)."""
        return self._columns[3, : len(self.queue)]

    @property
    def loss_units(self) -> IntArray:
        """And what that step loses, in accuracy units."""
        return self._columns[4, : len(self.queue)]

    @property
    def lenient(self) -> npt.NDArray[np.bool_]:
        """Best-effort tasks: served late rather than failed (a copy)."""
        lenient: npt.NDArray[np.bool_] = self._columns[5, : len(self.queue)] != 0
        return lenient

    # ------------------------------------------------------------------ predictions

    def corrected_latency_us(
        self, groups: Sequence[tuple[Configuration, int]], cost: CostModel | None = None
    ) -> int:
        """The price of a strategy: its corrected median latency at the tail model's quantile.

        ``cost``: the cost model of the jobs' size bucket (default: the reference one).
        """
        cost = cost or self.cost
        rows = dict.fromkeys(cost.modalities, 0)
        fusion = 0
        for config, count in groups:
            fusion += cost.fusion_us[config][count]
            for m in config:
                rows[m] += count
        total = self.correction["fusion"] * fusion
        for m, k in rows.items():
            total += self.correction[m] * cost.branch_us[m][k]
        return self.tail.price(total)

    def refresh(self, task: Task) -> None:
        """Bring the task's option latencies up to date with the correction."""
        if task.version == self.version:
            return
        job = task.job
        if task.fixed is not None:
            key = (task.fixed.groups[0][0], -task.n, job.bucket)
            if key not in self._latency_cache:
                self._latency_cache[key] = (self.corrected_latency_us(task.fixed.groups, job.cost),)
            task.lat = self._latency_cache[key]
            task.acc = (task.fixed.accuracy_units,)
        else:
            task.lat = self._latencies(task.frontier, job)[task.first :]
            task.acc = tuple(s.accuracy_units for s in task.frontier.strategies[task.first :])
        task.version = self.version

    def _latencies(self, frontier: Frontier, job: Job) -> tuple[int, ...]:
        key = (frontier.available, frontier.n, job.bucket)
        cached = self._latency_cache.get(key)
        if cached is None:
            # Per-part corrections can reorder options; a running maximum keeps them ascending
            # (a cheaper option further up is priced as the one below it: never optimistic).
            cost = job.cost
            cached = tuple(
                itertools.accumulate(
                    (self.corrected_latency_us(s.groups, cost) for s in frontier.strategies), max
                )
            )
            self._latency_cache[key] = cached
        return cached

    def _item(self, task: Task) -> Item:
        self.refresh(task)
        return task.item

    def _key(self, config: Configuration) -> str:
        key = self._keys_text.get(config)
        if key is None:
            key = self._keys_text[config] = configuration_key(config, self.cost.modalities)
        return key

    def typical_us(self, priced_us: IntArray) -> IntArray:
        """Median times of spans priced ``priced_us`` (vectorised :meth:`TailModel.typical`).

        Options are chosen at the tail price; a job is refused or failed as doomed only when it
        would miss its deadline even at the median (trying costs no more than refusing it).
        """
        tail = self.tail
        if tail.margin == 1.0 and tail.overhead_us == tail.median_overhead_us:
            return priced_us
        typical: IntArray = (
            np.maximum(priced_us - tail.overhead_us, 0.0) / tail.margin + tail.median_overhead_us
        ).astype(np.int64)
        return typical

    def start(self, now: float) -> float:
        """When the next batch could start: now, or when the running one is predicted to end."""
        return max(now, self.busy_until)

    def finishes_us(self, now: float) -> IntArray:
        """Predicted finish of every queued task run one after another (absolute microseconds)."""
        finish: IntArray = time_us(self.start(now)) + np.cumsum(self.latency_us)
        return finish

    @property
    def latency_correction(self) -> float:
        """The online correction as one factor.

        Measured over profiled time of one request on every modality: each part's correction
        weighted by its profiled time, over the parts measured so far (a part no batch ran, e.g.
        a modality no job carried, knows nothing of this device and does not dilute the
        others); 1 before any.
        """
        weights = {p: w for p, w in self._correction_weights.items() if p in self._measured_parts}
        total = sum(weights.values())
        if total <= 0.0:
            return 1.0
        return sum(self.correction[p] * w for p, w in weights.items()) / total

    def load(self, now: float, at_s: float | None = None) -> Load:
        """What this scheduler tells a router about itself at ``now`` (its own clock).

        O(1) numpy work over the queue's columns, no solving: the running batch's predicted
        remainder (as long again as its overrun, when it runs past its prediction) plus every
        queued task at its current option's price, one after another.

        Args:
            now: the scheduler's clock (``time.perf_counter`` in a server, virtual in a
                simulation).
            at_s: the load's timestamp; default ``time.time()`` (a simulation passes its clock).
        """
        running_us = overrun_us = 0.0
        batch = self.in_flight
        if batch is not None:
            overrun_us = max((now - batch.started) * 1e6 - batch.predicted_us, 0.0)
            running_us = overrun_us if overrun_us > 0.0 else max(self.busy_until - now, 0.0) * 1e6
        queued_us = int(self.latency_us.sum())
        window = len(self._degraded)
        return Load(
            drain_ms=(running_us + queued_us) / 1000.0,
            queued_jobs=len(self._queued_jobs),
            queued_requests=self.queued_requests,
            latency_margin=self.tail.margin,
            overhead_ms=self.tail.overhead_us / 1000.0,
            degraded_share=self._degraded_count / window if window else 0.0,
            at_s=time.time() if at_s is None else at_s,
            overrun_ms=overrun_us / 1000.0,
            latency_correction=self.latency_correction,
        )

    @staticmethod
    def degraded(job: Job) -> bool:
        """Was ``job`` served below the most accurate option its floor and modalities allowed?"""
        for t in job.tasks:  # noqa: SIM110 (a loop, not any(<generator>): runs for every served job)
            if t.fixed is None and t.k < len(t.lat) - 1:
                return True
        return False

    def _record_served(self, job: Job) -> None:
        """Count a served job in the window behind :attr:`Load.degraded_share`."""
        window = self._degraded
        if len(window) == window.maxlen:
            self._degraded_count -= window[0]
        below = self.degraded(job)
        window.append(below)
        self._degraded_count += below

    def merged_latency_us(self, tasks: Sequence[Task]) -> int:
        """Predicted latency of ``tasks`` run as one batch at their current options."""
        if len(tasks) == 1:
            self.refresh(tasks[0])
            return tasks[0].lat[tasks[0].k]
        return self.corrected_latency_us(list(merged_groups(tasks).items()), tasks[0].job.cost)

    def batch_latency(self, cost: CostModel | None = None) -> BatchLatency:
        """An empty batch whose corrected latency grows as tasks join (for predictions).

        ``cost``: the cost model of its jobs' size bucket (default: the reference one).
        """
        return BatchLatency(self, cost)

    def full(self, available: Configuration, n: int, job: Job) -> Strategy:
        """Every available modality for every request (need not be on the frontier)."""
        key = (available, n, job.bucket)
        strategy = self._full_strategies.get(key)
        if strategy is None:
            groups = ((available, n),)
            cost = job.cost or self.cost
            strategy = Strategy(groups, cost.latency_us(groups), cost.accuracy_units(groups))
            self._full_strategies[key] = strategy
        return strategy

    def pricing(self, bucket: BucketKey) -> tuple[Plan, CostModel]:
        """What :meth:`priced` will give for ``bucket``, for a job being built before admission.

        Needs no lock (a read of the cache, else the pure :meth:`Profile.priced_at`, which may
        reprice a plan: milliseconds), so a server calls it outside its lock and hands the
        result to :meth:`admit` as ``job.priced``. It stores nothing.
        """
        priced = self._priced.get(bucket)
        return priced if priced is not None else self.profile.priced_at(bucket)

    def priced(
        self, bucket: BucketKey, computed: tuple[Plan, CostModel] | None = None
    ) -> tuple[Plan, CostModel]:
        """The plan and cost model of jobs of size ``bucket`` (cached; no solving).

        ``computed``: :meth:`pricing`'s value for ``bucket``, stored when the cache lacks it
        (else computed here: a simulation, which holds no lock). The buckets priced ahead stay;
        the others are dropped every :data:`PRICED_CACHE` new ones (the cache stays bounded).
        """
        priced = self._priced.get(bucket)
        if priced is None:
            if len(self._priced) >= len(self._ahead) + PRICED_CACHE:  # sizes beyond the declared buckets
                self._priced = dict(self._ahead)
            priced = computed if computed is not None else self.profile.priced_at(bucket)
            self._priced[bucket] = priced
        return priced

    # ------------------------------------------------------------------ the queue

    def position(self, task: Task) -> int:
        """Index of a queued task in the queue."""
        i = bisect.bisect_left(self._keys, task.key)
        assert self.queue[i] is task
        return i

    def _insert(self, task: Task) -> None:
        self.refresh(task)
        i = bisect.bisect(self._keys, task.key)
        n = len(self.queue)
        if n == self._columns.shape[1]:
            self._columns = np.concatenate([self._columns, np.zeros_like(self._columns)], axis=1)
        columns = self._columns
        columns[:, i + 1 : n + 1] = columns[:, i:n]
        _, saved, lost = step_down(task.lat, task.acc, task.k)
        columns[:, i] = (
            task.lat[task.k],
            deadline_us(task.job),
            task.lat[0],
            saved,
            lost,
            task.job.best_effort,
        )
        self._keys.insert(i, task.key)
        self.queue.insert(i, task)
        task.queued = True
        self.queued_requests += task.n
        self._queued_jobs[task.job.id] = self._queued_jobs.get(task.job.id, 0) + 1

    def remove(self, task: Task) -> None:
        """Take a task out of the queue (to run it, or because its job failed)."""
        i = self.position(task)
        n = len(self.queue)
        self._columns[:, i : n - 1] = self._columns[:, i + 1 : n]
        del self.queue[i]
        del self._keys[i]
        task.queued = False
        self.queued_requests -= task.n
        left = self._queued_jobs.pop(task.job.id) - 1
        if left:
            self._queued_jobs[task.job.id] = left

    def set_option(self, task: Task, k: int, position: int | None = None) -> None:
        """Choose option ``k`` for ``task`` (late binding: until it is dispatched)."""
        task.k = k
        if task.queued:
            i = self.position(task) if position is None else position
            _, saved, lost = step_down(task.lat, task.acc, k)
            columns = self._columns
            columns[0, i] = task.lat[k]
            columns[3, i] = saved
            columns[4, i] = lost

    def _refresh_queue(self) -> None:
        """Re-read every queued task's latencies after the correction changed."""
        columns = self._columns
        for i, task in enumerate(self.queue):
            self.refresh(task)
            _, saved, lost = step_down(task.lat, task.acc, task.k)
            columns[0, i], columns[2, i], columns[3, i], columns[4, i] = (
                task.lat[task.k],
                task.lat[0],
                saved,
                lost,
            )

    # ------------------------------------------------------------------ admission

    def admit(self, job: Job, now: float) -> list[Failure]:
        """Queue a job (split into tasks of at most ``max_batch_size`` rows).

        Raises:
            ShutdownError: the scheduler is closed.
            QueueFullError: admission control.
            InputError: the job alone has more requests than the queue may ever hold.
            AccuracyUnreachableError: the floor is above what the available modalities reach
                (or, under the all-modality policies, above what every modality gives).
            DeadlineError: the job cannot make its deadline even alone at its cheapest strategy
                (unless ``best_effort``, or the policy never refuses).

        Returns:
            Other jobs failed because re-assignment found them doomed.
        """
        self._prepare(job, now)
        for task in job.tasks:
            self._insert(task)
        return self.policy.replan(now)

    def start_alone(self, job: Job, now: float) -> Batch | None:
        """Admit a job and dispatch it at once when the device is idle and nothing waits.

        The same admission as :meth:`admit` (same errors) and the same choice as :meth:`dispatch`
        would make for a lone job, without queueing it. Returns None, and changes nothing, when
        the device is busy, jobs are waiting, or the job needs several batches.
        """
        if (
            self.in_flight is not None
            or self.queue
            or job.n > self.profile.max_batch_size
            or len(job.groups) > 1
        ):
            return None
        self._prepare(job, now)
        self.policy.alone(job.tasks[0], now)
        return self._launch(job.tasks, now)

    def prepare_inline(self, job: Job, now: float) -> None:
        """Admit a job that runs at once outside the queue (a call from inside a running batch).

        The same checks and choice as for a lone job on an idle device; the queue (and its
        bound), the running batch and the policy's estimates are left alone.
        """
        self._prepare(job, now, inline=True)
        for task in job.tasks:
            self.refresh(task)
            if task.lat[task.k] > (job.deadline - now) * 1e6:
                task.k = 0

    def _prepare(self, job: Job, now: float, inline: bool = False) -> None:
        """Admission checks; creates the job's tasks with their initial options."""
        if self.closed:
            raise ShutdownError("the model's scheduler is closed; no new jobs are accepted")
        self.stats.count("submitted")
        limit = math.inf if inline else self.config.max_queued_requests
        if job.n > limit:
            self.stats.count("rejected_too_large")
            raise InputError(
                f"a job of {job.n} requests can never be queued: max_queued_requests={limit}; split the "
                f"job into calls of at most {limit} requests, or raise SchedulerConfig.max_queued_requests"
            )
        if self.queued_requests + job.n > limit:
            self.stats.count("rejected_queue_full")
            raise QueueFullError(
                f"queue holds {self.queued_requests} request(s); admitting {job.n} more would exceed "
                f"max_queued_requests={limit}; retry later or raise the limit"
            )
        policy = self.policy
        if job.bucket is None or job.bucket == self._reference:  # a fixed-shape model: always
            job.bucket, plan, job.cost = self._reference, self.profile.plan, self.cost
        else:
            plan, job.cost = self.priced(job.bucket, job.priced)
        sizes: list[tuple[Configuration, int]] = []  # per task: its rows' modalities, its rows
        for available, rows in job.groups:
            chunks = [rows] if rows <= plan.max_batch_size else chunk_sizes(rows, plan.max_batch_size)
            sizes += [(available, size) for size in chunks]
        no_slo = job.deadline_ms is None and job.min_accuracy is None
        every = policy.every_modality or no_slo
        offset = 0
        tasks = []
        strict = job.confidence is not None or job.per_request
        for index, (available, size) in enumerate(sizes):
            frontier = plan.frontier(available, size)
            floor = floor_units(job.min_accuracy, size)
            first = self._first_admissible(frontier, job) if strict else frontier.index_meeting(floor)
            task = Task(job, index, offset, size, frontier, min(first, len(frontier.strategies) - 1))
            if every:
                task.fixed = self.full(available, size, job)
            if strict:
                meets = (
                    self._meets(task.fixed, job)
                    if task.fixed is not None
                    else first < len(frontier.strategies)
                )
                reachable = frontier.best.accuracy_units if meets else -1
            else:
                reachable = (
                    task.fixed.accuracy_units if task.fixed is not None else frontier.best.accuracy_units
                )
            if reachable < floor:
                self.stats.count("rejected_accuracy")
                if strict:
                    how = f"at confidence {job.confidence}" if job.confidence is not None else "on the mean"
                    raise AccuracyUnreachableError(
                        f"min_accuracy={job.min_accuracy} {how}"
                        + (" for every request" if job.per_request else "")
                        + f" is above what modalities {sorted(available)} reach "
                        + ("(policy computes them all) " if task.fixed is not None else "")
                        + "by the profile's lower confidence bounds; lower the floor or the confidence, "
                        "send more modalities, or profile on more validation data (tighter bounds)",
                        min_accuracy=float(job.min_accuracy or 0.0),
                        best_accuracy=frontier.best.accuracy_units / (size * ACCURACY_SCALE),
                    )
                how = (
                    f"with every modality of {sorted(available)} (policy {policy.name!r} computes them all)"
                    if task.fixed is not None
                    else f"with modalities {sorted(available)}"
                )
                raise AccuracyUnreachableError(
                    f"min_accuracy={job.min_accuracy} is above the best expected accuracy "
                    f"{reachable / (size * ACCURACY_SCALE):.6f} reachable {how}; lower the floor or "
                    f"send more modalities",
                    min_accuracy=float(job.min_accuracy or 0.0),
                    best_accuracy=reachable / (size * ACCURACY_SCALE),
                )
            tasks.append(task)
            offset += size
        job.tasks = tasks
        share = 1.0 / len(sizes)
        for task in tasks:
            if policy.fifo:
                task.key = (job.arrival, *task.key[1:])
            self.refresh(task)
            task.k = policy.initial(task, now, share)
        cheapest_us = sum(t.lat[0] for t in tasks)
        late = now * 1e6 + self.tail.typical(cheapest_us) > job.deadline * 1e6
        if late and not job.best_effort and policy.refuse_late:
            self.stats.count("rejected_deadline")
            raise self.deadline_error(job, now, cheapest_us)
        if not inline:  # only queued jobs inform the policy: refused ones never load the device
            policy.observe_arrival(job, now, cheapest_us)
        job.pending = len(tasks)

    def doomed(self, finish_us: int, deadline_us: int, now: float) -> bool:
        """Would a task priced to finish at ``finish_us`` miss ``deadline_us`` even at the median?"""
        start_us = time_us(self.start(now))
        return start_us + self.tail.typical(max(finish_us - start_us, 0)) > deadline_us

    def _unit_bounds(self, confidence: float | None) -> dict[Configuration, int]:
        """Accuracy units per request of every configuration: the mean, or its lower bound."""
        bounds = self._bounds.get(confidence)
        if bounds is None:
            profile = self.profile
            bounds = self._bounds[confidence] = {
                c: self.cost.accuracy[c]
                if confidence is None
                else accuracy_units(profile.accuracy_bound(c, confidence))
                for c in self.cost.accuracy
            }
        return bounds

    def _meets(self, strategy: Strategy, job: Job) -> bool:
        """Does ``strategy`` meet the job's floor as the job asks (confidence, per request)?"""
        bounds = self._unit_bounds(job.confidence)
        if job.per_request:
            return all(bounds[c] >= floor_units(job.min_accuracy, 1) for c, k in strategy.groups if k)
        return sum(bounds[c] * k for c, k in strategy.groups) >= floor_units(job.min_accuracy, strategy.n)

    def _first_admissible(self, frontier: Frontier, job: Job) -> int:
        """The first frontier index from which every strategy meets the job's floor as asked.

        Options must be a suffix of the frontier; a strategy below it that meets the floor (a
        mix that happens to) is left out, which only makes the guarantee safer.
        """
        key = (frontier.available, frontier.n, job.bucket, job.min_accuracy, job.confidence, job.per_request)
        first = self._admissible.get(key)
        if first is None:
            strategies = frontier.strategies
            first = len(strategies)
            while first > 0 and self._meets(strategies[first - 1], job):
                first -= 1
            if len(self._admissible) > 4096:
                self._admissible.clear()
            self._admissible[key] = first
        return first

    def deadline_error(self, job: Job, now: float, predicted_us: int) -> DeadlineError:
        """The error of a job that cannot make its deadline (``predicted_us`` from ``now``)."""
        finish_ms = (now - job.arrival) * 1000.0 + predicted_us / 1000.0
        fitting = None
        if len(job.tasks) == 1 and not math.isinf(job.deadline):
            best = job.tasks[0].frontier.best_within((job.deadline - now) * 1e6)
            fitting = None if best is None else best.expected_accuracy
        return DeadlineError(
            f"deadline_ms={job.deadline_ms} cannot be met for {job.n} request(s) at min_accuracy="
            f"{job.min_accuracy}: the fastest admissible strategy is predicted to finish at "
            f"{finish_ms:.2f} ms after arrival"
            + (f"; the best accuracy that fits is {fitting:.4f}" if fitting is not None else "; nothing fits")
            + "; relax the deadline or the floor, or pass best_effort=True",
            deadline_ms=float(job.deadline_ms or 0.0),
            predicted_ms=finish_ms,
            best_accuracy_within_deadline=fitting,
        )

    def cancel(self, job: Job) -> bool:
        """Take a cancelled job's queued tasks out of the queue; True if any were queued."""
        queued = [t for t in job.tasks if t.queued]
        for task in queued:
            self.remove(task)
        if job.error is None:
            job.error = concurrent.futures.CancelledError()
            self.stats.count("cancelled")
        return bool(queued)

    def fail_job(self, job: Job, error: BaseException, reason: str) -> Failure:
        """Fail a job: its queued tasks leave the queue; counted as ``failed_<reason>``."""
        for task in job.tasks:
            if task.queued:
                self.remove(task)
        if job.error is None:
            job.error = error
            self.stats.count(f"failed_{reason}")
        return (job, error)

    def fail(self, job: Job, error: BaseException) -> Failure | None:
        """Fail a job now (a driver's last resort); None if it had already failed."""
        if job.error is not None:
            return None
        return self.fail_job(job, error, "error")

    # ------------------------------------------------------------------ re-assignment

    def expire(self, now: float) -> list[Failure]:
        """Fail queued jobs that can no longer make their deadline while a batch overruns.

        The driver calls this from a timer while a batch runs (see :meth:`next_expiry`): a batch
        that runs past its prediction makes the device's free time unknown, and jobs waiting
        behind it must hear at (or before) their deadline that they will miss it.
        """
        if self.in_flight is None or not self.queue:
            return []
        if now >= self.busy_until:  # the batch runs past its prediction: its end is unknown
            self.overrun = True
            self.busy_until = now
        failures = self.doom_certain(now) if self.policy.refuse_late else []
        return failures + self.policy.replan(now)

    def doom_certain(self, now: float) -> list[Failure]:
        """Fail every queued job that would miss its deadline even if it started alone now."""
        start_us = time_us(self.start(now))
        late = (self.deadlines_us < start_us + self.typical_us(self.cheapest_us)) & ~self.lenient
        doomed = {id(self.queue[i].job): self.queue[i] for i in np.flatnonzero(late).tolist()}
        failures = []
        for task in doomed.values():  # a job of several chunks fails once, all its chunks with it
            if task.job.error is None:
                error = self.deadline_error(task.job, now, task.lat[0])
                failures.append(self.fail_job(task.job, error, "doomed"))
        return failures

    def next_expiry(self) -> float | None:
        """When :meth:`expire` should next run (None: nothing runs, or nothing can expire).

        The running batch's predicted end (if it has not passed), and the first moment a queued
        job could no longer make its deadline even alone: a stalled batch never holds a caller
        past its deadline.
        """
        if self.in_flight is None or not self.queue:
            return None
        if not self.policy.refuse_late:  # such a policy serves late jobs: nothing expires
            return None if self.overrun else self.busy_until
        latest = (self.deadlines_us - self.typical_us(self.cheapest_us))[
            ~self.lenient & (self.deadlines_us < NO_DEADLINE_US)
        ]
        times = [float(latest.min()) / 1e6] if len(latest) else []
        if not self.overrun:
            times.append(self.busy_until)
        return min(times) if times else None

    def apply_pending_improvement(self, now: float) -> list[Failure]:
        """Called by the driver (under its lock) once an asynchronous solve has returned."""
        return self.policy.solved(now)

    def solver_gone(self) -> None:
        """The driver can no longer run asynchronous solves (it is closing)."""
        self.solve_async = None
        self.policy.solved(-math.inf)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> tuple[Batch | None, list[Failure]]:
        """Take the next batch for the executor (the policy binds its options here)."""
        before = list(self.queue)
        try:
            tasks, failures = self.policy.dispatch(now)
        except Exception:  # the tasks the policy took out would resolve nowhere: fail them, re-raise
            for task in before:
                if not task.queued and task.job.error is None:
                    self.fail_job(task.job, ShutdownError("the scheduling policy failed"), "error")
            raise
        if not tasks:
            return None, failures
        return self._launch(tasks, now), failures

    def _launch(self, tasks: list[Task], now: float) -> Batch:
        """Mark ``tasks`` as running from ``now`` and describe them as one batch."""
        merged_latency = self.merged_latency_us(tasks)
        if len(tasks) == 1:
            merged = tasks[0].strategy
        else:
            cost = tasks[0].job.cost or self.cost
            order = execution_order(list(merged_groups(tasks).items()), cost.modalities)
            merged = Strategy(order, cost.latency_us(order), cost.accuracy_units(order))
            self.stats.count("batches_merged")
            self.stats.count("jobs_in_merged_batches", len(tasks))
        batch = Batch(tuple(tasks), tuple(t.strategy for t in tasks), merged, merged_latency, now)
        for task in tasks:
            job = task.job
            if math.isnan(job.started):
                job.started = now
                self.stats.observe("queue_wait", (now - job.arrival) * 1000.0)
            job.predicted_us += merged_latency
        self.in_flight = batch
        self.busy_until = now + merged_latency / 1e6
        self.policy.observe_launch(batch, now)
        return batch

    # ------------------------------------------------------------------ completion

    def complete(
        self,
        batch: Batch,
        now: float,
        measured_us: float,
        parts_us: Mapping[str, float] | None = None,
        errors: Mapping[int, BaseException] | None = None,
    ) -> tuple[list[Job], list[Failure]]:
        """Record the end of a batch; returns the jobs now finished and the jobs failed.

        Args:
            batch: what :meth:`dispatch` returned.
            now: completion time.
            measured_us: measured execution time of the batch.
            parts_us: measured time per branch and ``"fusion"``, when the executor has it.
            errors: task position in the batch -> the exception that task's execution raised.
        """
        if self.in_flight is batch:
            self.in_flight = None
            self.busy_until = now
            self.overrun = False
        if not errors:
            self._correct(batch, measured_us, parts_us)
        done: list[Job] = []
        failures: list[Failure] = []
        for position, task in enumerate(batch.tasks):
            job = task.job
            job.measured_us += measured_us
            error = (errors or {}).get(position)
            if error is not None:
                if job.error is None:
                    failures.append(self.fail_job(job, error, "error"))
                continue
            job.pending -= 1
            if job.pending == 0 and job.error is None:
                job.finished = now
                served: dict[str, int] = {}
                for t in job.tasks:
                    for config, count in t.strategy.groups:
                        key = self._key(config)
                        served[key] = served.get(key, 0) + count
                self.stats.job_done(now <= job.deadline, (now - job.arrival) * 1000.0, served)
                self._record_served(job)
                done.append(job)
        failures += self.policy.replan(now)
        return done, failures

    def settled(self, batch: Batch, now: float) -> None:
        """The batch's results have been handed over: its dispatch overhead is now known.

        The overhead is the batch's time from dispatch to hand-over less its measured
        execution (taking the batch, assembling and delivering outputs, thread hand-offs); the
        tail model adds it to every price.
        """
        if self._measured is None or self._measured[0] is not batch:
            return
        _, measured_us, corrected, raw = self._measured
        self._measured = None
        overhead_us = max((now - batch.started) * 1e6 - measured_us, 0.0)
        if self.tail.observe(measured_us / corrected, measured_us / raw, overhead_us, batch.started):
            self._reprice()

    def _correct(self, batch: Batch, measured_us: float, parts_us: Mapping[str, float] | None) -> None:
        alpha = self.config.correction_alpha
        job = batch.tasks[0].job
        predicted = self._parts.get((batch.merged.groups, job.bucket))
        if predicted is None:
            cost = job.cost or self.cost
            rows = dict.fromkeys(cost.modalities, 0)
            fusion = 0
            for config, count in batch.merged.groups:
                fusion += cost.fusion_us[config][count]
                for m in config:
                    rows[m] += count
            predicted = {m: cost.branch_us[m][k] for m, k in rows.items() if k} | {"fusion": fusion}
            self._parts[(batch.merged.groups, job.bucket)] = predicted
        raw = sum(predicted.values())
        if raw > 0:
            corrected = sum(self.correction[p] * v for p, v in predicted.items())
            self._measured = (batch, measured_us, corrected, raw)
        if parts_us is None:
            total = sum(predicted.values())
            parts_us = {p: measured_us * v / total for p, v in predicted.items()} if total else {}
        for part, value in predicted.items():
            measured = parts_us.get(part)
            if value > 0 and measured is not None and math.isfinite(measured):
                # One stall (a page fault, a preempted thread) must not swing predictions: each
                # measurement is clamped to a factor of the current level, so the step is bounded
                # but a lasting change of any size is followed.
                self._measured_parts.add(part)
                level = self.correction[part]
                ratio = min(max(measured / value, level / CORRECTION_CLAMP), level * CORRECTION_CLAMP)
                self.correction[part] = min(max((1 - alpha) * level + alpha * ratio, 1e-3), 1e6)
        if any(abs(self.correction[p] / self._published[p] - 1) > 0.02 for p in predicted):
            self._published = dict(self.correction)
            self.stats.set_correction(self.correction)
            self._reprice()

    def _reprice(self) -> None:
        """Option latencies moved (correction or tail): re-read them everywhere."""
        self.version += 1
        self._latency_cache.clear()
        self._refresh_queue()

    def close(self, cancel: bool) -> list[Failure]:
        """Stop admitting; with ``cancel``, fail every queued job with :class:`ShutdownError`."""
        self.closed = True
        if not cancel:
            return []
        failures = []
        for task in list(self.queue):
            if task.queued and task.job.error is None:
                failures.append(
                    self.fail_job(
                        task.job,
                        ShutdownError("the model's scheduler was closed before this job ran"),
                        "shutdown",
                    )
                )
        return failures


class BatchLatency:
    """The corrected latency of a batch being formed, one task at a time, without building it.

    Rows per modality and per configuration are kept as running sums, so the latency of "this
    batch plus one more task" costs a few table lookups (the same arithmetic as
    :meth:`Scheduler.corrected_latency_us`).
    """

    __slots__ = ("core", "cost", "counts", "rows")

    def __init__(self, core: Scheduler, cost: CostModel | None = None) -> None:
        self.core = core
        self.cost = cost or core.cost
        self.rows = dict.fromkeys(core.cost.modalities, 0)
        self.counts: dict[Configuration, int] = {}

    def clear(self, cost: CostModel | None = None) -> None:
        """Empty the batch (for jobs of the size bucket of ``cost``, default the reference)."""
        self.cost = cost or self.core.cost
        for m in self.rows:
            self.rows[m] = 0
        self.counts.clear()

    def add(self, strategy: Strategy) -> None:
        """Put a task's rows, at ``strategy``, into the batch."""
        for config, count in strategy.groups:
            self.counts[config] = self.counts.get(config, 0) + count
            for m in config:
                self.rows[m] += count

    def with_(self, strategy: Strategy) -> int:
        """The batch's corrected latency if a task at ``strategy`` joined it (the batch is unchanged)."""
        self.add(strategy)
        latency = self.latency_us()
        for config, count in strategy.groups:
            self.counts[config] -= count
            for m in config:
                self.rows[m] -= count
        return latency

    def latency_us(self) -> int:
        """The batch's corrected latency."""
        cost = self.cost
        correction = self.core.correction
        total = correction["fusion"] * sum(cost.fusion_us[c][k] for c, k in self.counts.items() if k)
        for m, k in self.rows.items():
            if k:
                total += correction[m] * cost.branch_us[m][k]
        return self.core.tail.price(total)


def merged_groups(tasks: Sequence[Task]) -> dict[Configuration, int]:
    """Rows per configuration over ``tasks`` at their current options."""
    groups: dict[Configuration, int] = {}
    for task in tasks:
        for config, count in task.strategy.groups:
            groups[config] = groups.get(config, 0) + count
    return groups


def chunk_sizes(n: int, max_batch_size: int) -> list[int]:
    """The near-equal chunks a job of ``n`` rows is split into (each at most ``max_batch_size``)."""
    parts = -(-n // max_batch_size)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
