"""Record the AV-Digits model's execution-time residuals on this machine, for the simulator.

The model is profiled now and serves a bursty 1.0x trace with the default policy for a few
repeats; every batch's measured execution over its profiled prediction and its dispatch overhead
are kept (``mosel.stats(model).residuals``). The ratios are divided by their median, so the file
holds this machine's *spread* and overhead, not the bias of one profiling run (the committed
profile is the simulated machine's median). The simulated benchmark draws every AV-Digits batch's
time from this file.

Run: python benchmarks/record_residuals.py [--device cpu] [--seconds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditions import CONDITIONS, arrivals_for
from replay import replay, with_inputs
from scenarios import AV_DIGITS_RESIDUALS, av_digits_model, av_digits_slack_ms

import mosel
from mosel.tail import merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    built = av_digits_model(args.device)
    if built is None:
        raise SystemExit("espeak-ng is needed to build AV-Digits")
    model, profile, test = built
    assert profile is not None
    samples = []
    for r in range(args.repeats):
        arrivals = arrivals_for(
            profile, CONDITIONS["strict-bursty"], 1.0, args.seconds, 50 + r,
            slack_ms=av_digits_slack_ms(profile), drop=0.06, phase_s=1.0,
        )  # fmt: skip
        run = replay(model, profile, with_inputs(arrivals, test, 50 + r), mosel.SchedulerConfig())
        assert run.residuals is not None
        samples.append(run.residuals)
    recorded = merge(samples)
    bias = recorded.bias
    normalised = mosel.Residuals(tuple(r / bias for r in recorded.ratios), recorded.overhead_us)
    data = normalised.to_json() | {
        "recorded": {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch": f"{torch.__version__}, {torch.get_num_threads()} thread(s)",
            "device": profile.fingerprint.device,
            "command": "python benchmarks/record_residuals.py " + " ".join(sys.argv[1:]),
            "batches": len(recorded.ratios),
            "bias_removed": bias,
        }
    }
    AV_DIGITS_RESIDUALS.write_text(json.dumps(data, indent=1) + "\n")
    ratios = sorted(normalised.ratios)
    print(f"wrote {AV_DIGITS_RESIDUALS}: {len(ratios)} batches, profile bias {bias:.3f} removed")
    print(
        f"ratio p10/p50/p90/p99: {normalised.ratio_quantile(0.1):.3f}/{normalised.ratio_quantile(0.5):.3f}/"
        f"{normalised.ratio_quantile(0.9):.3f}/{normalised.ratio_quantile(0.99):.3f}; overhead p50/p90 ms: "
        f"{statistics.median(normalised.overhead_us) / 1000:.3f}/"
        f"{sorted(normalised.overhead_us)[int(0.9 * (len(normalised.overhead_us) - 1))] / 1000:.3f}"
    )


if __name__ == "__main__":
    main()
