"""Real scale-out on Ray Serve: AV-Digits served by 1 and 2 mosel replicas, Serve's router against mosel's.

    python benchmarks/scaleout_ray.py [--seconds 20] [--rate 40] [--repeats 1]
    python benchmarks/scaleout_ray.py --autoscale      # a load step under DegradationPolicy

A local Ray instance (one CPU per replica, ``num_cpus`` = the machine's cores) serves the demo's
from-scratch AV-Digits model with the committed profile (``benchmarks/profiles``); every
configuration serves the same seeded trace (``strict`` conditions: Poisson arrivals of
``--rate`` jobs per second, deadline = the job's all-modality latency + the scenario's slack +
the transit measured first (the median time a lone job spends outside the model: Ray's
transport and hand-over), floor = best accuracy - 0.06). The driver stamps each request with its
scheduled send time, so its own lag and Ray's transport count against the deadline, as they would
behind an ingress. Reported, over every submitted request: goodput (requests answered within
their deadline per second), violation ratio (late, failed or rejected), accuracy against the
labels of the requests answered on time, and the mean expected accuracy of those served.

Live figures depend on the machine and on everything else running on it; on a 2-core machine the
driver, Ray's own processes and two replicas share two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
from conditions import CONDITIONS, arrivals_for, rate_per_s  # noqa: E402
from replay import RealJob, with_inputs  # noqa: E402
from scenarios import AV_DIGITS_PROFILE, CACHE, av_digits_model, av_digits_slack_ms  # noqa: E402

import mosel.ray  # noqa: E402

WEIGHTS = str(CACHE / "av-digits-6ep.pt")
ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_AUTH_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
}


def make_model() -> torch.nn.Module:
    """The AV-Digits network with the benchmark's cached weights, at one thread (runs in a replica)."""
    from av_digits import model as av_model

    torch.set_num_threads(1)
    model = av_model.AVDigitsNet()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


@dataclass
class Outcome:
    """What became of one job."""

    n: int
    on_time: bool
    served: bool
    correct: int
    expected_accuracy: float
    error: str | None


async def drive(client: object, jobs: list[RealJob], seconds: float) -> list[Outcome]:
    """Send every job at its time (stamped with it), wait for all, in one event loop."""
    assert isinstance(client, mosel.ray.Client)
    start = time.time() + 0.5

    async def one(job: RealJob) -> Outcome:
        delay = start + job.time_s - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        request = mosel.ray.Request(
            job.inputs,
            deadline_ms=job.deadline_ms,
            min_accuracy=job.min_accuracy,
            sent_at_s=start + job.time_s,
        )
        try:
            result = await client.ainfer(request)
        except mosel.MoselError as error:
            return Outcome(job.n, False, False, 0, math.nan, type(error).__name__)
        correct = int((result.output.argmax(dim=1) == job.labels).sum())
        return Outcome(job.n, bool(result.deadline_met), True, correct, result.expected_accuracy, None)

    return await asyncio.wait_for(asyncio.gather(*(one(j) for j in jobs)), seconds + 120.0)


def summary(outcomes: list[Outcome], seconds: float) -> dict[str, float]:
    """Goodput, violations and accuracy over every submitted request."""
    requests = sum(o.n for o in outcomes)
    on_time = [o for o in outcomes if o.on_time]
    served = [o for o in outcomes if o.served]
    on_time_requests = sum(o.n for o in on_time)
    served_requests = sum(o.n for o in served)
    return {
        "goodput_rps": on_time_requests / seconds,
        "goodput_ratio": on_time_requests / requests,
        "violation_ratio": 1 - on_time_requests / requests,
        "accuracy_on_time": sum(o.correct for o in on_time) / on_time_requests
        if on_time_requests
        else math.nan,
        "expected_accuracy": sum(o.expected_accuracy * o.n for o in served) / served_requests
        if served_requests
        else math.nan,
        "failed_jobs": float(sum(1 for o in outcomes if o.error)),
        "requests": float(requests),
    }


