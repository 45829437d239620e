"""The online stage: an earliest-deadline-first queue with late binding and re-assignment.

This module holds the scheduling *logic* only. It never sleeps, starts threads, touches tensors or
resolves futures: a driver calls :meth:`Scheduler.admit`, :meth:`Scheduler.dispatch` and
:meth:`Scheduler.complete` under its own lock and with its own clock. The threaded driver
(``mosel.server``) and the simulator (``mosel.simulate``) run this same code.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from mosel.assign import Item, cpsat_assign, greedy_repair, step_down
from mosel.errors import AccuracyUnreachableError, DeadlineError, InputError, QueueFullError, ShutdownError
from mosel.plan import ACCURACY_SCALE, CostModel, Frontier, Strategy, configuration_key, execution_order
from mosel.profiles import Profile
from mosel.stats import Stats

__all__ = ["Batch", "Job", "Policy", "Scheduler", "SchedulerConfig", "Task"]

Configuration = frozenset[str]
Policy = Literal["mosel", "greedy", "aggressive", "agnostic", "batcher"]
_ALL_MODALITIES: Final = ("agnostic", "batcher")
NO_DEADLINE_US: Final = 2**62
CORRECTION_CLAMP: Final = 4.0
"""A single measurement counts as at most this factor above or below the current correction."""
_log = logging.getLogger("mosel")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Knobs of the online stage.

    Attributes:
        policy: ``"mosel"`` (greedy at once, CP-SAT improvement), ``"greedy"`` (no CP-SAT),
            ``"aggressive"`` (cheapest admissible strategy on any predicted miss), ``"batcher"``
            (FIFO dynamic batching, every modality, never drops: Triton or Ray Serve style), ``"agnostic"``
            (always every modality, EDF: the paper's baseline).
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
        solver_window: CP-SAT re-assigns at most this many queued tasks at the head of the
            queue (the jobs behind them keep their slack), so that a solve's model building stays
            bounded however long the queue.

    ``hedge``, ``risk`` and ``reserve`` apply to the mosel and greedy policies: they trade a
    little accuracy for deadlines that late binding alone, which sees only the queue, would miss.
    """

    policy: Policy = "mosel"
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

    def __post_init__(self) -> None:
        if self.policy not in ("mosel", "greedy", "aggressive", "agnostic", "batcher"):
            raise ValueError(
                f"policy must be mosel, greedy, aggressive, agnostic or batcher, got {self.policy!r}"
            )
        if self.max_queued_requests < 1 or self.max_merge < 1 or self.solver_window < 1:
            raise ValueError("max_queued_requests, max_merge and solver_window must be at least 1")
        if not 0.0 < self.correction_alpha <= 1.0:
            raise ValueError(f"correction_alpha must be in (0, 1], got {self.correction_alpha}")
        for name in ("hedge", "risk", "reserve"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be at least 0 (0 disables it), got {getattr(self, name)}")
        if not 0.0 < self.solver_share <= 1.0:
            raise ValueError(f"solver_share must be in (0, 1], got {self.solver_share}")
        if not self.load_window_s > 0.0:
            raise ValueError(f"load_window_s must be positive, got {self.load_window_s}")


class Job:
    """The requests of one call: one deadline, one floor, one or more tasks (chunks)."""

    __slots__ = (
        "arrival", "available", "best_effort", "deadline", "deadline_ms", "error", "finished", "id",
        "inputs", "measured_us", "min_accuracy", "n", "outputs", "payload", "pending", "predicted_us",
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
    ) -> None:
        self.id = next(_ids)
        self.n = n
        self.available = available
        self.arrival = arrival
        self.deadline_ms = deadline_ms
        self.deadline = math.inf if deadline_ms is None else arrival + deadline_ms / 1000.0
        self.min_accuracy = min_accuracy
        self.best_effort = best_effort
        self.inputs = inputs
        self.payload = payload
        self.tasks: list[Task] = []
        self.pending = 0
        self.outputs: list[Any] = []
        self.started = math.nan
        self.finished = math.nan
        self.predicted_us = 0
        self.measured_us = 0.0
        self.error: BaseException | None = None

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
        self.key = (job.deadline, job.id * 1024 + index)  # EDF: deadline, then arrival order
        self.lat: tuple[int, ...] = ()
        self.acc: tuple[int, ...] = ()
        self.version = -1
        self.queued = False

    @property
    def strategy(self) -> Strategy:
        """The currently chosen strategy."""
        return self.fixed if self.fixed is not None else self.frontier.strategies[self.first + self.k]

    @property
    def item(self) -> Item:
        """The task as the assignment solvers see it."""
        return Item(self.lat, self.acc, deadline_us(self.job))


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
IntArray = npt.NDArray[np.int64]


class Scheduler:
    """EDF queue, late binding, violation prediction and strategy re-assignment for one model.

    The queue is a list of tasks in EDF order with parallel numpy arrays (each task's current
    latency, deadline and cheapest latency), so that predicting every queued job's finish is one
    cumulative sum, whatever the queue length.
    """

    def __init__(
        self,
        profile: Profile,
        config: SchedulerConfig | None = None,
        stats: Stats | None = None,
        solve_async: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or SchedulerConfig()
        self.stats = stats or Stats()
        self.cost: CostModel = profile.cost_model()
        self.queue: list[Task] = []
        self._keys: list[tuple[float, int]] = []
        self._lat: IntArray = np.zeros(0, dtype=np.int64)  # current option's latency, queue order
        self._dl: IntArray = np.zeros(0, dtype=np.int64)  # deadline
        self._low: IntArray = np.zeros(0, dtype=np.int64)  # cheapest admissible option's latency
        self._save: IntArray = np.zeros(0, dtype=np.int64)  # what the next step down saves (us)
        self._loss: IntArray = np.zeros(0, dtype=np.int64)  # and loses (accuracy units)
        self._lenient: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)  # best effort: never failed
        self.in_flight: Batch | None = None
        self.busy_until = -math.inf
        self.queued_requests = 0
        self.closed = False
        self.correction: dict[str, float] = dict.fromkeys((*profile.modalities, "fusion"), 1.0)
        self._version = 0
        self._published = dict(self.correction)
        self._latency_cache: dict[tuple[Configuration, int], tuple[int, ...]] = {}
        self._solve_async = solve_async
        self._solving = False
        self._resolve = False
        self._solver_rest_until = -math.inf  # solver_share: no asynchronous solve before this
        self._solver_backoff = 1.0  # doubles after each solve that did not improve on greedy
        self._full_strategies: dict[tuple[Configuration, int], Strategy] = {}
        self._keys_text: dict[Configuration, str] = {}
        self._headroom_us = 0.0  # EWMA over arrivals: deadline - arrival - cheapest latency
        self._waiting = 0.0  # EWMA over dispatches: tasks left waiting behind the dispatched one
        self._work = 0.0  # cheapest-strategy seconds arriving per second, decaying over load_window_s
        self._busy_arrivals = 0.0  # arrivals that found a batch running, same decay
        self._busy_s = 0.0  # time spent running batches, same decay
        self._rate_at = 0.0
        self._headroom_low_us = 0.0  # a low quantile of arrivals' headroom
        self._parts: dict[tuple[tuple[Configuration, int], ...], dict[str, int]] = {}
        self._pending_improvement: tuple[list[Task], int, list[int] | None, float] | None = None
        self.stats.set_correction(self.correction)

    # ------------------------------------------------------------------ predictions

    def corrected_latency_us(self, groups: Sequence[tuple[Configuration, int]]) -> int:
        """Predicted latency of a strategy with the online correction applied."""
        rows = dict.fromkeys(self.cost.modalities, 0)
        fusion = 0
        for config, count in groups:
            fusion += self.cost.fusion_us[config][count]
            for m in config:
                rows[m] += count
        total = self.correction["fusion"] * fusion
        for m, k in rows.items():
            total += self.correction[m] * self.cost.branch_us[m][k]
        return math.ceil(total)

    def _latencies(self, frontier: Frontier) -> tuple[int, ...]:
        key = (frontier.available, frontier.n)
        cached = self._latency_cache.get(key)
        if cached is None:
            cached = tuple(self.corrected_latency_us(s.groups) for s in frontier.strategies)
            self._latency_cache[key] = cached
        return cached

    def _refresh(self, task: Task) -> None:
        """Bring the task's option latencies up to date with the correction."""
        if task.version == self._version:
            return
        if task.fixed is not None:
            key = (task.fixed.groups[0][0], -task.n)
            if key not in self._latency_cache:
                self._latency_cache[key] = (self.corrected_latency_us(task.fixed.groups),)
            task.lat = self._latency_cache[key]
            task.acc = (task.fixed.accuracy_units,)
        else:
            task.lat = self._latencies(task.frontier)[task.first :]
            task.acc = tuple(s.accuracy_units for s in task.frontier.strategies[task.first :])
        task.version = self._version

    def _item(self, task: Task) -> Item:
        self._refresh(task)
        return task.item

    def _key(self, config: Configuration) -> str:
        key = self._keys_text.get(config)
        if key is None:
            key = self._keys_text[config] = configuration_key(config, self.cost.modalities)
        return key

    def _start(self, now: float) -> float:
        return max(now, self.busy_until)

    def _finishes(self, now: float) -> IntArray:
        """Predicted finish of every queued task (absolute microseconds), queue order."""
        finish: IntArray = int(self._start(now) * 1e6) + np.cumsum(self._lat)
        return finish

    # ------------------------------------------------------------------ the queue

    def _position(self, task: Task) -> int:
        i = bisect.bisect_left(self._keys, task.key)
        assert self.queue[i] is task
        return i

    def _insert(self, task: Task) -> None:
        self._refresh(task)
        i = bisect.bisect(self._keys, task.key)
        self._keys.insert(i, task.key)
        self.queue.insert(i, task)
        self._lat = np.insert(self._lat, i, task.lat[task.k])
        self._dl = np.insert(self._dl, i, deadline_us(task.job))
        self._low = np.insert(self._low, i, task.lat[0])
        _, saved, lost = step_down(task.lat, task.acc, task.k)
        self._save = np.insert(self._save, i, saved)
        self._loss = np.insert(self._loss, i, lost)
        self._lenient = np.insert(self._lenient, i, task.job.best_effort)
        task.queued = True
        self.queued_requests += task.n

    def _remove(self, task: Task) -> None:
        i = self._position(task)
        del self.queue[i]
        del self._keys[i]
        self._lat = np.delete(self._lat, i)
        self._dl = np.delete(self._dl, i)
        self._low = np.delete(self._low, i)
        self._save = np.delete(self._save, i)
        self._loss = np.delete(self._loss, i)
        self._lenient = np.delete(self._lenient, i)
        task.queued = False
        self.queued_requests -= task.n

    def _set_k(self, task: Task, k: int, position: int | None = None) -> None:
        task.k = k
        if task.queued:
            i = self._position(task) if position is None else position
            self._lat[i] = task.lat[k]
            _, self._save[i], self._loss[i] = step_down(task.lat, task.acc, k)

    def _refresh_queue(self) -> None:
        """Re-read every queued task's latencies after the correction changed."""
        for i, task in enumerate(self.queue):
            self._refresh(task)
            self._lat[i] = task.lat[task.k]
            self._low[i] = task.lat[0]
            _, self._save[i], self._loss[i] = step_down(task.lat, task.acc, task.k)

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
                (unless ``best_effort``).

        Returns:
            Other jobs failed because re-assignment found them doomed.
        """
        self._prepare(job, now)
        for task in job.tasks:
            self._insert(task)
        return self._replan(now)

    def start_alone(self, job: Job, now: float) -> Batch | None:
        """Admit a job and dispatch it at once when the device is idle and nothing waits.

        The same admission as :meth:`admit` (same errors) and the same choice as :meth:`dispatch`
        would make for a lone job, without queueing it. Returns None, and changes nothing, when
        the device is busy, jobs are waiting, or the job needs several batches.
        """
        if self.in_flight is not None or self.queue or job.n > self.profile.max_batch_size:
            return None
        self._prepare(job, now)
        self._hedge(job.tasks, now)
        return self._launch(job.tasks, now)

    def prepare_inline(self, job: Job, now: float) -> None:
        """Admit a job that runs at once outside the queue (a call from inside a running batch).

        The same checks and choice as for a lone job on an idle device; the queue, the running
        batch and the hedges' estimates are left alone.
        """
        self._prepare(job, now, observe=False)
        for task in job.tasks:
            self._refresh(task)
            if task.lat[task.k] > (job.deadline - now) * 1e6:
                task.k = 0

    def fail(self, job: Job, error: BaseException) -> Failure | None:
        """Fail a job now (a driver's last resort); None if it had already failed."""
        if job.error is not None:
            return None
        return self._fail_job(job, error, "error")

    def solver_gone(self) -> None:
        """The driver can no longer run asynchronous solves (it is closing)."""
        self._solving = False

    def _prepare(self, job: Job, now: float, observe: bool = True) -> None:
        """Admission checks; creates the job's tasks with their initial strategies."""
        if self.closed:
            raise ShutdownError("the model's scheduler is closed; no new jobs are accepted")
        self.stats.count("submitted")
        limit = self.config.max_queued_requests
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
        plan = self.profile.plan
        sizes = [job.n] if job.n <= plan.max_batch_size else _chunks(job.n, plan.max_batch_size)
        no_slo = job.deadline_ms is None and job.min_accuracy is None
        every = self.config.policy in _ALL_MODALITIES or no_slo
        offset = 0
        tasks = []
        for index, size in enumerate(sizes):
            frontier = plan.frontier(job.available, size)
            floor = floor_units(job.min_accuracy, size)
            first = frontier.index_meeting(floor)
            task = Task(job, index, offset, size, frontier, min(first, len(frontier.strategies) - 1))
            if every:
                task.fixed = self._full(job.available, size)
            reachable = task.fixed.accuracy_units if task.fixed is not None else frontier.best.accuracy_units
            if reachable < floor:
                self.stats.count("rejected_accuracy")
                how = (
                    f"with every modality of {sorted(job.available)} (policy {self.config.policy!r} "
                    f"computes them all)"
                    if task.fixed is not None
                    else f"with modalities {sorted(job.available)}"
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
            if self.config.policy == "batcher":
                task.key = (job.arrival, task.key[1])  # FIFO
            self._refresh(task)
            task.k = self._initial_option(task, now, share)
        cheapest_us = sum(t.lat[0] for t in tasks)
        late = now * 1e6 + cheapest_us > job.deadline * 1e6
        if late and not job.best_effort and self.config.policy != "batcher":
            self.stats.count("rejected_deadline")
            raise self._deadline_error(job, now, cheapest_us)
        # Only accepted jobs inform the hedges: refused ones never load the device.
        if observe:
            self._observe_arrival(job, now, cheapest_us)
        job.pending = len(tasks)

    def _observe_arrival(self, job: Job, now: float, cheapest_us: int) -> None:
        """Update what the hedges know of arrivals: headroom, rate and work."""
        if not math.isinf(job.deadline):
            headroom = (job.deadline - now) * 1e6 - cheapest_us
            self._headroom_us = (
                headroom if self._headroom_us == 0.0 else 0.9 * self._headroom_us + 0.1 * headroom
            )
            low = self._headroom_low_us  # tracks a low quantile: quick down, slow up
            self._headroom_low_us = (
                headroom if low == 0.0 else low + (headroom - low) * (0.2 if headroom < low else 0.01)
            )
        self._decay_to(now)
        self._work += cheapest_us / 1e6 / self.config.load_window_s
        if self.in_flight is not None:
            self._busy_arrivals += 1.0

    def _initial_option(self, task: Task, now: float, share: float) -> int:
        """The most accurate option meeting the job's own deadline (aggressive: the cheapest)."""
        job = task.job
        top = len(task.lat) - 1
        if self.config.policy == "aggressive":
            return 0
        if math.isinf(job.deadline):
            return top
        k = bisect.bisect_right(task.lat, (job.deadline - now) * 1e6 * share) - 1
        return max(k, 0)

    def _full(self, available: Configuration, n: int) -> Strategy:
        """Every available modality for every request (need not be on the frontier)."""
        key = (available, n)
        strategy = self._full_strategies.get(key)
        if strategy is None:
            groups = ((available, n),)
            strategy = Strategy(groups, self.cost.latency_us(groups), self.cost.accuracy_units(groups))
            self._full_strategies[key] = strategy
        return strategy

    def _deadline_error(self, job: Job, now: float, predicted_us: int) -> DeadlineError:
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
            self._remove(task)
        if job.error is None:
            job.error = concurrent.futures.CancelledError()
            self.stats.count("cancelled")
        return bool(queued)

    def _fail_job(self, job: Job, error: BaseException, reason: str) -> Failure:
        for task in job.tasks:
            if task.queued:
                self._remove(task)
        if job.error is None:
            job.error = error
            self.stats.count(f"failed_{reason}")
        return (job, error)

    # ------------------------------------------------------------------ re-assignment

    def _replan(self, now: float) -> list[Failure]:
        """Predict finishes; on a predicted miss, re-assign the queued prefix up to the last one."""
        policy = self.config.policy
        if not self.queue or policy in _ALL_MODALITIES:
            return []
        start_us = int(self._start(now) * 1e6)
        finish = start_us + np.cumsum(self._lat)
        late = np.flatnonzero(finish > self._dl)
        if not len(late):
            return []
        self.stats.count("violations_predicted")
        end = int(late[-1]) + 1
        if policy == "aggressive":
            for i, task in enumerate(self.queue[:end]):
                if task.k:
                    self._set_k(task, 0, i)
        queue = self.queue

        def take(i: int) -> tuple[int, int]:
            task = queue[i]
            self._set_k(task, step_down(task.lat, task.acc, task.k)[0], i)
            return int(self._save[i]), int(self._loss[i])

        _, doomed = greedy_repair(
            self._lat, self._dl, self._low, self._save, self._loss, start_us, take, limit=end
        )
        self.stats.count("greedy_assignments")
        failures = []
        doomed_tasks = [(queue[i], int(finish[i])) for i in doomed]
        for task, predicted in doomed_tasks:
            job = task.job
            if job.best_effort:
                self._set_k(task, 0)
                continue
            if job.error is None:
                failures.append(
                    self._fail_job(job, self._deadline_error(job, now, predicted - int(now * 1e6)), "doomed")
                )
        if policy == "mosel":
            self._request_improvement(now)
        return failures

    def expire(self, now: float) -> list[Failure]:
        """Fail queued jobs that can no longer make their deadline while a batch overruns.

        The driver calls this from a timer while a batch runs (see :meth:`next_expiry`): a batch
        that runs past its prediction makes the device's free time unknown, and jobs waiting
        behind it must hear at (or before) their deadline that they will miss it.
        """
        if self.in_flight is None or not self.queue:
            return []
        self.busy_until = max(self.busy_until, now)  # at least: the batch is still running
        return self._replan(now)

    def next_expiry(self) -> float | None:
        """When :meth:`expire` should next run (None: nothing runs, or nothing can expire).

        That is the first moment a queued job would be doomed if the running batch went on.
        """
        if self.in_flight is None or not self.queue:
            return None
        latest = self._dl - np.cumsum(self._low)
        latest = latest[~self._lenient & (self._dl < NO_DEADLINE_US)]
        if not len(latest):
            return None
        return max(float(latest.min()) / 1e6, self.busy_until)

    def _request_improvement(self, now: float) -> None:
        if self._solve_async is None and not self.config.deterministic:
            return
        if self._solving:
            self._resolve = True
            return
        if now < self._solver_rest_until:
            self.stats.count("solver_rested")
            return
        finite = np.flatnonzero(self._dl < NO_DEADLINE_US)
        if not len(finite):
            return
        end = min(int(finite[-1]) + 1, self.config.solver_window)
        start_us = int(self._start(now) * 1e6)
        finish = start_us + np.cumsum(self._lat)
        budget = None
        if end < len(self.queue):  # jobs behind the window keep their slack
            budget = int(finish[end - 1] - start_us + max(0, int((self._dl[end:] - finish[end:]).min())))
        snapshot = self.queue[:end]
        items = [t.item for t in snapshot]
        hint = [t.k for t in snapshot]
        version = self._version

        def solve() -> tuple[list[int] | None, float]:
            started = time.perf_counter()
            ks, _ = cpsat_assign(
                items,
                start_us,
                hint,
                time_limit_s=self.config.solver_time_limit_s,
                deterministic=self.config.deterministic,
                budget_us=budget,
            )
            return ks, (time.perf_counter() - started) * 1000.0

        if self.config.deterministic:
            ks, elapsed_ms = solve()
            self._finish_improvement(snapshot, version, ks, elapsed_ms, now)
            return
        assert self._solve_async is not None
        self._solving = True

        def run() -> None:
            ks, elapsed_ms = solve()
            self._pending_improvement = (snapshot, version, ks, elapsed_ms)

        self._solve_async(run)

    def apply_pending_improvement(self, now: float) -> list[Failure]:
        """Called by the driver (under its lock) once an asynchronous solve has returned."""
        pending, self._pending_improvement = self._pending_improvement, None
        self._solving = False
        if pending is not None:
            self._finish_improvement(*pending, now)
            rest_ms = pending[3] * (1.0 / self.config.solver_share - 1.0) * self._solver_backoff
            self._solver_rest_until = now + rest_ms / 1000.0
        if self._resolve:
            self._resolve = False
            return self._replan(now)
        return []

    def _finish_improvement(
        self, snapshot: list[Task], version: int, ks: list[int] | None, elapsed_ms: float, now: float
    ) -> None:
        self.stats.observe("solver", elapsed_ms)
        if ks is None:
            self.stats.count("solver_no_answer")
            return
        # Valid only if the queue still starts with exactly these tasks and every deadline holds now.
        end = len(snapshot)
        if version != self._version or self.queue[:end] != snapshot:
            self.stats.count("solver_stale")
            return
        latency = self._lat.copy()
        latency[:end] = [t.lat[k] for t, k in zip(snapshot, ks)]
        finish = int(self._start(now) * 1e6) + np.cumsum(latency)
        if (finish > self._dl).any():
            self.stats.count("solver_stale")
            return
        if sum(t.acc[k] for t, k in zip(snapshot, ks)) > sum(t.acc[t.k] for t in snapshot):
            for i, (task, k) in enumerate(zip(snapshot, ks)):
                self._set_k(task, k, i)
            self.stats.count("solver_improved")
            self._solver_backoff = 1.0
        else:
            self._solver_backoff = min(64.0, 2.0 * self._solver_backoff)
            self.stats.count("solver_confirmed")

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> tuple[Batch | None, list[Failure]]:
        """Take the next batch for the executor (late binding happens here)."""
        failures: list[Failure] = []
        policy = self.config.policy
        now_us = int(now * 1e6)
        while self.queue:
            head = self.queue[0]
            top = len(head.lat) - 1
            if policy in ("mosel", "greedy") and head.k < top:
                finish = now_us + np.cumsum(self._lat)
                slack = int((self._dl - finish).min())
                extra = head.lat[head.k] + slack
                self._set_k(head, max(head.k, bisect.bisect_right(head.lat, extra) - 1), 0)
            finish_us = now_us + head.lat[head.k]
            deadline = int(self._dl[0])
            if finish_us > deadline and not head.job.best_effort and policy != "batcher":
                if policy != "agnostic":
                    fits = bisect.bisect_right(head.lat, deadline - now_us) - 1
                    if fits >= 0:
                        self._set_k(head, fits, 0)
                        break
                failures.append(
                    self._fail_job(head.job, self._deadline_error(head.job, now, head.lat[0]), "late")
                )
                continue
            if finish_us > deadline and policy not in _ALL_MODALITIES:  # best effort: late, fast
                self._set_k(head, 0, 0)
            break
        if not self.queue:
            return None, failures
        self._waiting = 0.9 * self._waiting + 0.1 * (len(self.queue) - 1)
        tasks = [self.queue[0]]
        self._remove(tasks[0])
        if self.config.batching:
            limit = self.profile.max_batch_size
            separate = tasks[0].lat[tasks[0].k]
            rows = tasks[0].n
            while self.queue and len(tasks) < self.config.max_merge:
                nxt = self.queue[0]
                if nxt.frontier.available != tasks[0].frontier.available or rows + nxt.n > limit:
                    break
                latency = self._merged_latency_us([*tasks, nxt])
                alone = nxt.lat[nxt.k]
                earliest_us = min(deadline_us(t.job) for t in [*tasks, nxt])
                helps = latency < separate + alone and now_us + latency <= earliest_us
                if not helps and policy != "batcher":  # a batcher batches regardless
                    break
                self._remove(nxt)
                tasks.append(nxt)
                separate += alone
                rows += nxt.n
        self._hedge(tasks, now)
        return self._launch(tasks, now), failures

    def _merged_latency_us(self, tasks: Sequence[Task]) -> int:
        if len(tasks) == 1:
            self._refresh(tasks[0])
            return tasks[0].lat[tasks[0].k]
        return self.corrected_latency_us(list(_merged_groups(tasks).items()))

    def _decay_to(self, now: float) -> None:
        """Age the recent-load sums to ``now`` (exponential decay over ``load_window_s``)."""
        if now > self._rate_at:
            decay = math.exp((self._rate_at - now) / self.config.load_window_s)
            self._work *= decay
            self._busy_arrivals *= decay
            self._busy_s *= decay
            self._rate_at = now

    def _hedge(self, tasks: list[Task], now: float) -> None:
        """Shorten the batch about to run so that work arriving meanwhile keeps its chance.

        Three caps on the batch's latency (mosel and greedy policies): a job arriving during the
        run must still fit in its headroom (``risk``); under load, the run takes at most ``hedge``
        of the typical headroom; every queued job must keep, beyond its cheapest strategy, the
        time that recent arrivals' work will take until its deadline (``reserve``).
        """
        if self.config.policy not in ("mosel", "greedy"):
            return
        self._decay_to(now)
        cap = math.inf
        # Arrivals per second of running: a lone caller waiting for each result never arrives
        # while its own job runs, so it is never hedged against itself.
        if self.config.risk > 0 and self._headroom_low_us > 0 and self._busy_arrivals > 0 < self._busy_s:
            rate = self._busy_arrivals / self._busy_s
            cap = self._headroom_low_us + self.config.risk / rate * 1e6
        if self.config.hedge > 0 and self._waiting >= 1.0:
            cap = min(cap, self.config.hedge * self._headroom_us)
        if self.config.reserve > 0 and self.queue:
            reserve = min(1.0, self.config.reserve * self._work)
            remaining = (self._dl - now * 1e6).astype(np.float64)
            ahead = np.cumsum(self._low)
            cap = min(cap, float((remaining * (1.0 - reserve) - ahead).min()))
        latency = self._merged_latency_us(tasks)
        if latency <= cap:
            return
        self.stats.count("hedged")
        if len(tasks) == 1:
            task = tasks[0]
            task.k = min(task.k, max(bisect.bisect_right(task.lat, cap) - 1, 0))
            return
        while latency > cap:
            excess = latency - cap
            while excess > 0:
                lowerable = [t for t in tasks if t.k > 0]
                if not lowerable:
                    return
                task = max(lowerable, key=self._step_value)
                excess -= task.lat[task.k] - task.lat[task.k - 1]
                task.k -= 1
            latency = self._merged_latency_us(tasks)

    def _step_value(self, task: Task) -> float:
        """Microseconds saved per accuracy unit lost by lowering ``task`` one option."""
        saved = task.lat[task.k] - task.lat[task.k - 1]
        return saved / max(1, task.acc[task.k] - task.acc[task.k - 1])

    def _launch(self, tasks: list[Task], now: float) -> Batch:
        """Mark ``tasks`` as running from ``now`` and describe them as one batch."""
        merged_latency = self._merged_latency_us(tasks)
        if len(tasks) == 1:
            merged = tasks[0].strategy
        else:
            order = execution_order(list(_merged_groups(tasks).items()), self.cost.modalities)
            merged = Strategy(order, self.cost.latency_us(order), self.cost.accuracy_units(order))
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
        self._decay_to(now)
        self._busy_s += merged_latency / 1e6
        self.busy_until = now + merged_latency / 1e6
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
                    failures.append(self._fail_job(job, error, "error"))
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
                done.append(job)
        failures += self._replan(now)
        return done, failures

    def _correct(self, batch: Batch, measured_us: float, parts_us: Mapping[str, float] | None) -> None:
        alpha = self.config.correction_alpha
        predicted = self._parts.get(batch.merged.groups)
        if predicted is None:
            rows = dict.fromkeys(self.cost.modalities, 0)
            fusion = 0
            for config, count in batch.merged.groups:
                fusion += self.cost.fusion_us[config][count]
                for m in config:
                    rows[m] += count
            predicted = {m: self.cost.branch_us[m][k] for m, k in rows.items() if k} | {"fusion": fusion}
            self._parts[batch.merged.groups] = predicted
        if parts_us is None:
            total = sum(predicted.values())
            parts_us = {p: measured_us * v / total for p, v in predicted.items()} if total else {}
        for part, value in predicted.items():
            measured = parts_us.get(part)
            if value > 0 and measured is not None and math.isfinite(measured):
                # One stall (a page fault, a preempted thread) must not swing predictions: each
                # measurement is clamped to a factor of the current level, so the step is bounded
                # but a lasting change of any size is followed.
                level = self.correction[part]
                ratio = min(max(measured / value, level / CORRECTION_CLAMP), level * CORRECTION_CLAMP)
                self.correction[part] = min(max((1 - alpha) * level + alpha * ratio, 1e-3), 1e6)
        if any(abs(self.correction[p] / self._published[p] - 1) > 0.02 for p in predicted):
            self._published = dict(self.correction)
            self._version += 1
            self._latency_cache.clear()
            self._refresh_queue()
            self.stats.set_correction(self.correction)

    def close(self, cancel: bool) -> list[Failure]:
        """Stop admitting; with ``cancel``, fail every queued job with :class:`ShutdownError`."""
        self.closed = True
        if not cancel:
            return []
        failures = []
        for task in list(self.queue):
            if task.queued and task.job.error is None:
                failures.append(
                    self._fail_job(
                        task.job,
                        ShutdownError("the model's scheduler was closed before this job ran"),
                        "shutdown",
                    )
                )
        return failures


def _merged_groups(tasks: Sequence[Task]) -> dict[Configuration, int]:
    """Rows per configuration over ``tasks``."""
    groups: dict[Configuration, int] = {}
    for task in tasks:
        for config, count in task.strategy.groups:
            groups[config] = groups.get(config, 0) + count
    return groups


def _chunks(n: int, max_batch_size: int) -> list[int]:
    parts = -(-n // max_batch_size)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
