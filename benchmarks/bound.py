"""Clairvoyant bounds for the benchmark: the best batched schedule of a short trace, and an LP bound.

Every arrival of a short trace is known in advance. Two numbers then frame what any online policy
could have delivered on it, in expected correct answers on time (accuracy units, ``ACCURACY_SCALE``
per request: a served request at configuration ``c`` counts ``A_c``):

* :func:`batched_optimum`: a CP-SAT model of the best schedule under exactly the cost model the
  simulator charges. Each job is dropped or served whole, in one batch, at one admissible strategy
  (a strategy of its frontier that meets its floor, or every available modality for every request,
  which the all-modality policies run); batches run one at a time, hold at most
  ``max_batch_size`` rows, cost ``CostModel.latency_us`` of their merged (configuration, count)
  groups, start after every member's arrival and end by every member's deadline. Its best found
  schedule is achievable (a lower bound on the optimum); CP-SAT's objective bound is an upper bound
  for schedules of this model. Hinted with a policy's simulation, the best found is never below
  that policy's result.
* :func:`lp_upper_bound`: a linear relaxation valid for *any* schedule, batched or not, even
  preemptive or with strategies off the frontier: each request costs at least its configuration's
  amortised per-row cost, and the requests of the jobs inside any time window must fit in it.

:func:`share_of_gain` turns a policy's result into the share of the gain available above a
baseline. Times are integer microseconds throughout, accuracies integer units.

Run: python benchmarks/bound.py  (a demo on a bursty paper-tvlt trace, about 70 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

import mosel
from mosel.jobs import floor_units
from mosel.plan import ACCURACY_SCALE, CostModel, Strategy
from mosel.simulate import JobRecord

__all__ = [
    "BoundResult",
    "amortised_us",
    "batched_optimum",
    "lp_upper_bound",
    "on_time_requests",
    "on_time_units",
    "share_of_gain",
]

Configuration = frozenset[str]
_CUT_SCALE = 1000  # amortised times in the CP-SAT cuts: integer nanoseconds, rounded down
GroupsKey = frozenset[tuple[Configuration, int]]


@dataclass(frozen=True, slots=True)
class BoundResult:
    """What :func:`batched_optimum` found.

    Attributes:
        best_found_units: accuracy units delivered on time by the best schedule found.
        best_found_requests: requests that schedule serves on time.
        proven_optimal: CP-SAT proved no schedule of the model does better.
        cpsat_bound_units: CP-SAT's bound on the objective (no schedule of the model exceeds it).
        solve_seconds: wall time of the solve (model building excluded).
        jobs: jobs in the trace.
        requests: requests in the trace.
        hint_units: the hint's objective (None without a hint), to tell whether CP-SAT improved it.
        build_seconds: wall time of building the model (and checking the hint).
    """

    best_found_units: int
    best_found_requests: int
    proven_optimal: bool
    cpsat_bound_units: float
    solve_seconds: float
    jobs: int
    requests: int
    hint_units: int | None = None
    build_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _Job:
    """One arrival as the models see it (integer microseconds, admissible options)."""

    index: int  # position in the caller's arrivals
    n: int
    arrival_us: int
    deadline_us: int
    available: Configuration
    floor: int  # accuracy units the whole job must reach
    options: tuple[Strategy, ...]  # admissible strategies, by increasing latency


def _key(strategy: Strategy) -> GroupsKey:
    return frozenset(strategy.groups)


def _order(arrivals: Sequence[mosel.Arrival]) -> list[int]:
    """Arrival indices in the simulator's order (by time, ties in input order)."""
    return sorted(range(len(arrivals)), key=lambda i: (arrivals[i].time_s, i))


