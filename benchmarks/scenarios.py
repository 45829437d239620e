"""Benchmark scenarios: profiles to simulate against, and how their workloads are shaped."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import mosel
from mosel.testing import Passthrough, synthetic_profile

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "benchmarks"


@dataclass(frozen=True)
class Scenario:
    name: str
    profile: mosel.Profile
    slack_ms: float  # deadline = arrival + all-modality latency of the job + slack
    drop: float  # floor = best accuracy - drop


def paper_tvlt(max_batch: int = 32) -> Scenario:
    """TVLT numbers from the paper's code: 74.32% both, 72.33% audio only, 66.00% video only;
    audio only about 5.3x and video only about 1.4x cheaper than both (the notes' FLOP estimate).
    Latency of both modalities: 8 ms + 1.6 ms per request (a GPU-like, batching-friendly curve);
    the remainder of the joint encoder's cost is the fusion of the two-modality configuration."""
    full = [8000.0 + 1600.0 * b for b in range(1, max_batch + 1)]
    audio = [f / 5.3 for f in full]
    video = [f / 1.4 for f in full]
    profile = synthetic_profile(
        Passthrough,  # a stand-in for TVLT: only its profile matters in simulation
        branch_us={"audio": audio, "video": video},
        accuracy={"audio": 0.7233, "video": 0.6600, "audio+video": 0.7432},
        fusion_us={"audio+video": [f - a - v for f, a, v in zip(full, audio, video)]},
    )
    return Scenario("paper-tvlt", profile, slack_ms=17.0, drop=0.03)


def av_digits_model(device: str = "cpu", epochs: int = 6) -> tuple[nn.Module, mosel.Profile, object] | None:
    """The demo's from-scratch AV-Digits model (weights cached), profiled on ``device`` (cached),
    and its test split; None when the data is neither cached nor buildable (no espeak-ng)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from av_digits import data
    from av_digits import model as av_model

    CACHE.mkdir(parents=True, exist_ok=True)
    weights = CACHE / f"av-digits-{epochs}ep.pt"
    torch.set_num_threads(1)
    try:
        test = data.load("test")
        if weights.exists():
            model = av_model.AVDigitsNet()
            model.load_state_dict(torch.load(weights, weights_only=True))
            model.eval()
        else:
            model = av_model.train(data.load("train"), epochs=epochs)
            torch.save(model.state_dict(), weights)
    except data.MissingToolError:
        return None
    model.to(device)
    path = CACHE / f"av-digits-{epochs}ep-{device.replace(':', '')}.profile.json"
    if path.exists():
        mosel.attach(model, mosel.Profile.load(path))
        profile = mosel.profile_of(model)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mosel.MoselWarning)
            profile = mosel.profile(
                model, test.batches(100), max_batch_size=32,
                batch_sizes=[1, 2, 4, 8, 12, 16, 24, 32], repeats=5, progress=False,
            )  # fmt: skip
        profile.save(path)
    return model, profile, test


def av_digits(device: str = "cpu") -> Scenario | None:
    """The demo's from-scratch AV-Digits model, profiled on this machine (cached)."""
    built = av_digits_model(device)
    if built is None:
        return None
    profile = built[1]
    everything = frozenset(profile.modalities)
    mean_full_ms = (
        sum(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in range(1, 9)) / 8
    )
    return Scenario("av-digits", profile, slack_ms=3 * mean_full_ms, drop=0.06)
