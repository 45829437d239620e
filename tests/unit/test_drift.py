"""The statistics of accuracy monitoring: the posterior, the drift detectors, the output shift."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from mosel.drift import Alarm, Cusum, DriftSettings, OutputShift, Tracker, contributions, psi, wilson_lower
from mosel.monitoring import Monitor, Monitoring
from mosel.profiles import Profile

from .helpers import Tiny, tiny_profile


def _stream(tracker: Tracker, p: float, n: int, rng: random.Random) -> list[tuple[int, str]]:
    """Feed ``n`` Bernoulli(p) scores; the (index, kind) of every alarm."""
    fired = []
    for i in range(n):
        kind = tracker.observe(1.0 if rng.random() < p else 0.0)
        if kind is not None:
            fired.append((i, kind))
    return fired


def _until_alarm(tracker: Tracker, p: float, limit: int, rng: random.Random) -> int | None:
    """Feed Bernoulli(p) scores until an alarm; the labels it took (None: none within ``limit``)."""
    for i in range(limit):
        if tracker.observe(1.0 if rng.random() < p else 0.0) is not None:
            return i + 1
    return None


@pytest.mark.parametrize("p0", [0.55, 0.81, 0.9])
def test_no_drift_no_alarm_in_a_long_stream(p0: float) -> None:
    tracker = Tracker("c", p0, DriftSettings())
    assert _stream(tracker, p0, 100_000, random.Random(int(p0 * 100))) == []
    assert tracker.live == pytest.approx(p0, abs=0.03)
    assert not tracker.drifted


def test_false_alarm_rate_is_at_most_the_stated_one() -> None:
    """At a loose rate the alarms are countable: the measured rate stays under the stated bound."""
    settings = DriftSettings(false_alarm_rate=0.02)  # threshold log(3 / 0.02) = 5.0
    rng = random.Random(7)
    alarms = labels = 0
    for _ in range(4):
        tracker = Tracker("c", 0.8, settings)
        for _ in range(25_000):
            labels += 1
            if tracker.observe(1.0 if rng.random() < 0.8 else 0.0) == "drift":
                alarms += 1
                tracker.reset()
    assert alarms / labels <= settings.false_alarm_rate


def test_a_drop_is_detected_and_its_change_point_estimated() -> None:
    settings = DriftSettings()
    delays = []
    for seed in range(10):
        rng = random.Random(seed)
        tracker = Tracker("c", 0.81, settings)
        assert _stream(tracker, 0.81, 3000, rng) == []
        delay = _until_alarm(tracker, 0.6, 2000, rng)
        assert delay is not None and tracker.drifted
        delays.append(delay)
        # The segment since the change point holds (about) the labels since the drift.
        assert delay - 40 <= tracker.since_change <= delay + 40
        assert abs(tracker.live - 0.6) < 0.15  # biased low: an alarm stops on a bad streak
    assert sorted(delays)[len(delays) // 2] < 200  # a 21-point drop: ~100 labels (h = 14.9)


def test_a_drop_within_the_margin_is_not_an_alarm() -> None:
    tracker = Tracker("c", 0.8, DriftSettings(margin=0.1))
    assert _stream(tracker, 0.79, 50_000, random.Random(3)) == []


def test_posterior_counts_the_profile_as_prior_weight_labels() -> None:
    settings = DriftSettings(prior_weight=50.0, memory=10**9)
    tracker = Tracker("c", 0.8, settings)
    assert tracker.live == pytest.approx(0.8)
    for _ in range(50):
        tracker.observe(1.0)
    assert tracker.live == pytest.approx((50 * 0.8 + 50) / 100, rel=1e-6)
    assert tracker.lower == pytest.approx(wilson_lower(0.9, 100, 0.95))
    assert tracker.lower < tracker.live


def test_old_labels_are_forgotten_at_the_memory() -> None:
    tracker = Tracker("c", 0.9, DriftSettings(prior_weight=10.0, memory=100, margin=0.5))
    for _ in range(2000):
        tracker.observe(0.5)  # fractional scores count as their mean
    assert tracker.live == pytest.approx(0.5, abs=0.04)


def test_drifted_is_priced_at_its_lower_bound_and_recovers() -> None:
    settings = DriftSettings()
    rng = random.Random(11)
    tracker = Tracker("c", 0.9, settings)
    assert tracker.priced == 0.9
    assert _until_alarm(tracker, 0.6, 3000, rng) is not None and tracker.drifted
    assert tracker.priced == pytest.approx(min(0.9, tracker.lower))
    assert tracker.priced < 0.9 - settings.margin
    assert tracker.detector < 1.0
    fired = _stream(tracker, 0.9, 5000, rng)
    assert [k for _, k in fired] == ["recovered"]
    assert not tracker.drifted and tracker.priced == 0.9


def test_reset_forgets_a_drift() -> None:
    tracker = Tracker("c", 0.9, DriftSettings())
    _stream(tracker, 0.3, 500, random.Random(1))
    assert tracker.drifted
    tracker.reset()
    assert not tracker.drifted and tracker.live == pytest.approx(0.9)


def test_cusum_increments_are_the_log_likelihood_ratio() -> None:
    cusum = Cusum(0.8, 0.7, threshold=10.0)
    cusum.step(0.0)
    assert cusum.value == pytest.approx(math.log(0.3 / 0.2))
    cusum.step(1.0)
    assert cusum.value == pytest.approx(math.log(0.3 / 0.2) + math.log(0.7 / 0.8))
    for _ in range(10):
        cusum.step(1.0)
    assert cusum.value == 0.0 and cusum.since_n == 0


def test_psi_of_the_same_and_of_a_shifted_distribution() -> None:
    a = np.array([100.0, 200.0, 300.0, 400.0])
    assert psi(a, a * 3) == pytest.approx(0.0, abs=1e-3)
    assert psi(a, a[::-1].copy()) > 0.25


def test_output_shift_against_the_first_rows() -> None:
    shift = OutputShift(reference_rows=500, window=500)
    rng = np.random.default_rng(0)
    for _ in range(10):  # the reference: confident, classes uniform
        shift.add(rng.uniform(0.8, 1.0, 100), rng.integers(0, 10, 100))
    assert shift.shift()["confidence"] < 0.1 and shift.shift()["class"] < 0.1
    for _ in range(20):  # unsure, and one class dominates
        shift.add(rng.uniform(0.2, 0.5, 100), np.zeros(100, dtype=np.int64))
    assert shift.shift()["confidence"] > 0.25 and shift.shift()["class"] > 0.25
    assert shift.confidence_mean is not None and shift.confidence_mean < 0.6


# ---------------------------------------------------------------------------------- pooled per modality

# AV-Digits-like: three modalities; audio adds 0.15 to each configuration with another modality.
ACCURACY = {
    frozenset({"audio"}): 0.60, frozenset({"video"}): 0.70, frozenset({"text"}): 0.55,
    frozenset({"audio", "video"}): 0.85, frozenset({"audio", "text"}): 0.70,
    frozenset({"video", "text"}): 0.75, frozenset({"audio", "video", "text"}): 0.90,
}  # fmt: skip
WITH_AUDIO = [c for c in ACCURACY if "audio" in c and len(c) > 1]


def _profile() -> Profile:
    profile = tiny_profile(Tiny())
    assert dict(profile.accuracy) == ACCURACY
    return profile


def _labels_to_alarm(monitor: Monitor, lost: float, limit: int, rng: random.Random) -> int | None:
    """Labels of the configurations with audio, audio having lost ``lost`` of what it adds, until an alarm."""
    for i in range(limit):
        config = rng.choice(WITH_AUDIO)
        rest = ACCURACY[config - {"audio"}]
        p = ACCURACY[config] - lost * (ACCURACY[config] - rest)
        if monitor.observe(config, 1.0 if rng.random() < p else 0.0) is not None:
            return i + 1
    return None


def test_contributions_are_what_a_modality_adds() -> None:
    added = contributions(ACCURACY)
    assert added["audio"] == pytest.approx({frozenset({"audio"}): 0.60, **{c: 0.15 for c in WITH_AUDIO}})
    assert set(added) == {"audio", "video", "text"}
    assert contributions({frozenset({"a"}): 0.5, frozenset({"b"}): 0.6}) == {}  # nothing shared


def test_the_pooled_detector_alarms_sooner_on_a_shared_drift() -> None:
    """Audio loses 40% of what it adds: each configuration with it drops 6 points, all at once."""
    profile = _profile()
    pooled, alone = [], []
    for seed in range(7):
        for on, delays in ((True, pooled), (False, alone)):
            monitor = Monitor(profile, Monitoring(pooled=on))
            delay = _labels_to_alarm(monitor, 0.4, 20_000, random.Random(seed))
            assert delay is not None
            delays.append(delay)
        assert monitor.snapshot().modalities == {}  # pooled=False: no modality detectors
    assert statistics.median(pooled) < 0.7 * statistics.median(alone)


def test_a_pooled_alarm_names_the_modality_and_its_loss() -> None:
    alarms: list[Alarm] = []
    monitor = Monitor(_profile(), Monitoring(on_alarm=alarms.append))
    assert _labels_to_alarm(monitor, 1.0, 20_000, random.Random(3)) is not None
    pooled = [a for a in alarms if a.kind == "modality_drift"]
    assert pooled and pooled[0].modality == pooled[0].configuration == "audio"
    assert 0.6 < pooled[0].value <= 1.0  # the share of its contribution lost, estimated
    snap = monitor.snapshot().modalities["audio"]
    assert snap.drifted and snap.alarms == 1 and snap.lost_upper >= snap.lost


def test_pooled_detectors_keep_the_false_alarm_rate() -> None:
    """Without drift (each configuration at its profile's accuracy) the alarms stay under the rate."""
    profile = _profile()
    configs = list(ACCURACY)
    for rate, labels in ((1e-6, 100_000), (0.02, 60_000)):
        rng = random.Random(17)
        monitor = Monitor(profile, Monitoring(false_alarm_rate=rate))
        alarms = 0
        for _ in range(labels):
            config = configs[rng.randrange(len(configs))]
            if monitor.observe(config, 1.0 if rng.random() < ACCURACY[config] else 0.0) is not None:
                counters = monitor.snapshot().counters
                alarms = counters["alarms"] + counters["modality_alarms"]
                monitor.reset()  # alarms as renewals: each from a fresh start
        if rate < 1e-3:
            assert alarms == 0
        else:
            assert 0 < alarms / labels <= rate
