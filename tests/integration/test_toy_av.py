"""End to end on a small real model: train, profile on this CPU, plan, save, load, serve."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import mosel
from mosel.testing import ToyAV, toy_av_batches, toy_av_data

AUDIO, VIDEO = frozenset({"audio"}), frozenset({"video"})
BOTH = AUDIO | VIDEO


@pytest.fixture(scope="module")
def profiled(trained_toy: ToyAV) -> tuple[ToyAV, mosel.Profile]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)  # a noisy shared CPU may trip the cost check
        profile = mosel.profile(
            trained_toy,
            toy_av_batches(600, 100),
            max_batch_size=16,
            batch_sizes=[1, 2, 4, 8, 12, 16],
            repeats=3,
            progress=False,
            threads=torch.get_num_threads(),  # kept: the profile is attached again at this count
        )
    return trained_toy, profile


def test_fusion_beats_each_modality(profiled: tuple[ToyAV, mosel.Profile]) -> None:
    _, profile = profiled
    assert profile.sample_count == 600
    assert profile.accuracy[BOTH] > profile.accuracy[AUDIO] + 0.02  # training threads vary the last digit
    assert profile.accuracy[BOTH] > profile.accuracy[VIDEO] + 0.03


def test_profile_tables_are_complete_and_monotone(profiled: tuple[ToyAV, mosel.Profile]) -> None:
    _, profile = profiled
    for table in [*profile.branch_latency.values(), *profile.fusion_latency.values()]:
        assert len(table.median_us) == 16
        assert table.measured_sizes == (1, 2, 4, 8, 12, 16)
        assert all(a <= b for a, b in zip(table.median_us, table.median_us[1:]))
        assert all(m <= p for m, p in zip(table.median_us, table.p95_us))
    assert profile.plan.exact
    assert profile.cost_checks and all(c.measured_us > 0 for c in profile.cost_checks)
    assert profile.fingerprint.device == "cpu"
    assert profile.fingerprint.model_class.endswith("ToyAV")


def test_accuracy_matches_an_independent_evaluation(profiled: tuple[ToyAV, mosel.Profile]) -> None:
    model, profile = profiled
    inputs, labels = toy_av_data(600, seed=1)
    with torch.no_grad():
        feats = {"audio": model.encode_audio(inputs["audio"]), "video": model.encode_video(inputs["video"])}
        for config, accuracy in profile.accuracy.items():
            logits = model.fuse({m: feats[m] for m in config})
            assert (logits.argmax(-1) == labels).double().mean().item() == pytest.approx(accuracy, abs=1e-9)


def test_infer_serves_a_mixed_strategy_under_a_tight_deadline(profiled: tuple[ToyAV, mosel.Profile]) -> None:
    model, profile = profiled
    frontier = profile.plan.frontier(BOTH, 16)
    inputs, _ = toy_av_data(16, seed=9)
    result = model.infer(inputs)
    assert result.modalities == (BOTH,) * 16
    with torch.no_grad():
        torch.testing.assert_close(result.output, model(inputs["audio"], inputs["video"]))
    middle = frontier.strategies[len(frontier.strategies) // 2]
    tight = model.infer(inputs, deadline_ms=middle.predicted_latency_ms * 1.02, best_effort=True)
    assert tight.predicted_latency_ms < frontier.best.predicted_latency_ms
    assert tight.expected_accuracy < profile.accuracy[BOTH]
    assert tight.output.shape == (16, 10)


def test_save_load_attach_serves_identically(profiled: tuple[ToyAV, mosel.Profile], tmp_path: Path) -> None:
    model, profile = profiled
    path = tmp_path / "toy.profile.json"
    profile.save(path)
    fresh = ToyAV()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    mosel.attach(fresh, mosel.Profile.load(path))
    inputs, _ = toy_av_data(5, seed=3)
    torch.testing.assert_close(fresh.infer(inputs).output, model.infer(inputs).output)
