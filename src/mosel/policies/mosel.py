"""The default policy: every job at its cheapest admissible option, upgraded with spare device time."""

from __future__ import annotations

import bisect
import math
from typing import Any, ClassVar

import numpy as np

from mosel.estimators import ArrivalEstimator
from mosel.jobs import Batch, Failure, Job, Reason, Task, deadline_us, time_us
from mosel.policies.base import Core, Policy
from mosel.policies.blocks import bind_head, predict, repair, take_batch

__all__ = ["Mosel"]


class Mosel(Policy):
    """The default: every job at its cheapest admissible option, upgraded with spare device time.

    A job is admitted at the cheapest strategy that meets its floor, which is what serves the
    most requests; accuracy is bought afterwards, at dispatch (late binding), and only with
    device time that neither the queue nor the jobs still to come need:

    * **spare capacity**: upgrades are paid from a budget of device seconds that grows at
      ``1 - rho - spare_margin`` per second, ``rho`` being the recent arrival rate of work at the
      cheapest strategies (so under overload nothing is spent and mosel serves like the static
      cheapest policy), and holds at most the headroom of a tight arrival;
    * **the queue**: the batch grows only by what every queued job's slack absorbs, with the
      queue batched as dispatch will batch it, less the work that arrivals at the recent rate
      bring before that job's deadline;
    * **the next arrival**: the batch's total latency stays within the headroom of a tight
      arrival (a low quantile of arrivals' deadline minus cheapest strategy), so a job that
      arrives while it runs still makes its deadline.

    Within those limits the batch's requests are raised by the steps that buy the most accuracy
    per microsecond. On a predicted miss the queue is repaired batch-aware
    (:func:`mosel.policies.blocks.repair`), and when a job cannot be saved the one with the
    fewest expected correct answers per microsecond at or before it is shed (weighted
    Moore-Hodgson).
    """

    name = "mosel"
    limit_budget: ClassVar[bool] = True
    """Pay upgrades from the spare-capacity budget (off only for the ablation)."""
    limit_reserve: ClassVar[bool] = True
    """Keep, before each queued job's deadline, the work arrivals bring meanwhile (ablation)."""
    limit_arrivals: ClassVar[bool] = True
    """Keep the batch within a tight arrival's headroom (ablation)."""
    shed_by_density: ClassVar[bool] = True
    """Shed the job with the fewest expected correct answers per microsecond at or before a late
    one (weighted Moore-Hodgson) rather than the late one (on 150 random traces of
    ``tests/unit/test_dominance.py``, against the static cheapest policy: 5th percentile 0.99 and
    median 1.06 of its correct answers, against 0.92 and 1.00 when the late job is shed)."""

    def __init__(self, core: Core) -> None:
        super().__init__(core)
        self.arrivals = ArrivalEstimator(core.config.load_window_s)
        self.budget_s = 0.0  # device seconds that upgrades may still spend
        self.budget_at = -math.inf  # the first refill fills it to its cap

    def initial(self, task: Task, now: float, share: float) -> int:
        """The cheapest admissible option: accuracy is added at dispatch, if there is time."""
        return 0

    def observe_arrival(self, job: Job[Any], now: float, cheapest_us: int) -> None:
        """Track the arrival rate of work and a low quantile of arrivals' headroom."""
        self.refill(now)
        headroom = None if math.isinf(job.deadline) else (job.deadline - now) * 1e6 - cheapest_us
        self.arrivals.observe_arrival(now, self.core.typical(cheapest_us) / 1e6, headroom, self.core.busy)

    def observe_launch(self, batch: Batch, now: float) -> None:
        """Count the batch's predicted time as time spent running."""
        self.arrivals.observe_launch(now, self.core.typical(batch.predicted_us) / 1e6)

    def refill(self, now: float) -> None:
        """Add the spare device time since the last refill to the budget."""
        if now <= self.budget_at:
            return
        spare = max(0.0, 1.0 - self.arrivals.rho(now) - self.core.config.spare_margin)
        low = self.arrivals.headroom_low_us
        cap = low / 1e6 if math.isfinite(low) else 1.0
        elapsed = now - self.budget_at
        self.budget_s = cap if math.isinf(elapsed) else min(cap, self.budget_s + spare * elapsed)
        self.budget_at = now

    def replan(self, now: float) -> list[Failure]:
        """Batch-aware repair on a predicted miss."""
        return repair(self, now)

    def victim(self, late: int) -> int:
        """The late job itself, or with :attr:`shed_by_density` the least valuable per microsecond."""
        if not self.shed_by_density:
            return late
        density = [
            (task.acc[0] / max(1, task.lat[0]), i)
            for i, task in enumerate(self.core.queue[: late + 1])
            if not task.job.best_effort
        ]
        return min(density)[1] if density else late

    def alone(self, task: Task, now: float) -> None:
        """A lone job on an idle device is upgraded like any batch."""
        self.upgrade([task], now)

    def dispatch(self, now: float) -> tuple[list[Task], list[Failure]]:
        """Settle the head, take the batch, then buy what accuracy the spare time allows."""
        failures = bind_head(self, now)
        if not self.core.queue:
            return [], failures
        tasks = take_batch(self, now)
        self.upgrade(tasks, now)
        return tasks, failures

    def allowance(self, tasks: list[Task], now: float, base: int) -> tuple[float, Reason]:
        """How much the batch (priced ``base``) may grow, and the limit that binds."""
        core = self.core
        config = core.config
        now_us = time_us(now)
        allowed = self.budget_s * 1e6 if self.limit_budget else math.inf
        binding = Reason.SPARE_CAPACITY
        rho = self.arrivals.rho(now)
        low = self.arrivals.headroom_low_us
        if math.isfinite(low) and config.risk > 0 and self.limit_arrivals:
            # Arrivals during the run, at the recent rate, still fit; beyond that, the run may
            # outlast a tight arrival's headroom only by as long as ``risk`` arrivals take to come.
            cap = low / (1.0 + rho)
            rate = self.arrivals.busy_rate()
            cap = cap + config.risk / rate * 1e6 if rate is not None else math.inf
            if cap - base < allowed:
                allowed, binding = cap - base, Reason.ARRIVALS
        own = min(deadline_us(t.job) for t in tasks) - now_us - base
        if own < allowed:
            allowed, binding = own, Reason.DEADLINE
        if core.queue:  # each queued job keeps its slack, less what arrivals until its deadline need
            end = min(len(core.queue), self.horizon)
            finish, _ = predict(self, time_us((now_us + base) / 1e6), end)
            deadlines = core.deadlines_us[:end]
            slack = deadlines - np.asarray(finish, dtype=np.int64)
            keep = ~core.lenient[:end] & (slack >= 0)
            if keep.any():
                reserve = rho * (deadlines - now_us) if self.limit_reserve else 0.0
                queue = float((slack - reserve)[keep].min())
                if queue < allowed:
                    allowed, binding = queue, Reason.QUEUE
        return allowed, binding

    def upgrade(self, tasks: list[Task], now: float) -> None:
        """Raise the batch's options, most accuracy per microsecond first, within the limits."""
        core = self.core
        for task in tasks:
            if task.k < len(task.lat) - 1:
                break
        else:
            return
        self.refill(now)
        batch = core.batch_latency(tasks[0].job.cost)
        for task in tasks:
            batch.add(task.strategy)
        base = batch.latency_us()
        if self.limit_budget and self.arrivals.rho(now) >= 1.0 - core.config.spare_margin:
            _explain(tasks, Reason.OVERLOAD)
            return  # no spare time now: a stored budget is not spent into an overload
        allowed, binding = self.allowance(tasks, now, base)
        if allowed > 0:
            if len(tasks) == 1:  # the common case: the option's own latency is the batch's
                task = tasks[0]
                top = bisect.bisect_right(task.lat, task.lat[task.k] + allowed) - 1
                if top > task.k:
                    self.budget_s -= (task.lat[top] - task.lat[task.k]) / 1e6
                    task.k = top
                    core.count("upgraded")
            else:
                self._raise_merged(tasks, base, allowed)
        _explain(tasks, binding)

    def _raise_merged(self, tasks: list[Task], base: int, allowed: float) -> None:
        """Raise several tasks by the steps that buy the most accuracy per microsecond.

        Each step is priced by its task's own latencies; then the merged batch is checked and the
        last steps undone while it is over.
        """
        core = self.core
        steps: list[tuple[Task, int]] = []
        used = 0
        while True:
            best: tuple[float, Task, int] | None = None
            for task in tasks:
                here = task.k
                for k in range(here + 1, len(task.lat)):
                    cost = task.lat[k] - task.lat[here]
                    if used + cost > allowed:
                        break
                    value = (task.acc[k] - task.acc[here]) / max(cost, 1)
                    if best is None or value > best[0]:
                        best = (value, task, k)
            if best is None:
                break
            _, task, k = best
            used += task.lat[k] - task.lat[task.k]
            steps.append((task, task.k))
            task.k = k
        while steps and core.merged_latency_us(tasks) - base > allowed:
            task, k = steps.pop()
            task.k = k
        if steps:
            self.budget_s -= (core.merged_latency_us(tasks) - base) / 1e6
            core.count("upgraded")


def _explain(tasks: list[Task], reason: Reason) -> None:
    """Record why tasks left below their most accurate option stay there."""
    for task in tasks:
        if task.k < len(task.lat) - 1:
            task.job.reason = reason
