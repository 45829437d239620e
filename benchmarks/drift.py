"""The accuracy promise in production (issue 26): AV-Digits served while its audio degrades part-way.

The drift is measured on the real model once (``measure``: every configuration's accuracy, and
its agreement with the all-modality answer, on the test split with the audio's noise raised) and
committed (``profiles/av-digits.drift.json``), so that the simulation is machine-independent: the
real scheduler serves a seeded Poisson trace on a virtual clock (the committed profile and live
residuals, as ``run.py``), each served request's label is drawn from its configuration's accuracy
at the time it was served, and labels reach :class:`mosel.monitoring.Monitor` after a delay.
Shadow runs take the idle device in the simulation as they do in the server (the device is lent:
jobs arriving meanwhile queue behind the run) and agree with the cheap answer at the measured rate.

Reported (``--quick``: fewer seeds and shorter traces, a few minutes on two cores):

1. detection: labelled requests (served after the drift began) until the first drift alarm (of a
   configuration, or a modality's pooled one), per seed, with pooled detectors and without, at two drifts ("audio -15": the audio's SNR at -13 dB, where audio alone loses 15
   points; "audio -40": -20 dB); false alarms before the drift; a drift-free run of 10^5
   labelled requests, and the detectors' false-alarm rate on long synthetic streams;
2. floors: after the alarm, the share of 500-request windows whose measured accuracy (against
   the labels) is at or above the floor, with live floors and without (and how far below);
3. shadow: deadline violations with shadow runs and without at 0.25x, 0.5x and 1x load, and
   the agreement rate next to the labelled accuracy over time;
4. ``--real``: the AV-Digits model served live (threaded server, real audio noise raised part-way,
   labels back through ``mosel.feedback``), one short run.

Run: python benchmarks/drift.py [--quick] [--real] [--no-pooled] [--only PART] [--detection-seeds N]
                                [--floor-seeds N] [--json out.json]
     python benchmarks/drift.py measure      # re-measure the drift table (needs espeak-ng)
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conditions import CONDITIONS, arrivals_for
from scenarios import av_digits

import mosel
from mosel.clock import VirtualClock
from mosel.machine import Machine
from mosel.monitoring import Monitor, Sample, live_profile
from mosel.plan import configuration_key
from mosel.profiles import priced_ahead
from mosel.sidework import longest_step_us
from mosel.simulate import Engine, checked_trace, run_engines

DRIFT_TABLE = Path(__file__).resolve().parent / "profiles" / "av-digits.drift.json"
DRIFTS = {"audio -15": "-13.0", "audio -40": "-20.0"}
"""Scenario -> the audio SNR (dB) of the drifted stream (the baseline is -4 dB)."""
FLOORS = {"audio -15": 0.75, "audio -40": 0.70}
"""Scenario -> the jobs' floor: one that a configuration still reaches after the drift."""
Configuration = frozenset[str]
ARMED_RATE = [5e-3]
"""An arming episode's false-alarm probability (``--armed-rate``; ``Monitoring.armed_false_alarm_rate``)."""


# ---------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class World:
    """Each configuration's accuracy and agreement with the best answer, before and after the drift."""

    before: Mapping[Configuration, tuple[float, float]]
    after: Mapping[Configuration, tuple[float, float]]
    drift_s: float
    confidence: Mapping[tuple[bool, Configuration, bool], list[int]] = field(default_factory=dict)
    """(drifted, configuration, answered right) -> the real model's confidence counts per bin."""

    def at(self, config: Configuration, t: float) -> tuple[float, float]:
        return (self.after if t >= self.drift_s else self.before)[config]

    def draw_confidence(self, rng: random.Random, config: Configuration, t: float, correct: int) -> float:
        """A served output's confidence given its correctness: a bin drawn from the real model's
        histogram (at this time's SNR, rows answered the same way), a point drawn within it."""
        counts = self.confidence[(t >= self.drift_s, config, bool(correct))]
        b = rng.choices(range(len(counts)), weights=counts)[0]
        return (b + rng.random()) / len(counts)


def world(profile: mosel.Profile, drift: str | None, drift_s: float, *, benign: bool = False) -> World:
    """The profile's accuracies, moved after ``drift_s`` by the drop the real model showed.

    ``benign``: the confidences move as the drift's (given each answer's correctness), the
    accuracies do not: a shift that arms the label-free test without any loss to confirm.
    """
    table = json.loads(DRIFT_TABLE.read_text())["snr_db"]
    base = table["-4.0"]
    keys = {c: profile.key(c) for c in profile.accuracy}
    before = {c: (profile.accuracy[c], base[k]["agreement"]) for c, k in keys.items()}
    moved = table[DRIFTS[drift]] if drift is not None else base
    confidence = {
        (drifted, c, right): rows[k]["confidence"]["right" if right else "wrong"]
        for drifted, rows in ((False, base), (True, moved))
        for c, k in keys.items()
        for right in (True, False)
    }
    if drift is None:
        return World(before, before, math.inf, confidence)
    if benign:
        return World(before, before, drift_s, confidence)
    after = {
        c: (
            min(max(profile.accuracy[c] + moved[k]["accuracy"] - base[k]["accuracy"], 0.0), 1.0),
            moved[k]["agreement"],
        )
        for c, k in keys.items()
    }
    return World(before, after, drift_s, confidence)


