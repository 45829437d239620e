"""Robust profiling: the same model profiled idle and beside competing CPU load.

ToyAV (trained here in seconds) is profiled on an idle machine, then again while two busy
processes (one per core on the project's 2-core machine) compete for the CPU. Reported: the
busy/idle ratio of every measured table entry, and each profile's end-to-end cost-check errors.
Goal (issue 13): tables within 25% of each other at the median, checks within 25%.

Run: python benchmarks/profiling.py [--threads 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings

import torch

import mosel
from mosel.testing import ToyAV, toy_av_batches, train_toy_av


def entries(profile: mosel.Profile) -> dict[tuple[str, int], float]:
    out = {}
    for m, table in profile.branch_latency.items():
        for b in table.measured_sizes:
            out[(m, b)] = table.at(b)
    for c, table in profile.fusion_latency.items():
        for b in table.measured_sizes:
            out[(profile.key(c), b)] = table.at(b)
    return out


def measure(model: torch.nn.Module, threads: int) -> tuple[mosel.Profile, float]:
    started = time.perf_counter()
    with warnings.catch_warnings(record=True):  # the busy profile may warn; its errors are printed
        warnings.simplefilter("always")
        profile = mosel.profile(
            model, toy_av_batches(400, 100), max_batch_size=32, progress=False, threads=threads
        )
    return profile, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = train_toy_av(ToyAV())
    print(f"ToyAV, {args.threads} torch thread(s), 2 busy competing processes; {args.runs} runs")
    print(
        "| run | idle s | busy s | busy/idle median [p10-p90] | idle checks median/max | busy checks median/max |"
    )
    print("|---:|---:|---:|---|---|---|")
    for run in range(args.runs):
        idle, idle_s = measure(model, args.threads)
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        try:
            time.sleep(1.0)
            busy, busy_s = measure(model, args.threads)
        finally:
            for burner in burners:
                burner.kill()
        a, b = entries(idle), entries(busy)
        ratios = sorted(b[k] / a[k] for k in a if a[k] > 0)
        cells = []
        for profile in (idle, busy):
            errors = sorted(abs(c.relative_error) for c in profile.cost_checks)
            cells.append(f"{statistics.median(errors):.0%}/{errors[-1]:.0%}")
        print(
            f"| {run} | {idle_s:.1f} | {busy_s:.1f} | {statistics.median(ratios):.2f} "
            f"[{ratios[len(ratios) // 10]:.2f}-{ratios[9 * len(ratios) // 10]:.2f}] | {cells[0]} | {cells[1]} |"
        )


if __name__ == "__main__":
    main()
