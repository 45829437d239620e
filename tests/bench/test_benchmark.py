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
    assert best.optimal and best.served_bound == best.served_requests
    one_at_a_time = run.run_policy(scenario, arrivals, "mosel", 0.1, batching=False)
    assert best.served_requests >= one_at_a_time["goodput_rps"] * 0.1 - 1e-9
    for i, finish in best.finish_s.items():
        assert finish <= arrivals[i].time_s + arrivals[i].deadline_ms / 1000 + 1e-9


def test_oracle_gap_hints_mosel_and_never_exceeds_the_bound(scenario: run.Scenario) -> None:
    gap = run.oracle_gap(scenario, load=4.0, seconds=0.2, seed=6, limit_s=2.0)
    assert gap["jobs"] > 10
    assert gap["oracle_goodput_rps"] >= gap["mosel_goodput_rps"] - 1e-9  # the hint is a lower bound
    assert gap["oracle_gap_to_bound"] <= gap["oracle_gap"] <= 1.0 + 1e-9


def test_sustainable_load_is_found_on_traces_of_the_same_size(scenario: run.Scenario) -> None:
    light = run.trace(scenario, 0.1, run.seconds_for(scenario, 0.1, 200), seed=7, arrivals=poisson_arrivals)
    heavy = run.trace(scenario, 2.0, run.seconds_for(scenario, 2.0, 200), seed=7, arrivals=poisson_arrivals)
    assert 150 < len(light) < 250 and 150 < len(heavy) < 250
    mosel_load = run.sustainable_load(scenario, "aggressive", 200, seed=7, arrivals=poisson_arrivals)
    seconds = run.seconds_for(scenario, mosel_load, 200)
    at = run.trace(scenario, mosel_load, seconds, seed=7, arrivals=poisson_arrivals)
    assert run.run_policy(scenario, at, "aggressive", seconds)["violation_ratio"] <= 0.01


def test_jct_ceiling_is_agnostic_over_the_cheapest_run(scenario: run.Scenario) -> None:
    arrivals = [mosel.Arrival(0.0, 1, deadline_ms=30.0, min_accuracy=0.7)] * 3
    cheapest = scenario.profile.plan.frontier(frozenset({"audio", "video"}), 1).strategies
    audio_only = min(s.predicted_latency_ms for s in cheapest if s.expected_accuracy >= 0.7)
    assert run.jct_ceiling(scenario, arrivals, 20.0) == pytest.approx(20.0 / audio_only)


def test_hedge_cuts_violations_under_bursts_and_respects_floors() -> None:
    scenario = paper_tvlt()
    arrivals = run.trace(scenario, load=1.5, seconds=4.0, seed=0)
    with_hedge = mosel.simulate(scenario.profile, arrivals)
    without = mosel.simulate(
        scenario.profile, arrivals, mosel.SchedulerConfig(hedge=0.0, risk=0.0, reserve=0.0)
    )
    assert with_hedge.stats.counters.get("hedged", 0) > 0
    assert without.stats.counters.get("hedged", 0) == 0
    assert run.metrics(with_hedge, 4.0)["violation_ratio"] <= run.metrics(without, 4.0)["violation_ratio"]
    for record in with_hedge.records:
        if record.served:
            assert record.expected_accuracy >= (record.arrival.min_accuracy or 0.0) - 1e-12


def test_reserve_cuts_violations_near_saturation() -> None:
    scenario = paper_tvlt()
    late = {1.0: 0.0, 0.0: 0.0}
    for seed in range(4):
        seconds = run.seconds_for(scenario, 8.0, 1500)
        arrivals = run.trace(scenario, 8.0, seconds, seed, arrivals=poisson_arrivals)
        for reserve in late:
            config = mosel.SchedulerConfig(policy="greedy", reserve=reserve)  # greedy: no CP-SAT, fast
            sim = mosel.simulate(scenario.profile, arrivals, config)
            late[reserve] += run.metrics(sim, seconds)["violation_ratio"]
            for record in sim.records:
                if record.served:
                    assert record.expected_accuracy >= (record.arrival.min_accuracy or 0.0) - 1e-12
    assert late[1.0] < late[0.0]