# ---------------------------------------------------------------------------------- one simulated run


@dataclass
class Outcome:
    """What one simulated run shows."""

    alarms: list[tuple[float, str, int]] = field(
        default_factory=list
    )  # (time, configuration, labels since drift)
    served: list[tuple[float, float, int]] = field(default_factory=list)  # (finish, true accuracy, correct)
    labels: int = 0
    labels_after_drift: int = 0
    repriced_at: list[float] = field(default_factory=list)
    curve: list[tuple[float, dict[str, tuple[float, float | None]]]] = field(default_factory=list)
    violations: float = 0.0
    refused: float = 0.0
    benign_shifts: int = 0  # arming episodes cleared by their labels


class _ShadowRun:
    """The marker of a shadow run occupying a simulated engine (in place of a batch): its steps' ends."""

    def __init__(self, sample: Sample, started: float, ends: list[float]) -> None:
        self.sample = sample
        self.started = started
        self.ends = ends  # when each step (a branch, fusion) ends
        self.aborted = False


class DriftEngine(Engine):
    """A simulated replica whose served requests get labels, and whose idle device runs shadows."""

    def __init__(self, profile: mosel.Profile, config: mosel.SchedulerConfig, *, clock: VirtualClock,
                 the_world: World, monitor: Monitor, shadow_rate: float, seed: int,
                 residuals: mosel.Residuals | None) -> None:  # fmt: skip
        # One stream of per-batch draws seeded by the run's seed, as before the common machine
        # (mosel.machine): one policy per run here, and docs/monitoring.md's figures stay as measured.
        super().__init__(profile, config, machine=Machine(residuals, seed=seed, draws="per-batch"))
        self.residuals = residuals  # the shadows' batch times, from their own stream
        self.clock = clock
        self.world = the_world
        self.monitor = monitor
        self.shadow_rate = shadow_rate
        self.draws = random.Random(seed + 101)
        self.shadow_rng = random.Random(seed + 202)  # batches keep their own draws: runs stay comparable
        self.confidence_rng = random.Random(seed + 303)  # so do the labels: the confidences draw apart
        self.best = {a: max((c for c in profile.accuracy if c <= a), key=lambda c: profile.accuracy[c])
                     for a in profile.accuracy}  # fmt: skip
        self.pending: list[tuple[float, int, Configuration, float, float]] = []  # label heap
        self.outcome = Outcome()
        self.shadow: _ShadowRun | None = None
        self.delay_s = 1.0

    @property
    def waiting(self) -> bool:
        if self.running is not None:
            return False
        if self.scheduler.queue:
            return True
        return self.shadow_rate > 0 and self.monitor.shadow_wait_s(self.clock.now()) == 0.0

    def dispatch(self, now: float) -> None:
        if self.scheduler.queue:
            super().dispatch(now)
            return
        sample = self.monitor.take_sample()
        if sample is None:
            return
        step_us = longest_step_us(self.scheduler.pricer, sample.best)
        if step_us > self.monitor.shadow_limit_us():
            self.monitor.skip(sample)
            return
        ratio, overhead_us = 1.0, 0.0
        if self.residuals is not None:
            ratio, overhead_us = self.residuals.sample(self.shadow_rng, now)
        ends, t = [], now
        for part_us in self.cost.parts(((sample.best, 1),)).values():
            t += part_us * ratio / 1e6
            ends.append(t)
        ends[-1] += overhead_us / 1e6
        self.scheduler.lend(now, step_us)
        self.shadow = _ShadowRun(sample, now, ends)
        self.running = self.shadow  # type: ignore[assignment]
        self.done_at = ends[-1]

    def admit(self, index: int, arrival: Any, now: float) -> None:
        super().admit(index, arrival, now)
        run = self.shadow
        if run is not None and self.scheduler.queue and not run.aborted:  # abandoned after its step
            run.aborted = True
            self.done_at = min(self.done_at, next(end for end in run.ends if end >= now))

    def finish(self) -> None:
        if self.shadow is not None:
            run, self.shadow = self.shadow, None
            device_s = self.done_at - run.started
            if run.aborted:
                self.monitor.skip(run.sample, aborted=True, device_s=device_s)
            else:
                _, agreement = self.world.at(run.sample.served, run.sample.at)
                agree = 1.0 if self.shadow_rng.random() < agreement else 0.0
                self.monitor.shadow_agreement(run.sample.served, agree, device_s)
            self.scheduler.lend_back(self.done_at)
            self.running, self.done_at = None, math.inf
            return
        batch, now = self.running, self.done_at
        super().finish()
        assert batch is not None
        for task in batch.tasks:
            job = task.job
            if job.pending == 0 and job.error is None and job.finished == now:
                self._served(job, now)

    def _served(self, job: Any, now: float) -> None:
        cheap: list[tuple[Configuration, Configuration]] = []
        for task in job.tasks:
            best = self.best[task.frontier.available]
            for config, count in task.strategy.groups:
                accuracy, _ = self.world.at(config, now)
                confidences = []
                for _ in range(count):
                    correct = 1 if self.draws.random() < accuracy else 0
                    confidences.append(self.world.draw_confidence(self.confidence_rng, config, now, correct))
                    self.outcome.served.append((now, accuracy, correct))
                    heapq.heappush(
                        self.pending, (now + self.delay_s, len(self.outcome.served), config, correct, now)
                    )
                self.monitor.digested(config, confidences)  # as the server's idle-time digest does
                if config != best:
                    cheap.append((config, best))
        if cheap and self.shadow_rate > 0 and self.shadow_rng.random() < self.shadow_rate:
            served, best = cheap[self.shadow_rng.randrange(len(cheap))]
            self.monitor.offer(Sample(now, {}, served, best, None))

    def deliver(self, now: float) -> None:
        """Hand the monitor every label due by ``now`` (labels arrive ``delay_s`` after service)."""
        pending, outcome = self.pending, self.outcome
        while pending and pending[0][0] <= now:
            _, _, config, correct, served_at = heapq.heappop(pending)
            outcome.labels += 1
            if served_at >= self.world.drift_s:
                outcome.labels_after_drift += 1
            self.monitor.observe(config, float(correct), served_at=served_at)


