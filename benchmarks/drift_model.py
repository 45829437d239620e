"""The drift detectors of AV-Digits' monitor as a vectorised model: false alarms and delays by threshold.

The same 30 down detectors as :class:`mosel.monitoring.Monitor` builds for the committed profile
(3 per configuration, 3 pooled per modality), stepped on many seeded label streams at once, at
a mix of labelled configurations (default: the drift benchmark's at 0.5x, half image+audio, half
all three, 1% image). Reported: the share of drift-free streams of ``--labels`` labels with a
false alarm at each threshold, and the median labels to the first alarm after the audio -15
drift (``benchmarks/profiles/av-digits.drift.json``), for the default mix and for the
"active testing" mix (40% audio alone, 60% all three: the most audio alone that meets a 0.75
floor at the profile's accuracies). docs/benchmarks.md ("Accuracy monitoring") quotes it.

Run: python benchmarks/drift_model.py [--streams 200] [--labels 100000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios import av_digits

from mosel.drift import DriftSettings, contributions

THRESHOLDS = (8.0, 10.0, 12.0, 12.5, 13.0, 14.0, 14.49, 15.0, 16.3)
Configuration = frozenset[str]


def detectors(
    accuracy: dict[Configuration, float], configs: list[Configuration]
) -> tuple[np.ndarray, np.ndarray]:
    """Each detector's increment on a correct and on a wrong label, per configuration: (configs, detectors) x 2."""
    settings, clamp = DriftSettings(), 1e-4
    index = {c: i for i, c in enumerate(configs)}

    def llr(p0: float, p1: float) -> tuple[float, float]:
        p0, p1 = min(max(p0, clamp), 1 - clamp), min(max(p1, clamp), 1 - clamp)
        return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))

    columns = [
        {c: llr(accuracy[c], accuracy[c] - d)}
        for c in configs
        for d in settings.deltas
        if accuracy[c] - d > clamp
    ]
    for added in contributions(accuracy).values():
        mean = sum(added.values()) / len(added)
        for share in sorted({min(d / mean, 1.0) for d in settings.deltas}):
            columns.append({c: llr(accuracy[c], accuracy[c] - share * a) for c, a in added.items()})
    win, fail = np.zeros((len(configs), len(columns))), np.zeros((len(configs), len(columns)))
    for j, column in enumerate(columns):
        for c, (w, f) in column.items():
            win[index[c], j], fail[index[c], j] = w, f
    return win, fail


def run(mix: np.ndarray, before: np.ndarray, after: np.ndarray, n_before: int, n_after: int,
        streams: int, seed: int, win: np.ndarray, fail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per stream: the highest statistic before the drift, and the labels after it to reach each threshold."""
    rng = np.random.default_rng(seed)
    stat = np.zeros((streams, win.shape[1]))
    highest = np.zeros(streams)
    hs = np.asarray(THRESHOLDS)
    first = np.full((streams, len(hs)), -1)
    for t in range(n_before + n_after):
        c = rng.choice(len(mix), size=streams, p=mix)
        correct = (rng.random(streams) < (before if t < n_before else after)[c])[:, None]
        stat = np.maximum(stat + np.where(correct, win[c], fail[c]), 0.0)
        top = stat.max(axis=1)
        if t < n_before:
            np.maximum(highest, top, out=highest)
        else:
            hit = (top[:, None] >= hs[None, :]) & (first < 0)
            first[hit] = t - n_before + 1
    return highest, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--labels", type=int, default=100_000)
    args = parser.parse_args()
    profile = av_digits().profile
    configs = sorted(profile.accuracy, key=profile.key)
    accuracy = dict(profile.accuracy)
    table = json.loads((Path(__file__).resolve().parent / "profiles" / "av-digits.drift.json").read_text())[
        "snr_db"
    ]
    base, moved = table["-4.0"], table["-13.0"]
    before = np.array([accuracy[c] for c in configs])
    after = np.array(
        [accuracy[c] + moved[profile.key(c)]["accuracy"] - base[profile.key(c)]["accuracy"] for c in configs]
    )
    win, fail = detectors(accuracy, configs)
    mixes = {
        "benchmark mix (image+audio .495, all three .495, image .01)": {"image+audio": 0.495, "image+audio+video": 0.495, "image": 0.01},
        "active testing (audio .4, all three .6)": {"audio": 0.4, "image+audio+video": 0.6},
    }  # fmt: skip
    for name, shares in mixes.items():
        mix = np.array([shares.get(profile.key(c), 0.0) for c in configs])
        mix /= mix.sum()
        highest, _ = run(mix, before, before, args.labels, 0, args.streams, 1, win, fail)
        _, first = run(mix, before, after, 1500, 2500, args.streams, 7, win, fail)
        print(f"{name}: {win.shape[1]} detectors, {args.streams} streams")
        for j, h in enumerate(THRESHOLDS):
            delays = np.where(first[:, j] < 0, np.iinfo(np.int64).max, first[:, j])
            print(f"  threshold {h:5.2f}: false alarm in {args.labels} drift-free labels in "
                  f"{100 * float(np.mean(highest >= h)):.1f}% of streams; audio -15: median "
                  f"{int(np.median(delays))} labels to the first alarm", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
