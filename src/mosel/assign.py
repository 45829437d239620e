"""Online re-assignment of queued jobs' strategies (the paper's queue optimisation, made exact).

The queue prefix ``0..v`` runs back to back from ``start_us``. Job ``j`` picks option ``k_j`` from
its admissible options (latency ascending, accuracy ascending); maximise the total accuracy units
(request-weighted expected accuracy) subject to EVERY job's own deadline::

    max sum_j acc_j[k_j]   s.t.   start_us + sum_{j <= i} lat_j[k_j] <= deadline_i   for all i

Three solvers: :func:`greedy_assign` (always ready, microseconds), :func:`cpsat_assign` (exact
given time, warm-started from the current assignment) and :func:`exhaustive_assign` (the test
oracle). All work in integer microseconds and integer accuracy units. OR-Tools is imported only
inside :func:`cpsat_assign`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Item",
    "cpsat_assign",
    "exhaustive_assign",
    "greedy_assign",
    "total_accuracy",
    "upgrade_head",
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


def greedy_assign(items: Sequence[Item], ks: Sequence[int], start_us: int) -> tuple[list[int], list[int]]:
    """Downgrade jobs until every deadline holds, cheapest accuracy loss per microsecond first.

    Walks the queue in order; at the first job predicted late, repeatedly lowers one option of a
    job at or before it, picking the step that saves the most time per accuracy unit lost,
    until that job fits. A job that cannot fit with every job up to it at its cheapest option is
    *doomed*: it is taken out and the walk goes on without it.

    Returns:
        (assignment, doomed indices). Doomed jobs keep their index in the assignment.
    """
    ks = list(ks)
    doomed: list[int] = []
    t = start_us
    for i, item in enumerate(items):
        if i in doomed:
            continue
        t += item.latency_us[ks[i]]
        while t > item.deadline_us:
            best_j, best_score = -1, -1.0
            for j in range(i + 1):
                if j in doomed or ks[j] == 0:
                    continue
                other = items[j]
                saved = other.latency_us[ks[j]] - other.latency_us[ks[j] - 1]
                lost = other.accuracy[ks[j]] - other.accuracy[ks[j] - 1]
                score = saved / (lost + 1e-9)
                if saved > 0 and score > best_score:
                    best_j, best_score = j, score
            if best_j < 0:
                doomed.append(i)
                t -= item.latency_us[ks[i]]
                break
            other = items[best_j]
            t -= other.latency_us[ks[best_j]] - other.latency_us[ks[best_j] - 1]
            ks[best_j] -= 1
    return ks, doomed


def upgrade_head(items: Sequence[Item], ks: Sequence[int], start_us: int) -> int:
    """The most accurate option for job 0 that keeps every queued job on time (late binding)."""
    slack = min(
        (item.deadline_us - finish for item, finish in zip(items, _finishes(items, ks, start_us))),
        default=0,
    )
    head = items[0]
    current = head.latency_us[ks[0]]
    best = ks[0]
    for k in range(ks[0] + 1, len(head.latency_us)):
        if head.latency_us[k] - current <= slack:
            best = k
    return best


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
) -> tuple[list[int] | None, bool]:
    """The optimum with CP-SAT within a time budget.

    Args:
        items: the queue prefix.
        start_us: when the first job would start.
        hint: a feasible assignment to warm-start from (e.g. the greedy one).
        time_limit_s: the budget; in deterministic mode it is CP-SAT's deterministic time.
        deterministic: one worker and a deterministic time limit, for simulations and tests.
        seed: CP-SAT random seed.

    Returns:
        (assignment or None when none was found, whether it is proven optimal).
    """
    from ortools.sat.python import cp_model  # noqa: PLC0415  (keep `import mosel` light)

    model = cp_model.CpModel()
    picks = []
    for j, item in enumerate(items):
        pick = [model.new_bool_var(f"pick[{j},{k}]") for k in range(len(item.latency_us))]
        model.add_exactly_one(pick)
        picks.append(pick)
        if hint is not None:
            for k, var in enumerate(pick):
                model.add_hint(var, k == hint[j])
    # Every job's own deadline: the prefix of latencies up to it fits.
    elapsed: Any = 0
    for i, item in enumerate(items):
        elapsed = elapsed + sum(lat * var for lat, var in zip(item.latency_us, picks[i]))
        model.add(elapsed <= item.deadline_us - start_us)
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