def simulate_drift(
    profile: mosel.Profile,
    residuals: Any,
    *,
    load: float,
    seconds: float,
    seed: int,
    drift: str | None,
    drift_s: float,
    floor: float,
    slack_ms: float,
    live_floors: bool,
    shadow_rate: float,
    curve_every_s: float = 0.0,
    pooled: bool = True,
    arm_rate: float | None = None,
    benign: bool = False,
) -> Outcome:
    """One seeded run: the trace, the drift, the labels, the monitor (and live floors)."""
    best = max(profile.accuracy.values())
    arrivals = arrivals_for(
        profile, CONDITIONS["strict"], load, seconds, seed, slack_ms=slack_ms, drop=best - floor
    )
    trace = checked_trace(profile, arrivals)
    clock = VirtualClock()
    the_world = world(profile, drift, drift_s, benign=benign)
    outcome_alarms: list[tuple[float, str, int]] = []

    def alarmed(alarm: mosel.Alarm) -> None:
        if alarm.kind in ("drift", "modality_drift"):  # a modality's pooled alarm: "audio (pooled)"
            name = alarm.configuration if alarm.kind == "drift" else f"{alarm.configuration} (pooled)"
            outcome_alarms.append((clock.now(), name, engine.outcome.labels_after_drift))

    settings = mosel.Monitoring(
        live_floors=live_floors, shadow_rate=shadow_rate, on_alarm=alarmed, pooled=pooled, arm_rate=arm_rate,
        armed_false_alarm_rate=ARMED_RATE[0],
    )
    monitor = Monitor(profile, settings, name="AVDigits", clock=clock.now)
    engine = DriftEngine(
        profile, mosel.SchedulerConfig(), clock=clock, the_world=the_world, monitor=monitor,
        shadow_rate=shadow_rate, seed=seed, residuals=residuals,
    )  # fmt: skip

    def reprice() -> None:  # the server does this on its background thread; here, at once
        table = monitor.priced()
        live = live_profile(profile, table)
        engine.scheduler.set_profile(live, priced_ahead(live, {}))
        monitor.applied(table)
        engine.outcome.repriced_at.append(clock.now())

    monitor.on_change = reprice
    next_curve = [0.0]

    def report(t: float) -> None:
        engine.deliver(t)
        if curve_every_s and t >= next_curve[0]:
            next_curve[0] = t + curve_every_s
            snap = monitor.snapshot().configurations
            engine.outcome.curve.append((t, {k: (c.live, c.agreement) for k, c in snap.items()}))

    run_engines(clock, [engine], trace, lambda index, arrival, now: 0, report, 0.05)
    sim = engine.simulation(trace, clock.now())
    requests = sum(r.arrival.n for r in sim.records)
    refused = sum(r.arrival.n for r in sim.records if r.error == "AccuracyUnreachableError")
    on_time = sum(r.arrival.n for r in sim.records if r.on_time)
    outcome = engine.outcome
    outcome.alarms = outcome_alarms
    # deadline violations among the requests admitted (a floor out of reach is refused, not late)
    outcome.violations = 1 - on_time / (requests - refused) if requests > refused else 0.0
    outcome.refused = refused / max(requests, 1)
    outcome.benign_shifts = monitor.snapshot().counters["benign_shifts"]
    return outcome


# ---------------------------------------------------------------------------------- the reports


def windows(
    served: Sequence[tuple[float, float, int]], after_s: float, size: int = 500
) -> list[tuple[float, float]]:
    """(measured, true) accuracy of consecutive ``size``-request windows of requests served after ``after_s``."""
    rows = sorted(r for r in served if r[0] >= after_s)
    out = []
    for i in range(0, len(rows) - size + 1, size):
        chunk = rows[i : i + size]
        out.append((sum(c for _, _, c in chunk) / size, sum(a for _, a, _ in chunk) / size))
    return out


