"""The simulated scale-out on tiny traces: every request accounted for, one replica = ``simulate``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest

import mosel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import scaleout
from conditions import CONDITIONS, arrivals_for, rate_per_s
from scenarios import av_digits


@pytest.fixture(scope="module")
def trace() -> list[mosel.Arrival]:
    scenario = av_digits()
    load = 2.0  # two replicas' worth of arrivals at 1x each
    seconds = 120 / rate_per_s(scenario.profile, load)
    return arrivals_for(
        scenario.profile,
        CONDITIONS["strict-bursty"],
        load,
        seconds,
        0,
        slack_ms=scenario.slack_ms,
        drop=scenario.drop,
    )


def key(record: mosel.simulate.JobRecord) -> tuple[object, ...]:
    finish = None if math.isnan(record.finish_s) else record.finish_s
    return (record.arrival, finish, record.error, record.strategies)


@pytest.mark.parametrize("router", ["random", "power-of-two", "slack"])
def test_one_replica_with_any_router_is_simulate(trace: list[mosel.Arrival], router: str) -> None:
    scenario = av_digits()
    alone = mosel.simulate(scenario.profile, trace, residuals=scenario.residuals, seed=3)
    cluster = mosel.simulate_replicas(
        scenario.profile,
        trace,
        1,
        router,
        residuals=scenario.residuals,
        seed=3,
        report_every_ms=2.0,
        report_delay_ms=0.5,
    )
    assert [key(r) for r in cluster.overall.records] == [key(r) for r in alone.records]
    assert dict(cluster.overall.stats.counters) == dict(alone.stats.counters)
    assert cluster.overall.end_s == alone.end_s
    assert cluster.assignment == (0,) * len(trace)


@pytest.mark.parametrize("router", ["random", "power-of-two", "slack"])
def test_every_request_is_accounted_for_across_replicas(trace: list[mosel.Arrival], router: str) -> None:
    scenario = av_digits()
    run = mosel.simulate_replicas(scenario.profile, trace, 4, router, residuals=scenario.residuals, seed=1)
    assert [r.arrival for r in run.overall.records] == sorted(trace, key=lambda a: a.time_s)
    assert len(run.assignment) == len(trace) and set(run.assignment) <= {0, 1, 2, 3}
    assert sum(len(r.records) for r in run.replicas) == len(trace)
    for index, replica in enumerate(run.replicas):
        assert len(replica.records) == run.assignment.count(index)
    counters = run.overall.stats.counters
    assert counters["submitted"] == len(trace)
    assert sum(r.served or r.error is not None for r in run.overall.records) == len(trace)
    assert run.reports > 0 and run.router == router
    same = mosel.simulate_replicas(scenario.profile, trace, 4, router, residuals=scenario.residuals, seed=1)
    assert [key(r) for r in same.overall.records] == [key(r) for r in run.overall.records]  # deterministic


def test_slowdowns_slow_a_replica_and_it_reports_its_own_speed(trace: list[mosel.Arrival]) -> None:
    scenario = av_digits()
    plain = mosel.simulate_replicas(scenario.profile, trace, 2, "random", seed=2)
    same = mosel.simulate_replicas(scenario.profile, trace, 2, "random", seed=2, slowdowns=[1.0, 1.0])
    assert [key(r) for r in same.overall.records] == [key(r) for r in plain.overall.records]
    seen: list[list[mosel.Load | None]] = []

    class Recording(mosel.RandomRouter):
        def choose(self, loads, request, now_s, rng):  # type: ignore[no-untyped-def]
            seen.append(list(loads))
            return super().choose(loads, request, now_s, rng)

    slowed = mosel.simulate_replicas(scenario.profile, trace, 2, Recording(), seed=2, slowdowns=[1.0, 2.0])
    # Exact batch times: replica 1 takes twice the profile's time and learns it; replica 0 does not.
    [fast, slow] = seen[-1]
    assert fast is not None and slow is not None
    assert fast.latency_correction == pytest.approx(1.0)
    assert slow.latency_correction > 1.6
    assert slowed.replicas[1].stats.correction["fusion"] > 1.6


def test_bad_arguments_name_themselves(trace: list[mosel.Arrival]) -> None:
    profile = av_digits().profile
    with pytest.raises(mosel.InputError, match=r"replicas=0"):
        mosel.simulate_replicas(profile, trace, 0)
    with pytest.raises(mosel.InputError, match=r"router='fastest'"):
        mosel.simulate_replicas(profile, trace, 2, "fastest")
    with pytest.raises(mosel.InputError, match=r"report_delay_ms=1"):
        mosel.simulate_replicas(profile, trace, 2, report_every_ms=0.0, report_delay_ms=1.0)
    for bad in ([1.0], [1.0, 0.0], [1.0, math.inf]):
        with pytest.raises(mosel.InputError, match=r"slowdowns="):
            mosel.simulate_replicas(profile, trace, 2, slowdowns=bad)


def test_the_quick_benchmark_cell_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    routers = ("random", "power-of-two", "slack")
    grid = {
        (load, 0): scaleout.cell("av-digits", "strict-bursty", 2, load, 0, 30, routers, 10.0, 1.0)
        for load in (0.5, 1.0)
    }
    for cell in grid.values():
        for router in routers:
            assert 0.0 <= cell[router]["violation_ratio"] <= 1.0
            assert cell[router]["replica_goodput_min_rps"] <= cell[router]["replica_goodput_max_rps"]
    summary = scaleout.summarise(grid, (0.5, 1.0), [0], routers)
    args = argparse.Namespace(report_every_ms=10.0, report_delay_ms=1.0, jobs=30)
    scaleout.report("av-digits", "strict-bursty", {2: summary}, args, [0], (0.5, 1.0), routers)
    out = capsys.readouterr().out
    assert "report" in out and "seeds [0]" in out and "| 2 | 0.5 |" in out and "identical replicas" in out
    assert scaleout.slowdowns_for(8, 0.25, 2.0) == [1.0] * 6 + [2.0] * 2
    assert scaleout.slowdowns_for(1, 0.25, 2.0) == [1.0]
    mixed = scaleout.cell("av-digits", "strict-bursty", 2, 0.5, 0, 30, routers, 10.0, 1.0, 0.5, 2.0)
    assert all(0.0 <= mixed[r]["violation_ratio"] <= 1.0 for r in routers)
    args = argparse.Namespace(
        report_every_ms=10.0, report_delay_ms=1.0, jobs=30, slow_share=0.5, slow_factor=2.0
    )
    assert "MIXED DEVICES: 50% of the replicas (rounded) run 2x slower" in scaleout.conditions_line(
        "av-digits", "strict-bursty", args, [0]
    )
    recorded = av_digits().residuals
    assert recorded is not None and max(recorded.ratios) > 2.0
    cap = scaleout.capped(recorded, 2.0)
    assert cap is not None and max(cap.ratios) == 2.0 and len(cap.ratios) == len(recorded.ratios)
    assert scaleout.capped(recorded, None) is recorded and scaleout.capped(None, 2.0) is None
