"""Per-model serving statistics: counters and histograms, a plain snapshot, Prometheus export."""

from __future__ import annotations

import bisect
import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from mosel.drift import AccuracySnapshot
from mosel.errors import InputError

if TYPE_CHECKING:
    from mosel.tail import Residuals, TailModel

__all__ = ["Histogram", "Load", "Stats", "StatsSnapshot"]

BUCKETS_MS: Final = (
    0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
)  # fmt: skip


class Histogram:
    """Counts of observations in fixed millisecond buckets (Prometheus-style), plus the sum."""

    __slots__ = ("counts", "sum_ms", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS_MS) + 1)
        self.sum_ms = 0.0
        self.total = 0

    def observe(self, value_ms: float) -> None:
        """Record one value."""
        self.counts[bisect.bisect_left(BUCKETS_MS, value_ms)] += 1
        self.sum_ms += value_ms
        self.total += 1

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile ``q`` (0 when empty)."""
        if not self.total:
            return 0.0
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return BUCKETS_MS[i] if i < len(BUCKETS_MS) else float("inf")
        return float("inf")


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A copy of a model's serving statistics at one moment.

    Attributes:
        counters: submitted/served_on_time/served_late/failed/rejected_<reason>/solver_* counts.
        requests_per_configuration: configuration text (``"audio+video"``) -> requests served.
        histograms: name -> {"count", "sum_ms", "p50_ms", "p99_ms", "buckets": [(le_ms, count)]}
            for ``queue_wait``, ``completion`` (arrival to result) and ``solver``.
        correction: part (branch name or ``"fusion"``) -> measured/predicted latency ratio (EWMA).
        latency_margin: the factor on corrected medians that prices batches at the scheduler's
            latency quantile (``SchedulerConfig.latency_quantile``).
        overhead_ms: the per-batch dispatch overhead added to every price, at that quantile.
        residuals: recent batches' measured/predicted execution ratios and overheads (what
            :func:`mosel.simulate` can replay), None before any batch.
        escalation: what per-row escalation did (empty without chains): ``"stages"``, per
            transition (0: after the first stage), the rows whose confidence was read
            (``considered``), those below their threshold (``below``), those escalated
            (``escalated``; fewer when the time ran short) and how many the validation rows
            expected below (``expected_below``), with ``share`` and ``expected_share`` (below
            over considered); ``"confidence"``, per configuration a chain started with, its
            rows per confidence bin (``bins``, the calibration's bins) and their shares beside
            the validation rows' (``live``, ``validation``) and the total variation distance
            between the two (``distance``: 0 alike, 1 disjoint). A share or a histogram that
            moves away from validation's says the inputs drifted, without a label.
        accuracy: the accuracy monitor's figures (live accuracy per configuration, drift
            alarms, shadow agreement, output shift; ``docs/monitoring.md``), None when
            monitoring is off.
    """

    counters: Mapping[str, int]
    requests_per_configuration: Mapping[str, int]
    histograms: Mapping[str, Mapping[str, Any]]
    correction: Mapping[str, float]
    latency_margin: float = 1.0
    overhead_ms: float = 0.0
    residuals: Residuals | None = None
    escalation: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    accuracy: AccuracySnapshot | None = None

    @classmethod
    def merged(cls, snapshots: Sequence[StatsSnapshot]) -> StatsSnapshot:
        """Several schedulers' statistics as one (e.g. a model's replicas).

        Counters, requests per configuration and histogram buckets are summed (p50 and p99 are
        recomputed from the summed buckets); the correction, margin and overhead are the
        replicas' means; residuals are left out (None).
        """
        if not snapshots:
            raise InputError("StatsSnapshot.merged needs at least one snapshot, got none")
        counters: dict[str, int] = {}
        configs: dict[str, int] = {}
        for snap in snapshots:
            for name, value in snap.counters.items():
                counters[name] = counters.get(name, 0) + value
            for name, value in snap.requests_per_configuration.items():
                configs[name] = configs.get(name, 0) + value
        stats = Stats()
        stats._counters, stats._configs = counters, configs
        for name, histogram in stats._histograms.items():
            for snap in snapshots:
                h = snap.histograms.get(name)
                if h is not None:
                    histogram.counts = [
                        a + count for a, (_, count) in zip(histogram.counts, h["buckets"], strict=True)
                    ]
                    histogram.sum_ms += h["sum_ms"]
                    histogram.total += h["count"]
        parts = {p for snap in snapshots for p in snap.correction}
        stats._correction = {
            p: sum(s.correction.get(p, 1.0) for s in snapshots) / len(snapshots) for p in sorted(parts)
        }
        for snap in snapshots:
            escalation = snap.escalation
            for key, entry in escalation.get("confidence", {}).items():
                stats._validation.setdefault(key, tuple(entry["validation"]))
            stats.escalated(
                {key: tuple(entry["bins"]) for key, entry in escalation.get("confidence", {}).items()},
                tuple(
                    (e["considered"], e["below"], e["escalated"], e["expected_below"])
                    for e in escalation.get("stages", ())
                ),
            )
        merged = stats.snapshot()
        return dataclasses.replace(
            merged,
            latency_margin=sum(s.latency_margin for s in snapshots) / len(snapshots),
            overhead_ms=sum(s.overhead_ms for s in snapshots) / len(snapshots),
        )


