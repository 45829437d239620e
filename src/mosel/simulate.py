"""Deterministic simulation of the online stage: the real scheduler against a virtual clock.

Execution times come from the profile's cost model times a residual drawn (seeded) from a
:class:`~mosel.tail.Residuals` sample: the profile's own timing spread, or what a real run
recorded (``mosel.stats(model).residuals``), plus that run's per-batch dispatch overhead. A run is
machine-independent and reproducible. The :class:`~mosel.scheduler.Scheduler` is the same code
the threaded server runs; only the clock and the executor are simulated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mosel.clock import VirtualClock
from mosel.errors import InputError, MoselError, SLOError
from mosel.execution import check_confidence, check_slo
from mosel.plan import Strategy
from mosel.profiles import Profile
from mosel.scheduler import Batch, Job, Scheduler, SchedulerConfig
from mosel.stats import Stats, StatsSnapshot
from mosel.tail import Residuals

__all__ = ["Arrival", "JobRecord", "Simulation", "simulate"]

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
        deadline_ms, min_accuracy = check_slo(arrival.deadline_ms, arrival.min_accuracy)
        confidence = check_confidence(arrival.confidence, min_accuracy)
    except SLOError as exc:
        raise SLOError(f"{where}: {exc}") from None
    return dataclasses.replace(
        arrival,
        time_s=float(arrival.time_s),
        n=int(arrival.n),
        deadline_ms=deadline_ms,
        min_accuracy=min_accuracy,
        available=arrival.available and frozenset(arrival.available),
        confidence=confidence,
        per_request=bool(arrival.per_request) and min_accuracy is not None,
    )


def simulate(
    profile: Profile,
    arrivals: Iterable[Arrival],
    config: SchedulerConfig | None = None,
    *,
    noise: float = 0.0,
    seed: int = 0,
    residuals: Residuals | None = None,
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
    """
    base = config or SchedulerConfig()
    config = dataclasses.replace(base, deterministic=True)
    clock = VirtualClock()
    stats = Stats()
    scheduler = Scheduler(profile, config, stats)
    cost = scheduler.cost
    rng = random.Random(seed)
    everything = frozenset(profile.modalities)
    trace = [_checked(a, i, everything, profile.sized) for i, a in enumerate(arrivals)]
    trace.sort(key=lambda a: a.time_s)
    jobs: list[Job] = []
    rejected: dict[int, str] = {}
    running: Batch | None = None
    done_at = math.inf
    measured_us = 0.0
    decisions: list[float] = []
    i = 0
    while i < len(trace) or running is not None or scheduler.queue:
        now = clock.now()
        next_arrival = trace[i].time_s if i < len(trace) else math.inf
        if running is not None and done_at <= next_arrival:
            clock.advance_to(done_at)
            started = time.perf_counter()
            scheduler.complete(running, done_at, measured_us)
            scheduler.settled(running, done_at)
            decisions.append((time.perf_counter() - started) * 1e3)
            running, done_at = None, math.inf
            continue
        if running is None and scheduler.queue and next_arrival > now:
            started = time.perf_counter()
            running, _ = scheduler.dispatch(now)
            decisions.append((time.perf_counter() - started) * 1e3)
            if running is not None:
                exec_us = float((running.tasks[0].job.cost or cost).latency_us(running.merged.groups))
                overhead_us = 0.0
                if residuals is not None:
                    ratio, overhead_us = residuals.sample(rng, now)
                    exec_us *= ratio
                if noise:
                    exec_us *= math.exp(rng.gauss(-noise * noise / 2, noise))
                done_at = now + (exec_us + overhead_us) / 1e6
                measured_us = exec_us
            continue
        if i >= len(trace):
            break
        arrival = trace[i]
        clock.advance_to(max(now, arrival.time_s))
        job = Job(
            n=arrival.n,
            available=arrival.available or everything,
            arrival=arrival.time_s,
            deadline_ms=arrival.deadline_ms,
            min_accuracy=arrival.min_accuracy,
            best_effort=arrival.best_effort,
            payload=i,
            confidence=arrival.confidence,
            per_request=arrival.per_request,
            bucket=None if arrival.sizes is None else profile.bucket(arrival.sizes),
        )
        jobs.append(job)
        try:
            scheduler.admit(job, clock.now())
        except MoselError as exc:
            rejected[i] = type(exc).__name__
        i += 1
    records = []
    for job in jobs:
        error = rejected.get(job.payload) or (type(job.error).__name__ if job.error is not None else None)
        served = error is None
        records.append(
            JobRecord(
                arrival=trace[job.payload],
                finish_s=job.finished if served else math.nan,
                started_s=job.started,
                error=error,
                strategies=job.strategies if job.tasks and served else (),
                expected_accuracy=job.expected_accuracy if job.tasks and served else math.nan,
            )
        )
    return Simulation(tuple(records), stats.snapshot(), clock.now(), tuple(decisions))
