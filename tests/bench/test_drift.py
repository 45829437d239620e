"""Fast checks of the drift benchmark's parts: the measured drift, a short seeded run, windows."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import drift
from scenarios import av_digits


@pytest.fixture(scope="module", autouse=True)
def quiet() -> Iterator[None]:
    """The alarms' warnings are expected here; the logger's level is put back for later modules."""
    logger = logging.getLogger("mosel")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def test_the_drift_table_is_committed_and_sound() -> None:
    table = json.loads(drift.DRIFT_TABLE.read_text())["snr_db"]
    profile = av_digits().profile
    keys = {profile.key(c) for c in profile.accuracy}
    for snr in ("-4.0", *drift.DRIFTS.values()):
        assert set(table[snr]) == keys
        assert all(0.0 <= v["accuracy"] <= 1.0 and 0.0 <= v["agreement"] <= 1.0 for v in table[snr].values())
    # the audio degrades: every configuration with audio loses accuracy, the others keep it
    for snr in drift.DRIFTS.values():
        for key in keys:
            moved = table[snr][key]["accuracy"] - table["-4.0"][key]["accuracy"]
            assert moved < -0.02 if "audio" in key else moved == 0.0


def test_the_world_moves_the_profiles_figures_at_the_drift() -> None:
    profile = av_digits().profile
    world = drift.world(profile, "audio -40", drift_s=10.0)
    audio = frozenset({"image", "audio"})
    assert world.at(audio, 9.9)[0] == profile.accuracy[audio]
    assert world.at(audio, 10.0)[0] < profile.accuracy[audio] - 0.2
    assert drift.world(profile, None, 10.0).at(audio, 99.0)[0] == profile.accuracy[audio]


def test_a_short_run_is_deterministic_alarms_after_the_drift_and_reprices() -> None:
    scenario = av_digits()

    def run() -> drift.Outcome:
        return drift.simulate_drift(
            scenario.profile, scenario.residuals, load=0.5, seconds=8.0, seed=1, drift="audio -40",
            drift_s=2.0, floor=0.7, slack_ms=scenario.slack_ms, live_floors=True, shadow_rate=0.5,
        )  # fmt: skip

    first, again = run(), run()
    assert first.alarms == again.alarms and first.served == again.served
    assert first.alarms and all(t >= 2.0 for t, _, _ in first.alarms)
    assert first.repriced_at and first.repriced_at[0] >= first.alarms[0][0]
    assert first.labels > first.labels_after_drift > 0


def test_windows_cut_the_served_requests_after_a_time() -> None:
    served = [(t / 10, 0.8, t % 2) for t in range(100)]
    assert drift.windows(served, 5.0, size=10) == [(0.5, pytest.approx(0.8))] * 5
    assert drift.windows(served, 9.95, size=10) == []
