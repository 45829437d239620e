"""The benchmark: mosel against every baseline, under two condition sets, on equal terms.

Policies, all through the same simulator (and the same real-mode replayer): ``agnostic`` (EDF,
every modality, late jobs dropped: the paper's baseline), ``agnostic_plus`` (every modality,
batch-aware shedding, batching that may skip jobs: a careful Triton or Ray Serve deployment),
``batcher`` (FIFO dynamic batching, never drops), ``aggressive`` (every job at its cheapest
admissible strategy), ``greedy`` (mosel without CP-SAT), ``mosel``, and ``paper`` / ``paper_fixed``
(the MOSEL authors' own online policy, as coded and with its index-mapping defect fixed;
``benchmarks/paper_policy.py``).

Condition sets (``benchmarks/conditions.py``): ``strict`` (Poisson, and bursty arrivals in a
separate table; a late job is a violation) and ``paper`` (the authors' fixed-QPS stream, +5 ms
deadline extension, 12 ms tolerance, one accuracy target per run drawn in [best - d, best],
violations averaged over 4 s windows). Slack is an axis for paper-tvlt (17, 34, 55 ms).

Load is a multiple of the all-modality capacity (jobs one at a time, unbatched). Every policy at
every load runs on the same trace; every (load, seed) trace holds the same number of jobs (1,200
quick, 4,000 full) and bursty traces the same number of calm/burst cycles (30: phases scale with
the trace's length, so that a trace at 16x holds as many bursts as one at 0.1x), or with
``--min-seconds`` at least that much virtual time (60 s at 16x is 73,000 jobs per trace per
policy: hours on 2 cores). Figures are medians over seeds, min-max beside them in the tables.

Batch times: every policy at a (load, seed) runs on the same simulated machine (common random
numbers on a time grid, ``mosel.machine``); AV-Digits batches draw from the recorded residuals'
body, and the stalls fitted from them strike at their own rate (``--no-stalls``: none).

Metrics: violation ratio over all submitted requests, goodput, ``correct_rps`` (expected correct
answers delivered on time per second), accuracy over served and over all requests, JCT p50/p99,
decision p99, and capacity (largest load at a violation target, interpolated on the load grid in
log-load, per seed) for targets 0.1, 1, 2, 5 and 10%. Grid interpolation reads a capacity low
where the crossing falls between far-apart loads: ``benchmarks/budget.py`` bisects per seed.

Modes: simulated (virtual clock, committed profiles: the same numbers on every machine) and
``--real`` (the AV-Digits model serves real traces live on ``--device``; measured, so noisy).

Run: python benchmarks/run.py --quick --json out.json        (under 10 minutes on 2 cores)
     python benchmarks/run.py --full --json out.json --plots docs/img
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import capacity, config_for, spread, trace_seconds, violation
from conditions import CONDITIONS, Conditions, arrivals_for, metrics, rate_per_s
from scenarios import scenario_named

import mosel

POLICIES = ("agnostic", "agnostic_plus", "batcher", "aggressive", "greedy", "mosel", "paper", "paper_fixed")
TARGETS = (0.001, 0.01, 0.02, 0.05, 0.1)
HEADLINE_LOADS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
HEADLINE_METRICS = (
    "violation_ratio",
    "goodput_rps",
    "correct_rps",
    "accuracy_served",
    "accuracy_all",
    "jct_p50_ms",
    "jct_p99_ms",
    "decision_p99_ms",
)


def cell(
    name: str, cond_key: str, slack_ms: float, load: float, seed: int, jobs: int, min_seconds: float,
    policies: tuple[str, ...], stalls: bool = True,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Every policy on one trace and one machine: (scenario, conditions, slack, load, seed)."""
    scenario = scenario_named(name)
    conditions = CONDITIONS[cond_key]
    seconds = trace_seconds(scenario.profile, load, jobs, min_seconds)
    arrivals = arrivals_for(
        scenario.profile, conditions, load, seconds, seed, slack_ms=slack_ms, drop=scenario.drop
    )
    out = {}
    for policy in policies:
        started = time.perf_counter()
        sim = mosel.simulate(
            scenario.profile,
            arrivals,
            config_for(policy, conditions),
            seed=seed,
            **scenario.machine(stalls),
        )
        out[policy] = metrics(sim, seconds, conditions)
        out[policy]["wall_s"] = time.perf_counter() - started
    return out


