"""The benchmark: mosel against the paper's baselines on the paper's kind of workload.

Policies (all through the same scheduler code): ``agnostic`` (EDF, every modality: the paper's
baseline), ``batcher`` (FIFO dynamic batching, every modality, as Triton or Ray Serve), ``aggressive``
(cheapest admissible strategy), ``greedy`` (the paper's fallback), ``mosel`` (the online stage)
and ``oracle`` (CP-SAT over a whole short trace, knowing every arrival).

Workload: a Markov-modulated Poisson process (bursts 4x the calm rate) standing in for the paper's
Twitter trace; job sizes max(1, int(N(1, 6))) capped at 32; deadline = arrival + the job's
all-modality latency + slack; floor = best accuracy - drop. Load is expressed as a multiple of the
all-modality capacity predicted by the profile.

Modes: simulated (virtual clock, execution times from the profile; deterministic) and ``--real``
(the AV-Digits model serves the trace in real time through its threaded server, on ``--device``;
accuracy is also measured against the labels).

Run: python benchmarks/run.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracle
from replay import replay, with_inputs
from scenarios import Scenario, av_digits, av_digits_model, paper_tvlt
from workloads import bursty_arrivals, job_size

import mosel

POLICIES = ("agnostic", "batcher", "aggressive", "greedy", "mosel")


def mean_full_ms(profile: mosel.Profile) -> float:
    everything = frozenset(profile.modalities)
    sizes = [job_size(random.Random(i), profile.max_batch_size) for i in range(5000)]
    return statistics.mean(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in sizes)


def trace(scenario: Scenario, load: float, seconds: float, seed: int) -> list[mosel.Arrival]:
    profile = scenario.profile
    everything = frozenset(profile.modalities)
    rate = load * 1000.0 / mean_full_ms(profile)
    floor = round(max(profile.accuracy.values()) - scenario.drop, 4)
    rng = random.Random(seed + 1)
    arrivals = []
    for t in bursty_arrivals(rate, seconds, seed):
        n = job_size(rng, profile.max_batch_size)
        full = profile.plan.frontier(everything, n).best.predicted_latency_ms
        arrivals.append(mosel.Arrival(t, n, deadline_ms=full + scenario.slack_ms, min_accuracy=floor))
    return arrivals


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
    scenario: Scenario, arrivals: list[mosel.Arrival], policy: str, seconds: float
) -> dict[str, float]:
    sim = mosel.simulate(scenario.profile, arrivals, mosel.SchedulerConfig(policy=policy))  # type: ignore[arg-type]
    return metrics(sim, seconds)


def sustainable_load(
    scenario: Scenario, policy: str, seconds: float, seed: int, target: float = 0.01
) -> float:
    """The largest load (x all-modality capacity) with violation ratio <= target, by search."""
    good, load = 0.0, 0.05
    while load < 64:
        if (
            run_policy(scenario, trace(scenario, load, seconds, seed), policy, seconds)["violation_ratio"]
            > target
        ):
            break
        good, load = load, load * 1.5
    bad = load
    for _ in range(5):
        mid = (good + bad) / 2
        ok = (
            run_policy(scenario, trace(scenario, mid, seconds, seed), policy, seconds)["violation_ratio"]
            <= target
        )
        good, bad = (mid, bad) if ok else (good, mid)
    return good


def oracle_gap(
    scenario: Scenario, load: float, seconds: float, seed: int, limit_s: float
) -> dict[str, float]:
    arrivals = trace(scenario, load, seconds, seed)
    best = oracle.solve(scenario.profile, arrivals, limit_s)
    ours = run_policy(scenario, arrivals, "mosel", seconds)
    oracle_goodput = best.served_requests / seconds
    return {
        "oracle_goodput_rps": oracle_goodput,
        "mosel_goodput_rps": ours["goodput_rps"],
        "oracle_gap": ours["goodput_rps"] / oracle_goodput if oracle_goodput else math.nan,
        "oracle_proven_optimal": float(best.optimal),
        "jobs": len(arrivals),
    }


def real_mode(device: str, seconds: float, seed: int, load: float = 0.5) -> dict[str, object]:
    """Every policy serving the same AV-Digits trace in real time on ``device``."""
    built = av_digits_model(device)
    if built is None:
        print("real mode skipped: espeak-ng is needed to build AV-Digits")
        return {}
    model, profile, test = built
    everything = frozenset(profile.modalities)
    mean_ms = sum(profile.plan.frontier(everything, n).best.predicted_latency_ms for n in range(1, 9)) / 8
    scenario = Scenario("av-digits", profile, slack_ms=3 * mean_ms, drop=0.06)
    jobs = with_inputs(trace(scenario, load, seconds, seed), test, seed)
    results = {policy: replay(model, profile, jobs, policy) for policy in POLICIES}
    print(f"\nreal mode, av-digits on {device}: {len(jobs)} jobs in {seconds:.0f} s at load {load}")
    print(
        f"{'policy':<11} {'goodput':>9} {'violations':>11} {'JCT p50':>9} {'JCT p99':>9} {'expected':>9} {'measured':>9}"
    )
    for policy, m in results.items():
        print(
            f"{policy:<11} {m['goodput_rps']:>9.1f} {m['violation_ratio']:>11.1%} {m['jct_p50_ms']:>9.2f} "
            f"{m['jct_p99_ms']:>9.2f} {m['expected_accuracy']:>9.4f} {m['measured_accuracy']:>9.4f}"
        )
    return {"device": device, "load": load, "seconds": seconds, "policies": results}


def sweep(scenario: Scenario, loads: list[float], seconds: float, seed: int) -> dict[str, list[float]]:
    """Violation ratio of every policy at each load."""
    return {
        policy: [
            run_policy(scenario, trace(scenario, load, seconds, seed), policy, seconds)["violation_ratio"]
            for load in loads
        ]
        for policy in POLICIES
    }


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
    size.add_argument("--full", action="store_true", help="longer traces and every policy in the sweeps")
    parser.add_argument("--real", action="store_true", help="also serve the AV-Digits model for real")
    parser.add_argument("--device", default="cpu", help="device of the real mode (cpu, cuda)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plots", help="write PNG plots to this folder (needs matplotlib)")
    parser.add_argument("--scenario", action="append", choices=["paper-tvlt", "av-digits"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seconds, sweep_seconds, oracle_seconds, oracle_limit = (
        (10.0, 5.0, 2.0, 10.0)
        if args.quick
        else (60.0, 20.0, 4.0, 60.0)
        if args.full
        else (30.0, 10.0, 3.0, 30.0)
    )
    names = args.scenario or ["paper-tvlt", "av-digits"]
    started = time.perf_counter()
    out: dict[str, object] = {"scenarios": {}, "config": {"seconds": seconds, "seed": args.seed}}
    for name in names:
        scenario = paper_tvlt() if name == "paper-tvlt" else av_digits()
        if scenario is None:
            print(f"{name}: skipped (espeak-ng is needed to build AV-Digits)")
            continue
        t0 = time.perf_counter()
        load = 1.5
        arrivals = trace(scenario, load, seconds, args.seed)
        policies = {p: run_policy(scenario, arrivals, p, seconds) for p in POLICIES}
        gap = oracle_gap(scenario, load, oracle_seconds, args.seed, oracle_limit)
        policies["oracle"] = {"goodput_rps": gap["oracle_goodput_rps"]}
        agnostic_load = sustainable_load(scenario, "agnostic", sweep_seconds, args.seed)
        mosel_load = sustainable_load(scenario, "mosel", sweep_seconds, args.seed)
        result = {
            "policies": policies,
            "load": load,
            "throughput_ratio": mosel_load / agnostic_load if agnostic_load else math.inf,
            "sustainable_load": {"agnostic": agnostic_load, "mosel": mosel_load},
            "jct_ratio": policies["agnostic"]["jct_p50_ms"] / policies["mosel"]["jct_p50_ms"],
            # The agnostic baseline drops late jobs, which bounds its JCT; a batcher never drops.
            "jct_ratio_batcher": policies["batcher"]["jct_p50_ms"] / policies["mosel"]["jct_p50_ms"],
            "oracle_gap": gap["oracle_gap"],
            "oracle": gap,
            "seconds_to_run": time.perf_counter() - t0,
        }
        if args.plots or args.full:
            loads = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0] if args.full else [0.25, 0.5, 1.0, 2.0]
            result["sweep"] = {
                "loads": loads,
                "violation_ratio": sweep(scenario, loads, sweep_seconds, args.seed),
            }
        if args.plots:
            jct = {
                p: [
                    r.completion_ms
                    for r in mosel.simulate(
                        scenario.profile, arrivals, mosel.SchedulerConfig(policy=p)
                    ).records
                    if r.served
                ]  # type: ignore[arg-type]
                for p in POLICIES
            }
            try:
                result["plots"] = plot(
                    Path(args.plots), name, result["sweep"]["loads"], result["sweep"]["violation_ratio"], jct
                )  # type: ignore[index]
            except ImportError:
                print("plots skipped: pip install matplotlib")
        out["scenarios"][name] = result  # type: ignore[index]
        print(
            f"\n{name}: load {load}x the all-modality capacity, {policies['mosel']['jobs']} jobs, "
            f"slack {scenario.slack_ms:.1f} ms, floor = best - {scenario.drop}"
        )
        print(
            f"{'policy':<11} {'goodput':>9} {'violations':>11} {'JCT p50':>9} {'JCT p99':>9} {'accuracy':>9} {'decide p99':>11}"
        )
        for policy, m in policies.items():
            if policy == "oracle":
                print(f"{'oracle':<11} {m['goodput_rps']:>9.1f}   (short trace of {oracle_seconds:.0f} s)")
                continue
            print(
                f"{policy:<11} {m['goodput_rps']:>9.1f} {m['violation_ratio']:>11.1%} {m['jct_p50_ms']:>9.2f} "
                f"{m['jct_p99_ms']:>9.2f} {m['expected_accuracy']:>9.4f} {m['decision_p99_ms']:>9.3f}ms"
            )
        print(
            f"throughput_ratio {result['throughput_ratio']:.2f} (sustainable load at <= 1% violations: "
            f"agnostic {agnostic_load:.3f}, mosel {mosel_load:.3f}); jct_ratio {result['jct_ratio']:.2f} "
            f"(batcher over mosel {result['jct_ratio_batcher']:.2f}); "
            f"oracle_gap {result['oracle_gap']:.3f}"
        )
    if args.real:
        out["real"] = real_mode(args.device, seconds=5.0 if args.quick else 20.0, seed=args.seed)
    print(f"\nbenchmark finished in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
