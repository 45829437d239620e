"""Label-free arming (mosel.drift_armed): a confidence CUSUM that starts labelled episodes."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import mosel
from mosel.drift import CONFIDENCE_BINS, Cusum, DriftSettings, Tracker, episode_alarm
from mosel.drift_armed import Arming, episode_threshold, tilted
from mosel.monitoring import Monitor, Monitoring

from .helpers import Tiny, tiny_profile

AV = frozenset({"audio", "video"})
MIDDLES = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def _confidence(rng: random.Random, correct: bool, shift: float) -> float:
    """A served row's confidence: high when right, lower when wrong; ``shift`` lowers both."""
    low, high = (0.65, 1.0) if correct else (0.3, 0.7)
    return min(max(rng.uniform(low, high) - shift, 0.0), 1.0)


def _labels_to_alarm(
    profile: mosel.Profile, arm_rate: float | None, *, accuracy: float, shift: float, seed: int, limit: int
) -> tuple[int | None, Monitor]:
    """1000 drift-free rows (the reference), then rows at ``accuracy`` and ``shift``: labels to an alarm."""
    monitor = Monitor(profile, Monitoring(arm_rate=arm_rate))
    rng = random.Random(seed)
    p0 = profile.accuracy[AV]
    for i in range(1000 + limit):
        drifted = i >= 1000
        correct = rng.random() < (accuracy if drifted else p0)
        monitor.digested(AV, [_confidence(rng, correct, shift if drifted else 0.0)])
        if monitor.observe(AV, float(correct)) in ("drift", "modality_drift"):
            return (i - 1000 + 1 if drifted else -1), monitor
    return None, monitor


def test_the_alternative_is_a_likelihood_ratio_of_the_stated_drop() -> None:
    reference = np.array([0, 0, 3, 9, 20, 30, 40, 60, 80, 200], dtype=np.float64)
    ratios = tilted(reference, 0.075)
    p = (reference + 0.5) / (reference + 0.5).sum()
    q = p * np.exp(ratios)
    assert q.sum() == pytest.approx(1.0)  # E_p[exp(x)] = 1: the supermartingale under the reference
    assert float(p @ MIDDLES - q @ MIDDLES) == pytest.approx(0.075, abs=1e-6)
    assert np.all(np.diff(ratios) < 0)  # lower confidence, more evidence of the drop


def test_each_detector_keeps_to_the_stated_rate_per_row() -> None:
    arming = Arming([AV, frozenset({"audio"})], {"audio": [AV, frozenset({"audio"})]},
                    reference_rows=100, rate=1e-6, drop=0.075)  # fmt: skip
    arming.set_reference(AV, np.linspace(0.3, 1.0, 500))
    for _, cusum in arming.watchers[AV]:
        low = math.exp(min(float(r.min()) for r in cusum.ratios.values()))
        # two detectors read an AV row: each starts at most rate / 2 false armings per row
        assert (1 - low) / (math.exp(cusum.threshold) - low) == pytest.approx(1e-6 / 2)


def test_armed_detectors_alarm_sooner_on_a_shifted_stream_at_the_same_stated_rate(
    profile: mosel.Profile,
) -> None:
    plain_total = armed_total = 0
    for seed in range(4):
        plain, _ = _labels_to_alarm(profile, None, accuracy=0.77, shift=0.05, seed=seed, limit=4000)
        armed, monitor = _labels_to_alarm(profile, 1e-6, accuracy=0.77, shift=0.05, seed=seed, limit=4000)
        assert plain is not None and armed is not None and armed > 0
        assert armed < plain, (seed, armed, plain)
        assert monitor.armed()  # what armed it is still armed: the labels confirmed
        plain_total += plain
        armed_total += armed
    assert armed_total < 0.75 * plain_total, (armed_total, plain_total)


def test_no_alarm_and_no_arming_on_drift_free_streams(profile: mosel.Profile) -> None:
    for seed in range(2):
        delay, monitor = _labels_to_alarm(
            profile, 1e-6, accuracy=profile.accuracy[AV], shift=0.0, seed=10 + seed, limit=20_000
        )
        assert delay is None
        assert not monitor.armed()
        assert monitor.snapshot().counters["alarms"] == 0


def test_confidence_alone_arms_but_never_alarms(profile: mosel.Profile) -> None:
    alarms: list[mosel.Alarm] = []
    monitor = Monitor(profile, Monitoring(arm_rate=1e-6, on_alarm=alarms.append))
    rng = random.Random(0)
    monitor.digested(AV, [_confidence(rng, rng.random() < 0.85, 0.0) for _ in range(1000)])
    assert not monitor.armed()
    monitor.digested(AV, [_confidence(rng, rng.random() < 0.5, 0.2) for _ in range(2000)])
    assert AV in monitor.armed() and "audio" in monitor.armed()
    assert not alarms and monitor.snapshot().counters["alarms"] == 0
    # armed: the labelled detectors of the configurations it reads run an episode
    assert all(c.episode == 0.0 for c in monitor._trackers[AV].down)
    assert all(c.episode_threshold == monitor.armed_threshold for c in monitor._trackers[AV].down)
    assert all(c.episode is None for c in monitor._trackers[frozenset({"text"})].down)
    # audio+text shares the armed audio modality, but its own outputs did not move: not armed
    assert all(c.episode is None for c in monitor._trackers[frozenset({"audio", "text"})].down)
    assert all(c.episode == 0.0 for c in monitor._modalities["audio"].down)


