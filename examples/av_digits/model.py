"""A from-scratch AV-Digits model: three decorated branches and a fusion head (CPU, trains in seconds)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

import mosel

N_MELS = 80
N_FFT = 400
HOP = 160


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = 16_000) -> Tensor:
    """Triangular mel filterbank (HTK mel scale), shape (n_mels, n_fft // 2 + 1)."""

    def mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    points = torch.linspace(
        float(mel(torch.tensor(0.0))), float(mel(torch.tensor(sample_rate / 2.0))), n_mels + 2
    )
    hz = 700.0 * (10 ** (points / 2595.0) - 1.0)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    rising = (freqs - lower) / (center - lower)
    falling = (upper - freqs) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMel(nn.Module):
    """Whisper-style log-mel front end: STFT 400/160, 80 mel bands, log10 clamped at max - 8."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("filters", mel_filters(), persistent=False)

    def forward(self, audio: Tensor) -> Tensor:
        spec = torch.stft(audio, N_FFT, HOP, window=self.window, return_complex=True).abs() ** 2
        logmel = torch.clamp(self.filters @ spec, min=1e-10).log10()
        logmel = torch.maximum(logmel, logmel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (logmel + 4.0) / 4.0


@mosel.multimodal
class AVDigitsNet(nn.Module):
    """image: a tiny CNN; audio: log-mel + 1-D convolutions; video: a per-frame CNN (the costly one)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, width)
        )  # fmt: skip
        self.logmel = LogMel()
        self.audio = nn.Sequential(
            nn.InstanceNorm1d(N_MELS), nn.Conv1d(N_MELS, 64, 5, stride=2), nn.ReLU(),
            nn.Conv1d(64, width, 5, stride=2), nn.ReLU(),
        )  # fmt: skip
        self.frame = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.video = nn.Linear(32 * 16, width)
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(width)) for m in ("image", "audio", "video")}
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(3 * width, 64), nn.ReLU(), nn.Linear(64, 10))

    @mosel.modality("image")
    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> (B, width)."""
        out: Tensor = self.image(image)
        return out

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        """(B, 16000) waveform -> (B, width)."""
        return self.audio(self.logmel(audio)).mean(dim=2)

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        """(B, frames, 1, 16, 16) -> (B, width): every frame through the CNN, mean over time."""
        b, t = video.shape[:2]
        frames = self.frame(video.reshape(b * t, *video.shape[2:])).reshape(b, t, -1)
        out: Tensor = self.video(frames.mean(dim=1))
        return out

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """Concatenate the features; a learned placeholder stands in for a missing modality."""
        rows = next(iter(features.values())).shape[0]
        parts = [
            features[m] if m in features else self.missing[m].expand(rows, -1)
            for m in ("image", "audio", "video")
        ]
        logits: Tensor = self.head(torch.cat(parts, dim=1))
        return logits


def shuffled_batches(split: object, size: int, seed: int) -> object:
    """A callable giving a new shuffled pass over ``split`` each time (for training)."""
    generator = torch.Generator().manual_seed(seed)

    def epoch() -> list[tuple[dict[str, Tensor], Tensor]]:
        order = torch.randperm(len(split), generator=generator)  # type: ignore[arg-type]
        return [
            (split.inputs(order[i : i + size]), split.labels[order[i : i + size]])  # type: ignore[attr-defined]
            for i in range(0, len(order), size)
        ]

    return epoch


def train(split: object, *, epochs: int = 20, drop_probability: float = 0.5, seed: int = 0) -> AVDigitsNet:
    """Train a fresh model with modality dropout (``drop_probability=0``: complete inputs only)."""
    torch.manual_seed(seed)
    model = AVDigitsNet()
    mosel.train_with_modality_dropout(
        model, shuffled_batches(split, 64, seed), epochs=epochs, drop_probability=drop_probability, seed=seed
    )
    return model


def accuracy_per_configuration(model: AVDigitsNet, split: object) -> dict[str, float]:
    """Top-1 accuracy of every configuration on ``split``."""
    spec = mosel.spec_of(model)
    with torch.inference_mode():
        inputs = split.inputs()  # type: ignore[attr-defined]
        feats = {m: getattr(model, spec.branches[m])(inputs[m]) for m in spec.modalities}
        return {
            "+".join(m for m in spec.modalities if m in c): float(
                (model.fuse({m: feats[m] for m in c}).argmax(-1) == split.labels).double().mean()  # type: ignore[attr-defined]
            )
            for c in spec.configurations
        }
