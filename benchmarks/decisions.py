"""How long the executor waits for scheduling decisions, what CP-SAT costs, how good the answers are,
and what queued jobs cost in memory.

1. Decision time: a queue kept at L jobs (1..64) whose deadlines force re-assignment; per
   iteration the executor side under the mosel policy with a miss budget (``--miss-budget``,
   default 1%: the risk price on) is timed: ``complete`` of the running batch, which re-plans,
   then ``dispatch``, which takes the batch and buys its upgrades. Wall time and the thread's
   CPU time (``time.thread_time``: what the decision itself costs, without the time the OS gave
   other processes on a shared machine), p50, p99 and max; and the share of dispatches whose
   upgrade the risk price held back. Its queue is kept full, so the recent arrival rate is the
   service rate: nearly every dispatch stops at the overload gate (``Reason.OVERLOAD``) and the
   risk price is configured but not evaluated; this part times re-assignment under overload.
   CP-SAT's solve time on the same queues (the ``greedy_cpsat`` policy's helper) is measured
   separately.
1b. Decision time with the risk price evaluated (``priced``): the same decision at 16 and 64
   queued jobs below the overload gate (arrivals at ``--load``, deadlines ``--headroom`` times
   the queue's arrival time, :func:`priced_decision_times`), with the share of decisions that
   evaluated the risk price, the options it weighed, what held jobs back, and garbage
   collections that landed in a timed decision. Goal 5 of issue 24 is this part's p99 at 64.
2. Quality: on random small queues, the total accuracy of the greedy and of the CP-SAT
   (20 ms budget) assignments against the exhaustive optimum.
3. Memory: 1,000 jobs queued behind a blocked executor in the real threaded server, with
   tracemalloc, beyond their (shared) input tensors.
4. Admission: one ``model.submit`` (validation, admission, re-assignment, under the server's lock)
   with 1,024 and 4,096 one-row jobs queued behind a blocked executor, deadlines spread so that
   part of the queue is predicted late and re-assigned; and one CP-SAT solve of the window the
   helper thread re-assigns (``SchedulerConfig.solver_window``), model building included.
   A submit refused at admission (``DeadlineError`` when the queue makes its deadline
   infeasible) is counted, not fatal. p50, p99 and the max of single submits are reported, with
   every generation-2 garbage collection that overlapped a timed submit: those are the long
   spikes (the collector walks every tracked object of the process: the torch and OR-Tools
   import heap, about 170,000 objects, and about 37 per queued job), so the max without them is
   reported beside it. ``--gc-freeze`` runs ``gc.freeze()`` once the model is attached (what a
   latency-sensitive service can do after start-up), so that collections skip the import heap.

Run: python benchmarks/decisions.py [--json PATH] [--parts decisions priced quality memory admission]
     [--gc-freeze] [--miss-budget B] [--load L] [--headroom H] [--iterations N] [--profiles DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import pathlib
import random
import statistics
import threading
import time
import tracemalloc
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor, nn

import mosel
from mosel.assign import Item, cpsat_assign, exhaustive_assign, greedy_assign, total_accuracy
from mosel.jobs import Reason
from mosel.scheduler import Job, Scheduler, SchedulerConfig
from mosel.testing import synthetic_profile

NAMES = ("audio", "video", "text", "depth")


def model_class(m: int) -> type[nn.Module]:
    namespace: dict[str, object] = {f"encode_{n}": mosel.modality(n)(lambda self, x: x) for n in NAMES[:m]}
    namespace["fuse"] = mosel.fusion(lambda self, feats: next(iter(feats.values())))
    return mosel.multimodal(type(f"Synthetic{m}", (nn.Module,), namespace))


def profile_for(m: int, max_batch: int = 32, cls: nn.Module | None = None) -> mosel.Profile:
    rng = random.Random(m)
    per_row = {n: rng.uniform(20, 300) for n in NAMES[:m]}
    configs = [c for r in range(1, m + 1) for c in itertools.combinations(NAMES[:m], r)]
    accuracy = {"+".join(c): round(0.5 + 0.1 * len(c) + rng.uniform(0, 0.08), 4) for c in configs}
    return synthetic_profile(
        cls or model_class(m),
        branch_us={n: [300 + per_row[n] * b**0.9 for b in range(1, max_batch + 1)] for n in NAMES[:m]},
        accuracy=accuracy,
        fusion_us={k: [20 + 3 * b for b in range(1, max_batch + 1)] for k in accuracy},
    )


def decision_times(
    profile: mosel.Profile,
    queue_length: int,
    iterations: int,
    policy: str = "mosel",
    miss_budget: float | None = None,
    config: SchedulerConfig | None = None,
) -> dict[str, float]:
    rng = random.Random(queue_length)
    everything = frozenset(profile.modalities)
    scheduler = Scheduler(profile, config or SchedulerConfig(policy=policy, miss_budget=miss_budget))
    now = 0.0
    top = profile.max_batch_size
    full = {n: profile.plan.frontier(everything, n).best.latency_us / 1e6 for n in range(1, top + 1)}

    def arrive() -> None:
        n = max(1, min(top, int(abs(rng.gauss(1, 6)))))
        # Deadlines leave room for about half the queue at full accuracy: re-assignment is needed.
        slack = full[n] + queue_length * 0.5 * full[n] * rng.uniform(0.3, 1.0)
        floor = rng.choice([None, 0.6, 0.7])
        job = Job(
            n=n,
            available=everything,
            arrival=now,
            deadline_ms=slack * 1e3,
            min_accuracy=floor,
            best_effort=True,
        )
        with contextlib.suppress(mosel.MoselError):  # a rejected arrival is simply not queued
            scheduler.admit(job, now)

    for _ in range(queue_length):
        arrive()
    batch, _ = scheduler.dispatch(now)
    waits, cpu, solves = [], [], []
    risk_limited = 0  # dispatches whose upgrade the miss budget's risk price held back
    for _ in range(iterations):
        assert batch is not None
        now += batch.predicted_us / 1e6
        started, started_cpu = time.perf_counter(), time.thread_time()
        scheduler.complete(batch, now, batch.predicted_us)
        batch, _ = scheduler.dispatch(now)
        waits.append((time.perf_counter() - started) * 1e3)
        cpu.append((time.thread_time() - started_cpu) * 1e3)
        if batch is not None and any(t.job.reason is Reason.MISS_BUDGET for t in batch.tasks):
            risk_limited += 1
        while len(scheduler.queue) < queue_length:
            arrive()
        if batch is None:
            batch, _ = scheduler.dispatch(now)
        if len(solves) < 30 and scheduler.queue:
            items = [t.item for t in scheduler.queue]
            hint, _ = greedy_assign(items, [t.k for t in scheduler.queue], int(now * 1e6))
            t0 = time.perf_counter()
            cpsat_assign(items, int(now * 1e6), hint, time_limit_s=0.05)
            solves.append((time.perf_counter() - t0) * 1e3)
    return {
        **percentiles(waits, cpu),
        "risk_limited_share": round(risk_limited / iterations, 3),
        "cpsat_p50_ms": round(statistics.median(solves), 2) if solves else 0.0,
        "cpsat_max_ms": round(max(solves), 2) if solves else 0.0,
    }


def percentiles(waits: list[float], cpu: list[float]) -> dict[str, float]:
    """p50, p99 and max of the decisions' wall times and CPU times (ms)."""
    waits, cpu = sorted(waits), sorted(cpu)
    return {
        "wait_p50_ms": round(statistics.median(waits), 4),
        "wait_p99_ms": round(waits[int(0.99 * (len(waits) - 1))], 4),
        "wait_max_ms": round(waits[-1], 4),
        "cpu_p50_ms": round(statistics.median(cpu), 4),
        "cpu_p99_ms": round(cpu[int(0.99 * (len(cpu) - 1))], 4),
        "cpu_max_ms": round(cpu[-1], 4),
    }


