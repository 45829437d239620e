"""The threaded driver of the online stage: one queue, one executor thread and one watchdog per model.

``submit`` validates on the caller's thread and hands the job to the :class:`~mosel.scheduler.Scheduler`
under the server's lock; the executor thread dispatches batches, runs them outside the lock and
reports completions. A lone ``infer`` on an idle model runs on the caller's thread (the device is
free and nobody waits), which costs no thread hand-off. CP-SAT improvements run on a helper
thread and never block the executor. While a batch runs, a watchdog fails queued jobs at the
moment they can no longer make their deadline, even if the batch overruns its prediction.

Failure semantics (``docs/failures.md``): every submitted job resolves, with a result or an
exception; nothing the model's code or a caller does stops the executor; the threads hold the
server only weakly, so a model that is no longer referenced is collected and its threads end.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mosel import trees
from mosel.clock import Clock, MonotonicClock
from mosel.errors import ExecutionError, OutputError
from mosel.execution import (
    Result,
    RowPlanCache,
    check_confidence,
    check_inputs,
    check_slo,
    concat,
    group_by_presence,
    plan_rows,
    run_recovering,
)
from mosel.plan import ACCURACY_SCALE, CostModel, Plan, Strategy
from mosel.profiles import BucketKey, Profile
from mosel.scheduler import Batch, Failure, Job, Scheduler, SchedulerConfig
from mosel.spec import ModelSpec
from mosel.stats import Load, Stats
from mosel.trees import Tree

__all__ = ["Server"]

_log = logging.getLogger("mosel")
_servers: weakref.WeakSet[Server] = weakref.WeakSet()
_local = threading.local()
"""``_local.running``: ids of the servers whose batches this thread is executing right now (the
executor thread counts as always executing its own server): a call back into such a server from
this thread is served inline rather than queued behind itself."""

Configuration = frozenset[str]


def _running() -> set[int]:
    running: set[int] | None = getattr(_local, "running", None)
    if running is None:
        running = _local.running = set()
    return running


class Server:
    """Serves one model instance: validation, the scheduler, the executor thread."""

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
        # Modalities whose latency the profile prices per input size: (name, how to read it).
        self._sized = tuple((m, spec.sizings[m]) for m in profile.sized if m in spec.sizings)
        self.closed = False
        self.pid = os.getpid()
        self._watch_at = float("inf")  # when the watchdog means to wake
        self._outbox: collections.deque[Failure] = collections.deque()  # failed, not yet resolved
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._solver: concurrent.futures.ThreadPoolExecutor | None = None
        weakref.finalize(self, _wake, self.pid, self.lock, self.cond, self.watch)
        _servers.add(self)

    def load(self) -> Load:
        """The scheduler's :class:`~mosel.stats.Load` now (under the lock; no solving)."""
        with self.lock:
            return self.scheduler.load(self.clock.now())

    # ------------------------------------------------------------------ caller side

    def _job(
        self,
        inputs: Mapping[str, Tree],
        deadline_ms: object,
        min_accuracy: object,
        best_effort: bool,
        future: bool = True,
        confidence: object = None,
        per_request: bool = False,
        present: object = None,
    ) -> Job:
        arrival = self.clock.now()
        deadline, floor = check_slo(deadline_ms, min_accuracy)
        bound = check_confidence(confidence, floor)
        tensors, available, n = check_inputs(inputs, self.spec, self.device())
        tensors, groups, order = group_by_presence(tensors, available, n, present, self.spec)
        job = Job(
            n=n,
            available=available,
            arrival=arrival,
            deadline_ms=deadline,
            min_accuracy=floor,
            best_effort=bool(best_effort),
            inputs=tensors,
            payload=_Future() if future else None,
            confidence=bound,
            per_request=bool(per_request) and floor is not None,
        )
        job.batch_key = tuple((m, trees.signature(t, self.spec.batch_dim(m))) for m, t in tensors.items())
        job.groups, job.order = groups, order
        if self._sized:
            job.bucket = self.scheduler.profile.bucket(
                {m: how.read(m, tensors[m]) for m, how in self._sized if m in tensors}
            )
            # Here, before the lock: a bucket beyond the measured ones may cost a repriced plan.
            job.priced = self.scheduler.pricing(job.bucket)
        return job

    def submit(
        self,
        inputs: Mapping[str, Tree],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
        confidence: float | None = None,
        per_request: bool = False,
        present: Mapping[str, Tensor] | None = None,
    ) -> concurrent.futures.Future[Result]:
        """Queue a job; the future resolves to a :class:`Result` or the job's error."""
        job = self._job(
            inputs, deadline_ms, min_accuracy, best_effort, True, confidence, per_request, present
        )
        future: concurrent.futures.Future[Result] = job.payload
        if id(self) in _running():  # called back from this model's own batch: never queue behind it
            try:
                future.set_result(self._inline(job))
            except Exception as exc:
                future.set_exception(exc)
            return future
        try:
            try:
                with _deferred_interrupts(), self.lock:
                    self._admit_locked(job)
            finally:
                self._drain()
        except BaseException as exc:
            if not isinstance(exc, Exception):  # interrupted (Ctrl-C): nobody will hold the future
                self._withdraw(job)
            raise
        future.add_done_callback(functools.partial(self._on_cancel, job=job))
        return future

    def _admit_locked(self, job: Job) -> None:
        """Queue ``job`` and wake the executor (the caller holds ``self.lock``)."""
        self._post(self.scheduler.admit(job, self.clock.now()))
        self._start_threads()
        self.cond.notify()
        self._poke_watchdog()

    def infer(
        self,
        inputs: Mapping[str, Tree],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
        confidence: float | None = None,
        per_request: bool = False,
        present: Mapping[str, Tensor] | None = None,
    ) -> Result:
        """Serve a job and wait for it; on an idle model it runs on the calling thread."""
        job = self._job(
            inputs, deadline_ms, min_accuracy, best_effort, False, confidence, per_request, present
        )
        if id(self) in _running():  # called back from this model's own batch: run it here
            return self._inline(job)
        batch: Batch | None = None
        try:
            try:
                with _deferred_interrupts(), self.lock:
                    batch = self.scheduler.start_alone(job, self.clock.now())
                    if batch is None:
                        job.payload = _Future()
                        self._admit_locked(job)
            finally:
                self._drain()
            if batch is None:
                future: concurrent.futures.Future[Result] = job.payload
                future.add_done_callback(functools.partial(self._on_cancel, job=job))
                return future.result()
            done, interrupt = self._execute(batch)
        except BaseException as exc:  # e.g. Ctrl-C: the job must not stay in flight or queued
            if not isinstance(exc, Exception):
                self._withdraw(job, batch, exc)
            raise
        finally:
            self._drain()
        if interrupt is not None:
            raise interrupt
        if job.error is not None:
            raise job.error
        result = self._result(done[0])
        self._settled(batch)
        return result

    def _withdraw(self, job: Job, batch: Batch | None = None, error: BaseException | None = None) -> None:
        """Take an interrupted caller's job back.

        A batch this thread started (a lone job, ``batch``) and that is still in flight ends as
        failed; a queued job leaves the queue; a job the executor is already running runs on
        (other callers' jobs may share its batch), its result unclaimed.
        """
        with _deferred_interrupts(), self.lock:
            if batch is not None and self.scheduler.in_flight is batch:
                errors = dict.fromkeys(range(len(batch.tasks)), _own(error or KeyboardInterrupt()))
                _, failures = self.scheduler.complete(batch, self.clock.now(), 0.0, None, errors)
                self._post(failures)
            elif job.error is None and any(task.queued for task in job.tasks):
                self.scheduler.cancel(job)
            self.cond.notify()
        if job.payload is not None:
            job.payload.cancel()
        self._drain()

    async def ainfer(
        self,
        inputs: Mapping[str, Tree],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
        confidence: float | None = None,
        per_request: bool = False,
        present: Mapping[str, Tensor] | None = None,
    ) -> Result:
        """``await``-able :meth:`submit`; cancelling the awaiting task cancels the queued job."""
        future = self.submit(
            inputs,
            deadline_ms=deadline_ms,
            min_accuracy=min_accuracy,
            best_effort=best_effort,
            confidence=confidence,
            per_request=per_request,
            present=present,
        )
        return await asyncio.wrap_future(future)

    def _on_cancel(self, future: concurrent.futures.Future[Result], job: Job) -> None:
        if future.cancelled():
            with _deferred_interrupts(), self.lock:
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
            job.inputs = None
            _settle(job.payload, error=_own(error))
            with self.lock:  # taken out only once resolved: an interrupt before leaves it for the next
                if self._outbox and self._outbox[0][0] is job:
                    self._outbox.popleft()

    def _inline(self, job: Job) -> Result:
        """Serve a job on this thread, outside the queue (a call from inside this model's batch).

        The same admission and strategy choice as a lone job on an idle device; the queue, its
        bound and the running batch are left alone, so the call cannot wait for itself.
        """
        with _deferred_interrupts(), self.lock:
            self.scheduler.prepare_inline(job, self.clock.now())
        started = time.perf_counter()
        outputs = []
        for task in job.tasks:
            rows = self._rows(job.inputs, task.offset, task.n)
            outputs.append(run_recovering(self.model, self.spec, task.strategy, rows, self.row_plans))
        job.outputs = [(0, concat(outputs, f"fusion {self.spec.fusion!r}"))]
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
        try:
            batch, failures = self.scheduler.dispatch(self.clock.now())
        except Exception as exc:  # a scheduler bug: fail what waits rather than die or spin
            _log.exception("mosel scheduler failed to dispatch; failing the queued jobs")
            failed = [self.scheduler.fail(task.job, exc) for task in list(self.scheduler.queue)]
            self._post([f for f in failed if f is not None])
            return None
        self._post(failures)
        if batch is not None:
            for task in batch.tasks:
                future = task.job.payload
                if future is not None and not future.done() and not future.running():
                    future.set_running_or_notify_cancel()
            self._poke_watchdog()
        return batch

    def _execute(self, batch: Batch) -> tuple[list[Job], BaseException | None]:
        """Run a batch outside the lock, isolating faults, and report its completion.

        Returns the finished jobs (failed ones are posted for :meth:`_drain`), and a
        ``BaseException`` that is not an ``Exception`` (Ctrl-C, ``SystemExit``) if the model's
        code raised one on the caller's own thread: the caller re-raises it after the scheduler
        has been told. On the executor thread such an exception fails only the job it belongs to.
        """
        timings: dict[str, float] | None = {} if self.device().type == "cpu" else None
        outputs: dict[int, Tree] = {}
        errors: dict[int, BaseException] = {}
        interrupt: BaseException | None = None
        running = _running()
        nested = id(self) in running
        running.add(id(self))
        started = time.perf_counter()
        try:
            try:
                with torch.inference_mode():
                    if len(batch.tasks) == 1:
                        task = batch.tasks[0]
                        rows = self._rows(task.job.inputs, task.offset, task.n)
                        outputs[0] = run_recovering(
                            self.model, self.spec, task.strategy, rows, self.row_plans, timings
                        )
                    else:
                        outputs = self._run_merged(batch, timings)
                    _synchronize(outputs)
            except BaseException as exc:
                if not isinstance(exc, Exception) and not nested:
                    raise  # on the caller's own thread: theirs to see, once the scheduler is told
                if len(batch.tasks) == 1:
                    errors[0] = _own(exc)
                else:  # fail only the jobs the error belongs to: re-run each task alone
                    _log.info(
                        "merged batch failed (%r); re-running its %d jobs separately", exc, len(batch.tasks)
                    )
                    outputs, errors = self._run_separately(batch)
            self._assemble(batch, outputs, errors)
        except BaseException as exc:  # the model's code raised SystemExit, KeyboardInterrupt, ...
            interrupt = exc
            outputs = {}
            errors = dict.fromkeys(range(len(batch.tasks)), _own(exc))
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
        with _deferred_interrupts(), self.lock:
            done, failures = self.scheduler.complete(
                batch, self.clock.now(), measured_us, timings if not errors else None, errors
            )
            self._post(failures)
            self.cond.notify()
        return done, interrupt

    def _assemble(self, batch: Batch, outputs: dict[int, Tree], errors: dict[int, BaseException]) -> None:
        """Hand each task's output to its job; a job's last chunk joins its chunks' outputs."""
        for position, output in sorted(outputs.items()):
            task = batch.tasks[position]
            job = task.job
            job.outputs.append((task.index, output))
            if len(job.outputs) == len(job.tasks) > 1:
                parts = [out for _, out in sorted(job.outputs, key=lambda pair: pair[0])]
                try:
                    job.outputs = [(0, concat(parts, f"fusion {self.spec.fusion!r}"))]
                except OutputError as exc:
                    errors[position] = exc

    def _run_merged(self, batch: Batch, timings: dict[str, float] | None) -> dict[int, Tree]:
        """One execution for several jobs' rows, grouped by configuration, split back after."""
        pieces: dict[str, list[Tree]] = {m: [] for m in self.spec.modalities}
        layout: list[tuple[int, Configuration, int]] = []  # (task position, configuration, rows)
        for config, _ in batch.merged.groups:
            for position, (task, strategy) in enumerate(zip(batch.tasks, batch.strategies)):
                start = 0
                for c, count in strategy.groups:
                    if c == config:
                        rows = self._rows(task.job.inputs, task.offset + start, count)
                        for m, t in rows.items():
                            pieces[m].append(t)
                        layout.append((position, config, count))
                    start += count
        inputs = {m: trees.concat(ts, self.spec.batch_dim(m)) for m, ts in pieces.items() if ts}
        merged = run_recovering(self.model, self.spec, batch.merged, inputs, self.row_plans, timings)
        parts: dict[tuple[int, Configuration], Tree] = {}
        offset = 0
        for position, config, count in layout:
            parts[(position, config)] = trees.take(merged, slice(offset, offset + count))
            offset += count
        outputs = {}
        for position, strategy in enumerate(batch.strategies):
            chunks = [parts[(position, c)] for c, _ in strategy.groups]
            # A slice of the merged output would keep every merged job's rows in its storage.
            outputs[position] = trees.concat(chunks) if len(chunks) > 1 else trees.copy(chunks[0])
        return outputs

    def _run_separately(self, batch: Batch) -> tuple[dict[int, Tree], dict[int, BaseException]]:
        outputs: dict[int, Tree] = {}
        errors: dict[int, BaseException] = {}
        for position, task in enumerate(batch.tasks):
            try:
                with torch.inference_mode():
                    rows = self._rows(task.job.inputs, task.offset, task.n)
                    outputs[position] = run_recovering(
                        self.model, self.spec, task.strategy, rows, self.row_plans
                    )
            except BaseException as exc:  # on the executor thread: the job's own failure
                errors[position] = _own(exc)
        return outputs, errors

    def _resolve(self, job: Job) -> None:
        future: concurrent.futures.Future[Result] | None = job.payload
        if future is None or future.done():
            job.inputs = None
            return
        try:
            result = self._result(job)
        except Exception as exc:  # never lose a job to a bug in assembling its result
            _log.exception("mosel could not assemble a job's result")
            _settle(future, error=exc)
            return
        _settle(future, result=result)

    def _result(self, job: Job) -> Result:
        output = job.outputs[0][1]
        modalities: tuple[frozenset[str], ...] = ()
        for task in job.tasks:
            rows = plan_rows(
                task.strategy, self.spec, self._rows(job.inputs, task.offset, task.n), self.row_plans
            )
            modalities += rows.modalities
        if job.order is not None:  # rows were grouped by presence: back to the caller's order
            back = job.order.tolist()
            output = trees.take(output, job.order.to(trees.device(output)))
            modalities = tuple(modalities[i] for i in back)
        strategies: tuple[Strategy, ...] = job.strategies
        job.inputs = None  # release the request's tensors
        completion_ms = (self.clock.now() - job.arrival) * 1000.0
        return Result(
            output=output,
            modalities=modalities,
            expected_accuracy=sum(s.accuracy_units for s in strategies) / (job.n * ACCURACY_SCALE),
            predicted_latency_ms=job.predicted_us / 1000.0,
            measured_latency_ms=job.measured_us / 1000.0,
            completion_ms=completion_ms,
            strategies=strategies,
            queue_ms=(job.started - job.arrival) * 1000.0,
            reason=self._reason(job),
            deadline_met=None if job.deadline_ms is None else completion_ms <= job.deadline_ms,
        )

    def _reason(self, job: Job) -> str | None:
        """Why the job was served below the most accurate strategy its floor allowed (None: it was not)."""
        if not self.scheduler.degraded(job):
            return None
        if job.reason is not None:
            return job.reason
        policy = self.scheduler.policy
        rule = (type(policy).__doc__ or "").strip().split("\n")[0]
        return f"policy {policy.name!r}: {rule}"

    def _settled(self, batch: Batch) -> None:
        """Every result of ``batch`` was handed over: the scheduler learns the dispatch overhead."""
        with _deferred_interrupts(), self.lock:
            self.scheduler.settled(batch, self.clock.now())

    def _fail_batch(self, batch: Batch, error: BaseException) -> None:
        """Resolve every job of a batch with ``error`` (after an unexpected executor error)."""
        error = _own(error)
        with self.lock:
            failures: list[Failure] = []
            if self.scheduler.in_flight is batch:
                errors = dict.fromkeys(range(len(batch.tasks)), error)
                _, failures = self.scheduler.complete(batch, self.clock.now(), 0.0, None, errors)
            for task in batch.tasks:
                failure = self.scheduler.fail(task.job, error)
                if failure is not None:
                    failures.append(failure)
            self.cond.notify()
        self._fail(failures)
        for task in batch.tasks:
            _settle(task.job.payload, error=error)

    def _fail(self, failures: list[Failure]) -> None:
        """Resolve failed jobs' futures (through the outbox: an interrupt strands none of them)."""
        with self.lock:
            self._post(failures)
        self._drain()

    # ------------------------------------------------------------------ CP-SAT helper thread

    def _rows(self, inputs: Any, offset: int, n: int) -> dict[str, Tree]:
        """Rows ``offset .. offset + n`` of a job's inputs, along each modality's batch dimension."""
        first = next(iter(inputs))
        if offset == 0 and trees.check(inputs[first], self.spec.batch_dim(first)) == n:
            return inputs  # type: ignore[no-any-return]
        return {
            m: trees.take(t, slice(offset, offset + n), self.spec.batch_dim(m)) for m, t in inputs.items()
        }

    def _solve_async(self, solve: Callable[[], None]) -> None:
        if self._solver is None:
            self._solver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mosel-solver")
            weakref.finalize(self, _shutdown, self.pid, self._solver)
        ref = weakref.ref(self)

        def run() -> None:
            server = ref()
            if server is None:
                return
            try:
                solve()
            except Exception:  # a solver failure keeps the greedy assignment
                _log.exception("CP-SAT re-assignment failed; keeping the greedy assignment")
                server.stats.count("solver_errors")
            with server.lock:
                server._post(server.scheduler.apply_pending_improvement(server.clock.now()))
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
        with _deferred_interrupts(), self.lock:
            self.closed = True
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
    """The executor thread: dispatch, execute, resolve; holds its server only while it works."""
    server: Server | None
    while True:
        with cond:
            while True:
                server = ref()
                if server is None or server.pid != os.getpid():
                    return
                scheduler = server.scheduler
                if scheduler.in_flight is None and scheduler.queue:
                    break
                if server.closed and not scheduler.queue and scheduler.in_flight is None:
                    server.watch.notify_all()  # the watchdog ends with the executor
                    return
                del server, scheduler
                cond.wait()
            _running().add(id(server))
            batch = server._next_batch()
        _serve(server, batch)
        del server, scheduler, batch  # hold nothing of the server while waiting