def detection(
    profile: mosel.Profile, residuals: Any, args: argparse.Namespace, slack_ms: float
) -> dict[str, Any]:
    """Labels from the drift's start to the first alarm, per drift and seed; false alarms before it."""
    out: dict[str, Any] = {}
    for drift in args.drifts:
        variants = [(True, args.arm_rate)] if args.arm_rate is not None else []
        if not (args.armed_only and variants):
            variants += [(True, None), (False, None)] if args.pooled else [(False, None)]
        for pooled, arm_rate in variants:
            delays, early, missed, first = [], 0, 0, []
            for seed in range(args.seeds):
                o = simulate_drift(
                    profile, residuals, load=0.5, seconds=args.seconds, seed=seed, drift=drift, drift_s=args.drift_s,
                    floor=args.floor or FLOORS[drift], slack_ms=slack_ms, live_floors=False, shadow_rate=0.0,
                    pooled=pooled, arm_rate=arm_rate,
                )  # fmt: skip
                early += sum(1 for t, _, _ in o.alarms if t < args.drift_s)
                after = [(t, c, n) for t, c, n in o.alarms if t >= args.drift_s]
                if after:
                    delays.append(after[0][2])
                    first.append(after[0][1])
                else:
                    missed += 1
            key = drift if pooled else f"{drift}, per-configuration detectors only"
            key = f"{drift}, armed by confidence (arm rate {arm_rate:g})" if arm_rate else key
            out[key] = {
                "median_labels": statistics.median(delays) if delays else None,
                "labels": sorted(delays),
                "first_alarm": first,
                "missed": missed,
                "false_alarms_before_drift": early,
            }
            print(f"  {key}: labels to the first alarm, median {out[key]['median_labels']} over "
                  f"{len(delays)} seeds ({delays}; first alarms {first}), {missed} runs without an alarm, "
                  f"{early} false alarms before the drift", flush=True)  # fmt: skip
    return out


def benign(profile: mosel.Profile, residuals: Any, args: argparse.Namespace, slack_ms: float) -> dict[str, Any]:
    """A benign shift: the confidences move as a drift's, the accuracy does not. Every alarm is false."""
    out: dict[str, Any] = {}
    for drift in args.drifts:
        alarms, cleared, labels = [], [], 0
        for seed in range(args.seeds):
            o = simulate_drift(
                profile, residuals, load=0.5, seconds=args.seconds, seed=seed, drift=drift, drift_s=args.drift_s,
                floor=args.floor or FLOORS[drift], slack_ms=slack_ms, live_floors=False, shadow_rate=0.0,
                pooled=args.pooled, arm_rate=args.arm_rate, benign=True,
            )  # fmt: skip
            alarms.append(len(o.alarms))
            cleared.append(o.benign_shifts)
            labels += o.labels
        key = f"confidence as {drift}, accuracy unchanged"
        out[key] = {"false_alarms": alarms, "episodes_cleared": cleared, "labels": labels}
        print(f"  {key}: false alarms per seed {alarms} (total {sum(alarms)} in {args.seeds} runs, {labels} "
              f"labels), episodes cleared by labels per seed {cleared}", flush=True)  # fmt: skip
    return out


def no_drift(
    profile: mosel.Profile, residuals: Any, args: argparse.Namespace, slack_ms: float
) -> dict[str, Any]:
    """False alarms without drift: simulated runs of >= 10^5 labels each, and long synthetic streams."""
    runs = []
    for seed in range(99, 99 + args.clean_seeds):
        o = simulate_drift(
            profile, residuals, load=0.5, seconds=args.clean_seconds, seed=seed, drift=None, drift_s=math.inf,
            floor=args.floor or FLOORS["audio -15"], slack_ms=slack_ms, live_floors=True, shadow_rate=0.0,
            pooled=args.pooled, arm_rate=args.arm_rate,
        )  # fmt: skip
        runs.append((o.labels, len(o.alarms)))
        print(f"  served without drift, seed {seed}: {o.labels} labels, {len(o.alarms)} alarms "
              f"({[c for _, c, _ in o.alarms]})", flush=True)  # fmt: skip
    # Synthetic streams through the monitor itself (every detector, pooled ones too): labels of
    # configurations drawn uniformly, each at its profile's accuracy; after an alarm, a reset.
    # With arming, each label's request also has a confidence, drawn given its correctness from
    # the real model's drift-free histograms, digested before its label arrives.
    settings = mosel.Monitoring(pooled=args.pooled, arm_rate=args.arm_rate, armed_false_alarm_rate=args.armed_rate)
    configs = sorted(profile.accuracy, key=profile.key)
    clean = world(profile, None, math.inf)
    alarms = labels = 0
    for seed in range(args.streams):
        rng = random.Random(5 + seed)
        monitor = Monitor(profile, settings, name="AVDigits")
        for _ in range(args.stream_labels):
            config = configs[rng.randrange(len(configs))]
            correct = 1 if rng.random() < profile.accuracy[config] else 0
            if args.arm_rate is not None:
                monitor.digested(config, [clean.draw_confidence(rng, config, 0.0, correct)])
            if monitor.observe(config, float(correct)) is not None:
                monitor.reset()
        counters = monitor.snapshot().counters
        alarms += counters["alarms"] + counters["modality_alarms"]
        labels += args.stream_labels
    print(f"  synthetic streams at the profile's accuracies ({args.streams} seeds, all configurations): {alarms} "
          f"alarms in {labels:.1e} labels (stated bound: {settings.false_alarm_rate:g} per label, every "
          f"detector together{'' if args.arm_rate is None else f'; plus {args.arm_rate:g} per request armed'})",
          flush=True)  # fmt: skip
    armings = _false_armings(profile, clean, args.stream_labels) if args.arm_rate is not None else {}
    return {"simulated": runs, "simulated_labels": sum(n for n, _ in runs), "simulated_alarms": sum(a for _, a in runs),
            "stream_labels": labels, "stream_alarms": alarms, "stated_rate": settings.false_alarm_rate,
            "armings": armings}  # fmt: skip


