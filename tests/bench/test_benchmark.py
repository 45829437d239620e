"""Fast checks of the benchmark's parts: traces, metrics, and that every policy resolves every job."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

import mosel
from mosel.simulate import JobRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import oracle
import run
from scenarios import paper_tvlt
from workloads import bursty_arrivals, job_size, poisson_arrivals


def test_poisson_and_bursty_arrivals_are_seeded_and_have_their_rate() -> None:
    assert poisson_arrivals(50, 20, seed=1) == poisson_arrivals(50, 20, seed=1)
    times = poisson_arrivals(50, 200, seed=2)
    assert len(times) / 200 == pytest.approx(50, rel=0.05)
    assert times == sorted(times)
    bursty = bursty_arrivals(50, 200, seed=3)
    assert bursty == bursty_arrivals(50, 200, seed=3)
    assert len(bursty) / 200 == pytest.approx(50, rel=0.15)

    # Burstier than Poisson: per-second counts vary more.
    def dispersion(ts: list[float]) -> float:
        counts = [0] * 200
        for t in ts:
            counts[int(t)] += 1
        mean = sum(counts) / len(counts)
        return sum((c - mean) ** 2 for c in counts) / len(counts) / mean

    assert dispersion(bursty) > 2 * dispersion(times)


def test_job_sizes_follow_the_paper() -> None:
    rng = random.Random(0)
    sizes = [job_size(rng, 32) for _ in range(20_000)]
    assert min(sizes) == 1 and max(sizes) <= 32
    assert 0.5 < sizes.count(1) / len(sizes) < 0.65  # about 57% of jobs have one request


@pytest.fixture(scope="module")
def scenario() -> run.Scenario:
    return paper_tvlt(max_batch=8)


def test_every_policy_resolves_every_job(scenario: run.Scenario) -> None:
    arrivals = run.trace(scenario, load=2.0, seconds=1.0, seed=4)
    assert arrivals
    for policy in run.POLICIES:
        sim = mosel.simulate(scenario.profile, arrivals, mosel.SchedulerConfig(policy=policy))  # type: ignore[arg-type]
        assert len(sim.records) == len(arrivals)
        for record in sim.records:
            assert record.served or record.error is not None
            assert not (record.served and math.isnan(record.finish_s))


def test_metrics_on_a_hand_made_simulation() -> None:
    a = mosel.Arrival(0.0, 2, deadline_ms=10.0)
    b = mosel.Arrival(0.0, 3, deadline_ms=10.0)
    records = (
        JobRecord(a, 0.005, 0.0, None, (), 0.9),
        JobRecord(b, math.nan, math.nan, "DeadlineError", (), math.nan),
    )
    sim = mosel.Simulation(records, _empty(), 1.0, (0.1, 0.2))
    m = run.metrics(sim, seconds=1.0)
    assert m["goodput_rps"] == 2.0
    assert m["violation_ratio"] == pytest.approx(0.6)
    assert m["jct_p50_ms"] == pytest.approx(5.0)
    assert m["expected_accuracy"] == pytest.approx(0.9)


def _empty() -> mosel.StatsSnapshot:
    from mosel.stats import Stats

    return Stats().snapshot()


def test_oracle_serves_what_it_can_and_bounds_mosel_on_a_tiny_trace(scenario: run.Scenario) -> None:
    arrivals = run.trace(scenario, load=3.0, seconds=0.1, seed=5)
    assert len(arrivals) >= 5
    best = oracle.solve(scenario.profile, arrivals, time_limit_s=20.0)
    assert best.optimal
    served = run.run_policy(scenario, arrivals, "mosel", 0.1)["goodput_rps"] * 0.1
    assert best.served_requests >= served - 1e-9
    for i, finish in best.finish_s.items():
        assert finish <= arrivals[i].time_s + arrivals[i].deadline_ms / 1000 + 1e-9


def test_hedge_cuts_violations_under_bursts_and_respects_floors() -> None:
    scenario = paper_tvlt()
    arrivals = run.trace(scenario, load=1.5, seconds=4.0, seed=0)
    with_hedge = mosel.simulate(scenario.profile, arrivals, mosel.SchedulerConfig(hedge=0.5))
    without = mosel.simulate(scenario.profile, arrivals, mosel.SchedulerConfig(hedge=0.0))
    assert with_hedge.stats.counters.get("hedged", 0) > 0
    assert without.stats.counters.get("hedged", 0) == 0
    assert run.metrics(with_hedge, 4.0)["violation_ratio"] <= run.metrics(without, 4.0)["violation_ratio"]
    for record in with_hedge.records:
        if record.served:
            assert record.expected_accuracy >= (record.arrival.min_accuracy or 0.0) - 1e-12
