"""The threaded driver of the online stage: one queue, one executor thread and one watchdog per model.

``submit`` validates on the caller's thread and hands the job to the :class:`~mosel.scheduler.Scheduler`
under the server's lock; the executor thread dispatches batches, runs them outside the lock and
reports completions. A lone ``infer`` on an idle model runs on the caller's thread (the device is
free and nobody waits), which costs no thread hand-off and two short lock sections. CP-SAT
improvements run on a helper thread and never block the executor. While a batch runs, a
watchdog fails queued jobs at the moment they can no longer make their deadline, even if the
batch overruns its prediction. What runs on the device, and how a result is built, is
:mod:`mosel.execution`; how a call becomes a job, :mod:`mosel.requests`.

Failure semantics (``docs/failures.md``): every submitted job resolves, with a result or an
exception; nothing the model's code or a caller does stops the executor; the threads hold the
server only weakly, so a model that is no longer referenced is collected and its threads end.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mosel.clock import Clock, MonotonicClock
from mosel.execution import (
    Later,
    Result,
    RowPlanCache,
    Work,
    concat,
    own_error,
    result_of,
    rows_of,
    run_batch,
    run_task,
)
from mosel.interrupts import current_pid, deferred_interrupts, interrupts_kept
from mosel.jobs import Batch, Failure, Job
from mosel.monitoring import Monitor
from mosel.plan import CostModel, Plan
from mosel.profiles import BucketKey, Profile
from mosel.requests import Requests
from mosel.scheduler import Scheduler, SchedulerConfig
from mosel.sidework import idle_work, start_repricing
from mosel.slo import SLO
from mosel.spec import ModelSpec
from mosel.stats import Load, Stats

__all__ = ["Server"]

_log = logging.getLogger("mosel")
_servers: weakref.WeakSet[Server] = weakref.WeakSet()
_local = threading.local()
"""``_local.running``: ids of the servers whose batches this thread is executing right now (the
executor thread counts as always executing its own server): a call back into such a server from
this thread is served inline rather than queued behind itself."""


def _running() -> set[int]:
    running: set[int] | None = getattr(_local, "running", None)
    if running is None:
        running = _local.running = set()
    return running


class Server:
    """Serves one model instance: the lock, the scheduler, the executor and watchdog threads."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        profile: Profile,
        device: Callable[[], torch.device],
        row_plans: RowPlanCache,
        config: SchedulerConfig | None = None,
        clock: Clock | None = None,
        stats: Stats | None = None,
        priced: Mapping[BucketKey, tuple[Plan, CostModel]] | None = None,
        float_dtype: Callable[[], torch.dtype | None] | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.row_plans = row_plans
        self.clock = clock or MonotonicClock()
        self.stats = stats or Stats()
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)  # the executor waits on it
        self.watch = threading.Condition(self.lock)  # the watchdog waits on it
        self.scheduler = Scheduler(profile, config, self.stats, solve_async=self._solve_async, priced=priced)
        calibration = self.scheduler.pricer.calibration
        self.later = Later(calibration.signal, clock=self.clock.now) if calibration is not None else None
        """How batches with chains run their later stages (None: the profile has no calibration)."""
        self.requests = Requests(
            spec, profile, device, self.scheduler.pricer.plan_outside_lock, float_dtype or (lambda: None)
        )
        self.closed = False
        self.pid = current_pid()
        self._watch_at = float("inf")  # when the watchdog means to wake
        self._outbox: collections.deque[Failure] = collections.deque()  # failed, not yet resolved
        # A lone batch the caller's thread handed over, and when: the next lock section tells the
        # scheduler (a third lock section per call would only wait on itself).
        self._handed: tuple[Batch, float] | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._solver: concurrent.futures.ThreadPoolExecutor | None = None
        # The accuracy monitor (mosel.monitoring), its live floors' re-pricing thread (sidework).
        self.monitor: Monitor | None = None
        self.base_profile = profile
        self._priced = priced
        self.repricer: threading.Thread | None = None
        self.reprice_again = False
        weakref.finalize(self, _wake, self.pid, self.lock, self.cond, self.watch)
        _servers.add(self)
        self.set_monitor(monitor)

    def set_monitor(self, monitor: Monitor | None) -> None:
        """Record served jobs with ``monitor`` from now on (None: none); it re-prices this server's floors."""
        self.monitor = monitor
        if monitor is None and self.scheduler.profile is not self.base_profile:
            with self.lock:  # no monitor, no live floors: back to the profile's
                self.scheduler.set_profile(self.base_profile, self._priced)
        if monitor is not None:
            monitor.applied(self.scheduler.profile.accuracy, count=False)
            monitor.on_change = functools.partial(start_repricing, weakref.ref(self))
            monitor.maybe_reprice()

    def load(self) -> Load:
        """The scheduler's :class:`~mosel.stats.Load` now (under the lock; no solving)."""
        with self.lock:
            self._catch_up()
            return self.scheduler.load(self.clock.now())

    def _catch_up(self) -> None:
        """Tell the scheduler about a lone batch handed over since (the caller holds ``self.lock``)."""
        handed, self._handed = self._handed, None
        if handed is not None:
            self.scheduler.handed_over(*handed)

    # ------------------------------------------------------------------ caller side

    def submit(self, inputs: object, slo: SLO, present: object = None) -> concurrent.futures.Future[Result]:
        """Queue a job; the future resolves to a :class:`Result` or the job's error."""
        future = _Future(self)
        job = self.requests.job(inputs, slo, present, self.clock.now(), future)
        if id(self) in _running():  # called back from this model's own batch: never queue behind it
            try:
                future.set_result(self._inline(job))
            except Exception as exc:
                future.set_exception(exc)
            return future
        try:
            try:
                with deferred_interrupts(), self.lock:
                    self._admit_locked(job)
            finally:
                self._drain()
        except BaseException as exc:
            if not isinstance(exc, Exception):  # interrupted (Ctrl-C): nobody will hold the future
                self._withdraw(job)
            raise
        future.withdraw = functools.partial(self._on_cancel, job)
        return future

    def _admit_locked(self, job: Job[Work]) -> None:
        """Queue ``job`` and wake the executor (the caller holds ``self.lock``)."""
        self._catch_up()
        self._post(self.scheduler.admit(job, self.clock.now()))
        self._start_threads()
        self.cond.notify()
        self._poke_watchdog()

    def infer(self, inputs: object, slo: SLO, present: object = None) -> Result:
        """Serve a job and wait for it; on an idle model it runs on the calling thread."""
        job = self.requests.job(inputs, slo, present, self.clock.now())
        running = _running()
        if id(self) in running:  # called back from this model's own batch: run it here
            return self._inline(job)
        with interrupts_kept():  # two handler swaps for the call, not two per lock section
            batch: Batch | None = None
            try:
                try:
                    with deferred_interrupts(), self.lock:
                        self._catch_up()
                        batch = self.scheduler.start_alone(job, self.clock.now())
                        if batch is None:
                            job.payload.future = waiting = _Future(self)
                            self._admit_locked(job)
                finally:
                    if self._outbox:
                        self._drain()
                if batch is None:
                    waiting.withdraw = functools.partial(self._on_cancel, job)
                    return waiting.result()
                done, interrupt = self._execute(batch, running)
            except BaseException as exc:  # e.g. Ctrl-C: the job must not stay in flight or queued
                if not isinstance(exc, Exception):
                    self._withdraw(job, batch, exc)
                raise
            finally:
                if self._outbox:
                    self._drain()
            if interrupt is not None:
                raise interrupt
            if job.error is not None:
                raise job.error
            result = self._result(done[0])
            self._handed = (batch, self.clock.now())
            return result

    def _withdraw(
        self, job: Job[Work], batch: Batch | None = None, error: BaseException | None = None
    ) -> None:
        """Take an interrupted caller's job back.

        A batch this thread started (a lone job, ``batch``) and that is still in flight ends as
        failed; a queued job leaves the queue; a job the executor is already running runs on
        (other callers' jobs may share its batch), its result unclaimed.
        """
        with deferred_interrupts(), self.lock:
            if batch is not None and self.scheduler.in_flight is batch:
                errors = dict.fromkeys(range(len(batch.tasks)), own_error(error or KeyboardInterrupt()))
                _, failures = self.scheduler.complete(batch, self.clock.now(), 0.0, None, errors)
                self._post(failures)
            elif job.error is None and any(task.queued for task in job.tasks):
                self.scheduler.cancel(job)
            self.cond.notify()
        if job.payload.future is not None:
            job.payload.future.cancel()
        self._drain()

    async def ainfer(self, inputs: object, slo: SLO, present: object = None) -> Result:
        """``await``-able :meth:`submit`; cancelling the awaiting task cancels the queued job."""
        return await asyncio.wrap_future(self.submit(inputs, slo, present))

    def _on_cancel(self, job: Job[Work]) -> None:
        """A cancelled job leaves the queue (the caller holds ``self.lock``: see :class:`_Future`)."""
        self.scheduler.cancel(job)
        self.cond.notify()

    def _post(self, failures: list[Failure]) -> None:
        """Keep failed jobs for :meth:`_drain` (the caller holds ``self.lock``)."""
        self._outbox.extend(failures)

    def _drain(self) -> None:
        """Resolve every failed job posted so far, outside the lock (any thread may do it).

        Failures travel through this outbox rather than a thread's local variable, so a caller
        interrupted between the scheduler's decision and the futures' resolution strands no job:
        the next thread through here resolves it.
        """
        while self._outbox:
            with self.lock:
                if not self._outbox:
                    return
                job, error = self._outbox[0]
            job.payload.inputs = None
            _resolve_future(job.payload.future, error=own_error(error))
            with self.lock:  # taken out only once resolved: an interrupt before leaves it for the next
                if self._outbox and self._outbox[0][0] is job:
                    self._outbox.popleft()

    def _inline(self, job: Job[Work]) -> Result:
        """Serve a job on this thread, outside the queue (a call from inside this model's batch).

        The same admission and strategy choice as a lone job on an idle device; the queue, its
        bound and the running batch are left alone, so the call cannot wait for itself.
        """
        with deferred_interrupts(), self.lock:
            self.scheduler.prepare_inline(job, self.clock.now())
        started = time.perf_counter()
        outputs = []
        for task in job.tasks:
            rows = rows_of(self.spec, job.payload.inputs, task.offset, task.n, job.n)
            output, done = run_task(self.model, self.spec, task.strategy, rows, self.row_plans, self.later)
            outputs.append(output)
            if done is not None:
                job.payload.rows.append((task.index, done.modalities, done.escalated))
        job.payload.outputs = [(0, concat(outputs, f"fusion {self.spec.fusion!r}"))]
        job.measured_us = (time.perf_counter() - started) * 1e6
        job.predicted_us = sum(t.strategy.latency_us for t in job.tasks)
        job.finished = self.clock.now()
        self.stats.count("served_inline")
        self.stats.job_done(job.finished <= job.deadline, (job.finished - job.arrival) * 1000.0, {})
        return self._result(job)

    # ------------------------------------------------------------------ executor side

    def _start_threads(self) -> None:
        if self._thread is None:
            ref = weakref.ref(self)
            self._thread = threading.Thread(
                target=_executor_main, args=(ref, self.cond), name="mosel-executor", daemon=True
            )
            self._thread.start()
            self._watchdog = threading.Thread(
                target=_watchdog_main, args=(ref, self.watch), name="mosel-watchdog", daemon=True
            )
            self._watchdog.start()

    def _poke_watchdog(self) -> None:
        """Wake the watchdog if a job now expires before it means to wake (lock held)."""
        expiry = self.scheduler.next_expiry()
        if expiry is not None and expiry < self._watch_at:
            self.watch.notify()

    def _next_batch(self) -> Batch | None:
        """Dispatch under the lock; marks the batch's futures as running."""
        self._catch_up()
        try:
            batch, failures = self.scheduler.dispatch(self.clock.now())
        except Exception as exc:  # a scheduler bug: fail what waits rather than die or spin
            _log.exception("mosel scheduler failed to dispatch; failing the queued jobs")
            failed = [self.scheduler.abort(task.job, exc) for task in list(self.scheduler.queue)]
            self._post([f for f in failed if f is not None])
            return None
        self._post(failures)
        if batch is not None:
            for task in batch.tasks:
                future = task.job.payload.future
                if future is not None and not future.done() and not future.running():
                    future.set_running_or_notify_cancel()
            self._poke_watchdog()
        return batch

    def _execute(
        self, batch: Batch, running: set[int] | None = None
    ) -> tuple[list[Job[Work]], BaseException | None]:
        """Run a batch outside the lock, isolating faults, and report its completion.

        Returns the finished jobs (failed ones are posted for :meth:`_drain`), and a
        ``BaseException`` that is not an ``Exception`` (Ctrl-C, ``SystemExit``) if the model's
        code raised one on the caller's own thread: the caller re-raises it after the scheduler
        has been told. On the executor thread such an exception fails only the job it belongs to.
        """
        errors: dict[int, BaseException] = {}
        timings: dict[str, float] | None = None
        interrupt: BaseException | None = None
        running = _running() if running is None else running
        nested = id(self) in running
        running.add(id(self))
        started = time.perf_counter()
        escalated = None
        try:
            device = batch.tasks[0].job.payload.device
            _, errors, timings, escalated = run_batch(
                self.model, self.spec, batch, self.row_plans, device, propagate=not nested, later=self.later
            )
        except BaseException as exc:  # the model's code raised SystemExit, KeyboardInterrupt, ...
            interrupt = exc
            errors = dict.fromkeys(range(len(batch.tasks)), own_error(exc))
        finally:
            if not nested:
                running.discard(id(self))
        measured_us = (time.perf_counter() - started) * 1e6
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "batch of %d job(s), %d row(s), %s: predicted %.3f ms, measured %.3f ms, %d failed",
                len(batch.tasks),
                batch.merged.n,
                " + ".join(f"{count}x{'+'.join(sorted(config))}" for config, count in batch.merged.groups),
                batch.predicted_us / 1000.0,
                measured_us / 1000.0,
                len(errors),
            )
        with deferred_interrupts(), self.lock:
            done, failures = self.scheduler.complete(
                batch, self.clock.now(), measured_us, timings, errors, escalated
            )
            self._post(failures)
            self.cond.notify()
        return done, interrupt

    def _resolve(self, job: Job[Work]) -> None:
        future = job.payload.future
        if future is None or future.done():
            job.payload.inputs = None
            return
        try:
            result = self._result(job)
        except Exception as exc:  # never lose a job to a bug in assembling its result
            _log.exception("mosel could not assemble a job's result")
            _resolve_future(future, error=exc)
            return
        _resolve_future(future, result=result)

    def _result(self, job: Job[Work]) -> Result:
        reason = None
        if self.scheduler.degraded(job):
            reason = job.reason_text
            if reason is None:
                reason = self.scheduler.policy.rule
        monitor = self.monitor
        if monitor is None:
            return result_of(job, (self.clock.now() - job.arrival) * 1000.0, reason)
        sample = monitor.keep(job)  # before result_of releases the inputs
        result = result_of(job, (self.clock.now() - job.arrival) * 1000.0, reason)
        monitor.record(result, job.bucket, job.slo.deadline_ms, sample)
        if sample is not None:  # the executor runs it when idle: wake it (it may not exist yet)
            with self.lock:
                self._start_threads()
                self.cond.notify()
        return result

    def _handed_over(self, batch: Batch) -> None:
        """Every result of ``batch`` was handed over: the scheduler learns the dispatch overhead."""
        with deferred_interrupts(), self.lock:
            self._catch_up()
            self.scheduler.handed_over(batch, self.clock.now())

    def _fail_batch(self, batch: Batch, error: BaseException) -> None:
        """Resolve every job of a batch with ``error`` (after an unexpected executor error)."""
        error = own_error(error)
        with self.lock:
            failures: list[Failure] = []
            if self.scheduler.in_flight is batch:
                errors = dict.fromkeys(range(len(batch.tasks)), error)
                _, failures = self.scheduler.complete(batch, self.clock.now(), 0.0, None, errors)
            for task in batch.tasks:
                failure = self.scheduler.abort(task.job, error)
                if failure is not None:
                    failures.append(failure)
            self.cond.notify()
        self._fail(failures)
        for task in batch.tasks:
            _resolve_future(task.job.payload.future, error=error)

    def _fail(self, failures: list[Failure]) -> None:
        """Resolve failed jobs' futures (through the outbox: an interrupt strands none of them)."""
        with self.lock:
            self._post(failures)
        self._drain()

    # ------------------------------------------------------------------ CP-SAT helper thread

    def _solve_async(self, solve: Callable[[], Any]) -> None:
        if self._solver is None:
            self._solver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mosel-solver")
            weakref.finalize(self, _shutdown, self.pid, self._solver)
        ref = weakref.ref(self)

        def run() -> None:
            server = ref()
            if server is None:
                return
            result = None
            try:
                result = solve()
            except Exception:  # a solver failure keeps the greedy assignment
                _log.exception("CP-SAT re-assignment failed; keeping the greedy assignment")
                server.stats.count("solver_errors")
            with server.lock:
                server._post(server.scheduler.solved(server.clock.now(), result))
                server.cond.notify()
            server._drain()

        try:
            self._solver.submit(run)
        except RuntimeError:  # closing
            self.scheduler.solver_gone()

    # ------------------------------------------------------------------ shutdown

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop accepting jobs; finish the queued ones (or fail them with ``cancel``); join.

        Called from inside one of this model's own batches (a branch, or a future's callback on
        the executor thread), it stops admission and returns without waiting for itself.
        """
        with deferred_interrupts(), self.lock:
            self.closed = True
            self._catch_up()
            self._post(self.scheduler.close(cancel))
            self.cond.notify_all()
            self.watch.notify_all()
        self._drain()
        if id(self) not in _running():
            self.join(timeout)
        if self._solver is not None:
            self._solver.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the executor and the watchdog to end (after :meth:`close`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _executor_main(ref: weakref.ref[Server], cond: threading.Condition) -> None:
    """The executor thread: dispatch, execute, resolve; holds its server only while it works.

    While nothing is queued or running it does the accuracy monitor's idle work
    (:func:`mosel.sidework.idle_work`: output digests, shadow runs).
    """
    server: Server | None
    while True:
        idle: Callable[[], None] | None = None
        with cond:
            while True:
                server = ref()
                if server is None or server.pid != current_pid():
                    return
                scheduler = server.scheduler
                if scheduler.in_flight is None and scheduler.queue:
                    break
                if server.closed and not scheduler.queue and scheduler.in_flight is None:
                    server.watch.notify_all()  # the watchdog ends with the executor
                    return
                wait_s = None
                if scheduler.in_flight is None and server.monitor is not None:
                    idle, wait_s = idle_work(server)
                    if idle is not None:
                        break
                del server, scheduler
                cond.wait(wait_s)
            _running().add(id(server))
            batch = server._next_batch() if idle is None else None
        if idle is not None:
            _idle(idle)
        else:
            _serve(server, batch)
        del server, scheduler, batch, idle  # hold nothing of the server while waiting


def _idle(work: Callable[[], None]) -> None:
    """Run the monitor's idle work; nothing it raises escapes the executor."""
    try:
        work()
    except BaseException:
        _log.exception("mosel executor: the accuracy monitor's idle work failed; going on")


