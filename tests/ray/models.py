"""Models the Ray replicas build (importable from a replica's process: the repository is on its path)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import Tensor

import mosel
from tests.unit.helpers import Tiny, tiny_profile


def make_tiny() -> Tiny:
    """The unit tests' three-modality model: its output shows which modalities each row got."""
    return Tiny().eval()


@mosel.multimodal
class Slow(torch.nn.Module):
    """Tiny's arithmetic, with every branch sleeping ``delay_s``: keeps a replica busy for a while."""

    delay_s = 0.02

    def __init__(self) -> None:
        super().__init__()
        self.inner = Tiny()

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return self.inner.encode_audio(audio)

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return self.inner.encode_video(video)

    @mosel.modality("text")
    def encode_text(self, text: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return self.inner.encode_text(text)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.inner.fuse(features)


def make_slow() -> Slow:
    return Slow().eval()


def profiles() -> dict[str, mosel.Profile]:
    """The synthetic profiles the replicas attach (deterministic, nothing measured)."""
    return {"tiny": tiny_profile(make_tiny()), "slow": tiny_profile(make_slow())}
