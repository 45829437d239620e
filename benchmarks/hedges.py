"""Ablation of the dispatch hedges: mosel with each of ``risk``, ``hedge`` and ``reserve`` off.

Simulated (virtual clock), paper-tvlt and av-digits, Poisson and bursty arrivals, about
``--jobs`` jobs per trace, means over ``--seeds`` seeds of the violation ratio and the expected
accuracy of served requests.

Run: python benchmarks/hedges.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

VARIANTS: dict[str, dict[str, float]] = {
    "all off": {"risk": 0.0, "hedge": 0.0, "reserve": 0.0},
    "hedge only": {"risk": 0.0, "reserve": 0.0},
    "no risk": {"risk": 0.0},
    "no reserve": {"reserve": 0.0},
    "default": {},
}


def cell(
    name: str, workload: str, load: float, jobs: int, seeds: int, variants: list[str]
) -> dict[str, tuple[float, float]]:
    scenario = run.scenario_named(name)
    assert scenario is not None
    out: dict[str, tuple[float, float]] = {}
    seconds = run.seconds_for(scenario, load, jobs)
    traces = [run.trace(scenario, load, seconds, seed, run.WORKLOADS[workload]) for seed in range(seeds)]
    for variant in variants:
        ms = [run.run_policy(scenario, t, "mosel", seconds, **VARIANTS[variant]) for t in traces]
        out[variant] = (
            statistics.mean(m["violation_ratio"] for m in ms),
            statistics.mean(m["expected_accuracy"] for m in ms),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 6.0, 8.0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    keys = [(n, w, load) for n in ("paper-tvlt", "av-digits") for w in run.WORKLOADS for load in args.loads]
    with ProcessPoolExecutor() as pool:
        futures = [pool.submit(cell, n, w, load, args.jobs, args.seeds, args.variants) for n, w, load in keys]
        results = [f.result() for f in futures]
    print("violations / expected accuracy, mean over seeds")
    print("| scenario | arrivals | load | " + " | ".join(args.variants) + " |")
    print("|---|---|---:|" + "---|" * len(args.variants))
    for (name, workload, load), result in zip(keys, results):
        cells = " | ".join(f"{v:.2%} / {a:.4f}" for v, a in result.values())
        print(f"| {name} | {workload} | {load} | {cells} |")


if __name__ == "__main__":
    main()
