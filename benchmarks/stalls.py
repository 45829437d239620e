"""Fit the AV-Digits machine's stalls from its recorded residuals (``profiles/av-digits.residuals.json``).

The recorded sample holds, per live batch, its measured over profiled execution time (the ratio,
median-normalised) and its dispatch overhead; nothing else (no batch times, no predictions). Its
ratios have a body (p50 1.00, p90 1.21, p99 1.54, the largest but one 2.18) and rare outliers far
from it (one batch at 18.8x). A stall is a ratio whose log lies more than 10 robust standard
deviations above the median (``mosel.machine.stall_indices``; any fence between 2.2x and 18.8x
gives the same split on this sample). Its length is its excess over the body's median times the
predicted time of a typical recorded batch; its rate is the stall count over the sample's device
time.

The sample does not say how long its batches ran, so the device time and the typical predicted
batch are estimated by simulating the recording's own workload (what ``record_residuals.py``
served: bursty 1.0x traces of 10 s, seeds 50-52, 1 s phases, the default policy) on the committed
profile with the fitted body: device time = recorded batches x the simulated mean busy time per
batch (execution plus overhead). The recording kept the last 256 batches of each of its 3 runs
(the tail model's window then; it keeps 4,096 now), of about 1,000 each in the replay: the sample
covers 768 batches' device time, not the runs' 30 s.

Run: python benchmarks/stalls.py [--write]   (writes profiles/av-digits.stalls.json)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditions import CONDITIONS, arrivals_for
from scenarios import AV_DIGITS_PROFILE, AV_DIGITS_RESIDUALS, AV_DIGITS_STALLS, av_digits_slack_ms

import mosel
from mosel.machine import FENCE_SIGMAS, Machine, fit_stalls, stall_indices


def recording_replay(profile: mosel.Profile, body: mosel.Residuals) -> dict[str, float]:
    """Simulate ``record_residuals.py``'s workload: batches, mean predicted and busy time per batch."""
    predicted: list[float] = []
    busy: list[float] = []
    original = Machine.batch

    def counted(self: Machine, start_s: float, predicted_us: float) -> tuple[float, float]:
        exec_us, overhead_us = original(self, start_s, predicted_us)
        predicted.append(predicted_us)
        busy.append(exec_us + overhead_us)
        return exec_us, overhead_us

    Machine.batch = counted  # type: ignore[method-assign]
    try:
        for r in range(3):
            arrivals = arrivals_for(
                profile, CONDITIONS["strict-bursty"], 1.0, 10.0, 50 + r,
                slack_ms=av_digits_slack_ms(profile), drop=0.06, phase_s=1.0,
            )  # fmt: skip
            mosel.simulate(profile, arrivals, mosel.SchedulerConfig(), residuals=body, seed=50 + r)
    finally:
        Machine.batch = original  # type: ignore[method-assign]
    return {
        "batches": float(len(predicted)),
        "predicted_us_mean": statistics.fmean(predicted),
        "busy_us_mean": statistics.fmean(busy),
    }


