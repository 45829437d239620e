"""A tiny deterministic model and a synthetic profile for unit tests."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

import mosel
from mosel.testing import synthetic_profile

MAX_BATCH = 8


@mosel.multimodal
class Tiny(nn.Module):
    """Three modalities; fusion output tells which modalities it saw (column per modality)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 10.0, 100.0]))
        self.calls: list[tuple[str, int]] = []

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        self.calls.append(("audio", audio.shape[0]))
        return audio * self.scale[0]

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        self.calls.append(("video", video.shape[0]))
        return video.sum(dim=(1, 2))[:, None] * self.scale[1]

    @mosel.modality("text")
    def encode_text(self, text: Tensor) -> Tensor:
        self.calls.append(("text", text.shape[0]))
        return text * self.scale[2]

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        self.calls.append(("fuse", next(iter(features.values())).shape[0]))
        rows = next(iter(features.values())).shape[0]
        cols = [features.get(m, torch.zeros(rows, 1)) for m in ("audio", "video", "text")]
        return torch.cat(cols, dim=1)


def tiny_inputs(n: int) -> dict[str, Tensor]:
    rows = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    return {"audio": rows, "video": rows[:, :, None].expand(n, 2, 3).clone(), "text": rows + 0.5}


def tiny_profile(model: nn.Module) -> mosel.Profile:
    """Audio cheap, video costly, text medium; accuracy grows with modalities."""
    per_row = {"audio": 10.0, "video": 200.0, "text": 50.0}
    accuracy = {
        "audio": 0.60,
        "video": 0.70,
        "text": 0.55,
        "audio+video": 0.85,
        "audio+text": 0.70,
        "video+text": 0.75,
        "audio+video+text": 0.90,
    }
    return synthetic_profile(
        model,
        branch_us={m: [100 + r * b for b in range(1, MAX_BATCH + 1)] for m, r in per_row.items()},
        accuracy=accuracy,
        fusion_us={k: [5.0 * b for b in range(1, MAX_BATCH + 1)] for k in accuracy},
    )
