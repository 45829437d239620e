"""Public helpers for testing code that uses mosel: a small real audio-visual model and its data.

``ToyAV`` is a real (trainable, CPU-sized) two-modality classifier: a cheap 1-D convolutional
audio branch, a costlier 2-D convolutional video branch, and a fusion head that learns a
placeholder for a missing modality. ``toy_av_data`` generates a seeded ten-class task on which
each modality alone is informative but noisy, so fusion beats either one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
from torch import Tensor, nn

from mosel.plan import PlannerConfig, build_plan, configuration_key
from mosel.profiles import (
    Fingerprint,
    LatencyTable,
    Profile,
    SizedLatency,
    cost_model_of,
    fingerprint_of,
    plan_buckets,
)
from mosel.spec import fusion, modality, multimodal, spec_of

__all__ = ["Passthrough", "ToyAV", "synthetic_profile", "toy_av_batches", "toy_av_data", "train_toy_av"]

CLASSES = 10
AUDIO_SAMPLES = 256
IMAGE_SIZE = 16


def toy_av_data(
    n: int, *, seed: int = 0, audio_noise: float = 2.0, video_noise: float = 2.5
) -> tuple[dict[str, Tensor], Tensor]:
    """``n`` labelled requests: audio is a class-pitched tone, video a class template, both noisy."""
    coarse = torch.randn(CLASSES, 1, 4, 4, generator=torch.Generator().manual_seed(1234))
    templates = nn.functional.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    t = torch.linspace(0.0, 1.0, AUDIO_SAMPLES)
    freq = (4.0 + 3.0 * labels.to(torch.float32))[:, None]
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    audio = torch.sin(2 * math.pi * freq * t + phase) + audio_noise * torch.randn(
        n, AUDIO_SAMPLES, generator=gen
    )
    video = templates[labels] + video_noise * torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return {"audio": audio[:, None, :], "video": video}, labels


def toy_av_batches(n: int, batch_size: int, *, seed: int = 1) -> list[tuple[dict[str, Tensor], Tensor]]:
    """Validation batches in the ``(inputs, target)`` form ``mosel.profile`` reads."""
    inputs, labels = toy_av_data(n, seed=seed)
    return [
        ({m: x[i : i + batch_size] for m, x in inputs.items()}, labels[i : i + batch_size])
        for i in range(0, n, batch_size)
    ]


@multimodal
class ToyAV(nn.Module):
    """Audio (cheap) + video (costly) classifier with a fusion head that tolerates a missing modality."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.audio = nn.Sequential(
            nn.Conv1d(1, 16, 9, stride=4),
            nn.ReLU(),
            nn.Conv1d(16, 32, 9, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(32, 64),
        )
        self.video = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 64),
        )
        self.missing = nn.ParameterDict(
            {"audio": nn.Parameter(torch.zeros(64)), "video": nn.Parameter(torch.zeros(64))}
        )
        self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    @modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        """Audio branch: (B, 1, 256) -> (B, 64)."""
        features: Tensor = self.audio(audio)
        return features

    @modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        """Video branch: (B, 1, 16, 16) -> (B, 64)."""
        features: Tensor = self.video(video)
        return features

    @fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """Fusion head: a learned placeholder stands in for a missing modality."""
        rows = next(iter(features.values())).shape[0]
        parts = [
            features[m] if m in features else self.missing[m].expand(rows, -1) for m in ("audio", "video")
        ]
        logits: Tensor = self.head(torch.cat(parts, dim=1))
        return logits

    def forward(self, audio: Tensor, video: Tensor) -> Tensor:
        """Both modalities, as an ordinary module would be called."""
        return self.fuse({"audio": self.encode_audio(audio), "video": self.encode_video(video)})


@multimodal
class Passthrough(nn.Module):
    """Audio and video branches that cost nothing.

    For simulations (only the profile matters) and for measuring mosel's own per-call cost.
    The output is one column per request.
    """

    @modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        """Identity."""
        return audio

    @modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        """Identity."""
        return video

    @fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        """The first column of the first feature present."""
        return next(iter(features.values())).flatten(1)[:, :1]


