"""Scale-out: N mosel replicas behind a router, simulated on one virtual clock.

Each replica is its own mosel scheduler (``mosel.simulate_replicas``); the router sees each
replica's ``mosel.Load`` as last reported (every ``--report-every-ms``, ``--report-delay-ms``
late). Routers: ``random``, ``power-of-two`` (two replicas at random, the shorter queue, counting
what it sent since each report: what Ray Serve's default router gets by probing) and ``slack``
(``mosel.SlackRouter``: the best predicted accuracy within the deadline).

For N = 1, 2, 8, 64 replicas the arrival rate is N times the per-replica load (a multiple of one
replica's all-modality capacity, as in ``benchmarks/run.py``), on the benchmark's Poisson and
bursty traces (``strict`` conditions), with the same jobs per replica at every N. Figures are
medians over seeds with [min-max]; capacity is the largest per-replica load at a violation
target (interpolated on the load grid in log-load, per seed, as ``run.py``); ``scaling`` is the
cluster's capacity over N times one replica's.

Run: python benchmarks/scaleout.py --quick                 (a couple of minutes on 2 cores)
     python benchmarks/scaleout.py --json out.json         (the table of docs/scale-out.md)
     python benchmarks/scaleout.py --slow-share 0.25 --slow-factor 2   (mixed devices: a quarter
                                                           of the replicas twice as slow)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import capacity, spread
from conditions import CONDITIONS, arrivals_for, metrics, rate_per_s
from scenarios import scenario_named

import mosel
from mosel.simulate import ROUTERS
from mosel.tail import Residuals

EXTRA_ROUTERS: dict[str, Callable[[], mosel.Router]] = {
    "power-of-two-uncounted": lambda: mosel.PowerOfTwoRouter(count_sent=False),
}
"""Routers only the benchmark names: power of two on the reports alone (not counting its own sends)."""
REPLICAS = (1, 2, 8, 64)
TARGETS = (0.01, 0.05)
LOADS = {"av-digits": (0.5, 0.75, 1.0, 1.5), "paper-tvlt": (4.0, 8.0, 12.0, 16.0)}
"""Per-replica loads (x one replica's all-modality capacity): around each profile's knee."""
QUICK_LOADS = {"av-digits": (0.5, 1.0), "paper-tvlt": (8.0, 16.0)}
METRICS = ("violation_ratio", "goodput_rps", "accuracy_served", "jct_p99_ms", "replica_goodput_min_rps")

RealMode = Callable[[argparse.Namespace], dict[str, Any]]
REAL_MODE: RealMode | None = None
"""Hook for a live section (e.g. Ray Serve replicas): set to a function of the parsed arguments
returning a JSON-ready dict (it prints its own table). ``--real`` calls it; None: not available."""


def _ray_real_mode(args: argparse.Namespace) -> dict[str, Any]:
    """The live section: ``benchmarks/scaleout_ray.py`` at its defaults (needs the ray extra)."""
    from scaleout_ray import real_mode

    return real_mode(args)


if importlib.util.find_spec("ray") is not None:
    REAL_MODE = _ray_real_mode


def slowdowns_for(replicas: int, share: float, factor: float) -> list[float]:
    """Per replica, its factor on execution times: the last ``round(share * replicas)`` run
    ``factor`` times slower (a cluster of mixed devices), the others at the profile's speed."""
    slow = round(share * replicas)
    return [1.0] * (replicas - slow) + [factor] * slow


def capped(residuals: Residuals | None, cap: float | None) -> Residuals | None:
    """``residuals`` with every batch-time ratio above ``cap`` lowered to it (None: as recorded).

    An analysis knob: how much of the violations the recorded stalls (a batch taking many times
    its prediction) cause, with every router served the same capped sample.
    """
    if residuals is None or cap is None:
        return residuals
    return Residuals(tuple(min(r, cap) for r in residuals.ratios), residuals.overhead_us, residuals.at_s)


def cell(
    name: str, cond_key: str, replicas: int, load: float, seed: int, jobs_per_replica: int,
    routers: tuple[str, ...], report_every_ms: float, report_delay_ms: float,
    slow_share: float = 0.0, slow_factor: float = 1.0, residual_cap: float | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Every router on one trace: (scenario, conditions, replicas, per-replica load, seed)."""
    scenario = scenario_named(name)
    residuals = capped(scenario.residuals, residual_cap)
    conditions = CONDITIONS[cond_key]
    rate_load = load * replicas
    seconds = jobs_per_replica * replicas / rate_per_s(scenario.profile, rate_load)
    arrivals = arrivals_for(
        scenario.profile, conditions, rate_load, seconds, seed, slack_ms=scenario.slack_ms, drop=scenario.drop
    )
    out = {}
    for router in routers:
        started = time.perf_counter()
        chosen = EXTRA_ROUTERS[router]() if router in EXTRA_ROUTERS else router
        run = mosel.simulate_replicas(
            scenario.profile, arrivals, replicas, chosen, report_every_ms=report_every_ms,
            report_delay_ms=report_delay_ms, residuals=residuals, seed=seed,
            slowdowns=slowdowns_for(replicas, slow_share, slow_factor),
        )  # fmt: skip
        m = metrics(run.overall, seconds, conditions)
        per_replica = [metrics(r, seconds, conditions)["goodput_rps"] for r in run.replicas]
        m["replica_goodput_min_rps"] = min(per_replica)
        m["replica_goodput_max_rps"] = max(per_replica)
        m["wall_s"] = time.perf_counter() - started
        out[router] = m
    return out


def summarise(
    grid: dict[tuple[float, int], dict[str, dict[str, float]]], loads: tuple[float, ...], seeds: list[int],
    routers: tuple[str, ...],
) -> dict[str, Any]:  # fmt: skip
    """Per load and router: metrics median [min-max] over seeds; capacities per target."""
    by_load = {
        f"{load:g}": {
            router: {m: spread([grid[(load, s)][router][m] for s in seeds]) for m in (*METRICS, "requests")}
            for router in routers
        }
        for load in loads
    }
    caps = {
        router: {
            f"{t:g}": spread(
                [
                    capacity(list(loads), [grid[(load, s)][router]["violation_ratio"] for load in loads], t)
                    for s in seeds
                ]
            )
            for t in TARGETS
        }
        for router in routers
    }
    return {"loads": by_load, "capacity": caps}


def conditions_line(name: str, cond_key: str, args: argparse.Namespace, seeds: list[int]) -> str:
    """Everything a figure depends on, printed beside it."""
    scenario = scenario_named(name)
    c = CONDITIONS[cond_key]
    return (
        f"{name}, {cond_key} ({c.arrivals} arrivals), deadline = all-modality latency + {scenario.slack_ms:.3g} ms, "
        f"floor = best - {scenario.drop:g}; policy mosel (latency_quantile "
        f"{mosel.SchedulerConfig().latency_quantile}) on every replica; batch times: {scenario.residuals_source}; "
        f"load reports every {args.report_every_ms:g} ms, {args.report_delay_ms:g} ms late; "
        f"{args.jobs} jobs per replica per trace; seeds {seeds}; medians [min-max] over seeds; "
        "violations over all requests"
        + (
            f"; MIXED DEVICES: {args.slow_share:.0%} of the replicas (rounded) run {args.slow_factor:g}x slower "
            "than the profile (loads stay in units of one profiled replica's capacity)"
            if getattr(args, "slow_share", 0.0) and getattr(args, "slow_factor", 1.0) != 1.0
            else "; identical replicas"
        )
        + (
            f"; RESIDUALS CAPPED at {args.residual_cap:g}x (stalls removed: an analysis, not a measurement)"
            if getattr(args, "residual_cap", None) is not None
            else ""
        )
    )


def report(name: str, cond_key: str, summaries: dict[int, dict[str, Any]], args: argparse.Namespace,
           seeds: list[int], loads: tuple[float, ...], routers: tuple[str, ...]) -> None:  # fmt: skip
    """Print one (scenario, conditions) block: capacity per N, then metrics per N and load."""
    print(f"\n## {name}, {cond_key}\nconditions: {conditions_line(name, cond_key, args, seeds)}")
    one = summaries.get(1)
    for target in TARGETS:
        print(f"\ncapacity at {target:.0%} violations (x one replica's all-modality capacity, per replica)"
              + ("; scaling = capacity / capacity at N=1" if one else ""))  # fmt: skip
        print("| N | " + " | ".join(routers) + " |")
        print("|---:|" + "---|" * len(routers))
        for n, summary in summaries.items():
            cells = []
            for router in routers:
                c = summary["capacity"][router][f"{target:g}"]
                base = one["capacity"][router][f"{target:g}"]["median"] if one else math.nan
                scale = f" ({c['median'] / base:.2f}x)" if one and base > 0 else ""
                cells.append(f"{bounded(c['median'], loads)} [{c['min']:.3g}-{c['max']:.3g}]{scale}")
            print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nviolation ratio / goodput (requests on time per s, whole cluster) / accuracy served / "
          "JCT p99 ms / slowest replica's goodput")  # fmt: skip
    print("| N | load per replica | " + " | ".join(routers) + " | slack vs power-of-two (violations) |")
    print("|---:|---:|" + "---|" * len(routers) + "---|")
    for n, summary in summaries.items():
        for load in loads:
            row = summary["loads"][f"{load:g}"]
            cells = []
            for router in routers:
                r = row[router]
                v = r["violation_ratio"]
                cells.append(
                    f"{v['median']:.2%} [{v['min']:.2%}-{v['max']:.2%}] / {r['goodput_rps']['median']:.0f} / "
                    f"{r['accuracy_served']['median']:.4f} / {r['jct_p99_ms']['median']:.1f} / "
                    f"{r['replica_goodput_min_rps']['median']:.0f}"
                )
            print(f"| {n} | {load:g} | " + " | ".join(cells) + f" | {verdict(row, routers)} |")


def bounded(value: float, loads: tuple[float, ...]) -> str:
    """A capacity, marked when the load grid bounds it (>= the heaviest load, < the lightest)."""
    if value >= loads[-1]:
        return f">={loads[-1]:g}"
    if value == 0.0:
        return f"<{loads[0]:g}"
    return f"{value:.3g}"


def verdict(row: dict[str, Any], routers: tuple[str, ...]) -> str:
    """How slack compares with power-of-two on violations at one (N, load), honestly worded."""
    if "slack" not in routers or "power-of-two" not in routers:
        return "-"
    slack, p2c = row["slack"]["violation_ratio"]["median"], row["power-of-two"]["violation_ratio"]["median"]
    if p2c == 0.0 and slack == 0.0:
        return "both 0"
    if slack > p2c:
        return f"slack does NOT win ({slack / p2c:.2f}x)" if p2c else "slack does NOT win"
    ratio = slack / p2c
    return f"{ratio:.2f}x" + (" (halved)" if ratio <= 0.5 else " (less than halved)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer loads, seeds and jobs: a couple of minutes"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--scenario", action="append", choices=["av-digits", "paper-tvlt"])
    parser.add_argument(
        "--conditions", nargs="+", default=["strict-bursty", "strict"], choices=["strict", "strict-bursty"]
    )
    parser.add_argument("--replicas", type=int, nargs="+", help=f"replica counts (default {list(REPLICAS)})")
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=[*ROUTERS, *EXTRA_ROUTERS])
    parser.add_argument("--loads", type=float, nargs="+", help="per-replica loads (default: per scenario)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3, --quick 2)")
    parser.add_argument("--jobs", type=int, help="jobs per replica per trace (default 300, --quick 100)")
    parser.add_argument(
        "--report-every-ms", type=float, default=10.0, help="load report period (0: exact, instant)"
    )
    parser.add_argument("--report-delay-ms", type=float, default=1.0, help="load report transport delay")
    parser.add_argument(
        "--slow-share", type=float, default=0.0, help="share of the replicas on slower devices (default 0)"
    )
    parser.add_argument(
        "--slow-factor", type=float, default=2.0, help="how much slower those replicas run (default 2)"
    )
    parser.add_argument(
        "--residual-cap", type=float, help="cap recorded batch-time ratios at this factor (an analysis)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--real", action="store_true", help="also run the live section (REAL_MODE hook)")
    args = parser.parse_args()
    if args.report_every_ms == 0.0:
        args.report_delay_ms = 0.0
    args.jobs = args.jobs or (100 if args.quick else 300)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    replicas = tuple(args.replicas or REPLICAS)
    routers = tuple(args.routers)
    names = args.scenario or ["av-digits", "paper-tvlt"]
    started = time.perf_counter()
    load_sets = {
        n: tuple(args.loads) if args.loads else (QUICK_LOADS if args.quick else LOADS)[n] for n in names
    }
    keys = [
        (name, cond, n, load, s)
        for name in names for cond in args.conditions for n in replicas for load in load_sets[name] for s in seeds
    ]  # fmt: skip
    keys.sort(key=lambda k: -k[2])  # the largest clusters first: they take longest
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            key: pool.submit(
                cell,
                *key,
                args.jobs,
                routers,
                args.report_every_ms,
                args.report_delay_ms,
                args.slow_share,
                args.slow_factor,
                args.residual_cap,
            )
            for key in keys
        }
        results = {key: f.result() for key, f in futures.items()}
    out: dict[str, Any] = {
        "config": {
            "replicas": list(replicas), "routers": list(routers), "loads": load_sets, "seeds": seeds,
            "jobs_per_replica": args.jobs, "report_every_ms": args.report_every_ms,
            "report_delay_ms": args.report_delay_ms, "targets": list(TARGETS), "quick": args.quick,
            "slow_share": args.slow_share, "slow_factor": args.slow_factor, "residual_cap": args.residual_cap,
        },
        "scenarios": {},
    }  # fmt: skip
    for name in names:
        loads = load_sets[name]
        out["scenarios"][name] = {}
        for cond in args.conditions:
            summaries = {
                n: summarise(
                    {(load, s): results[(name, cond, n, load, s)] for load in loads for s in seeds},
                    loads,
                    seeds,
                    routers,
                )
                for n in replicas
            }
            report(name, cond, summaries, args, seeds, loads, routers)
            out["scenarios"][name][cond] = {
                "conditions": conditions_line(name, cond, args, seeds),
                "by_replicas": {str(n): s for n, s in summaries.items()},
            }
    if args.real:
        if REAL_MODE is None:
            print("\n--real: no live section is wired in (set benchmarks/scaleout.py REAL_MODE)")
        else:
            out["real"] = REAL_MODE(args)
    wall = time.perf_counter() - started
    out["config"]["wall_s"] = wall
    print(f"\nscale-out benchmark finished in {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
