"""Accuracy floors with confidence, and per-request floors (issue 13, item 5)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mosel
from mosel.plan import ACCURACY_SCALE
from mosel.testing import synthetic_profile

from .helpers import MAX_BATCH, Tiny

ACCURACY = {
    "audio": 0.60, "video": 0.70, "text": 0.55, "audio+video": 0.85, "audio+text": 0.70,
    "video+text": 0.75, "audio+video+text": 0.90,
}  # fmt: skip


def profile(samples: int) -> mosel.Profile:
    per_row = {"audio": 10.0, "video": 200.0, "text": 50.0}
    return synthetic_profile(
        Tiny,
        branch_us={m: [100 + r * b for b in range(1, MAX_BATCH + 1)] for m, r in per_row.items()},
        accuracy=ACCURACY,
        sample_count=samples,
    )


def test_wilson_bound_matches_the_formula_and_tightens_with_samples() -> None:
    small, large = profile(100), profile(100_000)
    config = frozenset({"audio", "video"})
    p, n, z = 0.85, 100, 1.6448536269514722
    wilson = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert small.accuracy_bound(config, 0.95) == pytest.approx(wilson)
    assert small.accuracy_bound(config, 0.95) < large.accuracy_bound(config, 0.95) < 0.85
    assert small.accuracy_bound(config, 0.99) < small.accuracy_bound(config, 0.95)


def sim(prof: mosel.Profile, policy: str = "mosel", **slo: object) -> mosel.Simulation:
    trace = [mosel.Arrival(0.01 * i, 4, deadline_ms=1000.0, **slo) for i in range(5)]  # type: ignore[arg-type]
    return mosel.simulate(prof, trace, mosel.SchedulerConfig(policy=policy))


def test_confidence_plans_against_the_lower_bound() -> None:
    prof = profile(100)
    mean_only = sim(prof, min_accuracy=0.84)
    assert all(r.served for r in mean_only.records)
    confident = sim(prof, min_accuracy=0.84, confidence=0.95)
    # At 100 samples the 0.85 configuration's bound is about 0.78: only all three (0.90, bound
    # about 0.84) may serve, and 0.84 is above that bound too: nothing meets it.
    assert all(r.error == "AccuracyUnreachableError" for r in confident.records)
    looser = sim(prof, min_accuracy=0.80, confidence=0.95)
    bound = prof.accuracy_bound(frozenset({"audio", "video", "text"}), 0.95)
    assert bound >= 0.80
    for record in looser.records:
        assert record.served
        lower = sum(prof.accuracy_bound(c, 0.95) * k for s in record.strategies for c, k in s.groups) / 4
        assert lower >= 0.80


def test_confidence_needs_a_floor_and_a_sane_level() -> None:
    prof = profile(100)
    with pytest.raises(mosel.SLOError, match="applies to min_accuracy"):
        sim(prof, confidence=0.95)
    for bad in (0.3, 1.0, "high"):
        with pytest.raises(mosel.SLOError, match="confidence"):
            sim(prof, min_accuracy=0.5, confidence=bad)


def test_per_request_floors_hold_for_every_request() -> None:
    prof = profile(10_000)
    job_average = sim(prof, "aggressive", min_accuracy=0.72)  # the cheapest mix meeting the average
    mixed = [
        r
        for r in job_average.records
        if any(ACCURACY[prof.key(c)] < 0.72 for s in r.strategies for c, _ in s.groups)
    ]
    assert mixed, "the job-average floor lets some requests run below it (the documented default)"
    per_request = sim(prof, "aggressive", min_accuracy=0.72, per_request=True)
    for record in per_request.records:
        assert record.served
        assert all(ACCURACY[prof.key(c)] >= 0.72 for s in record.strategies for c, k in s.groups if k)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    floor=st.floats(0.5, 0.92),
    confidence=st.one_of(st.none(), st.floats(0.5, 0.999)),
    per_request=st.booleans(),
    samples=st.sampled_from([50, 500, 5000]),
    seed=st.integers(0, 1000),
    policy=st.sampled_from(["mosel", "greedy", "aggressive", "agnostic"]),
)
def test_every_served_job_meets_its_floor_as_asked(
    floor: float, confidence: float | None, per_request: bool, samples: int, seed: int, policy: str
) -> None:
    prof = profile(samples)
    rng = random.Random(seed)
    trace = [
        mosel.Arrival(
            0.0005 * i, rng.randint(1, 12), deadline_ms=rng.uniform(0.5, 5.0), min_accuracy=round(floor, 4),
            confidence=confidence, per_request=per_request,
        )
        for i in range(40)
    ]  # fmt: skip
    result = mosel.simulate(prof, trace, mosel.SchedulerConfig(policy=policy))
    for record in result.records:
        if not record.served:
            continue
        groups = [(c, k) for s in record.strategies for c, k in s.groups if k]
        value = (
            (lambda c: prof.accuracy_bound(c, confidence))
            if confidence is not None
            else (lambda c: prof.accuracy[c])
        )
        floor_value = record.arrival.min_accuracy or 0.0
        if per_request:
            assert all(value(c) >= floor_value - 1e-6 for c, _ in groups)
        else:
            total = sum(math.floor(value(c) * ACCURACY_SCALE) * k for c, k in groups)
            assert total / (record.arrival.n * ACCURACY_SCALE) >= floor_value - 1e-9
