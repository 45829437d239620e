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

from mosel.assign import Item, cpsat_assign, greedy_assign, total_accuracy, upgrade_head, violations
from mosel.errors import AccuracyUnreachableError, DeadlineError, QueueFullError, ShutdownError
from mosel.plan import ACCURACY_SCALE, CostModel, Frontier, Strategy, configuration_key, execution_order
from mosel.profiles import Profile
from mosel.stats import Stats

__all__ = ["Batch", "Job", "Policy", "Scheduler", "SchedulerConfig", "Task"]

Configuration = frozenset[str]
Policy = Literal["mosel", "greedy", "aggressive", "agnostic", "batcher"]
_ALL_MODALITIES: Final = ("agnostic", "batcher")
NO_DEADLINE_US: Final = 2**62
CORRECTION_CLAMP: Final = 4.0
"""A single measurement moves the latency correction by at most this factor (times alpha)."""
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

    def __post_init__(self) -> None:
        if self.policy not in ("mosel", "greedy", "aggressive", "agnostic", "batcher"):
            raise ValueError(
                f"policy must be mosel, greedy, aggressive, agnostic or batcher, got {self.policy!r}"
            )
        if self.max_queued_requests < 1 or self.max_merge < 1:
            raise ValueError("max_queued_requests and max_merge must be at least 1")
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
    """A chunk of a job (at most ``max_batch_size`` rows) and its admissible strategies."""

    __slots__ = ("first", "fixed", "frontier", "index", "item", "job", "k", "key", "n", "offset", "version")

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
        self.item: Item = Item((), (), 0)
        self.version = -1

    @property
    def strategy(self) -> Strategy:
        """The currently chosen strategy."""
        return self.fixed if self.fixed is not None else self.frontier.strategies[self.first + self.k]


@dataclass(frozen=True, slots=True)
class Batch:
    """What the executor runs next: one or more tasks, and the strategy covering all their rows."""

    tasks: tuple[Task, ...]
    strategies: tuple[Strategy, ...]  # per task
    merged: Strategy  # the rows of all tasks, grouped by configuration
    predicted_us: int
    started: float


Failure = tuple[Job, BaseException]