def summarise(
    grid: dict[tuple[float, int], dict[str, dict[str, float]]],
    loads: list[float],
    seeds: list[int],
    conditions: Conditions,
    policies: tuple[str, ...],
) -> dict[str, Any]:
    """Capacities per target and per-load metrics, medians over seeds with min-max."""
    caps: dict[str, dict[str, dict[str, float]]] = {}
    for policy in policies:
        caps[policy] = {}
        for target in TARGETS:
            per_seed = [
                capacity(loads, [violation(grid[(load, s)][policy], conditions) for load in loads], target)
                for s in seeds
            ]
            caps[policy][f"{target:g}"] = spread(per_seed) | {"per_seed": per_seed}  # type: ignore[assignment,operator]
    by_load: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for load in loads:
        by_load[f"{load:g}"] = {
            policy: {
                metric: spread([grid[(load, s)][policy].get(metric, math.nan) for s in seeds])
                for metric in (
                    *HEADLINE_METRICS,
                    "window_violation_ratio",
                    "dropped_ratio",
                    "jobs",
                    "seconds",
                )
                if metric in grid[(load, seeds[0])][policy]
            }
            for policy in policies
        }
    return {"capacity": caps, "loads": by_load}


def headline(summary: dict[str, Any], loads: list[float]) -> dict[str, Any]:
    """The headline form: capacity {POLICY: {TARGET: median load}}, loads {LOAD: {POLICY: {METRIC: median}}}."""
    return {
        "capacity": {
            policy: {target: cell["median"] for target, cell in by_target.items()}
            for policy, by_target in summary["capacity"].items()
        },
        "loads": {
            key: {policy: {m: v["median"] for m, v in ms.items()} for policy, ms in by_policy.items()}
            for key, by_policy in summary["loads"].items()
            if float(key) in HEADLINE_LOADS or float(key) in loads[-1:]
        },
    }