def _serve(server: Server, batch: Batch | None) -> None:
    """One turn of the executor, outside the lock; nothing it raises escapes."""
    try:
        server._drain()
        if batch is not None:
            done, _ = server._execute(batch)
            server._drain()
            for job in done:
                server._resolve(job)
            server._settled(batch)
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
            if server is None or server.pid != os.getpid():
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


def _settle(
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


def _own(error: BaseException) -> BaseException:
    """``error`` as a job's failure: a ``BaseException`` that is not an ``Exception`` is wrapped."""
    if isinstance(error, Exception):
        return error
    wrapped = ExecutionError(
        f"the model's code raised {type(error).__name__} while serving this job; the job is failed "
        f"and the model keeps serving"
    )
    wrapped.__cause__ = error
    return wrapped


class _Future(concurrent.futures.Future[Result]):
    """A future whose done-callbacks cannot stop the thread that resolves it.

    ``concurrent.futures`` lets a callback's ``BaseException`` (``SystemExit``) escape from
    ``set_result`` into mosel's executor; here every callback is guarded and its error logged.
    """

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Result]], object]) -> None:
        """Like ``Future.add_done_callback``; what ``fn`` raises is logged, never propagated."""

        def guarded(future: concurrent.futures.Future[Result]) -> None:
            try:
                fn(future)
            except BaseException:
                _log.exception("a done-callback of a mosel future raised; ignored")

        super().add_done_callback(guarded)


