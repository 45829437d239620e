"""Bursty arrivals: the rate bound is widened by the arrivals' measured dispersion (issue 24).

On the virtual clock, exact batch times. ``ArrivalEstimator.rho_bound`` is a Poisson bound on
the count of recent arrivals; a bursty stream's counts vary more than a Poisson stream's, so a
calm spell between bursts read as Poisson looks like a light load, an upgrade is bought in it,
and the next burst queues behind the upgrade. The estimator measures the variance over the mean
of its arrivals' counts per bin (``ArrivalEstimator.dispersion``) and bounds the count of
``events / dispersion`` clusters of ``dispersion`` arrivals each. For a Poisson stream the
measured dispersion is about 1 and the bound is the Poisson one.
"""

from __future__ import annotations

import math
import random

import pytest

import mosel
from mosel.estimators import ArrivalEstimator, poisson_upper
from mosel.scheduler import SchedulerConfig

from .helpers import Tiny, tiny_profile


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def bursty_stream(cycles: int, burst: int, calm_ms: float) -> list[mosel.Arrival]:
    """Bursts of ``burst`` jobs at once, each followed by a calm spell holding one lone job.

    The burst's jobs must finish within 450 us (they do at their cheapest, in one batch, unless
    something runs ahead of them); the lone job's deadline is roomy (its upgrade fits), and the
    next burst comes 100 us after it.
    """
    out: list[mosel.Arrival] = []
    start_s = 0.0
    for _ in range(cycles):
        out += [mosel.Arrival(start_s, 1, deadline_ms=0.45, min_accuracy=0.6) for _ in range(burst)]
        out.append(mosel.Arrival(start_s + calm_ms * 1e-3, 1, deadline_ms=10.0, min_accuracy=0.6))
        start_s += (calm_ms + 0.1) * 1e-3
    return out


@pytest.mark.parametrize("budget", [None, 0.01, 0.05])
def test_a_calm_spell_between_bursts_buys_no_upgrade_the_next_burst_pays_for(
    profile: mosel.Profile, budget: float | None
) -> None:
    # Bursts of 8 every 1.6 ms, a 10 ms window (1 ms bins): the arrivals' count in the window is
    # a third of the device's time, its Poisson bound well under it; before the dispersion was
    # measured the lone job of a calm spell was upgraded (565 us against 115 us) and 6 of the
    # next burst's 8 jobs failed as doomed.
    trace = bursty_stream(cycles=6, burst=8, calm_ms=1.5)
    config = SchedulerConfig(policy="mosel", miss_budget=budget, load_window_s=0.01)
    sim = mosel.simulate(profile, trace, config)
    assert [r.error for r in sim.records] == [None] * len(trace)
    assert all(r.finish_s <= r.arrival.time_s + r.arrival.deadline_ms / 1e3 + 1e-9 for r in sim.records)
    cheapest = mosel.simulate(profile, trace, SchedulerConfig(policy="aggressive", load_window_s=0.01))
    lone = [i for i, a in enumerate(trace) if a.deadline_ms > 1.0]
    # Every lone job but the last (no burst follows it) finished when it would at its cheapest.
    for i in lone[:-1]:
        assert sim.records[i].finish_s == pytest.approx(cheapest.records[i].finish_s)


def fed(times_s: list[float], work_s: float = 0.0005) -> ArrivalEstimator:
    estimator = ArrivalEstimator(window_s=0.5)
    for t in times_s:
        estimator.observe_arrival(t, work_s=work_s, headroom_us=1000.0, busy=False)
    return estimator


def poisson_bound(estimator: ArrivalEstimator, now: float) -> float:
    """What ``rho_bound`` was before the dispersion: the plain Poisson bound of the same count."""
    elapsed = now - estimator.first
    span = 0.5 * -math.expm1(-elapsed / 0.5)
    events = estimator.jobs[0] - math.exp(-elapsed / 0.5)
    return max(estimator.rho(now), poisson_upper(events) / span * estimator.mean_work_s)


@pytest.mark.parametrize("seed", range(5))
def test_a_poisson_stream_measures_a_dispersion_near_one_and_keeps_its_bound(seed: int) -> None:
    # 1,000 jobs/s of 0.5 ms for 5 s (100 bins of 50 ms): the measured dispersion is 1 within
    # its noise (sqrt(2 / 100) = 0.14), the bound within 2% of the Poisson one.
    rng = random.Random(seed)
    times, t = [], 0.0
    while t < 5.0:
        t += rng.expovariate(1000.0)
        times.append(t)
    estimator = fed(times)
    now = 5.0
    assert 1.0 <= estimator.dispersion(now) < 1.4
    assert estimator.rho_bound(now) == pytest.approx(poisson_bound(estimator, now), rel=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_a_bursty_stream_measures_its_dispersion_and_widens_its_bound(seed: int) -> None:
    # Bursts: 4,000 jobs/s for 25 ms, then 250 jobs/s for 100 ms (cycles of 125 ms, 2.5 bins):
    # counts per bin vary far beyond Poisson.
    rng = random.Random(seed)
    times, t = [], 0.0
    while t < 5.0:
        rate = 4000.0 if (t % 0.125) < 0.025 else 250.0
        t += rng.expovariate(rate)
        times.append(t)
    estimator = fed(times)
    now = 5.0
    assert estimator.dispersion(now) > 4.0
    assert estimator.rho_bound(now) > 1.05 * poisson_bound(estimator, now)