def _jobs(profile: mosel.Profile, arrivals: Sequence[mosel.Arrival], grace_ms: float) -> list[_Job]:
    """The trace as :class:`_Job` values, in the simulator's order."""
    cost = profile.cost_model()
    everything = frozenset(profile.modalities)
    jobs = []
    for i in _order(arrivals):
        a = arrivals[i]
        if a.deadline_ms is None:
            raise ValueError(f"arrivals[{i}] has no deadline; the bounds need one for every job")
        if not 1 <= a.n <= profile.max_batch_size:
            raise ValueError(
                f"arrivals[{i}] has {a.n} requests; the bounds take jobs of 1..{profile.max_batch_size} "
                f"(max_batch_size) requests, served whole in one batch"
            )
        available = frozenset(a.available) if a.available else everything
        floor = floor_units(a.min_accuracy, a.n)
        frontier = profile.plan.frontier(available, a.n)
        options = list(frontier.strategies[frontier.index_meeting(floor) :])
        groups = ((available, a.n),)
        full = Strategy(groups, cost.latency_us(groups), cost.accuracy_units(groups))
        if full.accuracy_units >= floor and _key(full) not in {_key(s) for s in options}:
            options.append(full)
        options.sort(key=lambda s: (s.latency_us, s.accuracy_units))
        start = a.time_s * 1e6
        jobs.append(
            _Job(
                index=i,
                n=a.n,
                arrival_us=round(start),
                deadline_us=round(start + a.deadline_ms * 1000.0 + grace_ms * 1000.0),
                available=available,
                floor=floor,
                options=tuple(options),
            )
        )
    return jobs


def _monotone(cost: CostModel) -> bool:
    """True when every latency table is non-decreasing in the rows (a batch never gets cheaper
    by adding rows), which lets the model prune options that cannot fit."""
    tables = [*cost.branch_us.values(), *cost.fusion_us.values()]
    return all(all(x <= y for x, y in itertools.pairwise(t)) for t in tables)


def on_time_units(sim: mosel.Simulation) -> int:
    """Accuracy units a simulation delivered on time (expected correct answers x ``ACCURACY_SCALE``)."""
    return sum(s.accuracy_units for r in sim.records if r.on_time for s in r.strategies)


def on_time_requests(sim: mosel.Simulation) -> int:
    """Requests of the jobs a simulation served within their deadline."""
    return sum(r.arrival.n for r in sim.records if r.on_time)


# ----------------------------------------------------------------------------------------------
# the batched CP-SAT model


@dataclass(slots=True)
class _Model:
    """The CP-SAT model of :func:`batched_optimum` and its variables.

    Batch ``k`` is led by job ``k``: its member with the latest arrival (largest index in the
    simulator's order). Any batch has exactly one such leader, so there are no interchangeable
    batch slots; a batch starts no earlier than its leader's arrival, hence after every member's.
    """

    model: cp_model.CpModel = field(default_factory=cp_model.CpModel)
    pick: dict[tuple[int, int, int], cp_model.IntVar] = field(default_factory=dict)  # (job, option, leader)
    member: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)  # (job, leader)
    rows: dict[tuple[int, Configuration], cp_model.IntVar] = field(default_factory=dict)
    branch_rows: dict[tuple[int, str], cp_model.IntVar] = field(default_factory=dict)
    branch: dict[tuple[int, str], cp_model.IntVar] = field(default_factory=dict)
    fusion: dict[tuple[int, Configuration], cp_model.IntVar] = field(default_factory=dict)
    duration: dict[int, cp_model.IntVar] = field(default_factory=dict)
    start: dict[int, cp_model.IntVar] = field(default_factory=dict)
    end: dict[int, cp_model.IntVar] = field(default_factory=dict)
    objective: cp_model.IntVar | None = None