class RiskCount:
    """Counts the decisions that evaluated the mosel policy's risk price, and what each weighed.

    Wraps the policy's ``_priced_by_risk`` (the step that prices an upgrade's expected added misses)
    on this one instance; what the wrapper adds to a timed decision is one Python call.
    """

    def __init__(self, policy: Any) -> None:
        self.calls = 0
        self.candidates: list[int] = []  # options weighed per evaluation
        self.jobs: list[int] = []  # jobs with a deadline at risk (the batch's and the queued ones)
        priced = policy._priced_by_risk

        def counted(tasks: list[Any], before: list[int], risk: Any) -> bool:
            self.calls += 1
            self.candidates.append(1 + sum(t.k - k for t, k in zip(tasks, before, strict=True)))
            self.jobs.append(len(risk.thresholds))
            return bool(priced(tasks, before, risk))

        policy._priced_by_risk = counted


def priced_decision_times(
    profile: mosel.Profile,
    queue_length: int,
    iterations: int,
    load: float = 0.6,
    headroom: float = 4.0,
    miss_budget: float | None = 0.01,
) -> dict[str, Any]:
    """Decision time with the risk price on the timed path: ``queue_length`` jobs queued, below overload.

    Jobs arrive one after another at ``load`` (each job's cheapest strategy's time over ``load``
    after the last one) until the queue is back at ``queue_length``; a batch is dispatched when
    the last of them arrived or the running batch ended, whichever is later (the device idles the
    rest). So the recent arrival rate of work is about ``load``, below the overload gate, and the
    spare-capacity budget refills. Batches take the profile's time times a lognormal draw (sigma
    0.1) plus 50 us of overhead, handed over as a server does, so the correction and the tail model
    learn and the risk price prices from measured residuals. Deadlines (not best effort) give each
    job ``headroom`` times the time the queue ahead of it takes to arrive (uniform 0.5-1.5x of it).

    Timed per decision: ``complete`` and ``handed_over`` of the batch that ended, then
    ``dispatch`` of the next (the executor's work under the lock between two batches; arrivals in
    between are not timed). ``risk_priced_share`` is the share of timed decisions that evaluated
    the risk price (``risk_candidates_*``: the options each weighed; ``risk_jobs_mean``: the jobs
    whose deadline each weighed), ``reasons`` what the dispatched jobs were held back by. Garbage
    collections (any generation) that overlapped a timed decision are counted, and the p99
    without those decisions is given.
    """
    rng = random.Random(queue_length)
    everything = frozenset(profile.modalities)
    scheduler = Scheduler(profile, SchedulerConfig(policy="mosel", miss_budget=miss_budget))
    risk = RiskCount(scheduler.policy)
    top = profile.max_batch_size
    frontiers = {n: profile.plan.frontier(everything, n) for n in range(1, top + 1)}
    full = {n: f.best.latency_us / 1e6 for n, f in frontiers.items()}
    cheap = {n: f.strategies[0].latency_us / 1e6 for n, f in frontiers.items()}
    refused = [0]

    def arrive(at: float) -> float:
        """One job arriving at ``at``; returns when the next one arrives."""
        n = max(1, min(top, int(abs(rng.gauss(1, 6)))))
        slack = full[n] + headroom * queue_length * cheap[n] / load * rng.uniform(0.5, 1.5)
        job = Job(
            n=n, available=everything, arrival=at, deadline_ms=slack * 1e3,
            min_accuracy=rng.choice([None, 0.6, 0.7]),
        )  # fmt: skip
        try:
            scheduler.admit(job, at)
        except mosel.MoselError:  # refused at admission: counted, not queued
            refused[0] += 1
        return at + cheap[n] / load

    def timed(call: Any, *args: Any) -> Any:
        started, started_cpu = time.perf_counter(), time.thread_time()
        value = call(*args)
        ended = time.perf_counter()
        took.append((started, ended, time.thread_time() - started_cpu))
        return value

    now = at = 0.0
    for _ in range(queue_length):
        at = arrive(at)
    now = at
    batch, _ = scheduler.dispatch(now)
    waits, cpu, rhos, spans = [], [], [], []
    reasons: dict[str, int] = {}
    with CollectorLog(generations=(0, 1, 2)) as collections:
        for _ in range(iterations):
            assert batch is not None
            took: list[tuple[float, float, float]] = []
            measured_us = batch.merged.latency_us * math.exp(rng.gauss(0.0, 0.1))  # the profile's, noisy
            end = now + measured_us / 1e6
            at = max(at, now)
            while len(scheduler.queue) < queue_length and at < end:  # arrivals while it runs
                at = arrive(at)
            before = risk.calls
            timed(scheduler.complete, batch, end, measured_us)
            timed(scheduler.handed_over, batch, end + 50e-6)
            while len(scheduler.queue) < queue_length:  # and while the device is idle
                at = arrive(at)
            now = max(end, at)
            batch, _ = timed(scheduler.dispatch, now)
            waits.append(sum(e - s for s, e, _ in took) * 1e3)
            cpu.append(sum(c for _, _, c in took) * 1e3)
            spans.append(([(s, e) for s, e, _ in took], risk.calls > before))
            rhos.append(scheduler.policy.arrivals.rho(now))
            for task in batch.tasks if batch is not None else ():
                name = task.job.reason.name if isinstance(task.job.reason, Reason) else "none (best option)"
                reasons[name] = reasons.get(name, 0) + 1
            while batch is None:
                now = at = arrive(max(at, now))
                batch, _ = scheduler.dispatch(now)
    hit = [any(collections.during(s, e) for s, e in parts) for parts, _ in spans]
    clean = sorted(w for w, gc_hit in zip(waits, hit, strict=True) if not gc_hit)
    slowest = sorted(range(iterations), key=waits.__getitem__)[-max(1, iterations // 100) :]
    priced = sorted(w for w, (_, p) in zip(waits, spans, strict=True) if p)
    return {
        **percentiles(waits, cpu),
        "wait_p99_without_gc_ms": round(clean[int(0.99 * (len(clean) - 1))], 4) if clean else float("nan"),
        "gc_during_timed": sum(hit),
        "gc_in_slowest_1pct": sum(hit[i] for i in slowest),
        "risk_priced_share": round(sum(p for _, p in spans) / iterations, 3),
        "risk_priced_wait_p50_ms": round(statistics.median(priced), 4) if priced else float("nan"),
        "risk_candidates_mean": round(statistics.mean(risk.candidates), 1) if risk.candidates else 0.0,
        "risk_candidates_max": max(risk.candidates, default=0),
        "risk_jobs_mean": round(statistics.mean(risk.jobs), 1) if risk.jobs else 0.0,
        "residual_samples": len(scheduler.pricer.tail.sample()[0]),
        "rho_median": round(statistics.median(rhos), 3),
        "refused": refused[0],
        "failed": sum(v for k, v in scheduler.stats.snapshot().counters.items() if k.startswith("failed_")),
        "reasons": reasons,
    }


def quality(trials: int = 200, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    greedy_ratios, cpsat_ratios = [], []
    for _ in range(trials):
        items, deadline = [], 0
        for _ in range(rng.randint(2, 6)):
            k = rng.randint(2, 5)
            lat = list(itertools.accumulate(rng.randint(50, 400) for _ in range(k)))
            acc = list(itertools.accumulate(rng.randint(100, 20_000) for _ in range(k)))
            deadline += rng.randint(100, 900)
            items.append(Item(tuple(lat), tuple(acc), deadline))
        best = exhaustive_assign(items, 0)
        if best is None:
            continue
        optimum = total_accuracy(items, best)
        top = [len(i.latency_us) - 1 for i in items]
        ks, doomed = greedy_assign(items, top, 0)
        greedy_ratios.append(0.0 if doomed else total_accuracy(items, ks) / optimum)
        got, _ = cpsat_assign(items, 0, ks if not doomed else None, time_limit_s=0.02)
        cpsat_ratios.append(total_accuracy(items, got) / optimum if got else 0.0)
    return {
        "queues": len(cpsat_ratios),
        "greedy_mean": round(statistics.mean(greedy_ratios), 4),
        "greedy_min": round(min(greedy_ratios), 4),
        "cpsat_mean": round(statistics.mean(cpsat_ratios), 4),
        "cpsat_min": round(min(cpsat_ratios), 4),
    }


@mosel.multimodal
class Gate(nn.Module):
    """A model whose branch blocks until released: keeps jobs queued for the memory measurement."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        self.release.wait()
        return audio

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return features["audio"]


def queued_memory(jobs: int = 1000) -> dict[str, float]:
    model = Gate()
    mosel.attach(
        model,
        synthetic_profile(
            model, branch_us={"audio": [10.0 * b for b in range(1, 9)]}, accuracy={"audio": 0.9}
        ),
    )
    inputs = {"audio": torch.zeros(4, 256)}
    first = model.submit(inputs)
    time.sleep(0.05)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    futures = [model.submit(inputs) for _ in range(jobs)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    model.release.set()
    first.result()
    for f in futures:
        f.result()
    mosel.close(model)
    return {"jobs": jobs, "total_mb": round(grown / 2**20, 3), "bytes_per_job": round(grown / jobs)}


def gated_class(m: int) -> type[nn.Module]:
    """A ``Synthetic{m}``-like model whose first branch waits for ``model.release``."""

    def first(self: nn.Module, x: Tensor) -> Tensor:
        self.release.wait()  # type: ignore[operator]
        return x

    namespace: dict[str, object] = {f"encode_{NAMES[0]}": mosel.modality(NAMES[0])(first)}
    namespace.update({f"encode_{n}": mosel.modality(n)(lambda self, x: x) for n in NAMES[1:m]})
    namespace["fuse"] = mosel.fusion(lambda self, feats: next(iter(feats.values())))
    return mosel.multimodal(type(f"Gated{m}", (nn.Module,), namespace))


class CollectorLog:
    """Garbage collections (by default of generation 2) while active: (start, end) on ``perf_counter``, and CPU ms."""

    def __init__(self, generations: tuple[int, ...] = (2,)) -> None:
        self.spans: list[tuple[float, float, float]] = []
        self.generations = generations
        self._started = (0.0, 0.0)

    def __enter__(self) -> CollectorLog:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if generation not in self.generations:
            return
        # CPU time (a system call of several µs here) only for generation 2: young collections are
        # frequent, and the callback runs inside the timed decisions
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time() if generation == 2 else 0.0)
        else:
            wall, cpu = self._started
            spent = (time.thread_time() - cpu) * 1e3 if generation == 2 else 0.0
            self.spans.append((wall, time.perf_counter(), spent))

    def during(self, start: float, end: float) -> list[tuple[float, float, float]]:
        """The collections that overlapped ``[start, end]``."""
        return [c for c in self.spans if c[0] < end and c[1] > start]


def submit_latency(
    queued: int,
    timed: int = 400,
    m: int = 3,
    seed: int = 0,
    urgent: float = 0.0,
    freeze: bool = False,
    max_batch: int = 32,
) -> dict[str, Any]:
    """p50/p99/max of one ``model.submit`` with ``queued`` one-row jobs waiting, and a windowed CP-SAT solve.

    A submit refused at admission is counted (``refused_queueing``, ``refused_timed``) and the run
    goes on; a timed refusal still counts as a timed submit (it returned). Generation-2 garbage
    collections that overlapped a timed submit are reported (``gc2_*``), and the max without them.
    """
    model = gated_class(m)()
    model.release = threading.Event()
    profile = profile_for(m, max_batch, cls=model)
    mosel.attach(
        model,
        profile,
        scheduler=mosel.SchedulerConfig(max_queued_requests=queued + timed + 8),
    )
    rng = random.Random(seed)
    one_full_s = profile.plan.frontier(frozenset(profile.modalities), 1).best.latency_us / 1e6
    work_s = queued * one_full_s  # the queue's work at full accuracy
    inputs = {n: torch.zeros(1, 4) for n in NAMES[:m]}

    def slo() -> dict[str, float]:  # deadlines over the queue's span: part of it is late at full accuracy
        if rng.random() < urgent:  # urgent ones queue near the head, push it late, and expire
            return {"deadline_ms": 1e3 * rng.uniform(0.03, 0.06), "min_accuracy": 0.6}
        return {"deadline_ms": 1e3 * (0.03 + rng.uniform(0.2, 0.9) * work_s), "min_accuracy": 0.6}

    refusals: dict[str, int] = {}

    def submit(phase: str) -> Future[mosel.Result] | None:
        try:
            return model.submit(inputs, **slo())
        except mosel.MoselError as exc:  # refused at admission: counted, never fatal
            key = f"refused_{phase}"
            refusals[key] = refusals.get(key, 0) + 1
            refusals[f"{key}_{type(exc).__name__}"] = refusals.get(f"{key}_{type(exc).__name__}", 0) + 1
            return None

    first = model.submit(inputs)
    time.sleep(0.05)
    if freeze:
        gc.collect()
        gc.freeze()
    futures = [f for f in (submit("queueing") for _ in range(queued)) if f is not None]
    server = mosel.runtime._state(model).serve(model)
    spans = []
    with CollectorLog() as collections:
        for _ in range(timed):
            started = time.perf_counter()
            future = submit("timed")
            spans.append((started, time.perf_counter()))
            if future is not None:
                futures.append(future)
                victim = futures.pop(rng.randrange(len(futures)))  # keep the queue at its length
                victim.cancel()
    scheduler = server.scheduler
    with server.lock:
        window = [t.item for t in scheduler.queue[: scheduler.config.solver_window]]
        hint = [t.k for t in scheduler.queue[: scheduler.config.solver_window]]
    solves = []
    for _ in range(5):
        t0 = time.perf_counter()
        cpsat_assign(window, int(time.perf_counter() * 1e6), hint, time_limit_s=0.02)
        solves.append((time.perf_counter() - t0) * 1e3)
    counters = mosel.stats(model).counters
    model.release.set()
    mosel.close(model, cancel=True)
    first.result()
    if freeze:
        gc.unfreeze()
    times = sorted((end - start) * 1e3 for start, end in spans)
    hit = [collections.during(start, end) for start, end in spans]
    clean = sorted((end - start) * 1e3 for (start, end), gcs in zip(spans, hit, strict=True) if not gcs)
    pauses = {c for gcs in hit for c in gcs}
    return {
        "queued": queued,
        "urgent": urgent,
        "gc_frozen": freeze,
        "submit_p50_ms": round(statistics.median(times), 4),
        "submit_p99_ms": round(times[int(0.99 * (len(times) - 1))], 4),
        "submit_max_ms": round(times[-1], 4),
        "submit_max_without_gc2_ms": round(clean[-1], 4) if clean else float("nan"),
        "gc2_during_timed": len(pauses),
        "gc2_max_ms": round(max((c[1] - c[0]) * 1e3 for c in pauses), 2) if pauses else 0.0,
        "gc2_max_cpu_ms": round(max(c[2] for c in pauses), 2) if pauses else 0.0,
        "refused_queueing": refusals.get("refused_queueing", 0),
        "refused_timed": refusals.get("refused_timed", 0),
        "refusals": refusals,
        "replans": counters.get("greedy_assignments", 0),
        "cpsat_window_p50_ms": round(statistics.median(solves), 2),
    }


PARTS = ("decisions", "priced", "quality", "memory", "admission")


def saved_profile(m: int, folder: str | None) -> mosel.Profile:
    """:func:`profile_for` ``m`` modalities, kept as ``profile{m}.json`` in ``folder`` (when given).

    The planner's search is time-limited, so two runs may plan slightly different frontiers: code
    compared across runs (before / after a change) should price the same saved profiles.
    """
    path = pathlib.Path(folder, f"profile{m}.json") if folder else None
    if path is not None and path.exists():
        return mosel.Profile.load(path)
    profile = profile_for(m, 32 if m < 4 else 8)
    if path is not None:
        profile.save(path)
    return profile


def print_priced(args: argparse.Namespace, budget: float | None) -> list[dict[str, Any]]:
    """The ``priced`` part: decision times with the risk price on the timed path, as a table."""
    rows = []
    for m in (2, 3, 4):
        profile = saved_profile(m, args.profiles)
        for length in (16, 64):
            times = priced_decision_times(
                profile, length, args.iterations, load=args.load, headroom=args.headroom, miss_budget=budget
            )
            rows.append({"modalities": m, "queue": length, **times})
    print(
        f"\nmosel with miss_budget={budget}, below overload: arrivals at load {args.load} (cheapest "
        f"strategies), deadlines {args.headroom}x the queue's arrival time ({args.iterations} timed "
        "decisions per row; CPU time: the decision thread's own)"
    )
    print(
        "| modalities | queued jobs | wait p50 (ms) | p99 (ms) | max (ms) | CPU p50 (ms) | p99 (ms) | max (ms) "
        "| p99 without GC (ms) | GCs in timed (in slowest 1%) | risk price evaluated | its wait p50 (ms) "
        "| options weighed mean / max | jobs at risk mean | rho median | refused / failed | held back by (jobs) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        held = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1]))
        print(
            f"| {r['modalities']} | {r['queue']} | {r['wait_p50_ms']} | {r['wait_p99_ms']} | {r['wait_max_ms']} | "
            f"{r['cpu_p50_ms']} | {r['cpu_p99_ms']} | {r['cpu_max_ms']} | {r['wait_p99_without_gc_ms']} | "
            f"{r['gc_during_timed']} ({r['gc_in_slowest_1pct']}) | {r['risk_priced_share']:.0%} | "
            f"{r['risk_priced_wait_p50_ms']} | {r['risk_candidates_mean']} / {r['risk_candidates_max']} | "
            f"{r['risk_jobs_mean']} | {r['rho_median']} | {r['refused']} / {r['failed']} | {held} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before queueing (admission)")
    parser.add_argument(
        "--miss-budget", type=float, default=0.01,
        help="SchedulerConfig.miss_budget of the decision-time part (the risk price on); -1: None (the default)",
    )  # fmt: skip
    parser.add_argument("--load", type=float, default=0.6, help="arrivals' load in the priced part")
    parser.add_argument(
        "--headroom", type=float, default=4.0, help="deadlines over the queue's arrival time (priced part)"
    )
    parser.add_argument("--profiles", help="folder to keep the priced part's planned profiles in (and load)")
    parser.add_argument("--json")
    args = parser.parse_args()
    out: dict[str, object] = {}
    if "decisions" in args.parts:
        budget = None if args.miss_budget < 0 else args.miss_budget
        rows = []
        for m in (2, 3, 4):
            profile = profile_for(m, 32 if m < 4 else 8)
            for length in (1, 4, 16, 64):
                times = decision_times(profile, length, args.iterations, miss_budget=budget)
                rows.append({"modalities": m, "queue": length, **times})
        out["decisions"] = rows
        out["decisions_miss_budget"] = budget
        print(f"mosel with miss_budget={budget} ({args.iterations} timed decisions per row)")
        print(
            "| modalities | queued jobs | executor wait p50 (ms) | p99 (ms) | max (ms) | its CPU time p50 (ms) "
            "| p99 (ms) | max (ms) | held back by the risk price | CP-SAT p50 (ms) | CP-SAT max (ms) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['modalities']} | {r['queue']} | {r['wait_p50_ms']} | {r['wait_p99_ms']} | {r['wait_max_ms']} | "
                f"{r['cpu_p50_ms']} | {r['cpu_p99_ms']} | {r['cpu_max_ms']} | {r['risk_limited_share']:.0%} | "
                f"{r['cpsat_p50_ms']} | {r['cpsat_max_ms']} |"
            )
    if "priced" in args.parts:
        out["priced"] = print_priced(args, None if args.miss_budget < 0 else args.miss_budget)
    if "quality" in args.parts:
        q = quality()
        out["quality"] = q
        print(
            f"\nassignment quality on {q['queues']} random feasible queues (2-6 jobs, 2-5 options), "
            f"total accuracy over the exhaustive optimum: greedy mean {q['greedy_mean']} "
            f"(min {q['greedy_min']}), "
            f"CP-SAT 20 ms mean {q['cpsat_mean']} (min {q['cpsat_min']})"
        )
    if "memory" in args.parts:
        mem = queued_memory()
        out["memory"] = mem
        print(
            f"memory: {mem['jobs']} queued jobs cost {mem['total_mb']} MB beyond their inputs "
            f"({mem['bytes_per_job']} B/job)"
        )
    if "admission" in args.parts:
        admission = [
            submit_latency(queued, urgent=u, freeze=args.gc_freeze)
            for u in (0.0, 0.1)
            for queued in (1024, 4096)
        ]
        out["admission"] = admission
        print(f"\nadmission{' (gc.freeze() once the model is attached)' if args.gc_freeze else ''}:")
        print(
            "| queued one-row jobs | urgent share | submit p50 (ms) | p99 (ms) | max (ms) | max without gen-2 GC (ms) | "
            "gen-2 GCs during timed submits (max ms, CPU ms) | refused (queueing / timed) | re-assignments | "
            "CP-SAT window solve p50 (ms) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for a in admission:
            print(
                f"| {a['queued']} | {a['urgent']:.0%} | {a['submit_p50_ms']} | {a['submit_p99_ms']} | "
                f"{a['submit_max_ms']} | {a['submit_max_without_gc2_ms']} | {a['gc2_during_timed']} "
                f"({a['gc2_max_ms']}, {a['gc2_max_cpu_ms']}) | {a['refused_queueing']} / {a['refused_timed']} | "
                f"{a['replans']} | {a['cpsat_window_p50_ms']} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
