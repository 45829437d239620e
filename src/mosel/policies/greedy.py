"""The online stage without spare-capacity accounting: greedy repair, late binding and three hedges.

``greedy`` repairs the queue greedily on a predicted miss, raises the head at dispatch to what the
queue's slack absorbs, and caps each batch for the jobs arriving while it runs. ``greedy_cpsat``
(mosel v1) then lets CP-SAT improve the repaired assignment of the queue's head.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any

import numpy as np

from mosel.assign import Item, cpsat_assign
from mosel.estimators import ArrivalEstimator
from mosel.jobs import NO_DEADLINE_US, Batch, Failure, Job, Task, time_us
from mosel.policies.base import Core, Policy
from mosel.policies.blocks import bind_head, repair, take_batch

__all__ = ["Greedy", "GreedyCpsat"]

Solved = tuple[list[Task], int, list[int] | None, float]
"""What a CP-SAT solve returns to :meth:`GreedyCpsat.solved`: the tasks it assigned (the queue's
head when it started), the prices' version then, one option per task (None: no answer), and its
time in ms."""


class Greedy(Policy):
    """The online stage without CP-SAT: greedy re-assignment, late binding and the hedges.

    On a predicted miss the queue prefix up to the last late job is repaired greedily
    (:func:`mosel.policies.blocks.repair`). At dispatch the head is raised to the most accurate
    option the queue's slack absorbs, consecutive jobs are merged when that helps, and three
    hedges cap the batch's latency for the jobs that will arrive while it runs
    (``SchedulerConfig.hedge``, ``risk``, ``reserve``; see ``docs/online.md``).
    """

    name = "greedy"

    def __init__(self, core: Core) -> None:
        super().__init__(core)
        self.arrivals = ArrivalEstimator(core.config.load_window_s)
        self.waiting = 0.0  # EWMA over dispatches: tasks left waiting behind the dispatched one

    def observe_arrival(self, job: Job[Any], now: float, cheapest_us: int) -> None:
        """Update what the hedges know of arrivals: headroom, rate and work."""
        headroom = None if math.isinf(job.deadline) else (job.deadline - now) * 1e6 - cheapest_us
        self.arrivals.observe_arrival(now, self.core.typical(cheapest_us) / 1e6, headroom, self.core.busy)

    def observe_launch(self, batch: Batch, now: float) -> None:
        """Count the batch's predicted time as time spent running."""
        self.arrivals.observe_launch(now, self.core.typical(batch.predicted_us) / 1e6)

    def replan(self, now: float) -> list[Failure]:
        """On a predicted miss, repair the prefix up to the last late job."""
        core = self.core
        if not core.queue or not (core.finishes_us(now) > core.deadlines_us).any():
            return []
        failures = repair(self, now)
        self.repaired(now)
        return failures

    def repaired(self, now: float) -> None:
        """Called after each greedy repair (:class:`GreedyCpsat` asks CP-SAT to improve on it)."""

    def alone(self, task: Task, now: float) -> None:
        """A lone job is hedged like any batch."""
        self.hedge([task], now)

    def dispatch(self, now: float) -> tuple[list[Task], list[Failure]]:
        """Late-bind the head, merge the followers that help, hedge the batch."""
        core = self.core
        failures = bind_head(self, now, upgrade=True)
        if not core.queue:
            return [], failures
        self.waiting = 0.9 * self.waiting + 0.1 * (len(core.queue) - 1)
        tasks = take_batch(self, now)
        self.hedge(tasks, now)
        return tasks, failures

    def hedge(self, tasks: list[Task], now: float) -> None:
        """Shorten the batch about to run so that work arriving meanwhile keeps its chance.

        Three caps on the batch's latency: a job arriving during the run must still fit in its
        headroom (``risk``); under load, the run takes at most ``hedge`` of the typical headroom;
        every queued job must keep, beyond its cheapest strategy, the time that recent arrivals'
        work will take until its deadline (``reserve``). The batch is lowered cheapest accuracy
        loss per microsecond first, never below a floor.
        """
        core = self.core
        config = core.config
        arrivals = self.arrivals
        arrivals.decay_to(now)
        cap = math.inf
        rate = arrivals.busy_rate()
        if config.risk > 0 and arrivals.headroom_low_us > 0 and rate is not None:
            cap = arrivals.headroom_low_us + config.risk / rate * 1e6
        if config.hedge > 0 and self.waiting >= 1.0:
            cap = min(cap, config.hedge * arrivals.headroom_mean_us)
        if config.reserve > 0 and core.queue:
            reserve = min(1.0, config.reserve * arrivals.work())
            remaining = (core.deadlines_us - now * 1e6).astype(np.float64)
            ahead = np.cumsum(core.cheapest_us)
            cap = min(cap, float((remaining * (1.0 - reserve) - ahead).min()))
        latency = core.merged_latency_us(tasks)
        if latency <= cap:
            return
        core.count("hedged")
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
                task = max(lowerable, key=_step_value)
                excess -= task.lat[task.k] - task.lat[task.k - 1]
                task.k -= 1
            latency = core.merged_latency_us(tasks)


