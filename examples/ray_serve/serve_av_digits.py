"""AV-Digits behind mosel's HTTP front door on Ray Serve, with 1 and then 2 replicas.

    python examples/ray_serve/serve_av_digits.py [--seconds 10] [--rate 10]

Each replica is a Serve ingress: it builds the model, attaches the committed profile and mounts
``mosel.http.create_app(model)`` (``POST /predict``, ``/metrics``, ``/healthz``, ``/readyz``), so
every replica runs its own mosel scheduler. Serve's HTTP proxy (on 127.0.0.1 only) spreads the
requests over the replicas. The load generator sends a Poisson stream of requests with
``X-Deadline-Ms``, ``X-Min-Accuracy`` and ``X-Request-Start`` (the time it meant to send, so its
own lag and the proxy's count against the deadline; the deadline is a lone request's round trip,
measured first, plus the scenario's slack) and prints, per replica count, the goodput
(requests answered within their deadline), the violations (late, 503, errors) and the accuracy.

Needs the ``ray`` and ``http`` extras, espeak-ng for the data (``make system-deps``) and the
AV-Digits weights (``python benchmarks/profile_av_digits.py`` or ``make demo`` trains them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402
from scenarios import AV_DIGITS_PROFILE, CACHE, av_digits_slack_ms  # noqa: E402

import mosel  # noqa: E402
import mosel.http  # noqa: E402

WEIGHTS = str(CACHE / "av-digits-6ep.pt")
PORT = 8765


def build_app() -> FastAPI:
    """Runs on each replica: the model, its profile, and the HTTP front door around it."""
    from av_digits import model as av_model

    torch.set_num_threads(1)
    model = av_model.AVDigitsNet()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    model.eval()
    mosel.attach(model, mosel.Profile.load(AV_DIGITS_PROFILE))
    return mosel.http.create_app(model, title="av-digits")


@serve.ingress(build_app)
class AVDigitsHTTP:
    """The Serve deployment class: Serve mounts the app ``build_app`` returns on each replica."""


def application(replicas: int) -> serve.Application:
    """The ingress deployment with ``replicas`` replicas, one CPU each."""
    return (
        serve.deployment(AVDigitsHTTP)
        .options(name="av", num_replicas=replicas, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
        .bind()
    )


async def round_trip_ms(body: dict[str, object], calls: int = 20) -> float:
    """Median time of a lone request through the proxy and the front door, without an SLO."""
    spent = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=30.0) as client:
        for _ in range(calls):
            started = time.perf_counter()
            answer = await client.post("/av/predict", json=body)
            answer.raise_for_status()
            spent.append((time.perf_counter() - started) * 1000.0)
    return sorted(spent)[len(spent) // 2]


async def load(seconds: float, rate: float, slack_ms: float, floor: float, seed: int) -> dict[str, float]:
    """A Poisson stream of one-request jobs against ``/av/predict``; what became of them.

    The deadline is a lone request's round trip (measured first) plus ``slack_ms``.
    """
    from av_digits import data

    test = data.load("test")
    rng = random.Random(seed)
    times, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        times.append(t)
    rows = [rng.randrange(len(test)) for _ in times]
    bodies = [
        {"inputs": {m: x.tolist() for m, x in test.inputs(torch.tensor([r])).items()}} for r in rows
    ]  # encoded before the clock starts
    deadline_ms = await round_trip_ms(bodies[0]) + slack_ms
    counts = {"on_time": 0, "late": 0, "rejected": 0, "failed": 0, "correct": 0}
    start = time.time() + 0.5
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=30.0) as client:

        async def one(at: float, row: int, body: dict[str, object]) -> None:
            await asyncio.sleep(max(start + at - time.time(), 0.0))
            headers = {
                "X-Deadline-Ms": str(deadline_ms), "X-Min-Accuracy": str(floor),
                "X-Request-Start": f"{start + at:.6f}",
            }  # fmt: skip
            try:
                answer = await client.post("/av/predict", json=body, headers=headers)
            except httpx.HTTPError:
                counts["failed"] += 1
                return
            if answer.status_code == 503:
                counts["rejected"] += 1
            elif answer.status_code != 200:
                counts["failed"] += 1
            elif answer.json()["deadline_met"]:
                counts["on_time"] += 1
                counts["correct"] += int(answer.json()["prediction"][0] == int(test.labels[row]))
            else:
                counts["late"] += 1

        await asyncio.gather(*(one(at, r, b) for at, r, b in zip(times, rows, bodies)))
    total = len(times)
    return {
        "requests": float(total),
        "goodput_rps": counts["on_time"] / seconds,
        "violations": 1 - counts["on_time"] / total,
        "accuracy_on_time": counts["correct"] / counts["on_time"] if counts["on_time"] else float("nan"),
        "rejected": float(counts["rejected"]),
        "deadline_ms": deadline_ms,
    }


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    profile = mosel.Profile.load(AV_DIGITS_PROFILE)
    slack_ms = av_digits_slack_ms(profile)
    floor = round(max(profile.accuracy.values()) - 0.06, 4)
    env = {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    path = os.pathsep.join([*inherited, str(ROOT), str(ROOT / "examples"), str(ROOT / "benchmarks")])
    ray.init(
        num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False, configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, **env}},
    )  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    print(f"{args.rate:g} requests/s for {args.seconds:g} s, floor {floor}, deadline: round trip + slack")
    try:
        for replicas in (1, 2):
            serve.run(application(replicas), name="av", route_prefix="/av")
            row = asyncio.run(load(args.seconds, args.rate, slack_ms, floor, args.seed))
            print(
                f"{replicas} replica(s), deadline {row['deadline_ms']:.1f} ms: goodput "
                f"{row['goodput_rps']:.1f} req/s, violations "
                f"{row['violations']:.1%} ({row['rejected']:.0f} answered 503), accuracy on time "
                f"{row['accuracy_on_time']:.3f} over {row['requests']:.0f} requests",
                flush=True,
            )
            serve.delete("av")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
