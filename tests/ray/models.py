"""Models the Ray replicas build (importable from a replica's process: the repository is on its path)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

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


@mosel.multimodal
class Gated(torch.nn.Module):
    """Tiny's arithmetic; its audio branch logs each row's audio value and waits while a gate is shut.

    ``folder/seen`` gets one line per row computed (its audio value); while ``folder/gate``
    exists the branch waits (at most a minute), holding the replica's mosel executor.
    """

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.inner = Tiny()
        self.folder = Path(folder)

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        with open(self.folder / "seen", "a") as log:
            log.writelines(f"{v:g}\n" for v in audio[:, 0].tolist())
        until = time.monotonic() + 60.0
        while (self.folder / "gate").exists() and time.monotonic() < until:
            time.sleep(0.01)
        return self.inner.encode_audio(audio)

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return self.inner.encode_video(video)

    @mosel.modality("text")
    def encode_text(self, text: Tensor) -> Tensor:
        return self.inner.encode_text(text)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.inner.fuse(features)


def make_gated(folder: str) -> Gated:
    """A Gated model; every replica built after the first waits while ``folder/hold`` exists
    (at most a minute): a replacement that is slow to start."""
    marker = Path(folder) / "built"
    if marker.exists():
        until = time.monotonic() + 60.0
        while (Path(folder) / "hold").exists() and time.monotonic() < until:
            time.sleep(0.05)
    marker.touch()
    return Gated(folder).eval()


def seen(folder: str | Path) -> list[float]:
    """The audio values a Gated model computed, in order."""
    path = Path(folder) / "seen"
    return [float(line) for line in path.read_text().split()] if path.exists() else []
