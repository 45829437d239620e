"""A model whose outputs carry a confidence signal without training, and its calibrated profile.

Each of three branches passes on a noisy vote for the class (its input: a scaled one-hot plus
noise of a modality's own level); fusion sums the votes it gets. More modalities are more
accurate, and a row whose votes disagree has a low softmax maximum: escalation has something
to find. Video is the costly branch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

import mosel
from mosel.calibrating import recalibrated
from mosel.testing import synthetic_profile

CLASSES = 10
NOISE = {"audio": 1.1, "image": 1.8, "video": 0.8}
MAX_BATCH = 8


@mosel.multimodal
class Votes(nn.Module):
    """Three noisy votes, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    @mosel.modality("audio")
    def encode_audio(self, x: Tensor) -> Tensor:
        return x * self.scale

    @mosel.modality("image")
    def encode_image(self, x: Tensor) -> Tensor:
        return x * self.scale

    @mosel.modality("video")
    def encode_video(self, x: Tensor) -> Tensor:
        return x * self.scale

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([features[m] for m in ("audio", "image", "video") if m in features]).sum(0)


def votes_data(n: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """``n`` labelled rows: per modality a one-hot of the label times 2, plus its noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    onehot = nn.functional.one_hot(labels, CLASSES).to(torch.float32) * 2.0
    inputs = {m: onehot + sigma * torch.randn(n, CLASSES, generator=gen) for m, sigma in NOISE.items()}
    return inputs, labels


def votes_batches(n: int, seed: int, size: int = 100) -> list[tuple[dict[str, Tensor], Tensor]]:
    inputs, labels = votes_data(n, seed)
    return [
        ({m: x[i : i + size] for m, x in inputs.items()}, labels[i : i + size]) for i in range(0, n, size)
    ]


CONFIGS = ("audio", "image", "video", "audio+image", "audio+video", "image+video", "audio+image+video")


def votes_profile(
    model: nn.Module, rows: int = 3000, seed: int = 1, overhead_us: float = 20.0
) -> mosel.Profile:
    """Synthetic latencies (video dear), accuracies and a calibration measured on ``rows`` rows."""
    sizes = range(1, MAX_BATCH + 1)
    base = synthetic_profile(
        model,
        branch_us={
            "audio": [200.0 + 20.0 * b for b in sizes],
            "image": [150.0 + 15.0 * b for b in sizes],
            "video": [1500.0 + 150.0 * b for b in sizes],
        },
        accuracy=dict.fromkeys(CONFIGS, 0.5),
        fusion_us={k: [30.0 + 3.0 * b for b in sizes] for k in CONFIGS},
    )
    return recalibrated(base, model, votes_batches(rows, seed), stage_overhead_us=overhead_us)
