"""The drift detectors' threshold for a stated false-alarm rate (:mod:`mosel.drift_threshold`)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from mosel.drift import Cusum
from mosel.drift_threshold import alarm_rate, excursion_threshold
from mosel.monitoring import Monitor, Monitoring

from .test_drift import ACCURACY, _labels_to_alarm, _profile


def _rate(cusum: Cusum, draw: random.Random, labels: int, score: float, p0: float) -> float:
    """False alarms per label of ``cusum`` (reset after each) on scores of mean ``p0``: ``score`` or 1."""
    alarms = 0
    for _ in range(labels):
        x = score if draw.random() < (1 - p0) / (1 - score) else 1.0
        if cusum.step(x):
            alarms += 1
            cusum.reset()
    return alarms / labels


@pytest.mark.parametrize(("p0", "d", "rate"), [(0.8, 0.05, 0.01), (0.9, 0.2, 0.01), (0.55, 0.05, 0.005)])
def test_a_cusum_at_the_threshold_keeps_the_stated_rate(p0: float, d: float, rate: float) -> None:
    """Measured under the stated rate, on 0/1 scores and on fractional ones of the same mean."""
    win = math.log((p0 - d) / p0)
    threshold = excursion_threshold([{"c": win}], rate)
    assert threshold < math.log(1 / rate) - 1  # below Lorden's: a lower threshold for the same rate
    assert alarm_rate([{"c": win}], threshold) <= rate < alarm_rate([{"c": win}], threshold - 0.01)
    for score in (0.0, 0.5):
        measured = _rate(Cusum(p0, p0 - d, threshold), random.Random(3), 40_000, score, p0)
        assert measured <= rate


def test_a_pooled_detector_is_bounded_by_its_smallest_increment() -> None:
    """A pooled detector reads two configurations; its rate bound holds at either one's labels alone."""
    wins = {"a": math.log(0.75 / 0.8), "b": math.log(0.3 / 0.5)}
    threshold = excursion_threshold([wins], 0.01)
    assert threshold >= max(excursion_threshold([{k: w}], 0.01) for k, w in wins.items())
    for p0, p1 in ((0.8, 0.75), (0.5, 0.3)):
        assert _rate(Cusum(p0, p1, threshold), random.Random(5), 40_000, 0.0, p0) <= 0.01
    assert excursion_threshold([], 0.01) == 0.0


def test_the_monitor_sets_every_detector_to_the_bound() -> None:
    """At the default 1e-6 per label the tiny profile's detectors share 14.7 nats (Lorden: 16.3)."""
    monitor = Monitor(_profile(), Monitoring())
    settings = Monitoring().settings
    assert monitor.threshold < settings.threshold_for(12) - 1.5
    detectors = [{c: d.win} for c, t in monitor._trackers.items() for d in t.down]
    detectors += [
        dict(zip(m.configs, d.win, strict=True)) for m in monitor._modalities.values() for d in m.down
    ]
    assert alarm_rate(detectors, monitor.threshold) <= settings.false_alarm_rate
    for tracker in monitor._trackers.values():
        assert {c.threshold for c in (*tracker.down, tracker.up)} == {monitor.threshold}
    for pool in monitor._modalities.values():
        assert {c.threshold for c in (*pool.down, pool.up)} == {monitor.threshold}


def test_a_shared_drift_alarms_sooner_at_the_same_stated_rate() -> None:
    """Audio loses 40% of what it adds: the median over 9 seeds was 1,193 labels at Lorden's threshold."""
    delays = []
    for seed in range(9):
        delay = _labels_to_alarm(Monitor(_profile(), Monitoring()), 0.4, 20_000, random.Random(seed))
        assert delay is not None
        delays.append(delay)
    assert statistics.median(delays) < 1050


def test_no_false_alarm_in_a_long_stream_at_the_single_modalities() -> None:
    """The worst labels for the bound (a modality alone, read by its own and its pooled detectors)."""
    profile = _profile()
    singles = [c for c in ACCURACY if len(c) == 1]
    rng = random.Random(23)
    monitor = Monitor(profile, Monitoring(false_alarm_rate=0.02))
    alarms, labels = 0, 20_000
    for _ in range(labels):
        config = singles[rng.randrange(len(singles))]
        if monitor.observe(config, 1.0 if rng.random() < ACCURACY[config] else 0.0) is not None:
            alarms += 1
            monitor.reset()
    assert alarms / labels <= 0.02
