"""Fast checks of the benchmark's parts: workloads, conditions, metrics, capacity, determinism."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

import mosel
from mosel.simulate import JobRecord
from mosel.stats import Stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import itertools

import conditions
import run
from scenarios import Scenario, av_digits, paper_tvlt
from workloads import bursty_arrivals, fixed_qps_jobs, job_size, poisson_arrivals


def test_poisson_and_bursty_arrivals_are_seeded_and_have_their_rate() -> None:
    assert poisson_arrivals(50, 20, seed=1) == poisson_arrivals(50, 20, seed=1)
    times = poisson_arrivals(50, 200, seed=2)
    assert len(times) / 200 == pytest.approx(50, rel=0.05)
    assert times == sorted(times)
    bursty = bursty_arrivals(50, 200, seed=3)
    assert bursty == bursty_arrivals(50, 200, seed=3)
    assert len(bursty) / 200 == pytest.approx(50, rel=0.15)

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


def test_the_fixed_qps_stream_is_evenly_spaced_and_sums_to_the_qps() -> None:
    jobs = fixed_qps_jobs(100.0, 5.0, seed=3, cap=32)
    assert jobs == fixed_qps_jobs(100.0, 5.0, seed=3, cap=32)
    for second in range(5):
        inside = [(t, n) for t, n in jobs if second <= t < second + 1]
        assert sum(n for _, n in inside) == 100
        for (t0, n0), (t1, _) in itertools.pairwise(inside):
            assert t1 - t0 == pytest.approx(n0 / 100.0)  # a job of n is followed by n / QPS


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return paper_tvlt(max_batch=8)


def test_conditions_shape_deadlines_and_floors(scenario: Scenario) -> None:
    profile = scenario.profile
    best = max(profile.accuracy.values())
    strict = conditions.arrivals_for(
        profile, conditions.CONDITIONS["strict"], 1.0, 2.0, seed=1, slack_ms=17.0, drop=0.03
    )
    paper = conditions.arrivals_for(
        profile, conditions.CONDITIONS["paper"], 1.0, 2.0, seed=1, slack_ms=17.0, drop=0.03
    )
    full = {
        n: profile.plan.frontier(frozenset(profile.modalities), n).best.predicted_latency_ms
        for n in range(1, 9)
    }
    assert all(a.deadline_ms == pytest.approx(full[a.n] + 17.0) for a in strict)
    assert all(a.deadline_ms == pytest.approx(full[a.n] + 17.0 + 5.0 + 12.0) for a in paper)
    assert {a.min_accuracy for a in strict} == {round(best - 0.03, 4)}
    floors = {
        conditions.arrivals_for(
            profile, conditions.CONDITIONS["paper"], 1.0, 0.5, seed=s, slack_ms=17, drop=0.03
        )[0].min_accuracy
        for s in range(20)
    }
    assert len(floors) > 10 and all(best - 0.03 <= f <= best for f in floors)  # type: ignore[operator]


def test_metrics_count_every_submitted_request() -> None:
    a = mosel.Arrival(0.0, 2, deadline_ms=10.0)
    b = mosel.Arrival(0.0, 3, deadline_ms=10.0)
    c = mosel.Arrival(5.0, 5, deadline_ms=10.0)
    strategy = mosel.Strategy(((frozenset({"audio"}), 2),), 100, 1_800_000)
    late = mosel.Strategy(((frozenset({"audio"}), 5),), 100, 4_000_000)
    records = (
        JobRecord(a, 0.005, 0.0, None, (strategy,), 0.9),
        JobRecord(b, math.nan, math.nan, "DeadlineError", (), math.nan),
        JobRecord(c, 5.5, 5.0, None, (late,), 0.8),  # served 500 ms late
    )
    sim = mosel.Simulation(records, Stats().snapshot(), 8.0, (0.1, 0.2))
    m = conditions.metrics(sim, 8.0, conditions.CONDITIONS["paper"])
    assert m["violation_ratio"] == pytest.approx(0.8)
    assert m["goodput_rps"] == pytest.approx(2 / 8)
    assert m["correct_rps"] == pytest.approx(1.8 / 8)
    assert m["accuracy_all"] == pytest.approx(1.8 / 10)
    assert m["accuracy_served"] == pytest.approx((0.9 * 2 + 0.8 * 5) / 7)
    assert m["dropped_ratio"] == pytest.approx(0.3)
    # Two 4 s windows: the first processed 2 of 5, the second 0 of 5.
    assert m["window_violation_ratio"] == pytest.approx((0.6 + 1.0) / 2)


def test_capacity_interpolates_in_log_load() -> None:
    loads = [0.5, 1.0, 2.0, 4.0]
    assert run.capacity(loads, [0.0, 0.0, 0.02, 0.2], 0.01) == pytest.approx(
        math.exp((math.log(1) + math.log(2)) / 2)
    )
    assert run.capacity(loads, [0.5, 0.6, 0.7, 0.8], 0.01) == 0.0
    assert run.capacity(loads, [0.0] * 4, 0.01) == 4.0


@pytest.mark.parametrize("cond_key", list(conditions.CONDITIONS))
def test_every_policy_resolves_every_job_and_honours_floors(scenario: Scenario, cond_key: str) -> None:
    cond = conditions.CONDITIONS[cond_key]
    arrivals = conditions.arrivals_for(scenario.profile, cond, 3.0, 0.5, seed=4, slack_ms=17.0, drop=0.03)
    assert len(arrivals) > 20
    for policy in run.POLICIES:
        sim = mosel.simulate(scenario.profile, arrivals, run.config_for(policy, cond))
        assert len(sim.records) == len(arrivals)
        for record in sim.records:
            assert record.served or record.error is not None, policy
            if record.served:
                assert record.expected_accuracy >= (record.arrival.min_accuracy or 0.0) - 1e-12, policy


def test_a_cell_is_deterministic() -> None:
    one = run.cell("paper-tvlt", "strict", 17.0, 4.0, 3, 150, 0.0, ("aggressive", "mosel", "paper"))
    two = run.cell("paper-tvlt", "strict", 17.0, 4.0, 3, 150, 0.0, ("aggressive", "mosel", "paper"))
    for policy in one:
        assert {k: v for k, v in one[policy].items() if k not in ("wall_s", "decision_p99_ms")} == {
            k: v for k, v in two[policy].items() if k not in ("wall_s", "decision_p99_ms")
        }


def test_the_av_digits_profile_is_committed_and_sound() -> None:
    scenario = av_digits()
    errors = sorted(abs(c.relative_error) for c in scenario.profile.cost_checks)
    assert errors and errors[len(errors) // 2] <= 0.25  # the profiler would have warned otherwise
    assert scenario.slack_ms > 0
