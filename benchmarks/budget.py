"""The miss-budget benchmark (issue 24): policies told apart under noise, and the goal tables.

What it measures, per scenario and condition set (``benchmarks/conditions.py``):

* **A common machine.** Every policy at a (load, seed) runs on the same simulated device
  (``mosel.simulate``'s default ``draws="time-grid"``: batches starting in the same 1 ms slot take
  the same residual draw, stalls begin at the same instants), so that a difference in violations
  is a difference in decisions. AV-Digits batch times: the recorded residuals' body and the
  stalls fitted from them (``benchmarks/stalls.py``; ``--stalls off`` removes them,
  ``--stalls on off`` runs both); paper-tvlt: exact (synthetic profile).
* **Capacity by bisection, per seed**: the largest load whose violation ratio is at most the
  target (0.5%, 1%, 5%), bracketed on the load grid (the largest passing grid load and the
  failing one above it) and bisected in log-load to ``--precision`` (relative). Under the
  ``paper`` conditions the violation figure is the authors' windowed one, as in ``run.py``.
* **Per-seed capacity ratios** mosel / aggressive, mosel / paper, mosel / agnostic_plus: median,
  min, max and a distribution-free 95% interval of the median over seeds, and the same for the
  first 3, 5, 10, ... seeds (how the interval shrinks: how many seeds resolve the figure).
* **The miss budget as an axis**: ``mosel@B`` is mosel with ``SchedulerConfig(miss_budget=B)``
  for each ``--budgets`` B (0.5%, 1%, 5%); its capacity is taken at the target equal to its
  budget; ``--budgets none`` adds mosel's default (no budget: upgrades may add at most 0.05%
  expected misses per request).
* **Goal tables** at every load of the grid (0.1x to 16x): mosel@B's miss ratio (over all
  requests) against max(aggressive's, B) + 0.1 point; its correct answers on time per second
  against aggressive's; its expected accuracy (of served requests) over aggressive's at 0.25x and
  0.5x; and, for a profile with size buckets (``--scenario text-sized``), the share of each
  bucket's served requests computed with the costly modality. Medians over seeds, and in how many
  seeds each goal holds.

Every table is printed under a line that states its conditions; ``--json`` writes everything,
per seed, with the conditions beside each block.

Run: python benchmarks/budget.py --quick --json budget-quick.json     (a few minutes on 2 cores)
     python benchmarks/budget.py --full --json budget.json           (about 17 CPU-hours: the lead's run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bisect_capacity, config_for, median_interval, spread, trace_seconds, violation
from conditions import CONDITIONS, Conditions, arrivals_for, metrics
from scenarios import scenario_named

import mosel
import mosel.machine

TARGETS = (0.005, 0.01, 0.05)
BUDGETS = (0.005, 0.01, 0.05)
RIVALS = ("aggressive", "paper", "agnostic_plus")
QUICK_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
FULL_GRID = (0.1, 0.14, 0.2, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.7, 8.0, 11.3, 16.0)
ACCURACY_LOADS = (0.25, 0.5)
MISS_SLACK = 0.001  # the goal: mosel's miss ratio <= max(aggressive's, budget) + 0.1 point


@dataclasses.dataclass(frozen=True)
class Entry:
    """One column of the benchmark: a policy, a miss budget for mosel, the targets bisected for it."""

    label: str
    policy: str
    budget: float | None
    targets: tuple[float, ...]

    def config(self, conditions: Conditions) -> mosel.SchedulerConfig:
        """The scheduler configuration; the budget goes to mosel's config only."""
        knobs = {"miss_budget": self.budget} if self.budget is not None else {}
        return config_for(self.policy, conditions, **knobs)


def budget_label(budget: float) -> str:
    """``mosel@1%``, ``mosel@0.5%``."""
    return f"mosel@{budget * 100:g}%"


def entries_for(
    budgets: Sequence[float | None], targets: Sequence[float], rivals: Sequence[str]
) -> list[Entry]:
    """The rivals (every target) and mosel at each budget (the target equal to its budget; the
    default mosel, budget None, at every target)."""
    out = [Entry(r, r, None, tuple(targets)) for r in rivals]
    for b in budgets:
        if b is None:
            out.append(Entry("mosel", "mosel", None, tuple(targets)))
        else:
            out.append(Entry(budget_label(b), "mosel", b, (b,)))
    return out


