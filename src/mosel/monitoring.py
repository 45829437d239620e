"""Watching a served model's accuracy: labels fed back, live estimates, drift alarms, shadow runs.

Every accuracy floor is a promise made from one validation profile. A :class:`Monitor` (one per
model, turned on with ``mosel.attach(..., monitoring=mosel.Monitoring())``) keeps what a label
will need of each served job (its per-request configurations, its size bucket, its output) under
the job's :attr:`mosel.Result.id`, for a stated horizon; :meth:`Monitor.feedback` scores labels
that arrive later with the profile's metric and updates each configuration's
:class:`~mosel.drift.Tracker` (a posterior with the profile's figure as its prior, and CUSUM drift
detectors). Without labels, it compares served outputs' confidence and classes with a reference
(:class:`~mosel.drift.OutputShift`), and re-runs a sample of requests served cheaper at the most
accurate configuration in the device's idle time (shadow evaluation; the server runs them). With
``live_floors``, a drifted configuration is priced at its live lower bound (off the request path).

Recording a served job is a dict insert under a short lock; the rest is off the request path.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from torch import Tensor

from mosel import trees
from mosel.drift import (
    AccuracySnapshot,
    Alarm,
    AlarmKind,
    ConfigurationAccuracy,
    ModalityAccuracy,
    ModalityTracker,
    OutputShift,
    Tracker,
    contributions,
)
from mosel.drift_armed import Arming, apply, episode_threshold
from mosel.drift_threshold import tune
from mosel.errors import InputError
from mosel.monitoring_settings import Metric, Monitoring, argmax_label, labelled_rows, top1_scores
from mosel.plan import PlannerConfig, build_plan, repriced_plan
from mosel.profiles import Profile, cost_model_of
from mosel.trees import Tree

if TYPE_CHECKING:
    from mosel.execution import Result
    from mosel.jobs import Job
    from mosel.spec import ModelSpec

__all__ = ["Metric", "Monitor", "Monitoring", "Sample", "live_profile"]

_log = logging.getLogger("mosel")
Configuration = frozenset[str]
COUNTERS: Final = (
    "labelled", "unknown", "expired", "duplicate", "alarms", "recoveries", "modality_alarms",
    "modality_recoveries", "output_shifts", "benign_shifts", "shadow_runs", "shadow_skipped",
    "shadow_aborted", "repriced",
)  # fmt: skip
_COUNTED: Final = {
    "drift": "alarms", "recovered": "recoveries", "modality_drift": "modality_alarms",
    "modality_recovered": "modality_recoveries",
}  # fmt: skip
"""The counter each alarm kind adds to."""
_RECHECK: Final = 64
"""While a drift holds, live floors look for a moved price every this many labels."""
_DIGEST_ROWS: Final = 4096
"""Served rows waiting for the label-free digest at most (beyond, new ones are left out)."""
_DIGEST_STEP: Final = 256
"""Rows one :meth:`Monitor.digest` call takes (a step of idle work)."""
_SAMPLES: Final = 16
"""Shadow samples waiting at most (beyond, the oldest are dropped)."""
_SHADOW_BURST_S: Final = 0.05
"""Device time the shadow budget may save up while nothing is sampled."""


class _Served:
    """What a label will need of one served job."""

    __slots__ = ("alias", "at", "bucket", "configs", "labelled", "output")

    def __init__(
        self, at: float, configs: tuple[Configuration, ...], bucket: tuple[int, ...] | None, output: Any
    ) -> None:
        self.at = at
        self.configs = configs  # per request, in the caller's order
        self.bucket = bucket
        self.output = output
        self.labelled: set[int] | None = None
        self.alias: str | None = None


@dataclass(slots=True)
class Sample:
    """One request served cheaper, kept for a shadow run of the most accurate configuration.

    Attributes:
        at: when it was kept (the monitor's clock).
        inputs: its row of the modalities ``best`` needs (views of the job's tensors).
        served: the configuration it was served at.
        best: the most accurate configuration of its modalities (by the profile).
        output: its served output row.
    """

    at: float
    inputs: dict[str, Tree]
    served: Configuration
    best: Configuration
    output: Tree


def live_profile(
    profile: Profile,
    accuracy: Mapping[Configuration, float],
    *,
    exact: bool = False,
    planner: PlannerConfig | None = None,
) -> Profile:
    """``profile`` with other accuracies (live floors): its latencies, its plans re-priced or re-solved.

    ``exact`` re-solves every plan with CP-SAT (seconds); otherwise each frontier becomes the
    Pareto subset, under the new accuracies, of its strategies and every pure one
    (:func:`mosel.plan.repriced_plan`: milliseconds, not proven complete). Where an accuracy
    moved, the escalation calibration is dropped (its per-bin scores were measured on rows that
    no longer look like the live ones): chains are planned no more, static strategies serve.
    """
    table = MappingProxyType({c: float(accuracy.get(c, a)) for c, a in profile.accuracy.items()})
    cost = cost_model_of(profile.modalities, profile.branch_latency, profile.fusion_latency, table)
    plan = build_plan(cost, planner) if exact else repriced_plan(profile.plan, cost)
    moved = any(table[c] != a for c, a in profile.accuracy.items())
    calibration = None if moved else profile.calibration  # drifted rows: its bins no longer hold
    live = dataclasses.replace(
        profile, accuracy=table, plan=plan, sized_plans=MappingProxyType({}), calibration=calibration
    )
    sized = {
        key: build_plan(live.cost_at(key), planner) if exact else repriced_plan(old, live.cost_at(key))
        for key, old in profile.sized_plans.items()
    }
    return dataclasses.replace(live, sized_plans=MappingProxyType(sized))


class Monitor:
    """One model's accuracy monitor: the served jobs awaiting labels and each configuration's figures.

    Thread-safe: :meth:`record` (the serving path) takes one short lock; :meth:`feedback` scores
    labels outside it; alarms and ``on_change`` run on the calling thread, outside it.

    Args:
        profile: the profile whose accuracies are the promise.
        config: the monitoring settings.
        spec: the model's spec (its batch dimensions, for shadow samples); None: no shadow runs.
        name: the model's name, for log lines and alarms.
        clock: monotonic seconds (horizons, shadow budget).
    """

    def __init__(
        self,
        profile: Profile,
        config: Monitoring,
        spec: ModelSpec | None = None,
        name: str = "model",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = profile
        self.config = config
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._metric = config.metric or top1_scores
        self._pseudo = config.pseudo_label or argmax_label
        settings = config.settings
        pooled = contributions(profile.accuracy) if settings.pooled else {}
        self._pools: dict[Configuration, tuple[ModalityTracker, ...]] = {c: () for c in profile.accuracy}
        self._modalities = {
            m: ModalityTracker(m, added, profile.accuracy, settings) for m, added in pooled.items()
        }
        for tracker_m in self._modalities.values():
            for c in tracker_m.configs:
                self._pools[c] = (*self._pools[c], tracker_m)
        self._trackers = {c: Tracker(profile.key(c), a, settings) for c, a in profile.accuracy.items()}
        self.threshold = tune(self._trackers, self._modalities.values(), settings.false_alarm_rate)
        """Every drift detector's threshold (nats): the stated rate by :mod:`mosel.drift_threshold`."""
        self._arming = None if config.arm_rate is None else Arming(
            profile.accuracy, {m: p.configs for m, p in self._modalities.items()},
            reference_rows=config.reference_rows, rate=config.arm_rate, drop=config.arm_drop,
        )  # fmt: skip
        self.armed_threshold = episode_threshold(config.armed_false_alarm_rate)
        """An arming episode's threshold (nats; :mod:`mosel.drift_armed`)."""
        self._shifts = {c: OutputShift(config.reference_rows, settings.memory) for c in profile.accuracy}
        self._shifted: set[Configuration] = set()
        self._records: dict[str, _Served] = {}
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self._aliases: dict[str, str] = {}
        self._digest: collections.deque[tuple[float, tuple[Configuration, ...], Any]] = collections.deque()
        self._digest_rows = 0
        self._samples: collections.deque[Sample] = collections.deque(maxlen=_SAMPLES)
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._rng = random.Random(config.seed)
        self._dims = {} if spec is None else {m: spec.batch_dim(m) for m in spec.modalities}
        self._best = _best_configurations(profile) if spec is not None else {}
        self._deadline_ms = math.nan  # an EWMA of recorded jobs' deadlines
        self._credit_s = _SHADOW_BURST_S  # the shadow budget's device time in hand
        self._credit_at = clock()
        self._applied = {c: a for c, a in profile.accuracy.items()}  # what decisions price now
        self._unchecked = 0  # labels since live floors last looked for a moved price
        self.on_change: Callable[[], object] | None = None
        """Called (outside the lock) when live floors should re-price: a server starts its rebuild."""

    # ------------------------------------------------------------------ the serving path

    def keep(self, job: Job[Any]) -> Sample | None:
        """Maybe keep one of ``job``'s requests served cheaper, for a shadow run (before its inputs go).

        Sampled at ``shadow_rate``; the row's tensors are views (no copy).
        """
        rate = self.config.shadow_rate
        if not self._best or rate <= 0.0 or self._rng.random() >= rate:
            return None
        work = job.payload
        if work.inputs is None or not work.outputs:
            return None
        cheap = []
        for task in job.tasks:
            best = self._best[task.frontier.available]
            row = task.offset
            for config, count in task.strategy.groups:
                if config != best:
                    cheap.append((row, count, config, best))
                row += count
        if not cheap:
            return None
        start, count, served, best = cheap[self._rng.randrange(len(cheap))]
        r = start + self._rng.randrange(count)
        dims = self._dims
        inputs = {m: trees.take(work.inputs[m], slice(r, r + 1), dims.get(m, 0)) for m in best}
        return Sample(self._clock(), inputs, served, best, trees.take(work.outputs[0][1], slice(r, r + 1)))

    def record(
        self, result: Result, bucket: tuple[int, ...] | None, deadline_ms: float | None, sample: Sample | None
    ) -> None:
        """Keep what ``result``'s labels will need, under ``result.id`` (a dict insert; no tensor work)."""
        now = self._clock()
        served = _Served(now, result.modalities, bucket or None, result.output)
        with self._lock:
            self._records[result.id] = served
            order = self._order
            order.append((now, result.id))
            if len(order) > self.config.max_records or order[0][0] < now - self.config.horizon_s:
                self._expire(now)
            if self._digest_rows < _DIGEST_ROWS:
                self._digest.append((now, result.modalities, result.output))
                self._digest_rows += len(result.modalities)
            if sample is not None:
                self._offer(sample)
            if deadline_ms is not None:
                mean = self._deadline_ms
                self._deadline_ms = deadline_ms if math.isnan(mean) else 0.95 * mean + 0.05 * deadline_ms

    def _expire(self, now: float) -> None:
        """Forget the jobs past the horizon or beyond ``max_records`` (the lock is held)."""
        order, records = self._order, self._records
        oldest = now - self.config.horizon_s
        limit = self.config.max_records
        while order and (len(order) > limit or order[0][0] < oldest):
            _, rid = order.popleft()
            served = records.pop(rid, None)
            if served is not None:
                if served.labelled is None or len(served.labelled) < len(served.configs):
                    self._counters["expired"] += 1
                self._drop_alias(served, rid)

    def _drop_alias(self, served: _Served, rid: str) -> None:
        """Forget ``served``'s alias, unless another job took it since (the lock is held)."""
        if served.alias is not None and self._aliases.get(served.alias) == rid:
            del self._aliases[served.alias]

    def _held(self, key: str) -> str | None:
        """The result id labels under ``key`` go to: a job's own id first, then an alias."""
        rid = key if key in self._records else self._aliases.get(key, "")
        return rid if rid in self._records else None

    def alias(self, result_id: str, key: str) -> bool:
        """Let labels for ``result_id`` come as ``key`` too (see :func:`mosel.label_as`); False if not."""
        if not isinstance(key, str) or not key:
            raise InputError(f"an alias of a result id must be a non-empty string, got {key!r}")
        with self._lock:
            served = self._records.get(result_id)
            if served is None or (key != result_id and key in self._records):
                return False
            self._drop_alias(served, result_id)
            previous = self._records.get(self._aliases.get(key, result_id))
            if previous is not None and previous is not served:
                previous.alias = None
            served.alias = key
            self._aliases[key] = result_id
            return True

    def holds(self, key: str) -> bool:
        """Whether a served job waits for labels under ``key`` (its id or an alias)."""
        with self._lock:
            self._expire(self._clock())
            return self._held(key) is not None

    @property
    def pending(self) -> int:
        """Served jobs waiting for labels."""
        with self._lock:
            self._expire(self._clock())
            return len(self._records)

    # ------------------------------------------------------------------ labels

    def feedback(self, key: str, labels: object) -> int:
        """Score the labels of a served job (``key``: its ``Result.id`` or an alias).

        ``labels``: one per request (a sequence or a tensor; None for a request without a
        label), or ``{row: label}``. A request is scored once (a repeat is ignored); a job all
        of whose requests are labelled is forgotten. Returns the requests scored now (0 for an
        id not held: never served here, or forgotten after the horizon).

        Raises:
            InputError: malformed labels (wrong length, a row out of range), or labels the
                metric cannot score.
        """
        with self._lock:
            self._expire(self._clock())
            rid = self._held(key) if isinstance(key, str) else None
            served = None if rid is None else self._records.get(rid)
            if rid is None or served is None:
                self._counters["unknown"] += 1
                return 0
            rows, targets = labelled_rows(labels, len(served.configs))
            done = served.labelled or set()
            fresh = [i for i, r in enumerate(rows) if r not in done]
            self._counters["duplicate"] += len(rows) - len(fresh)
        if not fresh:
            return 0
        rows = [rows[i] for i in fresh]
        scores = self._scores(served.output, rows, [targets[i] for i in fresh])  # may refuse: nothing marked
        bucket = None if served.bucket is None else "x".join(map(str, served.bucket))
        fired: list[tuple[AlarmKind, Tracker | ModalityTracker]] = []
        with self._lock:
            done = served.labelled or set()
            scored = [(r, x) for r, x in zip(rows, scores, strict=True) if r not in done]  # not raced
            served.labelled = done | {r for r, _ in scored}
            if len(served.labelled) == len(served.configs) and self._records.get(rid) is served:
                del self._records[rid]
                self._drop_alias(served, rid)
            self._counters["labelled"] += len(scored)
            self._counters["duplicate"] += len(rows) - len(scored)
            for row, score in scored:
                self._observe(served.configs[row], score, bucket, fired, served.at)
        self._fire(fired)
        return len(scored)

    def _scores(self, output: Any, rows: list[int], targets: list[Any]) -> list[float]:
        """The metric's score of each labelled row (outside the lock)."""
        index = torch.tensor(rows, dtype=torch.long)
        picked = trees.take(output, index.to(trees.device(output)))
        try:
            stacked = (
                torch.stack(targets)
                if all(isinstance(t, Tensor) for t in targets)
                else torch.as_tensor(targets)
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"labels {targets!r} do not form a tensor the metric can read: {exc}") from None
        name = getattr(self._metric, "__qualname__", repr(self._metric))
        try:
            with torch.inference_mode():
                scores = self._metric(picked, stacked)
        except Exception as exc:
            raise InputError(
                f"metric {name} could not score labels {targets!r}: {type(exc).__name__}: {exc}"
            ) from None
        values = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten().tolist()
        if len(values) != len(rows) or not all(0.0 <= v <= 1.0 for v in values):
            raise InputError(
                f"metric {name} must score each labelled request in [0, 1], got {values!r} for "
                f"{len(rows)} request(s)"
            )
        return values

    # ------------------------------------------------------------------ label-free signals

    def digest(self) -> None:
        """Add served outputs waiting (about :data:`_DIGEST_STEP` rows) to the output-shift histograms.

        A server calls it in idle time (and :meth:`snapshot` does, until none waits); an output
        that is not a float tensor of shape (rows, classes) is left out.
        """
        pending = []
        with self._lock:  # a step of it at a time: a job arriving meanwhile waits for one step only
            rows = 0
            while self._digest and rows < _DIGEST_STEP:
                item = self._digest.popleft()
                pending.append(item)
                rows += len(item[1])
            self._digest_rows -= rows
        groups: dict[Configuration, tuple[list[float], list[int], list[float]]] = {}
        for at, configs, output in pending:
            if not (isinstance(output, Tensor) and output.dim() == 2 and output.is_floating_point()):
                continue
            with torch.inference_mode():
                probs = torch.softmax(output.detach().to(torch.float32), dim=-1)
                confidence, classes = (t.cpu().tolist() for t in probs.max(dim=-1))
            if len(set(configs)) == 1:
                group = groups.setdefault(configs[0], ([], [], []))
                group[0].extend(confidence)
                group[1].extend(classes)
                group[2].extend([at] * len(confidence))
                continue
            for config, conf, cls in zip(configs, confidence, classes, strict=True):
                group = groups.setdefault(config, ([], [], []))
                group[0].append(conf)
                group[1].append(cls)
                group[2].append(at)
        fired = []
        threshold = self.config.shift_threshold
        with self._lock:
            for config, (conf_list, cls_list, times) in groups.items():
                self._arm(config, np.asarray(conf_list, dtype=np.float64), times)
                shift = self._shifts[config]
                shift.add(np.asarray(conf_list, dtype=np.float64), np.asarray(cls_list, dtype=np.int64))
                worst = max(shift.shift().values(), default=0.0)
                if worst > threshold and config not in self._shifted:
                    self._shifted.add(config)
                    self._counters["output_shifts"] += 1
                    tracker = self._trackers[config]
                    fired.append((tracker, worst))
                elif worst < threshold / 2:
                    self._shifted.discard(config)
        for tracker, worst in fired:
            self._alarm("output_shift", tracker.key, tracker.profiled, tracker.live, tracker.labels, 0, worst)

    def digested(
        self, configuration: Configuration, confidences: Any, served_at: float | None = None
    ) -> None:
        """Served rows' confidences (top softmax probability), served at ``served_at`` (default: now).

        :meth:`digest` gives them to the arming test so; a simulation that draws them calls it.
        """
        rows = np.asarray(confidences, dtype=np.float64).reshape(-1)
        with self._lock:
            self._arm(configuration, rows, [self._clock() if served_at is None else served_at] * len(rows))

    def _arm(self, configuration: Configuration, confidences: Any, times: list[float]) -> None:
        """Confidences to the arming test; the labelled episodes follow what is armed (lock held)."""
        if self._arming is not None and self._arming.add(configuration, confidences, times):
            apply(self._arming, self._trackers, self._modalities, self.armed_threshold)

    def armed(self) -> set[Any]:
        """The configurations and modalities whose label-free arming test is armed now."""
        with self._lock:
            return set() if self._arming is None else set(self._arming.armed())

    def after_fork(self) -> None:
        """In a forked child (no other thread exists): the lock is made anew."""
        self._lock = threading.Lock()

    @property
    def digest_waiting(self) -> bool:
        """Served outputs wait for :meth:`digest`."""
        return bool(self._digest)

    def set_reference(self, configuration: Configuration, outputs: Tensor) -> None:
        """Take ``outputs`` (rows, classes), e.g. validation's under ``configuration``, as its reference."""
        with torch.inference_mode():
            probs = torch.softmax(outputs.detach().to(torch.float32), dim=-1)
            confidence, classes = probs.max(dim=-1)
        with self._lock:
            self._shifts[configuration].set_reference(
                confidence.cpu().numpy().astype(np.float64), classes.cpu().numpy().astype(np.int64)
            )
            if self._arming is not None:
                self._arming.set_reference(configuration, confidence.cpu().numpy().astype(np.float64))

    # ------------------------------------------------------------------ shadow evaluation

    def offer(self, sample: Sample) -> None:
        """Keep ``sample`` for a shadow run (a simulation's; :meth:`record` keeps the server's)."""
        with self._lock:
            self._offer(sample)

    def _offer(self, sample: Sample) -> None:
        if len(self._samples) == self._samples.maxlen:
            self._counters["shadow_skipped"] += 1
        self._samples.append(sample)

    def shadow_wait_s(self, now: float) -> float | None:
        """Seconds until a shadow run may start (0: now); None: nothing is kept to run."""
        with self._lock:
            samples = self._samples
            while samples and samples[0].at < now - self.config.shadow_keep_s:
                samples.popleft()
                self._counters["shadow_skipped"] += 1
            if not samples:
                return None
            share = self.config.shadow_share
            if share <= 0.0:
                return None
            self._credit_s = min(self._credit_s + (now - self._credit_at) * share, _SHADOW_BURST_S)
            self._credit_at = now
            return 0.0 if self._credit_s > 0.0 else -self._credit_s / share

    def shadow_limit_us(self) -> float:
        """The longest a shadow run may be predicted to take (``shadow_max_ms``, or deadlines / 4)."""
        if self.config.shadow_max_ms is not None:
            return self.config.shadow_max_ms * 1000.0
        mean = self._deadline_ms
        return math.inf if math.isnan(mean) else 250.0 * mean

    def take_sample(self) -> Sample | None:
        """The oldest kept sample (None: none)."""
        with self._lock:
            return self._samples.popleft() if self._samples else None

    def skip(self, sample: Sample, *, aborted: bool = False, device_s: float = 0.0) -> None:
        """A sample not run (predicted too long, or it failed), or ``aborted`` for a job that arrived."""
        del sample
        with self._lock:
            self._counters["shadow_aborted" if aborted else "shadow_skipped"] += 1
            self._credit_s -= device_s

    def shadowed(self, sample: Sample, best_output: Tree, device_s: float) -> None:
        """A shadow run's outcome: the best configuration's output for the sample, and its device time."""
        scores = self._scores(sample.output, [0], [self._pseudo(best_output)[0]])
        with self._lock:
            self._trackers[sample.served].shadow(scores[0])
            self._counters["shadow_runs"] += 1
            self._credit_s -= device_s

    def shadow_agreement(self, served: Configuration, agreement: float, device_s: float = 0.0) -> None:
        """A shadow outcome computed elsewhere (a simulation): ``agreement`` in [0, 1]."""
        with self._lock:
            self._trackers[served].shadow(agreement)
            self._counters["shadow_runs"] += 1
            self._credit_s -= device_s

    # ------------------------------------------------------------------ alarms and live floors

    def observe(
        self,
        configuration: Configuration,
        score: float,
        bucket: str | None = None,
        served_at: float | None = None,
    ) -> AlarmKind | None:
        """One labelled request's score, given directly (a simulation; :meth:`feedback` scores outputs).

        ``served_at``: when the request was served, on the monitor's clock (default: now).
        """
        fired: list[tuple[AlarmKind, Tracker | ModalityTracker]] = []
        with self._lock:
            self._counters["labelled"] += 1
            at = self._clock() if served_at is None else served_at
            self._observe(configuration, score, bucket, fired, at)
        self._fire(fired)
        return fired[0][0] if fired else None

    def _observe(
        self,
        configuration: Configuration,
        score: float,
        bucket: str | None,
        fired: list[tuple[AlarmKind, Tracker | ModalityTracker]],
        at: float,
    ) -> None:
        """One label, of a request served ``at``, to its configuration's and modalities' trackers (locked)."""
        self._unchecked += 1
        tracker = self._trackers[configuration]
        kind = tracker.observe(score, bucket, at)
        if kind is not None:
            fired.append((kind, tracker))
            self._counters[_COUNTED[kind]] += 1
        elif tracker.down and tracker.down[0].cleared:
            self._benign(configuration)
        for pool in self._pools[configuration]:
            kind = pool.observe(configuration, score, at)
            if kind is not None:
                fired.append((kind, pool))
                self._counters[_COUNTED[kind]] += 1
            elif pool.down[0].cleared:
                self._benign(pool.modality)
        if any(kind in ("recovered", "modality_recovered") for kind, _ in fired):  # in line again
            apply(self._arming, self._trackers, self._modalities, self.armed_threshold)

    def _benign(self, name: Hashable) -> None:
        """An arming episode's labels cleared ``name``: its outputs take a new reference (lock held)."""
        assert self._arming is not None  # an episode runs only where arming armed it
        self._counters["benign_shifts"] += 1
        self._arming.rereference(name)
        apply(self._arming, self._trackers, self._modalities, self.armed_threshold)

    def _fire(self, fired: list[tuple[AlarmKind, Tracker | ModalityTracker]]) -> None:
        """Raise the alarms ``fired`` (outside the lock), then re-price if a price moved.

        While a drift holds, live floors also look again every :data:`_RECHECK` labels: a
        drifted configuration's bound moves with its labels, and so does a pooled one.
        """
        if not fired and self.config.live_floors and self._unchecked >= _RECHECK:
            self._unchecked = 0
            if any(t.drifted for t in self._trackers.values()) or any(
                p.drifted for p in self._modalities.values()
            ):
                self.maybe_reprice()
        for kind, source in fired:
            if isinstance(source, Tracker):
                t = source
                self._alarm(kind, t.key, t.profiled, t.live, t.labels, t.since_change, 0.0)
            else:
                with self._lock:
                    profiled, live, since = source.segment()
                    lost, upper = source.lost, source.lost_upper
                    labels = source.labels
                self._alarm(kind, source.modality, profiled, live, labels, since, lost, upper=upper)
        if fired:
            self.maybe_reprice()

    def _alarm(
        self,
        kind: AlarmKind,
        key: str,
        profiled: float,
        live: float,
        labels: int,
        since: int,
        value: float,
        upper: float = 0.0,
    ) -> None:
        modality = key if kind in ("modality_drift", "modality_recovered") else None
        acting = (
            f"live floors re-price {'them' if modality else 'it'}"
            if self.config.live_floors
            else "floors still assume the profile's figure (live_floors=True re-prices)"
        )
        if kind == "modality_drift":
            message = (
                f"mosel: {self.name} modality {key!r} drifted: the configurations with it lost together "
                f"about {value:.0%} (at most {upper:.0%}) of what it adds to them, over the {since} labels "
                f"since the estimated change (their accuracy {live:.4f}, profiled {profiled:.4f}); " + acting
            )
        elif kind == "modality_recovered":
            message = (
                f"mosel: {self.name} modality {key!r} recovered: the configurations with it are back at "
                f"about their profiled accuracy ({live:.4f}, profiled {profiled:.4f})"
            )
        elif kind == "drift":
            message = (
                f"mosel: {self.name} configuration {key!r} drifted: live accuracy {live:.4f} over the "
                f"{since} labels since the estimated change, profiled {profiled:.4f} (margin "
                f"{self.config.margin}); " + acting
            )
        elif kind == "recovered":
            message = (
                f"mosel: {self.name} configuration {key!r} recovered: live accuracy {live:.4f}, "
                f"profiled {profiled:.4f}"
            )
        else:
            message = (
                f"mosel: {self.name} configuration {key!r}: its outputs shifted from the reference "
                f"(population stability index {value:.3f} > {self.config.shift_threshold})"
            )
        (_log.info if kind in ("recovered", "modality_recovered") else _log.warning)(message)
        callback = self.config.on_alarm
        if callback is not None:
            try:
                callback(Alarm(kind, self.name, key, profiled, live, labels, since, value, message, modality))
            except Exception:
                _log.exception("mosel: a monitoring on_alarm callback raised; ignored")

    def priced(self) -> dict[Configuration, float]:
        """What each configuration should be priced at now.

        A configuration whose own detectors alarmed: its own lower bound (:attr:`Tracker.priced`).
        Otherwise, one containing a drifted modality: the lowest of those modalities' pooled
        lower bounds (:meth:`ModalityTracker.bounds`). Never above the profile's figure.

        Two drifted modalities whose segments share labelled configurations may be one cause
        seen twice (labels of ``image+audio`` cannot tell image from audio): only the one the
        labels favour (the larger :attr:`~ModalityTracker.evidence`) prices.
        """
        with self._lock:
            table = {c: t.priced for c, t in self._trackers.items()}
            drifted = [
                (pool, pool.evidence, pool.labelled()) for pool in self._modalities.values() if pool.drifted
            ]
            for pool, evidence, labelled in drifted:
                if any(e > evidence and labelled & seen for p, e, seen in drifted if p is not pool):
                    continue  # another modality explains these labels better
                for c, bound in pool.bounds().items():
                    if not self._trackers[c].drifted:
                        table[c] = min(table[c], bound)
            return table

    def needs_reprice(self) -> bool:
        """Whether live floors should re-price: a configuration's price moved a hundredth or more."""
        if not self.config.live_floors:
            return False
        now = self.priced()
        return any(
            abs(now[c] - self._applied[c]) >= 0.01 or (now[c] < a) != (self._applied[c] < a)
            for c, a in self.profile.accuracy.items()
        )

    def applied(self, table: Mapping[Configuration, float], *, count: bool = True) -> None:
        """Decisions price at ``table`` now (a live profile swapped in; a new server: the profile's)."""
        with self._lock:
            self._applied = dict(table)
            if count:
                self._counters["repriced"] += 1

    def maybe_reprice(self) -> None:
        """Call :attr:`on_change` if live floors should re-price now."""
        hook = self.on_change
        if hook is not None and self.needs_reprice():
            try:
                hook()
            except Exception:
                _log.exception("mosel: could not start re-pricing live floors")

    def reset(self, configuration: Configuration | None = None) -> None:
        """Forget the labels and drift of one configuration (or all, the modalities' pooled figures too)."""
        with self._lock:
            for c, tracker in self._trackers.items():
                if configuration is None or c == configuration:
                    tracker.reset()
            if configuration is None:
                for pool in self._modalities.values():
                    pool.reset()
            apply(self._arming, self._trackers, self._modalities, self.armed_threshold)
        self.maybe_reprice()

    # ------------------------------------------------------------------ reading it

    def snapshot(self) -> AccuracySnapshot:
        """Every configuration's figures now (digests the outputs waiting first)."""
        for _ in range(_DIGEST_ROWS // _DIGEST_STEP + 1):
            if not self._digest:
                break
            self.digest()
        with self._lock:
            self._expire(self._clock())
            applied = self._applied
            configs = {
                t.key: ConfigurationAccuracy(
                    profiled=t.profiled,
                    live=t.live,
                    lower=t.lower,
                    priced=applied[c],
                    labels=t.labels,
                    drifted=t.drifted,
                    alarms=t.alarms,
                    detector=t.detector,
                    agreement=t.agree / t.compared if t.compared > 0 else None,
                    shadowed=t.shadowed,
                    confidence_mean=self._shifts[c].confidence_mean,
                    output_shift=MappingProxyType(self._shifts[c].shift()),
                    buckets=MappingProxyType(t.bucket_live()),
                )
                for c, t in self._trackers.items()
            }
            modalities = {
                m: ModalityAccuracy(
                    configurations=tuple(self.profile.key(c) for c in pool.configs),
                    lost=pool.lost,
                    lost_upper=pool.lost_upper,
                    labels=pool.labels,
                    drifted=pool.drifted,
                    alarms=pool.alarms,
                    detector=pool.detector,
                )
                for m, pool in self._modalities.items()
            }
            return AccuracySnapshot(
                MappingProxyType(configs),
                MappingProxyType(dict(self._counters)),
                len(self._records),
                self.config.settings,
                self.config.live_floors,
                MappingProxyType(modalities),
            )


def _best_configurations(profile: Profile) -> dict[Configuration, Configuration]:
    """For every set of available modalities, its most accurate configuration (by the profile)."""
    configs = list(profile.accuracy)
    return {
        available: max((c for c in configs if c <= available), key=lambda c: (profile.accuracy[c], len(c)))
        for available in configs
    }