def _serve(server: Server, batch: Batch | None) -> None:
    """One turn of the executor, outside the lock; nothing it raises escapes."""
    try:
        server._drain()
        if batch is not None:
            done, _ = server._execute(batch)
            server._drain()
            for job in done:
                server._resolve(job)
            server._handed_over(batch)
    except BaseException as exc:  # nothing may stop the executor; every job of the batch resolves
        _log.exception("mosel executor: unexpected error; failing the batch and going on")
        if batch is not None:
            server._fail_batch(batch, exc)


def _watchdog_main(ref: weakref.ref[Server], watch: threading.Condition) -> None:
    """While a batch runs, fail queued jobs at the moment their deadline can no longer be met."""
    server: Server | None
    while True:
        with watch:
            server = ref()
            if server is None or server.pid != current_pid():
                return
            scheduler = server.scheduler
            if server.closed and not scheduler.queue and scheduler.in_flight is None:
                return
            now = server.clock.now()
            try:
                failures = scheduler.expire(now) if scheduler.in_flight is not None else []
                server._post(failures)
                expiry = scheduler.next_expiry()
            except Exception:  # nothing may stop the watchdog: log, and look again a little later
                _log.exception("mosel watchdog: unexpected error; retrying in 10 ms")
                failures, expiry = [], now + 0.01
            server._watch_at = float("inf") if expiry is None else expiry
            if failures:
                server.cond.notify()
            else:
                del server, scheduler
                watch.wait(None if expiry is None else max(expiry - now, 0.0) + 1e-4)
                continue
        try:
            server._drain()
        except BaseException:  # nothing may stop the watchdog either
            _log.exception("mosel watchdog: unexpected error while failing late jobs")
        del server, scheduler, failures