class Scheduler:
    """EDF queue, late binding, violation prediction and strategy re-assignment for one model."""

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

    def _item(self, task: Task) -> Item:
        if task.version != self._version:
            if task.fixed is not None:
                key = (task.fixed.groups[0][0], -task.n)
                if key not in self._latency_cache:
                    self._latency_cache[key] = (self.corrected_latency_us(task.fixed.groups),)
                lat: tuple[int, ...] = self._latency_cache[key]
                acc: tuple[int, ...] = (task.fixed.accuracy_units,)
            else:
                lat = self._latencies(task.frontier)[task.first :]
                acc = tuple(s.accuracy_units for s in task.frontier.strategies[task.first :])
            deadline = NO_DEADLINE_US if math.isinf(task.job.deadline) else int(task.job.deadline * 1e6)
            task.item = Item(lat, acc, deadline)
            task.version = self._version
        return task.item

    def _key(self, config: Configuration) -> str:
        key = self._keys_text.get(config)
        if key is None:
            key = self._keys_text[config] = configuration_key(config, self.cost.modalities)
        return key

    def _start(self, now: float) -> float:
        return max(now, self.busy_until)

    # ------------------------------------------------------------------ admission

    def admit(self, job: Job, now: float) -> list[Failure]:
        """Queue a job (split into tasks of at most ``max_batch_size`` rows).

        Raises:
            ShutdownError: the scheduler is closed.
            QueueFullError: admission control.
            AccuracyUnreachableError: the floor is above what the available modalities reach.
            DeadlineError: the job cannot make its deadline even alone at its cheapest strategy
                (unless ``best_effort``).

        Returns:
            Other jobs failed because re-assignment found them doomed.
        """
        self._prepare(job, now)
        for task in job.tasks:
            i = bisect.bisect(self._keys, task.key)
            self._keys.insert(i, task.key)
            self.queue.insert(i, task)
        self.queued_requests += job.n
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

    def _prepare(self, job: Job, now: float) -> None:
        """Admission checks; creates the job's tasks with their initial strategies."""
        if self.closed:
            raise ShutdownError("the model's scheduler is closed; no new jobs are accepted")
        self.stats.count("submitted")
        if self.queued_requests + job.n > self.config.max_queued_requests:
            self.stats.count("rejected_queue_full")
            raise QueueFullError(
                f"queue holds {self.queued_requests} request(s); admitting {job.n} more would exceed "
                f"max_queued_requests={self.config.max_queued_requests}; retry later or raise the limit"
            )
        plan = self.profile.plan
        sizes = [job.n] if job.n <= plan.max_batch_size else _chunks(job.n, plan.max_batch_size)
        floor = 0 if job.min_accuracy is None else round(job.min_accuracy * ACCURACY_SCALE)
        offset = 0
        tasks = []
        for index, size in enumerate(sizes):
            frontier = plan.frontier(job.available, size)
            first = frontier.index_meeting(floor * size)
            if first == len(frontier.strategies):
                self.stats.count("rejected_accuracy")
                raise AccuracyUnreachableError(
                    f"min_accuracy={job.min_accuracy} is above the best expected accuracy "
                    f"{frontier.best.expected_accuracy:.4f} reachable with modalities "
                    f"{sorted(job.available)}; lower the floor or send more modalities",
                    min_accuracy=float(job.min_accuracy or 0.0),
                    best_accuracy=frontier.best.expected_accuracy,
                )
            tasks.append(Task(job, index, offset, size, frontier, first))
            offset += size
        job.tasks = tasks
        share = 1.0 / len(sizes)
        every = self.config.policy in _ALL_MODALITIES or (
            job.deadline_ms is None and job.min_accuracy is None
        )
        for task in tasks:
            if self.config.policy == "batcher":
                task.key = (job.arrival, task.key[1])  # FIFO
            if every:
                task.fixed = self._full(job.available, task.n)
            task.k = self._initial_option(task, self._item(task), now, share)
        cheapest_us = sum(self._item(t).latency_us[0] for t in tasks)
        self._observe_arrival(job, now, cheapest_us)
        late = now * 1e6 + cheapest_us > job.deadline * 1e6
        if late and not job.best_effort and self.config.policy != "batcher":
            self.stats.count("rejected_deadline")
            raise self._deadline_error(job, now, cheapest_us)
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

    def _initial_option(self, task: Task, item: Item, now: float, share: float) -> int:
        """The most accurate option meeting the job's own deadline (aggressive: the cheapest)."""
        job = task.job
        top = len(item.latency_us) - 1
        if self.config.policy == "aggressive":
            return 0
        if math.isinf(job.deadline):
            return top
        k = bisect.bisect_right(item.latency_us, (job.deadline - now) * 1e6 * share) - 1
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
        queued = [t for t in job.tasks if t in self.queue]
        for task in queued:
            self._remove(task)
        if job.error is None:
            job.error = concurrent.futures.CancelledError()
            self.stats.count("cancelled")
        return bool(queued)

    def _remove(self, task: Task) -> None:
        i = self.queue.index(task)
        del self.queue[i]
        del self._keys[i]
        self.queued_requests -= task.n

    def _fail_job(self, job: Job, error: BaseException, reason: str) -> Failure:
        for task in job.tasks:
            if task in self.queue:
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
        items = [self._item(t) for t in self.queue]
        ks = [t.k for t in self.queue]
        start_us = int(self._start(now) * 1e6)
        late = violations(items, ks, start_us)
        if not late:
            return []
        self.stats.count("violations_predicted")
        end = late[-1] + 1
        prefix = self.queue[:end]
        if policy == "aggressive":
            ks = [0] * end
            new_ks, doomed = greedy_assign(items[:end], ks, start_us)
        else:
            new_ks, doomed = greedy_assign(items[:end], ks[:end], start_us)
        self.stats.count("greedy_assignments")
        for task, k in zip(prefix, new_ks):
            task.k = k
        failures = []
        for i in doomed:
            task = prefix[i]
            job = task.job
            if job.best_effort:
                task.k = 0
                continue
            if job.error is None:
                failures.append(
                    self._fail_job(
                        job, self._deadline_error(job, now, self._predicted_finish_us(task, now)), "doomed"
                    )
                )
        if policy == "mosel":
            self._request_improvement(now)
        return failures

    def _predicted_finish_us(self, task: Task, now: float) -> int:
        t = self._start(now) * 1e6
        for other in self.queue:
            t += self._item(other).latency_us[other.k]
            if other is task:
                break
        return int(t - now * 1e6)

    def _request_improvement(self, now: float) -> None:
        if self._solve_async is None and not self.config.deterministic:
            return
        if self._solving:
            self._resolve = True
            return
        if now < self._solver_rest_until:
            self.stats.count("solver_rested")
            return
        snapshot = list(self.queue)
        items = [self._item(t) for t in snapshot]
        hint = [t.k for t in snapshot]
        start_us = int(self._start(now) * 1e6)
        version = self._version
        end = max((i for i, it in enumerate(items) if it.deadline_us < NO_DEADLINE_US), default=-1) + 1
        if end == 0:
            return
        snapshot, items, hint = snapshot[:end], items[:end], hint[:end]

        def solve() -> tuple[list[int] | None, float]:
            started = time.perf_counter()
            ks, _ = cpsat_assign(
                items,
                start_us,
                hint,
                time_limit_s=self.config.solver_time_limit_s,
                deterministic=self.config.deterministic,
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
        if version != self._version or self.queue[: len(snapshot)] != snapshot:
            self.stats.count("solver_stale")
            return
        items = [self._item(t) for t in snapshot]
        current = [t.k for t in snapshot]
        if violations(items, ks, int(self._start(now) * 1e6)):
            self.stats.count("solver_stale")
            return
        if total_accuracy(items, ks) > total_accuracy(items, current):
            for task, k in zip(snapshot, ks):
                task.k = k
            self.stats.count("solver_improved")
            self._solver_backoff = 1.0
        else:
            self._solver_backoff = min(64.0, 2.0 * self._solver_backoff)
            self.stats.count("solver_confirmed")

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> tuple[Batch | None, list[Failure]]:
        """Take the next batch for the executor (late binding happens here)."""
        failures: list[Failure] = []
        while self.queue:
            head = self.queue[0]
            item = self._item(head)
            if self.config.policy in ("mosel", "greedy") and head.k < len(item.latency_us) - 1:
                items = [self._item(t) for t in self.queue]
                head.k = upgrade_head(items, [t.k for t in self.queue], int(now * 1e6))
            finish_us = now * 1e6 + item.latency_us[head.k]
            deadline_us = item.deadline_us
            if finish_us > deadline_us and not head.job.best_effort and self.config.policy != "batcher":
                if self.config.policy != "agnostic":
                    fits = bisect.bisect_right(item.latency_us, deadline_us - now * 1e6) - 1
                    if fits >= 0:
                        head.k = fits
                        break
                failures.append(
                    self._fail_job(head.job, self._deadline_error(head.job, now, item.latency_us[0]), "late")
                )
                continue
            if finish_us > deadline_us:  # best effort: serve late, as fast as admissible
                head.k = head.k if self.config.policy in _ALL_MODALITIES else 0
            break
        if not self.queue:
            return None, failures
        self._waiting = 0.9 * self._waiting + 0.1 * (len(self.queue) - 1)
        tasks = [self.queue[0]]
        self._remove(tasks[0])
        if self.config.batching:
            limit = self.profile.max_batch_size
            separate = self._item(tasks[0]).latency_us[tasks[0].k]
            while self.queue and len(tasks) < self.config.max_merge:
                nxt = self.queue[0]
                if (
                    nxt.frontier.available != tasks[0].frontier.available
                    or sum(t.n for t in tasks) + nxt.n > limit
                ):
                    break
                latency = self._merged_latency_us([*tasks, nxt])
                alone = self._item(nxt).latency_us[nxt.k]
                earliest_us = min(t.job.deadline for t in [*tasks, nxt]) * 1e6
                helps = latency < separate + alone and now * 1e6 + latency <= earliest_us
                if not helps and self.config.policy != "batcher":  # a batcher batches regardless
                    break
                self._remove(nxt)
                tasks.append(nxt)
                separate += alone
        self._hedge(tasks, now)
        return self._launch(tasks, now), failures

    def _merged_latency_us(self, tasks: Sequence[Task]) -> int:
        if len(tasks) == 1:
            return self._item(tasks[0]).latency_us[tasks[0].k]
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
            now_us, ahead = now * 1e6, 0
            for other in self.queue:
                item = self._item(other)
                ahead += item.latency_us[0]
                cap = min(cap, item.deadline_us - now_us - ahead - reserve * (item.deadline_us - now_us))
        latency = self._merged_latency_us(tasks)
        if latency <= cap:
            return
        self.stats.count("hedged")
        if len(tasks) == 1:
            task, item = tasks[0], self._item(tasks[0])
            task.k = min(task.k, max(bisect.bisect_right(item.latency_us, cap) - 1, 0))
            return
        while latency > cap:
            excess = latency - cap
            while excess > 0:
                lowerable = [t for t in tasks if t.k > 0]
                if not lowerable:
                    return
                task = max(lowerable, key=self._step_value)
                item = self._item(task)
                excess -= item.latency_us[task.k] - item.latency_us[task.k - 1]
                task.k -= 1
            latency = self._merged_latency_us(tasks)

    def _step_value(self, task: Task) -> float:
        """Microseconds saved per accuracy unit lost by lowering ``task`` one option."""
        item = self._item(task)
        saved = item.latency_us[task.k] - item.latency_us[task.k - 1]
        return saved / max(1, item.accuracy[task.k] - item.accuracy[task.k - 1])

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
        self.in_flight = None
        self.busy_until = now
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
            if value > 0 and part in parts_us:
                # One stall (a page fault, a preempted thread) must not swing predictions: clamp.
                ratio = min(max(parts_us[part] / value, 1 / CORRECTION_CLAMP), CORRECTION_CLAMP)
                self.correction[part] = (1 - alpha) * self.correction[part] + alpha * ratio
        if any(abs(self.correction[p] / self._published[p] - 1) > 0.02 for p in predicted):
            self._published = dict(self.correction)
            self._version += 1
            self._latency_cache.clear()
            self.stats.set_correction(self.correction)

    def close(self, cancel: bool) -> list[Failure]:
        """Stop admitting; with ``cancel``, fail every queued job with :class:`ShutdownError`."""
        self.closed = True
        if not cancel:
            return []
        failures = []
        for task in list(self.queue):
            if task.job.error is None:
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
