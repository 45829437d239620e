"""Measure the AV-Digits profile the simulated benchmark uses, and write it to ``profiles/``.

The simulated figures must be the same on every machine, so the profile is measured once and
committed (with the machine it was measured on in ``profiles/README.md``); the real mode measures
live. A profiler warning stops this script: re-run it on an idle machine.

Run: python benchmarks/profile_av_digits.py [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios import AV_DIGITS_PROFILE, av_digits_model, av_digits_slack_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    built = av_digits_model(args.device)
    if built is None:
        raise SystemExit("espeak-ng is needed to build AV-Digits")
    _, profile, _ = built
    assert profile is not None
    AV_DIGITS_PROFILE.parent.mkdir(parents=True, exist_ok=True)
    profile.save(AV_DIGITS_PROFILE)
    errors = sorted(abs(c.relative_error) for c in profile.cost_checks)
    print(f"wrote {AV_DIGITS_PROFILE}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'unknown CPU'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); device {profile.fingerprint.device}"
    )
    print(f"accuracy: { {profile.key(c): round(a, 4) for c, a in profile.accuracy.items()} }")
    print(
        f"cost checks: median error {errors[len(errors) // 2]:.1%}, max {errors[-1]:.1%} over {len(errors)}"
    )
    print(f"slack (3 x mean all-modality latency, jobs of 1..8): {av_digits_slack_ms(profile):.2f} ms")


if __name__ == "__main__":
    main()