def sized_arrivals(arrivals: list[mosel.Arrival], profile: mosel.Profile, seed: int) -> list[mosel.Arrival]:
    """Give every job of a sized profile an input size, uniform over the profile's buckets' range."""
    if not profile.sized:
        return arrivals
    rng = random.Random(seed + 11)
    top = {m: max(sized.buckets) for m, sized in profile.sized.items()}
    return [
        dataclasses.replace(a, sizes={m: rng.randint(1, top[m]) for m in profile.sized}) for a in arrivals
    ]


def costly_modality(profile: mosel.Profile) -> str:
    """The modality whose branch costs most for one request (the sized one, when there is one)."""
    if profile.sized:
        return next(iter(profile.sized))
    return max(profile.modalities, key=lambda m: profile.branch_latency[m].median_us[0])


def bucket_shares(sim: mosel.Simulation, profile: mosel.Profile) -> dict[str, float]:
    """Per size bucket, the share of served requests computed with the costly modality."""
    if not profile.sized:
        return {}
    costly = costly_modality(profile)
    served: dict[str, int] = {}
    with_costly: dict[str, int] = {}
    for record in sim.records:
        if not record.served or record.arrival.sizes is None:
            continue
        key = "/".join(str(e) for e in profile.bucket(record.arrival.sizes))
        served[key] = served.get(key, 0) + record.arrival.n
        rows = sum(k for s in record.strategies for config, k in s.groups if costly in config)
        with_costly[key] = with_costly.get(key, 0) + rows
    return {
        key: with_costly[key] / served[key]
        for key in sorted(served, key=lambda k: [int(p) for p in k.split("/")])
    }


def curve(
    name: str, cond_key: str, seed: int, entry: Entry, grid: tuple[float, ...], jobs: int, stalls: bool,
    precision: float, draws: str = "time-grid",
) -> dict[str, Any]:  # fmt: skip
    """One policy on one seed: its metrics at every grid load, and its capacity at each of its targets."""
    started = time.perf_counter()
    scenario = scenario_named(name)
    conditions = CONDITIONS[cond_key]
    config = entry.config(conditions)
    machine = scenario.machine(stalls)
    measured: dict[float, dict[str, Any]] = {}

    def measure(load: float) -> dict[str, Any]:
        if load not in measured:
            seconds = trace_seconds(scenario.profile, load, jobs, 0.0)
            arrivals = arrivals_for(
                scenario.profile,
                conditions,
                load,
                seconds,
                seed,
                slack_ms=scenario.slack_ms,
                drop=scenario.drop,
            )
            arrivals = sized_arrivals(arrivals, scenario.profile, seed)
            sim = mosel.simulate(scenario.profile, arrivals, config, seed=seed, draws=draws, **machine)
            m: dict[str, Any] = metrics(sim, seconds, conditions)
            shares = bucket_shares(sim, scenario.profile)
            if shares:
                m["costly_share_by_bucket"] = shares
            measured[load] = m
        return measured[load]

    for load in grid:
        measure(load)
    capacity = {}
    for target in entry.targets:
        found = bisect_capacity(
            lambda load: violation(measure(load), conditions), grid, target, precision=precision
        )
        capacity[f"{target:g}"] = {
            "load": found.load,
            "above": found.above,
            "probes": [list(p) for p in found.probes],
        }
    return {
        "grid": {f"{load:g}": measured[load] for load in grid},
        "capacity": capacity,
        "simulations": len(measured),
        "wall_s": time.perf_counter() - started,
    }


def conditions_line(
    name: str, cond_key: str, stalls: bool, seeds: int, jobs: int, precision: float, draws: str = "time-grid"
) -> dict[str, Any]:
    """Everything a figure depends on, as a dict (printed beside every table, written to the JSON)."""
    scenario = scenario_named(name)
    conditions = CONDITIONS[cond_key]
    return {
        "scenario": name,
        "conditions": cond_key,
        "arrivals": conditions.arrivals,
        "slack_ms": round(scenario.slack_ms, 2),
        "floor": f"best - U(0, {scenario.drop:g}) per seed"
        if conditions.floor_drawn
        else f"best - {scenario.drop:g}",
        "deadline_extension_ms": conditions.extension_ms + conditions.tolerance_ms,
        "capacity_violations": "windowed (4 s)" if conditions.windowed else "over all requests",
        "goal_violations": "over all requests",
        "machine": scenario.machine_source(stalls),
        "stalls": stalls,
        "draws": "time-grid (common random numbers)" if draws == "time-grid" else "per-batch (one stream)",
        "seeds": seeds,
        "jobs_per_trace": jobs,
        "bisection_precision": precision,
        "latency_quantile": mosel.SchedulerConfig().latency_quantile,
    }


