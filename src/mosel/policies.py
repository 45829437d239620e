"""Scheduling policies: what the scheduler core runs, at which option, and whom it fails.

The core (:class:`mosel.scheduler.Scheduler`) owns the queue, admission, completion and the
latency correction, and knows no policy by name. A policy is one object per scheduler, called
under the driver's lock at four moments:

* :meth:`Policy.initial`: a job's initial option at admission;
* :meth:`Policy.replan`: whenever the queue changed (an arrival, a completion, the watchdog);
* :meth:`Policy.dispatch`: the device is free; bind options and choose the tasks of one batch;
* :meth:`Policy.alone`: a lone job is about to run at once on an idle device.

Class attributes say what the core must know up front: :attr:`Policy.every_modality` (tasks run
every available modality, no choice), :attr:`Policy.fifo` (arrival order instead of earliest
deadline first) and :attr:`Policy.refuse_late` (a job that cannot make its deadline even alone is
refused at admission and dropped at dispatch).

``mosel`` is the default; the others are the baselines it is measured against, available by name
in :class:`~mosel.scheduler.SchedulerConfig` for A/B tests. A policy of one's own subclasses
:class:`Policy` and is passed as ``SchedulerConfig(policy=MyPolicy)``.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from mosel.assign import cpsat_assign, greedy_repair, step_down
from mosel.jobs import NO_DEADLINE_US, Batch, Failure, Job, Task, deadline_us, time_us

if TYPE_CHECKING:
    from mosel.scheduler import Scheduler

__all__ = [
    "POLICIES",
    "Aggressive",
    "Agnostic",
    "AgnosticPlus",
    "Batcher",
    "Greedy",
    "GreedyCpsat",
    "Mosel",
    "Policy",
    "policy_class",
]


class Policy:
    """Base class of scheduling policies; by default EDF, deadline-fitting options, no re-planning.

    Subclasses override the hooks they need and use the building blocks (:meth:`bind_head`,
    :meth:`take_batch`, :meth:`predict`, :meth:`repair`) and the core's primitives
    (``core.set_option``, ``core.fail_job``, the queue arrays ``core.latency_us``,
    ``core.deadlines_us``, ...). :meth:`take_batch` removes the tasks it returns from the queue.
    """

    name: ClassVar[str] = "custom"
    every_modality: ClassVar[bool] = False
    """Every task runs every available modality (its one fixed strategy)."""
    fifo: ClassVar[bool] = False
    """Queue in arrival order rather than earliest deadline first."""
    refuse_late: ClassVar[bool] = True
    """Refuse (at admission) and drop (at dispatch) jobs that cannot make their deadline."""
    merge_always: ClassVar[bool] = False
    """Merge consecutive queued jobs into a batch even when the cost model says it does not help."""
    merge_skips: ClassVar[bool] = True
    """A batch may take queued jobs out of order, when the jobs it overtakes keep their deadlines."""
    horizon: ClassVar[int] = 64
    """Queued tasks whose batching :meth:`predict` follows exactly (behind them: one after another)."""

    def __init__(self, core: Scheduler) -> None:
        self.core = core

    # ------------------------------------------------------------------ hooks

    def initial(self, task: Task, now: float, share: float) -> int:
        """The initial option of a task: the most accurate that meets the job's own deadline.

        ``share`` is the task's share of the job's time when the job is split into chunks.
        """
        job = task.job
        if math.isinf(job.deadline):
            return len(task.lat) - 1
        return max(bisect.bisect_right(task.lat, (job.deadline - now) * 1e6 * share) - 1, 0)

    def observe_arrival(self, job: Job, now: float, cheapest_us: int) -> None:
        """An accepted job arrived; its cheapest strategies are priced ``cheapest_us`` in all.

        That is a price at the latency quantile; ``core.tail.typical`` gives the median.
        """

    def observe_launch(self, batch: Batch, now: float) -> None:
        """A batch started running."""

    def replan(self, now: float) -> list[Failure]:
        """The queue changed: re-assign options, fail jobs that cannot make it."""
        return []

    def solved(self, now: float) -> list[Failure]:
        """An asynchronous solve requested through ``core.solve_async`` has returned."""
        return []

    def alone(self, task: Task, now: float) -> None:
        """A lone job is about to run at once on an idle device (its option can still change)."""

    def dispatch(self, now: float) -> tuple[list[Task], list[Failure]]:
        """Bind the head's option, drop what cannot make it, and take the next batch's tasks."""
        failures = self.bind_head(now)
        if not self.core.queue:
            return [], failures
        return self.take_batch(now), failures

    # ------------------------------------------------------------------ building blocks

    def predict(
        self,
        now: float,
        end: int,
        *,
        cheapest: bool = False,
        stop: bool = False,
        tolerated: frozenset[int] | set[int] = frozenset(),
    ) -> tuple[list[int], int]:
        """Predicted finishes (µs) of the first ``end`` queued tasks, batched as :meth:`take_batch` would.

        With ``cheapest``, every task at its cheapest option. With ``stop``, the walk ends at the
        first batch holding a task predicted late (best-effort tasks, and tasks whose ``id`` is in
        ``tolerated``, are never "late" here).
        Returns (finishes, index of the first late task or -1); finishes past a stop are 0.
        """
        core = self.core
        queue = core.queue
        end = min(end, len(queue))
        deadlines = core.deadlines_us
        lenient = core.lenient
        limit, most = core.profile.max_batch_size, core.config.max_merge
        batching = core.config.batching
        batch = core.batch_latency()
        t = time_us(core.start(now))
        finish = [0] * end
        i = 0
        while i < end:
            head = queue[i]
            k = 0 if cheapest else head.k
            batch.clear(head.job.cost)
            batch.add(head.option(k))
            latency = head.lat[k]
            rows, earliest = head.n, int(deadlines[i])
            j = i + 1
            while batching and j < end and j - i < most:
                nxt = queue[j]
                if not mergeable(head, nxt) or rows + nxt.n > limit:
                    break
                kn = 0 if cheapest else nxt.k
                option = nxt.option(kn)
                merged = batch.with_(option)
                soonest = min(earliest, int(deadlines[j]))
                if merged >= latency + nxt.lat[kn] or t + merged > soonest:  # take_batch's rule
                    break
                batch.add(option)
                latency, rows, earliest = merged, rows + nxt.n, soonest
                j += 1
            t += latency
            for x in range(i, j):
                finish[x] = t
                if stop and t > deadlines[x] and not lenient[x] and id(queue[x]) not in tolerated:
                    return finish, x
            i = j
        return finish, -1

    def predict_from(self, start_us: int, end: int) -> tuple[list[int], int]:
        """:meth:`predict` for a device free from ``start_us`` (after the batch being formed)."""
        core = self.core
        saved = core.busy_until
        core.busy_until = start_us / 1e6
        try:
            return self.predict(start_us / 1e6, end)
        finally:
            core.busy_until = saved

    def repair(self, now: float) -> list[Failure]:
        """Lower options until every job is predicted on time; fail the jobs nothing can save.

        Batch-aware over the first :attr:`horizon` tasks: at the first job predicted late (with
        the queue batched as dispatch will batch it), if it is late even with every job at its
        cheapest option it is *doomed* (it fails with ``DeadlineError``; a best-effort one drops
        to its cheapest option and waits); otherwise options at or before it are lowered, the
        step that saves the most time per accuracy unit lost first, until it fits. Behind the
        horizon, jobs are predicted one after another from the horizon's end and repaired with
        the vectorised greedy (:func:`mosel.assign.greedy_repair`), never failed: they are
        judged again once they come within the horizon.
        """
        core = self.core
        if not core.queue:
            return []
        summed = core.finishes_us(now)
        late_one_by_one = np.flatnonzero((summed > core.deadlines_us) & ~core.lenient)
        if not len(late_one_by_one):
            return []
        core.stats.count("violations_predicted")
        failures = core.doom_certain(now)  # in bulk: after a stall there may be many
        summed = core.finishes_us(now)
        late_one_by_one = np.flatnonzero((summed > core.deadlines_us) & ~core.lenient)
        if not len(late_one_by_one):
            return failures
        if late_one_by_one[0] >= self.horizon:  # batching only makes jobs earlier: the head is fine
            core.stats.count("greedy_assignments")
            self._repair_tail(now, int(summed[self.horizon - 1]))
            return failures
        tolerated: set[int] = set()
        for _ in range(
            2 * self.horizon
        ):  # each turn lowers options, tolerates or fails a job; dispatch settles the rest
            end = min(len(core.queue), self.horizon)
            finish, late = self.predict(now, end, stop=True, tolerated=tolerated)
            if late < 0:
                break
            cheapest, _ = self.predict(now, late + 1, cheapest=True)
            deficit = finish[late] - int(core.deadlines_us[late])
            if cheapest[late] <= core.deadlines_us[late] and self._lower(late, deficit):
                continue
            if not core.doomed(cheapest[late], int(core.deadlines_us[late]), now):
                # Late at the tail price even at the cheapest options, on time at the median:
                # options are chosen at the tail, but a job is shed only when the median says so.
                self._lower(late, deficit)
                tolerated.add(id(core.queue[late]))
                continue
            victim = self.victim(late)
            task = core.queue[victim]
            error = core.deadline_error(task.job, now, finish[late] - time_us(now))
            failures.append(core.fail_job(task.job, error, "doomed" if victim == late else "shed"))
        core.stats.count("greedy_assignments")
        if len(core.queue) > self.horizon:
            self._repair_tail(now, self.predict(now, self.horizon)[0][-1])
        return failures

    def victim(self, late: int) -> int:
        """Which job :meth:`repair` fails when job ``late`` cannot be saved: by default, that one."""
        return late

    def _lower(self, late: int, deficit: int) -> bool:
        """Lower options of tasks ``0..late`` by at least ``deficit`` µs (one after another)."""
        core = self.core
        lowered = False
        while deficit > 0:
            save = core.save_us[: late + 1]
            useful = save > 0
            if not useful.any():
                return lowered
            score = np.where(useful, save / (core.loss_units[: late + 1] + 1e-9), -1.0)
            j = int(np.argmax(score))
            task = core.queue[j]
            deficit -= int(save[j])
            core.set_option(task, step_down(task.lat, task.acc, task.k)[0], j)
            task.job.reason = "queue: lowered so that the jobs queued with it make their deadlines"
            lowered = True
        return lowered

    def _repair_tail(self, now: float, start_us: int) -> None:
        """Greedy repair, one job after another from ``start_us``, of the tasks behind the horizon."""
        core = self.core
        h = self.horizon
        queue = core.queue

        def take(i: int) -> tuple[int, int]:
            task = queue[h + i]
            core.set_option(task, step_down(task.lat, task.acc, task.k)[0], h + i)
            return int(core.save_us[h + i]), int(core.loss_units[h + i])

        greedy_repair(
            core.latency_us[h:], core.deadlines_us[h:], core.cheapest_us[h:], core.save_us[h:],
            core.loss_units[h:], start_us, take,
        )  # fmt: skip

    def upgrade_head(self, head: Task, now: float) -> None:
        """Late binding: raise the head to the most accurate option every queued job's slack absorbs.

        The slack is measured with the queue batched as dispatch will batch it.
        """
        core = self.core
        if head.k >= len(head.lat) - 1:
            return
        summed = time_us(now) + np.cumsum(core.latency_us)
        lenient = core.lenient
        tight = int((core.deadlines_us - summed)[~lenient].min()) if not lenient.all() else NO_DEADLINE_US
        if head.lat[-1] - head.lat[head.k] <= tight:  # one after another, the top option fits already
            core.set_option(head, len(head.lat) - 1, 0)
            return
        end = min(len(core.queue), self.horizon)
        finish, _ = self.predict(now, end)
        slack = np.asarray(core.deadlines_us[:end]) - np.asarray(finish, dtype=np.int64)
        slack = slack[~core.lenient[:end]]
        tight = int(slack.min()) if len(slack) else NO_DEADLINE_US
        if len(core.queue) > end:
            behind = finish[-1] + np.cumsum(core.latency_us[end:])
            tight = min(tight, int((core.deadlines_us[end:] - behind).min()))
        extra = head.lat[head.k] + tight
        core.set_option(head, max(head.k, bisect.bisect_right(head.lat, extra) - 1), 0)

    def bind_head(self, now: float, upgrade: bool = False) -> list[Failure]:
        """Settle the queue's head: a head that would finish late is lowered to fit or failed."""
        core = self.core
        failures: list[Failure] = []
        now_us = time_us(now)
        while core.queue:
            head = core.queue[0]
            if upgrade:
                self.upgrade_head(head, now)
            finish_us = now_us + head.lat[head.k]
            deadline = int(core.deadlines_us[0])
            if finish_us > deadline and not head.job.best_effort and self.refuse_late:
                if not self.every_modality:
                    fits = bisect.bisect_right(head.lat, deadline - now_us) - 1
                    if fits >= 0:
                        core.set_option(head, fits, 0)
                        head.job.reason = "deadline: a more accurate strategy would finish too late"
                        break
                if not core.doomed(now_us + head.lat[0], deadline, now):
                    if not self.every_modality:  # late at the tail, on time at the median: it tries
                        core.set_option(head, 0, 0)
                        head.job.reason = "deadline: only the cheapest strategy may make it"
                    break
                error = core.deadline_error(head.job, now, head.lat[0])
                failures.append(core.fail_job(head.job, error, "late"))
                continue
            if finish_us > deadline and not self.every_modality:  # best effort: late, but fast
                core.set_option(head, 0, 0)
            break
        return failures

    def take_batch(self, now: float) -> list[Task]:
        """The head and the queued tasks worth running with it as one batch (removed from the queue).

        A task joins while the batch stays within ``max_batch_size`` rows and ``max_merge`` jobs,
        shares the head's available modalities and input shapes, the merged batch is predicted
        faster than running the task apart, and every member still meets its deadline. With
        :attr:`merge_skips` the task need not be next in the queue, as long as the tasks the
        batch overtakes still meet their deadlines; otherwise only consecutive tasks join.
        """
        core = self.core
        head = core.queue[0]
        core.remove(head)
        tasks = [head]
        if not core.config.batching or not core.queue:
            return tasks
        now_us = time_us(now)
        limit, most = core.profile.max_batch_size, core.config.max_merge
        batch = core.batch_latency(head.job.cost)
        batch.add(head.strategy)
        latency = head.lat[head.k]
        rows, earliest = head.n, deadline_us(head.job)
        if not self.merge_skips:
            while core.queue and len(tasks) < most:
                nxt = core.queue[0]
                if not mergeable(head, nxt) or rows + nxt.n > limit:
                    break
                merged = batch.with_(nxt.strategy)
                soonest = min(earliest, deadline_us(nxt.job))
                helps = merged < latency + nxt.lat[nxt.k] and now_us + merged <= soonest
                if not helps and not self.merge_always:
                    break
                core.remove(nxt)
                batch.add(nxt.strategy)
                tasks.append(nxt)
                latency, rows, earliest = merged, rows + nxt.n, soonest
            return tasks
        # Skipping: every queued task's slack if the batch took ``latency``; each join delays the
        # tasks ahead of the joiner by the batch's growth and moves those behind it up.
        n = min(len(core.queue), self.horizon)
        queued = core.queue[:n]
        finish, _ = self.predict_from(now_us + latency, n)  # batched, as dispatch will run them
        slack = (core.deadlines_us[:n] - np.asarray(finish, dtype=np.int64)).astype(np.float64)
        slack[core.lenient[:n] | (slack < 0)] = np.inf  # already late (or lenient): not this batch's doing
        delay = np.zeros(n, dtype=np.float64)
        joined = np.zeros(n, dtype=bool)
        for p, nxt in enumerate(queued):
            if len(tasks) >= most or rows >= limit:
                break
            if not mergeable(head, nxt) or rows + nxt.n > limit:
                continue
            soonest = min(earliest, deadline_us(nxt.job))
            merged = batch.with_(nxt.strategy)
            if merged >= latency + nxt.lat[nxt.k] or now_us + merged > soonest:
                continue
            growth = merged - latency
            ahead = ~joined[:p]
            if ahead.any() and float((slack[:p] - delay[:p])[ahead].min()) < growth:
                continue
            delay[:p] += growth
            delay[p + 1 :] += growth - nxt.lat[nxt.k]
            joined[p] = True
            batch.add(nxt.strategy)
            tasks.append(nxt)
            latency, rows, earliest = merged, rows + nxt.n, soonest
        for task in tasks[1:]:
            core.remove(task)
        return tasks


