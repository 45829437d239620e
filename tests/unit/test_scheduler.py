"""The online stage on a virtual clock: deterministic, machine-independent."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mosel
from mosel.scheduler import Job, Scheduler, SchedulerConfig

from .helpers import Tiny, tiny_profile

ALL = frozenset({"audio", "video", "text"})


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def burst(n_jobs: int, gap_s: float, deadline_ms: float, floor: float | None) -> list[mosel.Arrival]:
    return [
        mosel.Arrival(time_s=i * gap_s, n=8 if i % 3 else 3, deadline_ms=deadline_ms, min_accuracy=floor)
        for i in range(n_jobs)
    ]


def test_burst_all_modalities_cannot_meet_is_served_on_time_with_floors(profile: mosel.Profile) -> None:
    trace = burst(16, 0.0, 12.0, 0.7)
    agnostic = mosel.simulate(profile, trace, SchedulerConfig(policy="agnostic"))
    assert sum(r.on_time for r in agnostic.records) < len(trace) // 2
    for policy in ("mosel", "greedy"):
        sim = mosel.simulate(profile, trace, SchedulerConfig(policy=policy))
        assert all(r.on_time for r in sim.records), [r.error for r in sim.records]
        assert all(r.expected_accuracy >= 0.7 - 1e-12 for r in sim.records)
    mosel_sim = mosel.simulate(profile, trace)
    aggressive = mosel.simulate(profile, trace, SchedulerConfig(policy="aggressive"))
    served = sum(r.expected_accuracy * r.arrival.n for r in mosel_sim.records)
    assert served >= sum(r.expected_accuracy * r.arrival.n for r in aggressive.records)


def test_light_load_keeps_every_modality(profile: mosel.Profile) -> None:
    sim = mosel.simulate(profile, burst(12, 0.01, 5.0, 0.7))
    assert all(record.on_time for record in sim.records)
    for record in sim.records[1:]:  # the first arrival is served at its cheapest (a cold start)
        assert all(groups == ((ALL, record.arrival.n),) for groups in (s.groups for s in record.strategies))
    assert sim.stats.counters.get("violations_predicted", 0) == 0


def test_no_slo_jobs_get_all_modalities_and_doomed_jobs_fail_fast(profile: mosel.Profile) -> None:
    trace = [
        mosel.Arrival(0.0, 4),
        mosel.Arrival(0.0, 4, deadline_ms=0.05),
        mosel.Arrival(0.0, 4, deadline_ms=0.05, best_effort=True),
    ]
    sim = mosel.simulate(profile, trace)
    free, doomed, late_ok = sim.records
    assert free.on_time and free.strategies[0].groups == ((ALL, 4),)
    assert doomed.error == "DeadlineError"
    assert late_ok.served and not late_ok.on_time


def test_queue_admission_control(profile: mosel.Profile) -> None:
    trace = [mosel.Arrival(0.0, 8, deadline_ms=100.0) for _ in range(5)]
    sim = mosel.simulate(profile, trace, SchedulerConfig(max_queued_requests=20))
    assert [r.error for r in sim.records].count("QueueFullError") == 3


def test_large_jobs_are_split_and_every_chunk_meets_the_floor(profile: mosel.Profile) -> None:
    sim = mosel.simulate(profile, [mosel.Arrival(0.0, 21, deadline_ms=3.0, min_accuracy=0.7)])
    (record,) = sim.records
    assert record.on_time
    assert [s.n for s in record.strategies] == [7, 7, 7]
    assert all(s.expected_accuracy >= 0.7 for s in record.strategies)


def test_cross_job_batching_merges_small_jobs(profile: mosel.Profile) -> None:
    trace = [mosel.Arrival(0.0, 2, deadline_ms=20.0) for _ in range(4)]
    merged = mosel.simulate(profile, trace, SchedulerConfig(policy="aggressive"))
    alone = mosel.simulate(profile, trace, SchedulerConfig(policy="aggressive", batching=False))
    assert merged.stats.counters.get("batches_merged", 0) >= 1
    assert all(r.on_time for r in merged.records)
    assert merged.end_s < alone.end_s


def test_online_correction_learns_a_slower_device(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True))
    for i in range(40):
        job = Job(n=4, available=ALL, arrival=float(i), deadline_ms=None, min_accuracy=None)
        scheduler.admit(job, float(i))
        batch, _ = scheduler.dispatch(float(i))
        assert batch is not None
        scheduler.complete(batch, float(i) + 0.5, batch.merged.latency_us * 2.0)
    assert all(math.isclose(r, 2.0, rel_tol=0.05) for r in scheduler.correction.values())
    assert scheduler.stats.snapshot().correction["video"] == pytest.approx(2.0, rel=0.05)


def test_simulation_is_deterministic(profile: mosel.Profile) -> None:
    trace = burst(20, 0.0003, 6.0, 0.65)
    one = mosel.simulate(profile, trace, noise=0.2, seed=3)
    two = mosel.simulate(profile, trace, noise=0.2, seed=3)
    assert [(r.finish_s, r.strategies, r.error) for r in one.records] == [
        (r.finish_s, r.strategies, r.error) for r in two.records
    ]


@settings(max_examples=25, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 0.003), min_size=1, max_size=14),
    sizes=st.lists(st.integers(1, 12), min_size=14, max_size=14),
    floors=st.lists(st.sampled_from([None, 0.55, 0.7, 0.8, 0.9]), min_size=14, max_size=14),
    deadline_ms=st.floats(0.3, 15.0),
    policy=st.sampled_from(["mosel", "greedy", "aggressive"]),
)
def test_reassignment_never_goes_below_a_floor(
    profile: mosel.Profile,
    gaps: list[float],
    sizes: list[int],
    floors: list[float | None],
    deadline_ms: float,
    policy: str,
) -> None:
    t = 0.0
    trace = []
    for gap, n, floor in zip(gaps, sizes, floors):
        t += gap
        trace.append(mosel.Arrival(t, n, deadline_ms=deadline_ms, min_accuracy=floor))
    sim = mosel.simulate(profile, trace, SchedulerConfig(policy=policy))  # type: ignore[arg-type]
    for record in sim.records:
        assert record.error in (None, "DeadlineError"), record.error
        if record.served:
            floor = record.arrival.min_accuracy or 0.0
            assert all(s.expected_accuracy >= floor - 1e-12 for s in record.strategies)
            assert record.on_time  # a job is never run silently late


def test_risk_keeps_a_long_batch_from_blocking_a_steady_stream(profile: mosel.Profile) -> None:
    stream = [mosel.Arrival(i * 0.001, 1, deadline_ms=0.6) for i in range(400)]
    big = [mosel.Arrival(0.0205 + 0.02 * i, 8, deadline_ms=10.0, min_accuracy=0.6) for i in range(19)]
    trace = stream + big
    careless = SchedulerConfig(policy="greedy", risk=0.0, hedge=0.0, reserve=0.0)
    without = mosel.simulate(profile, trace, careless)
    with_risk = mosel.simulate(profile, trace, SchedulerConfig(policy="greedy"))
    missed = [sum(not r.on_time for r in sim.records) for sim in (without, with_risk)]
    assert missed[0] > 10 * max(1, missed[1]), missed
    assert with_risk.stats.counters.get("hedged", 0) > 0
    for record in with_risk.records:
        if record.served:
            assert record.expected_accuracy >= (record.arrival.min_accuracy or 0.0) - 1e-12


def test_the_solver_rests_between_solves(profile: mosel.Profile) -> None:
    solves: list[object] = []
    config = SchedulerConfig(policy="greedy_cpsat", solver_share=0.5)
    scheduler = Scheduler(profile, config, solve_async=solves.append)

    def admit(now: float) -> None:
        for a in burst(12, 0.0, 12.0, 0.7):
            slo = {"deadline_ms": a.deadline_ms, "min_accuracy": a.min_accuracy}
            scheduler.admit(Job(n=a.n, available=ALL, arrival=now, **slo), now)

    admit(0.0)
    assert len(solves) == 1  # one solve at a time; later requests wait for it
    result = solves.pop()()  # the helper thread runs it
    scheduler.solved(0.0, result)
    rest_s = scheduler.policy.rest_until  # type: ignore[attr-defined]
    assert rest_s > 0.0
    admit(rest_s / 2)
    assert not solves and scheduler.stats.snapshot().counters["solver_rested"] > 0
    admit(rest_s + 1.0)
    assert len(solves) == 1


def test_a_caller_waiting_for_each_result_is_not_hedged_against_itself(profile: mosel.Profile) -> None:
    # Each job arrives after the previous one is done: nothing ever arrives during a run.
    trace = [mosel.Arrival(i * 0.0025, 8, deadline_ms=2.45, min_accuracy=0.6) for i in range(800)]
    sim = mosel.simulate(profile, trace)
    assert sim.stats.counters.get("hedged", 0) == 0
    for record in sim.records[1:]:  # the first arrival is served at its cheapest (a cold start)
        assert record.on_time and record.strategies[0].groups == ((ALL, 8),)
