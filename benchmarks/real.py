"""The benchmark's live mode: the AV-Digits model serves real traces on this machine.

The model is profiled now, on ``device`` (a profiler warning stops the run); every policy serves
the same traces, repeated in a rotated order so that a drift of the machine favours none; the
tables give medians over repeats with the min-max of violations. Accuracy is also measured
against the labels. Live figures depend on the machine and its load: they are measured, not
reproducible to the digit.
"""

from __future__ import annotations

import statistics
from typing import Any

from conditions import CONDITIONS, arrivals_for
from replay import replay, with_inputs
from scenarios import av_digits_model, av_digits_slack_ms

POLICIES = ("agnostic", "agnostic_plus", "aggressive", "greedy", "mosel", "paper")


def real_mode(device: str, seed: int = 0, full: bool = False) -> dict[str, Any]:
    """Every policy serving the same live AV-Digits traces (strict conditions, bursty arrivals)."""
    from run import config_for

    built = av_digits_model(device)
    if built is None:
        print("real mode skipped: espeak-ng is needed to build AV-Digits")
        return {}
    model, profile, test = built
    assert profile is not None
    conditions = CONDITIONS["strict-bursty"]
    slack_ms = av_digits_slack_ms(profile)
    seconds, repeats = (20.0, 5) if full else (5.0, 3)
    loads = (0.5, 1.0, 1.5) if full else (1.0,)
    out: dict[str, Any] = {
        "device": device,
        "seconds": seconds,
        "repeats": repeats,
        "slack_ms": slack_ms,
        "loads": {},
    }
    for load in loads:
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
        for r in range(repeats):
            arrivals = arrivals_for(
                profile, conditions, load, seconds, seed + r, slack_ms=slack_ms, drop=0.06, phase_s=1.0
            )
            jobs = with_inputs(arrivals, test, seed + r)
            for policy in POLICIES[r % len(POLICIES) :] + POLICIES[: r % len(POLICIES)]:
                runs[policy].append(replay(model, profile, jobs, config_for(policy, conditions)))
        medians = {p: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for p, ms in runs.items()}
        out["loads"][f"{load:g}"] = {"policies": medians, "runs": runs}
        print(
            f"\nlive mode, av-digits on {device}: load {load:g}, bursty, slack {slack_ms:.1f} ms, "
            f"{repeats} x {seconds:.0f} s per policy (about {medians['mosel']['jobs']:.0f} jobs each); "
            f"medians over repeats"
        )
        print(
            "| policy | goodput rps | violations [min-max] | JCT p50 | JCT p99 | expected acc | measured acc |"
        )
        print("|---|---:|---|---:|---:|---:|---:|")
        for policy, m in medians.items():
            spread = [v["violation_ratio"] for v in runs[policy]]
            print(
                f"| {policy} | {m['goodput_rps']:.1f} | {m['violation_ratio']:.1%} [{min(spread):.1%}-"
                f"{max(spread):.1%}] | {m['jct_p50_ms']:.2f} | {m['jct_p99_ms']:.2f} | "
                f"{m['expected_accuracy']:.4f} | {m['measured_accuracy']:.4f} |"
            )
    return out
