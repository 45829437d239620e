"""The building blocks policies combine: predict the batched queue, repair it, bind the head, batch.

Each block takes the policy (for its class attributes and :meth:`~mosel.policies.base.Policy.victim`)
and works through its ``core`` view. :func:`joins` is the one merge rule: prediction and batch
forming apply the same test, so what dispatch will run is what was predicted.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mosel.assign import greedy_repair, step_down
from mosel.jobs import NO_DEADLINE_US, Failure, Reason, Task, deadline_us, mergeable, time_us
from mosel.plan import Strategy

if TYPE_CHECKING:
    from mosel.policies.base import Policy
    from mosel.pricing import BatchLatency

__all__ = [
    "bind_head",
    "joins",
    "least_valuable",
    "predict",
    "predicted_batches",
    "repair",
    "take_batch",
    "upgrade_head",
]


class Join(NamedTuple):
    """A task joining a batch: the batch's latency and earliest deadline with it, and whether it helps."""

    latency: int
    earliest: int
    helps: bool


def joins(
    batch: BatchLatency,
    latency: int,
    earliest: int,
    start_us: int,
    option: Strategy,
    alone_us: int,
    deadline: int,
) -> Join:
    """The merge rule: does a task at ``option`` (priced ``alone_us`` alone) help the batch?

    It helps when the merged batch is faster than running the task after it, and the batch
    (started at ``start_us``) still meets its earliest deadline.
    """
    merged = batch.with_(option)
    soonest = min(earliest, deadline)
    return Join(merged, soonest, merged < latency + alone_us and start_us + merged <= soonest)


def predict(
    policy: Policy,
    start_us: int,
    end: int,
    *,
    cheapest: bool = False,
    stop: bool = False,
    tolerated: frozenset[int] | set[int] = frozenset(),
) -> tuple[list[int], int]:
    """Predicted finishes (µs) of the first ``end`` queued tasks, batched as :func:`take_batch` would.

    The device is free from ``start_us``. With ``cheapest``, every task at its cheapest option.
    With ``stop``, the walk ends at the first batch holding a task predicted late (best-effort
    tasks, and tasks whose ``id`` is in ``tolerated``, are never "late" here).
    Returns (finishes, index of the first late task or -1); finishes past a stop are 0.
    """
    core = policy.core
    queue = core.queue
    end = min(end, len(queue))
    deadlines = core.deadlines_us
    lenient = core.lenient
    finish = [0] * end
    for i, j, t in predicted_batches(policy, start_us, end, cheapest=cheapest):
        for x in range(i, j):
            finish[x] = t
            if stop and t > deadlines[x] and not lenient[x] and id(queue[x]) not in tolerated:
                return finish, x
    return finish, -1


def predicted_batches(
    policy: Policy, start_us: int, end: int, *, cheapest: bool = False
) -> Iterator[tuple[int, int, int]]:
    """The batches :func:`predict` forms of the first ``end`` queued tasks, one at a time.

    Yields ``(i, j, finish_us)``: queued tasks ``i`` to ``j - 1`` run as one batch that ends at
    ``finish_us``. A batch is yielded once closed, so a caller that needs only the first
    finishes stops early with the same values as the whole walk.
    """
    core = policy.core
    queue = core.queue
    end = min(end, len(queue))
    deadlines = core.deadlines_us
    limit, most = core.max_batch_size, core.config.max_merge
    batching = core.config.batching
    batch = core.batch_latency()
    t = start_us
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
            join = joins(batch, latency, earliest, t, option, nxt.lat[kn], int(deadlines[j]))
            if not join.helps:
                break
            batch.add(option)
            latency, rows, earliest = join.latency, rows + nxt.n, join.earliest
            j += 1
        t += latency
        yield i, j, t
        i = j


def _start_us(policy: Policy, now: float) -> int:
    return time_us(policy.core.start(now))