def start_ray() -> None:
    import ray
    from ray import serve

    os.environ.update(ENV)
    path = os.pathsep.join([str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")])
    ray.init(
        num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False, configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, **ENV}},
    )  # fmt: skip
    serve.start(proxy_location="Disabled")


def transit_ms(client: mosel.ray.Client, jobs: list[RealJob], calls: int = 30) -> float:
    """Median time a lone job spends outside the model (Ray's transport, the replica's hand-over)."""
    spent = []
    for job in jobs[:calls]:
        result = client.infer(job.inputs)
        spent.append(result.completion_ms - result.measured_latency_ms)
    return statistics.median(spent)


def workload(
    args: argparse.Namespace, rate: float, seconds: float, seed: int, extra_ms: float
) -> list[RealJob]:
    """``strict`` arrivals at ``rate`` jobs/s; deadlines = all-modality latency + slack + ``extra_ms``."""
    profile = mosel.Profile.load(AV_DIGITS_PROFILE)
    arrivals = arrivals_for(
        profile, CONDITIONS["strict"], rate / rate_per_s(profile, 1.0), seconds, seed,
        slack_ms=av_digits_slack_ms(profile) + extra_ms, drop=0.06,
    )  # fmt: skip
    return with_inputs(arrivals, args.test, seed)


