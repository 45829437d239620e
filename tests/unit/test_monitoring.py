"""The accuracy monitor without a server: the label store, feedback, expiry, alarms, live floors."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import torch

import mosel
from mosel.clock import VirtualClock
from mosel.drift import Alarm
from mosel.jobs import Job
from mosel.monitoring import Monitor, Monitoring, Sample, live_profile
from mosel.scheduler import Scheduler, SchedulerConfig

from .helpers import Tiny, tiny_profile

AV = frozenset({"audio", "video"})
AT = frozenset({"audio", "text"})
ALL = frozenset({"audio", "video", "text"})


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def _result(rid: str, configs: tuple[frozenset[str], ...], classes: list[int]) -> mosel.Result:
    """A served job's result whose row ``i`` predicts ``classes[i]`` (of 3)."""
    output = torch.nn.functional.one_hot(torch.tensor(classes), 3).float()
    return mosel.Result(output, configs, 0.8, 1.0, 1.0, 1.0, (), id=rid)


def _monitor(profile: mosel.Profile, clock: VirtualClock | None = None, **settings: Any) -> Monitor:
    clock = clock or VirtualClock()
    return Monitor(profile, Monitoring(**settings), clock=clock.now)


def test_labels_match_their_job_by_id_in_every_form(profile: mosel.Profile) -> None:
    monitor = _monitor(profile)
    monitor.record(_result("p-1", (AV, AT, AV), [0, 1, 2]), None, None, None)
    monitor.record(_result("p-2", (ALL,), [1]), None, None, None)
    assert monitor.feedback("p-1", [0, None, 1]) == 2  # rows 0 and 2; row 2 is wrong
    assert monitor.feedback("p-1", {"1": 1, 0: 0}) == 1  # row 0 again: a duplicate
    assert monitor.feedback("p-2", torch.tensor([1])) == 1
    assert monitor.feedback("nope", [1]) == 0
    snap = monitor.snapshot()
    assert snap.configurations["audio+video"].labels == 2
    assert snap.configurations["audio+text"].labels == 1
    assert snap.configurations["audio+video+text"].labels == 1
    assert (
        snap.counters["labelled"] == 4 and snap.counters["duplicate"] == 1 and snap.counters["unknown"] == 1
    )
    assert snap.pending == 0  # both jobs fully labelled: forgotten
    live = snap.configurations["audio+video"]
    # one right and one wrong label on the prior (0.85 counted as 100 labels)
    assert live.live == pytest.approx((85 + 1) / 102, rel=1e-3)


def test_an_alias_finds_the_job_and_expires_with_it(profile: mosel.Profile) -> None:
    clock = VirtualClock()
    monitor = _monitor(profile, clock, horizon_s=10.0)
    monitor.record(_result("p-1", (AV,), [0]), None, None, None)
    assert monitor.alias("p-1", "order-17")
    assert not monitor.alias("p-404", "order-18")
    clock.advance_to(11.0)
    monitor.record(_result("p-2", (AV,), [0]), None, None, None)  # the next record expires p-1
    assert monitor.feedback("order-17", [0]) == 0
    assert monitor.feedback("p-1", [0]) == 0
    snap = monitor.snapshot()
    assert snap.counters["expired"] == 1 and snap.counters["unknown"] == 2
    assert monitor._aliases == {}


def test_memory_is_bounded_by_the_horizon_and_the_count(profile: mosel.Profile) -> None:
    clock = VirtualClock()
    monitor = _monitor(profile, clock, horizon_s=5.0, max_records=100)
    for i in range(10_000):
        clock.advance_to(i * 0.001)
        monitor.record(_result(f"p-{i}", (AV,), [0]), None, None, None)
        assert len(monitor._records) <= 100 and len(monitor._order) <= 100
    clock.advance_to(100.0)
    assert monitor.pending == 0  # past the horizon, without any new record
    assert monitor.snapshot().counters["expired"] == 10_000
    assert monitor.feedback("p-9999", [0]) == 0


def test_malformed_labels_are_refused_and_lose_nothing(profile: mosel.Profile) -> None:
    monitor = _monitor(profile)
    monitor.record(_result("p-1", (AV, AV), [0, 1]), None, None, None)
    with pytest.raises(mosel.InputError, match="one entry per request"):
        monitor.feedback("p-1", [0])
    with pytest.raises(mosel.InputError, match="row 5"):
        monitor.feedback("p-1", {5: 0})
    with pytest.raises(mosel.InputError, match="form a tensor"):
        monitor.feedback("p-1", ["a", object()])
    assert monitor.feedback("p-1", [0, 1]) == 2


def test_the_metric_scores_labels(profile: mosel.Profile) -> None:
    def half(output: torch.Tensor, target: Any) -> torch.Tensor:
        return torch.full((output.shape[0],), 0.5, dtype=torch.float64)

    monitor = _monitor(profile, metric=half, prior_weight=1.0, memory=10**9)
    monitor.record(_result("p-1", (AV,) * 4, [0, 0, 0, 0]), None, None, None)
    monitor.feedback("p-1", [9, 9, 9, 9])
    assert monitor.snapshot().configurations["audio+video"].live == pytest.approx((0.85 + 2) / 5)

    def broken(output: torch.Tensor, target: Any) -> torch.Tensor:
        return torch.full((output.shape[0],), 2.0)

    monitor = _monitor(profile, metric=broken)
    monitor.record(_result("p-1", (AV,), [0]), None, None, None)
    with pytest.raises(mosel.InputError, match=r"in \[0, 1\]"):
        monitor.feedback("p-1", [0])


