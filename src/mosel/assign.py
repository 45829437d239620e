"""Online re-assignment of queued jobs' strategies (the paper's queue optimisation, made exact).

The queue prefix ``0..v`` runs back to back from ``start_us``. Job ``j`` picks option ``k_j`` from
its admissible options (latency ascending, accuracy ascending); maximise the total accuracy units
(request-weighted expected accuracy) subject to EVERY job's own deadline::

    max sum_j acc_j[k_j]   s.t.   start_us + sum_{j <= i} lat_j[k_j] <= deadline_i   for all i

What serving uses: :func:`greedy_repair` (vectorised, lowers the options that save the most time
per accuracy unit lost; the policies' repair behind their horizon) and :func:`cpsat_assign`
(exact given time, warm-started; the ``greedy_cpsat`` policy). :func:`greedy_assign` (the same
greedy over a whole assignment) and :func:`exhaustive_assign` (the oracle) are what tests and
benchmarks measure them against. All work in integer microseconds and integer accuracy units.
OR-Tools is imported only inside :func:`cpsat_assign`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Item",
    "cpsat_assign",
    "exhaustive_assign",
    "greedy_assign",
    "greedy_repair",
    "step_down",
    "total_accuracy",
    "violations",
]


@dataclass(frozen=True, slots=True)
class Item:
    """One queued job as the optimiser sees it.

    Attributes:
        latency_us: latency of each admissible option, ascending.
        accuracy: accuracy units of each option, ascending.
        deadline_us: deadline relative to the same origin as ``start_us``.
    """

    latency_us: tuple[int, ...]
    accuracy: tuple[int, ...]
    deadline_us: int


def violations(items: Sequence[Item], ks: Sequence[int], start_us: int) -> list[int]:
    """Indices of the jobs predicted to finish after their deadline under assignment ``ks``."""
    t = start_us
    late = []
    for i, (item, k) in enumerate(zip(items, ks)):
        t += item.latency_us[k]
        if t > item.deadline_us:
            late.append(i)
    return late


def total_accuracy(items: Sequence[Item], ks: Sequence[int]) -> int:
    """Sum of accuracy units under assignment ``ks``."""
    return sum(item.accuracy[k] for item, k in zip(items, ks))


def step_down(latency_us: Sequence[int], accuracy: Sequence[int], k: int) -> tuple[int, int, int]:
    """The next cheaper option below ``k``: (index, microseconds saved, accuracy units lost).

    Options of equal latency are skipped (lowering to one of them saves nothing); (k, 0, 0) when
    there is no cheaper option.
    """
    current = latency_us[k]
    for lower in range(k - 1, -1, -1):
        if latency_us[lower] < current:
            return lower, current - latency_us[lower], accuracy[k] - accuracy[lower]
    return k, 0, 0


def greedy_repair(
    latency_us: npt.NDArray[np.int64],
    deadline_us: npt.NDArray[np.int64],
    cheapest_us: npt.NDArray[np.int64],
    save_us: npt.NDArray[np.int64],
    loss: npt.NDArray[np.int64],
    start_us: int,
    take: Callable[[int], tuple[int, int]],
    limit: int | None = None,
) -> tuple[dict[int, int], list[int]]:
    """Lower options until every deadline holds, cheapest accuracy loss per microsecond first.

    The vectorised core of :func:`greedy_assign` (numpy over the queue; one pass per step taken).
    At the first job predicted late, a job that cannot fit even with every kept job up to it at
    its cheapest option is *doomed*: it is taken out, no option is lowered for it, and the walk
    goes on. Otherwise one job at or before it is lowered by one step, the step that saves the
    most time per accuracy unit lost (the first such job on ties), until it fits.

    Args:
        latency_us: latency of each job's current option, queue order.
        deadline_us: each job's deadline, same origin as ``start_us``.
        cheapest_us: latency of each job's cheapest option.
        save_us: microseconds that each job's next step down saves (0: none), see :func:`step_down`.
        loss: accuracy units that step loses.
        start_us: when the first job starts.
        take: ``take(i)`` lowers job ``i`` by its next step (the caller owns the options and
            records the change) and returns (saved, lost) of the step after it.
        limit: consider only the first ``limit`` jobs.

    Returns:
        (job index -> steps it was lowered, doomed indices in queue order).
    """
    n = len(latency_us) if limit is None else min(limit, len(latency_us))
    cur = latency_us[:n].astype(np.int64, copy=True)
    deadlines = deadline_us[:n]
    finish = start_us + np.cumsum(cur)
    late = np.flatnonzero(finish > deadlines)
    if not len(late):
        return {}, []
    kept = np.ones(n, dtype=bool)
    cheapest = cheapest_us[:n]
    save = save_us[:n].astype(np.float64)
    lost = loss[:n].astype(np.float64)
    lowered: dict[int, int] = {}
    doomed: list[int] = []
    first = int(late[0])
    while True:
        i = first
        if start_us + int(cheapest[: i + 1][kept[: i + 1]].sum()) > deadlines[i]:
            doomed.append(i)
            kept[i] = False
            finish[i:] -= cur[i]
            cur[i] = 0
        else:
            while finish[i] > deadlines[i]:
                useful = kept[: i + 1] & (save[: i + 1] > 0)
                score = np.where(useful, save[: i + 1] / (lost[: i + 1] + 1e-9), -1.0)
                j = int(np.argmax(score))
                if score[j] < 0:  # unreachable while the cheapest options fit; never loop on it
                    doomed.append(i)
                    kept[i] = False
                    finish[i:] -= cur[i]
                    cur[i] = 0
                    break
                saved = int(save[j])
                cur[j] -= saved
                finish[j:] -= saved
                lowered[j] = lowered.get(j, 0) + 1
                save[j], lost[j] = take(j)
        late = np.flatnonzero((finish[first:] > deadlines[first:]) & kept[first:])
        if not len(late):
            return lowered, doomed
        first += int(late[0])


def greedy_assign(items: Sequence[Item], ks: Sequence[int], start_us: int) -> tuple[list[int], list[int]]:
    """Downgrade jobs until every deadline holds, cheapest accuracy loss per microsecond first.

    Walks the queue in order. At the first job predicted late, a job that cannot fit even with
    every job up to it (doomed ones excepted) at its cheapest option is *doomed*: it is taken out
    and the walk goes on without it. Otherwise one option of a job at or before it is lowered,
    the step that saves the most time per accuracy unit lost, until that job fits.

    Returns:
        (assignment, doomed indices). Doomed jobs keep their index in the assignment.
    """
    ks = list(ks)
    if not items:
        return ks, []

    def take(i: int) -> tuple[int, int]:
        ks[i] = step_down(items[i].latency_us, items[i].accuracy, ks[i])[0]
        return step_down(items[i].latency_us, items[i].accuracy, ks[i])[1:]

    steps = [step_down(item.latency_us, item.accuracy, k) for item, k in zip(items, ks)]
    latency = np.array([item.latency_us[k] for item, k in zip(items, ks)], dtype=np.int64)
    deadline = np.array([item.deadline_us for item in items], dtype=np.int64)
    cheapest = np.array([item.latency_us[0] for item in items], dtype=np.int64)
    save = np.array([s[1] for s in steps], dtype=np.int64)
    loss = np.array([s[2] for s in steps], dtype=np.int64)
    _, doomed = greedy_repair(latency, deadline, cheapest, save, loss, start_us, take)
    return ks, doomed


def _finishes(items: Sequence[Item], ks: Sequence[int], start_us: int) -> list[int]:
    return list(itertools.accumulate((item.latency_us[k] for item, k in zip(items, ks)), initial=start_us))[
        1:
    ]


def exhaustive_assign(items: Sequence[Item], start_us: int) -> list[int] | None:
    """The optimum by enumeration (exponential: tests only); None when nothing is feasible."""
    best: tuple[int, list[int]] | None = None
    for ks in itertools.product(*(range(len(item.latency_us)) for item in items)):
        if not violations(items, ks, start_us):
            value = total_accuracy(items, ks)
            if best is None or value > best[0]:
                best = (value, list(ks))
    return None if best is None else best[1]


def cpsat_assign(
    items: Sequence[Item],
    start_us: int,
    hint: Sequence[int] | None = None,
    *,
    time_limit_s: float = 0.05,
    deterministic: bool = False,
    seed: int = 0,
    budget_us: int | None = None,
) -> tuple[list[int] | None, bool]:
    """The optimum with CP-SAT within a time budget.

    Args:
        items: the queue prefix.
        start_us: when the first job would start.
        hint: a feasible assignment to warm-start from (e.g. the greedy one).
        time_limit_s: the budget; in deterministic mode it is CP-SAT's deterministic time.
        deterministic: one worker and a deterministic time limit, for simulations and tests.
        seed: CP-SAT random seed.
        budget_us: a cap on the items' total latency (the slack of the jobs queued behind them).

    Returns:
        (assignment or None when none was found, whether it is proven optimal).
    """
    from ortools.sat.python import cp_model  # noqa: PLC0415  (keep `import mosel` light)

    model = cp_model.CpModel()
    picks = []
    elapsed: Any = None
    total = 0
    # One running-sum variable per job keeps the model linear in the queue length.
    for j, item in enumerate(items):
        pick = [model.new_bool_var(f"pick[{j},{k}]") for k in range(len(item.latency_us))]
        model.add_exactly_one(pick)
        picks.append(pick)
        if hint is not None:
            for k, var in enumerate(pick):
                model.add_hint(var, k == hint[j])
        total += item.latency_us[-1]
        finish = model.new_int_var(0, total, f"finish[{j}]")
        own = sum(lat * var for lat, var in zip(item.latency_us, pick))
        model.add(finish == own if elapsed is None else finish == elapsed + own)
        model.add(finish <= item.deadline_us - start_us)
        elapsed = finish
    if budget_us is not None and elapsed is not None:
        model.add(elapsed <= budget_us)
    model.maximize(
        sum(acc * var for item, pick in zip(items, picks) for acc, var in zip(item.accuracy, pick))
    )
    solver = cp_model.CpSolver()
    solver.parameters.random_seed = seed
    if deterministic:
        solver.parameters.num_workers = 1
        solver.parameters.max_deterministic_time = time_limit_s
    else:
        solver.parameters.num_workers = 1
        solver.parameters.max_time_in_seconds = time_limit_s
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, False
    ks = [next(k for k, var in enumerate(pick) if solver.value(var)) for pick in picks]
    return ks, status == cp_model.OPTIMAL