def repair(policy: Policy, now: float) -> list[Failure]:
    """Lower options until every job is predicted on time; fail the jobs nothing can save.

    Batch-aware over the first ``policy.horizon`` tasks: at the first job predicted late (with
    the queue batched as dispatch will batch it), if it is late even with every job at its
    cheapest option it is *doomed* (it fails with ``DeadlineError``; a best-effort one drops to
    its cheapest option and waits); otherwise options at or before it are lowered, the step that
    saves the most time per accuracy unit lost first, until it fits. Behind the horizon, jobs are
    predicted one after another from the horizon's end and repaired with the vectorised greedy
    (:func:`mosel.assign.greedy_repair`), never failed: they are judged again once they come
    within the horizon.
    """
    core = policy.core
    if not core.queue:
        return []
    summed = core.finishes_us(now)
    late_one_by_one = np.flatnonzero((summed > core.deadlines_us) & ~core.lenient)
    if not len(late_one_by_one):
        return []
    core.count("violations_predicted")
    failures = core.doom_certain(now)  # in bulk: after a stall there may be many
    summed = core.finishes_us(now)
    late_one_by_one = np.flatnonzero((summed > core.deadlines_us) & ~core.lenient)
    if not len(late_one_by_one):
        return failures
    horizon = policy.horizon
    if late_one_by_one[0] >= horizon:  # batching only makes jobs earlier: the head is fine
        core.count("greedy_assignments")
        _repair_tail(policy, int(summed[horizon - 1]))
        return failures
    tolerated: set[int] = set()
    for _ in range(2 * horizon):  # each turn lowers options, tolerates or fails a job
        end = min(len(core.queue), horizon)
        finish, late = predict(policy, _start_us(policy, now), end, stop=True, tolerated=tolerated)
        if late < 0:
            break
        cheapest, _ = predict(policy, _start_us(policy, now), late + 1, cheapest=True)
        deficit = finish[late] - int(core.deadlines_us[late])
        if cheapest[late] <= core.deadlines_us[late] and _lower(policy, late, deficit):
            continue
        if not core.doomed(cheapest[late], int(core.deadlines_us[late]), now):
            # Late at the tail price even at the cheapest options, on time at the median:
            # options are chosen at the tail, but a job is shed only when the median says so.
            _lower(policy, late, deficit)
            tolerated.add(id(core.queue[late]))
            continue
        victim = policy.victim(late)
        task = core.queue[victim]
        error = core.deadline_error(task.job, now, finish[late] - time_us(now))
        failures.append(core.fail(task.job, error, "doomed" if victim == late else "shed"))
    core.count("greedy_assignments")
    if len(core.queue) > horizon:
        _repair_tail(policy, predict(policy, _start_us(policy, now), horizon)[0][-1])
    return failures


def least_valuable(policy: Policy, late: int) -> int:
    """The queued job at or before ``late`` with the fewest expected correct answers per microsecond.

    Shedding it rather than the late job (weighted Moore-Hodgson) keeps the most correct
    answers on time; best-effort jobs are never shed.
    """
    density = [
        (task.acc[0] / max(1, task.lat[0]), i)
        for i, task in enumerate(policy.core.queue[: late + 1])
        if not task.job.best_effort
    ]
    return min(density)[1] if density else late


def _lower(policy: Policy, late: int, deficit: int) -> bool:
    """Lower options of tasks ``0..late`` by at least ``deficit`` µs (one after another)."""
    core = policy.core
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
        task.job.reason = Reason.QUEUE_LOWERED
        lowered = True
    return lowered


def _repair_tail(policy: Policy, start_us: int) -> None:
    """Greedy repair, one job after another from ``start_us``, of the tasks behind the horizon."""
    core = policy.core
    h = policy.horizon
    queue = core.queue

    def take(i: int) -> tuple[int, int]:
        task = queue[h + i]
        core.set_option(task, step_down(task.lat, task.acc, task.k)[0], h + i)
        return int(core.save_us[h + i]), int(core.loss_units[h + i])

    greedy_repair(
        core.latency_us[h:], core.deadlines_us[h:], core.cheapest_us[h:], core.save_us[h:],
        core.loss_units[h:], start_us, take,
    )  # fmt: skip


def upgrade_head(policy: Policy, head: Task, now: float) -> None:
    """Late binding: raise the head to the most accurate option every queued job's slack absorbs.

    The slack is measured with the queue batched as dispatch will batch it.
    """
    core = policy.core
    if head.k >= len(head.lat) - 1:
        return
    summed = time_us(now) + np.cumsum(core.latency_us)
    lenient = core.lenient
    tight = int((core.deadlines_us - summed)[~lenient].min()) if not lenient.all() else NO_DEADLINE_US
    if head.lat[-1] - head.lat[head.k] <= tight:  # one after another, the top option fits already
        core.set_option(head, len(head.lat) - 1, 0)
        return
    end = min(len(core.queue), policy.horizon)
    finish, _ = predict(policy, _start_us(policy, now), end)
    slack = np.asarray(core.deadlines_us[:end]) - np.asarray(finish, dtype=np.int64)
    slack = slack[~core.lenient[:end]]
    tight = int(slack.min()) if len(slack) else NO_DEADLINE_US
    if len(core.queue) > end:
        behind = finish[-1] + np.cumsum(core.latency_us[end:])
        tight = min(tight, int((core.deadlines_us[end:] - behind).min()))
    extra = head.lat[head.k] + tight
    core.set_option(head, max(head.k, bisect.bisect_right(head.lat, extra) - 1), 0)


