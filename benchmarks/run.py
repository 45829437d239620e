"""The benchmark: mosel against the paper's baselines on the paper's kind of workload.

Policies (all through the same scheduler code): ``agnostic`` (EDF, every modality: the paper's
baseline), ``batcher`` (FIFO dynamic batching, every modality, as Triton or Ray Serve), ``aggressive``
(cheapest admissible strategy), ``greedy`` (the paper's fallback), ``mosel`` (the online stage)
and ``oracle`` (CP-SAT over a whole short trace, knowing every arrival).

Workloads: Poisson arrivals at a fixed rate (the paper's fixed-QPS sweeps) and a Markov-modulated
Poisson process (bursts 4x the calm rate) standing in for the paper's Twitter trace; job sizes
max(1, int(N(1, 6))) capped at 32; deadline = arrival + the job's all-modality latency + slack;
floor = best accuracy - drop. Load is a multiple of the all-modality capacity predicted by the
profile (jobs one at a time).

Headline figures, medians over seeds: ``throughput_ratio`` (mosel's over agnostic's largest load
with at most 1% of requests late or dropped, Poisson; ``throughput_ratio_bursty`` likewise),
``jct_ratio`` (agnostic's over mosel's p50 completion time at 1.5x, bursty) and ``oracle_gap``
(mosel's goodput over the best a clairvoyant one-job-at-a-time schedule can reach, the lowest
over the loads tried).

Modes: simulated (virtual clock, execution times from the profile; deterministic) and ``--real``
(the AV-Digits model serves the trace in real time through its threaded server, on ``--device``;
accuracy is also measured against the labels).

Run: python benchmarks/run.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle
from replay import replay, with_inputs
from scenarios import Scenario, av_digits, av_digits_model, paper_tvlt
from workloads import bursty_arrivals, job_size, poisson_arrivals

import mosel

POLICIES = ("agnostic", "batcher", "aggressive", "greedy", "mosel")
Arrivals = Callable[[float, float, int], list[float]]
WORKLOADS: dict[str, Arrivals] = {"poisson": poisson_arrivals, "bursty": bursty_arrivals}


_MEAN_FULL_MS: dict[int, tuple[mosel.Profile, float]] = {}


def mean_full_ms(profile: mosel.Profile) -> float:
    """Mean all-modality latency of the paper's job sizes (computed once per profile)."""
    cached = _MEAN_FULL_MS.get(id(profile))
    if cached is not None and cached[0] is profile:
        return cached[1]
    everything = frozenset(profile.modalities)
    sizes = [job_size(random.Random(i), profile.max_batch_size) for i in range(5000)]
    mean = statistics.mean(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in sizes)
    _MEAN_FULL_MS[id(profile)] = (profile, mean)
    return mean


def trace(
    scenario: Scenario, load: float, seconds: float, seed: int, arrivals: Arrivals = bursty_arrivals
) -> list[mosel.Arrival]:
    """A seeded workload at ``load`` times the all-modality capacity."""
    profile = scenario.profile
    everything = frozenset(profile.modalities)
    rate = load * 1000.0 / mean_full_ms(profile)
    floor = round(max(profile.accuracy.values()) - scenario.drop, 4)
    rng = random.Random(seed + 1)
    out = []
    for t in arrivals(rate, seconds, seed):
        n = job_size(rng, profile.max_batch_size)
        full = profile.plan.frontier(everything, n).best.predicted_latency_ms
        out.append(mosel.Arrival(t, n, deadline_ms=full + scenario.slack_ms, min_accuracy=floor))
    return out


def seconds_for(scenario: Scenario, load: float, jobs: int) -> float:
    """How long a trace at ``load`` must be to hold about ``jobs`` jobs."""
    return jobs * mean_full_ms(scenario.profile) / (1000.0 * load)


