"""A cold start: no upgrade is bought before the arrivals seen can rule out a flood (issue 24).

On the virtual clock, exact batch times. Right after the first arrival the arrival estimator has
watched no time at all, so nothing rules out that the next jobs come at once; an upgrade of the
first job would be bought with the risk that they queue behind it. The rule
(``ArrivalEstimator.rho_bound``, a 95% upper bound of the arrival rate of work over the time
actually watched) keeps the first jobs at their cheapest strategy until enough quiet time has
passed, and then upgrades resume.
"""

from __future__ import annotations

import math

import pytest

import mosel
from mosel.estimators import DISPERSION_PRIOR, ArrivalEstimator, poisson_upper
from mosel.scheduler import SchedulerConfig

from .helpers import Tiny, tiny_profile

CHEAPEST = ((frozenset({"audio"}), 1),)


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def strategy_of(record: mosel.simulate.JobRecord) -> tuple[tuple[frozenset[str], int], ...]:
    (strategy,) = record.strategies
    return tuple((frozenset(c), k) for c, k in strategy.groups)


@pytest.mark.parametrize("budget", [None, 0.01, 0.05])
@pytest.mark.parametrize("first_s", [0.0, 5.0])  # at start, or after the scheduler sat idle
@pytest.mark.parametrize("burst", [1, 4, 8])
def test_a_burst_right_after_the_first_job_finds_it_at_its_cheapest(
    profile: mosel.Profile, budget: float | None, first_s: float, burst: int
) -> None:
    # The first job alone on an idle device, a roomy deadline: all three modalities would fit
    # (565 us against 115 us for audio alone). 100 us later a burst whose deadlines hold only if
    # the first job ran at its cheapest: behind it they finish by 335 us, behind the upgrade by
    # 785 us, and they must by 550 us.
    trace = [mosel.Arrival(first_s, 1, deadline_ms=10.0, min_accuracy=0.6)]
    trace += [mosel.Arrival(first_s + 100e-6, 1, deadline_ms=0.45, min_accuracy=0.6) for _ in range(burst)]
    config = SchedulerConfig(policy="mosel", miss_budget=budget)
    sim = mosel.simulate(profile, trace, config)
    first, *rest = sim.records
    assert strategy_of(first) == CHEAPEST
    assert first.finish_s == pytest.approx(first_s + 115e-6)
    assert [r.error for r in rest] == [None] * burst
    assert all(r.finish_s <= r.arrival.time_s + 0.45e-3 + 1e-9 for r in rest)
    cheapest = mosel.simulate(profile, trace, SchedulerConfig(policy="aggressive"))
    assert [r.finish_s for r in sim.records] == [r.finish_s for r in cheapest.records]


@pytest.mark.parametrize("gap_s", [0.01, 0.1, 1.0])
def test_after_a_quiet_span_a_lone_job_is_upgraded_again(profile: mosel.Profile, gap_s: float) -> None:
    # Two jobs, the second after ``gap_s`` of quiet: the one arrival in that span bounds the rate
    # at 3 x 3.6 / span (the prior dispersion: 3 arrivals an event), far below the device's
    # share, so the second is upgraded as before.
    trace = [
        mosel.Arrival(0.0, 1, deadline_ms=10.0, min_accuracy=0.6),
        mosel.Arrival(gap_s, 1, deadline_ms=10.0, min_accuracy=0.6),
    ]
    first, second = mosel.simulate(profile, trace, SchedulerConfig(policy="mosel")).records
    assert strategy_of(first) == CHEAPEST
    assert strategy_of(second) == ((frozenset({"audio", "video", "text"}), 1),)


def test_the_rate_bound_is_infinite_at_the_first_arrival_and_falls_with_quiet_time() -> None:
    estimator = ArrivalEstimator(window_s=0.5)
    assert estimator.rho_bound(0.0) == math.inf  # nothing seen
    estimator.observe_arrival(1.0, work_s=0.001, headroom_us=1000.0, busy=False)
    assert estimator.rho(1.0) < 0.05  # the point estimate reads one job as a light load
    assert estimator.rho_bound(1.0) == math.inf  # nothing watched: a flood is not ruled out
    bounds = [estimator.rho_bound(1.0 + t) for t in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert bounds == sorted(bounds, reverse=True)
    assert bounds[0] > 1.0 > bounds[-1]
    # 1 ms after it: no arrival in ~1 ms bounds the rate at 2.97 per ms, times the dispersion
    # assumed before any is measured (DISPERSION_PRIOR arrivals per event): 8.9x the device's time.
    span_s = 0.5 * -math.expm1(-1e-3 / 0.5)
    assert bounds[1] == pytest.approx(DISPERSION_PRIOR * poisson_upper(0.0) / span_s * 0.001)


def test_in_a_steady_stream_the_bound_is_close_to_the_point_estimate() -> None:
    estimator = ArrivalEstimator(window_s=0.5)
    for i in range(2000):  # 1,000 jobs/s of 0.5 ms each: half the device
        estimator.observe_arrival(i * 1e-3, work_s=0.0005, headroom_us=1000.0, busy=False)
    now = 2.0
    rho, bound = estimator.rho(now), estimator.rho_bound(now)
    assert rho == pytest.approx(0.5, rel=0.05)
    assert rho <= bound < 1.1 * rho  # 500 arrivals in the window: about 7% above


def test_poisson_upper_is_the_chi_square_bound() -> None:
    # chi2.ppf(0.95, 2k + 2) / 2 for k = 0, 1, 10, 100 (scipy, not a dependency).
    for events, exact in ((0, 2.9957), (1, 4.7439), (10, 16.9622), (100, 118.0793)):
        assert poisson_upper(events) == pytest.approx(exact, rel=0.01)