def test_per_bucket_figures(profile: mosel.Profile) -> None:
    monitor = _monitor(profile)
    monitor.record(_result("p-1", (AV, AV), [0, 0]), (64,), None, None)
    monitor.record(_result("p-2", (AV,), [0]), (128,), None, None)
    monitor.feedback("p-1", [0, 0])
    monitor.feedback("p-2", [1])
    buckets = monitor.snapshot().configurations["audio+video"].buckets
    assert buckets["64"][1] == 2 and buckets["128"][1] == 1
    assert buckets["64"][0] > buckets["128"][0]


def test_a_drift_alarm_reaches_the_callback_and_a_raising_one_is_ignored(
    profile: mosel.Profile, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Alarm] = []
    monitor = _monitor(profile, on_alarm=seen.append)
    for i in range(200):
        monitor.record(_result(f"p-{i}", (AT,), [0]), None, None, None)
        monitor.feedback(f"p-{i}", [1])  # audio+text is always wrong now
    assert [a.kind for a in seen if a.kind == "drift"] == ["drift"]
    alarm = seen[0]
    assert alarm.configuration == "audio+text" and alarm.profiled == 0.7 and alarm.live < 0.2
    assert "drifted" in alarm.message and any("drifted" in r.message for r in caplog.records)
    snap = monitor.snapshot()
    assert snap.configurations["audio+text"].drifted and snap.counters["alarms"] == 1
    # Pooled: audio+text's labels alone cannot tell audio from text; both modalities alarm.
    pooled = {a.modality: a for a in seen if a.kind == "modality_drift"}
    assert set(pooled) == {"audio", "text"} and snap.counters["modality_alarms"] == 2
    assert all(a.configuration == a.modality and a.value > 0.5 for a in pooled.values())
    assert snap.modalities["audio"].drifted and not snap.configurations["audio+video"].drifted

    def raising(alarm: Alarm) -> None:
        raise RuntimeError("boom")

    monitor = _monitor(profile, on_alarm=raising)
    for i in range(200):
        monitor.record(_result(f"p-{i}", (AT,), [0]), None, None, None)
        monitor.feedback(f"p-{i}", [1])
    assert monitor.snapshot().counters["alarms"] == 1


def test_live_floors_ask_for_a_reprice_only_when_a_price_moves(profile: mosel.Profile) -> None:
    calls: list[int] = []
    monitor = _monitor(profile, live_floors=True)
    monitor.on_change = lambda: calls.append(1)
    rng = random.Random(0)
    for _ in range(5000):  # in line with the profile: nothing moves
        monitor.observe(AT, 1.0 if rng.random() < 0.7 else 0.0)
    assert calls == [] and not monitor.needs_reprice()
    while monitor.observe(AT, 0.0) is None:
        pass
    assert calls == [1] and monitor.needs_reprice()
    table = monitor.priced()
    assert table[AT] < 0.7 - 0.05 and table[AV] == 0.85
    monitor.applied(table)
    assert not monitor.needs_reprice()
    assert _monitor(profile).needs_reprice() is False  # without live floors, never


def test_live_floors_follow_a_drifted_bound_as_its_labels_arrive(profile: mosel.Profile) -> None:
    """After the alarm, the bound tightens with the labels: live floors re-price without a new alarm."""
    calls: list[float] = []
    monitor = _monitor(profile, live_floors=True, pooled=False)

    def reprice() -> None:  # as a server does: the live table applied
        table = monitor.priced()
        calls.append(table[AT])
        monitor.applied(table)

    monitor.on_change = reprice
    rng = random.Random(2)
    while monitor.observe(AT, 1.0 if rng.random() < 0.4 else 0.0) is None:
        pass
    assert len(calls) == 1
    for _ in range(2000):  # still 0.4: the bound rises from the alarm's few labels towards it
        assert monitor.observe(AT, 1.0 if rng.random() < 0.4 else 0.0) is None
    assert len(calls) >= 3 and calls[-1] > calls[0] + 0.05
    assert calls[-1] == pytest.approx(monitor.priced()[AT], abs=0.011)
    assert 0.3 < calls[-1] < 0.4