def metrics(sim: mosel.Simulation, seconds: float) -> dict[str, float]:
    """The issue's metrics for one simulated run."""
    requests = sum(r.arrival.n for r in sim.records)
    on_time = sum(r.arrival.n for r in sim.records if r.on_time)
    served = [r for r in sim.records if r.served]
    jct = sorted(r.completion_ms for r in served)
    served_requests = sum(r.arrival.n for r in served)
    decisions = sorted(sim.decision_ms)
    return {
        "goodput_rps": on_time / seconds,
        "violation_ratio": 1 - on_time / requests if requests else 0.0,
        "jct_p50_ms": statistics.median(jct) if jct else math.nan,
        "jct_p99_ms": jct[int(0.99 * (len(jct) - 1))] if jct else math.nan,
        "expected_accuracy": sum(r.expected_accuracy * r.arrival.n for r in served) / served_requests
        if served_requests
        else math.nan,
        "decision_p99_ms": decisions[int(0.99 * (len(decisions) - 1))] if decisions else 0.0,
        "jobs": len(sim.records),
        "requests": requests,
    }


def run_policy(
    scenario: Scenario, arrivals: list[mosel.Arrival], policy: str, seconds: float, **config: object
) -> dict[str, float]:
    sim = mosel.simulate(scenario.profile, arrivals, mosel.SchedulerConfig(policy=policy, **config))  # type: ignore[arg-type]
    return metrics(sim, seconds)


def sustainable_load(
    scenario: Scenario,
    policy: str,
    jobs: int,
    seed: int,
    arrivals: Arrivals = bursty_arrivals,
    target: float = 0.01,
) -> float:
    """The largest load (x all-modality capacity) with violation ratio <= target, by search.

    Every trace holds about ``jobs`` jobs, so light loads are judged on as many jobs as heavy ones.
    """

    def ok(load: float) -> bool:
        seconds = seconds_for(scenario, load, jobs)
        arrived = trace(scenario, load, seconds, seed, arrivals)
        return run_policy(scenario, arrived, policy, seconds)["violation_ratio"] <= target

    good, load = 0.0, 0.02
    while load < 64 and ok(load):
        good, load = load, load * 1.5
    bad = load
    for _ in range(6):
        mid = (good + bad) / 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


def oracle_gap(
    scenario: Scenario, load: float, seconds: float, seed: int, limit_s: float
) -> dict[str, float]:
    """Mosel (one job at a time, as the oracle) against the clairvoyant schedule of a short trace."""
    arrivals = trace(scenario, load, seconds, seed)
    sim = mosel.simulate(scenario.profile, arrivals, mosel.SchedulerConfig(batching=False))
    ours = metrics(sim, seconds)
    hint = {i: (r.started_s, r.strategies[0]) for i, r in enumerate(sim.records) if r.on_time}
    best = oracle.solve(scenario.profile, arrivals, limit_s, hint=hint)
    served = ours["goodput_rps"] * seconds
    return {
        "load": load,
        "oracle_goodput_rps": best.served_requests / seconds,
        "oracle_bound_rps": best.served_bound / seconds,
        "mosel_goodput_rps": ours["goodput_rps"],
        "oracle_gap": served / best.served_requests if best.served_requests else math.nan,
        "oracle_gap_to_bound": served / best.served_bound if best.served_bound else math.nan,
        "oracle_proven_optimal": float(best.optimal),
        "jobs": len(arrivals),
    }


_SCENARIOS: dict[str, Scenario | None] = {}


def scenario_named(name: str) -> Scenario | None:
    """A scenario by name, built once per process."""
    if name not in _SCENARIOS:
        _SCENARIOS[name] = paper_tvlt() if name == "paper-tvlt" else av_digits()
    return _SCENARIOS[name]


def _task(kind: str, name: str, *args: object) -> object:
    """One unit of work for the process pool (a search, a table, an oracle run)."""
    scenario = scenario_named(name)
    assert scenario is not None
    if kind == "sustainable":
        policy, workload, jobs, seed = args
        return sustainable_load(scenario, policy, jobs, seed, WORKLOADS[workload])  # type: ignore[arg-type]
    if kind == "table":
        load, seconds, seed = args
        arrived = trace(scenario, load, seconds, seed)  # type: ignore[arg-type]
        return {p: run_policy(scenario, arrived, p, seconds) for p in POLICIES}  # type: ignore[arg-type]
    if kind == "oracle":
        load, seconds, seed, limit_s = args
        return oracle_gap(scenario, load, seconds, seed, limit_s)  # type: ignore[arg-type]
    raise ValueError(kind)


