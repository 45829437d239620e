"""The miss budget (issue 24): upgrades bought only with what the on-time promise leaves.

On the virtual clock: with its budget spent mosel decides exactly as the cheapest admissible
policy; the feedback loop stops upgrades while the recent miss rate is over the budget and
resumes under it; the risk price counts the misses a longer batch adds, from the measured
residuals' tail.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mosel
from mosel.estimators import BANKED, MissBudget, SlackSample
from mosel.pricing import Delayed
from mosel.scheduler import Job, Scheduler, SchedulerConfig

from .helpers import Tiny, tiny_profile
from .test_dominance import PROFILES

ALL = frozenset({"audio", "video", "text"})


def trace_of(
    profile: mosel.Profile, seed: int, load: float, slack_ms: float, jobs: int
) -> list[mosel.Arrival]:
    everything = frozenset(profile.modalities)
    best = max(profile.accuracy.values())
    full = {n: profile.plan.frontier(everything, n).best.latency_us / 1e6 for n in range(1, 9)}
    mean_full = sum(full.values()) / len(full)
    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(jobs):
        t += rng.expovariate(load / mean_full)
        n = rng.choice([1, 1, 2, 3, 4, 8])
        floor = round(best - rng.uniform(0.0, 0.2), 4)
        trace.append(mosel.Arrival(t, n, deadline_ms=full[n] * 1000 + slack_ms, min_accuracy=floor))
    return trace


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    which=st.integers(0, len(PROFILES) - 1),
    seed=st.integers(0, 10_000),
    load=st.floats(0.1, 8.0),
    slack_ms=st.floats(0.2, 8.0),
    jobs=st.integers(20, 120),
    spread=st.sampled_from([0.0, 0.2, 0.6]),
)
def test_with_its_budget_spent_mosel_decides_exactly_as_the_cheapest_policy(
    which: int, seed: int, load: float, slack_ms: float, jobs: int, spread: float
) -> None:
    profile = PROFILES[which]
    trace = trace_of(profile, seed, load, slack_ms, jobs)
    residuals = mosel.Residuals(tuple(float(np.exp(spread * z)) for z in np.linspace(-2, 2, 41)))
    runs = {
        label: mosel.simulate(profile, trace, config, residuals=residuals, seed=seed)
        for label, config in (
            ("cheapest", SchedulerConfig(policy="aggressive")),
            ("spent", SchedulerConfig(policy="mosel", miss_budget=0.0)),
        )
    }
    for cheap, spent in zip(runs["cheapest"].records, runs["spent"].records, strict=True):
        assert (cheap.error, cheap.started_s, cheap.finish_s, cheap.strategies) == (
            spent.error,
            spent.started_s,
            spent.finish_s,
            spent.strategies,
        )


def test_the_window_holds_upgrades_while_misses_are_over_budget_and_resumes_under() -> None:
    budget = MissBudget(0.01, window=1000)
    assert budget.open
    for _ in range(100):
        budget.outcome(1, missed=False)
    for _ in range(30):  # 30 of 130 missed: far over 1%
        budget.outcome(1, missed=True)
    assert budget.miss_rate > 0.01 and not budget.open
    for _ in range(1000):  # the misses leave the window; the credit is earned back
        budget.outcome(1, missed=False)
    assert budget.miss_rate <= 0.01
    for _ in range(3 * BANKED):
        budget.outcome(1, missed=False)
    assert budget.open and budget.credit == pytest.approx(0.01 * BANKED)


def test_a_relative_budget_ignores_misses_the_cheapest_policy_would_have_too() -> None:
    budget = MissBudget(None)
    for _ in range(200):
        budget.outcome(4, missed=True)  # everything late: not the upgrades' doing, nothing held
    assert budget.open
    budget.spend(budget.credit + 1.0)
    assert not budget.open  # what the upgrades may add is spent


def test_the_scheduler_stops_upgrading_while_the_window_is_over_budget() -> None:
    profile = tiny_profile(Tiny())
    scheduler = Scheduler(profile, SchedulerConfig(policy="mosel", miss_budget=0.02, deterministic=True))
    policy = scheduler.policy

    def serve_one(now: float) -> int:
        job = Job(n=1, available=ALL, arrival=now, deadline_ms=1e4, min_accuracy=0.5)
        batch = scheduler.start_alone(job, now)
        assert batch is not None
        k = batch.tasks[0].k
        scheduler.complete(batch, now + 0.001, batch.predicted_us)
        return k

    assert serve_one(0.0) == 0  # the first arrival: nothing watched yet rules out a flood
    assert serve_one(0.5) > 0  # an idle device, a roomy deadline, a quiet half-second: upgraded
    for _ in range(50):  # the promise is broken (e.g. a stalled device): misses come in
        policy.observe_outcome(
            Job(n=1, available=ALL, arrival=0.0, deadline_ms=1.0, min_accuracy=None), missed=True
        )
    assert serve_one(1.0) == 0  # held: served as the cheapest policy serves it
    assert scheduler.stats.snapshot().counters.get("upgraded", 0) == 1
    for _ in range(3000):  # on time again: the window recovers
        policy.observe_outcome(
            Job(n=1, available=ALL, arrival=0.0, deadline_ms=1.0, min_accuracy=None), missed=False
        )
    assert serve_one(2.0) > 0


def test_the_risk_price_counts_the_tail_of_the_measured_residuals() -> None:
    profile = tiny_profile(Tiny())
    scheduler = Scheduler(profile, SchedulerConfig())
    pricer = scheduler.pricer
    for i in range(64):  # 63 batches on time, one stalled at 10x: the tail the price must see
        pricer.tail.observe(10.0 if i == 7 else 1.0, 1.0, 0.0, float(i))
    candidates = np.array([2000.0, 1000.0])  # an upgrade to 2 ms, the batch as it is at 1 ms
    one_job = pricer.expected_misses(candidates, np.array([5000.0]), np.array([3.0]))
    # A job that can wait 5 ms misses only in the stalled draw, for either candidate (10 or 20 ms).
    assert one_job == pytest.approx([3.0 / 64, 3.0 / 64])
    tight = pricer.expected_misses(candidates, np.array([1500.0]), np.array([1.0]))
    assert tight[0] == pytest.approx(1.0) and tight[1] == pytest.approx(1.0 / 64)  # the upgrade risks it
    slack = SlackSample()
    for s in (100.0, 500.0, 2000.0, 9000.0):
        for _ in range(10):
            slack.finished(s, 1)
    delayed = Delayed(jobs=4.0, requests=2.0, share_missing=slack.share_missing)
    future = pricer.expected_misses(candidates, np.empty(0), np.empty(0), delayed)
    # Delayed by 1 ms (10 ms in the stall): half the finished jobs had less slack (all in the stall).
    assert future[0] == pytest.approx(4.0 * 2.0 * (63 * 0.5 + 1.0) / 64)
    assert future[1] == 0.0
