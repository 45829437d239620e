"""The default policy: every job at its cheapest admissible option, upgraded with spare device time."""

from __future__ import annotations

import bisect
import math
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from mosel.chains import LaterRows
from mosel.estimators import ArrivalEstimator, MissBudget, SlackSample
from mosel.jobs import Batch, Failure, Job, Reason, Task, deadline_us, time_us
from mosel.policies.base import Core, Policy
from mosel.policies.blocks import bind_head, least_valuable, predict, repair, take_batch
from mosel.pricing import Delayed

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
    limit_risk: ClassVar[bool] = True
    """Buy an upgrade only with the miss budget's credit, at its risk price (ablation)."""
    limit_unseen: ClassVar[bool] = True
    """Buy no upgrade while the arrivals seen cannot rule out that they need the whole device
    (:meth:`mosel.estimators.ArrivalEstimator.rho_bound`; off only for the ablation)."""
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
        self.misses = MissBudget(core.config.miss_budget)
        self.slack = SlackSample()

    def initial(self, task: Task, now: float, share: float) -> int:
        """The cheapest admissible option: accuracy is added at dispatch, if there is time."""
        return 0

    def observe_arrival(self, job: Job[Any], now: float, cheapest_us: int) -> None:
        """Track the arrival rate of work and a low quantile of arrivals' headroom."""
        self.refill(now)
        headroom = None if math.isinf(job.deadline) else (job.deadline - now) * 1e6 - cheapest_us
        self.arrivals.observe_arrival(
            now, self.core.typical(cheapest_us) / 1e6, headroom, self.core.busy, job.n
        )
        if headroom is not None:
            self.slack.arrived(headroom, job.n)

    def observe_launch(self, batch: Batch, now: float) -> None:
        """Count the batch's predicted time as time spent running."""
        self.arrivals.observe_launch(now, self.core.typical(batch.predicted_us) / 1e6)

    def observe_outcome(self, job: Job[Any], missed: bool) -> None:
        """Book a finished or refused job against the miss budget, and how close it came."""
        self.misses.outcome(job.n, missed)
        if not math.isinf(job.deadline):
            finished = job.finished if not missed else job.deadline + 1.0
            self.slack.finished((job.deadline - finished) * 1e6, job.n)

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
        return least_valuable(self, late) if self.shed_by_density else late

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

    def allowance(self, tasks: list[Task], now: float, base: int) -> tuple[float, Reason, _Risk]:
        """How much the batch (priced ``base``) may grow, the limit that binds, and what it risks.

        The limits are the spare-capacity budget, the batch's own deadlines and each queued
        job's slack (less the work arrivals until its deadline bring); the risk is what the
        upgrade's expected added misses are priced on (see :meth:`upgrade`).
        """
        core = self.core
        now_us = time_us(now)
        allowed = self.budget_s * 1e6 if self.limit_budget else math.inf
        binding = Reason.SPARE_CAPACITY
        rho = self.arrivals.rho(now)
        own = min(deadline_us(t.job) for t in tasks) - now_us - base
        if own < allowed:
            allowed, binding = own, Reason.DEADLINE
        risk = _Risk(self, tasks, now, base)
        if core.queue:  # each queued job keeps its slack, less what arrivals until its deadline need
            end = min(len(core.queue), self.horizon)
            finish, _ = predict(self, time_us((now_us + base) / 1e6), end)
            deadlines = core.deadlines_us[:end]
            slack = deadlines - np.asarray(finish, dtype=np.int64)
            waiting = ~core.lenient[:end]
            risk.queued(slack[waiting] + base, [t.n for t, w in zip(core.queue[:end], waiting) if w])
            keep = waiting & (slack >= 0)
            if keep.any():
                reserve = rho * (deadlines - now_us) if self.limit_reserve else 0.0
                queue = float((slack - reserve)[keep].min())
                if queue < allowed:
                    allowed, binding = queue, Reason.QUEUE
        return allowed, binding, risk

    def upgrade(self, tasks: list[Task], now: float) -> None:
        """Raise the batch's options, most accuracy per microsecond first, within the limits.

        With :attr:`limit_risk`, an upgrade is bought only while its risk price (the misses it is
        expected to add, to its own jobs, the queued ones and those arriving while it runs) fits
        the miss budget's credit (:class:`mosel.estimators.MissBudget`); with the budget spent,
        nothing is upgraded and the batch runs as the cheapest admissible policy runs it.
        """
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
        held = self._held(now)
        if held is not None:
            _explain(tasks, held)
            return
        allowed, binding, risk = self.allowance(tasks, now, base)
        if allowed > 0:
            before = [t.k for t in tasks]
            if len(tasks) == 1:  # the common case: the option's own latency is the batch's
                task = tasks[0]
                task.k = max(task.k, bisect.bisect_right(task.lat, task.lat[task.k] + allowed) - 1)
            else:
                self._raise_merged(tasks, base, allowed)
            if self.limit_risk and self._priced_by_risk(tasks, before, risk):
                binding = Reason.MISS_BUDGET
            if [t.k for t in tasks] != before:
                self.budget_s -= (core.merged_latency_us(tasks) - base) / 1e6
                core.count("upgraded")
        _explain(tasks, binding)

    def _held(self, now: float) -> Reason | None:
        """Why nothing may be upgraded now, whatever the batch (None: upgrades may be priced)."""
        usable = 1.0 - self.core.config.spare_margin
        if self.limit_budget and self.arrivals.rho(now) >= usable:
            return Reason.OVERLOAD  # no spare time now: a stored budget is not spent into an overload
        if self.limit_unseen and self.arrivals.rho_bound(now) >= usable:
            return Reason.UNSEEN_LOAD  # too little watched (a cold start): the next may be a flood
        if self.limit_risk and not self.misses.open:
            return Reason.MISS_BUDGET
        return None

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

    def _priced_by_risk(self, tasks: list[Task], before: list[int], risk: _Risk) -> bool:
        """Lower the raised options until their risk price fits the credit, and pay it.

        Steps are undone from the last raised task down; True when the risk bound lowered them.
        """
        ks = [t.k for t in tasks]
        candidates: list[list[int]] = [ks]
        for i in range(len(tasks) - 1, -1, -1):  # the raises undone one step at a time, last task first
            while ks[i] > before[i]:
                ks = list(ks)
                ks[i] -= 1
                candidates.append(ks)
        corrected = np.asarray(self._corrected(tasks, candidates), dtype=np.float64)
        chosen, added = risk.first_within(corrected, self.misses.credit)
        for task, k in zip(tasks, candidates[chosen]):
            task.k = k
        self.misses.spend(max(added, 0.0))
        return chosen > 0

    def _corrected(self, tasks: list[Task], candidates: list[list[int]]) -> list[float]:
        """Each candidate's corrected median (options ``candidates[c]``), as the pricer computes it.

        One running batch (:class:`mosel.pricing.BatchLatency`) steps from each candidate to the
        next, one task's option at a time; batches with chains, or beyond the measured buckets,
        are priced whole by the pricer instead.
        """
        core = self.core
        cost = tasks[0].job.cost
        batch = core.batch_latency(cost)
        for task in tasks:
            batch.add(task.strategy)
        corrected = []
        previous = candidates[0]
        for ks in candidates:
            for task, k, was in zip(tasks, ks, previous):
                if k != was:
                    batch.swap(task.option(was), task.option(k))
            previous = ks
            value = batch.corrected_us()
            if value is None:
                groups: dict[frozenset[str], int] = {}
                later: LaterRows | None = None
                for task, k in zip(tasks, ks):
                    option = task.option(k)
                    for config, count in option.groups:
                        groups[config] = groups.get(config, 0) + count
                    if option.chain is not None:
                        later = later or LaterRows()
                        later.add(option.chain, option.n)
                value = core.corrected_us(tuple(groups.items()), cost, later)
            corrected.append(value)
        return corrected


