"""The online stage's core: the queue, admission, prices, dispatch and completion, in sequence.

This module holds the scheduling *logic* only. It never sleeps, starts threads, touches tensors or
resolves futures: a driver calls :meth:`Scheduler.admit`, :meth:`Scheduler.dispatch` and
:meth:`Scheduler.complete` under its own lock and with its own clock. The threaded driver
(``mosel.server``) and the simulator (``mosel.simulate``) run this same code.

The parts, each in its own module: the queue and its columns (:mod:`mosel.queue`), prices and
their online correction (:mod:`mosel.pricing`), admission (:mod:`mosel.admission`), and the
decisions (which option, what to merge, whom to fail), which belong to a policy object
(:mod:`mosel.policies`) that sees this core through :class:`mosel.policies.Core`.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mosel.chains import Escalated
from mosel.core import CoreView
from mosel.errors import InputError, QueueFullError, ShutdownError
from mosel.jobs import (
    NO_DEADLINE_US,
    Batch,
    Failure,
    Job,
    Task,
    chunk_sizes,
    floor_units,
    merged_groups,
)
from mosel.plan import CostModel, Plan, Strategy, configuration_key, execution_order
from mosel.policies import Policy, policy_class
from mosel.profiles import BucketKey, Profile
from mosel.stats import DEGRADED_WINDOW, Load, Stats

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
        miss_budget: the service's on-time promise as the fraction of requests that may miss
            their deadline (0.01: "99% on time"), in [0, 1). The mosel policy buys accuracy only
            with what the promise leaves after the misses it has seen, pricing each upgrade by
            the misses it is expected to add (:class:`mosel.estimators.MissBudget`); with the
            budget spent it serves exactly as the cheapest admissible policy (``aggressive``).
            None (the default): upgrades may add no more than 0.05% expected misses per request
            over what the cheapest policy would miss (``docs/online.md``).
        escalation: plan and serve escalation chains when the profile has a confidence
            calibration (``docs/online.md``, "Per-row escalation"); False serves as without one.
        escalation_quantile: a chain is priced with the rows it escalates at this quantile of
            their number (Binomial over the job's rows at the calibrated share, summed over a
            merged batch), not their mean: a deadline is a tail constraint.

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
    miss_budget: float | None = None
    escalation: bool = True
    escalation_quantile: float = 0.9

    def __post_init__(self) -> None:  # noqa: C901 (one check per knob)
        policy_class(self.policy)  # raises ValueError for an unknown policy
        budget = self.miss_budget
        if budget is not None and (isinstance(budget, bool) or not 0.0 <= budget < 1.0):
            raise ValueError(
                f"miss_budget must be a fraction of requests in [0, 1) (0.01: 99% on time) or None, "
                f"got {budget!r}"
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
        if not 0.0 <= self.spare_margin <= 1.0:
            raise ValueError(f"spare_margin must be in [0, 1], got {self.spare_margin}")
        for name, meaning in (
            ("latency_quantile", "plans at the median"),
            ("escalation_quantile", "at the mean"),
        ):
            if not 0.5 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0.5, 1) (0.5 {meaning}), got {getattr(self, name)}")
        if not self.load_window_s > 0.0:
            raise ValueError(f"load_window_s must be positive, got {self.load_window_s}")


class Scheduler(CoreView):
    """The policy-free core of the online stage for one model.

    It sequences the parts: admission builds a job's tasks and the policy picks their initial
    options; the queue holds them in deadline order; at dispatch the policy binds options and
    forms a batch; completion feeds the measurement back into the prices. The policy sees it
    through :class:`mosel.policies.Core` (implemented by :class:`~mosel.core.CoreView`).
    """

    def __init__(
        self,
        profile: Profile,
        config: SchedulerConfig | None = None,
        stats: Stats | None = None,
        solve_async: Callable[[Callable[[], Any]], None] | None = None,
        priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None,
    ) -> None:
        super().__init__(profile, config or SchedulerConfig(), stats or Stats(), solve_async, priced)
        self.closed = False
        self._degraded: deque[bool] = deque(maxlen=DEGRADED_WINDOW)
        self._degraded_count = 0  # True entries in _degraded
        self._keys: dict[Configuration, str] = {}
        self.policy: Policy = policy_class(self.config.policy)(self)

    # ------------------------------------------------------------------ admission

    def admit(self, job: Job[Any], now: float) -> list[Failure]:
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
            self.pricer.refresh(task)
            self.edf.insert(task)
        return self.policy.replan(now)

    def start_alone(self, job: Job[Any], now: float) -> Batch | None:
        """Admit a job and dispatch it at once when the device is idle and nothing waits.

        The same admission as :meth:`admit` (same errors) and the same choice as :meth:`dispatch`
        would make for a lone job, without queueing it. Returns None, and changes nothing, when
        the device is busy, jobs are waiting, or the job needs several batches.
        """
        if self.in_flight is not None or self.edf.tasks or job.n > self.max_batch_size or len(job.groups) > 1:
            return None
        if self.lent:  # the device runs a shadow evaluation: queue behind it
            return None
        self._prepare(job, now)
        self.policy.alone(job.tasks[0], now)
        return self._launch(job.tasks, now)

    def prepare_inline(self, job: Job[Any], now: float) -> None:
        """Admit a job that runs at once outside the queue (a call from inside a running batch).

        The same checks and choice as for a lone job on an idle device; the queue (and its
        bound), the running batch and the policy's estimates are left alone.
        """
        self._prepare(job, now, inline=True)
        for task in job.tasks:
            self.pricer.refresh(task)
            if task.lat[task.k] > (job.deadline - now) * 1e6:
                task.k = 0

    def _prepare(self, job: Job[Any], now: float, inline: bool = False) -> None:
        """Admission checks; creates the job's tasks with their initial options."""
        if self.closed:
            raise ShutdownError("the model's scheduler is closed; no new jobs are accepted")
        stats = self.stats
        stats.count("submitted")
        limit = math.inf if inline else self.config.max_queued_requests
        if job.n > limit:
            stats.count("rejected_too_large")
            raise InputError(
                f"a job of {job.n} requests can never be queued: max_queued_requests={limit}; split the "
                f"job into calls of at most {limit} requests, or raise SchedulerConfig.max_queued_requests"
            )
        if self.edf.requests + job.n > limit:
            stats.count("rejected_queue_full")
            self.policy.observe_outcome(job, missed=True)
            raise QueueFullError(
                f"queue holds {self.edf.requests} request(s); admitting {job.n} more would exceed "
                f"max_queued_requests={limit}; retry later or raise the limit"
            )
        policy = self.policy
        try:
            tasks = self.admission.tasks(job, policy.every_modality or job.slo.empty, policy.name)
        except Exception:
            stats.count("rejected_accuracy")
            raise
        job.tasks = tasks
        share = 1.0 / len(tasks)
        for task in tasks:
            if policy.fifo:
                task.key = (job.arrival, *task.key[1:])
            self.pricer.refresh(task)
            task.k = policy.initial(task, now, share)
        cheapest_us = tasks[0].lat[0] if len(tasks) == 1 else sum(t.lat[0] for t in tasks)
        late = now * 1e6 + self.pricer.tail.typical(cheapest_us) > job.deadline * 1e6
        if late and not job.best_effort and policy.refuse_late:
            stats.count("rejected_deadline")  # impossible even alone: the caller's, not a miss
            raise self.deadline_error(job, now, cheapest_us)
        if not inline:  # only queued jobs inform the policy: refused ones never load the device
            policy.observe_arrival(job, now, cheapest_us)
        job.pending = len(tasks)

    # ------------------------------------------------------------------ failures and expiry

    def cancel(self, job: Job[Any]) -> bool:
        """Take a cancelled job's queued tasks out of the queue; True if any were queued."""
        queued = [t for t in job.tasks if t.queued]
        for task in queued:
            self.edf.remove(task)
        if job.error is None:
            job.error = concurrent.futures.CancelledError()
            self.stats.count("cancelled")
        return bool(queued)

    def abort(self, job: Job[Any], error: BaseException) -> Failure | None:
        """Fail a job now (a driver's last resort); None if it had already failed."""
        if job.error is not None:
            return None
        return self.fail(job, error, "error")

    def expire(self, now: float) -> list[Failure]:
        """Fail queued jobs that can no longer make their deadline while a batch overruns.

        The driver calls this from a timer while a batch runs (see :meth:`next_expiry`): a batch
        that runs past its prediction makes the device's free time unknown, and jobs waiting
        behind it must hear at (or before) their deadline that they will miss it.
        """
        if self.in_flight is None or not self.edf.tasks:
            return []
        if now >= self.busy_until:  # the batch runs past its prediction: its end is unknown
            self.overrun = True
            self.busy_until = now
        failures = self.doom_certain(now) if self.policy.refuse_late else []
        return failures + self.policy.replan(now)

    def next_expiry(self) -> float | None:
        """When :meth:`expire` should next run (None: nothing runs, or nothing can expire).

        The running batch's predicted end (if it has not passed), and the first moment a queued
        job could no longer make its deadline even alone: a stalled batch never holds a caller
        past its deadline.
        """
        if self.in_flight is None or not self.edf.tasks:
            return None
        if not self.policy.refuse_late:  # such a policy serves late jobs: nothing expires
            return None if self.overrun else self.busy_until
        deadlines = self.deadlines_us
        latest = (deadlines - self.pricer.typical_us(self.cheapest_us))[
            ~self.lenient & (deadlines < NO_DEADLINE_US)
        ]
        times = [float(latest.min()) / 1e6] if len(latest) else []
        if not self.overrun:
            times.append(self.busy_until)
        return min(times) if times else None

    def solved(self, now: float, result: Any) -> list[Failure]:
        """What a function given to :attr:`solve_async` returned (None: it failed); under the lock."""
        return self.policy.solved(now, result)

    def solver_gone(self) -> None:
        """The driver can no longer run asynchronous solves (it is closing)."""
        self.solve_async = None
        self.policy.solved(-math.inf, None)

    # ------------------------------------------------------------------ dispatch and completion

    def dispatch(self, now: float) -> tuple[Batch | None, list[Failure]]:
        """Take the next batch for the executor (the policy binds its options here)."""
        before = list(self.edf.tasks)
        try:
            tasks, failures = self.policy.dispatch(now)
        except Exception:  # the tasks the policy took out would resolve nowhere: fail them, re-raise
            for task in before:
                if not task.queued and task.job.error is None:
                    self.fail(task.job, ShutdownError("the scheduling policy failed"), "error")
            raise
        if not tasks:
            return None, failures
        return self._launch(tasks, now), failures

    def _launch(self, tasks: list[Task], now: float) -> Batch:
        """Mark ``tasks`` as running from ``now`` and describe them as one batch."""
        merged_latency = self.pricer.merged_latency_us(tasks)
        if len(tasks) == 1:
            merged = tasks[0].strategy
        else:
            cost = tasks[0].job.cost or self.cost
            order = execution_order(list(merged_groups(tasks).items()), cost.modalities)
            merged = Strategy(order, cost.latency_us(order), cost.accuracy_units(order))
            self.stats.count("batches_merged")
            self.stats.count("jobs_in_merged_batches", len(tasks))
        strategies = (merged,) if len(tasks) == 1 else tuple(t.strategy for t in tasks)
        later = None
        if any(s.chain is not None for s in strategies):
            finish_by = self.finish_by(tasks, now, merged_latency)
            later = self.pricer.stage_budget(tasks[0].job.cost, finish_by, merged.n)
        batch = Batch(tuple(tasks), strategies, merged, merged_latency, now, later)
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

    def complete(
        self,
        batch: Batch,
        now: float,
        measured_us: float,
        parts_us: Mapping[str, float] | None = None,
        errors: Mapping[int, BaseException] | None = None,
        escalated: Escalated | None = None,
    ) -> tuple[list[Job[Any]], list[Failure]]:
        """Record the end of a batch; returns the jobs now finished and the jobs failed.

        Args:
            batch: what :meth:`dispatch` returned.
            now: completion time.
            measured_us: measured execution time of the batch.
            parts_us: measured time per branch and ``"fusion"``, when the executor has it.
            errors: task position in the batch -> the exception that task's execution raised.
            escalated: what the batch's chains did (rows escalated per stage, confidences read).
        """
        if self.in_flight is batch:
            self.in_flight = None
            self.busy_until = now
            self.overrun = False
        later = escalated.stages if escalated is not None else None
        if not errors and self.pricer.observe(batch, measured_us, parts_us, later):
            self._reprice()
        if escalated is not None:
            key = self.profile.key
            self.stats.escalated({key(c): b for c, b in escalated.first.items()}, escalated.decisions)
        done: list[Job[Any]] = []
        failures: list[Failure] = []
        for position, task in enumerate(batch.tasks):
            job = task.job
            job.measured_us += measured_us
            error = (errors or {}).get(position)
            if error is not None:
                if job.error is None:
                    failures.append(self.fail(job, error, "error"))
                continue
            job.pending -= 1
            if job.pending == 0 and job.error is None:
                job.finished = now
                self._served(job, now)
                done.append(job)
        failures += self.policy.replan(now)
        return done, failures

    def _served(self, job: Job[Any], now: float) -> None:
        """Count a served job (on time, its configurations, whether it was served below its best)."""
        served: dict[str, int] = {}
        for t in job.tasks:
            for config, count in t.strategy.groups:
                key = self._keys.get(config)
                if key is None:
                    key = self._keys[config] = configuration_key(config, self.profile.modalities)
                served[key] = served.get(key, 0) + count
        self.stats.job_done(now <= job.deadline, (now - job.arrival) * 1000.0, served)
        self.policy.observe_outcome(job, missed=now > job.deadline)
        window = self._degraded
        if len(window) == window.maxlen:
            self._degraded_count -= window[0]
        below = self.degraded(job)
        window.append(below)
        self._degraded_count += below

    def handed_over(self, batch: Batch, now: float) -> None:
        """The batch's results were handed over at ``now``: the prices learn the dispatch overhead."""
        if self.pricer.handed_over(batch, now):
            self._reprice()

    def _reprice(self) -> None:
        """Prices moved (correction or tail): re-read them everywhere."""
        self.pricer.reprice()
        self.edf.repriced(self.pricer.refresh)

    @staticmethod
    def degraded(job: Job[Any]) -> bool:
        """Was ``job`` served below the most accurate option its floor and modalities allowed?"""
        for t in job.tasks:  # noqa: SIM110 (a loop, not any(<generator>): runs for every served job)
            if t.fixed is None and t.k < len(t.lat) - 1:
                return True
        return False

    # ------------------------------------------------------------------ reports and shutdown

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
        tail = self.pricer.tail
        return Load(
            drain_ms=(running_us + queued_us) / 1000.0,
            queued_jobs=self.edf.jobs,
            queued_requests=self.edf.requests,
            latency_margin=tail.margin,
            overhead_ms=tail.overhead_us / 1000.0,
            degraded_share=self._degraded_count / window if window else 0.0,
            at_s=time.time() if at_s is None else at_s,
            overrun_ms=overrun_us / 1000.0,
            latency_correction=self.pricer.latency_correction,
        )

    def close(self, cancel: bool) -> list[Failure]:
        """Stop admitting; with ``cancel``, fail every queued job with :class:`ShutdownError`."""
        self.closed = True
        if not cancel:
            return []
        failures = []
        for task in list(self.edf.tasks):
            if task.queued and task.job.error is None:
                error = ShutdownError("the model's scheduler was closed before this job ran")
                failures.append(self.fail(task.job, error, "shutdown"))
        return failures