def bind_head(policy: Policy, now: float, upgrade: bool = False) -> list[Failure]:
    """Settle the queue's head: a head that would finish late is lowered to fit or failed."""
    core = policy.core
    failures: list[Failure] = []
    now_us = time_us(now)
    every = policy.every_modality
    while core.queue:
        head = core.queue[0]
        if upgrade:
            upgrade_head(policy, head, now)
        finish_us = now_us + head.lat[head.k]
        deadline = int(core.deadlines_us[0])
        if finish_us > deadline and not head.job.best_effort and policy.refuse_late:
            if not every:
                fits = bisect.bisect_right(head.lat, deadline - now_us) - 1
                if fits >= 0:
                    core.set_option(head, fits, 0)
                    head.job.reason = Reason.DEADLINE
                    break
            if not core.doomed(now_us + head.lat[0], deadline, now):
                if not every:  # late at the tail, on time at the median: it tries
                    core.set_option(head, 0, 0)
                    head.job.reason = Reason.ONLY_CHEAPEST
                break
            error = core.deadline_error(head.job, now, head.lat[0])
            failures.append(core.fail(head.job, error, "late"))
            continue
        if finish_us > deadline and not every:  # best effort: late, but fast
            core.set_option(head, 0, 0)
        break
    return failures


def take_batch(policy: Policy, now: float) -> list[Task]:
    """The head and the queued tasks worth running with it as one batch (taken from the queue).

    A task joins while the batch stays within ``max_batch_size`` rows and ``max_merge`` jobs,
    shares the head's available modalities and input shapes, and :func:`joins` says it helps
    (every member still meets its deadline). With ``policy.merge_skips`` the task need not be next
    in the queue, as long as the tasks the batch overtakes still meet their deadlines; otherwise
    only consecutive tasks join (with ``policy.merge_always``, even when joining does not help).
    """
    core = policy.core
    head = core.queue[0]
    core.take(head)
    tasks = [head]
    if not core.config.batching or not core.queue:
        return tasks
    now_us = time_us(now)
    batch = core.batch_latency(head.job.cost)
    batch.add(head.strategy)
    if not policy.merge_skips:
        _take_consecutive(policy, tasks, batch, now_us)
        return tasks
    _take_skipping(policy, tasks, batch, now_us)
    for task in tasks[1:]:
        core.take(task)
    return tasks


def _take_consecutive(policy: Policy, tasks: list[Task], batch: BatchLatency, now_us: int) -> None:
    core = policy.core
    head = tasks[0]
    limit, most = core.max_batch_size, core.config.max_merge
    latency, rows, earliest = head.lat[head.k], head.n, deadline_us(head.job)
    while core.queue and len(tasks) < most:
        nxt = core.queue[0]
        if not mergeable(head, nxt) or rows + nxt.n > limit:
            break
        join = joins(batch, latency, earliest, now_us, nxt.strategy, nxt.lat[nxt.k], deadline_us(nxt.job))
        if not join.helps and not policy.merge_always:
            break
        core.take(nxt)
        batch.add(nxt.strategy)
        tasks.append(nxt)
        latency, rows, earliest = join.latency, rows + nxt.n, join.earliest


def _take_skipping(policy: Policy, tasks: list[Task], batch: BatchLatency, now_us: int) -> None:
    """Queued tasks join while the tasks the batch overtakes keep their deadlines.

    From every queued task's slack if the batch took its current latency, each join delays the
    tasks ahead of the joiner by the batch's growth and moves those behind it up.
    """
    core = policy.core
    head = tasks[0]
    limit, most = core.max_batch_size, core.config.max_merge
    latency, rows, earliest = head.lat[head.k], head.n, deadline_us(head.job)
    n = min(len(core.queue), policy.horizon)
    queued = core.queue[:n]
    deadlines, lenient = core.deadlines_us[:n], core.lenient[:n]
    # A device free after the batch: the same arithmetic as a free device at that time. Each
    # task's slack if the batch took its current latency, walked only as far as a joiner needs
    # (the batch fills long before the horizon; a predicted batch's finish is final once closed).
    walk = predicted_batches(policy, time_us((now_us + latency) / 1e6), n)
    slack = np.empty(n, dtype=np.float64)
    known = 0  # tasks whose slack is set
    delay = np.zeros(n, dtype=np.float64)
    joined = np.zeros(n, dtype=bool)
    for p, nxt in enumerate(queued):
        if len(tasks) >= most or rows >= limit:
            break
        if not mergeable(head, nxt) or rows + nxt.n > limit:
            continue
        join = joins(batch, latency, earliest, now_us, nxt.strategy, nxt.lat[nxt.k], deadline_us(nxt.job))
        if not join.helps:
            continue
        growth = join.latency - latency
        while known < p:
            i, j, t = next(walk)
            left = deadlines[i:j] - t
            # already late (or lenient): not this batch's doing
            slack[i:j] = np.where(lenient[i:j] | (left < 0), np.inf, left.astype(np.float64))
            known = j
        ahead = ~joined[:p]
        if ahead.any() and float((slack[:p] - delay[:p])[ahead].min()) < growth:
            continue
        delay[:p] += growth
        delay[p + 1 :] += growth - nxt.lat[nxt.k]
        joined[p] = True
        batch.add(nxt.strategy)
        tasks.append(nxt)
        latency, rows, earliest = join.latency, rows + nxt.n, join.earliest