@dataclass(frozen=True, slots=True)
class Load:
    """What a replica tells a router about itself at one moment (``mosel.load(model)``).

    Cheap to take (no solving) and plain to send across processes (pickle, or
    :meth:`to_json`). A router adds a request's own price to ``drain_ms`` to predict when it
    would finish on this replica.

    Attributes:
        drain_ms: predicted time from ``at_s`` until the running batch and every queued job have
            finished, each queued job at its current option, one after another, at the
            scheduler's current prices (its latency quantile: the corrected median times
            ``latency_margin`` plus ``overhead_ms`` per batch). Merging queued jobs into batches
            and lowering their options under load only shorten it: an upper estimate.
        queued_jobs: jobs waiting (not running).
        queued_requests: requests waiting (not running).
        latency_margin: the factor on corrected medians that prices batches at the scheduler's
            latency quantile (as in :class:`StatsSnapshot`).
        overhead_ms: the per-batch dispatch overhead added to every price (as in
            :class:`StatsSnapshot`).
        degraded_share: share of the recently served jobs (the last :data:`DEGRADED_WINDOW`)
            served below the most accurate strategy their floor and modalities allowed (those
            whose ``Result.reason`` is not None); 0 before any.
        at_s: when the load was taken, ``time.time()`` (wall clock: it crosses processes).
        overrun_ms: how long the running batch has run past its predicted end (0: none runs, or
            it is on time). A stalled replica (a slow batch, a busy device) drains nothing
            while it lasts: ``drain_ms`` then counts the batch as needing as long again as its
            overrun so far (a batch late by 20 ms is expected to need about 20 ms more), and a
            router should not expect the queue to shrink until a later report.
        latency_correction: the replica's online latency correction as one factor: its
            measured over its profile's time for a request on every modality (each part's
            correction, :attr:`StatsSnapshot.correction`, weighted by its profiled time, over
            the parts its batches have measured; 1 before any). A
            replica on a slower device, or sharing one, reports more than 1; a router multiplies
            the profile's prices by it (``drain_ms`` is already at corrected prices).
    """

    drain_ms: float
    queued_jobs: int
    queued_requests: int
    latency_margin: float
    overhead_ms: float
    degraded_share: float
    at_s: float
    overrun_ms: float = 0.0
    latency_correction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("drain_ms", "overhead_ms", "at_s", "overrun_ms"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0.0)
            ):
                raise InputError(f"Load.{name} must be a finite number >= 0, got {value!r}")
        for name in ("queued_jobs", "queued_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"Load.{name} must be an int >= 0, got {value!r}")
        for name in ("latency_margin", "latency_correction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value < math.inf):
                raise InputError(f"Load.{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.degraded_share, bool) or not (
            isinstance(self.degraded_share, (int, float)) and 0.0 <= self.degraded_share <= 1.0
        ):
            raise InputError(f"Load.degraded_share must be in [0, 1], got {self.degraded_share!r}")

    def __setstate__(self, state: Sequence[Any]) -> None:
        """Unpickle the fields' values, in order; those an older version's Load lacks take their defaults."""
        for i, f in enumerate(dataclasses.fields(self)):
            if i >= len(state) and f.default is dataclasses.MISSING:
                raise InputError(f"a pickled Load has {len(state)} fields, too few: it lacks {f.name!r}")
            object.__setattr__(self, f.name, state[i] if i < len(state) else f.default)

    def age_s(self, now_s: float) -> float:
        """Seconds since the load was taken, at wall-clock time ``now_s`` (never negative)."""
        return max(now_s - self.at_s, 0.0)

    def to_json(self) -> dict[str, float | int]:
        """A JSON-ready dict (field name -> value)."""
        return {
            "drain_ms": self.drain_ms,
            "queued_jobs": self.queued_jobs,
            "queued_requests": self.queued_requests,
            "latency_margin": self.latency_margin,
            "overhead_ms": self.overhead_ms,
            "degraded_share": self.degraded_share,
            "at_s": self.at_s,
            "overrun_ms": self.overrun_ms,
            "latency_correction": self.latency_correction,
        }

    @classmethod
    def from_json(cls, data: Any) -> Load:
        """Inverse of :meth:`to_json`; :class:`mosel.InputError` naming the bad field."""
        if not isinstance(data, Mapping):
            raise InputError(f"a Load's JSON form is an object of its fields, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise InputError(f"Load JSON {dict(data)!r} lacks {missing}; send every field of Load.to_json()")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})


DEGRADED_WINDOW: Final = 256
"""Recent served jobs over which :attr:`Load.degraded_share` is measured."""


class Stats:
    """Mutable statistics of one model's scheduler; thread-safe."""

    HISTOGRAMS: Final = ("queue_wait", "completion", "solver")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._configs: dict[str, int] = {}
        self._histograms = {name: Histogram() for name in self.HISTOGRAMS}
        self._correction: dict[str, float] = {}
        self._tail: TailModel | None = None
        self._validation: dict[str, tuple[float, ...]] = {}  # per configuration: validation's bin shares
        self._bins: dict[str, list[int]] = {}  # per configuration a chain started with: rows per bin
        self._decisions: list[list[float]] = []  # per transition: considered, below, escalated, expected
        self._accuracy: Callable[[], AccuracySnapshot] | None = None

    def set_accuracy(self, source: Callable[[], AccuracySnapshot] | None) -> None:
        """Report what ``source`` returns (an accuracy monitor's snapshot) in snapshots; None: nothing."""
        self._accuracy = source

    def count(self, name: str, by: int = 1) -> None:
        """Add ``by`` to counter ``name``."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + by

    def observe(self, histogram: str, value_ms: float) -> None:
        """Record a value in one of :attr:`HISTOGRAMS`."""
        with self._lock:
            self._histograms[histogram].observe(value_ms)

    def job_done(self, on_time: bool, completion_ms: float, served: Mapping[str, int]) -> None:
        """Record a finished job: on time or late, its completion time, requests per configuration."""
        with self._lock:
            name = "served_on_time" if on_time else "served_late"
            self._counters[name] = self._counters.get(name, 0) + 1
            self._histograms["completion"].observe(completion_ms)
            for configuration, requests in served.items():
                self._configs[configuration] = self._configs.get(configuration, 0) + requests

    def set_correction(self, correction: Mapping[str, float]) -> None:
        """Publish the current latency correction ratios."""
        with self._lock:
            self._correction = dict(correction)

    def set_calibration(self, validation: Mapping[str, Sequence[float]]) -> None:
        """The validation rows' share per confidence bin of each configuration (to compare against)."""
        with self._lock:
            self._validation = {key: tuple(shares) for key, shares in validation.items()}

    def escalated(
        self, first: Mapping[str, Sequence[int]], decisions: Sequence[tuple[int, int, int, float]]
    ) -> None:
        """Record what a batch's chains did (see :class:`mosel.chains.Escalated`)."""
        with self._lock:
            for key, bins in first.items():
                counts = self._bins.setdefault(key, [0] * len(bins))
                for i, k in enumerate(bins):
                    counts[i] += k
            for t, decision in enumerate(decisions):
                while len(self._decisions) <= t:
                    self._decisions.append([0.0, 0.0, 0.0, 0.0])
                for i, value in enumerate(decision):
                    self._decisions[t][i] += value

    def _escalation(self) -> Mapping[str, Any]:
        """The escalation part of a snapshot (the lock held)."""
        if not self._bins and not self._decisions:
            return MappingProxyType({})
        stages = [
            {
                "considered": int(considered), "below": int(below), "escalated": int(escalated),
                "expected_below": expected, "share": below / considered if considered else 0.0,
                "expected_share": expected / considered if considered else 0.0,
            }
            for considered, below, escalated, expected in self._decisions
        ]  # fmt: skip
        confidence = {}
        for key, counts in self._bins.items():
            rows = sum(counts)
            live = [k / rows if rows else 0.0 for k in counts]
            validation = list(self._validation.get(key, [0.0] * len(counts)))
            distance = 0.5 * sum(abs(a - b) for a, b in zip(live, validation, strict=False))
            confidence[key] = {
                "rows": rows, "bins": list(counts), "live": live, "validation": validation,
                "distance": distance,
            }  # fmt: skip
        return MappingProxyType({"stages": stages, "confidence": confidence})

    def set_tail(self, tail: TailModel) -> None:
        """Report this tail model's margin, overhead and residuals in snapshots."""
        with self._lock:
            self._tail = tail

    def prices(self) -> tuple[float, float] | None:
        """The tail model's (margin, overhead in ms) now; None before any scheduler reported one."""
        with self._lock:
            tail = self._tail
            return None if tail is None else (tail.margin, tail.overhead_us / 1000.0)

    def forked(self) -> Stats:
        """A copy for a forked child process, made without taking the lock.

        Another thread may have held it at the fork, and no other thread exists in the child.
        """
        copy = Stats()
        copy._counters = dict(self._counters)
        copy._configs = dict(self._configs)
        copy._histograms = self._histograms
        copy._correction = dict(self._correction)
        copy._tail = self._tail
        copy._validation = dict(self._validation)
        copy._bins = {k: list(v) for k, v in self._bins.items()}
        copy._decisions = [list(d) for d in self._decisions]
        copy._accuracy = self._accuracy
        return copy

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of everything (the accuracy monitor's figures taken just before)."""
        source = self._accuracy
        accuracy = None if source is None else source()
        with self._lock:
            hists = {
                name: MappingProxyType(
                    {
                        "count": h.total,
                        "sum_ms": h.sum_ms,
                        "p50_ms": h.quantile(0.5),
                        "p99_ms": h.quantile(0.99),
                        "buckets": tuple(zip((*BUCKETS_MS, float("inf")), h.counts)),
                    }
                )
                for name, h in self._histograms.items()
            }
            tail = self._tail
            return StatsSnapshot(
                MappingProxyType(dict(self._counters)),
                MappingProxyType(dict(self._configs)),
                MappingProxyType(hists),
                MappingProxyType(dict(self._correction)),
                1.0 if tail is None else tail.margin,
                0.0 if tail is None else tail.overhead_us / 1000.0,
                None if tail is None else tail.residuals(),
                escalation=self._escalation(),
                accuracy=accuracy,
            )


def prometheus_collector(stats: Stats, model_name: str) -> Any:
    """A ``prometheus_client`` collector exporting ``stats`` (requires the optional extra)."""
    from prometheus_client.core import (  # noqa: PLC0415  (optional dependency)
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    class Collector:
        def collect(self) -> Any:
            snap = stats.snapshot()
            counters = CounterMetricFamily(
                "mosel_events", "mosel scheduler events", labels=["model", "event"]
            )
            for name, value in snap.counters.items():
                counters.add_metric([model_name, name], value)
            yield counters
            configs = CounterMetricFamily(
                "mosel_requests_by_configuration",
                "requests served per configuration",
                labels=["model", "configuration"],
            )
            for name, value in snap.requests_per_configuration.items():
                configs.add_metric([model_name, name], value)
            yield configs
            for name, h in snap.histograms.items():
                family = HistogramMetricFamily(
                    f"mosel_{name}_ms", f"mosel {name} in milliseconds", labels=["model"]
                )
                cumulative, buckets = 0, []
                for le, count in h["buckets"]:
                    cumulative += count
                    buckets.append(("+Inf" if le == float("inf") else str(le), cumulative))
                family.add_metric([model_name], buckets, h["sum_ms"])
                yield family
            correction = GaugeMetricFamily(
                "mosel_latency_correction", "measured/predicted latency ratio", labels=["model", "part"]
            )
            for part, ratio in snap.correction.items():
                correction.add_metric([model_name, part], ratio)
            yield correction
            margin = GaugeMetricFamily(
                "mosel_latency_margin", "price of a batch over its corrected median", labels=["model"]
            )
            margin.add_metric([model_name], snap.latency_margin)
            yield margin
            overhead = GaugeMetricFamily(
                "mosel_dispatch_overhead_ms", "per-batch dispatch overhead in predictions", labels=["model"]
            )
            overhead.add_metric([model_name], snap.overhead_ms)
            yield overhead
            yield from _escalation_metrics(snap, model_name, GaugeMetricFamily, CounterMetricFamily)
            if snap.accuracy is not None:
                yield from _accuracy_families(snap.accuracy, model_name)

    return Collector()


def _escalation_metrics(snap: StatsSnapshot, model_name: str, gauge: Any, counter: Any) -> Any:
    """Prometheus families of per-row escalation (none without chains)."""
    escalation = snap.escalation
    if not escalation:
        return
    rows = counter(
        "mosel_escalation_rows", "rows at each escalation decision", labels=["model", "transition", "kind"]
    )
    share = gauge(
        "mosel_escalation_share",
        "share of rows below their threshold",
        labels=["model", "transition", "source"],
    )
    for t, stage in enumerate(escalation.get("stages", ())):
        for kind in ("considered", "below", "escalated"):
            rows.add_metric([model_name, str(t), kind], stage[kind])
        share.add_metric([model_name, str(t), "live"], stage["share"])
        share.add_metric([model_name, str(t), "validation"], stage["expected_share"])
    yield rows
    yield share
    bins = counter(
        "mosel_confidence_bin_rows", "rows per confidence bin of a chain's first configuration",
        labels=["model", "configuration", "bin"],
    )  # fmt: skip
    distance = gauge(
        "mosel_confidence_distance",
        "total variation distance of the live confidence histogram from validation's",
        labels=["model", "configuration"],
    )
    for key, entry in escalation.get("confidence", {}).items():
        for i, count in enumerate(entry["bins"]):
            bins.add_metric([model_name, key, str(i)], count)
        distance.add_metric([model_name, key], entry["distance"])
    yield bins
    yield distance


_ACCURACY_GAUGES: Final = (
    ("live", "live accuracy per configuration: the posterior mean over recent labels"),
    ("lower", "lower confidence bound of the live accuracy"),
    ("profiled", "accuracy of the configuration on the profile's validation data"),
    ("priced", "accuracy decisions price the configuration at (live floors)"),
    ("drifted", "1 while a drift alarm holds for the configuration"),
    ("detector", "drift detector statistic over its alarm threshold (1: alarm)"),
)


_MODALITY_GAUGES: Final = (
    ("lost", "estimated share of what the modality adds to its configurations that it lost (pooled)"),
    ("lost_upper", "upper confidence bound of that share"),
    ("drifted", "1 while a pooled drift alarm holds for the modality"),
    ("detector", "pooled drift detector statistic over its alarm threshold (1: alarm)"),
    ("alarms", "pooled drift alarms raised for the modality"),
)


def _modality_families(accuracy: AccuracySnapshot, model_name: str) -> Any:
    """The pooled per-modality figures (``mosel_modality_*``)."""
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

    for name, text in _MODALITY_GAUGES:
        family = GaugeMetricFamily(f"mosel_modality_{name}", text, labels=["model", "modality"])
        for modality, m in accuracy.modalities.items():
            family.add_metric([model_name, modality], float(getattr(m, name)))
        yield family


def _accuracy_families(accuracy: AccuracySnapshot, model_name: str) -> Any:
    """The accuracy monitor's metric families (``mosel_accuracy_*``, ``mosel_output_shift``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

    configs = accuracy.configurations
    labels = ["model", "configuration"]
    for name, text in _ACCURACY_GAUGES:
        family = GaugeMetricFamily(f"mosel_accuracy_{name}", text, labels=labels)
        for key, c in configs.items():
            family.add_metric([model_name, key], float(getattr(c, name)))
        yield family
    for name, text in (("labels", "labelled requests per configuration"), ("alarms", "drift alarms raised")):
        counter = CounterMetricFamily(f"mosel_accuracy_{name}", text, labels=labels)
        for key, c in configs.items():
            counter.add_metric([model_name, key], getattr(c, name))
        yield counter
    agreement = GaugeMetricFamily(
        "mosel_accuracy_shadow_agreement",
        "share of the configuration's answers the most accurate configuration agrees with (shadow runs)",
        labels=labels,
    )
    shift = GaugeMetricFamily(
        "mosel_output_shift",
        "population stability index of recent outputs against the reference",
        labels=[*labels, "signal"],
    )
    bucketed = GaugeMetricFamily(
        "mosel_accuracy_live_bucket",
        "live accuracy per configuration and size bucket",
        labels=[*labels, "bucket"],
    )
    for key, c in configs.items():
        if c.agreement is not None:
            agreement.add_metric([model_name, key], c.agreement)
        for signal, value in c.output_shift.items():
            shift.add_metric([model_name, key, signal], value)
        for bucket, (live, _) in c.buckets.items():
            bucketed.add_metric([model_name, key, bucket], live)
    yield from (agreement, shift, bucketed)
    yield from _modality_families(accuracy, model_name)
    events = CounterMetricFamily(
        "mosel_feedback_events", "accuracy monitor events", labels=["model", "event"]
    )
    for name, value in accuracy.counters.items():
        events.add_metric([model_name, name], value)
    yield events
    pending = GaugeMetricFamily("mosel_feedback_pending", "served jobs waiting for labels", labels=["model"])
    pending.add_metric([model_name], accuracy.pending)
    yield pending
