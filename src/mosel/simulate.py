"""Deterministic simulation of the online stage: the real scheduler against a virtual clock.

Execution times come from the profile's cost model times a residual drawn (seeded) from a
:class:`~mosel.tail.Residuals` sample: the profile's own timing spread, or what a real run
recorded (``mosel.stats(model).residuals``), plus that run's per-batch dispatch overhead, and
optional stalls (:class:`~mosel.machine.Stalls`). The simulated device is a
:class:`~mosel.machine.Machine`: by default its draws lie on a time grid (common random numbers),
so that two configurations simulated with one seed meet the same machine. A run is
machine-independent and reproducible. The :class:`~mosel.scheduler.Scheduler` is the same code
the threaded server runs; only the clock and the executor are simulated.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from mosel.chains import Escalated
from mosel.clock import VirtualClock
from mosel.errors import InputError, MoselError, SLOError
from mosel.escalation import RowSample
from mosel.machine import DRAWS, Machine, Stalls
from mosel.plan import Strategy
from mosel.profiles import Profile
from mosel.replaying import Replay
from mosel.routing import PowerOfTwoRouter, RandomRouter, Router, RouteRequest, SlackRouter
from mosel.scheduler import Batch, Job, Scheduler, SchedulerConfig
from mosel.slo import SLO
from mosel.stats import Load, Stats, StatsSnapshot
from mosel.tail import Residuals

__all__ = ["Arrival", "ClusterSimulation", "JobRecord", "Simulation", "simulate", "simulate_replicas"]

Configuration = frozenset[str]


@dataclass(frozen=True, slots=True)
class Arrival:
    """One job of a workload trace."""

    time_s: float
    n: int
    deadline_ms: float | None = None
    min_accuracy: float | None = None
    available: Configuration | None = None
    best_effort: bool = False
    confidence: float | None = None
    per_request: bool = False
    sizes: Mapping[str, int] | None = None
    """Input sizes of the modalities declared with ``size=`` (None: the profile's reference)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What happened to one job of a simulation."""

    arrival: Arrival
    finish_s: float  # NaN when the job failed
    started_s: float
    error: str | None  # the exception's class name
    strategies: tuple[Strategy, ...]
    expected_accuracy: float
    modalities: tuple[Configuration, ...] = ()
    """Per request, the configuration it ended at (empty when it failed)."""
    escalated: tuple[bool, ...] = ()
    """Per request, whether it escalated past its chain's first configuration."""
    measured_accuracy: float = math.nan
    """Its requests' scores in the replayed rows at the configurations they ended at (NaN without
    a :class:`mosel.RowSample`, or when it failed)."""

    @property
    def served(self) -> bool:
        """True when the job ran to completion."""
        return self.error is None

    @property
    def on_time(self) -> bool:
        """True when the job was served within its deadline (no deadline: served at all)."""
        if not self.served:
            return False
        deadline = self.arrival.deadline_ms
        return deadline is None or (self.finish_s - self.arrival.time_s) * 1000.0 <= deadline + 1e-9

    @property
    def completion_ms(self) -> float:
        """Arrival to completion in milliseconds (NaN when failed)."""
        return (self.finish_s - self.arrival.time_s) * 1000.0


@dataclass(frozen=True, slots=True)
class Simulation:
    """The records of every job, in arrival order, and the scheduler's statistics."""

    records: tuple[JobRecord, ...]
    stats: StatsSnapshot
    end_s: float
    decision_ms: tuple[float, ...] = ()  # wall time of each executor-side decision (complete + dispatch)


def _checked(arrival: object, index: int, modalities: Configuration, sized: Iterable[str] = ()) -> Arrival:
    """``arrival`` if it is a valid :class:`Arrival` (with its SLO values as floats)."""
    if not isinstance(arrival, Arrival):
        raise InputError(f"arrivals[{index}] is a {type(arrival).__name__}, not a mosel.Arrival")
    where = f"arrivals[{index}] (time_s={arrival.time_s!r})"
    if (
        isinstance(arrival.time_s, bool)
        or not isinstance(arrival.time_s, numbers.Real)
        or not (math.isfinite(arrival.time_s) and arrival.time_s >= 0)
    ):
        raise InputError(f"{where}: time_s must be a finite number of seconds >= 0")
    if isinstance(arrival.n, bool) or not isinstance(arrival.n, numbers.Integral) or arrival.n < 1:
        raise InputError(f"{where}: n must be an int >= 1 (requests in the job), got {arrival.n!r}")
    if arrival.available is not None:
        unknown = sorted(set(arrival.available) - modalities)
        if unknown or not arrival.available:
            raise InputError(
                f"{where}: available must be a non-empty subset of {sorted(modalities)}, got "
                f"{sorted(arrival.available)}" + (f" (unknown: {unknown})" if unknown else "")
            )
    if arrival.sizes is not None:
        bad = {
            m: v for m, v in arrival.sizes.items()
            if m not in sized or isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
        }  # fmt: skip
        if bad:
            raise InputError(
                f"{where}: sizes must map modalities declared with size= ({sorted(sized)}) to ints >= 1, "
                f"got {bad}"
            )
    try:
        slo = SLO.of(
            arrival.deadline_ms,
            arrival.min_accuracy,
            arrival.best_effort,
            arrival.confidence,
            arrival.per_request,
        )
    except SLOError as exc:
        raise SLOError(f"{where}: {exc}") from None
    return dataclasses.replace(
        arrival,
        time_s=float(arrival.time_s),
        n=int(arrival.n),
        deadline_ms=slo.deadline_ms,
        min_accuracy=slo.min_accuracy,
        available=arrival.available and frozenset(arrival.available),
        best_effort=slo.best_effort,
        confidence=slo.confidence,
        per_request=slo.per_request,
    )


def simulate(
    profile: Profile,
    arrivals: Iterable[Arrival],
    config: SchedulerConfig | None = None,
    *,
    noise: float = 0.0,
    seed: int = 0,
    residuals: Residuals | None = None,
    stalls: Stalls | None = None,
    draws: str = "time-grid",
    rows: RowSample | None = None,
) -> Simulation:
    """Replay ``arrivals`` through the scheduler on a virtual clock.

    Args:
        profile: the model's profile; its cost model gives the simulated execution times.
        arrivals: the workload, any order (sorted by time here). A malformed arrival (no
            requests, an unknown modality, a bad SLO value) raises :class:`mosel.InputError` or
            :class:`mosel.SLOError` naming it, before anything runs.
        config: scheduler settings; CP-SAT runs inline with a deterministic time limit.
        noise: relative standard deviation of execution times (lognormal), 0 for exact.
        seed: seed of the noise and of the residual draws.
        residuals: each batch takes its predicted time times a ratio drawn from this sample,
            plus an overhead drawn from it (the executor is busy, and the batch's jobs are not
            done, until both have passed). ``Residuals.from_profile(profile)`` is the profile's
            own spread; a real run's ``mosel.stats(model).residuals`` replays its machine (with
            its batch times shifted to the trace's clock, its slow spells when they happened).
            None: exact predictions (with ``noise`` if given).
        stalls: rare delays with their own rate per second of device time and their lengths
            (:func:`mosel.machine.fit_stalls` separates them from a recorded sample); a batch
            running when one begins (on the device's busy clock, or the wall clock: see
            :class:`mosel.Stalls`) is late by its length. None: none.
        draws: ``"time-grid"`` (default): common random numbers; the k-th batch starting in
            a 1 ms slot takes that slot's k-th draw, and stalls begin at seeded instants, so
            that every configuration simulated with one ``seed`` meets the same machine and a
            difference in results is a difference in decisions. ``"per-batch"``: one stream,
            the n-th batch takes the n-th draw (the behaviour before; two configurations share
            their luck only until their batches first differ).
        rows: for a profile with a calibration, held-out rows' confidences and scores per
            configuration: each job draws its rows from them (seeded), a chain's rows escalate by
            their own confidences, and each record's ``measured_accuracy`` is its rows' scores.
            None: a chain's rows escalate at random at the calibrated shares.

    Raises:
        InputError: a malformed arrival, or an unknown ``draws``.
    """
    trace = checked_trace(profile, arrivals)
    clock = VirtualClock()
    machine = _machine(residuals, seed, 0, noise, stalls, draws)
    engine = Engine(profile, config, machine=machine, rows=rows, seed=seed)
    run_engines(clock, [engine], trace, lambda index, arrival, now: 0)
    return engine.simulation(trace, clock.now())


def _machine(
    residuals: Residuals | None,
    seed: int,
    stream: int,
    noise: float,
    stalls: Stalls | None,
    draws: str,
    slowdown: float = 1.0,
) -> Machine:
    """Replica ``stream``'s simulated device (an unknown ``draws`` is an InputError)."""
    if draws not in DRAWS:
        raise InputError(f"draws={draws!r}: use one of {list(DRAWS)}")
    return Machine(
        residuals, seed=seed, stream=stream, noise=noise, stalls=stalls, draws=draws, slowdown=slowdown
    )


def checked_trace(profile: Profile, arrivals: Iterable[Arrival]) -> list[Arrival]:
    """``arrivals`` validated (see :func:`simulate`) and sorted by time."""
    everything = frozenset(profile.modalities)
    trace = [_checked(a, i, everything, profile.sized) for i, a in enumerate(arrivals)]
    trace.sort(key=lambda a: a.time_s)
    return trace


class Engine:
    """One simulated replica: a :class:`Scheduler` and an executor charging simulated batch times.

    Driven by :func:`run_engines` on a shared virtual clock; the jobs it was given (by trace
    index, their ``payload``) and the errors that refused them are kept for its records.
    """

    def __init__(
        self,
        profile: Profile,
        config: SchedulerConfig | None,
        *,
        machine: Machine,
        rows: RowSample | None = None,
        seed: object = 0,
    ) -> None:
        base = config or SchedulerConfig()
        self.stats = Stats()
        self.scheduler = Scheduler(profile, dataclasses.replace(base, deterministic=True), self.stats)
        self.cost = self.scheduler.cost
        self.everything = frozenset(profile.modalities)
        self.machine = machine
        self.jobs: list[Job[int]] = []
        self.rejected: dict[int, str] = {}
        self.running: Batch | None = None
        self.done_at = math.inf
        self.measured_us = 0.0
        self.decisions: list[float] = []
        calibration = self.scheduler.pricer.calibration
        self.replay: Replay | None = None
        if calibration is not None or rows is not None:  # its own generator: residual draws unchanged
            self.replay = Replay(rows, random.Random(f"{seed}:rows"), self.scheduler.pricer.stage_overhead_us)
        self.escalated: Escalated | None = None

    @property
    def waiting(self) -> bool:
        """Idle with queued work: it should dispatch now."""
        return self.running is None and bool(self.scheduler.queue)

    def finish(self) -> None:
        """The running batch ends (at :attr:`done_at`)."""
        assert self.running is not None
        started = time.perf_counter()
        self.scheduler.complete(self.running, self.done_at, self.measured_us, escalated=self.escalated)
        self.scheduler.handed_over(self.running, self.done_at)
        self.decisions.append((time.perf_counter() - started) * 1e3)
        self.running, self.done_at = None, math.inf

    def dispatch(self, now: float) -> None:
        """Take the next batch and charge it its simulated time."""
        started = time.perf_counter()
        self.running, _ = self.scheduler.dispatch(now)
        self.decisions.append((time.perf_counter() - started) * 1e3)
        if self.running is not None:
            cost = self.running.tasks[0].job.cost or self.cost  # the batch's size bucket
            base_us = float(cost.latency_us(self.running.merged.groups))
            exec_us, overhead_us = self.machine.batch(now, base_us)
            self.escalated = None
            if self.replay is not None:
                ratio = exec_us / max(base_us, 1e-9)
                later_us, self.escalated = self.replay.run(self.running, cost, now, exec_us, ratio)
                exec_us += later_us
            self.done_at = now + (exec_us + overhead_us) / 1e6
            self.measured_us = exec_us

    def admit(self, index: int, arrival: Arrival, now: float) -> None:
        """Submit trace entry ``index``; a refusal is recorded as the error's class name."""
        job = Job(
            n=arrival.n,
            available=arrival.available or self.everything,
            arrival=arrival.time_s,
            slo=SLO(
                arrival.deadline_ms, arrival.min_accuracy, arrival.best_effort, arrival.confidence,
                arrival.per_request,
            ),
            payload=index,
            bucket=None if arrival.sizes is None else self.scheduler.profile.bucket(arrival.sizes),
        )  # fmt: skip
        self.jobs.append(job)
        if self.replay is not None:
            self.replay.admitted(job)
        try:
            self.scheduler.admit(job, now)
        except MoselError as exc:
            self.rejected[index] = type(exc).__name__

    def records(self, trace: Sequence[Arrival]) -> list[JobRecord]:
        """One record per job this engine was given, in the order it got them."""
        records = []
        for job in self.jobs:
            error = self.rejected.get(job.payload) or (
                type(job.error).__name__ if job.error is not None else None
            )
            served = error is None
            modalities, escalated = self.replay.outcome(job) if self.replay and served else ((), ())
            records.append(
                JobRecord(
                    arrival=trace[job.payload],
                    finish_s=job.finished if served else math.nan,
                    started_s=job.started,
                    error=error,
                    strategies=job.strategies if job.tasks and served else (),
                    expected_accuracy=job.expected_accuracy if job.tasks and served else math.nan,
                    modalities=modalities,
                    escalated=escalated,
                    measured_accuracy=self.replay.accuracy(job) if self.replay and served else math.nan,
                )
            )
        return records

    def simulation(self, trace: Sequence[Arrival], end_s: float) -> Simulation:
        """This engine's run as a :class:`Simulation`."""
        return Simulation(tuple(self.records(trace)), self.stats.snapshot(), end_s, tuple(self.decisions))


Route = Callable[[int, Arrival, float], int]
"""(trace index, arrival, now) -> the engine that gets it."""


def run_engines(
    clock: VirtualClock,
    engines: Sequence[Engine],
    trace: Sequence[Arrival],
    route: Route,
    report: Callable[[float], None] | None = None,
    report_every_s: float = math.inf,
) -> None:
    """Run ``trace`` (sorted) through ``engines`` on one virtual clock until every job resolved.

    Events in time order; at one moment: every job arriving then is admitted (to the engine
    ``route`` names), then idle engines with queued work dispatch, then batches end, then
    ``report(t)`` runs (at ``0, report_every_s, 2 * report_every_s, ...`` while arrivals remain).
    With one engine and no reports this is exactly the single-scheduler loop of :func:`simulate`.
    """
    i = 0
    next_report = 0.0 if report is not None and math.isfinite(report_every_s) else math.inf
    while True:
        now = clock.now()
        next_arrival = trace[i].time_s if i < len(trace) else math.inf
        if next_arrival > now:
            waiting = next((e for e in engines if e.waiting), None)
            if waiting is not None:
                waiting.dispatch(now)
                continue
        finishing = min(engines, key=lambda e: e.done_at)
        due_report = next_report if i < len(trace) else math.inf
        if finishing.running is not None and finishing.done_at <= min(next_arrival, due_report):
            clock.advance_to(finishing.done_at)
            finishing.finish()
            continue
        if due_report < next_arrival:
            assert report is not None
            clock.advance_to(max(now, due_report))
            report(due_report)
            next_report += report_every_s
            continue
        if i >= len(trace):
            break
        arrival = trace[i]
        clock.advance_to(max(now, arrival.time_s))
        engines[route(i, arrival, clock.now())].admit(i, arrival, clock.now())
        i += 1


@dataclass(frozen=True, slots=True)
class ClusterSimulation:
    """A simulated scale-out run: every replica's own :class:`Simulation`, and all of them as one.

    Attributes:
        overall: every job, in arrival order, with the replicas' statistics summed
            (:meth:`StatsSnapshot.merged`); ``decision_ms`` holds every replica's decisions.
        replicas: each replica's run (its jobs in the order it got them, its statistics).
        assignment: per record of ``overall``, the replica it was sent to.
        router: the router's name.
        reports: load reports each replica sent (the router saw them ``report_delay_ms`` later).
    """

    overall: Simulation
    replicas: tuple[Simulation, ...]
    assignment: tuple[int, ...]
    router: str
    reports: int


ROUTERS: Final = ("random", "power-of-two", "slack")
"""Router names :func:`simulate_replicas` accepts (or pass a router object)."""


def _checked_cluster(
    replicas: object, report_every_ms: object, report_delay_ms: object, slowdowns: Sequence[float] | None
) -> list[float]:
    """Validate :func:`simulate_replicas`' cluster arguments; each replica's slowdown factor."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InputError(
            f"simulate_replicas(replicas={replicas!r}): give the number of replicas, an int >= 1"
        )
    for name, value in (("report_every_ms", report_every_ms), ("report_delay_ms", report_delay_ms)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
            raise InputError(f"simulate_replicas({name}={value!r}): must be a finite number of ms >= 0")
    if report_every_ms == 0.0 and report_delay_ms != 0.0:
        raise InputError(
            f"simulate_replicas(report_every_ms=0, report_delay_ms={report_delay_ms!r}): loads read at the "
            "moment of routing have no transport delay; give a report period, or a delay of 0"
        )
    assert isinstance(replicas, int)
    factors = [1.0] * replicas if slowdowns is None else list(slowdowns)
    if len(factors) != replicas or not all(
        isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0.0
        for f in factors
    ):
        raise InputError(
            f"simulate_replicas(slowdowns={slowdowns!r}): give one finite factor > 0 per replica "
            f"({replicas}), or None for all 1"
        )
    return [float(f) for f in factors]


def _router(router: str | Router, profile: Profile, stale_after_s: float) -> Router:
    """A router object from a name (or the object itself)."""
    if isinstance(router, str):
        if router not in ROUTERS:
            raise InputError(
                f"simulate_replicas(router={router!r}): unknown router; use one of {list(ROUTERS)}"
            )
        return (
            RandomRouter()
            if router == "random"
            else PowerOfTwoRouter()
            if router == "power-of-two"
            else SlackRouter(profile, stale_after_s=stale_after_s)
        )
    return router


def simulate_replicas(
    profile: Profile,
    arrivals: Iterable[Arrival],
    replicas: int,
    router: str | Router = "slack",
    *,
    report_every_ms: float = 10.0,
    report_delay_ms: float = 0.0,
    config: SchedulerConfig | None = None,
    residuals: Residuals | None = None,
    noise: float = 0.0,
    seed: int = 0,
    stale_after_s: float = 1.0,
    slowdowns: Sequence[float] | None = None,
    stalls: Stalls | None = None,
    draws: str = "time-grid",
) -> ClusterSimulation:
    """Replay ``arrivals`` through ``replicas`` schedulers behind a router, on one virtual clock.

    Each replica is its own :class:`~mosel.scheduler.Scheduler` and simulated executor (as in
    :func:`simulate`). Every ``report_every_ms`` each replica takes its :class:`mosel.Load`;
    the router sees it ``report_delay_ms`` later (staleness is modelled) and picks a replica
    for each arriving job from the loads it last saw. With one replica, any router gives
    exactly :func:`simulate`'s result.

    Args:
        profile: the model's profile (every replica serves the same model on the same device).
        arrivals: the workload (see :func:`simulate`); its rate is the whole cluster's.
        replicas: how many replicas (>= 1).
        router: ``"random"``, ``"power-of-two"`` or ``"slack"`` (:class:`mosel.SlackRouter`
            with ``stale_after_s``), or a router object (it keeps its state across calls).
        report_every_ms: period of the load reports; 0 means the router reads every replica's
            load at the moment it routes (perfect information; ``report_delay_ms`` must be 0).
        report_delay_ms: transport delay from a report's taking to the router.
        config: every replica's scheduler settings (CP-SAT inline, deterministic).
        residuals: batch time residuals, as in :func:`simulate` (a sample with times gives
            every replica the same slow spells: one shared machine type).
        noise: lognormal noise of execution times, as in :func:`simulate`.
        seed: replica ``k``'s machine is seeded by ``seed`` (``k = 0``, so that one replica
            reproduces :func:`simulate`) or by ``(seed, k)``; the router's by ``seed`` too,
            from its own generator.
        stale_after_s: for the ``"slack"`` router: loads older than this are ignored.
        slowdowns: per replica, a factor on its execution times (default all 1): a cluster of
            mixed devices, or replicas sharing theirs. Every replica still starts from the same
            profile; its scheduler learns its own speed online (:attr:`mosel.Load.latency_correction`).
        stalls: each replica's stall process, as in :func:`simulate` (its own instants).
        draws: as in :func:`simulate`: ``"time-grid"`` gives each replica the same machine
            whatever the router sends it, so that routers are compared on equal luck.

    Raises:
        InputError: a bad replica count, period, delay or slowdowns, an unknown router name,
            or a malformed arrival (as :func:`simulate`).
    """
    factors = _checked_cluster(replicas, report_every_ms, report_delay_ms, slowdowns)
    chosen = _router(router, profile, stale_after_s)
    trace = checked_trace(profile, arrivals)
    clock = VirtualClock()
    engines = [
        Engine(profile, config, machine=_machine(residuals, seed, k, noise, stalls, draws, factors[k]))
        for k in range(replicas)
    ]
    desk = _Dispatcher(chosen, engines, random.Random(seed), report_every_ms, report_delay_ms)
    periodic = report_every_ms > 0.0
    run_engines(
        clock,
        engines,
        trace,
        desk.route,
        desk.report if periodic else None,
        report_every_ms / 1000.0 if periodic else math.inf,
    )
    end_s = clock.now()
    runs = tuple(e.simulation(trace, end_s) for e in engines)
    by_index = {
        job.payload: record
        for e, run in zip(engines, runs, strict=True)
        for job, record in zip(e.jobs, run.records, strict=True)
    }
    overall = Simulation(
        tuple(by_index[i] for i in range(len(trace))),
        StatsSnapshot.merged([run.stats for run in runs]),
        end_s,
        tuple(d for run in runs for d in run.decision_ms),
    )
    return ClusterSimulation(overall, runs, tuple(desk.assignment), chosen.name, desk.reports)


class _Dispatcher:
    """The router's side of a simulated cluster: the loads it has seen, and its choices."""

    def __init__(
        self,
        router: Router,
        engines: Sequence[Engine],
        rng: random.Random,
        report_every_ms: float,
        report_delay_ms: float,
    ) -> None:
        self.router, self.engines, self.rng = router, engines, rng
        self.live = report_every_ms == 0.0  # loads read at the moment of routing
        self.delay_s = report_delay_ms / 1000.0
        self.seen: list[Load | None] = [None] * len(engines)
        self.in_transit: collections.deque[tuple[float, list[Load]]] = collections.deque()
        self.assignment: list[int] = []
        self.reports = 0

    def report(self, now: float) -> None:
        """Every replica takes its load now; the router sees it ``report_delay_ms`` later."""
        self.reports += 1
        self.in_transit.append((now + self.delay_s, [e.scheduler.load(now, at_s=now) for e in self.engines]))

    def route(self, index: int, arrival: Arrival, now: float) -> int:
        """The replica the router picks for trace entry ``index``."""
        if self.live:
            self.seen[:] = [e.scheduler.load(now, at_s=now) for e in self.engines]
        while self.in_transit and self.in_transit[0][0] <= now:
            self.seen[:] = self.in_transit.popleft()[1]
        request = RouteRequest(arrival.n, arrival.deadline_ms, arrival.min_accuracy, arrival.available)
        choice = self.router.choose(self.seen, request, now, self.rng)
        replicas = len(self.engines)
        if not 0 <= choice < replicas:
            raise InputError(
                f"router {self.router.name!r} chose replica {choice!r} of {replicas}; "
                f"its choose() must return an index in 0..{replicas - 1}"
            )
        self.assignment.append(choice)
        return choice