class _Risk:
    """What an upgrade of one batch puts at risk: its jobs, the queued ones, the jobs to come."""

    __slots__ = ("core", "delayed", "thresholds", "weights")

    def __init__(self, policy: Mosel, tasks: list[Task], now: float, base: int) -> None:
        self.core = core = policy.core
        now_us = time_us(now)
        own = [t for t in tasks if not t.job.best_effort]
        self.thresholds = np.asarray([deadline_us(t.job) - now_us for t in own], dtype=np.float64)
        self.weights = np.asarray([t.n for t in own], dtype=np.float64)
        estimator = policy.arrivals
        # Jobs arriving before the device next idles: at the rate jobs arrive while it is busy
        # (a caller that waits for each result never arrives behind its own job), over the
        # batch, the queued work and the busy period they start (stretched by 1 / (1 - load)).
        load = min(estimator.rho(now), 0.95)
        busy_us = (base + float(core.latency_us.sum())) / (1.0 - load)
        jobs = (estimator.busy_rate() or 0.0) / 1e6 * busy_us
        self.delayed = Delayed(jobs, estimator.mean_requests, policy.slack.share_missing)

    def queued(self, thresholds_us: npt.NDArray[np.int64], requests: list[int]) -> None:
        """The queued jobs behind the batch: each misses when the batch outlasts its threshold."""
        self.thresholds = np.concatenate([self.thresholds, thresholds_us.astype(np.float64)])
        self.weights = np.concatenate([self.weights, np.asarray(requests, dtype=np.float64)])

    def first_within(self, corrected_us: npt.NDArray[np.float64], credit: float) -> tuple[int, float]:
        """The first candidate whose added expected misses fit ``credit``, and what it adds.

        Added over the last candidate (the batch as it was), which is chosen when none fits.
        """
        return self.core.first_within(corrected_us, self.thresholds, self.weights, credit, self.delayed)


def _explain(tasks: list[Task], reason: Reason) -> None:
    """Record why tasks left below their most accurate option stay there."""
    for task in tasks:
        if task.k < len(task.lat) - 1:
            task.job.reason = reason
