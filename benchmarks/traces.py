"""Decision traces: what every policy decided, job by job, on a fixed set of simulations.

The simulator is deterministic (virtual clock, seeded residuals, CP-SAT with a deterministic time
limit), so two versions of the scheduler make the same decisions exactly when these traces are
equal. A refactoring of the online core must leave them unchanged; a change of behaviour shows
here first, job by job.

A job's trace is its error (class name, or null), its start and finish on the virtual clock (jobs
of one batch share their start) and each task's strategy (rows per configuration). The cases
cover every policy (the baselines and the authors' policy of ``benchmarks/paper_policy.py``) on
both scenarios under the three condition sets at four loads, then the features that take other
paths through the core: per-request and confidence floors, rows without a modality, best effort,
jobs with no SLO, jobs larger than a batch, size buckets, non-default knobs and three routers in
front of four replicas.

Since issue 24 the simulator's default draws are common random numbers on a time grid
(``mosel.machine``): traces recorded before that differ in every case with residuals (110 of
223), and ``draws="per-batch"`` reproduces them exactly. Record both sides with one simulator.

Run: python benchmarks/traces.py record before.json    (about two minutes on 2 cores)
     python benchmarks/traces.py record after.json
     python benchmarks/traces.py compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_for
from conditions import CONDITIONS, arrivals_for, rate_per_s
from scenarios import scenario_named

import mosel
from mosel.testing import Passthrough, synthetic_profile

POLICIES = ("agnostic", "agnostic_plus", "batcher", "aggressive", "greedy", "mosel", "paper", "paper_fixed")
LOADS = (0.25, 1.0, 4.0, 12.0)
JOBS = 300

Trace = list[list[Any]]


def job_trace(record: mosel.simulate.JobRecord) -> list[Any]:
    """One job: [error, started_s, finish_s, [[configuration, rows], ...] per task]."""
    strategies = [[["+".join(sorted(c)), k] for c, k in s.groups] for s in record.strategies]
    started = None if record.started_s != record.started_s else record.started_s  # NaN: never ran
    finish = None if record.finish_s != record.finish_s else record.finish_s
    return [record.error, started, finish, strategies]


def sim_trace(sim: mosel.Simulation) -> Trace:
    """Every job of a simulation, in arrival order."""
    return [job_trace(r) for r in sim.records]


def _benchmark_cases() -> Iterator[tuple[str, Callable[[], Trace]]]:
    for name in ("av-digits", "paper-tvlt"):
        scenario = scenario_named(name)
        for key, conditions in CONDITIONS.items():
            for load in LOADS:
                seconds = JOBS / rate_per_s(scenario.profile, load)
                arrivals = arrivals_for(
                    scenario.profile, conditions, load, seconds, 0, slack_ms=scenario.slack_ms,
                    drop=scenario.drop,
                )  # fmt: skip
                for policy in POLICIES:

                    def run(
                        scenario: Any = scenario, arrivals: Any = arrivals, policy: str = policy,
                        conditions: Any = conditions,
                    ) -> Trace:  # fmt: skip
                        config = config_for(policy, conditions)
                        sim = mosel.simulate(scenario.profile, arrivals, config, residuals=scenario.residuals)
                        return sim_trace(sim)

                    yield f"{name}/{key}/{load}/{policy}", run


def _feature_arrivals(profile: mosel.Profile, seed: int) -> list[mosel.Arrival]:
    """A mixed trace: floors per request and at a confidence, missing modalities, best effort,
    no SLO, jobs larger than a batch."""
    rng = random.Random(seed)
    everything = frozenset(profile.modalities)
    best = max(profile.accuracy.values())
    rate = rate_per_s(profile, 1.5)
    out, t = [], 0.0
    for _ in range(JOBS):
        t += rng.expovariate(rate)
        n = rng.choice((1, 2, 4, 8, 16, 40))
        kind = rng.random()
        full = profile.plan.frontier(everything, min(n, profile.max_batch_size)).best.predicted_latency_ms
        deadline = full * (n / min(n, profile.max_batch_size)) + rng.uniform(5.0, 40.0)
        floor = round(best - rng.uniform(0.01, 0.08), 4)
        if kind < 0.15:
            out.append(mosel.Arrival(t, n, deadline, floor, per_request=True))
        elif kind < 0.3:
            out.append(mosel.Arrival(t, n, deadline, floor - 0.05, confidence=0.9))
        elif kind < 0.45:
            some = frozenset(rng.sample(sorted(everything), max(1, len(everything) - 1)))
            out.append(mosel.Arrival(t, n, deadline, None, available=some))
        elif kind < 0.55:
            out.append(mosel.Arrival(t, n, deadline / 3, floor, best_effort=True))
        elif kind < 0.6:
            out.append(mosel.Arrival(t, n))
        else:
            out.append(mosel.Arrival(t, n, deadline, floor))
    return out


def _sized_profile() -> mosel.Profile:
    base = [400.0 + 60.0 * b for b in range(1, 17)]
    return synthetic_profile(
        Passthrough,
        branch_us={"video": [2.0 * v for v in base]},
        sized_us={"audio": {64: base, 256: [3.0 * v for v in base], 1024: [9.0 * v for v in base]}},
        accuracy={"audio": 0.72, "video": 0.66, "audio+video": 0.75},
    )


def _feature_cases() -> Iterator[tuple[str, Callable[[], Trace]]]:
    for name in ("av-digits", "paper-tvlt"):
        scenario = scenario_named(name)
        arrivals = _feature_arrivals(scenario.profile, 3)
        for policy in ("mosel", "greedy", "greedy_cpsat", "aggressive", "agnostic_plus", "batcher"):

            def run(scenario: Any = scenario, arrivals: Any = arrivals, policy: str = policy) -> Trace:
                config = mosel.SchedulerConfig(policy=policy)
                return sim_trace(
                    mosel.simulate(scenario.profile, arrivals, config, residuals=scenario.residuals)
                )

            yield f"features/{name}/{policy}", run
        knobs: dict[str, dict[str, Any]] = {
            "quantile-0.9": {"latency_quantile": 0.9},
            "no-batching": {"batching": False},
            "no-spare": {"spare_margin": 1.0},
            "no-hedges": {"hedge": 0.0, "risk": 0.0, "reserve": 0.0},
            "small-queue": {"max_queued_requests": 64, "max_merge": 3, "solver_window": 8},
        }
        for knob, values in knobs.items():

            def run_knob(scenario: Any = scenario, arrivals: Any = arrivals, values: Any = values) -> Trace:
                config = mosel.SchedulerConfig(**values)
                return sim_trace(
                    mosel.simulate(scenario.profile, arrivals, config, residuals=scenario.residuals, seed=5)
                )

            yield f"features/{name}/mosel-{knob}", run_knob
        for router in ("random", "power-of-two", "slack"):
            conditions = CONDITIONS["strict-bursty"]
            seconds = JOBS / rate_per_s(scenario.profile, 3.0)
            cluster_arrivals = arrivals_for(
                scenario.profile, conditions, 3.0, seconds, 1, slack_ms=scenario.slack_ms, drop=scenario.drop
            )

            def run_cluster(
                scenario: Any = scenario, arrivals: Any = cluster_arrivals, router: str = router
            ) -> Trace:
                cluster = mosel.simulate_replicas(
                    scenario.profile, arrivals, 4, router, residuals=scenario.residuals, seed=2,
                    report_every_ms=5.0, report_delay_ms=1.0,
                )  # fmt: skip
                return [*sim_trace(cluster.overall), [list(cluster.assignment)]]

            yield f"cluster/{name}/{router}", run_cluster
    sized = _sized_profile()
    rng = random.Random(11)
    sized_arrivals = []
    t = 0.0
    for _ in range(JOBS):
        t += rng.expovariate(900.0)
        n = rng.choice((1, 2, 3, 8, 20))
        sizes = {"audio": rng.choice((10, 64, 100, 256, 700, 1024, 3000))}
        sized_arrivals.append(mosel.Arrival(t, n, rng.uniform(4.0, 40.0), 0.7, sizes=sizes))
    for policy in ("mosel", "aggressive", "agnostic_plus"):

        def run_sized(policy: str = policy) -> Trace:
            config = mosel.SchedulerConfig(policy=policy)
            residuals = mosel.Residuals.from_profile(sized)
            return sim_trace(mosel.simulate(sized, sized_arrivals, config, residuals=residuals, seed=1))

        yield f"sized/{policy}", run_sized


def cases() -> Iterator[tuple[str, Callable[[], Trace]]]:
    """Every case: (name, a function that runs it and returns its trace)."""
    yield from _benchmark_cases()
    yield from _feature_cases()


def digest(trace: Trace) -> str:
    """A short hash of a trace's canonical JSON."""
    return hashlib.sha256(json.dumps(trace, separators=(",", ":")).encode()).hexdigest()[:16]


def record(path: Path, only: str | None) -> None:
    started = time.perf_counter()
    out: dict[str, Trace] = {}
    for name, run in cases():
        if only is None or only in name:
            out[name] = run()
    path.write_text(json.dumps(out, separators=(",", ":")))
    print(f"{len(out)} traces in {time.perf_counter() - started:.0f} s -> {path}")


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    differing = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {a_path if name in a else b_path}")
            differing += 1
            continue
        if a[name] == b[name]:
            continue
        differing += 1
        first = next(
            (i for i, (x, y) in enumerate(zip(a[name], b[name])) if x != y), min(len(a[name]), len(b[name]))
        )
        print(f"{name}: differs from job {first} of {len(a[name])}")
        print(f"   {a_path}: {a[name][first] if first < len(a[name]) else '(none)'}")
        print(f"   {b_path}: {b[name][first] if first < len(b[name]) else '(none)'}")
    print(f"{len(set(a) | set(b))} cases, {differing} differing")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run every case and write the traces")
    rec.add_argument("path", type=Path)
    rec.add_argument("--only", help="only the cases whose name contains this")
    cmp = sub.add_parser("compare", help="compare two recorded trace files, job by job")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.path, args.only)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