def plot(folder: Path, name: str, cond_key: str, loads: list[float], summary: dict[str, Any]) -> list[str]:
    """Violations and correct answers per second against load, one figure per condition set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy in summary["capacity"]:
        cells = [summary["loads"][f"{load:g}"][policy] for load in loads]
        metric = "window_violation_ratio" if "window_violation_ratio" in cells[0] else "violation_ratio"
        left.plot(loads, [100 * c[metric]["median"] for c in cells], marker="o", label=policy)
        right.plot(loads, [c["correct_rps"]["median"] for c in cells], marker="o", label=policy)
    left.set(
        xlabel="load (x all-modality capacity)",
        ylabel="violations (%)",
        xscale="log",
        title=f"{name}, {cond_key}",
    )
    right.set(
        xlabel="load (x all-modality capacity)",
        ylabel="correct answers on time / s",
        xscale="log",
        yscale="log",
    )
    left.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"{name}-{cond_key}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def bound_cell(name: str, load: float, jobs: int, seed: int, limit_s: float) -> dict[str, Any]:
    """The clairvoyant bound on one short bursty trace (about ``jobs`` jobs) against every policy."""
    import bound

    scenario = scenario_named(name)
    conditions = CONDITIONS["strict-bursty"]
    seconds = jobs / rate_per_s(scenario.profile, load)
    arrivals = arrivals_for(
        scenario.profile, conditions, load, seconds, seed, slack_ms=scenario.slack_ms, drop=scenario.drop,
        phase_s=seconds / 4,
    )  # fmt: skip
    sims = {p: mosel.simulate(scenario.profile, arrivals, config_for(p, conditions)) for p in POLICIES}
    units = {p: bound.on_time_units(sim) for p, sim in sims.items()}
    requests = {p: sum(r.arrival.n for r in sim.records if r.on_time) for p, sim in sims.items()}
    best = max(units, key=lambda p: units[p])
    found = bound.batched_optimum(scenario.profile, arrivals, hint=sims[best], time_limit_s=limit_s)
    upper = bound.lp_upper_bound(scenario.profile, arrivals)
    achievable = max(found.best_found_units, *units.values())
    return {
        "load": load,
        "seconds": seconds,
        "seed": seed,
        "jobs": len(arrivals),
        "requests": sum(a.n for a in arrivals),
        "policy_units": units,
        "policy_requests": requests,
        "best_found_units": achievable,
        "best_found_requests": found.best_found_requests,
        "proven_optimal": found.proven_optimal,
        "lp_upper_units": upper,
        "mosel_share_of_gain": bound.share_of_gain(units["mosel"], units["aggressive"], achievable),
        "mosel_share_of_gain_lp": bound.share_of_gain(units["mosel"], units["aggressive"], upper),
        "requests_lost_by_best": sum(a.n for a in arrivals) - found.best_found_requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the headline in under 10 minutes on 2 cores")
    size.add_argument(
        "--full", action="store_true", help="finer loads, longer traces, the slack axis, a longer bound"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plots", help="write PNG plots to this folder (needs matplotlib)")
    parser.add_argument("--scenario", action="append", choices=["paper-tvlt", "av-digits"])
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--jobs", type=int, help="jobs per trace")
    parser.add_argument("--min-seconds", type=float, help="every trace lasts at least this long")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument(
        "--no-stalls", action="store_true", help="AV-Digits batches without the fitted stalls"
    )
    parser.add_argument("--real", action="store_true", help="also serve the AV-Digits model live")
    parser.add_argument("--real-only", action="store_true", help="only the live mode")
    parser.add_argument("--device", default="cpu", help="device of the live mode")
    parser.add_argument("--real-repeats", type=int, help="repeats of each live trace (default 3, --full 5)")
    parser.add_argument(
        "--real-seconds", type=float, help="length of each live trace (default 5 s, --full 20 s)"
    )
    parser.add_argument("--real-loads", type=float, nargs="+", help="loads of the live mode (default 1.0)")
    parser.add_argument(
        "--real-policies",
        nargs="+",
        help='live-mode policies, e.g. mosel "mosel q=0.7" "mosel b=0.01" (default: all)',
    )
    args = parser.parse_args()
    policies = tuple(args.policies)
    if args.full:
        loads = [0.02, 0.035, 0.06, 0.1, 0.18, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.7, 8.0, 11.3, 16.0]
        jobs, min_seconds, seeds, slacks, bound_limit = 4000, 0.0, 5, (17.0, 34.0, 55.0), 60.0
    else:
        loads = [0.02, 0.05, 0.12, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
        jobs, min_seconds, seeds, slacks, bound_limit = 1200, 0.0, 5, (17.0,), 10.0
    jobs = args.jobs or jobs
    min_seconds = args.min_seconds if args.min_seconds is not None else min_seconds
    seed_list = list(range(args.seeds or seeds))
    names = [] if args.real_only else args.scenario or ["paper-tvlt", "av-digits"]
    started = time.perf_counter()
    out: dict[str, Any] = {
        "config": {
            "loads": loads, "jobs_per_trace": jobs, "min_seconds": min_seconds, "seeds": seed_list,
            "targets": list(TARGETS), "policies": list(policies), "mode": "full" if args.full else "quick",
            "stalls": not args.no_stalls, "draws": "time-grid",
        },
        "scenarios": {},
        "detail": {},
    }  # fmt: skip
    keys = []
    for name in names:
        scenario = scenario_named(name)
        for cond_key in CONDITIONS:
            for slack in slacks if name == "paper-tvlt" and cond_key == "strict" else (scenario.slack_ms,):
                keys += [(name, cond_key, slack, load, s) for load in loads for s in seed_list]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            key: pool.submit(cell, *key, jobs, min_seconds, policies, not args.no_stalls)  # type: ignore[arg-type]
            for key in keys
        }
        bounds = {
            name: [
                pool.submit(bound_cell, name, load, 120, s, bound_limit)
                for s in seed_list[: 5 if args.full else 2]
                for load in ((1.5, 4.0, 8.0) if args.full else (4.0,))
            ]
            for name in names
        }
        results = {key: f.result() for key, f in futures.items()}
        bound_results = {name: [f.result() for f in fs] for name, fs in bounds.items()}
    for name in names:
        scenario = scenario_named(name)
        head: dict[str, Any] = {"capacity": {}, "loads": {}, "bursty": {}, "slack": {}}
        detail: dict[str, Any] = {}
        for cond_key, conditions in CONDITIONS.items():
            for slack in slacks if name == "paper-tvlt" and cond_key == "strict" else (scenario.slack_ms,):
                grid = {
                    (load, s): results[(name, cond_key, slack, load, s)] for load in loads for s in seed_list
                }
                summary = summarise(grid, loads, seed_list, conditions, policies)
                label = cond_key if slack == scenario.slack_ms else f"{cond_key}-slack{slack:g}"
                detail[label] = summary | {"slack_ms": slack}
                short = headline(summary, loads)
                if label in ("strict", "paper"):
                    head["capacity"][label] = short["capacity"]
                    head["loads"][label] = short["loads"]
                elif cond_key == "strict-bursty":
                    head["bursty"] = short
                else:
                    head["slack"][f"{slack:g}"] = {"capacity": short["capacity"]}
                stalls = not args.no_stalls
                report(name, label, conditions, slack, summary, loads, seed_list, jobs, min_seconds, stalls)
                if args.plots:
                    try:
                        detail[label]["plots"] = plot(Path(args.plots), name, label, loads, summary)
                    except ImportError:
                        print("plots skipped: pip install matplotlib")
        found = bound_results.get(name, [])
        if found:
            shares = [b["mosel_share_of_gain"] for b in found]
            head["bound"] = {
                "load": statistics.median(b["load"] for b in found),
                "mosel_share_of_gain": statistics.median(shares),
                "mosel_share_of_gain_min": min(shares),
                "mosel_share_of_gain_lp": statistics.median(b["mosel_share_of_gain_lp"] for b in found),
                "traces": len(found),
                "conditions": "strict-bursty",
            }
            detail["bound"] = found
            report_bound(name, found)
        head["slack_ms"] = scenario.slack_ms
        head["drop"] = scenario.drop
        out["scenarios"][name] = head
        out["detail"][name] = detail
    out["headline"] = {"scenarios": out["scenarios"]}
    if args.real or args.real_only:
        from real import real_mode

        out["real"] = real_mode(
            args.device, seed=0, full=args.full, repeats=args.real_repeats, seconds=args.real_seconds,
            loads=tuple(args.real_loads) if args.real_loads else None,
            labels=tuple(args.real_policies) if args.real_policies else None,
        )  # fmt: skip
    out["config"]["wall_s"] = time.perf_counter() - started
    print(f"\nbenchmark finished in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


def report(
    name: str, label: str, conditions: Conditions, slack: float, summary: dict[str, Any],
    loads: list[float], seeds: list[int], jobs: int, min_seconds: float, stalls: bool = True,
) -> None:  # fmt: skip
    """Print one (scenario, conditions) block: capacities, then metrics at the headline loads."""
    what = "windowed violations (4 s)" if conditions.windowed else "violations over all requests"
    print(
        f"\n## {name}, {label}: {conditions.arrivals} arrivals, slack {slack:g} ms, {len(seeds)} seeds, "
        f"{jobs} jobs per trace" + (f" (at least {min_seconds:g} s)" if min_seconds else "") + f"; {what}; "
        f"batch times: {scenario_named(name).machine_source(stalls)}, every policy on the same machine "
        f"(common random numbers); latency_quantile "
        f"{mosel.SchedulerConfig().latency_quantile}"
    )
    print("capacity (x all-modality capacity), median [min-max] over seeds:")
    print("| policy | " + " | ".join(f"{t:.1%}" for t in TARGETS) + " |")
    print("|---|" + "---:|" * len(TARGETS))
    for policy, by_target in summary["capacity"].items():
        cells = [by_target[f"{t:g}"] for t in TARGETS]
        print(
            f"| {policy} | "
            + " | ".join(f"{c['median']:.3g} [{c['min']:.3g}-{c['max']:.3g}]" for c in cells)
            + " |"
        )
    metric = "window_violation_ratio" if conditions.windowed else "violation_ratio"
    print(
        "at fixed loads, medians over seeds: violations / correct_rps / accuracy over all requests / JCT p99 ms"
    )
    print("| load | " + " | ".join(summary["capacity"]) + " |")
    print("|---:|" + "---|" * len(summary["capacity"]))
    for load in loads:
        if load not in HEADLINE_LOADS:
            continue
        row = summary["loads"][f"{load:g}"]
        cells = [
            f"{row[p][metric]['median']:.2%} / {row[p]['correct_rps']['median']:.1f} / "
            f"{row[p]['accuracy_all']['median']:.4f} / {row[p]['jct_p99_ms']['median']:.1f}"
            for p in summary["capacity"]
        ]
        print(f"| {load:g} | " + " | ".join(cells) + " |")


def report_bound(name: str, found: list[dict[str, Any]]) -> None:
    """Print the clairvoyant bound against every policy."""
    print(
        f"\n## {name}: clairvoyant bound on short bursty traces (strict), expected correct answers on time "
        "(exact batch times for every policy: the bound's own cost model)"
    )
    print(
        "| load | seed | jobs | requests | "
        + " | ".join(POLICIES)
        + " | best found | LP bound | mosel share of gain over aggressive |"
    )
    print("|---:|---:|---:|---:|" + "---:|" * (len(POLICIES) + 3))
    for b in found:
        cells = " | ".join(f"{b['policy_units'][p] / 1e6:.2f}" for p in POLICIES)
        print(
            f"| {b['load']:g} | {b['seed']} | {b['jobs']} | {b['requests']} | {cells} | "
            f"{b['best_found_units'] / 1e6:.2f}{' (opt)' if b['proven_optimal'] else ''} | "
            f"{b['lp_upper_units'] / 1e6:.2f} | {b['mosel_share_of_gain']:.3f} (LP: {b['mosel_share_of_gain_lp']:.3f}) |"
        )


if __name__ == "__main__":
    main()