def _build(jobs: Sequence[_Job], cost: CostModel) -> _Model:
    """The batched model of ``jobs`` (see :class:`_Model` for how batches are indexed)."""
    limit = cost.max_batch_size
    floor_cost = {c: math.floor(a * _CUT_SCALE) for c, a in amortised_us(cost).items()}
    prune = _monotone(cost)
    built = _Model()
    model = built.model
    intervals = []
    for k, lead in enumerate(jobs):
        if not lead.options:
            continue
        cheapest = lead.options[0].latency_us if prune else 0
        candidates: list[tuple[int, int]] = []  # (job, option) that may join batch k
        for j in range(k + 1):
            job = jobs[j]
            if j != k and (job.n + lead.n > limit or lead.arrival_us >= job.deadline_us):
                continue
            latest_end = min(job.deadline_us, lead.deadline_us)
            for o, s in enumerate(job.options):
                if not prune or lead.arrival_us + max(s.latency_us, cheapest) <= latest_end:
                    candidates.append((j, o))
        if not any(j == k for j, _ in candidates):
            continue
        for j, o in candidates:
            built.pick[j, o, k] = model.new_bool_var(f"pick[{j},{o},{k}]")
        members = sorted({j for j, _ in candidates})
        for j in members:
            built.member[j, k] = model.new_bool_var(f"member[{j},{k}]")
        for j in members:
            model.add(sum(built.pick[j, o, k] for jj, o in candidates if jj == j) == built.member[j, k])
            if j != k:
                model.add_implication(built.member[j, k], built.member[k, k])
        if sum(jobs[j].n for j in members) > limit:
            model.add(sum(jobs[j].n * built.member[j, k] for j in members) <= limit)

        # Latency of the merged groups: each branch once over the rows of every configuration
        # containing it, one fusion call per configuration over that configuration's rows.
        configs = sorted({c for j, o in candidates for c, _ in jobs[j].options[o].groups}, key=sorted)
        terms = []
        for c in configs:
            uses = [
                (count, built.pick[j, o, k])
                for j, o in candidates
                for cc, count in jobs[j].options[o].groups
                if cc == c
            ]
            top = min(limit, sum(jobs[j].n for j in members))
            rows = built.rows[k, c] = model.new_int_var(0, top, f"rows[{k},{'+'.join(sorted(c))}]")
            model.add(rows == sum(count * var for count, var in uses))
            table = list(cost.fusion_us[c][: top + 1])
            lat = built.fusion[k, c] = model.new_int_var(
                min(table), max(table), f"fusion[{k},{'+'.join(sorted(c))}]"
            )
            model.add_element(rows, table, lat)
            terms.append(lat)
        for m in cost.modalities:
            with_m = [c for c in configs if m in c]
            if not with_m:
                continue
            top = min(limit, sum(jobs[j].n for j in members))
            rows = built.branch_rows[k, m] = model.new_int_var(0, top, f"branch_rows[{k},{m}]")
            model.add(rows == sum(built.rows[k, c] for c in with_m))
            table = list(cost.branch_us[m][: top + 1])
            lat = built.branch[k, m] = model.new_int_var(min(table), max(table), f"branch[{k},{m}]")
            model.add_element(rows, table, lat)
            terms.append(lat)
        horizon = lead.deadline_us - lead.arrival_us
        duration = built.duration[k] = model.new_int_var(0, horizon, f"duration[{k}]")
        model.add(duration == sum(terms))
        # Redundant, for CP-SAT's linear relaxation: no row costs less than its amortised time.
        model.add(_CUT_SCALE * duration >= sum(floor_cost[c] * built.rows[k, c] for c in configs))
        start = built.start[k] = model.new_int_var(lead.arrival_us, lead.deadline_us, f"start[{k}]")
        end = built.end[k] = model.new_int_var(lead.arrival_us, lead.deadline_us, f"end[{k}]")
        for j in members:
            if jobs[j].deadline_us < lead.deadline_us:
                model.add(end <= jobs[j].deadline_us).only_enforce_if(built.member[j, k])
        intervals.append(
            model.new_optional_interval_var(start, duration, end, built.member[k, k], f"batch[{k}]")
        )
    model.add_no_overlap(intervals)
    served: dict[int, list[cp_model.IntVar]] = {}
    for (j, _, _), var in built.pick.items():
        served.setdefault(j, []).append(var)
    for choices in served.values():
        if len(choices) > 1:
            model.add_at_most_one(choices)
    # The objective as a variable bounded by every job at its best option, so that CP-SAT's bound
    # can never be looser than that.
    most = sum(max((s.accuracy_units for s in job.options), default=0) for job in jobs)
    objective = built.objective = model.new_int_var(0, most, "objective")
    model.add(
        objective == sum(jobs[j].options[o].accuracy_units * var for (j, o, _), var in built.pick.items())
    )
    model.maximize(objective)
    return built


