"""A clairvoyant bound: CP-SAT schedules a whole short trace knowing every arrival in advance.

Each job is served once (one strategy among those meeting its floor) or dropped; served jobs run
one at a time, start after arrival and end by their deadline. Maximise requests served on time,
then total accuracy (lexicographically). There is no cross-job batching, so compare it with mosel
run without batching (``SchedulerConfig(batching=False)``): the same execution model. CP-SAT's
proven upper bound on the objective bounds every such schedule even when the search is cut short.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ortools.sat.python import cp_model

import mosel
from mosel.plan import ACCURACY_SCALE, Strategy


@dataclass(frozen=True)
class OracleResult:
    served_requests: int  # by the best schedule found
    served_bound: int  # no schedule serves more on time (CP-SAT's proven bound)
    accuracy_units: int
    finish_s: dict[int, float]  # job index -> completion time
    optimal: bool


def solve(
    profile: mosel.Profile,
    arrivals: list[mosel.Arrival],
    time_limit_s: float = 20.0,
    hint: Mapping[int, tuple[float, Strategy]] | None = None,
) -> OracleResult:
    """The best schedule of ``arrivals``; ``hint`` maps job index to (start time, strategy)."""
    everything = frozenset(profile.modalities)
    model = cp_model.CpModel()
    intervals, served_terms, acc_terms, jobs = [], [], [], []
    weight = sum(a.n for a in arrivals) * ACCURACY_SCALE + 1  # one request outweighs all accuracy
    for i, a in enumerate(arrivals):
        frontier = profile.plan.frontier(a.available or everything, a.n)
        floor = round((a.min_accuracy or 0.0) * ACCURACY_SCALE) * a.n
        options = frontier.strategies[frontier.index_meeting(floor) :]
        if not options or a.deadline_ms is None:
            continue
        arrive = round(a.time_s * 1e6)
        deadline = arrive + round(a.deadline_ms * 1000)
        present = model.new_bool_var(f"served[{i}]")
        pick = [model.new_bool_var(f"pick[{i},{k}]") for k in range(len(options))]
        model.add(sum(pick) == present)
        duration = model.new_int_var(0, max(s.latency_us for s in options), f"dur[{i}]")
        model.add(duration == sum(s.latency_us * y for s, y in zip(options, pick)))
        start = model.new_int_var(arrive, deadline, f"start[{i}]")
        end = model.new_int_var(arrive, deadline, f"end[{i}]")
        intervals.append(model.new_optional_interval_var(start, duration, end, present, f"run[{i}]"))
        served_terms.append(a.n * present)
        acc_terms.extend(s.accuracy_units * y for s, y in zip(options, pick))
        jobs.append((i, present, end))
        if hint is not None:
            started, strategy = hint.get(i, (None, None))
            model.add_hint(present, started is not None)
            for s, y in zip(options, pick):
                model.add_hint(y, strategy is not None and s.groups == strategy.groups)
            if started is not None:
                model.add_hint(start, min(deadline, max(arrive, round(started * 1e6))))
    model.add_no_overlap(intervals)
    model.maximize(weight * sum(served_terms) + sum(acc_terms))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = 2
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return OracleResult(0, sum(a.n for a in arrivals), 0, {}, False)
    finish = {i: solver.value(end) / 1e6 for i, present, end in jobs if solver.value(present)}
    served = sum(arrivals[i].n for i in finish)
    accuracy = round(solver.objective_value) - weight * served
    bound = int(solver.best_objective_bound) // weight
    return OracleResult(served, bound, accuracy, finish, status == cp_model.OPTIMAL)