class Agnostic(Policy):
    """Every modality, earliest deadline first, late jobs dropped at dispatch: the paper's baseline."""

    name = "agnostic"
    every_modality = True
    merge_skips = False


class Batcher(Policy):
    """FIFO dynamic batching of every modality that never drops (Triton or Ray Serve defaults)."""

    name = "batcher"
    every_modality = True
    fifo = True
    refuse_late = False
    merge_always = True
    merge_skips = False


class Aggressive(Policy):
    """Every job at its cheapest admissible strategy; doomed jobs fail at once."""

    name = "aggressive"

    def initial(self, task: Task, now: float, share: float) -> int:
        """Always the cheapest admissible option."""
        return 0

    def replan(self, now: float) -> list[Failure]:
        """Fail the jobs that cannot make it even with every job at its cheapest option."""
        return self.repair(now)


class Greedy(Policy):
    """The online stage without CP-SAT: greedy re-assignment, late binding and the hedges.

    On a predicted miss the queue prefix up to the last late job is repaired greedily
    (``core.repair``). At dispatch the head is raised to the most accurate option the queue's
    slack absorbs, consecutive jobs are merged when that helps, and three hedges cap the batch's
    latency for the jobs that will arrive while it runs (``SchedulerConfig.hedge``, ``risk``,
    ``reserve``; see ``docs/online.md``).
    """

    name = "greedy"

    def __init__(self, core: Scheduler) -> None:
        super().__init__(core)
        self.headroom_us = 0.0  # EWMA over arrivals: deadline - arrival - cheapest latency
        self.headroom_low_us = 0.0  # a low quantile of arrivals' headroom
        self.waiting = 0.0  # EWMA over dispatches: tasks left waiting behind the dispatched one
        self.work = 0.0  # cheapest-strategy seconds arriving per second, decaying over load_window_s
        self.busy_arrivals = 0.0  # arrivals that found a batch running, same decay
        self.busy_s = 0.0  # time spent running batches, same decay
        self.rate_at = 0.0

    def observe_arrival(self, job: Job, now: float, cheapest_us: int) -> None:
        """Update what the hedges know of arrivals: headroom, rate and work."""
        if not math.isinf(job.deadline):
            headroom = (job.deadline - now) * 1e6 - cheapest_us
            self.headroom_us = (
                headroom if self.headroom_us == 0.0 else 0.9 * self.headroom_us + 0.1 * headroom
            )
            low = self.headroom_low_us  # tracks a low quantile: quick down, slow up
            self.headroom_low_us = (
                headroom if low == 0.0 else low + (headroom - low) * (0.2 if headroom < low else 0.01)
            )
        self.decay_to(now)
        self.work += self.core.tail.typical(cheapest_us) / 1e6 / self.core.config.load_window_s
        if self.core.in_flight is not None:
            self.busy_arrivals += 1.0

    def observe_launch(self, batch: Batch, now: float) -> None:
        """Count the batch's predicted time as time spent running."""
        self.decay_to(now)
        self.busy_s += self.core.tail.typical(batch.predicted_us) / 1e6

    def decay_to(self, now: float) -> None:
        """Age the recent-load sums to ``now`` (exponential decay over ``load_window_s``)."""
        if now > self.rate_at:
            decay = math.exp((self.rate_at - now) / self.core.config.load_window_s)
            self.work *= decay
            self.busy_arrivals *= decay
            self.busy_s *= decay
            self.rate_at = now

    def replan(self, now: float) -> list[Failure]:
        """On a predicted miss, repair the prefix up to the last late job."""
        core = self.core
        if not core.queue or not (core.finishes_us(now) > core.deadlines_us).any():
            return []
        failures = self.repair(now)
        self.repaired(now)
        return failures

    def repaired(self, now: float) -> None:
        """Called after each greedy repair (the mosel policy asks CP-SAT to improve on it)."""

    def alone(self, task: Task, now: float) -> None:
        """A lone job is hedged like any batch."""
        self.hedge([task], now)

    def dispatch(self, now: float) -> tuple[list[Task], list[Failure]]:
        """Late-bind the head, merge the followers that help, hedge the batch."""
        core = self.core
        failures = self.bind_head(now, upgrade=True)
        if not core.queue:
            return [], failures
        self.waiting = 0.9 * self.waiting + 0.1 * (len(core.queue) - 1)
        tasks = self.take_batch(now)
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
        self.decay_to(now)
        cap = math.inf
        # Arrivals per second of running: a lone caller waiting for each result never arrives
        # while its own job runs, so it is never hedged against itself.
        if config.risk > 0 and self.headroom_low_us > 0 and self.busy_arrivals > 0 < self.busy_s:
            rate = self.busy_arrivals / self.busy_s
            cap = self.headroom_low_us + config.risk / rate * 1e6
        if config.hedge > 0 and self.waiting >= 1.0:
            cap = min(cap, config.hedge * self.headroom_us)
        if config.reserve > 0 and core.queue:
            reserve = min(1.0, config.reserve * self.work)
            remaining = (core.deadlines_us - now * 1e6).astype(np.float64)
            ahead = np.cumsum(core.cheapest_us)
            cap = min(cap, float((remaining * (1.0 - reserve) - ahead).min()))
        latency = core.merged_latency_us(tasks)
        if latency <= cap:
            return
        core.stats.count("hedged")
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