def _windows(arrive: Sequence[int], due: Sequence[int]) -> list[tuple[int, int]]:
    """Windows ``[arrive[i], due[k]]`` spanned by their own jobs (``i`` and ``k`` both inside).

    A window between any arrival and any deadline holds the same jobs as the shortest one of
    these around them, so the others add nothing.
    """
    a = np.asarray(arrive, dtype=np.int64)
    d = np.asarray(due, dtype=np.int64)
    i, k = np.nonzero((a[:, None] <= a[None, :]) & (d[:, None] <= d[None, :]) & (a[:, None] < d[None, :]))
    return sorted(set(zip(a[i].tolist(), d[k].tolist())))


def _records(
    sim: mosel.Simulation, jobs: Sequence[_Job], arrivals: Sequence[mosel.Arrival]
) -> list[JobRecord]:
    """The simulation's records, one per job of ``jobs`` (checked to be a run of ``arrivals``)."""
    if len(sim.records) != len(jobs):
        raise ValueError(f"the hint simulated {len(sim.records)} jobs, the trace has {len(jobs)}")
    for j, (job, record) in enumerate(zip(jobs, sim.records)):
        arrival = arrivals[job.index]
        if record.arrival.time_s != arrival.time_s or record.arrival.n != arrival.n:
            raise ValueError(f"the hint's job {j} is not the trace's (another trace was simulated)")
        if record.on_time and len(record.strategies) != 1:
            raise ValueError(f"the hint ran job {j} in {len(record.strategies)} chunks; the model takes one")
    return list(sim.records)


def _with_hint_options(jobs: Sequence[_Job], records: Sequence[JobRecord]) -> list[_Job]:
    """``jobs`` with each strategy the hint serves on time added to its job's options if missing
    (a policy may run strategies off the frontier); a strategy below the job's floor is refused."""
    out = []
    for j, (job, record) in enumerate(zip(jobs, records)):
        if record.on_time and _key(record.strategies[0]) not in {_key(s) for s in job.options}:
            strategy = record.strategies[0]
            if strategy.accuracy_units < job.floor or strategy.n != job.n:
                raise ValueError(f"the hint serves job {j} at a strategy that does not meet its floor")
            options = sorted((*job.options, strategy), key=lambda s: (s.latency_us, s.accuracy_units))
            out.append(dataclasses.replace(job, options=tuple(options)))
        else:
            out.append(job)
    return out


def _hint_batches(jobs: Sequence[_Job], records: Sequence[JobRecord]) -> list[list[tuple[int, int]]]:
    """The policy's batches as (job, option) lists, in the order they ran; jobs not on time left out.

    The jobs of one batch share the moment they started (``JobRecord.started_s``).
    """
    batches: dict[float, list[tuple[int, int]]] = {}
    for j, (job, record) in enumerate(zip(jobs, records)):
        if record.on_time:
            wanted = _key(record.strategies[0])
            option = next(o for o, s in enumerate(job.options) if _key(s) == wanted)
            batches.setdefault(record.started_s, []).append((j, option))
    return [batches[t] for t in sorted(batches)]


