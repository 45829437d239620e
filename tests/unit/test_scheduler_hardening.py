"""Issue 9 regressions on the scheduler alone: virtual clock, no threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mosel
from mosel import assign
from mosel.assign import Item, exhaustive_assign, greedy_assign, violations
from mosel.policies.blocks import predict
from mosel.scheduler import Job, Scheduler, SchedulerConfig, floor_units
from mosel.testing import synthetic_profile

from .helpers import Tiny, tiny_profile

ALL = frozenset({"audio", "video", "text"})


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def job(n: int = 1, now: float = 0.0, **slo: object) -> Job:
    values: dict[str, object] = {"deadline_ms": None, "min_accuracy": None} | slo
    return Job(n=n, available=ALL, arrival=now, **values)  # type: ignore[arg-type]


# ---------------------------------------------------------------- 6: admission cost


def test_admission_work_does_not_grow_with_the_queue(profile: mosel.Profile, monkeypatch) -> None:
    """Per-task Python work in one admit is bounded by the steps it takes, not the queue length."""
    calls = {"step": 0}
    real = assign.step_down

    def counting(*args: object) -> tuple[int, int, int]:
        calls["step"] += 1
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("mosel.queue.step_down", counting)
    scheduler = Scheduler(profile, SchedulerConfig(policy="greedy"))
    scheduler.in_flight = object()  # type: ignore[assignment]  # the device is busy: jobs queue up
    scheduler.busy_until = 1.0
    for i in range(3000):  # generous deadlines: nothing is late
        scheduler.admit(job(1, deadline_ms=60_000.0 + i), 0.0)
    assert calls["step"] == 3000  # one look at each task's next step, when it is queued
    assert scheduler.stats.snapshot().counters.get("greedy_assignments", 0) == 0
    # A tight job at the head makes the last few late: the repair touches only what it lowers.
    calls["step"] = 0
    scheduler.admit(job(8, deadline_ms=1002.0), 0.0)
    assert scheduler.stats.snapshot().counters["greedy_assignments"] == 1
    assert calls["step"] < 200
    assert len(scheduler.queue) == 3001


def test_cpsat_model_is_linear_and_windowed(profile: mosel.Profile, monkeypatch) -> None:
    seen: list[int] = []

    def fake(items: list[Item], *args: object, **kwargs: object) -> tuple[None, bool]:
        seen.append(len(items))
        return None, False

    monkeypatch.setattr("mosel.policies.greedy.cpsat_assign", fake)
    scheduler = Scheduler(
        profile, SchedulerConfig(policy="greedy_cpsat", deterministic=True, solver_window=16)
    )
    for i in range(200):
        scheduler.admit(job(8, deadline_ms=5.0 + i * 0.05, min_accuracy=0.55), 0.0)
    assert seen and max(seen) <= 16


@st.composite
def queues(draw: st.DrawFn) -> tuple[list[Item], int]:
    count = draw(st.integers(1, 6))
    items, deadline = [], 0
    for _ in range(count):
        options = draw(st.integers(1, 4))
        lat = np.cumsum(draw(st.lists(st.integers(1, 300), min_size=options, max_size=options)))
        acc = np.cumsum(draw(st.lists(st.integers(1, 50_000), min_size=options, max_size=options)))
        deadline += draw(st.integers(0, 500))
        items.append(Item(tuple(int(v) for v in lat), tuple(int(v) for v in acc), deadline))
    return items, draw(st.integers(0, 50))


@settings(max_examples=200, deadline=None)
@given(case=queues())
def test_greedy_dooms_only_jobs_no_assignment_can_save(case: tuple[list[Item], int]) -> None:
    items, start = case
    top = [len(item.latency_us) - 1 for item in items]
    ks, doomed = greedy_assign(items, top, start)
    kept = [i for i in range(len(items)) if i not in doomed]
    assert not violations([items[i] for i in kept], [ks[i] for i in kept], start)
    if exhaustive_assign(items, start) is not None:
        assert doomed == []
    for i in doomed:  # a doomed job could not fit even with everything before it at its cheapest
        assert (
            start + sum(items[j].latency_us[0] for j in kept if j < i) + items[i].latency_us[0]
            > items[i].deadline_us
        )
        assert ks[i] == top[i]  # and nothing was lowered for it


# ---------------------------------------------------------------- 7: a stalled device


def test_a_batch_overrunning_its_prediction_fails_waiting_jobs_by_their_deadline(
    profile: mosel.Profile,
) -> None:
    scheduler = Scheduler(profile, SchedulerConfig())
    scheduler.admit(job(8), 0.0)
    batch, _ = scheduler.dispatch(0.0)
    assert batch is not None and scheduler.busy_until < 0.01
    tight = job(1, now=0.001, deadline_ms=20.0)
    assert scheduler.admit(tight, 0.001) == []
    # The batch is still running at each expiry (it stalled): the watchdog's calls fail the job,
    # at the latest when it could no longer make its deadline even alone.
    failures: list[tuple[Job, BaseException]] = []
    for _ in range(5):
        expiry = scheduler.next_expiry()
        assert expiry is not None and expiry <= tight.deadline
        failures = scheduler.expire(expiry + 1e-6)
        if failures:
            break
    assert [(j, type(e)) for j, e in failures] == [(tight, mosel.DeadlineError)]
    assert not scheduler.queue and tight.error is not None
    assert scheduler.next_expiry() is None
    scheduler.complete(batch, 1.5, 1.5e6)
    assert scheduler.in_flight is None


def test_best_effort_jobs_never_expire(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig())
    scheduler.admit(job(8), 0.0)
    scheduler.dispatch(0.0)
    lenient = job(1, deadline_ms=5.0, best_effort=True)
    scheduler.admit(lenient, 0.0)
    assert scheduler.expire(10.0) == [] and lenient.error is None
    assert scheduler.next_expiry() is None  # overrunning, and nothing can expire


# ---------------------------------------------------------------- 8: correction level


def test_a_fivefold_slowdown_is_fully_corrected(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True))
    for i in range(120):
        scheduler.admit(job(4, now=float(i)), float(i))
        batch, _ = scheduler.dispatch(float(i))
        assert batch is not None
        scheduler.complete(batch, float(i) + 0.5, batch.merged.latency_us * 5.0)
    assert all(math.isclose(r, 5.0, rel_tol=0.02) for r in scheduler.correction.values())


def test_one_stall_moves_the_correction_by_a_bounded_step(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(deterministic=True, correction_alpha=0.1))
    scheduler.admit(job(4), 0.0)
    batch, _ = scheduler.dispatch(0.0)
    assert batch is not None
    scheduler.complete(batch, 1.0, batch.merged.latency_us * 1000.0)
    assert all(r <= 1.0 + 0.1 * 3.0 + 1e-9 for r in scheduler.correction.values())


# ---------------------------------------------------------------- 10: floors


def test_floor_units_are_exact() -> None:
    assert floor_units(0.7, 1) == 700_000
    assert floor_units(0.7000004, 1) == 700_001
    assert floor_units(0.9, 3) == 2_700_000
    assert floor_units(None, 5) == 0


def test_a_floor_a_hair_above_a_configuration_is_not_met_by_it(profile: mosel.Profile) -> None:
    trace = [mosel.Arrival(0.0, 1, deadline_ms=0.2, min_accuracy=0.7000004)]
    for policy in ("mosel", "greedy", "aggressive"):
        sim = mosel.simulate(profile, trace, SchedulerConfig(policy=policy))  # type: ignore[arg-type]
        (record,) = sim.records
        assert not record.served or record.expected_accuracy >= 0.7000004, policy


@pytest.mark.parametrize("policy", ["agnostic", "batcher"])
def test_all_modality_policies_refuse_floors_every_modality_misses(policy: str) -> None:
    model = Tiny()
    accuracy = {
        "audio": 0.60,
        "video": 0.70,
        "text": 0.55,
        "audio+video": 0.88,  # two modalities beat all three
        "audio+text": 0.70,
        "video+text": 0.75,
        "audio+video+text": 0.80,
    }
    profile = synthetic_profile(
        model,
        branch_us={m: [100.0 * b for b in range(1, 5)] for m in ("audio", "video", "text")},
        accuracy=accuracy,
    )
    trace = [
        mosel.Arrival(0.0, 2, deadline_ms=50.0, min_accuracy=0.85),
        mosel.Arrival(0.0, 2, min_accuracy=0.8),
    ]
    sim = mosel.simulate(profile, trace, SchedulerConfig(policy=policy))  # type: ignore[arg-type]
    refused, fine = sim.records
    assert refused.error == "AccuracyUnreachableError"
    assert fine.served and fine.expected_accuracy >= 0.8


# ---------------------------------------------------------------- 11: refused jobs


def test_refused_jobs_do_not_degrade_accepted_ones(profile: mosel.Profile) -> None:
    tenant = [mosel.Arrival(i * 0.002, 8, deadline_ms=3.0, min_accuracy=0.6) for i in range(300)]
    hostile = [mosel.Arrival(i * 0.0002 + 0.0001, 8, deadline_ms=0.01) for i in range(3000)]
    alone = mosel.simulate(profile, tenant)
    mixed = mosel.simulate(profile, tenant + hostile)
    mine = [r for r in mixed.records if r.arrival.deadline_ms == 3.0]
    assert all(r.error == "DeadlineError" for r in mixed.records if r.arrival.deadline_ms == 0.01)
    assert [r.strategies for r in mine] == [r.strategies for r in alone.records]


# ---------------------------------------------------------------- 19, 22: inputs and limits


@pytest.mark.parametrize(
    ("arrival", "error", "match"),
    [
        (mosel.Arrival(0.0, 0), mosel.InputError, "n must be an int >= 1"),
        (mosel.Arrival(0.0, 2, available=frozenset({"smell"})), mosel.InputError, "unknown: \\['smell'\\]"),
        (mosel.Arrival(0.0, 2, available=frozenset()), mosel.InputError, "non-empty subset"),
        (mosel.Arrival(math.nan, 2), mosel.InputError, "time_s"),
        (mosel.Arrival(0.0, 2, deadline_ms=-1.0), mosel.SLOError, "deadline_ms"),
        (mosel.Arrival(0.0, 2, min_accuracy=2.0), mosel.SLOError, "min_accuracy"),
    ],
)
def test_simulate_names_a_malformed_arrival(
    profile: mosel.Profile, arrival: mosel.Arrival, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        mosel.simulate(profile, [mosel.Arrival(0.0, 1), arrival])


def test_a_job_larger_than_the_queue_bound_is_not_a_retryable_error(profile: mosel.Profile) -> None:
    sim = mosel.simulate(
        profile, [mosel.Arrival(0.0, 30), mosel.Arrival(0.0, 12)], SchedulerConfig(max_queued_requests=20)
    )
    assert [r.error for r in sim.records] == ["InputError", None]
    with pytest.raises(mosel.InputError, match="can never be queued") as info:
        Scheduler(profile, SchedulerConfig(max_queued_requests=20)).admit(job(30), 0.0)
    assert not isinstance(info.value, mosel.QueueFullError)


# ---------------------------------------------------------------- found by hostile probing


def test_a_job_of_more_than_a_thousand_chunks_keeps_its_own_queue_keys(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(max_queued_requests=20_000))
    scheduler.in_flight = object()  # type: ignore[assignment]  # the device is busy
    big = job(8 * 1100)  # 1100 chunks, no deadline
    other = job(1)
    scheduler.admit(big, 0.0)
    scheduler.admit(other, 0.0)
    assert len({t.key for t in scheduler.queue}) == len(scheduler.queue)
    assert scheduler.cancel(other)
    assert [t.job for t in scheduler.queue] == [big] * 1100


def test_a_configuration_a_hair_below_the_floor_does_not_meet_it() -> None:
    from mosel.plan import accuracy_units

    assert accuracy_units(0.6999996) == 699_999
    assert accuracy_units(0.29) == 290_000 and accuracy_units(0.72) == 720_000
    model = Tiny()
    accuracy = {
        "audio": 0.6999996, "video": 0.5, "text": 0.5, "audio+video": 0.6, "audio+text": 0.6,
        "video+text": 0.6, "audio+video+text": 0.69,
    }  # fmt: skip
    profile = synthetic_profile(
        model,
        branch_us={m: [10.0 * b for b in range(1, 5)] for m in ("audio", "video", "text")},
        accuracy=accuracy,
    )
    for policy in ("mosel", "aggressive", "agnostic"):
        sim = mosel.simulate(
            profile,
            [mosel.Arrival(0.0, 1, deadline_ms=10.0, min_accuracy=0.7)],
            SchedulerConfig(policy=policy),
        )
        assert sim.records[0].error == "AccuracyUnreachableError", policy


def test_simulate_takes_numpy_numbers(profile: mosel.Profile) -> None:
    sim = mosel.simulate(profile, [mosel.Arrival(np.float32(0.5), np.int64(3), deadline_ms=np.float64(50.0))])  # type: ignore[arg-type]
    assert sim.records[0].served


# ---------------------------------------------------------------- found in review


@pytest.mark.parametrize("policy", ["mosel", "aggressive"])
def test_a_batch_never_overtakes_a_job_it_would_make_late(profile: mosel.Profile, policy: str) -> None:
    audio = frozenset({"audio"})
    scheduler = Scheduler(profile, SchedulerConfig(policy=policy))
    head = Job(n=1, available=audio, arrival=0.0, deadline_ms=0.2, min_accuracy=None)
    tight = [job(1, deadline_ms=0.264), job(1, deadline_ms=0.264), job(1, deadline_ms=0.265)]
    joiner = Job(n=1, available=audio, arrival=0.0, deadline_ms=10.0, min_accuracy=None)
    for j in (head, *tight, joiner):
        assert scheduler.admit(j, 0.0) == []
    _, late = predict(scheduler.policy, 0, 10, stop=True)
    assert late == -1  # batched as dispatch runs them, every job is on time
    batch, _ = scheduler.dispatch(0.0)
    assert batch is not None
    _, failures = scheduler.complete(batch, batch.predicted_us / 1e6, batch.predicted_us)
    assert failures == []  # nobody was pushed past a deadline by a job overtaking it


def test_a_policy_that_serves_late_jobs_never_sees_them_expire(profile: mosel.Profile) -> None:
    scheduler = Scheduler(profile, SchedulerConfig(policy="batcher"))
    scheduler.admit(job(8), 0.0)
    scheduler.dispatch(0.0)
    waiting = job(1, deadline_ms=1.0)
    scheduler.admit(waiting, 0.0)
    assert scheduler.expire(5.0) == [] and waiting.error is None
    assert scheduler.next_expiry() is None


def test_agnostic_plus_merges_across_skipped_jobs() -> None:
    from mosel.policies import AgnosticPlus

    assert AgnosticPlus.merge_skips


# ---------------------------------------------------------------- issue 23.1: what fits, as priced


@pytest.mark.parametrize("slowdown", [1.0, 1.7, 3.0])
@pytest.mark.parametrize("overhead_us", [0.0, 400.0])
def test_the_accuracy_a_refusal_says_fits_is_admitted_when_retried(
    profile: mosel.Profile, slowdown: float, overhead_us: float
) -> None:
    """``best_accuracy_within_deadline`` comes from the prices admission refuses with (corrected,
    at the tail, overhead included), never the raw profile: retrying at it is served."""
    scheduler = Scheduler(profile, SchedulerConfig(policy="aggressive"))
    pricer = scheduler.pricer
    for part in pricer.correction:
        pricer.correction[part] = slowdown
    pricer.tail.overhead_us = pricer.tail.median_overhead_us = overhead_us
    pricer.reprice()
    everything = profile.plan.frontier(ALL, 2)
    best = everything.best.expected_accuracy
    refused = 0
    for raw in {s.latency_us for s in everything.strategies}:
        for deadline_ms in (raw / 1000.0 * 0.9, raw / 1000.0 * 1.05, raw / 1000.0 * 2.0):
            try:
                scheduler.admit(job(2, 0.0, deadline_ms=deadline_ms, min_accuracy=best), 0.0)
            except mosel.AccuracyUnreachableError:
                continue
            except mosel.DeadlineError as refusal:
                refused += 1
                fitting = refusal.best_accuracy_within_deadline
                if fitting is None:
                    with pytest.raises(mosel.DeadlineError):  # nothing fits: even no floor is refused
                        scheduler.admit(job(2, 0.0, deadline_ms=deadline_ms), 0.0)
                    continue
                retry = job(2, 0.0, deadline_ms=deadline_ms, min_accuracy=fitting)
                scheduler.admit(retry, 0.0)  # served at the accuracy the refusal named
                assert retry.expected_accuracy >= fitting
                scheduler.cancel(retry)
    assert refused > 0