def _explain(tasks: Sequence[Task], reason: str) -> None:
    """Record why tasks left below their most accurate option stay there."""
    for task in tasks:
        if task.k < len(task.lat) - 1:
            task.job.reason = reason


def mergeable(head: Task, other: Task) -> bool:
    """Whether two tasks may run in one batch: the same available modalities and inputs alike.

    Inputs alike (the driver's ``Job.batch_key``: structure, dtypes and trailing shapes) keeps a
    job's rows from being cast or padded to fit another tenant's; one size bucket, one price.
    """
    return (
        head.frontier.available == other.frontier.available
        and head.job.batch_key == other.job.batch_key
        and head.job.bucket == other.job.bucket
    )


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

    def __init__(self, core: Scheduler) -> None:
        super().__init__(core)
        self.solving = False
        self.again = False  # a repair happened while solving: solve again afterwards
        self.rest_until = -math.inf  # solver_share: no asynchronous solve before this
        self.backoff = 1.0  # doubles after each solve that did not improve on greedy
        self.pending: tuple[list[Task], int, list[int] | None, float] | None = None

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
            core.stats.count("solver_rested")
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
        snapshot = core.queue[:end]
        items = [t.item for t in snapshot]
        hint = [t.k for t in snapshot]
        version = core.version

        def solve() -> tuple[list[int] | None, float]:
            started = time.perf_counter()
            ks, _ = cpsat_assign(
                items,
                start_us,
                hint,
                time_limit_s=config.solver_time_limit_s,
                deterministic=config.deterministic,
                budget_us=budget,
            )
            return ks, (time.perf_counter() - started) * 1000.0

        if config.deterministic:  # simulations: the solve is charged its budget, then rests as live
            ks, elapsed_ms = solve()
            self.apply(snapshot, version, ks, elapsed_ms, now)
            self.rest(config.solver_time_limit_s * 1000.0, now)
            return
        assert core.solve_async is not None
        self.solving = True

        def run() -> None:
            ks, elapsed_ms = solve()
            self.pending = (snapshot, version, ks, elapsed_ms)

        core.solve_async(run)

    def solved(self, now: float) -> list[Failure]:
        """Apply the returned solve if still valid; rest; solve again if asked meanwhile."""
        pending, self.pending = self.pending, None
        self.solving = False
        if pending is not None:
            self.apply(*pending, now)
            self.rest(pending[3], now)
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
        core.stats.observe("solver", elapsed_ms)
        if ks is None:
            core.stats.count("solver_no_answer")
            return
        end = len(snapshot)
        if version != core.version or core.queue[:end] != snapshot:
            core.stats.count("solver_stale")
            return
        latency = core.latency_us.copy()
        latency[:end] = [t.lat[k] for t, k in zip(snapshot, ks)]
        finish = time_us(core.start(now)) + np.cumsum(latency)
        if (finish > core.deadlines_us).any():
            core.stats.count("solver_stale")
            return
        if sum(t.acc[k] for t, k in zip(snapshot, ks)) > sum(t.acc[t.k] for t in snapshot):
            for i, (task, k) in enumerate(zip(snapshot, ks)):
                core.set_option(task, k, i)
            core.stats.count("solver_improved")
            self.backoff = 1.0
        else:
            self.backoff = min(64.0, 2.0 * self.backoff)
            core.stats.count("solver_confirmed")


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
    per microsecond. On a predicted miss the queue is repaired batch-aware (:meth:`repair`), and
    when a job cannot be saved the one with the fewest expected correct answers per microsecond
    at or before it is shed (weighted Moore-Hodgson).
    """

    name = "mosel"
    limit_budget: ClassVar[bool] = True
    """Pay upgrades from the spare-capacity budget (off only for the ablation)."""
    limit_reserve: ClassVar[bool] = True
    """Keep, before each queued job's deadline, the work arrivals bring meanwhile (ablation)."""
    limit_arrivals: ClassVar[bool] = True
    """Keep the batch within a tight arrival's headroom (ablation)."""

    def __init__(self, core: Scheduler) -> None:
        super().__init__(core)
        window = core.config.load_window_s
        self.windows = (window, window / 10)  # a long view, and a short one that sees a burst begin
        self.sums = [0.0, 0.0]  # cheapest-strategy seconds arrived, decaying over each window
        self.first = math.nan  # the first arrival
        self.rate_at = 0.0
        self.budget_s = 0.0  # device seconds that upgrades may still spend
        self.budget_at = -math.inf  # the first refill fills it to its cap
        self.headroom_low_us = math.inf  # a low quantile of arrivals' headroom
        self.busy_arrivals = 0.0  # arrivals that found a batch running, decaying over load_window_s
        self.busy_s = 0.0  # time spent running batches, same decay

    def initial(self, task: Task, now: float, share: float) -> int:
        """The cheapest admissible option: accuracy is added at dispatch, if there is time."""
        return 0

    def observe_arrival(self, job: Job, now: float, cheapest_us: int) -> None:
        """Track the arrival rate of work and a low quantile of arrivals' headroom."""
        self.refill(now)
        self.decay_to(now)
        if math.isnan(self.first):
            self.first = now
        typical_s = self.core.tail.typical(cheapest_us) / 1e6  # throughput at the median
        for i in range(2):
            self.sums[i] += typical_s
        if self.core.in_flight is not None:
            self.busy_arrivals += 1.0
        if not math.isinf(job.deadline):
            headroom = (job.deadline - now) * 1e6 - cheapest_us
            low = self.headroom_low_us
            self.headroom_low_us = (
                headroom if math.isinf(low) else low + (headroom - low) * (0.2 if headroom < low else 0.01)
            )

    def decay_to(self, now: float) -> None:
        """Age the arrival sums to ``now``."""
        if now > self.rate_at:
            for i, window in enumerate(self.windows):
                self.sums[i] *= math.exp((self.rate_at - now) / window)
            decay = math.exp((self.rate_at - now) / self.windows[0])
            self.busy_arrivals *= decay
            self.busy_s *= decay
            self.rate_at = now

    def observe_launch(self, batch: Batch, now: float) -> None:
        """Count the batch's predicted time as time spent running."""
        self.decay_to(now)
        self.busy_s += self.core.tail.typical(batch.predicted_us) / 1e6

    def rho(self, now: float) -> float:
        """Recent arrivals' work at their cheapest strategies, per second (the larger of two views)."""
        if math.isnan(self.first):
            return 0.0
        self.decay_to(now)
        elapsed = max(now - self.first, self.windows[1])
        # Normalised by the time the sum has had to build up (at least the short window, so that
        # one arrival is not read as a flood), so the first arrivals are not diluted either.
        return max(s / (w * (1.0 - math.exp(-elapsed / w))) for s, w in zip(self.sums, self.windows))

    def refill(self, now: float) -> None:
        """Add the spare device time since the last refill to the budget."""
        if now <= self.budget_at:
            return
        spare = max(0.0, 1.0 - self.rho(now) - self.core.config.spare_margin)
        cap = self.headroom_low_us / 1e6 if math.isfinite(self.headroom_low_us) else 1.0
        elapsed = now - self.budget_at
        self.budget_s = cap if math.isinf(elapsed) else min(cap, self.budget_s + spare * elapsed)
        self.budget_at = now

    def replan(self, now: float) -> list[Failure]:
        """Batch-aware repair on a predicted miss."""
        return self.repair(now)

    shed_by_density: ClassVar[bool] = True
    """Shed the job with the fewest expected correct answers per microsecond at or before a late
    one (weighted Moore-Hodgson) rather than the late one (on 150 random traces of
    ``tests/unit/test_dominance.py``, against the static cheapest policy: 5th percentile 0.99 and
    median 1.06 of its correct answers, against 0.92 and 1.00 when the late job is shed)."""

    def victim(self, late: int) -> int:
        """The late job itself, or with :attr:`shed_by_density` the least valuable per microsecond."""
        if not self.shed_by_density:
            return late
        core = self.core
        density = [
            (task.acc[0] / max(1, task.lat[0]), i)
            for i, task in enumerate(core.queue[: late + 1])
            if not task.job.best_effort
        ]
        return min(density)[1] if density else late

    def alone(self, task: Task, now: float) -> None:
        """A lone job on an idle device is upgraded like any batch."""
        self.upgrade([task], now)

    def dispatch(self, now: float) -> tuple[list[Task], list[Failure]]:
        """Settle the head, take the batch, then buy what accuracy the spare time allows."""
        failures = self.bind_head(now)
        if not self.core.queue:
            return [], failures
        tasks = self.take_batch(now)
        self.upgrade(tasks, now)
        return tasks, failures

    def upgrade(self, tasks: list[Task], now: float) -> None:
        """Raise the batch's options, most accuracy per microsecond first, within the three limits."""
        core = self.core
        if all(t.k >= len(t.lat) - 1 for t in tasks):
            return
        self.refill(now)
        now_us = time_us(now)
        batch = core.batch_latency(tasks[0].job.cost)
        for task in tasks:
            batch.add(task.strategy)
        base = batch.latency_us()
        allowed = self.budget_s * 1e6 if self.limit_budget else math.inf
        binding = "spare capacity: recent arrivals leave too little device time"
        rho = self.rho(now)
        if self.limit_budget and rho >= 1.0 - self.core.config.spare_margin:
            _explain(tasks, "overload: recent arrivals need the whole device at their cheapest strategies")
            return  # no spare time now: a stored budget is not spent into an overload
        if math.isfinite(self.headroom_low_us) and self.core.config.risk > 0 and self.limit_arrivals:
            # Arrivals during the run, at the recent rate, still fit; beyond that, the run may
            # outlast a tight arrival's headroom only by as long as ``risk`` arrivals take to come
            # (arrivals per second of running: a caller waiting for each result never arrives
            # during its own job's run).
            cap = self.headroom_low_us / (1.0 + rho)
            if self.busy_arrivals > 0 < self.busy_s:
                cap += self.core.config.risk / (self.busy_arrivals / self.busy_s) * 1e6
            else:
                cap = math.inf
            if cap - base < allowed:
                allowed, binding = cap - base, "arrivals: a tight job arriving meanwhile must still fit"
        own = min(deadline_us(t.job) for t in tasks) - now_us - base
        if own < allowed:
            allowed, binding = own, "deadline: a more accurate strategy would finish too late"
        if core.queue:  # each queued job keeps its slack, less what arrivals until its deadline need
            end = min(len(core.queue), self.horizon)
            finish, _ = self.predict_from(now_us + base, end)
            deadlines = core.deadlines_us[:end]
            slack = deadlines - np.asarray(finish, dtype=np.int64)
            keep = ~core.lenient[:end] & (slack >= 0)
            if keep.any():
                reserve = rho * (deadlines - now_us) if self.limit_reserve else 0.0
                queue = float((slack - reserve)[keep].min())
                if queue < allowed:
                    allowed, binding = queue, "queue: jobs waiting behind it need the time"
        if allowed <= 0:
            _explain(tasks, binding)
            return
        if len(tasks) == 1:  # the common case: the option's own latency is the batch's
            task = tasks[0]
            top = bisect.bisect_right(task.lat, task.lat[task.k] + allowed) - 1
            if top > task.k:
                self.budget_s -= (task.lat[top] - task.lat[task.k]) / 1e6
                task.k = top
                core.stats.count("upgraded")
            _explain(tasks, binding)
            return
        # Several tasks: the steps that buy the most accuracy per microsecond (each task's own
        # latencies), then the merged batch is checked and the last steps undone while it is over.
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
            core.stats.count("upgraded")
        _explain(tasks, binding)