def _add_hint(
    built: _Model, jobs: Sequence[_Job], cost: CostModel, batches: Sequence[Sequence[tuple[int, int]]]
) -> int:
    """Hint every variable of ``built`` with the schedule ``batches`` (each started as early as
    possible, in the given order); returns the schedule's objective.

    Raises:
        ValueError: the schedule breaks the model (a row limit, a deadline, a pruned option).
    """
    values: dict[int, tuple[cp_model.IntVar, int]] = {}

    def put(var: cp_model.IntVar, value: int) -> None:
        values[var.index] = (var, value)

    for var in built.pick.values():
        put(var, 0)
    for var in built.member.values():
        put(var, 0)
    for k, start in built.start.items():
        put(start, jobs[k].arrival_us)
        put(built.end[k], jobs[k].arrival_us)
        put(built.duration[k], 0)
    for var in (*built.rows.values(), *built.branch_rows.values()):
        put(var, 0)
    for (_, m), var in built.branch.items():
        put(var, cost.branch_us[m][0])
    for (_, c), var in built.fusion.items():
        put(var, cost.fusion_us[c][0])

    free = -math.inf
    units = 0
    for batch in batches:
        k = max(j for j, _ in batch)
        groups: dict[Configuration, int] = {}
        for j, o in batch:
            if (j, o, k) not in built.pick:
                raise ValueError(
                    f"the hint's batch led by job {k} holds job {j} at an option the model rules out"
                )
            put(built.pick[j, o, k], 1)
            put(built.member[j, k], 1)
            units += jobs[j].options[o].accuracy_units
            for c, count in jobs[j].options[o].groups:
                groups[c] = groups.get(c, 0) + count
        rows = sum(groups.values())
        begin = int(max(free, jobs[k].arrival_us))
        duration = cost.latency_us(groups.items())
        free = begin + duration
        late = [j for j, _ in batch if free > jobs[j].deadline_us]
        if rows > cost.max_batch_size or late:
            raise ValueError(
                f"the hint's batch led by job {k} ({rows} rows, ends at {free} us) breaks the model: "
                f"late jobs {late}"
            )
        put(built.start[k], begin)
        put(built.end[k], free)
        put(built.duration[k], duration)
        modality_rows = dict.fromkeys(cost.modalities, 0)
        for c, count in groups.items():
            put(built.rows[k, c], count)
            put(built.fusion[k, c], cost.fusion_us[c][count])
            for m in c:
                modality_rows[m] += count
        for m, count in modality_rows.items():
            if (k, m) in built.branch:
                put(built.branch_rows[k, m], count)
                put(built.branch[k, m], cost.branch_us[m][count])
    assert built.objective is not None
    put(built.objective, units)
    for var, value in values.values():
        built.model.add_hint(var, value)
    return units


