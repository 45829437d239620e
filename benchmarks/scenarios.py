"""Benchmark scenarios: profiles to simulate against, and how their workloads are shaped."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    residuals: mosel.Residuals  # what each simulated batch's time is drawn from (as recorded)
    residuals_source: str
    body: mosel.Residuals | None = None  # the residuals without their stalls (None: no fit)
    stalls: mosel.Stalls | None = None  # the stalls fitted from them (``benchmarks/stalls.py``)

    def machine(self, stalls: bool = True) -> dict[str, Any]:
        """``simulate``'s machine keywords: the body and the fitted stalls (``stalls=False``: the
        body alone); as recorded when nothing was fitted."""
        if self.body is None:
            return {"residuals": self.residuals}
        return {"residuals": self.body, "stalls": self.stalls if stalls else None}

    def machine_source(self, stalls: bool = True) -> str:
        """How batch times are drawn, in words."""
        if self.body is None or self.stalls is None:
            return self.residuals_source
        fitted = self.stalls
        what = (
            f"stalls at {fitted.rate_per_s:.3g}/s of device time, {'/'.join(f'{v:.0f}' for v in fitted.lengths_ms)} ms "
            f"(fitted: {fitted.observed} in {fitted.device_s:.1f} s)"
            if stalls
            else "stalls off"
        )
        return f"{self.residuals_source} less {fitted.observed} stall(s); {what}"


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
    return Scenario(
        "paper-tvlt", profile, slack_ms=17.0, drop=0.03, residuals=mosel.Residuals.exact(),
        residuals_source="exact (a synthetic profile: nothing was measured)",
    )  # fmt: skip


def av_digits_model(
    device: str = "cpu", epochs: int = 6, *, profile: bool = True
) -> tuple[nn.Module, mosel.Profile | None, object] | None:
    """The demo's from-scratch AV-Digits model (weights cached in ``.cache``), its test split, and
    a profile measured now on ``device`` (``profile=False``: none); None without espeak-ng.

    A profiler warning (a cost model that predicts poorly, e.g. on a busy machine) is an error
    here: the benchmark stops rather than measure against a bad profile.
    """
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
    if not profile:
        return model, None, test
    with warnings.catch_warnings():
        warnings.simplefilter("error", mosel.MoselWarning)  # a profile this noisy is no baseline: stop
        # Shown, not fatal: the test split's rows are fewer than escalation's calibration wants
        # (the live mode serves without chains; the simulated benchmark reads a committed profile).
        warnings.filterwarnings("default", "per-row escalation is calibrated on", mosel.MoselWarning)
        measured = mosel.profile(
            model, test.batches(100), max_batch_size=32,
            batch_sizes=[1, 2, 4, 8, 12, 16, 24, 32], repeats=7, progress=False,
        )  # fmt: skip
    return model, measured, test


AV_DIGITS_PROFILE = Path(__file__).resolve().parent / "profiles" / "av-digits.profile.json"
"""The AV-Digits profile the simulated benchmark uses (committed; see ``profiles/README.md``)."""
AV_DIGITS_RESIDUALS = Path(__file__).resolve().parent / "profiles" / "av-digits.residuals.json"
"""Execution-time residuals and overheads recorded serving AV-Digits live (``record_residuals.py``)."""
AV_DIGITS_STALLS = Path(__file__).resolve().parent / "profiles" / "av-digits.stalls.json"
"""The stalls separated from those residuals, their rate and lengths (``stalls.py``)."""


def av_digits() -> Scenario:
    """The demo's from-scratch AV-Digits model, as profiled once and committed (machine-independent);
    batch times drawn from the residuals recorded serving it live (the profile's own spread if absent)."""
    profile = mosel.Profile.load(AV_DIGITS_PROFILE)
    if AV_DIGITS_RESIDUALS.exists():
        residuals = mosel.Residuals.from_json(json.loads(AV_DIGITS_RESIDUALS.read_text()))
        source = f"recorded live ({AV_DIGITS_RESIDUALS.name}, {len(residuals.ratios)} batches)"
    else:
        residuals, source = mosel.Residuals.from_profile(profile), "the profile's p95/median spread"
    body = stalls = None
    if AV_DIGITS_RESIDUALS.exists() and AV_DIGITS_STALLS.exists():
        fitted = json.loads(AV_DIGITS_STALLS.read_text())
        removed = set(fitted["removed"])
        body = mosel.Residuals(
            tuple(r for i, r in enumerate(residuals.ratios) if i not in removed),
            tuple(o for i, o in enumerate(residuals.overhead_us) if i not in removed),
        )
        stalls = mosel.Stalls.from_json(fitted["stalls"])
    return Scenario(
        "av-digits", profile, slack_ms=av_digits_slack_ms(profile), drop=0.06, residuals=residuals,
        residuals_source=source, body=body, stalls=stalls,
    )  # fmt: skip


def av_digits_slack_ms(profile: mosel.Profile) -> float:
    """Three times the mean all-modality latency of jobs of 1..8 requests."""
    everything = frozenset(profile.modalities)
    mean_full_ms = (
        sum(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in range(1, 9)) / 8
    )
    return 3 * mean_full_ms


@mosel.multimodal
class TextImage(nn.Module):
    """A stand-in for the worked example's model: text priced per padded length, image fixed."""

    @mosel.modality("text", size=lambda x: x.shape[-1], buckets=(24, 64, 128, 256))
    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @mosel.modality("image")
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @mosel.fusion
    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return next(iter(features.values()))


def text_sized() -> Scenario:
    """A synthetic profile with size buckets (issue 24, goal 6): text costs grow with its padded
    length (24 to 256 tokens, about the worked example's shape in ``docs/benchmarks.md``), image
    costs are fixed; the deadline is priced at the shortest bucket, so that long texts can keep
    text only in small jobs. Exact batch times."""
    rows = range(1, 9)
    text = {
        24: [500.0 + 100.0 * b for b in rows],
        64: [600.0 + 300.0 * b for b in rows],
        128: [900.0 + 700.0 * b for b in rows],
        256: [2000.0 + 2200.0 * b for b in rows],
    }
    profile = synthetic_profile(
        TextImage,
        branch_us={"image": [300.0 + 50.0 * b for b in rows]},
        sized_us={"text": text},
        accuracy={"text": 0.70, "image": 0.64, "text+image": 0.80},
    )
    return Scenario(
        "text-sized", profile, slack_ms=4.5, drop=0.2, residuals=mosel.Residuals.exact(),
        residuals_source="exact (a synthetic profile with size buckets)",
    )  # fmt: skip


_SCENARIOS: dict[str, Scenario] = {}


def scenario_named(name: str) -> Scenario:
    """A scenario by name, built once per process."""
    if name not in _SCENARIOS:
        builders = {"paper-tvlt": paper_tvlt, "av-digits": av_digits, "text-sized": text_sized}
        _SCENARIOS[name] = builders[name]()
    return _SCENARIOS[name]