def _false_armings(profile: mosel.Profile, clean: World, rows: int) -> dict[str, Any]:
    """The arming test alone on drift-free rows (the real model's confidences, configurations mixed
    uniformly), at its stated rate and looser ones: armings started per row, measured."""
    from mosel.drift_armed import Arming

    configs = sorted(profile.accuracy, key=profile.key)
    pools = {m: p.configs for m, p in Monitor(profile, mosel.Monitoring(), name="x")._modalities.items()}
    out = {}
    for rate in (1e-6, 1e-4, 1e-2):
        rng = random.Random(7)
        arming = Arming(configs, pools, reference_rows=1000, rate=rate, drop=mosel.Monitoring().arm_drop)
        started = 0
        for _ in range(rows // 100):
            config = configs[rng.randrange(len(configs))]
            batch = [clean.draw_confidence(rng, config, 0.0, int(rng.random() < profile.accuracy[config]))
                     for _ in range(100)]  # fmt: skip
            changes = arming.add(config, batch, [0.0] * len(batch))  # type: ignore[arg-type]
            started += sum(1 for _, armed in changes if armed)
        out[f"{rate:g}"] = started / rows
        print(f"  arming alone, drift-free rows of the real model's confidences: stated {rate:g} per row, "
              f"measured {started} armings in {rows:.1e} rows", flush=True)  # fmt: skip
    return out


def noise_share(
    served: Sequence[tuple[float, float, int]], after_s: float, floor: float, size: int = 500
) -> float:
    """The share of windows expected at or above ``floor`` from the labels' sampling alone.

    Each window's requests are correct with their true accuracies; its measured accuracy is
    then at or above the floor with probability ``P(correct >= ceil(floor * size))`` (normal,
    continuity-corrected). This is the most any re-pricing can show at the accuracy served.
    """
    rows = sorted(r for r in served if r[0] >= after_s)
    probs = []
    need = math.ceil(floor * size - 1e-9)
    for i in range(0, len(rows) - size + 1, size):
        ps = [a for _, a, _ in rows[i : i + size]]
        mean, sd = sum(ps), math.sqrt(sum(p * (1 - p) for p in ps)) or 1e-9
        probs.append(1 - statistics.NormalDist(mean, sd).cdf(need - 0.5))
    return statistics.mean(probs) if probs else math.nan


def floors(
    profile: mosel.Profile, residuals: Any, args: argparse.Namespace, slack_ms: float
) -> dict[str, Any]:
    """Windows at or above the floor after the alarm, live floors on and off."""
    out: dict[str, Any] = {}
    for drift in args.drifts:
        for load in args.loads:
            for live in (True, False):
                shares, shortfalls, refused, violations, true_shares, noise = [], [], [], [], [], []
                floor = args.floor or FLOORS[drift]
                for seed in range(args.few_seeds):
                    o = simulate_drift(
                        profile, residuals, load=load, seconds=args.seconds, seed=seed, drift=drift,
                        drift_s=args.drift_s, floor=floor, slack_ms=slack_ms, live_floors=live, shadow_rate=0.0,
                        pooled=args.pooled, arm_rate=args.arm_rate,
                    )  # fmt: skip
                    after = [t for t, _, _ in o.alarms if t >= args.drift_s]
                    start = after[0] if after else args.drift_s
                    ws = windows(o.served, start)
                    if ws:
                        shares.append(sum(1 for m, _ in ws if m >= floor) / len(ws))
                        shortfalls.append(statistics.mean(floor - m for m, _ in ws))
                        true_shares.append(sum(1 for _, a in ws if a >= floor - 1e-9) / len(ws))
                        noise.append(noise_share(o.served, start, floor))
                    refused.append(o.refused)
                    violations.append(o.violations)
                key = f"{drift} (floor {floor}) @ {load}x, live floors {'on' if live else 'off'}"
                out[key] = {
                    "windows_at_or_above_floor": statistics.mean(shares) if shares else None,
                    "mean_shortfall": statistics.mean(shortfalls) if shortfalls else None,
                    "true_at_or_above_floor": statistics.mean(true_shares) if true_shares else None,
                    "expected_from_sampling": statistics.mean(noise) if noise else None,
                    "refused_unreachable": statistics.mean(refused),
                    "violations": statistics.mean(violations),
                }
                r = out[key]
                print(f"  {key}: windows >= floor {_pct(r['windows_at_or_above_floor'])} (true accuracy >= floor "
                      f"{_pct(r['true_at_or_above_floor'])}, expected from sampling alone "
                      f"{_pct(r['expected_from_sampling'])}), mean measured - floor "
                      f"{_pts(r['mean_shortfall'], -1)}, refused (floor unreachable) {_pct(r['refused_unreachable'])}, "
                      f"deadline violations (admitted) {_pct(r['violations'])}", flush=True)  # fmt: skip
    return out


def shadow(
    profile: mosel.Profile, residuals: Any, args: argparse.Namespace, slack_ms: float
) -> dict[str, Any]:
    """Deadline violations with shadow runs and without, and the agreement curve."""
    out: dict[str, Any] = {}
    for load in (0.25, 0.5, 1.0):
        pair = {}
        for rate in (0.0, args.shadow_rate):
            v = [
                simulate_drift(
                    profile, residuals, load=load, seconds=args.seconds, seed=seed, drift="audio -15",
                    drift_s=args.drift_s, floor=args.floor or FLOORS["audio -15"], slack_ms=slack_ms, live_floors=False, shadow_rate=rate,
                ).violations
                for seed in range(args.few_seeds)
            ]  # fmt: skip
            pair["on" if rate else "off"] = statistics.mean(v)
        out[f"{load}x"] = pair
        print(
            f"  {load}x load: violations {_pct(pair['off'])} without shadow runs, {_pct(pair['on'])} with",
            flush=True,
        )
    o = simulate_drift(
        profile, residuals, load=0.5, seconds=args.seconds, seed=0, drift="audio -40", drift_s=args.drift_s,
        floor=args.floor or FLOORS["audio -40"], slack_ms=slack_ms, live_floors=False, shadow_rate=args.shadow_rate, curve_every_s=args.seconds / 12,
    )  # fmt: skip
    keys = ("image+audio", "audio+video", "image+video")
    print("  t (s) | " + " | ".join(f"{k}: live acc / agreement" for k in keys))
    for t, row in o.curve:
        print(f"  {t:5.1f} | " + " | ".join(f"{row[k][0]:.3f} / {_opt(row[k][1])}" for k in keys))
    out["curve"] = [(t, {k: row[k] for k in keys}) for t, row in o.curve]
    return out


def overhead(
    profile: mosel.Profile, residuals: Any, args: argparse.Namespace, slack_ms: float
) -> dict[str, Any]:
    """``infer`` on a model that computes nothing, monitored and not, interleaved; and what a label costs."""
    import torch

    from mosel.testing import Passthrough, synthetic_profile

    branch_us = {"audio": [100 + 10 * b for b in range(1, 33)], "video": [300 + 60 * b for b in range(1, 33)]}
    accuracy = {"audio": 0.78, "video": 0.55, "audio+video": 0.92}
    models = {}
    for name, monitoring in (
        ("off", None),
        ("on", mosel.Monitoring(shadow_rate=0.0)),
        ("on, shadow 5%", mosel.Monitoring(shadow_rate=0.05)),
    ):
        model = Passthrough().eval()
        mosel.attach(
            model, synthetic_profile(model, branch_us=branch_us, accuracy=accuracy), monitoring=monitoring
        )
        models[name] = model
    out: dict[str, Any] = {}
    repeats = 2000 if args.quick else 10000
    for n in (1, 8):
        x = {"audio": torch.randn(n, 4), "video": torch.randn(n, 4)}
        times: dict[str, list[float]] = {k: [] for k in models}
        for model in models.values():  # warm up
            for _ in range(50):
                model.infer(x, deadline_ms=50.0, min_accuracy=0.7)  # type: ignore[attr-defined]
        for i in range(repeats):
            order = list(models.items())
            if i % 2:
                order.reverse()
            for name, model in order:
                t0 = time.perf_counter_ns()
                model.infer(x, deadline_ms=50.0, min_accuracy=0.7)  # type: ignore[attr-defined]
                times[name].append((time.perf_counter_ns() - t0) / 1000)
        medians = {k: statistics.median(v) for k, v in times.items()}
        out[f"batch {n}"] = medians
        print(f"  infer, batch {n}: median us " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items())
              + f" over {repeats} interleaved calls", flush=True)  # fmt: skip
    model = models["on"]
    results = [model.infer({"audio": torch.randn(1, 4), "video": torch.randn(1, 4)}) for _ in range(2000)]  # type: ignore[attr-defined]
    t0 = time.perf_counter_ns()
    for r in results:
        mosel.feedback(model, r.id, [0])
    per_label = (time.perf_counter_ns() - t0) / 1000 / len(results)
    out["feedback_us_per_call"] = per_label
    print(
        f"  mosel.feedback of a 1-request job: {per_label:.1f} us (on the caller's thread, off the request path)"
    )
    for model in models.values():
        mosel.close(model)
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(x: float | None, sign: int = 1) -> str:
    return "n/a" if x is None else f"{sign * 100 * x:+.1f} pts"


