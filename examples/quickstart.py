"""Quickstart: decorate a two-modality model, profile it on this machine, serve it under SLOs.

The model is mosel.testing.ToyAV: a cheap audio branch, a costly video branch and a fusion head,
trained here in seconds with modality dropout on a seeded synthetic ten-class task.
Run: python examples/quickstart.py
"""

from __future__ import annotations

import time

import torch

import mosel
from mosel.testing import ToyAV, toy_av_batches, toy_av_data, train_toy_av


def describe(strategy: mosel.Strategy) -> str:
    return " + ".join(f"{count}x{'+'.join(sorted(config))}" for config, count in strategy.groups)


def main() -> None:
    torch.manual_seed(0)
    print("1. training ToyAV (audio: cheap 1-D conv, video: costly 2-D conv) with modality dropout ...")
    started = time.perf_counter()
    model = train_toy_av(ToyAV())
    print(f"   trained in {time.perf_counter() - started:.1f} s")

    print("2. profiling latency per branch and batch size, and accuracy per configuration ...")
    started = time.perf_counter()
    profile = mosel.profile(model, toy_av_batches(1000, 100), max_batch_size=32)
    print(
        f"   profiled in {time.perf_counter() - started:.1f} s "
        f"(planner: {profile.plan.build_seconds:.2f} s, exact={profile.plan.exact})"
    )
    print(f"\n   {'configuration':<15} {'accuracy':>9} {'+/-':>6}   (on {profile.sample_count} requests)")
    for config, accuracy in profile.accuracy.items():
        print(f"   {profile.key(config):<15} {accuracy:>9.3f} {profile.accuracy_stderr(config):>6.3f}")
    print(f"\n   {'branch':<8} " + " ".join(f"{'b=' + str(b):>8}" for b in (1, 8, 16, 32)) + "   (median ms)")
    for name, table in profile.branch_latency.items():
        print(f"   {name:<8} " + " ".join(f"{table.at(b) / 1000:>8.3f}" for b in (1, 8, 16, 32)))
    for check in profile.cost_checks:
        print(
            f"   cost check {' + '.join(f'{k}x{profile.key(c)}' for c, k in check.groups):<28} predicted "
            f"{check.predicted_us / 1000:6.3f} ms, measured {check.measured_us / 1000:6.3f} ms "
            f"({check.relative_error:+.0%})"
        )

    everything = frozenset(profile.modalities)
    for n in (1, 8, 32):
        frontier = profile.plan.frontier(everything, n)
        print(f"\n   frontier for {n} request(s): {len(frontier.strategies)} strategies, e.g.")
        picks = sorted(
            {
                0,
                len(frontier.strategies) // 3,
                2 * len(frontier.strategies) // 3,
                len(frontier.strategies) - 1,
            }
        )
        for i in picks:
            s = frontier.strategies[i]
            print(f"     {s.predicted_latency_ms:7.3f} ms  accuracy {s.expected_accuracy:.3f}  {describe(s)}")

    print("\n3. serving a job of 16 requests under different SLOs")
    inputs, labels = toy_av_data(16, seed=42)
    full_ms = profile.plan.frontier(everything, 16).best.predicted_latency_ms
    floor = round(profile.accuracy[frozenset({"audio"})] + 0.02, 2)
    cases = [
        ("no SLO", {}),
        (f"deadline {full_ms * 0.6:.2f} ms", {"deadline_ms": full_ms * 0.6}),
        (
            f"deadline {full_ms * 0.6:.2f} ms, floor {floor}",
            {"deadline_ms": full_ms * 0.6, "min_accuracy": floor},
        ),
        (
            f"deadline {full_ms * 0.3:.2f} ms, floor {floor}",
            {"deadline_ms": full_ms * 0.3, "min_accuracy": floor},
        ),
        ("floor 0.99", {"min_accuracy": 0.99}),
    ]
    print(f"   (all modalities are predicted to take {full_ms:.2f} ms for 16 requests)")
    for title, slo in cases:
        try:
            result = model.infer(inputs, **slo)
        except mosel.MoselError as exc:
            print(f"   {title:<32} -> {type(exc).__name__}: {exc}")
            continue
        correct = (result.output.argmax(-1) == labels).float().mean().item()
        print(
            f"   {title:<32} -> {describe(result.strategies[0]):<24} expected accuracy "
            f"{result.expected_accuracy:.3f} (measured on this job {correct:.3f}), predicted "
            f"{result.predicted_latency_ms:.2f} ms, took {result.measured_latency_ms:.2f} ms"
        )
    print(
        "\n   Why: among strategies meeting the floor, mosel takes the most accurate one predicted to "
        "finish within the deadline; with no admissible strategy in time it raises DeadlineError."
    )


if __name__ == "__main__":
    main()
