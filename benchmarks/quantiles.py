"""The latency quantile's trade-off: violations against accuracy, simulated with measured residuals.

The committed AV-Digits profile; every batch's time drawn from the residuals recorded serving it
live (``profiles/av-digits.residuals.json``), optionally scaled by a bias (a machine slower than
its profile); strict Poisson and bursty traces of 1,200 jobs; mosel at each quantile on the same
traces and the same draws; means over seeds.

Run: python benchmarks/quantiles.py [--bias 1.2] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import trace_seconds
from conditions import CONDITIONS, arrivals_for, metrics
from scenarios import scenario_named

import mosel

QUANTILES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
LOADS = (0.5, 1.0, 2.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bias", type=float, default=1.0, help="scale every recorded ratio by this")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policy", default="mosel")
    args = parser.parse_args()
    scenario = scenario_named("av-digits")
    recorded = scenario.residuals
    residuals = mosel.Residuals(tuple(r * args.bias for r in recorded.ratios), recorded.overhead_us)
    print(
        f"{args.policy} on av-digits, batch times: {scenario.residuals_source} x {args.bias:g}; "
        f"1,200 jobs per trace, means over {args.seeds} seeds; violations / expected accuracy served"
    )
    print("| conditions, load | " + " | ".join(f"q={q:g}" for q in QUANTILES) + " |")
    print("|---|" + "---|" * len(QUANTILES))
    for key in ("strict-bursty", "strict"):
        conditions = CONDITIONS[key]
        for load in LOADS:
            seconds = trace_seconds(scenario.profile, load, 1200, 0.0)
            cells = []
            for q in QUANTILES:
                runs = []
                for seed in range(args.seeds):
                    arrivals = arrivals_for(
                        scenario.profile, conditions, load, seconds, seed, slack_ms=scenario.slack_ms,
                        drop=scenario.drop,
                    )  # fmt: skip
                    config = mosel.SchedulerConfig(policy=args.policy, latency_quantile=q)
                    sim = mosel.simulate(scenario.profile, arrivals, config, residuals=residuals, seed=seed)
                    runs.append(metrics(sim, seconds, conditions))
                violations = statistics.mean(m["violation_ratio"] for m in runs)
                accuracy = statistics.mean(m["accuracy_served"] for m in runs)
                cells.append(f"{violations:.1%} {accuracy:.4f}")
            print(f"| {key} {load:g}x | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
