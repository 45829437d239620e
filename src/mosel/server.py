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

from mosel import trees
from mosel.clock import Clock, MonotonicClock
from mosel.errors import ExecutionError, OutputError
from mosel.execution import Result, RowPlanCache, check_inputs, check_slo, concat, plan_rows, run_recovering
from mosel.plan import ACCURACY_SCALE, Strategy
from mosel.profiles import Profile
from mosel.scheduler import Batch, Failure, Job, Scheduler, SchedulerConfig
from mosel.spec import ModelSpec
from mosel.stats import Stats
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
        self.scheduler = Scheduler(profile, config, self.stats, solve_async=self._solve_async)
        self.closed = False
        self.pid = os.getpid()
        self._watch_at = float("inf")  # when the watchdog means to wake
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._solver: concurrent.futures.ThreadPoolExecutor | None = None
        weakref.finalize(self, _wake, self.lock, self.cond, self.watch)
        _servers.add(self)

    # ------------------------------------------------------------------ caller side

    def _job(
        self,
        inputs: Mapping[str, Tree],
        deadline_ms: object,
        min_accuracy: object,
        best_effort: bool,
        future: bool = True,
    ) -> Job:
        arrival = self.clock.now()
        deadline, floor = check_slo(deadline_ms, min_accuracy)
        tensors, available, n = check_inputs(inputs, self.spec, self.device())
        return Job(
            n=n,
            available=available,
            arrival=arrival,
            deadline_ms=deadline,
            min_accuracy=floor,
            best_effort=bool(best_effort),
            inputs=tensors,
            payload=concurrent.futures.Future() if future else None,
        )

    def submit(
        self,
        inputs: Mapping[str, Tree],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
    ) -> concurrent.futures.Future[Result]:
        """Queue a job; the future resolves to a :class:`Result` or the job's error."""
        job = self._job(inputs, deadline_ms, min_accuracy, best_effort)
        future: concurrent.futures.Future[Result] = job.payload
        if id(self) in _running():  # called back from this model's own batch: never queue behind it
            try:
                future.set_result(self._inline(job))
            except Exception as exc:
                future.set_exception(exc)
            return future
        with self.lock:
            failures = self._admit_locked(job)
        self._fail(failures)
        future.add_done_callback(functools.partial(self._on_cancel, job=job))
        return future

    def _admit_locked(self, job: Job) -> list[Failure]:
        """Queue ``job`` and wake the executor (the caller holds ``self.lock``)."""
        failures = self.scheduler.admit(job, self.clock.now())
        self._start_threads()
        self.cond.notify()
        self._poke_watchdog()
        return failures

    def infer(
        self,
        inputs: Mapping[str, Tree],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
    ) -> Result:
        """Serve a job and wait for it; on an idle model it runs on the calling thread."""
        job = self._job(inputs, deadline_ms, min_accuracy, best_effort, future=False)
        if id(self) in _running():  # called back from this model's own batch: run it here
            return self._inline(job)
        with self.lock:
            batch = self.scheduler.start_alone(job, self.clock.now())
            if batch is None:
                job.payload = concurrent.futures.Future()
                failures = self._admit_locked(job)
        if batch is None:
            self._fail(failures)
            future: concurrent.futures.Future[Result] = job.payload
            future.add_done_callback(functools.partial(self._on_cancel, job=job))
            try:
                return future.result()
            except BaseException:
                future.cancel()  # interrupted while waiting (Ctrl-C): take the job out of the queue
                raise
        done, failures, interrupt = self._execute(batch)
        self._fail(failures)
        if interrupt is not None:
            raise interrupt
        if job.error is not None:
            raise job.error
        return self._result(done[0])

    async def ainfer(
        self,
        inputs: Mapping[str, Tree],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
    ) -> Result:
        """``await``-able :meth:`submit`; cancelling the awaiting task cancels the queued job."""
        future = self.submit(
            inputs, deadline_ms=deadline_ms, min_accuracy=min_accuracy, best_effort=best_effort
        )
        return await asyncio.wrap_future(future)

    def _on_cancel(self, future: concurrent.futures.Future[Result], job: Job) -> None:
        if future.cancelled():
            with self.lock:
                self.scheduler.cancel(job)
                self.cond.notify()

    def _inline(self, job: Job) -> Result:
        """Serve a job on this thread, outside the queue (a call from inside this model's batch).

        The same admission and strategy choice as a lone job on an idle device; the queue and the
        running batch are left alone, so the call cannot wait for itself.
        """
        with self.lock:
            self.scheduler.prepare_inline(job, self.clock.now())
        started = time.perf_counter()
        outputs = []
        for task in job.tasks:
            rows = _rows(job.inputs, task.offset, task.n)
            outputs.append(run_recovering(self.model, self.spec, task.strategy, rows, self.row_plans))
        job.outputs = [(0, concat(outputs, f"fusion {self.spec.fusion!r}"))]
        job.measured_us = (time.perf_counter() - started) * 1e6
        job.predicted_us = sum(t.strategy.latency_us for t in job.tasks)
        job.finished = self.clock.now()
        self.stats.count("served_inline")
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

    def _next_batch(self) -> tuple[Batch | None, list[Failure]]:
        """Dispatch under the lock; marks the batch's futures as running."""
        try:
            batch, failures = self.scheduler.dispatch(self.clock.now())
        except Exception as exc:  # a scheduler bug: fail what waits rather than die or spin
            _log.exception("mosel scheduler failed to dispatch; failing the queued jobs")
            failed = [self.scheduler.fail(task.job, exc) for task in list(self.scheduler.queue)]
            return None, [f for f in failed if f is not None]
        if batch is not None:
            for task in batch.tasks:
                future = task.job.payload
                if future is not None and not future.done() and not future.running():
                    future.set_running_or_notify_cancel()
            self._poke_watchdog()
        return batch, failures

    def _execute(self, batch: Batch) -> tuple[list[Job], list[Failure], BaseException | None]:
        """Run a batch outside the lock, isolating faults, and report its completion.

        Returns the finished jobs, the failed ones, and a ``BaseException`` that is not an
        ``Exception`` (Ctrl-C, ``SystemExit``) if the model's code raised one: the caller's own
        thread re-raises it after the scheduler has been told, the executor thread does not.
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
                        rows = _rows(task.job.inputs, task.offset, task.n)
                        outputs[0] = run_recovering(
                            self.model, self.spec, task.strategy, rows, self.row_plans, timings
                        )
                    else:
                        outputs = self._run_merged(batch, timings)
                    _synchronize(outputs)
            except Exception as exc:
                if len(batch.tasks) == 1:
                    errors[0] = exc
                else:  # fail only the jobs the error belongs to: re-run each task alone
                    _log.info(
                        "merged batch failed (%s); re-running its %d jobs separately", exc, len(batch.tasks)
                    )
                    outputs, errors = self._run_separately(batch)
            self._assemble(batch, outputs, errors)
        except BaseException as exc:  # the model's code raised SystemExit, KeyboardInterrupt, ...
            interrupt = exc
            outputs = {}
            wrapped = ExecutionError(
                f"the model's code raised {type(exc).__name__} while serving this job; the job is "
                f"failed and the model keeps serving"
            )
            wrapped.__cause__ = exc
            errors = dict.fromkeys(range(len(batch.tasks)), wrapped)
        finally:
            if not nested:
                running.discard(id(self))
        measured_us = (time.perf_counter() - started) * 1e6
        with self.lock:
            done, failures = self.scheduler.complete(
                batch, self.clock.now(), measured_us, timings if not errors else None, errors
            )
            self.cond.notify()
        return done, failures, interrupt

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
                        rows = _rows(task.job.inputs, task.offset + start, count)
                        for m, t in rows.items():
                            pieces[m].append(t)
                        layout.append((position, config, count))
                    start += count
        inputs = {m: trees.concat(ts) for m, ts in pieces.items() if ts}
        merged = run_recovering(self.model, self.spec, batch.merged, inputs, self.row_plans, timings)
        parts: dict[tuple[int, Configuration], Tree] = {}
        offset = 0
        for position, config, count in layout:
            parts[(position, config)] = trees.take(merged, slice(offset, offset + count))
            offset += count
        return {
            position: trees.concat([parts[(position, c)] for c, _ in strategy.groups])
            for position, strategy in enumerate(batch.strategies)
        }

    def _run_separately(self, batch: Batch) -> tuple[dict[int, Tree], dict[int, BaseException]]:
        outputs: dict[int, Tree] = {}
        errors: dict[int, BaseException] = {}
        for position, task in enumerate(batch.tasks):
            try:
                with torch.inference_mode():
                    rows = _rows(task.job.inputs, task.offset, task.n)
                    outputs[position] = run_recovering(
                        self.model, self.spec, task.strategy, rows, self.row_plans
                    )
            except Exception as exc:
                errors[position] = exc
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
            rows = plan_rows(task.strategy, self.spec, _rows(job.inputs, task.offset, task.n), self.row_plans)
            modalities += rows.modalities
        strategies: tuple[Strategy, ...] = job.strategies
        job.inputs = None  # release the request's tensors
        return Result(
            output=output,
            modalities=modalities,
            expected_accuracy=sum(s.accuracy_units for s in strategies) / (job.n * ACCURACY_SCALE),
            predicted_latency_ms=job.predicted_us / 1000.0,
            measured_latency_ms=job.measured_us / 1000.0,
            completion_ms=(self.clock.now() - job.arrival) * 1000.0,
            strategies=strategies,
        )

    def _fail_batch(self, batch: Batch, error: BaseException) -> None:
        """Resolve every job of a batch with ``error`` (after an unexpected executor error)."""
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

    @staticmethod
    def _fail(failures: list[Failure]) -> None:
        for job, error in failures:
            job.inputs = None
            _settle(job.payload, error=error)

    # ------------------------------------------------------------------ CP-SAT helper thread

    def _solve_async(self, solve: Callable[[], None]) -> None:
        if self._solver is None:
            self._solver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mosel-solver")
            weakref.finalize(self, self._solver.shutdown, wait=False, cancel_futures=True)
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
                failures = server.scheduler.apply_pending_improvement(server.clock.now())
                server.cond.notify()
            server._fail(failures)

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
        with self.lock:
            self.closed = True
            failures = self.scheduler.close(cancel)
            self.cond.notify_all()
            self.watch.notify_all()
        self._fail(failures)
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
            batch, failures = server._next_batch()
        _serve(server, batch, failures)
        del server, scheduler, batch, failures  # hold nothing of the server while waiting


def _serve(server: Server, batch: Batch | None, failures: list[Failure]) -> None:
    """One turn of the executor, outside the lock; nothing it raises escapes."""
    try:
        server._fail(failures)
        if batch is not None:
            done, failures, _ = server._execute(batch)
            server._fail(failures)
            for job in done:
                server._resolve(job)
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
            failures = scheduler.expire(now) if scheduler.in_flight is not None else []
            expiry = scheduler.next_expiry()
            server._watch_at = float("inf") if expiry is None else expiry
            if failures:
                server.cond.notify()
            else:
                del server, scheduler
                watch.wait(None if expiry is None else max(expiry - now, 0.0) + 1e-4)
                continue
        server._fail(failures)
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


def _wake(lock: threading.RLock, *conditions: threading.Condition) -> None:
    """Wake a collected server's threads so that they notice and end."""
    with lock:
        for condition in conditions:
            condition.notify_all()


def _rows(inputs: Any, offset: int, n: int) -> dict[str, Tree]:
    if offset == 0 and trees.check(next(iter(inputs.values()))) == n:
        return inputs  # type: ignore[no-any-return]
    return {m: trees.take(t, slice(offset, offset + n)) for m, t in inputs.items()}


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