def train_toy_av(
    model: ToyAV, *, samples: int = 3000, epochs: int = 6, seed: int = 0, drop_p: float = 0.6
) -> ToyAV:
    """Train with modality dropout (each batch drops one modality with probability ``drop_p``)."""
    torch.manual_seed(seed)
    inputs, labels = toy_av_data(samples, seed=seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(samples, generator=gen)
        for i in range(0, samples, 64):
            idx = order[i : i + 64]
            feats = {
                "audio": model.encode_audio(inputs["audio"][idx]),
                "video": model.encode_video(inputs["video"][idx]),
            }
            r = float(torch.rand((), generator=gen))
            if r < drop_p / 2:
                del feats["audio"]
            elif r < drop_p:
                del feats["video"]
            loss = nn.functional.cross_entropy(model.fuse(feats), labels[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    return model.eval()


def synthetic_profile(
    model: nn.Module | type[nn.Module],
    *,
    branch_us: Mapping[str, Sequence[float]],
    accuracy: Mapping[str, float],
    fusion_us: Mapping[str, Sequence[float]] | None = None,
    sample_count: int = 1000,
    planner: PlannerConfig | None = None,
    sized_us: Mapping[str, Mapping[int, Sequence[float]]] | None = None,
) -> Profile:
    """A profile from given tables instead of measurements (deterministic tests, simulations).

    Args:
        model: the model (its fingerprint is taken) or its class (a placeholder fingerprint).
        branch_us: modality -> latency in microseconds for batch sizes ``1..max_batch_size``.
        accuracy: configuration written ``"audio+video"`` -> accuracy, for every configuration.
        fusion_us: like ``branch_us`` per configuration; default 0 for every size.
        sample_count: the validation size the accuracies claim.
        planner: planner settings.
        sized_us: for modalities priced per input size: size bucket edge -> latency table like
            ``branch_us``'s; the first bucket is the reference (its table replaces the
            modality's ``branch_us`` entry). Buckets are the spec's (``size=``, ``buckets=``)
            when declared, else the given edges.
    """
    spec = spec_of(model)
    sized_us = sized_us or {}
    tables = dict(branch_us) | {m: next(iter(sized_us[m].values())) for m in sized_us}
    sizes = {len(t) for t in tables.values()} | {len(t) for by in sized_us.values() for t in by.values()}
    if len(sizes) != 1 or set(tables) != set(spec.modalities):
        raise ValueError("branch_us (or sized_us) needs one table per modality, all of the same length")
    max_batch = sizes.pop()
    by_key = {configuration_key(c, spec.modalities): c for c in spec.configurations}

    def table(values: Sequence[float]) -> LatencyTable:
        return LatencyTable(
            tuple(float(v) for v in values), tuple(float(v) for v in values), tuple(range(1, max_batch + 1))
        )

    branch = {m: table(tables[m]) for m in spec.modalities}
    fusion_tables = {c: table((fusion_us or {}).get(k, [0.0] * max_batch)) for k, c in by_key.items()}
    acc = {by_key[k]: float(v) for k, v in accuracy.items()}
    if set(acc) != set(spec.configurations):
        raise ValueError(f"accuracy needs every configuration: {sorted(by_key)}")
    if isinstance(model, nn.Module):
        fingerprint = fingerprint_of(model, spec.model_class)
    else:
        fingerprint = Fingerprint("synthetic", torch.__version__, spec.model_class, "synthetic")
    plan = build_plan(cost_model_of(spec.modalities, branch, fusion_tables, acc), planner)
    sized = {
        m: SizedLatency(
            spec.sizings[m].buckets if m in spec.sizings else tuple(sorted(by_edge)),
            next(iter(by_edge)),
            MappingProxyType({edge: table(values) for edge, values in by_edge.items()}),
        )
        for m, by_edge in ((m, sized_us[m]) for m in spec.modalities if m in sized_us)  # declaration order
    }
    profile = Profile(
        modalities=spec.modalities,
        max_batch_size=max_batch,
        branch_latency=MappingProxyType(branch),
        fusion_latency=MappingProxyType(fusion_tables),
        accuracy=MappingProxyType(acc),
        sample_count=sample_count,
        fingerprint=fingerprint,
        cost_checks=(),
        plan=plan,
        sized=MappingProxyType(sized),
    )
    return plan_buckets(profile, planner) if sized else profile
