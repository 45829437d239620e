"""Per-row escalation online: simulated chains, the later stages' budget, exact rows, statistics."""

from __future__ import annotations

import dataclasses
import random
import statistics

import numpy as np
import pytest
import torch

import mosel
from mosel.calibrating import record_rows
from mosel.chains import StageBudget
from mosel.execution import Later, run_chained
from mosel.stats import Stats, prometheus_collector
from tests.unit.votes import Votes, votes_batches, votes_data, votes_profile


@pytest.fixture(scope="module")
def model() -> Votes:
    return Votes().eval()


@pytest.fixture(scope="module")
def profile(model: Votes) -> mosel.Profile:
    return votes_profile(model)


@pytest.fixture(scope="module")
def held_out(model: Votes, profile: mosel.Profile) -> mosel.RowSample:
    assert profile.calibration is not None
    record = record_rows(model, votes_batches(3000, seed=7), lambda o, t: (o.argmax(-1) == t).double())
    return record.sample(profile.calibration.signal)


def _trace(
    profile: mosel.Profile, jobs: int, load: float, seed: int, floor: float | None
) -> list[mosel.Arrival]:
    rng = random.Random(seed)
    everything = frozenset(profile.modalities)
    full = profile.plan.frontier(everything, 4).best.latency_us / 1e6
    t, out = 0.0, []
    for _ in range(jobs):
        t += rng.expovariate(load / full)
        n = rng.choice((1, 2, 4, 8))
        out.append(mosel.Arrival(t, n, deadline_ms=3 * full * 1e3 + 2.0, min_accuracy=floor))
    return out


def test_simulated_chains_escalate_rows_by_their_confidence_and_measure_accuracy(
    profile: mosel.Profile, held_out: mosel.RowSample
) -> None:
    floor = round(max(profile.accuracy.values()) - 0.04, 3)
    sim = mosel.simulate(profile, _trace(profile, 400, 1.0, 0, floor), rows=held_out, seed=3)
    served = [r for r in sim.records if r.served]
    chained = [r for r in served if any(s.chain is not None for s in r.strategies)]
    assert len(served) > 300 and len(chained) > 100
    assert any(any(r.escalated) for r in chained)
    for record in served:
        assert record.expected_accuracy >= floor
        assert len(record.modalities) == record.arrival.n == len(record.escalated)
        assert not math_isnan(record.measured_accuracy)
        for strategy in record.strategies:
            if strategy.chain is not None:  # every row ends at a stage of its chain
                assert set(record.modalities) <= set(strategy.chain.stages)
    # what the rows did is what the calibration expected, within sampling error
    stage = sim.stats.escalation["stages"][0]
    assert stage["share"] == pytest.approx(stage["expected_share"], abs=0.06)
    measured = statistics.fmean(r.measured_accuracy for r in served)
    expected = statistics.fmean(r.expected_accuracy for r in served)
    assert measured == pytest.approx(expected, abs=0.03)
    assert set(sim.stats.escalation["confidence"]) >= {
        profile.key(s.chain.first) for r in chained for s in r.strategies if s.chain
    }


def math_isnan(x: float) -> bool:
    return x != x


def test_with_escalation_off_a_calibrated_profile_decides_as_one_without(profile: mosel.Profile) -> None:
    trace = _trace(profile, 300, 1.5, 1, round(max(profile.accuracy.values()) - 0.06, 3))
    plain = dataclasses.replace(profile, calibration=None)
    residuals = mosel.Residuals.from_profile(profile)
    off = mosel.simulate(profile, trace, mosel.SchedulerConfig(escalation=False), residuals=residuals, seed=5)
    without = mosel.simulate(plain, trace, residuals=residuals, seed=5)
    assert [(r.error, r.started_s, r.finish_s, r.strategies) for r in off.records] == [
        (r.error, r.started_s, r.finish_s, r.strategies) for r in without.records
    ]
    assert not off.stats.escalation