def _opt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------- the real model


def real_run(args: argparse.Namespace) -> dict[str, Any]:
    """The AV-Digits model served live; the audio's noise raised part-way; labels fed back late."""

    import torch
    from scenarios import av_digits_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from av_digits import data

    built = av_digits_model(profile=False)
    if built is None:
        raise SystemExit("espeak-ng is needed to build AV-Digits")
    model, _, clean = built
    with warnings.catch_warnings():  # a busy host's cost-model warning is shown; the run goes on
        warnings.simplefilter("default", mosel.MoselWarning)  # shown, not fatal
        profile = mosel.profile(
            model, clean.batches(100), max_batch_size=32, batch_sizes=[1, 2, 4, 8, 16, 32], repeats=3,
            progress=False,
        )  # fmt: skip
    noisy = data.load("test", audio_snr_db=float(DRIFTS["audio -40"]))
    floor = args.floor or FLOORS["audio -40"]
    alarms: list[
        tuple[float, mosel.Alarm, int]
    ] = []  # (time, alarm, labels of requests sent after the drift)
    after = [0]
    started = time.monotonic()
    mosel.attach(model, profile, monitoring=mosel.Monitoring(
        live_floors=True, shadow_rate=0.2, arm_rate=args.arm_rate,
        on_alarm=lambda a: alarms.append((time.monotonic() - started, a, after[0]))))  # fmt: skip
    slack_ms = 3 * statistics.mean(profile.plan.frontier(frozenset(profile.modalities), n).best.predicted_latency_ms
                                   for n in range(1, 9))  # fmt: skip
    rng = random.Random(0)
    rate = args.real_rate
    served: list[tuple[float, int, str]] = []
    labels: list[tuple[float, str, list[int], float]] = []
    curve = []
    end = args.real_seconds
    drift_at = args.real_seconds / 3
    futures = []
    t = 0.0
    while t < end:
        t += rng.expovariate(rate)
        now = time.monotonic() - started
        if t > now:
            time.sleep(t - now)
        split = noisy if t >= drift_at else clean
        rows = torch.tensor([rng.randrange(len(split)) for _ in range(rng.choice((1, 2, 4)))])
        inputs = split.inputs(rows)
        truth = split.labels[rows].tolist()
        full = profile.plan.frontier(frozenset(profile.modalities), len(truth)).best.predicted_latency_ms
        future = model.submit(inputs, deadline_ms=full + slack_ms, min_accuracy=floor)
        futures.append((t, future, truth))
        done = time.monotonic() - started
        while futures and futures[0][1].done():
            at, f, truth_ = futures.pop(0)
            if f.exception() is None:
                r = f.result()
                for cfg, ok in zip(
                    r.modalities, (r.output.argmax(-1) == torch.tensor(truth_)).tolist(), strict=True
                ):
                    served.append((done, int(ok), "+".join(sorted(cfg))))
                labels.append((done + args.real_delay_s, r.id, truth_, at))
        while labels and labels[0][0] <= done:
            _, rid, truth_, sent = labels.pop(0)
            if sent >= drift_at:
                after[0] += len(truth_)
            mosel.feedback(model, rid, truth_)
        if not curve or done - curve[-1][0] >= end / 12:
            snap = mosel.stats(model).accuracy
            assert snap is not None
            curve.append((done, {k: (c.live, c.agreement, c.labels) for k, c in snap.configurations.items()}))
    mosel.close(model)
    snap = mosel.stats(model)
    acc = snap.accuracy
    assert acc is not None
    first = next(
        ((at, a, n) for at, a, n in alarms if a.kind in ("drift", "modality_drift") and at >= drift_at), None
    )
    window_acc = windows([(at, 0.0, ok) for at, ok, _ in served], first[0] if first else drift_at, size=200)
    before = [ok for at, ok, _ in served if at < drift_at]
    result = {
        "served": len(served),
        "accuracy_before": statistics.mean(before) if before else None,
        "alarm": None
        if first is None
        else {"at_s": first[0], "configuration": first[1].configuration, "labels_after_drift": first[2]},
        "alarms": [(round(at, 1), a.kind, a.configuration) for at, a, _ in alarms],
        "windows_after_alarm": [m for m, _ in window_acc],
        "counters": dict(acc.counters),
        "violations": 1 - snap.counters.get("served_on_time", 0) / max(snap.counters.get("submitted", 1), 1),
        "curve": curve,
    }
    print(f"  real: served {len(served)} requests; accuracy before the drift {_opt(result['accuracy_before'])}; "
          f"first alarm {result['alarm']} (drift at {drift_at:.0f} s); counters {dict(acc.counters)}", flush=True)  # fmt: skip
    print(f"  real: alarms {result['alarms']}; deadline violations {_pct(result['violations'])}", flush=True)
    ws = result["windows_after_alarm"]
    print(f"  real: measured accuracy of 200-request windows after the alarm: {[round(m, 3) for m in ws]} "
          f"(floor {floor}; {sum(m >= floor for m in ws)} of {len(ws)} at or above)", flush=True)  # fmt: skip
    keys = ("audio+image", "audio+video", "image+video", "audio+image+video")
    for at, row in curve:
        print(f"  {at:5.1f} s | " + " | ".join(
            f"{k}: {row.get(profile.key(frozenset(k.split('+'))), (math.nan, None, 0))[0]:.3f}/"
            f"{_opt(row.get(profile.key(frozenset(k.split('+'))), (0, None, 0))[1])}" for k in keys))  # fmt: skip
    return result


