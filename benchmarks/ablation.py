"""Ablation of mosel's decision rules, on traces the rules were not tuned on.

Each variant turns one of mosel's rules off (or swaps it for the alternative it was measured
against); every variant serves the same traces. The traces use seeds 100-104 (the rules were
developed on seeds 0-4 of ``benchmarks/run.py`` and on random traces of ``tests/unit/
test_dominance.py``), both scenarios, the strict condition set with Poisson and bursty arrivals,
and the paper condition set. Figures are medians over seeds of correct answers on time per second
and of violations over all requests.

Run: python benchmarks/ablation.py [--jobs 1200] [--loads 0.5 1 2 4 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import trace_seconds
from conditions import CONDITIONS, arrivals_for, metrics
from scenarios import scenario_named

import mosel
from mosel.policies import Mosel, Policy


def variant(name: str, **attributes: Any) -> type[Policy]:
    return type(f"Mosel_{name}", (Mosel,), {"name": f"mosel-{name}", **attributes})


VARIANTS: dict[str, str | type[Policy]] = {
    "mosel": "mosel",
    "no budget": variant("no-budget", limit_budget=False),
    "no reserve": variant("no-reserve", limit_reserve=False),
    "no risk price": variant("no-risk-price", limit_risk=False),
    "no cold-start gate": variant("no-unseen", limit_unseen=False),
    "no limits": variant(
        "no-limits", limit_budget=False, limit_reserve=False, limit_risk=False, limit_unseen=False
    ),
    "shed the late job": variant("edf-shed", shed_by_density=False),
    "consecutive merging": variant("consecutive", merge_skips=False),
    "greedy (v1 rules)": "greedy",
    "aggressive": "aggressive",
}
SEEDS = range(100, 105)


def cell(name: str, cond_key: str, load: float, jobs: int) -> dict[str, tuple[float, float]]:
    scenario = scenario_named(name)
    conditions = CONDITIONS[cond_key]
    seconds = trace_seconds(scenario.profile, load, jobs, 0.0)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for seed in SEEDS:
        arrivals = arrivals_for(
            scenario.profile, conditions, load, seconds, seed, slack_ms=scenario.slack_ms, drop=scenario.drop
        )
        for label, policy in VARIANTS.items():
            sim = mosel.simulate(
                scenario.profile, arrivals, mosel.SchedulerConfig(policy=policy), residuals=scenario.residuals,
                seed=seed,
            )  # fmt: skip
            runs[label].append(metrics(sim, seconds, conditions))
    key = "window_violation_ratio" if conditions.windowed else "violation_ratio"
    return {
        label: (statistics.median(m["correct_rps"] for m in ms), statistics.median(m[key] for m in ms))
        for label, ms in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1200)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0])
    args = parser.parse_args()
    keys = [(n, c, load) for n in ("paper-tvlt", "av-digits") for c in CONDITIONS for load in args.loads]
    with ProcessPoolExecutor() as pool:
        results = list(pool.map(cell, *zip(*keys), [args.jobs] * len(keys)))
    print(
        f"correct answers on time per second / violations, medians over seeds {SEEDS.start}-{SEEDS.stop - 1}"
    )
    print("| scenario | conditions | load | " + " | ".join(VARIANTS) + " |")
    print("|---|---|---:|" + "---|" * len(VARIANTS))
    for (name, cond, load), result in zip(keys, results):
        best = max(c for c, _ in result.values())
        cells = " | ".join(
            (f"**{c:.1f}**" if c == best else f"{c:.1f}") + f" / {v:.2%}" for c, v in result.values()
        )
        print(f"| {name} | {cond} | {load:g} | {cells} |")


if __name__ == "__main__":
    main()