def describe(line: dict[str, Any]) -> str:
    """The conditions as one printed line."""
    return (
        f"[{line['scenario']}, {line['conditions']}: {line['arrivals']} arrivals, slack {line['slack_ms']} ms"
        + (f" (+{line['deadline_extension_ms']:g} ms)" if line["deadline_extension_ms"] else "")
        + f", floor {line['floor']}; batch times: {line['machine']}; {line['draws']}; {line['seeds']} seeds x "
        f"{line['jobs_per_trace']} jobs per trace; capacity violations {line['capacity_violations']}, bisected to "
        f"{line['bisection_precision']:.0%}; latency_quantile {line['latency_quantile']}]"
    )


def ratio_summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the 95% interval of the median of per-seed ratios (NaN: a rival at 0)."""
    finite = [v for v in values if math.isfinite(v)]
    low, high = median_interval(finite)
    return spread(finite) | {"ci95": [low, high], "per_seed": values, "seeds": len(finite)}


def convergence(values: list[float]) -> list[dict[str, Any]]:
    """The median ratio and its interval over the first k seeds, k = 3, 5, 10, 20, ... (and all)."""
    ks = sorted({k for k in (3, 5, 10, 20, 40, 80) if k < len(values)} | {len(values)})
    out = []
    for k in ks:
        part = [v for v in values[:k] if math.isfinite(v)]
        low, high = median_interval(part)
        out.append({"seeds": k, "median": statistics.median(part) if part else math.nan, "ci95": [low, high]})
    return out


def summarise(
    curves: dict[tuple[int, str], dict[str, Any]], entries: list[Entry], seeds: list[int], grid: tuple[float, ...],
    targets: Sequence[float],
) -> dict[str, Any]:  # fmt: skip
    """Capacities, per-seed ratios, convergence and goal tables of one (scenario, conditions, stalls)."""
    capacity: dict[str, dict[str, Any]] = {}
    floor: dict[str, dict[str, Any]] = {}
    lightest = f"{min(grid):g}"
    for e in entries:
        capacity[e.label] = {}
        figures = [curves[(s, e.label)]["grid"][lightest] for s in seeds]
        floor[e.label] = spread([f.get("window_violation_ratio", f["violation_ratio"]) for f in figures]) | {
            "load": min(grid)
        }
        for t in e.targets:
            loads = [curves[(s, e.label)]["capacity"][f"{t:g}"]["load"] for s in seeds]
            above = [curves[(s, e.label)]["capacity"][f"{t:g}"]["above"] for s in seeds]
            capacity[e.label][f"{t:g}"] = spread(loads) | {"per_seed": loads, "above_per_seed": above}
    ratios: dict[str, dict[str, Any]] = {}
    for t in targets:
        mine = next((e for e in entries if e.policy == "mosel" and e.budget == t), None) or next(
            (e for e in entries if e.label == "mosel"), None
        )
        if mine is None:
            continue
        ratios[f"{t:g}"] = {"mosel": mine.label}
        for rival in (e for e in entries if e.policy != "mosel" and t in e.targets):
            per_seed = []
            for s in seeds:
                a = curves[(s, mine.label)]["capacity"][f"{t:g}"]["load"]
                b = curves[(s, rival.label)]["capacity"][f"{t:g}"]["load"]
                per_seed.append(a / b if b > 0 else math.nan)
            ratios[f"{t:g}"][rival.label] = ratio_summary(per_seed) | {"convergence": convergence(per_seed)}
    return {
        "capacity": capacity,
        "floor": floor,
        "ratios": ratios,
        "goals": goals(curves, entries, seeds, grid),
    }


def goals(
    curves: dict[tuple[int, str], dict[str, Any]],
    entries: list[Entry],
    seeds: list[int],
    grid: tuple[float, ...],
) -> dict[str, Any]:
    """Per mosel column and grid load: the issue's goals against aggressive, per seed and as medians."""
    out: dict[str, Any] = {}
    for e in (e for e in entries if e.policy == "mosel"):
        budget = e.budget or 0.0
        rows = {}
        for load in grid:
            key = f"{load:g}"
            mine = [curves[(s, e.label)]["grid"][key] for s in seeds]
            theirs = [curves[(s, "aggressive")]["grid"][key] for s in seeds]
            miss = [m["violation_ratio"] for m in mine]
            bound = [max(t["violation_ratio"], budget) + MISS_SLACK for t in theirs]
            correct = [
                m["correct_rps"] / t["correct_rps"] if t["correct_rps"] else math.nan
                for m, t in zip(mine, theirs)
            ]
            row: dict[str, Any] = {
                "miss": spread(miss) | {"per_seed": miss},
                "aggressive_miss": spread([t["violation_ratio"] for t in theirs]),
                "miss_bound": spread(bound),
                "miss_goal_seeds": sum(m <= b + 1e-12 for m, b in zip(miss, bound)),
                "correct_ratio": spread(correct) | {"per_seed": correct},
                "correct_goal_seeds": sum(c >= 1.0 - 1e-12 for c in correct),
                "seeds": len(seeds),
            }
            if load in ACCURACY_LOADS:
                gain = [m["accuracy_served"] - t["accuracy_served"] for m, t in zip(mine, theirs)]
                row["accuracy_gain"] = spread(gain) | {"per_seed": gain}
                row["accuracy_goal_seeds"] = sum(g > 0 for g in gain)
            if "costly_share_by_bucket" in mine[0]:
                row["costly_share_by_bucket"] = {
                    policy: {
                        bucket: statistics.median(
                            c["grid"][key]["costly_share_by_bucket"].get(bucket, math.nan) for c in cs
                        )
                        for bucket in cs[0]["grid"][key]["costly_share_by_bucket"]
                    }
                    for policy, cs in (
                        (e.label, [curves[(s, e.label)] for s in seeds]),
                        ("aggressive", [curves[(s, "aggressive")] for s in seeds]),
                    )
                }
            rows[key] = row
        out[e.label] = {"budget": e.budget, "loads": rows}
    return out