def batched_optimum(
    profile: mosel.Profile,
    arrivals: Sequence[mosel.Arrival],
    *,
    hint: mosel.Simulation | None = None,
    grace_ms: float = 0.0,
    time_limit_s: float = 60.0,
    workers: int = 2,
    seed: int = 0,
    fix_hint: bool = False,
) -> BoundResult:
    """The best batched schedule of a whole trace known in advance (CP-SAT).

    The model (see the module docstring) charges exactly what :func:`mosel.simulate` charges: a
    batch's latency is ``CostModel.latency_us`` of its merged groups, as element constraints over
    the profile's integer microsecond tables. Batches are indexed by their latest-arriving job, so
    a trace of ``J`` jobs has at most ``J`` batches and no interchangeable batch slots; with
    non-decreasing latency tables, options that cannot fit their window are pruned.

    Args:
        profile: the model's profile (its plan gives each job's frontier).
        arrivals: the trace; every job needs a deadline and at most ``max_batch_size`` requests.
        hint: a simulation of ``arrivals`` by an online policy; its on-time jobs, batched as they
            ran and started as early as possible in the same order, become a complete hint, so
            the best found is at least that policy's on-time units. A strategy it serves that is
            not among a job's options (a policy off the frontier) is added to them.
        grace_ms: added to every deadline.
        time_limit_s: CP-SAT's time limit.
        workers: CP-SAT search workers.
        seed: CP-SAT's random seed.
        fix_hint: fix every variable to the hint (a check that the hint is feasible: the result
            is then the hint's objective).

    Returns:
        The best schedule's units and requests, CP-SAT's bound and whether it is proven optimal.

    Raises:
        ValueError: a job without a deadline or larger than ``max_batch_size``, or a hint that is
            not a simulation of ``arrivals`` or that the model cannot represent.
    """
    started = time.perf_counter()
    cost = profile.cost_model()
    jobs = _jobs(profile, arrivals, grace_ms)
    records = None
    if hint is not None:
        records = _records(hint, jobs, arrivals)
        jobs = _with_hint_options(jobs, records)
    built = _build(jobs, cost)
    hint_units = None
    if records is not None:
        hint_units = _add_hint(built, jobs, cost, _hint_batches(jobs, records))
    elif fix_hint:
        raise ValueError("fix_hint needs a hint")
    build_seconds = time.perf_counter() - started
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    solver.parameters.fix_variables_to_their_hinted_value = fix_hint
    started = time.perf_counter()
    status = solver.solve(built.model)
    solve_seconds = time.perf_counter() - started
    units = requests = 0
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = [(j, o) for (j, o, _), var in built.pick.items() if solver.boolean_value(var)]
        units = sum(jobs[j].options[o].accuracy_units for j, o in chosen)
        requests = sum(jobs[j].n for j, _ in chosen)
    elif status == cp_model.INFEASIBLE:
        raise ValueError("the model is infeasible (with fix_hint: the hint breaks it)")
    bound = solver.best_objective_bound if status != cp_model.UNKNOWN else math.inf
    return BoundResult(
        best_found_units=units,
        best_found_requests=requests,
        proven_optimal=status == cp_model.OPTIMAL,
        cpsat_bound_units=float(bound),
        solve_seconds=solve_seconds,
        jobs=len(jobs),
        requests=sum(job.n for job in jobs),
        hint_units=hint_units,
        build_seconds=build_seconds,
    )


# ----------------------------------------------------------------------------------------------
# the LP bound


def amortised_us(cost: CostModel) -> dict[Configuration, Fraction]:
    """Per request, the least time each configuration can cost in any batch of at most
    ``max_batch_size`` rows: ``a_c = sum_{m in c} min_b L_m(b) / b + min_b F_c(b) / b``.

    For groups ``x_c`` of at most ``max_batch_size`` rows in all, each branch runs over
    ``r_m = sum_{c ∋ m} x_c`` rows and ``L_m(r_m) >= r_m min_b L_m(b) / b`` (likewise each fusion
    call), so ``CostModel.latency_us(x) >= sum_c x_c a_c``.
    """
    sizes = range(1, cost.max_batch_size + 1)
    branch = {m: min(Fraction(t[b], b) for b in sizes) for m, t in cost.branch_us.items()}
    return {
        c: sum((branch[m] for m in c), Fraction(0)) + min(Fraction(cost.fusion_us[c][b], b) for b in sizes)
        for c in cost.configurations(frozenset(cost.modalities))
    }


