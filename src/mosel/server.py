"""The threaded driver of the online stage: one queue and one executor thread per model.

``submit`` validates on the caller's thread and hands the job to the :class:`~mosel.scheduler.Scheduler`
under the server's lock; the executor thread dispatches batches, runs them outside the lock and
reports completions. A lone ``infer`` on an idle model runs on the caller's thread (the device is
free and nobody waits), which costs no thread hand-off. CP-SAT improvements run on a helper
thread and never block the executor.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mosel.clock import Clock, MonotonicClock
from mosel.execution import Result, RowPlanCache, check_inputs, check_slo, plan_rows, run_recovering
from mosel.plan import ACCURACY_SCALE, Strategy
from mosel.profiles import Profile
from mosel.scheduler import Batch, Failure, Job, Scheduler, SchedulerConfig
from mosel.spec import ModelSpec
from mosel.stats import Stats

__all__ = ["Server"]

_log = logging.getLogger("mosel")
_servers: weakref.WeakSet[Server] = weakref.WeakSet()


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
    ) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.row_plans = row_plans
        self.clock = clock or MonotonicClock()
        self.stats = Stats()
        self.cond = threading.Condition()
        self.scheduler = Scheduler(profile, config, self.stats, solve_async=self._solve_async)
        self.closed = False
        self._thread: threading.Thread | None = None
        self._solver: concurrent.futures.ThreadPoolExecutor | None = None
        _servers.add(self)

    # ------------------------------------------------------------------ caller side

    def _job(
        self,
        inputs: Mapping[str, Tensor],
        deadline_ms: float | None,
        min_accuracy: float | None,
        best_effort: bool,
        future: bool = True,
    ) -> Job:
        arrival = self.clock.now()
        check_slo(deadline_ms, min_accuracy)
        tensors, available, n = check_inputs(inputs, self.spec, self.device())
        return Job(
            n=n,
            available=available,
            arrival=arrival,
            deadline_ms=deadline_ms,
            min_accuracy=min_accuracy,
            best_effort=best_effort,
            inputs=tensors,
            payload=concurrent.futures.Future() if future else None,
        )

    def submit(
        self,
        inputs: Mapping[str, Tensor],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
    ) -> concurrent.futures.Future[Result]:
        """Queue a job; the future resolves to a :class:`Result` or the job's error."""
        job = self._job(inputs, deadline_ms, min_accuracy, best_effort)
        with self.cond:
            failures = self._admit_locked(job)
        self._fail(failures)
        future: concurrent.futures.Future[Result] = job.payload
        future.add_done_callback(functools.partial(self._on_cancel, job=job))
        return future

    def _admit_locked(self, job: Job) -> list[Failure]:
        """Queue ``job`` and wake the executor (the caller holds ``self.cond``)."""
        failures = self.scheduler.admit(job, self.clock.now())
        self._start_thread()
        self.cond.notify_all()
        return failures

    def infer(
        self,
        inputs: Mapping[str, Tensor],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
    ) -> Result:
        """Serve a job and wait for it; on an idle model it runs on the calling thread."""
        job = self._job(inputs, deadline_ms, min_accuracy, best_effort, future=False)
        with self.cond:
            batch = self.scheduler.start_alone(job, self.clock.now())
            if batch is None:
                job.payload = concurrent.futures.Future()
                failures = self._admit_locked(job)
        if batch is None:
            self._fail(failures)
            future: concurrent.futures.Future[Result] = job.payload
            return future.result()
        done, failures = self._execute(batch)
        self._fail(failures)
        if job.error is not None:
            raise job.error
        return self._result(done[0])

    async def ainfer(
        self,
        inputs: Mapping[str, Tensor],
        *,
        deadline_ms: float | None = None,
        min_accuracy: float | None = None,
        best_effort: bool = False,
    ) -> Result:
        """``await``-able :meth:`submit`."""
        future = self.submit(
            inputs, deadline_ms=deadline_ms, min_accuracy=min_accuracy, best_effort=best_effort
        )
        return await asyncio.wrap_future(future)

    def _on_cancel(self, future: concurrent.futures.Future[Result], job: Job) -> None:
        if future.cancelled():
            with self.cond:
                self.scheduler.cancel(job)
                self.cond.notify_all()

    # ------------------------------------------------------------------ executor side

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mosel-executor", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.scheduler.in_flight is not None or not self.scheduler.queue:
                    if self.closed and not self.scheduler.queue and self.scheduler.in_flight is None:
                        return
                    self.cond.wait()
                batch, failures = self.scheduler.dispatch(self.clock.now())
                if batch is not None:
                    for task in batch.tasks:
                        future = task.job.payload
                        if not future.running() and not future.done():
                            future.set_running_or_notify_cancel()
            self._fail(failures)
            if batch is not None:
                done, failures = self._execute(batch)
                self._fail(failures)
                for job in done:
                    self._resolve(job)

    def _execute(self, batch: Batch) -> tuple[list[Job], list[Failure]]:
        """Run a batch outside the lock, isolating faults, and report its completion."""
        timings: dict[str, float] | None = {} if self.device().type == "cpu" else None
        outputs: dict[int, Tensor] = {}
        errors: dict[int, BaseException] = {}
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                if len(batch.tasks) == 1:
                    task = batch.tasks[0]
                    outputs[0] = run_recovering(
                        self.model, self.spec, task.strategy, _rows(task.job.inputs, task.offset, task.n),
                        self.row_plans, timings,
                    )  # fmt: skip
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
        measured_us = (time.perf_counter() - started) * 1e6
        for position, output in outputs.items():
            job = batch.tasks[position].job
            job.outputs.append((batch.tasks[position].index, output))
        with self.cond:
            done, failures = self.scheduler.complete(
                batch, self.clock.now(), measured_us, timings if not errors else None, errors
            )
            self.cond.notify_all()
        return done, failures

    def _run_merged(self, batch: Batch, timings: dict[str, float] | None) -> dict[int, Tensor]:
        """One execution for several jobs' rows, grouped by configuration, split back after."""
        pieces: dict[str, list[Tensor]] = {m: [] for m in self.spec.modalities}
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
        inputs = {m: torch.cat(ts) for m, ts in pieces.items() if ts}
        merged = run_recovering(self.model, self.spec, batch.merged, inputs, self.row_plans, timings)
        parts: dict[tuple[int, Configuration], Tensor] = {}
        offset = 0
        for position, config, count in layout:
            parts[(position, config)] = merged[offset : offset + count]
            offset += count
        outputs = {}
        for position, strategy in enumerate(batch.strategies):
            chunks = [parts[(position, c)] for c, _ in strategy.groups]
            outputs[position] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return outputs

    def _run_separately(self, batch: Batch) -> tuple[dict[int, Tensor], dict[int, BaseException]]:
        outputs: dict[int, Tensor] = {}
        errors: dict[int, BaseException] = {}
        for position, task in enumerate(batch.tasks):
            try:
                with torch.inference_mode():
                    outputs[position] = run_recovering(
                        self.model, self.spec, task.strategy, _rows(task.job.inputs, task.offset, task.n),
                        self.row_plans,
                    )  # fmt: skip
            except Exception as exc:
                errors[position] = exc
        return outputs, errors

    def _resolve(self, job: Job) -> None:
        future: concurrent.futures.Future[Result] | None = job.payload
        if future is not None and not future.done():
            future.set_result(self._result(job))

    def _result(self, job: Job) -> Result:
        if len(job.outputs) == 1:
            output = job.outputs[0][1]
        else:
            output = torch.cat([out for _, out in sorted(job.outputs, key=lambda pair: pair[0])])
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
            completion_ms=(job.finished - job.arrival) * 1000.0,
            strategies=strategies,
        )

    @staticmethod
    def _fail(failures: list[Failure]) -> None:
        for job, error in failures:
            future: concurrent.futures.Future[Result] | None = job.payload
            job.inputs = None
            if future is not None and not future.done():
                future.set_exception(error)

    # ------------------------------------------------------------------ CP-SAT helper thread

    def _solve_async(self, solve: Callable[[], None]) -> None:
        if self._solver is None:
            self._solver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mosel-solver")

        def run() -> None:
            try:
                solve()
            except Exception:  # a solver failure keeps the greedy assignment
                _log.exception("CP-SAT re-assignment failed; keeping the greedy assignment")
                self.stats.count("solver_errors")
            with self.cond:
                failures = self.scheduler.apply_pending_improvement(self.clock.now())
                self.cond.notify_all()
            self._fail(failures)

        try:
            self._solver.submit(run)
        except RuntimeError:  # closing
            self.scheduler._solving = False

    # ------------------------------------------------------------------ shutdown

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop accepting jobs; finish the queued ones (or fail them with ``cancel``); join."""
        with self.cond:
            self.closed = True
            failures = self.scheduler.close(cancel)
            self.cond.notify_all()
        self._fail(failures)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._solver is not None:
            self._solver.shutdown(wait=False, cancel_futures=True)


Configuration = frozenset[str]


def _rows(inputs: Any, offset: int, n: int) -> dict[str, Tensor]:
    if offset == 0 and next(iter(inputs.values())).shape[0] == n:
        return inputs  # type: ignore[no-any-return]
    return {m: t[offset : offset + n] for m, t in inputs.items()}


def _synchronize(outputs: Mapping[int, Tensor]) -> None:
    for output in outputs.values():
        if output.is_cuda:
            torch.cuda.synchronize(output.device)
            return


@atexit.register
def _close_all() -> None:
    for server in list(_servers):
        server.close(cancel=True, timeout=5.0)