def _resolve_future(
    future: concurrent.futures.Future[Result] | None,
    *,
    result: Result | None = None,
    error: BaseException | None = None,
) -> None:
    """Resolve a future unless its caller cancelled it meanwhile (never raises on that race)."""
    if future is None:
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except concurrent.futures.InvalidStateError:
        pass  # cancelled by its caller between our check and our call: nobody waits for it


def _wake(pid: int, lock: threading.RLock, *conditions: threading.Condition) -> None:
    """Wake a collected server's threads so that they notice and end.

    Only in its own process: in a forked child the lock may have been held by a thread that no
    longer exists.
    """
    if os.getpid() != pid:
        return
    with lock:
        for condition in conditions:
            condition.notify_all()


def _shutdown(pid: int, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Stop a collected server's CP-SAT helper (in its own process only)."""
    if os.getpid() == pid:
        pool.shutdown(wait=False, cancel_futures=True)


class _Future(concurrent.futures.Future[Result]):
    """A future whose done-callbacks cannot stop the thread that resolves it, and whose cancel is atomic.

    ``concurrent.futures`` lets a callback's ``BaseException`` (``SystemExit``) escape from
    ``set_result`` into mosel's executor; here every callback is guarded and its error logged.

    :meth:`cancel` holds the server's lock while it flips the future to cancelled and the
    scheduler withdraws the job (:attr:`withdraw`): the executor marks a dispatched job's
    future running under the same lock, so a cancel either withdraws a job before it is
    dispatched (True) or finds it running (False), never a job that is cancelled and computed
    all the same. The done-callbacks a cancel triggers run once the lock is released.
    """

    def __init__(self, server: Server | None = None) -> None:
        super().__init__()
        self._server = None if server is None else weakref.ref(server)
        self.withdraw: Callable[[], None] | None = None  # takes the job out (set once it is queued)
        self._cancelling: int | None = None  # the thread in cancel(), holding the server's lock
        self._held: list[Callable[[], None]] = []  # callbacks it runs once the lock is released

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Result]], object]) -> None:
        """Like ``Future.add_done_callback``; what ``fn`` raises is logged, never propagated."""

        def guarded(future: concurrent.futures.Future[Result]) -> None:
            if self._cancelling == threading.get_ident():  # inside cancel(), under the server's lock
                self._held.append(functools.partial(_run_callback, fn, future))
            else:
                _run_callback(fn, future)

        super().add_done_callback(guarded)

    def cancel(self) -> bool:
        """Cancel the job: True if it was withdrawn before it ran (see the class)."""
        server = None if self._server is None else self._server()
        if server is None:
            return super().cancel()
        with deferred_interrupts(), server.lock:
            self._cancelling = threading.get_ident()
            try:
                cancelled = super().cancel()
                if cancelled and self.withdraw is not None:
                    self.withdraw()
            finally:
                self._cancelling = None
                held, self._held = self._held, []
        for call in held:
            call()
        return cancelled


def _run_callback(
    fn: Callable[[concurrent.futures.Future[Result]], object], future: concurrent.futures.Future[Result]
) -> None:
    try:
        fn(future)
    except BaseException:
        _log.exception("a done-callback of a mosel future raised; ignored")


@atexit.register
def _close_all() -> None:
    """At interpreter exit: fail every queued job, then give running batches 5 s in all."""
    here = [server for server in list(_servers) if server.pid == current_pid()]
    for server in here:
        server.close(cancel=True, timeout=0.0)
    deadline = time.monotonic() + 5.0
    for server in here:
        server.join(max(0.0, deadline - time.monotonic()))