class AgnosticPlus(Agnostic):
    """A careful all-modality server: batch-aware shedding and batching that may skip jobs.

    What a deadline-aware Triton or Ray Serve deployment could do without modality selection:

    * prediction that merges consecutive jobs exactly as dispatch would;
    * shedding (weighted Moore-Hodgson): while a queued job is predicted late, the job at or
      before it with the fewest requests per microsecond fails with ``DeadlineError``;
    * batching that may skip queued jobs: any queued job that fits the batch's rows and its
      earliest deadline joins, unless the jobs it would overtake then miss theirs.
    """

    name = "agnostic_plus"
    merge_skips = True

    def replan(self, now: float) -> list[Failure]:
        """Shed, fewest requests per microsecond first, until no queued job is predicted late."""
        core = self.core
        failures: list[Failure] = []
        while core.queue:
            finish, late = self.predict(now, self.horizon, stop=True)
            if late < 0:
                break
            candidates = [t for t in core.queue[: late + 1] if not t.job.best_effort]
            core.stats.count("violations_predicted")
            victim = min(candidates, key=lambda t: t.job.n / max(1, t.lat[0]))
            error = core.deadline_error(victim.job, now, finish[late] - time_us(now))
            failures.append(core.fail_job(victim.job, error, "shed"))
        return failures


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Mosel, Greedy, GreedyCpsat, Aggressive, Agnostic, AgnosticPlus, Batcher)
}
"""The policies available by name in :class:`~mosel.scheduler.SchedulerConfig`."""


def policy_class(policy: str | type[Policy]) -> type[Policy]:
    """The policy class for a name (or a :class:`Policy` subclass itself); ValueError if unknown."""
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy
    found = POLICIES.get(policy) if isinstance(policy, str) else None
    if found is None:
        raise ValueError(
            f"policy must be one of {sorted(POLICIES)} or a mosel.policies.Policy subclass, got {policy!r}"
        )
    return found