def lp_upper_bound(
    profile: mosel.Profile, arrivals: Sequence[mosel.Arrival], *, grace_ms: float = 0.0
) -> float:
    """An upper bound on the accuracy units any schedule of ``arrivals`` delivers on time.

    Valid for any schedule on one device, batched or not, even preemptive, at any strategies: a
    linear program (OR-Tools' GLOP, via ``pywraplp``) over ``y[j, c] >= 0``, the requests of job
    ``j`` served at configuration ``c`` (within the job's modalities), with

    * ``sum_c y[j, c] <= n_j`` (a job is served at most once, possibly in part in the relaxation);
    * the floor on the served part: ``sum_c y[j, c] A_c >= (floor_j / n_j) sum_c y[j, c]``;
    * for every window ``[a_i, d_k]`` between an arrival and a deadline (+ ``grace_ms``), the
      amortised time (:func:`amortised_us`) of the requests of the jobs arriving at or after
      ``a_i`` with deadlines at or before ``d_k`` is at most ``d_k - a_i``: every batch holding
      one of them runs inside the window, batches do not overlap, and each costs at least the
      amortised time of its rows. Only windows spanned by their own jobs are kept (the others
      repeat a shorter window's set), and of those only the ones their jobs could overfill;

    maximising ``sum y[j, c] A_c``. The result is GLOP's floating-point optimum.

    Raises:
        ValueError: as :func:`batched_optimum`, for a job without a deadline or too large.
        RuntimeError: GLOP did not reach an optimum.
    """
    cost = profile.cost_model()
    jobs = _jobs(profile, arrivals, grace_ms)
    amortised = {c: float(a) for c, a in amortised_us(cost).items()}
    solver = pywraplp.Solver.CreateSolver("GLOP")
    objective = solver.Objective()
    objective.SetMaximization()
    work = []  # per job: its amortised time, a variable
    for j, job in enumerate(jobs):
        configs = cost.configurations(job.available)
        y = {c: solver.NumVar(0.0, job.n, f"y[{j},{'+'.join(sorted(c))}]") for c in configs}
        total = solver.Constraint(-solver.infinity(), job.n)
        per_request = job.floor / job.n / ACCURACY_SCALE
        floor = solver.Constraint(0.0, solver.infinity())
        w = solver.NumVar(0.0, solver.infinity(), f"work[{j}]")
        defined = solver.Constraint(0.0, 0.0)
        defined.SetCoefficient(w, -1.0)
        for c, var in y.items():
            accuracy = cost.accuracy[c] / ACCURACY_SCALE
            total.SetCoefficient(var, 1.0)
            floor.SetCoefficient(var, accuracy - per_request)
            defined.SetCoefficient(var, amortised[c])
            objective.SetCoefficient(var, accuracy)
        work.append(w)
    arrive = np.array([job.arrival_us for job in jobs], dtype=np.int64)
    due = np.array([job.deadline_us for job in jobs], dtype=np.int64)
    most = np.array([job.n * max(amortised[c] for c in cost.configurations(job.available)) for job in jobs])
    for a, d in _windows(arrive.tolist(), due.tolist()):
        inside = np.flatnonzero((arrive >= a) & (due <= d))
        if most[inside].sum() <= d - a:
            continue
        fits = solver.Constraint(-solver.infinity(), float(d - a))
        for j in inside.tolist():
            fits.SetCoefficient(work[j], 1.0)
    status = solver.Solve()
    if status != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"GLOP ended with status {status}, not an optimum")
    return float(objective.Value()) * ACCURACY_SCALE


def share_of_gain(policy_units: float, baseline_units: float, achievable_units: float) -> float:
    """The share of the gain achievable above a baseline that a policy realises (1.0 when there is none)."""
    if achievable_units == baseline_units:
        return 1.0
    return (policy_units - baseline_units) / (achievable_units - baseline_units)


# ----------------------------------------------------------------------------------------------
# demo


def _mean_full_ms(profile: mosel.Profile) -> float:
    """Mean all-modality latency of the paper's job sizes: the benchmark's unit of load."""
    from workloads import job_size

    everything = frozenset(profile.modalities)
    sizes = [job_size(random.Random(i), profile.max_batch_size) for i in range(5000)]
    return statistics.mean(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in sizes)


