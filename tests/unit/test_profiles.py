from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mosel

from .helpers import Tiny, tiny_profile


@pytest.fixture
def saved(tmp_path: Path) -> tuple[mosel.Profile, Path]:
    profile = tiny_profile(Tiny())
    path = tmp_path / "tiny.profile.json"
    profile.save(path)
    return profile, path


def test_json_round_trip_is_exact(saved: tuple[mosel.Profile, Path]) -> None:
    profile, path = saved
    loaded = mosel.Profile.load(path)
    assert loaded == profile
    assert loaded.plan.frontiers == profile.plan.frontiers
    data = json.loads(path.read_text())
    assert data["format"] == "mosel.profile" and data["version"] == 3
    assert data["accuracy"]["audio+video"] == pytest.approx(0.85)


def test_truncated_file_is_refused(saved: tuple[mosel.Profile, Path]) -> None:
    _, path = saved
    path.write_text(path.read_text()[:500])
    with pytest.raises(mosel.ProfileError, match="not valid JSON"):
        mosel.Profile.load(path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: {"hello": "world"}, "not a mosel profile"),
        (lambda d: [1, 2, 3], "not a mosel profile"),
        (lambda d: d | {"version": 99}, "format version 99"),
        (lambda d: d | {"accuracy": {"audio": 0.5}}, "malformed"),
        (lambda d: d | {"accuracy": d["accuracy"] | {"audio": 1.5}}, "malformed"),
        (lambda d: d | {"branch_latency": {}}, "malformed"),
        (lambda d: d | {"max_batch_size": 3}, "malformed"),
        (lambda d: d | {"plan": {"frontiers": []}}, "malformed"),
        (lambda d: d | {"accuracy": d["accuracy"] | {"audio": 0.99}}, "does not match"),
    ],
)
def test_malformed_or_foreign_files_are_refused(saved: tuple[mosel.Profile, Path], edit, match) -> None:  # type: ignore[no-untyped-def]
    _, path = saved
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(mosel.ProfileError, match=match):
        mosel.Profile.load(path)


def test_missing_file_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(mosel.ProfileError, match="cannot read"):
        mosel.Profile.load(tmp_path / "absent.json")


def test_attach_refuses_foreign_and_warns_on_stale(saved: tuple[mosel.Profile, Path]) -> None:
    profile, _ = saved
    from tests.unit.test_spec import AV

    with pytest.raises(mosel.ProfileMismatchError, match="modalities"):
        mosel.attach(AV(), profile)
    other_weights = Tiny()
    with torch.no_grad():
        other_weights.scale.mul_(2)
    with pytest.warns(mosel.MoselWarning, match="parameter_checksum"):
        mosel.attach(other_weights, profile)
    with pytest.raises(mosel.ProfileMismatchError, match="parameter_checksum"):
        mosel.attach(other_weights, profile, strict=True)
    mosel.attach(Tiny(), profile)  # same weights: silent
