"""AV-Digits: the data builder, the from-scratch model, and mosel end to end on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mosel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from av_digits import data  # noqa: E402
from av_digits import model as av_model  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install -y espeak-ng)"
)


def test_builder_is_deterministic(tmp_path: Path) -> None:
    one = np.load(data.build(tmp_path / "a", seed=3), allow_pickle=False)
    two = np.load(data.build(tmp_path / "b", seed=3), allow_pickle=False)
    assert set(one.files) == set(two.files)
    for name in one.files:
        assert np.array_equal(one[name], two[name]), name
    first, again = (
        data.load("test", cache=tmp_path / "a", seed=3),
        data.load("test", cache=tmp_path / "a", seed=3),
    )
    assert torch.equal(first.audio, again.audio) and torch.equal(first.video, again.video)


def test_split_is_speaker_independent_and_shapes_are_right() -> None:
    assert not set(data.TRAIN_VARIANTS) & set(data.TEST_VARIANTS)
    train, test = data.load("train"), data.load("test")
    assert len(train) + len(test) == 1797
    assert train.image.shape[1:] == (1, 8, 8)
    assert train.audio.shape[1:] == (data.SAMPLE_RATE,)
    assert train.video.shape[1:] == (data.FRAMES, 1, data.FRAME_SIZE, data.FRAME_SIZE)
    assert set(test.labels.tolist()) == set(range(10))


@pytest.fixture(scope="module")
def trained() -> av_model.AVDigitsNet:
    return av_model.train(data.load("train"), epochs=6)


def test_fusion_beats_every_single_modality(trained: av_model.AVDigitsNet) -> None:
    acc = av_model.accuracy_per_configuration(trained, data.load("test"))
    assert acc["image+audio+video"] > max(acc["image"], acc["audio"], acc["video"]) + 0.1


def test_profile_and_infer_end_to_end(trained: av_model.AVDigitsNet) -> None:
    test = data.load("test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)
        profile = mosel.profile(
            trained, test.batches(100), max_batch_size=8, batch_sizes=[1, 4, 8], repeats=2
        )
    assert len(profile.accuracy) == 7 and profile.plan.exact
    inputs, labels = test.inputs(slice(0, 8)), test.labels[:8]
    full = trained.infer(inputs)
    assert full.modalities == (frozenset({"image", "audio", "video"}),) * 8
    cheapest = profile.plan.frontier(frozenset(profile.modalities), 8).strategies[0]
    tight = trained.infer(inputs, deadline_ms=cheapest.predicted_latency_ms * 1.5, best_effort=True)
    assert tight.predicted_latency_ms < full.predicted_latency_ms
    assert tight.output.shape == (8, 10) and labels.shape == (8,)
    mosel.close(trained)


def test_demo_runs_quickly_end_to_end() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for needle in ("dropout", "frontier for 32 request(s)", "deadline violations", "all modalities", "mosel"):
        assert needle in done.stdout