def test_a_drifted_modality_prices_the_configurations_sharing_it(profile: mosel.Profile) -> None:
    """Audio broke; only audio+text and all three were labelled: audio+video is priced down too."""
    for pooled in (True, False):
        monitor = _monitor(profile, live_floors=True, pooled=pooled)
        rng = random.Random(4)
        truth = {AT: 0.55, ALL: 0.75}  # each lost all that audio adds to it (0.15)
        for i in range(3000):
            config = (AT, ALL)[i % 2]
            monitor.observe(config, 1.0 if rng.random() < truth[config] else 0.0)
        table = monitor.priced()
        vt, video = frozenset({"video", "text"}), frozenset({"video"})
        assert table[vt] == 0.75 and table[video] == 0.70  # no audio: the profile's figures
        assert table[AT] < 0.65 and table[ALL] < 0.85  # their own alarms
        if pooled:
            snap = monitor.snapshot()
            assert snap.modalities["audio"].drifted and not snap.configurations["audio+video"].drifted
            assert snap.modalities["audio"].lost_upper > 0.8
            assert 0.65 <= table[AV] < 0.85 - 0.1  # the pooled bound: 0.85 - 0.15 * lost_upper
            assert monitor.needs_reprice()
        else:
            assert table[AV] == 0.85  # without pooling, until its own labels alarm


def test_repricing_drops_a_drifted_configuration(profile: mosel.Profile) -> None:
    """A job whose cheapest admissible strategy used audio+text no longer gets it once it drifted."""
    scheduler = Scheduler(profile, SchedulerConfig(policy="greedy", deterministic=True))

    def served(now: float) -> tuple[tuple[frozenset[str], int], ...]:
        job: Job[None] = Job(n=1, available=ALL, arrival=now, deadline_ms=100.0, min_accuracy=0.7)
        scheduler.admit(job, now)
        batch, _ = scheduler.dispatch(now)
        assert batch is not None
        scheduler.complete(batch, now, 1.0)
        return job.tasks[0].frontier.strategies[job.tasks[0].first].groups

    assert served(0.0) == ((AT, 1),)  # the cheapest strategy meeting 0.7
    correction = dict(scheduler.pricer.correction)
    live = live_profile(profile, {AT: 0.5})
    scheduler.set_profile(live)
    assert scheduler.pricer.correction == correction  # prices learnt are kept
    cheapest = served(1.0)
    assert all(config != AT for config, _ in cheapest)
    assert sum(live.accuracy[c] * k for c, k in cheapest) >= 0.7
    exact = live_profile(profile, {AT: 0.5}, exact=True)
    assert exact.plan.exact and exact.accuracy[AT] == 0.5


def test_samples_wait_for_the_shadow_budget_and_expire(profile: mosel.Profile) -> None:
    clock = VirtualClock()
    monitor = _monitor(profile, clock, shadow_share=0.1, shadow_keep_s=1.0)
    assert monitor.shadow_wait_s(0.0) is None
    sample = Sample(0.0, {}, AT, ALL, torch.tensor([[1.0, 0.0, 0.0]]))
    monitor.offer(sample)
    assert monitor.shadow_wait_s(0.0) == 0.0
    assert monitor.take_sample() is sample
    monitor.shadowed(sample, torch.tensor([[0.0, 1.0, 0.0]]), device_s=0.2)  # disagrees; overspent
    assert monitor.snapshot().configurations["audio+text"].agreement == 0.0
    monitor.offer(dataclasses.replace(sample))
    wait = monitor.shadow_wait_s(0.0)
    assert wait is not None and wait == pytest.approx((0.2 - 0.05) / 0.1)
    clock.advance_to(5.0)
    assert monitor.shadow_wait_s(5.0) is None  # kept past shadow_keep_s: dropped
    assert monitor.snapshot().counters["shadow_skipped"] == 1


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"margin": 0.0}, "margin"),
        ({"false_alarm_rate": 1.0}, "false_alarm_rate"),
        ({"horizon_s": -1.0}, "horizon_s"),
        ({"shadow_rate": 1.5}, "shadow_rate"),
        ({"confidence": 0.3}, "confidence"),
        ({"rebuild": "cp-sat"}, "rebuild"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Monitoring(**settings)


def test_queued_jobs_take_the_repriced_plan(profile: mosel.Profile) -> None:
    """Jobs queued when the plan is re-priced are served by the new plan's options (none drifted)."""
    scheduler = Scheduler(profile, SchedulerConfig(policy="aggressive", deterministic=True))

    def job(n: int) -> Job[None]:
        return Job(n=n, available=ALL, arrival=0.0, deadline_ms=1000.0, min_accuracy=0.7)

    jobs = [job(n) for n in (1, 3, 2, 1)]
    scheduler.admit(jobs[0], 0.0)
    batch, _ = scheduler.dispatch(0.0)  # one runs; the others queue behind it
    for queued in jobs[1:]:
        scheduler.admit(queued, 0.0)
    scheduler.set_profile(live_profile(profile, {AT: 0.5, AV: 0.6}))
    jobs += [job(n) for n in (3, 2, 1)]  # new jobs of the same sizes share the prices' caches
    for new in jobs[4:]:
        scheduler.admit(new, 0.0)
    now = 0.001
    while batch is not None:
        scheduler.complete(batch, now, 1.0)
        batch, _ = scheduler.dispatch(now)
        now += 0.001
    for served in jobs[1:]:
        assert served.finished > 0 and served.error is None
        groups = [g for t in served.tasks for g in t.strategy.groups]
        assert all(config not in (AT, AV) for config, _ in groups)
        assert served.expected_accuracy >= 0.7
