"""AV-Digits with frozen pretrained encoders and a small trained fusion head.

image and video frames go through EfficientNet-Lite0 (ImageNet), audio through the Whisper
tiny.en encoder; both encoders are decorated branches, the head is the fusion. Because the
encoders are frozen, their features are computed once and the head is trained on them with
``mosel.train_with_modality_dropout`` through a twin model whose branches return the cached
features and whose fusion is the very same head module.
"""

from __future__ import annotations

import glob
import wave
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

import mosel
from av_digits.data import Split
from av_digits.encoders import SAMPLE_RATE, EfficientNetLite0, WhisperTinyEncoder

DIMS = {"image": 1280, "audio": 384, "video": 1280}
FRAME_PX = 32


class FusionHead(nn.Module):
    """Per-modality projection, a learned placeholder for a missing modality, an MLP."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.project = nn.ModuleDict(
            {m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for m, d in DIMS.items()}
        )
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(width)) for m in DIMS})
        self.mlp = nn.Sequential(nn.Dropout(0.2), nn.Linear(3 * width, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        rows = next(iter(features.values())).shape[0]
        parts = [
            self.project[m](features[m]) if m in features else self.missing[m].expand(rows, -1) for m in DIMS
        ]
        logits: Tensor = self.mlp(torch.cat(parts, dim=1))
        return logits


def _frames(x: Tensor) -> Tensor:
    """Grey (N, 1, h, w) in about [0, 1] -> RGB (N, 3, 32, 32) for the image encoder."""
    x = nn.functional.interpolate(x.clamp(0.0, 1.0), size=(FRAME_PX, FRAME_PX), mode="bilinear")
    return x.expand(-1, 3, -1, -1)


@mosel.multimodal
class PretrainedAVDigits(nn.Module):
    """EfficientNet-Lite0 for image and video frames, Whisper tiny.en for audio, a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = EfficientNetLite0()
        self.speech = WhisperTinyEncoder()
        self.head = FusionHead()

    @mosel.modality("image")
    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 1, 8, 8) -> (B, 1280)."""
        out: Tensor = self.vision(_frames(image))
        return out

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        """(B, 16000) -> (B, 384)."""
        out: Tensor = self.speech(audio)
        return out

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        """(B, T, 1, 16, 16) -> (B, 1280): every frame through the image encoder, mean over time."""
        b, t = video.shape[:2]
        return self.vision(_frames(video.reshape(b * t, *video.shape[2:]))).reshape(b, t, -1).mean(dim=1)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """The trained head."""
        out: Tensor = self.head(features)
        return out


@mosel.multimodal
class _CachedFeatures(nn.Module):
    """Twin of :class:`PretrainedAVDigits` whose branches read precomputed features."""

    def __init__(self, head: FusionHead) -> None:
        super().__init__()
        self.head = head

    @mosel.modality("image")
    def encode_image(self, image: Tensor) -> Tensor:
        return image

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        return audio

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return video

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = self.head(features)
        return out


def features(model: PretrainedAVDigits, split: Split, batch: int = 64) -> dict[str, Tensor]:
    """Every branch's features over a split (frozen encoders: computed once)."""
    out: dict[str, list[Tensor]] = {m: [] for m in DIMS}
    with torch.inference_mode():
        for i in range(0, len(split), batch):
            inputs = split.inputs(slice(i, i + batch))
            for m in DIMS:
                out[m].append(getattr(model, f"encode_{m}")(inputs[m]))
    return {m: torch.cat(ts).clone() for m, ts in out.items()}


def train_head(
    model: PretrainedAVDigits, feats: Mapping[str, Tensor], labels: Tensor, *, epochs: int = 30,
    drop_probability: float = 0.5, seed: int = 0,
) -> None:  # fmt: skip
    """Train the fusion head on cached features, with modality dropout."""
    torch.manual_seed(seed)
    twin = _CachedFeatures(model.head)
    generator = torch.Generator().manual_seed(seed)

    def epoch() -> list[tuple[dict[str, Tensor], Tensor]]:
        order = torch.randperm(len(labels), generator=generator)
        return [
            ({m: f[order[i : i + 64]] for m, f in feats.items()}, labels[order[i : i + 64]])
            for i in range(0, len(order), 64)
        ]

    mosel.train_with_modality_dropout(
        twin, epoch, epochs=epochs, drop_probability=drop_probability, seed=seed
    )
    model.eval()


def head_accuracy(model: PretrainedAVDigits, feats: Mapping[str, Tensor], labels: Tensor) -> dict[str, float]:
    """Top-1 accuracy of every configuration, from cached features."""
    spec = mosel.spec_of(model)
    with torch.inference_mode():
        return {
            "+".join(m for m in spec.modalities if m in c): float(
                (model.fuse({m: feats[m] for m in c}).argmax(-1) == labels).double().mean()
            )
            for c in spec.configurations
        }


def asterisk_digits() -> tuple[Tensor, Tensor] | None:
    """Real human recordings of the digits 0-9 (Debian asterisk-core-sounds-en-wav), or None."""
    from scipy.signal import resample_poly

    clips, labels = [], []
    for digit in range(10):
        paths = sorted(glob.glob(f"/usr/share/asterisk/sounds/*/digits/{digit}.wav"))
        if not paths:
            return None
        with wave.open(paths[0]) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        audio = resample_poly(pcm, SAMPLE_RATE, rate).astype(np.float32)
        clip = np.zeros(SAMPLE_RATE, dtype=np.float32)
        clip[: min(len(audio), SAMPLE_RATE)] = audio[:SAMPLE_RATE]
        clips.append(clip)
        labels.append(digit)
    return torch.from_numpy(np.stack(clips)), torch.tensor(labels)