# ---------------------------------------------------------------------------------- measuring the drift


def measure() -> None:
    """Re-measure the drift table on the real model (accuracy and agreement per configuration)."""
    import torch
    from scenarios import av_digits_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from av_digits import data

    built = av_digits_model(profile=False)
    if built is None:
        raise SystemExit("espeak-ng is needed to build AV-Digits")
    model = built[0]
    spec = mosel.spec_of(model)
    table: dict[str, Any] = {}
    for snr in ("-4.0", *DRIFTS.values()):
        split = data.load("test", audio_snr_db=float(snr))
        with torch.inference_mode():
            x = split.inputs()
            feats = {m: getattr(model, spec.branches[m])(x[m]) for m in spec.modalities}
            outs = {configuration_key(c, spec.modalities): torch.softmax(model.fuse({m: feats[m] for m in c}), -1)
                    for c in spec.configurations}  # fmt: skip
        preds = {k: o.argmax(-1) for k, o in outs.items()}
        best = preds[configuration_key(frozenset(spec.modalities), spec.modalities)]
        table[snr] = {k: {"accuracy": round(float((p == split.labels).double().mean()), 4),
                          "agreement": round(float((p == best).double().mean()), 4),
                          "confidence": _confidence_counts(outs[k], p == split.labels)} for k, p in preds.items()}  # fmt: skip
        print(snr, {k: v["accuracy"] for k, v in table[snr].items()})
    DRIFT_TABLE.write_text(json.dumps({
        "source": "python benchmarks/drift.py measure (the AV-Digits demo model, 6 epochs, its 540-request "
                  "test split, audio noise at each SNR; confidence: counts per bin of the top softmax "
                  "probability, rows answered right and wrong)",
        "baseline_snr_db": -4.0, "snr_db": table}, indent=1))  # fmt: skip
    print(f"wrote {DRIFT_TABLE}")


