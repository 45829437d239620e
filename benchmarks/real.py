"""The benchmark's live mode: the AV-Digits model serves real traces on this machine.

The model is profiled now, on ``device`` (a profiler warning stops the run); every policy serves
the same traces, repeated in a rotated order so that a drift of the machine favours none; the
tables give medians over repeats with the min-max of violations. Accuracy is also measured
against the labels. Live figures depend on the machine and its load: they are measured, not
reproducible to the digit.

Every real run is then replayed through the simulator, so that what the simulator promises sits
beside what the service got, and the gap is decomposed step by step (see :func:`decompose`):
exact predictions, the profile's bias, the spread of execution times, the per-batch dispatch
overhead, and the driver's lag behind the trace, each as recorded by that real run.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch
from common import config_for
from conditions import CONDITIONS, Conditions, arrivals_for, metrics
from replay import RealJob, Replayed, replay, with_inputs
from scenarios import av_digits_model, av_digits_slack_ms

import mosel

POLICIES = (
    "agnostic",
    "agnostic_plus",
    "aggressive",
    "greedy",
    "mosel",
    "paper",
    "mosel q=0.7",
    "mosel q=0.9",
)
"""Every policy at the default latency quantile, and mosel priced further into the tail."""
FULL_EXTRA = ("mosel q=0.95", "mosel q=0.99")
STEPS = ("exact", "+bias", "+spread", "+overhead", "+lag", "+phases")


def decompose(
    profile: mosel.Profile,
    arrivals: list[mosel.Arrival],
    run: Replayed,
    config: mosel.SchedulerConfig,
    conditions: Conditions,
    seconds: float,
    seed: int,
) -> dict[str, float]:
    """Violation ratios of the simulator replaying one real run, adding its effects one at a time.

    ``exact``: the profile's predictions; ``+bias``: every batch at the run's median
    measured/predicted ratio; ``+spread``: ratios drawn at random from the run's; ``+overhead``:
    plus its per-batch dispatch overheads; ``+lag``: jobs arrive when the real driver submitted
    them; ``+phases``: each batch gets the residuals of the real batch nearest in time (the
    machine's slow spells when they happened), the closest replay of the run.
    """
    residuals = run.residuals or mosel.Residuals.exact()
    lagged = [dataclasses.replace(a, time_s=s) for a, s in zip(arrivals, run.submitted_s)]
    variants: dict[str, tuple[mosel.Residuals | None, list[mosel.Arrival]]] = {
        "exact": (None, arrivals),
        "+bias": (mosel.Residuals((residuals.bias,)), arrivals),
        "+spread": (mosel.Residuals(residuals.ratios), arrivals),
        "+overhead": (residuals.independent(), arrivals),
        "+lag": (residuals.independent(), lagged),
        "+phases": (residuals, lagged),
    }
    out = {}
    for step, (sample, trace) in variants.items():
        sim = mosel.simulate(profile, trace, config, residuals=sample, seed=seed)
        out[step] = metrics(sim, seconds, conditions)["violation_ratio"]
    return out


def calibrate(model: Any, profile: mosel.Profile, test: Any, repeats: int = 7) -> float:
    """Served all-modality latency over the profile's prediction (median over jobs of 1-8 requests).

    The live workload's load and deadlines are defined against it, so that "1.0x" is the
    capacity the machine has now, not what the profile's estimator (a low quantile of its
    timings) or a calmer moment promised.
    """
    everything = frozenset(profile.modalities)
    mosel.attach(model, profile)
    ratios = []
    for n in range(1, 9):
        inputs = test.inputs(torch.arange(n))
        predicted_ms = profile.plan.frontier(everything, n).best.predicted_latency_ms
        for _ in range(repeats):
            ratios.append(model.infer(inputs).completion_ms / predicted_ms)
    mosel.close(model)
    return statistics.median(ratios)


def labelled_config(label: str, conditions: Conditions) -> mosel.SchedulerConfig:
    """``"policy"``, ``"policy q=0.75"`` (a latency quantile), ``"mosel b=0.01"`` (a miss budget)
    or both, as a configuration."""
    policy, *knobs = label.split()
    names = {"q": "latency_quantile", "b": "miss_budget"}
    values: dict[str, float] = {}
    for knob in knobs:
        key, _, value = knob.partition("=")
        if key not in names or not value:
            raise ValueError(
                f"policy label {label!r}: unknown knob {knob!r}; use q=<quantile> or b=<miss budget>"
            )
        values[names[key]] = float(value)
    return config_for(policy, conditions, **values)


def real_mode(
    device: str,
    seed: int = 0,
    full: bool = False,
    repeats: int | None = None,
    seconds: float | None = None,
    loads: tuple[float, ...] | None = None,
    labels: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Every policy serving the same live AV-Digits traces (strict conditions, bursty arrivals)."""
    built = av_digits_model(device)
    if built is None:
        print("real mode skipped: espeak-ng is needed to build AV-Digits")
        return {}
    model, profile, test = built
    assert profile is not None
    conditions = CONDITIONS["strict-bursty"]
    speed = calibrate(model, profile, test)
    slack_ms = av_digits_slack_ms(profile) * speed
    seconds = seconds or (20.0 if full else 5.0)
    repeats = repeats or (5 if full else 3)
    loads = loads or ((0.5, 1.0, 1.5) if full else (1.0,))
    out: dict[str, Any] = {
        "device": device,
        "seconds": seconds,
        "repeats": repeats,
        "slack_ms": slack_ms,
        "calibration": speed,
        "loads": {},
    }
    labels = labels or (POLICIES + FULL_EXTRA if full else POLICIES)
    for load in loads:
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in labels}
        gaps: dict[str, list[dict[str, float]]] = {p: [] for p in labels}
        for r in range(repeats):
            # Load and deadlines are relative to the all-modality latency as served now, not as
            # profiled: the same trace is then 1.0x capacity whatever the profile's estimator.
            arrivals = [
                dataclasses.replace(a, deadline_ms=(a.deadline_ms or 0.0) * speed)
                for a in arrivals_for(
                    profile, conditions, load / speed, seconds, seed + r,
                    slack_ms=slack_ms / speed, drop=0.06, phase_s=1.0,
                )
            ]  # fmt: skip
            jobs: list[RealJob] = with_inputs(arrivals, test, seed + r)
            for policy in labels[r % len(labels) :] + labels[: r % len(labels)]:
                config = labelled_config(policy, conditions)
                run = replay(model, profile, jobs, config)
                runs[policy].append(run.metrics)
                gaps[policy].append(decompose(profile, arrivals, run, config, conditions, seconds, seed + r))
        medians = {p: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for p, ms in runs.items()}
        gap_medians = {p: {k: statistics.median(g[k] for g in gs) for k in STEPS} for p, gs in gaps.items()}
        out["loads"][f"{load:g}"] = {"policies": medians, "runs": runs, "simulated": gaps}
        print(
            f"\nlive mode, av-digits on {device}: load {load:g} of the served all-modality capacity "
            f"(profile x {speed:.2f}), bursty, slack {slack_ms:.1f} ms, "
            f"{repeats} x {seconds:.0f} s per policy (about {medians[labels[0]]['jobs']:.0f} jobs each); "
            f"medians over repeats; latency_quantile {mosel.SchedulerConfig().latency_quantile}"
        )
        print(
            "| policy | goodput rps | violations [min-max] | simulated (recorded residuals) | "
            "JCT p50 | JCT p99 | expected acc | measured acc |"
        )
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for policy, m in medians.items():
            spread = [v["violation_ratio"] for v in runs[policy]]
            print(
                f"| {policy} | {m['goodput_rps']:.1f} | {m['violation_ratio']:.1%} [{min(spread):.1%}-"
                f"{max(spread):.1%}] | {gap_medians[policy]['+phases']:.1%} | {m['jct_p50_ms']:.2f} | "
                f"{m['jct_p99_ms']:.2f} | {m['expected_accuracy']:.4f} | {m['measured_accuracy']:.4f} |"
            )
        print(
            "\nthe real-vs-simulated gap, step by step (violations, medians over repeats): the simulator "
            "replays each real trace adding the run's own measured effects one at a time"
        )
        print("| policy | " + " | ".join(STEPS) + " | real |")
        print("|---|" + "---:|" * (len(STEPS) + 1))
        for policy in labels:
            cells = " | ".join(f"{gap_medians[policy][s]:.1%}" for s in STEPS)
            print(f"| {policy} | {cells} | {medians[policy]['violation_ratio']:.1%} |")
        print(
            f"\naccuracy against the labels per 1 s window (windows of at least 50 served requests; "
            f"floor {jobs[0].min_accuracy}), medians over repeats"
        )
        print(
            "| policy | measured acc | worst window measured | worst window expected | windows below floor |"
        )
        print("|---|---:|---:|---:|---:|")
        for policy, m in medians.items():
            print(
                f"| {policy} | {m['measured_accuracy']:.4f} | {m['window_accuracy_min']:.4f} | "
                f"{m['window_expected_min']:.4f} | {m['windows_below_floor']:.0%} |"
            )
        print("\nwhere the time went (medians over repeats of each run's p50 / p99)")
        print(
            "| policy | profile bias | ratio p90/p50 | overhead p50 ms | submit lag p50/p99 ms | "
            "queue p50/p99 ms | execution p50 ms | hand-off p50/p99 ms | margin |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for policy, m in medians.items():
            print(
                f"| {policy} | {m['profile_bias']:.3f} | {m['ratio_p90']:.3f} | {m['overhead_p50_ms']:.3f} | "
                f"{m['submit_lag_p50_ms']:.2f}/{m['submit_lag_p99_ms']:.2f} | "
                f"{m['queue_p50_ms']:.2f}/{m['queue_p99_ms']:.2f} | {m['execution_p50_ms']:.2f} | "
                f"{m['handoff_p50_ms']:.3f}/{m['handoff_p99_ms']:.3f} | {m['latency_margin']:.3f} |"
            )
    return out