def test_the_digest_feeds_the_arming_test(profile: mosel.Profile) -> None:
    monitor = Monitor(profile, Monitoring(arm_rate=1e-6, reference_rows=50))
    confident = torch.tensor([[6.0, 0.0, 0.0]]).repeat(50, 1)  # softmax top ~0.995
    unsure = torch.tensor([[0.2, 0.0, 0.0]]).repeat(400, 1)  # top ~0.38
    for output in (confident, unsure):
        monitor.record(mosel.Result(output, (AV,) * len(output), 0.8, 1.0, 1.0, 1.0, ()), None, None, None)
        while monitor.digest_waiting:
            monitor.digest()
    assert AV in monitor.armed()


def test_arming_is_on_by_default_and_off_with_none(profile: mosel.Profile) -> None:
    assert Monitoring().arm_rate == 1e-6
    on = Monitor(profile, Monitoring(reference_rows=100))
    on.digested(AV, [0.95] * 100)
    on.digested(AV, [0.1] * 2000)
    assert AV in on.armed()
    off = Monitor(profile, Monitoring(arm_rate=None))
    off.digested(AV, [0.1] * 5000)
    assert not off.armed()
    with pytest.raises(ValueError, match="arm_rate"):
        Monitoring(arm_rate=0.0)


def test_an_episode_reads_only_requests_served_after_the_arming() -> None:
    cusum = Cusum(0.85, 0.80, threshold=math.inf)
    cusum.arm(5.0, since=10.0)
    cusum.step(0.0, at=9.0)  # served before the arming: the statistic moves, the episode does not
    assert cusum.value > 0 and cusum.episode == 0.0 and cusum.episode_n == 0
    cusum.step(0.0, at=10.5)
    assert cusum.episode == pytest.approx(math.log(0.2 / 0.15)) and cusum.episode_n == 1
    cusum.arm(9.0, since=20.0)  # an episode running goes on
    assert cusum.episode_threshold == 5.0 and cusum.episode_n == 1


def test_an_episode_alarms_on_the_mean_of_its_detectors_likelihood_ratios() -> None:
    down = [Cusum(0.85, 0.85 - d, threshold=math.inf) for d in (0.05, 0.1, 0.2)]
    for d in down:
        d.arm(episode_threshold(0.1), since=0.0)
    assert episode_threshold(0.1) == pytest.approx(math.log(10))
    down[0].episode, down[1].episode, down[2].episode = math.log(10), -50.0, -50.0
    assert not episode_alarm(down)  # one of three at e^h: the mean is a third of it
    down[1].episode = down[2].episode = math.log(10)
    assert episode_alarm(down)
    assert not episode_alarm([Cusum(0.85, 0.8, 1.0)])  # not armed


def test_episodes_at_the_profiles_accuracy_alarm_at_most_at_the_stated_probability() -> None:
    """Ville's bound, measured: episodes of labels at p0, each until it alarms or clears."""
    rng = random.Random(7)
    settings = DriftSettings(false_alarm_rate=1e-9)  # the unarmed statistic never alarms here
    rate, episodes, alarms = 0.2, 600, 0
    for _ in range(episodes):
        tracker = Tracker("av", 0.85, settings)
        for cusum in tracker.down:
            cusum.arm(episode_threshold(rate), since=0.0)
        while True:
            if tracker.observe(float(rng.random() < 0.85), at=1.0) == "drift":
                alarms += 1
                break
            if tracker.down[0].cleared:
                break
    assert 0 < alarms <= rate * episodes, alarms


def test_a_benign_shift_arms_clears_on_its_labels_and_takes_a_new_reference(profile: mosel.Profile) -> None:
    """Confidence drops, accuracy does not: no alarm; the episode ends, the shift is the new normal."""
    alarms: list[mosel.Alarm] = []
    monitor = Monitor(profile, Monitoring(reference_rows=1000, on_alarm=alarms.append, pooled=False))
    rng = random.Random(4)
    p0 = profile.accuracy[AV]
    armed = []
    for i in range(40_000):
        correct = rng.random() < p0
        monitor.digested(AV, [_confidence(rng, correct, 0.0 if i < 1000 else 0.15)])
        monitor.observe(AV, float(correct))
        armed.append(AV in monitor.armed())
    counters = monitor.snapshot().counters
    assert any(armed[1000:1200]) and not any(armed[:1000])
    assert counters["benign_shifts"] == 1  # once cleared, the shifted rows are the reference
    assert AV not in monitor.armed()
    assert not alarms and counters["alarms"] == 0
    assert all(c.episode is None for c in monitor._trackers[AV].down)