def _confidence_counts(probs: Any, correct: Any) -> dict[str, list[int]]:
    """The served outputs' confidence (top probability) in :data:`mosel.drift.CONFIDENCE_BINS` bins,
    for the rows answered right and wrong apart (the simulation draws one given the other)."""
    from mosel.drift import CONFIDENCE_BINS

    bins = (probs.max(-1).values.clamp(0, 1) * CONFIDENCE_BINS).long().clamp(max=CONFIDENCE_BINS - 1)
    return {
        name: [int(n) for n in bins[mask].bincount(minlength=CONFIDENCE_BINS).tolist()]
        for name, mask in (("right", correct), ("wrong", ~correct))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="run", choices=("run", "measure"))
    parser.add_argument("--quick", action="store_true", help="3 seeds, 60 s traces (a few minutes)")
    parser.add_argument("--floor", type=float, default=None, help="the jobs' floor (default: per drift)")
    parser.add_argument("--drifts", nargs="*", default=list(DRIFTS), choices=list(DRIFTS))
    parser.add_argument("--shadow-rate", type=float, default=0.05)
    parser.add_argument(
        "--detection-seeds", type=int, default=None, help="seeds of detection (default 3 quick, 20)"
    )
    parser.add_argument(
        "--floor-seeds", type=int, default=None, help="seeds of floors and shadow runs (2 quick, 10)"
    )
    parser.add_argument("--no-pooled", dest="pooled", action="store_false",
                        help="per-configuration detectors only (Monitoring(pooled=False)), as before issue 26's pooling")  # fmt: skip
    parser.add_argument("--arm-rate", type=float, default=1e-6,
                        help="label-free arming (Monitoring(arm_rate=...)): false armings per request (default 1e-6, as mosel's)")  # fmt: skip
    parser.add_argument("--no-arming", dest="arm_rate", action="store_const", const=None,
                        help="labels alone (Monitoring(arm_rate=None))")  # fmt: skip
    parser.add_argument("--armed-only", action="store_true", help="detection: armed only (not also labels alone)")
    parser.add_argument("--armed-rate", type=float, default=5e-3,
                        help="an arming episode's false-alarm probability (Monitoring.armed_false_alarm_rate)")  # fmt: skip
    parser.add_argument("--real", action="store_true", help="also serve the real model live (about a minute)")
    parser.add_argument("--real-seconds", type=float, default=45.0)
    parser.add_argument("--real-rate", type=float, default=60.0, help="jobs per second in the live run")
    parser.add_argument("--real-delay-s", type=float, default=1.0)
    parser.add_argument(
        "--only", choices=("detection", "benign", "no-drift", "floors", "shadow", "overhead"), default=None
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("mosel").setLevel(logging.ERROR)  # the alarms' log lines: counted here instead
    if args.command == "measure":
        measure()
        return
    ARMED_RATE[0] = args.armed_rate
    args.seeds = args.detection_seeds or (3 if args.quick else 20)
    args.few_seeds = args.floor_seeds or (
        2 if args.quick else 10
    )  # floors and shadow runs (two loads and two modes each)
    args.seconds = 45.0 if args.quick else 120.0
    args.drift_s = args.seconds / 3
    args.clean_seconds = 330.0
    args.clean_seeds = 3 if args.quick else 5
    args.streams = 3 if args.quick else 7
    args.stream_labels = 4 * 10**5 if args.quick else 10**6
    args.loads = (0.5, 1.0)
    scenario = av_digits()
    profile, residuals, slack_ms = scenario.profile, scenario.residuals, scenario.slack_ms
    print(f"AV-Digits (committed profile), floors {args.floor or FLOORS}, slack {slack_ms:.1f} ms, drift at {args.drift_s:.0f} s "
          f"of {args.seconds:.0f} s, labels 1 s after service, {args.seeds} seeds", flush=True)  # fmt: skip
    report: dict[str, Any] = {"floors": args.floor or FLOORS, "seeds": args.seeds, "seconds": args.seconds}
    parts: dict[str, Callable[..., dict[str, Any]]] = {
        "detection": detection, "benign": benign, "no-drift": no_drift, "floors": floors, "shadow": shadow, "overhead": overhead,
    }  # fmt: skip
    for name, part in parts.items():
        if args.only in (None, name):
            print(f"{name}:", flush=True)
            started = time.perf_counter()
            report[name] = part(profile, residuals, args, slack_ms)
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.real:
        print("real model, live:", flush=True)
        report["real"] = real_run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