def demo_trace(
    profile: mosel.Profile,
    *,
    load: float,
    seconds: float,
    seed: int,
    slack_ms: float,
    drop: float,
    phase_s: float,
) -> list[mosel.Arrival]:
    """A bursty trace as the benchmark builds one (``benchmarks/run.py``'s ``trace``: ``load`` times
    the all-modality capacity, jobs one at a time), with short phases (``phase_s`` on average, see
    ``bursty_arrivals``) so that a trace of a fraction of a second can hold a burst."""
    from workloads import bursty_arrivals, job_size

    everything = frozenset(profile.modalities)
    rate = load * 1000.0 / _mean_full_ms(profile)
    floor = round(max(profile.accuracy.values()) - drop, 4)
    rng = random.Random(seed + 1)
    out = []
    for t in bursty_arrivals(rate, seconds, seed, mean_phase_s=phase_s):
        n = job_size(rng, profile.max_batch_size)
        full = profile.plan.frontier(everything, n).best.predicted_latency_ms
        out.append(mosel.Arrival(t, n, deadline_ms=full + slack_ms, min_accuracy=floor))
    return out


DEMO_POLICIES = ("agnostic", "agnostic_plus", "aggressive", "greedy", "mosel")


def main(argv: Sequence[str] | None = None) -> None:
    """Bound a short bursty paper-tvlt trace and print how the online policies compare."""
    from scenarios import paper_tvlt

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--load", type=float, default=4.0, help="x the all-modality capacity")
    parser.add_argument("--seconds", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--phase", type=float, default=0.1, help="mean_phase_s of bursty_arrivals")
    parser.add_argument("--time-limit", type=float, default=60.0, help="CP-SAT, seconds")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    scenario = paper_tvlt()
    profile = scenario.profile
    arrivals = demo_trace(
        profile, load=args.load, seconds=args.seconds, seed=args.seed,
        slack_ms=scenario.slack_ms, drop=scenario.drop, phase_s=args.phase,
    )  # fmt: skip
    requests = sum(a.n for a in arrivals)
    realised = len(arrivals) * _mean_full_ms(profile) / (1000.0 * args.seconds)
    sims = {p: mosel.simulate(profile, arrivals, mosel.SchedulerConfig(policy=p)) for p in DEMO_POLICIES}
    results = {p: (on_time_units(sim), on_time_requests(sim)) for p, sim in sims.items()}
    hint_policy = max(("aggressive", "mosel"), key=lambda p: results[p][0])
    best = batched_optimum(profile, arrivals, hint=sims[hint_policy], time_limit_s=args.time_limit)
    lp = lp_upper_bound(profile, arrivals)
    baseline = results["aggressive"][0]
    print(
        f"paper-tvlt, bursty (mean phase {args.phase} s), {args.seconds} s, seed {args.seed}: load "
        f"{args.load} nominal, {realised:.2f} realised; {len(arrivals)} jobs, {requests} requests"
    )
    print(
        f"batched optimum hinted with {hint_policy} ({results[hint_policy][0] / ACCURACY_SCALE:.2f}): "
        f"{'proven optimal' if best.proven_optimal else 'not proven optimal'} after {best.solve_seconds:.1f} s"
    )
    header = (
        f"{'schedule':<24} {'on time':>9} {'correct':>8} {'accuracy':>9} {'share/found':>12} {'share/LP':>9}"
    )
    print(header)
    print("-" * len(header))

    def row(name: str, units: float, served: int | None) -> None:
        on = f"{served}/{requests}" if served is not None else "-"
        mean = f"{units / ACCURACY_SCALE / served:.5f}" if served else "-"
        print(
            f"{name:<24} {on:>9} {units / ACCURACY_SCALE:>8.2f} {mean:>9} "
            f"{share_of_gain(units, baseline, best.best_found_units):>12.3f} "
            f"{share_of_gain(units, baseline, lp):>9.3f}"
        )

    for policy, (units, served) in results.items():
        row(policy, units, served)
    row("batched optimum, found", best.best_found_units, best.best_found_requests)
    row("CP-SAT bound", best.cpsat_bound_units, None)
    row("LP upper bound", lp, None)
    print(
        "correct: expected correct answers on time; share: of the gain over aggressive available "
        f"(best found / LP bound); {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
