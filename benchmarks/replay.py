"""Replaying a trace against a real model in real time (the benchmark's ``--real`` mode, the demo).

A driver thread submits each job at its arrival time with ``model.submit``; the model's own
scheduler and executor serve them. Results are checked against the labels.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import mosel


@dataclass(frozen=True)
class RealJob:
    """One job of a real-mode trace: when, how big, its SLO, its inputs and labels."""

    time_s: float
    n: int
    deadline_ms: float
    min_accuracy: float | None
    inputs: dict[str, Tensor]
    labels: Tensor


@dataclass(frozen=True)
class Replayed:
    """A real run's figures, what its scheduler measured, and when each job was really submitted."""

    metrics: dict[str, float]
    residuals: mosel.Residuals | None  # batch start times in seconds after the trace's start
    submitted_s: list[float]  # per job, seconds after the trace's start


def replay(
    model: nn.Module, profile: mosel.Profile, jobs: list[RealJob], config: mosel.SchedulerConfig | str
) -> Replayed:
    """Serve ``jobs`` at their arrival times under ``config`` (or a policy name).

    Besides the service figures, the metrics decompose where time went: the driver's lag behind
    the trace, each job's queue wait, its execution, and the rest (dispatch and hand-over).
    """
    if isinstance(config, str):
        config = mosel.SchedulerConfig(policy=config)
    mosel.attach(model, profile, scheduler=config)
    model.infer(jobs[0].inputs)  # start the server and warm it up
    submitted: list[tuple[RealJob, concurrent.futures.Future[mosel.Result] | None]] = []
    submitted_s: list[float] = []
    start = time.perf_counter()
    for job in jobs:
        delay = start + job.time_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted_s.append(time.perf_counter() - start)
        try:
            future = model.submit(job.inputs, deadline_ms=job.deadline_ms, min_accuracy=job.min_accuracy)  # type: ignore[operator]
        except mosel.MoselError:
            future = None  # rejected at once: a violation
        submitted.append((job, future))
    for _, future in submitted:
        if future is not None:
            future.exception()  # wait for every job
    wall_s = time.perf_counter() - start
    snapshot = mosel.stats(model)
    mosel.close(model)
    requests = sum(job.n for job, _ in submitted)
    on_time = correct = served = 0
    jct: list[float] = []
    queue: list[float] = []
    execution: list[float] = []
    handoff: list[float] = []
    windows: dict[int, list[float]] = {}  # 1 s windows of completion: [correct, expected, requests]
    expected = 0.0
    for job, future in submitted:
        if future is None or future.exception() is not None:
            continue
        result = future.result()
        served += job.n
        jct.append(result.completion_ms)
        if len(result.strategies) == 1:  # one batch: completion = queue + execution + the rest
            queue.append(result.queue_ms)
            execution.append(result.measured_latency_ms)
            handoff.append(result.completion_ms - result.queue_ms - result.measured_latency_ms)
        expected += result.expected_accuracy * job.n
        right = int((result.output.argmax(-1).cpu() == job.labels).sum())
        correct += right
        window = windows.setdefault(int(job.time_s + result.completion_ms / 1000.0), [0.0, 0.0, 0.0])
        window[0] += right
        window[1] += result.expected_accuracy * job.n
        window[2] += job.n
        on_time += job.n if result.completion_ms <= job.deadline_ms else 0
    jct.sort()
    lag = [(s - job.time_s) * 1000.0 for s, (job, _) in zip(submitted_s, submitted)]
    residuals = snapshot.residuals.shifted(-start) if snapshot.residuals else None
    floor = jobs[0].min_accuracy or 0.0
    full = [w for w in windows.values() if w[2] >= 50]  # windows with enough requests to judge
    window_accuracy = [w[0] / w[2] for w in full]
    metrics = {
        "goodput_rps": on_time / wall_s,
        "violation_ratio": 1 - on_time / requests if requests else 0.0,
        "jct_p50_ms": statistics.median(jct) if jct else float("nan"),
        "jct_p99_ms": _p99(jct),
        "expected_accuracy": expected / served if served else float("nan"),
        "measured_accuracy": correct / served if served else float("nan"),
        "served_ratio": served / requests if requests else 0.0,
        "queue_p50_ms": statistics.median(queue) if queue else float("nan"),
        "queue_p99_ms": _p99(queue),
        "execution_p50_ms": statistics.median(execution) if execution else float("nan"),
        "handoff_p50_ms": statistics.median(handoff) if handoff else float("nan"),
        "handoff_p99_ms": _p99(handoff),
        "submit_lag_p50_ms": statistics.median(lag),
        "submit_lag_p99_ms": _p99(lag),
        "profile_bias": residuals.bias if residuals else float("nan"),
        "ratio_p90": residuals.ratio_quantile(0.9) / residuals.bias if residuals else float("nan"),
        "overhead_p50_ms": statistics.median(residuals.overhead_us) / 1000.0
        if residuals and residuals.overhead_us
        else float("nan"),
        "latency_margin": snapshot.latency_margin,
        "window_accuracy_min": min(window_accuracy) if window_accuracy else float("nan"),
        "window_expected_min": min(w[1] / w[2] for w in full) if full else float("nan"),
        "windows_below_floor": sum(a < floor for a in window_accuracy) / len(window_accuracy)
        if window_accuracy
        else float("nan"),
        "jobs": len(submitted),
        "requests": requests,
    }
    return Replayed(metrics, residuals, submitted_s)


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def with_inputs(arrivals: list[mosel.Arrival], split: object, seed: int) -> list[RealJob]:
    """Attach random rows of a labelled split (``.inputs(rows)``, ``.labels``) to each arrival."""
    generator = torch.Generator().manual_seed(seed)
    jobs = []
    size = len(split)  # type: ignore[arg-type]
    for a in arrivals:
        rows = torch.randint(0, size, (a.n,), generator=generator)
        jobs.append(
            RealJob(
                a.time_s,
                a.n,
                float(a.deadline_ms or 1e9),
                a.min_accuracy,
                split.inputs(rows),
                split.labels[rows],
            )  # type: ignore[attr-defined]
        )
    return jobs