# The C functions ``signal`` wraps: the wrappers' enum conversions cost about 15 µs per handler
# swap, six swaps per served call (measured with benchmarks/overhead.py).
_raw_signal: Any = importlib.import_module("_signal") if importlib.util.find_spec("_signal") else signal
_SIGINT = int(signal.SIGINT)


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """On the main thread, hold Ctrl-C (``SIGINT``) back until the block is done.

    Scheduler state changes under the lock are short and must not be cut in half: an interrupt
    arriving meanwhile is raised (or handed to the previous handler) right after the block.
    Elsewhere (other threads, no signals) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = _raw_signal.getsignal(_SIGINT)
        if previous is None:  # a handler installed from C: Python cannot put it back
            raise TypeError
        held: list[tuple[int, Any]] = []
        _raw_signal.signal(_SIGINT, lambda signum, frame: held.append((signum, frame)))
    except (ValueError, TypeError):  # not the main interpreter, or an unusual handler
        yield
        return
    try:
        yield
    finally:
        _raw_signal.signal(_SIGINT, previous)
        if held:
            if callable(previous):
                previous(*held[0])
            elif previous == signal.SIG_DFL:
                signal.default_int_handler(*held[0])


def _synchronize(outputs: Mapping[int, Tree]) -> None:
    for output in outputs.values():
        for leaf in trees.leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                torch.cuda.synchronize(leaf.device)
                return


@atexit.register
def _close_all() -> None:
    """At interpreter exit: fail every queued job, then give running batches 5 s in all."""
    here = [server for server in list(_servers) if server.pid == os.getpid()]
    for server in here:
        server.close(cancel=True, timeout=0.0)
    deadline = time.monotonic() + 5.0
    for server in here:
        server.join(max(0.0, deadline - time.monotonic()))