def test_false_armings_stay_under_the_stated_rate_on_drift_free_rows() -> None:
    rng = np.random.default_rng(3)
    reference = np.concatenate([rng.uniform(0.65, 1.0, 850), rng.uniform(0.3, 0.7, 150)])
    for rate in (1e-2, 1e-3):
        arming = Arming([AV], {}, reference_rows=1000, rate=rate, drop=0.075)
        arming.add(AV, reference, [0.0] * len(reference))
        rows = 200_000
        correct = rng.random(rows) < 0.85
        stream = np.where(correct, rng.uniform(0.65, 1.0, rows), rng.uniform(0.3, 0.7, rows))
        chunks = np.split(stream, 200)
        armings = sum(armed for chunk in chunks for _, armed in arming.add(AV, chunk, [0.0] * 1000) if armed)
        assert armings <= rate * rows, (rate, armings)


def test_a_validation_reference_production_does_not_match_corrects_itself(profile: mosel.Profile) -> None:
    """Validation more confident than production at the same accuracy: armed, cleared, re-referenced."""
    alarms: list[mosel.Alarm] = []
    monitor = Monitor(profile, Monitoring(reference_rows=500, on_alarm=alarms.append, pooled=False))
    rng = random.Random(9)
    p0 = profile.accuracy[AV]
    top = [min(max(_confidence(rng, rng.random() < p0, -0.1), 0.34), 0.999) for _ in range(2000)]
    logits = torch.log(torch.tensor([[c, (1 - c) / 2, (1 - c) / 2] for c in top]))  # softmax top: c
    monitor.set_reference(AV, logits)
    for _ in range(30_000):
        correct = rng.random() < p0
        monitor.digested(AV, [_confidence(rng, correct, 0.0)])
        monitor.observe(AV, float(correct))
    counters = monitor.snapshot().counters
    assert counters["benign_shifts"] == 1 and not alarms and counters["alarms"] == 0
    assert AV not in monitor.armed()


def _shifted(
    monitor: Monitor, rng: random.Random, accuracy: float, shift: float, config: frozenset[str] = AV
) -> None:
    correct = rng.random() < accuracy
    monitor.digested(config, [_confidence(rng, correct, shift)])
    monitor.observe(config, float(correct))


def test_a_detector_back_in_line_while_its_counterpart_stays_armed_runs_a_new_episode(
    profile: mosel.Profile,
) -> None:
    p0 = profile.accuracy[AV]
    for back in ("recovered", "reset"):
        rng = random.Random(1)
        alarms: list[mosel.Alarm] = []
        monitor = Monitor(profile, Monitoring(pooled=False, on_alarm=alarms.append))
        for _ in range(1000):
            _shifted(monitor, rng, p0, 0.0)
        while not any(a.kind == "drift" for a in alarms):  # a real drop, the confidence lower
            _shifted(monitor, rng, 0.70, 0.15)
        if back == "reset":
            monitor.reset()
        while back == "recovered" and not any(
            a.kind == "recovered" for a in alarms
        ):  # a new microphone: accurate, less confident
            _shifted(monitor, rng, p0, 0.15)
        assert AV in monitor.armed()
        assert all(c.episode is not None for c in monitor._trackers[AV].down), back


def test_an_episode_alarm_estimates_the_change_from_its_likeliest_detector(profile: mosel.Profile) -> None:
    p0 = profile.accuracy[AV]
    for seed in range(6):
        rng = random.Random(seed)
        alarms: list[mosel.Alarm] = []
        monitor = Monitor(profile, Monitoring(pooled=False, on_alarm=alarms.append))
        for _ in range(1000):
            _shifted(monitor, rng, p0, 0.0)
        since = 0
        while not alarms:
            _shifted(monitor, rng, 0.70, 0.15)
            since += 1
        assert 0.8 * since <= alarms[0].since_change <= 1.6 * since, (seed, since, alarms[0].since_change)


def test_a_pools_benign_clear_re_references_only_the_configurations_that_moved(
    profile: mosel.Profile,
) -> None:
    at, vt = frozenset({"audio", "text"}), frozenset({"video", "text"})
    monitor = Monitor(profile, Monitoring(reference_rows=1000))  # pooled, as by default
    rng = random.Random(4)
    for config in (at, vt):  # validation references of configurations that will not move
        top = [
            min(max(_confidence(rng, rng.random() < profile.accuracy[config], 0.0), 0.34), 0.999)
            for _ in range(2000)
        ]
        monitor.set_reference(config, torch.log(torch.tensor([[c, (1 - c) / 2, (1 - c) / 2] for c in top])))
    for i in range(40_000):
        _shifted(monitor, rng, profile.accuracy[AV], 0.0 if i < 1000 else 0.15)
    arming = monitor._arming
    assert arming is not None and monitor.snapshot().counters["benign_shifts"] >= 1
    assert monitor.snapshot().counters["alarms"] == 0
    for config in (at, vt):  # their references kept, their own detectors still reading them
        assert arming.rows[config] == 1000 and config in arming.members[config][0].ratios