def test_escalation_raises_correct_answers_at_equal_cost(
    profile: mosel.Profile, held_out: mosel.RowSample
) -> None:
    """At a floor only the all-modality mix met statically, chains serve it cheaper: more capacity."""
    floor = round(max(profile.accuracy.values()) - 0.02, 3)
    trace = _trace(profile, 400, 1.2, 2, floor)
    on = mosel.simulate(profile, trace, rows=held_out, seed=1)
    off = mosel.simulate(profile, trace, mosel.SchedulerConfig(escalation=False), rows=held_out, seed=1)

    def on_time(sim: mosel.Simulation) -> int:
        return sum(r.arrival.n for r in sim.records if r.on_time)

    assert on_time(on) > on_time(off)


def test_later_stages_take_only_the_time_left(model: Votes, profile: mosel.Profile) -> None:
    calibration = profile.calibration
    assert calibration is not None
    frontier = mosel.scheduler.Scheduler(profile).pricer.reference_plan.frontier(
        frozenset(profile.modalities), 8
    )
    strategy = next(s for s in reversed(frontier.strategies) if s.chain is not None)
    chain = strategy.chain
    assert chain is not None
    inputs, _ = votes_data(8, seed=11)
    now = [100.0]

    def budget(seconds_left: float) -> StageBudget:
        return StageBudget(
            profile.cost_model(), {}, 1.0, 20.0, finish_by=now[0] + seconds_left, reserve_us=0.0
        )

    with torch.inference_mode():
        plenty = run_chained(
            model,
            mosel.spec_of(model),
            strategy,
            [chain] * 8,
            inputs,
            Later(calibration.signal, budget(10.0), lambda: now[0]),
        )
        none = run_chained(
            model,
            mosel.spec_of(model),
            strategy,
            [chain] * 8,
            inputs,
            Later(calibration.signal, budget(0.0), lambda: now[0]),
        )
    assert any(plenty.escalated) and not any(none.escalated)
    assert none.record.decisions[0][1] == sum(plenty.record.decisions[0][1:2])  # the same rows were below
    assert none.modalities == (chain.first,) * 8
    for output in (plenty, none):
        for i in range(8):
            alone = mosel.run_configuration(
                model, {m: x[i : i + 1] for m, x in inputs.items()}, output.modalities[i]
            )
            assert torch.allclose(alone, output.output[i : i + 1])


def test_statistics_compare_live_confidences_with_validations() -> None:
    stats = Stats()
    stats.set_calibration({"audio": (0.25, 0.25, 0.25, 0.25)})
    stats.escalated({"audio": (10, 0, 0, 10)}, ((20, 10, 8, 5.0),))
    stats.escalated({"audio": (0, 0, 0, 0)}, ((0, 0, 0, 0.0), (8, 2, 2, 1.0)))
    escalation = stats.snapshot().escalation
    assert escalation["stages"][0] == {
        "considered": 20, "below": 10, "escalated": 8, "expected_below": 5.0, "share": 0.5,
        "expected_share": 0.25,
    }  # fmt: skip
    assert escalation["stages"][1]["escalated"] == 2
    assert escalation["confidence"]["audio"]["distance"] == pytest.approx(0.5)
    merged = mosel.StatsSnapshot.merged([stats.snapshot(), stats.snapshot()])
    assert merged.escalation["stages"][0]["considered"] == 40
    pytest.importorskip("prometheus_client")
    names = {family.name for family in prometheus_collector(stats, "m").collect()}
    assert {"mosel_escalation_rows", "mosel_escalation_share", "mosel_confidence_distance"} <= names
    assert not Stats().snapshot().escalation
    _ = np  # numpy is the calibration's


def test_a_confidence_signal_is_required_for_rows_to_be_calibrated(model: Votes) -> None:
    record = record_rows(model, votes_batches(300, seed=3), lambda o, t: (o.argmax(-1) == t).double())
    assert set(record.ranking()) == {"max_probability", "margin"}
    assert record.calibration().rows == 300