def deploy(replicas: int, router: str, seed: int, **options: object) -> mosel.ray.Client:
    from ray import serve

    app = mosel.ray.deployment(
        make_model, AV_DIGITS_PROFILE, name="av", num_replicas=replicas, router=router,  # type: ignore[arg-type]
        ray_actor_options={"num_cpus": 1}, seed=seed, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    return mosel.ray.Client(serve.run(app, name="av", route_prefix=None), timeout_s=60.0)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration on the same trace; prints the table, returns it JSON-ready."""
    from ray import serve

    start_ray()
    client = deploy(1, "serve", args.seed)
    transit = transit_ms(client, workload(args, args.rate, 2.0, args.seed + 99, 0.0))
    serve.delete("av")
    jobs = workload(args, args.rate, args.seconds, args.seed, transit)
    print(
        f"AV-Digits on Ray Serve: {len(jobs)} jobs / {sum(j.n for j in jobs)} requests in {args.seconds:g} s "
        f"({args.rate:g} jobs/s); deadline = all-modality latency + {av_digits_slack_ms(args.profile):.1f} ms "
        f"slack + {transit:.1f} ms measured transit (a lone job's time outside the model)",
        flush=True,
    )
    configs = [
        (1, "serve", None),
        (2, "serve", None),
        (2, "serve", 0.1),
        (2, "slack", 0.1),
        (2, "slack", 0.5),
    ]
    rows: dict[tuple[int, str, float | None], list[dict[str, float]]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for replicas, router, period in configs if repeat % 2 == 0 else configs[::-1]:
            client = deploy(replicas, router, args.seed, stats_period_s=period)
            for job in jobs[:20]:  # warm every replica's code paths before the clock starts
                client.infer(job.inputs)
            outcomes = asyncio.run(drive(client, jobs, args.seconds))
            serve.delete("av")
            row = summary(outcomes, args.seconds)
            rows[(replicas, router, period)].append(row)
            print(
                f"  repeat {repeat}: {replicas} replica(s), {router:5s} router, stats every {period or 10:g} s: goodput {row['goodput_rps']:.1f} "
                f"req/s ({row['goodput_ratio']:.1%}), violations {row['violation_ratio']:.1%} "
                f"({row['failed_jobs']:.0f} jobs failed), accuracy on time {row['accuracy_on_time']:.3f}, "
                f"expected {row['expected_accuracy']:.3f}",
                flush=True,
            )
    print(
        "\n| replicas | router | load reports | goodput (req/s) | goodput ratio | violations | accuracy on time "
        "| expected |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for (replicas, router, period), runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {replicas} | {'Serve (power of two)' if router == 'serve' else 'mosel (slack)'} | "
            f"{'every ' + format(period, 'g') + ' s' if period else 'Serve default (10 s)'} | "
            f"{med['goodput_rps']:.1f} | {med['goodput_ratio']:.1%} | {med['violation_ratio']:.1%} | "
            f"{med['accuracy_on_time']:.3f} | {med['expected_accuracy']:.3f} |"
        )
    base = statistics.median(r["goodput_rps"] for r in rows[configs[0]])
    for key in configs[1:]:
        ratio = statistics.median(r["goodput_rps"] for r in rows[key]) / base
        print(
            f"goodput {key[0]} replicas, {key[1]} router, reports {key[2] or 10:g} s / 1 replica: {ratio:.2f}x"
        )
    return {
        "rate_jobs_per_s": args.rate, "seconds": args.seconds, "transit_ms": transit,
        "runs": [
            {"replicas": n, "router": router, "report_every_s": period, "repeats": runs}
            for (n, router, period), runs in rows.items()
        ],
    }  # fmt: skip


def autoscale(args: argparse.Namespace) -> None:
    """A load step (a quarter of ``--rate``, then ``--rate``) under DegradationPolicy: replicas over time."""
    from ray import serve

    start_ray()
    client = deploy(1, "serve", args.seed)
    transit = transit_ms(client, workload(args, args.rate, 2.0, args.seed + 99, 0.0))
    serve.delete("av")
    calm = workload(args, args.rate / 4, 10.0, args.seed, transit)
    busy = workload(args, args.rate, 40.0, args.seed + 1, transit)
    jobs = calm + [dataclasses.replace(j, time_s=j.time_s + 10.0) for j in busy]
    scaling = mosel.ray.autoscaling_config(
        min_replicas=1, max_replicas=2, upper=0.25, lower=0.02, upscale_delay_s=2.0, downscale_delay_s=600.0,
    )  # fmt: skip
    client = deploy(0, "slack", args.seed, autoscaling=scaling)
    client.infer(jobs[0].inputs)
    seen: list[tuple[float, int]] = []

    async def watch(until: float) -> None:
        t0 = time.time()
        while time.time() < until:
            status = serve.status().applications["av"].deployments["av"]
            seen.append((time.time() - t0, status.replica_states.get("RUNNING", 0)))
            await asyncio.sleep(1.0)

    async def both() -> list[Outcome]:
        watcher = asyncio.ensure_future(watch(time.time() + 51.0))
        outcomes = await drive(client, jobs, 50.0)
        await watcher
        return outcomes

    outcomes = asyncio.run(both())
    print(f"load step at t=10 s ({args.rate / 4:g} -> {args.rate:g} jobs/s); running replicas over time:")
    print("  " + ", ".join(f"{t:.0f}s:{n}" for t, n in seen))
    for name, part, secs in (("calm", outcomes[: len(calm)], 10.0), ("busy", outcomes[len(calm) :], 40.0)):
        row = summary(part, secs)
        print(
            f"  {name}: goodput {row['goodput_ratio']:.1%}, expected accuracy {row['expected_accuracy']:.3f}"
        )
    serve.delete("av")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv=[]``: the defaults), with the test split and the profile loaded."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=40.0, help="jobs per second")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autoscale", action="store_true")
    args = parser.parse_args(argv)
    loaded = av_digits_model(profile=False)
    if loaded is None:
        sys.exit("AV-Digits needs espeak-ng (make system-deps)")
    args.test = loaded[2]
    args.profile = mosel.Profile.load(AV_DIGITS_PROFILE)
    return args


def real_mode(_: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks/scaleout.py --real``: this benchmark at its defaults, on a fresh local Ray."""
    import ray

    try:
        return compare(parse([]))
    finally:
        ray.shutdown()


def main() -> None:
    args = parse()
    autoscale(args) if args.autoscale else compare(args)


if __name__ == "__main__":
    main()