def jct_ceiling(scenario: Scenario, arrivals: list[mosel.Arrival], agnostic_p50_ms: float) -> float:
    """The largest jct_ratio any policy could reach: agnostic's p50 over the p50 of every job run
    alone at its cheapest admissible strategy the moment it arrives."""
    profile = scenario.profile
    everything = frozenset(profile.modalities)
    cheapest = []
    for a in arrivals:
        frontier = profile.plan.frontier(everything, a.n)
        floor = round((a.min_accuracy or 0.0) * mosel.plan.ACCURACY_SCALE) * a.n
        cheapest.append(frontier.strategies[frontier.index_meeting(floor)].predicted_latency_ms)
    return agnostic_p50_ms / statistics.median(cheapest)


def real_mode(
    device: str, seconds: float, seed: int, loads: tuple[float, ...], repeats: int
) -> dict[str, object]:
    """Every policy serving the same AV-Digits traces in real time on ``device``.

    Each repeat replays a fresh trace per load to every policy, in a rotated order (so a drift of
    the machine does not favour one policy); the table gives medians over repeats.
    """
    built = av_digits_model(device)
    if built is None:
        print("real mode skipped: espeak-ng is needed to build AV-Digits")
        return {}
    model, profile, test = built
    everything = frozenset(profile.modalities)
    mean_ms = sum(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in range(1, 9)) / 8
    scenario = Scenario("av-digits", profile, slack_ms=3 * mean_ms, drop=0.06)
    out: dict[str, object] = {"device": device, "seconds": seconds, "repeats": repeats, "loads": {}}
    for load in loads:
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in POLICIES}
        for r in range(repeats):
            jobs = with_inputs(trace(scenario, load, seconds, seed + r), test, seed + r)
            for policy in POLICIES[r % len(POLICIES) :] + POLICIES[: r % len(POLICIES)]:
                runs[policy].append(replay(model, profile, jobs, policy))
        medians = {p: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for p, ms in runs.items()}
        out["loads"][str(load)] = {"policies": medians, "runs": runs}  # type: ignore[index]
        print(
            f"\nreal mode, av-digits on {device}: load {load}, {repeats} x {seconds:.0f} s per policy "
            f"(about {medians['mosel']['jobs']:.0f} jobs each); medians over repeats"
        )
        print(
            f"{'policy':<11} {'goodput':>9} {'violations':>17} {'JCT p50':>9} {'JCT p99':>9} "
            f"{'expected':>9} {'measured':>9}"
        )
        for policy, m in medians.items():
            spread = [v["violation_ratio"] for v in runs[policy]]
            print(
                f"{policy:<11} {m['goodput_rps']:>9.1f} {m['violation_ratio']:>6.1%} "
                f"[{min(spread):>4.1%}-{max(spread):>4.1%}] {m['jct_p50_ms']:>9.2f} "
                f"{m['jct_p99_ms']:>9.2f} {m['expected_accuracy']:>9.4f} {m['measured_accuracy']:>9.4f}"
            )
    return out


def sweep(scenario: Scenario, loads: list[float], jobs: int, seed: int) -> dict[str, list[float]]:
    """Violation ratio of every policy at each load (Poisson arrivals, about ``jobs`` jobs)."""
    out: dict[str, list[float]] = {}
    for policy in POLICIES:
        out[policy] = []
        for load in loads:
            seconds = seconds_for(scenario, load, jobs)
            arrived = trace(scenario, load, seconds, seed, poisson_arrivals)
            out[policy].append(run_policy(scenario, arrived, policy, seconds)["violation_ratio"])
    return out