def poisson_interval(count: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) confidence interval of a Poisson mean from one observed count."""
    from scipy.stats import chi2

    alpha = 1 - level
    low = 0.0 if count == 0 else chi2.ppf(alpha / 2, 2 * count) / 2
    return float(low), float(chi2.ppf(1 - alpha / 2, 2 * count + 2) / 2)


def fit() -> dict[str, Any]:
    """The fit, its inputs and its checks, as written to ``av-digits.stalls.json``."""
    data = json.loads(AV_DIGITS_RESIDUALS.read_text())
    sample = mosel.Residuals.from_json(data)
    profile = mosel.Profile.load(AV_DIGITS_PROFILE)
    out = stall_indices(sample.ratios)
    body_ratios = [r for i, r in enumerate(sample.ratios) if i not in out]
    body = mosel.Residuals(
        tuple(body_ratios), tuple(o for i, o in enumerate(sample.overhead_us) if i not in out)
    )
    replay = recording_replay(profile, body)
    device_s = len(sample.ratios) * replay["busy_us_mean"] / 1e6
    fitted_body, stalls = fit_stalls(sample, device_s=device_s, predicted_us=replay["predicted_us_mean"])
    assert fitted_body.ratios == body.ratios
    low, high = poisson_interval(len(out))
    logs = [math.log(r) for r in sample.ratios]
    centre = statistics.median(logs)
    scale = 1.4826 * statistics.median(abs(v - centre) for v in logs)
    ordered = sorted(body_ratios)
    return {
        "stalls": stalls.to_json(),
        "removed": sorted(out),
        "method": {
            "fence_sigmas": FENCE_SIGMAS,
            "fence_ratio": math.exp(centre + FENCE_SIGMAS * scale),
            "log_ratio_median": centre,
            "log_ratio_robust_sigma": scale,
            "stall_sigmas": [(logs[i] - centre) / scale for i in out],
            "largest_body_ratio": ordered[-1],
            "largest_body_sigmas": (math.log(ordered[-1]) - centre) / scale,
            "rate_95_interval_per_s": [low / device_s, high / device_s],
            "device_s_estimate": "recorded batches x simulated mean busy time per batch",
            "replay": replay | {"recorded_batches": len(sample.ratios)},
        },
        "body": {
            "batches": len(body_ratios),
            "ratio_p50": statistics.median(ordered),
            "ratio_p90": ordered[int(0.9 * (len(ordered) - 1))],
            "ratio_p99": ordered[int(0.99 * (len(ordered) - 1))],
            "overhead_ms_p50": statistics.median(body.overhead_us) / 1e3,
            "overhead_ms_max": max(body.overhead_us) / 1e3,
        },
        "recorded": data.get("recorded", {}),
        "command": "python benchmarks/stalls.py --write",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {AV_DIGITS_STALLS.name}")
    args = parser.parse_args()
    result = fit()
    stalls, method = result["stalls"], result["method"]
    replay = method["replay"]
    print(
        f"{AV_DIGITS_RESIDUALS.name}: {replay['recorded_batches']} batches recorded "
        f"({result['recorded'].get('machine', '?')}, {result['recorded'].get('date', '?')}); "
        f"log-ratio median {method['log_ratio_median']:.3f}, robust sigma {method['log_ratio_robust_sigma']:.3f}, "
        f"fence {method['fence_sigmas']:g} sigma = {method['fence_ratio']:.2f}x"
    )
    print(
        f"stalls: {stalls['observed']} at {', '.join(f'{s:.1f}' for s in method['stall_sigmas'])} sigma; "
        f"largest body ratio {method['largest_body_ratio']:.2f}x ({method['largest_body_sigmas']:.1f} sigma)"
    )
    print(
        f"recording replayed in simulation: {replay['batches']:.0f} batches in 3 runs (the sample kept the "
        f"last 256 of each: {replay['recorded_batches']}), mean predicted execution {replay['predicted_us_mean'] / 1e3:.2f} ms, "
        f"mean busy time {replay['busy_us_mean'] / 1e3:.2f} ms per batch"
    )
    print(
        f"fit: rate {stalls['rate_per_s']:.3f} per second of device time over {stalls['device_s']:.2f} s "
        f"(95% interval {method['rate_95_interval_per_s'][0]:.4f}-{method['rate_95_interval_per_s'][1]:.3f}); "
        f"lengths {', '.join(f'{v:.1f}' for v in stalls['lengths_ms'])} ms"
    )
    body = result["body"]
    print(
        f"body: {body['batches']} batches, ratio p50/p90/p99 {body['ratio_p50']:.3f}/{body['ratio_p90']:.3f}/"
        f"{body['ratio_p99']:.3f}, overhead p50 {body['overhead_ms_p50']:.3f} ms (max {body['overhead_ms_max']:.2f})"
    )
    if args.write:
        AV_DIGITS_STALLS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {AV_DIGITS_STALLS}")


if __name__ == "__main__":
    main()