def _step_value(task: Task) -> float:
    """Microseconds saved per accuracy unit lost by lowering ``task`` one option."""
    saved = task.lat[task.k] - task.lat[task.k - 1]
    return saved / max(1, task.acc[task.k] - task.acc[task.k - 1])


class GreedyCpsat(Greedy):
    """:class:`Greedy` at once, then CP-SAT improves the assignment of the queue head (mosel v1).

    After each greedy repair, CP-SAT (on the driver's helper thread, or inline and deterministic
    in simulations) re-assigns the first ``solver_window`` queued tasks exactly, under every
    job's own deadline and floor; its answer is applied only if the queue has not changed, every
    deadline still holds, and it is more accurate. The helper rests between solves
    (``solver_share``).
    """

    name = "greedy_cpsat"

    def __init__(self, core: Core) -> None:
        super().__init__(core)
        self.solving = False
        self.again = False  # a repair happened while solving: solve again afterwards
        self.rest_until = -math.inf  # solver_share: no asynchronous solve before this
        self.backoff = 1.0  # doubles after each solve that did not improve on greedy

    def repaired(self, now: float) -> None:
        """Ask CP-SAT to improve on the greedy repair, if it is allowed to run now."""
        core = self.core
        config = core.config
        if core.solve_async is None and not config.deterministic:
            return
        if self.solving:
            self.again = True
            return
        if now < self.rest_until:
            core.count("solver_rested")
            return
        finite = np.flatnonzero(core.deadlines_us < NO_DEADLINE_US)
        if not len(finite):
            return
        end = min(int(finite[-1]) + 1, config.solver_window)
        start_us = time_us(core.start(now))
        finish = start_us + np.cumsum(core.latency_us)
        budget = None
        if end < len(core.queue):  # jobs behind the window keep their slack
            behind = int((core.deadlines_us[end:] - finish[end:]).min())
            budget = int(finish[end - 1] - start_us + max(0, behind))
        snapshot = list(core.queue[:end])
        items = [t.item for t in snapshot]
        hint = [t.k for t in snapshot]
        version = core.version

        limit_s, deterministic = config.solver_time_limit_s, config.deterministic

        def solve() -> Solved:
            return _solve(snapshot, version, items, start_us, hint, budget, limit_s, deterministic)

        if config.deterministic:  # simulations: the solve is charged its budget, then rests as live
            solved = solve()
            self.apply(*solved, now)
            self.rest(config.solver_time_limit_s * 1000.0, now)
            return
        assert core.solve_async is not None
        self.solving = True
        core.solve_async(solve)

    def solved(self, now: float, result: Any) -> list[Failure]:
        """Apply the returned solve if still valid; rest; solve again if asked meanwhile."""
        self.solving = False
        if result is not None:
            snapshot, version, ks, elapsed_ms = result
            self.apply(snapshot, version, ks, elapsed_ms, now)
            self.rest(elapsed_ms, now)
        if self.again and math.isfinite(now):
            self.again = False
            return self.replan(now)
        return []

    def rest(self, busy_ms: float, now: float) -> None:
        """After a solve that kept the helper busy ``busy_ms``: no solve for a while (solver_share)."""
        rest_ms = busy_ms * (1.0 / self.core.config.solver_share - 1.0) * self.backoff
        self.rest_until = now + rest_ms / 1000.0

    def apply(
        self, snapshot: list[Task], version: int, ks: list[int] | None, elapsed_ms: float, now: float
    ) -> None:
        """Take a CP-SAT assignment if the queue still starts with ``snapshot`` and it is better."""
        core = self.core
        core.observe("solver", elapsed_ms)
        if ks is None:
            core.count("solver_no_answer")
            return
        end = len(snapshot)
        if version != core.version or list(core.queue[:end]) != snapshot:
            core.count("solver_stale")
            return
        latency = core.latency_us.copy()
        latency[:end] = [t.lat[k] for t, k in zip(snapshot, ks)]
        finish = time_us(core.start(now)) + np.cumsum(latency)
        if (finish > core.deadlines_us).any():
            core.count("solver_stale")
            return
        if sum(t.acc[k] for t, k in zip(snapshot, ks)) > sum(t.acc[t.k] for t in snapshot):
            for i, (task, k) in enumerate(zip(snapshot, ks)):
                core.set_option(task, k, i)
            core.count("solver_improved")
            self.backoff = 1.0
        else:
            self.backoff = min(64.0, 2.0 * self.backoff)
            core.count("solver_confirmed")


def _solve(
    snapshot: list[Task],
    version: int,
    items: list[Item],
    start_us: int,
    hint: list[int],
    budget: int | None,
    time_limit_s: float,
    deterministic: bool,
) -> Solved:
    """One CP-SAT solve of a snapshot of the queue's head (pure: runs on any thread)."""
    started = time.perf_counter()
    ks, _ = cpsat_assign(
        items, start_us, hint, time_limit_s=time_limit_s, deterministic=deterministic, budget_us=budget
    )
    return snapshot, version, ks, (time.perf_counter() - started) * 1000.0