def plot(
    folder: Path,
    name: str,
    loads: list[float],
    violations: dict[str, list[float]],
    jct: dict[str, list[float]],
) -> list[str]:
    """Violation ratio against load per policy, and the JCT CDF at the fixed load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in violations.items():
        ax.plot(loads, [100 * v for v in values], marker="o", label=policy)
    ax.set(
        xlabel="load (x all-modality capacity)", ylabel="deadline violations (%)", title=name, xscale="log"
    )
    ax.legend()
    fig.tight_layout()
    first = folder / f"{name}-violations.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in jct.items():
        ordered = sorted(values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=policy)
    ax.set(
        xlabel="job completion time (ms)",
        ylabel="fraction of served jobs",
        title=f"{name}: JCT CDF",
        xscale="log",
    )
    ax.legend()
    fig.tight_layout()
    second = folder / f"{name}-jct-cdf.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [str(first), str(second)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short traces (under 5 minutes on 2 cores)")
    size.add_argument(
        "--full", action="store_true", help="longer traces, more seeds, every policy's capacity"
    )
    parser.add_argument("--real", action="store_true", help="also serve the AV-Digits model for real")
    parser.add_argument("--real-only", action="store_true", help="only the real mode (no simulation)")
    parser.add_argument("--device", default="cpu", help="device of the real mode (cpu, cuda)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plots", help="write PNG plots to this folder (needs matplotlib)")
    parser.add_argument("--scenario", action="append", choices=["paper-tvlt", "av-digits"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.quick:
        seconds, jobs, seeds, oracle_s, oracle_limit, real_s, repeats = 10.0, 1500, 3, 1.0, 10.0, 5.0, 3
    elif args.full:
        seconds, jobs, seeds, oracle_s, oracle_limit, real_s, repeats = 60.0, 6000, 7, 2.0, 60.0, 20.0, 5
    else:
        seconds, jobs, seeds, oracle_s, oracle_limit, real_s, repeats = 30.0, 3000, 5, 2.0, 30.0, 10.0, 3
    capacity_policies = POLICIES if args.full else ("agnostic", "mosel")
    oracle_loads = (1.5, 4.0)
    load = 1.5
    names = [] if args.real_only else args.scenario or ["paper-tvlt", "av-digits"]
    started = time.perf_counter()
    out: dict[str, object] = {
        "scenarios": {},
        "config": {"seconds": seconds, "jobs_per_search": jobs, "seeds": seeds, "seed": args.seed},
    }
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures: dict[tuple[object, ...], object] = {}
        for name in names:
            seeded = [args.seed + i for i in range(seeds)]
            for seed in seeded:
                futures[(name, "table", seed)] = pool.submit(_task, "table", name, load, seconds, seed)
                for workload in WORKLOADS:
                    for policy in capacity_policies:
                        futures[(name, "sustainable", workload, policy, seed)] = pool.submit(
                            _task, "sustainable", name, policy, workload, jobs, seed
                        )
            for oload in oracle_loads:
                futures[(name, "oracle", oload)] = pool.submit(
                    _task, "oracle", name, oload, oracle_s, args.seed, oracle_limit
                )
        done = {key: future.result() for key, future in futures.items()}  # type: ignore[attr-defined]
    for name in names:
        scenario = scenario_named(name)
        if scenario is None:
            print(f"{name}: skipped (espeak-ng is needed to build AV-Digits)")
            continue
        seeded = [args.seed + i for i in range(seeds)]
        tables = [done[(name, "table", seed)] for seed in seeded]
        policies: dict[str, dict[str, float]] = tables[0]  # type: ignore[assignment]
        capacity = {
            workload: {
                p: [done[(name, "sustainable", workload, p, seed)] for seed in seeded]
                for p in capacity_policies
            }
            for workload in WORKLOADS
        }
        ratios = {
            workload: statistics.median(
                m / a if a else math.inf
                for m, a in zip(c["mosel"], c["agnostic"])  # type: ignore[operator]
            )
            for workload, c in capacity.items()
        }
        jct = [t["agnostic"]["jct_p50_ms"] / t["mosel"]["jct_p50_ms"] for t in tables]  # type: ignore[index]
        jct_batcher = [t["batcher"]["jct_p50_ms"] / t["mosel"]["jct_p50_ms"] for t in tables]  # type: ignore[index]
        arrivals = trace(scenario, load, seconds, args.seed)
        oracles = [done[(name, "oracle", oload)] for oload in oracle_loads]
        gap = min(o["oracle_gap"] for o in oracles)  # type: ignore[index]
        policies["oracle"] = {"goodput_rps": oracles[0]["oracle_goodput_rps"]}  # type: ignore[index]
        result: dict[str, object] = {
            "policies": policies,
            "load": load,
            "throughput_ratio": ratios["poisson"],
            "throughput_ratio_bursty": ratios["bursty"],
            "sustainable_load": capacity,
            "jct_ratio": statistics.median(jct),
            "jct_ratio_per_seed": jct,
            # The agnostic baseline drops late jobs, which bounds its JCT; a batcher never drops.
            "jct_ratio_batcher": statistics.median(jct_batcher),
            "jct_ratio_ceiling": jct_ceiling(scenario, arrivals, policies["agnostic"]["jct_p50_ms"]),
            "oracle_gap": gap,
            "oracle": oracles,
        }
        if args.plots or args.full:
            loads = [0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0] if args.full else [0.25, 0.5, 1.0, 2.0, 4.0]
            result["sweep"] = {"loads": loads, "violation_ratio": sweep(scenario, loads, jobs, args.seed)}
        if args.plots:
            jct_values = {
                p: [
                    r.completion_ms
                    for r in mosel.simulate(
                        scenario.profile,
                        arrivals,
                        mosel.SchedulerConfig(policy=p),  # type: ignore[arg-type]
                    ).records
                    if r.served
                ]
                for p in POLICIES
            }
            try:
                result["plots"] = plot(
                    Path(args.plots),
                    name,
                    loads,
                    result["sweep"]["violation_ratio"],
                    jct_values,  # type: ignore[index]
                )
            except ImportError:
                print("plots skipped: pip install matplotlib")
        out["scenarios"][name] = result  # type: ignore[index]
        report(name, scenario, result, seeds, oracle_s, args.seed)
    if args.real or args.real_only:
        loads_real = (0.5, 1.0, 1.5) if args.full else (1.0,)
        out["real"] = real_mode(args.device, real_s, args.seed, loads_real, repeats)
    print(f"\nbenchmark finished in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


def report(
    name: str, scenario: Scenario, result: dict[str, object], seeds: int, oracle_s: float, seed: int
) -> None:
    """Print one scenario's table and headline figures."""
    policies: dict[str, dict[str, float]] = result["policies"]  # type: ignore[assignment]
    print(
        f"\n{name}: bursty load {result['load']}x the all-modality capacity, {policies['mosel']['jobs']:.0f} "
        f"jobs, slack {scenario.slack_ms:.1f} ms, floor = best - {scenario.drop} (seed {seed})"
    )
    print(
        f"{'policy':<11} {'goodput':>9} {'violations':>11} {'JCT p50':>9} {'JCT p99':>9} "
        f"{'accuracy':>9} {'decide p99':>11}"
    )
    for policy, m in policies.items():
        if policy == "oracle":
            continue
        print(
            f"{policy:<11} {m['goodput_rps']:>9.1f} {m['violation_ratio']:>11.1%} {m['jct_p50_ms']:>9.2f} "
            f"{m['jct_p99_ms']:>9.2f} {m['expected_accuracy']:>9.4f} {m['decision_p99_ms']:>9.3f}ms"
        )
    capacity: dict[str, dict[str, list[float]]] = result["sustainable_load"]  # type: ignore[assignment]
    print(f"largest load with <= 1% violations (x capacity; median of {seeds} seeds [min-max]):")
    for workload, by_policy in capacity.items():
        cells = [f"{p} {statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]" for p, v in by_policy.items()]
        print(f"  {workload:<8} " + "; ".join(cells))
    for o in result["oracle"]:  # type: ignore[attr-defined]
        print(
            f"oracle at load {o['load']}, {o['jobs']} jobs in {oracle_s:.0f} s, one job at a time: "
            f"mosel {o['mosel_goodput_rps']:.0f} rps, oracle {o['oracle_goodput_rps']:.0f} rps "
            f"(bound {o['oracle_bound_rps']:.0f}{', optimal' if o['oracle_proven_optimal'] else ''})"
        )
    print(
        f"throughput_ratio {result['throughput_ratio']:.2f} (bursty {result['throughput_ratio_bursty']:.2f}); "
        f"jct_ratio {result['jct_ratio']:.2f} (ceiling {result['jct_ratio_ceiling']:.2f}; batcher over "
        f"mosel {result['jct_ratio_batcher']:.2f}); oracle_gap {result['oracle_gap']:.3f}"
    )


if __name__ == "__main__":
    main()