def report(
    line: dict[str, Any], summary: dict[str, Any], entries: list[Entry], targets: Sequence[float]
) -> None:
    """Print one (scenario, conditions, stalls) block: capacities, ratios, convergence, goals."""
    print(f"\n## {line['scenario']}, {line['conditions']}, stalls {'on' if line['stalls'] else 'off'}")
    print(describe(line))
    print(
        "\ncapacity (x all-modality capacity), median [min-max] over seeds; the violations at the lightest load "
        "(the floor: a target within its spread makes that capacity ill-conditioned):"
    )
    lightest = next(iter(summary["floor"].values()))["load"]
    print("| policy | " + " | ".join(f"{t:.1%}" for t in targets) + f" | violations at {lightest:g}x |")
    print("|---|" + "---:|" * (len(targets) + 1))
    for e in entries:
        cells = []
        for t in targets:
            c = summary["capacity"][e.label].get(f"{t:g}")
            cells.append(f"{c['median']:.3g} [{c['min']:.3g}-{c['max']:.3g}]" if c else "")
        f = summary["floor"][e.label]
        cells.append(f"{f['median']:.2%} [{f['min']:.2%}-{f['max']:.2%}]")
        print(f"| {e.label} | " + " | ".join(cells) + " |")
    print("\nper-seed capacity ratios, median [min-max] (95% interval of the median; seeds):")
    print("| target | ratio | median [min-max] | 95% interval | seeds | interval over the first k seeds |")
    print("|---:|---|---:|---:|---:|---|")
    for t in targets:
        by_rival = summary["ratios"].get(f"{t:g}")
        if not by_rival:
            continue
        for rival, r in by_rival.items():
            if rival == "mosel":
                continue
            shrink = ", ".join(
                f"{c['seeds']}: {c['ci95'][0]:.3g}-{c['ci95'][1]:.3g}" for c in r["convergence"]
            )
            print(
                f"| {t:.1%} | {by_rival['mosel']} / {rival} | {r['median']:.3g} [{r['min']:.3g}-{r['max']:.3g}] | "
                f"{r['ci95'][0]:.3g}-{r['ci95'][1]:.3g} | {r['seeds']} | {shrink} |"
            )
    for label, goal in summary["goals"].items():
        budget = goal["budget"]
        print(
            f"\ngoals of {label} against aggressive, medians over seeds (seeds meeting the goal / seeds); miss "
            f"ratio over all requests against max(aggressive's, "
            f"{f'its budget {budget:.1%}' if budget is not None else 'no budget: 0'}) + 0.1 pt:"
        )
        print(
            "| load | aggressive miss | mosel miss | bound | miss goal | correct/s ratio | correct goal | accuracy gain (pt) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, row in goal["loads"].items():
            acc = (
                f"{100 * row['accuracy_gain']['median']:+.2f} ({row['accuracy_goal_seeds']}/{row['seeds']})"
                if "accuracy_gain" in row
                else ""
            )
            print(
                f"| {key} | {row['aggressive_miss']['median']:.2%} | {row['miss']['median']:.2%} | "
                f"{row['miss_bound']['median']:.2%} | {row['miss_goal_seeds']}/{row['seeds']} | "
                f"{row['correct_ratio']['median']:.4f} | {row['correct_goal_seeds']}/{row['seeds']} | {acc} |"
            )
        shares = {
            k: r["costly_share_by_bucket"] for k, r in goal["loads"].items() if "costly_share_by_bucket" in r
        }
        if shares:
            print(
                f"\nshare of served requests computed with the costly modality, per size bucket ({label} / aggressive):"
            )
            buckets = list(next(iter(shares.values()))[label])
            print("| load | " + " | ".join(buckets) + " |")
            print("|---:|" + "---:|" * len(buckets))
            for key, s in shares.items():
                print(
                    f"| {key} | "
                    + " | ".join(
                        f"{s[label].get(b, math.nan):.2f} / {s['aggressive'].get(b, math.nan):.2f}"
                        for b in buckets
                    )
                    + " |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="3 seeds x 400 jobs, the coarse grid, 10%% precision"
    )
    size.add_argument(
        "--full", action="store_true", help="20 seeds x 4,000 jobs, the fine grid, 2%% precision"
    )
    parser.add_argument("--scenario", action="append", choices=["paper-tvlt", "av-digits", "text-sized"])
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--jobs", type=int, help="jobs per trace")
    parser.add_argument("--precision", type=float, help="relative precision of the bisection")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument(
        "--budgets", nargs="+", default=[f"{b:g}" for b in BUDGETS],
        help="mosel's miss budgets (fractions); 'none' adds mosel's default",
    )  # fmt: skip
    parser.add_argument("--rivals", nargs="+", default=list(RIVALS))
    parser.add_argument("--stalls", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument(
        "--draws", choices=list(mosel.machine.DRAWS), default="time-grid",
        help="per-batch: the simulator's old single stream (policies compared on their luck)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.full:
        seeds, jobs, grid, precision = 20, 4000, FULL_GRID, 0.02
    else:
        seeds, jobs, grid, precision = 3, 400, QUICK_GRID, 0.1
    seed_list = list(range(args.seeds or seeds))
    jobs = args.jobs or jobs
    precision = args.precision or precision
    targets = sorted(args.targets)
    budgets: list[float | None] = [None if b == "none" else float(b) for b in args.budgets]
    rivals = args.rivals if "aggressive" in args.rivals else ["aggressive", *args.rivals]
    entries = entries_for(budgets, targets, rivals)
    names = args.scenario or ["av-digits", "paper-tvlt"]
    started = time.perf_counter()
    keys = [
        (name, cond, stalls, s, e)
        for name in names
        for cond in args.conditions
        for stalls in args.stalls
        for s in seed_list
        for e in sorted(entries, key=lambda e: e.policy != "paper")  # the slowest first
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            k: pool.submit(
                curve, k[0], k[1], k[3], k[4], tuple(grid), jobs, k[2] == "on", precision, args.draws
            )
            for k in keys
        }
        results = {k: f.result() for k, f in futures.items()}
    out: dict[str, Any] = {
        "config": {
            "grid": list(grid), "targets": targets, "budgets": budgets, "rivals": rivals, "seeds": seed_list,
            "jobs_per_trace": jobs, "precision": precision, "stalls": args.stalls, "draws": args.draws,
            "mode": "full" if args.full else "quick" if args.quick else "custom",
        },
        "runs": {},
    }  # fmt: skip
    for name in names:
        for cond in args.conditions:
            for stalls in args.stalls:
                curves = {(k[3], k[4].label): results[k] for k in keys if k[:3] == (name, cond, stalls)}
                line = conditions_line(
                    name, cond, stalls == "on", len(seed_list), jobs, precision, args.draws
                )
                summary = summarise(curves, entries, seed_list, tuple(grid), targets)
                report(line, summary, entries, targets)
                out["runs"].setdefault(name, {}).setdefault(cond, {})[f"stalls-{stalls}"] = {
                    "conditions": line,
                    **summary,
                    "per_seed": {f"{s}/{label}": c for (s, label), c in curves.items()},
                }
    wall = time.perf_counter() - started
    out["config"]["wall_s"] = wall
    out["config"]["simulations"] = sum(r["simulations"] for r in results.values())
    print(f"\n{out['config']['simulations']} simulations in {wall:.0f} s ({args.workers} workers)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
