"""Live accuracy, drift detection and output shift: the statistics behind :mod:`mosel.monitoring`.

Everything here is arithmetic on numbers that a monitor feeds in: a labelled request's score in
[0, 1] under the configuration that served it, whether a shadow run of the most accurate
configuration agreed with a cheaper answer, and the confidence and class of served outputs. No
threads, tensors or clocks.

* :class:`Tracker`: one configuration's live accuracy as a Beta posterior whose prior is the
  profile's validation figure counted as ``prior_weight`` labels, labels discounted so that the
  last ``memory`` or so count; and its drift detectors, CUSUMs that alarm when the live accuracy
  falls ``margin`` (or 2x, 4x) below the profile's, at a stated false-alarm rate.
* :class:`ModalityTracker`: one modality's pooled drift detectors and posterior, over the labels
  of every configuration containing it: a degraded modality lowers all of them at once, each by
  the share it lost of what the modality adds there (the profile's accuracies tell how much).
* :class:`OutputShift`: the population stability index of served outputs' confidence and
  predicted class against a reference (the first rows served, or validation's), label-free.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Alarm",
    "AccuracySnapshot",
    "ConfigurationAccuracy",
    "Cusum",
    "DriftSettings",
    "ModalityAccuracy",
    "ModalityTracker",
    "OutputShift",
    "Tracker",
    "episode_alarm",
    "contributions",
    "psi",
    "wilson_lower",
]

AlarmKind = Literal["drift", "recovered", "modality_drift", "modality_recovered", "output_shift"]
Configuration = frozenset[str]
CONFIDENCE_BINS: Final = 10
"""Bins of the output-confidence histogram (max softmax in [0, 1])."""
_CLAMP: Final = 1e-4
"""Accuracies are kept within [_CLAMP, 1 - _CLAMP] in likelihood ratios (a log of 0 is no test)."""
_GRID: Final = 201
"""Points of the grid over [0, 1] on which a modality's posterior of the share it lost is kept."""


def wilson_lower(p: float, n: float, confidence: float) -> float:
    """The one-sided Wilson score lower bound of a proportion ``p`` seen over ``n`` trials.

    The same bound as :meth:`mosel.Profile.accuracy_bound` (which the confidence floors use).
    """
    if n <= 0:
        return 0.0
    z = statistics.NormalDist().inv_cdf(confidence)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return min(max(0.0, (centre - spread) / (1 + z * z / n)), 1.0)


@dataclass(frozen=True, slots=True)
class DriftSettings:
    """What every :class:`Tracker` of a monitor shares (see :class:`mosel.Monitoring`).

    Attributes:
        prior_weight: the profile's accuracy counts as this many labels in the posterior.
        memory: labels count with weight ``(1 - 1/memory) ** age``: about the last ``memory``
            labels of a configuration make its live estimate.
        margin: the drift detectors alarm when the live accuracy is at least this far below
            the profile's (one CUSUM each tuned to a drop of ``margin``, 2x and 4x it).
        false_alarm_rate: at most this many alarms per labelled request, on average, while
            the live accuracy is the profile's (Lorden's bound on a CUSUM's run length:
            ``exp(threshold)``; the detectors of one configuration share it). A monitor sets a
            lower threshold for the same rate (:mod:`mosel.drift_threshold`).
        confidence: the confidence of the live lower bound (what live floors price at).
        pooled: also test each modality over the labels of every configuration containing it
            (:class:`ModalityTracker`); the false-alarm rate then covers both kinds of detector.
    """

    prior_weight: float = 100.0
    memory: int = 2000
    margin: float = 0.05
    false_alarm_rate: float = 1e-6
    confidence: float = 0.95
    pooled: bool = True

    @property
    def deltas(self) -> tuple[float, ...]:
        """The drops the down detectors are tuned to."""
        return (self.margin, 2 * self.margin, 4 * self.margin)

    @property
    def threshold(self) -> float:
        """A lone configuration's CUSUM threshold: ``log(3 / false_alarm_rate)`` (a union bound)."""
        return self.threshold_for(len(self.deltas))

    def threshold_for(self, detectors: int) -> float:
        """The threshold when ``detectors`` CUSUMs see each label: ``log(detectors / false_alarm_rate)``.

        Each CUSUM's mean run to a false alarm is at least ``exp(threshold)`` of the labels it
        sees (Lorden), so with every detector that sees a label at this threshold, all of them
        together raise at most ``false_alarm_rate`` alarms per label on average.
        """
        return math.log(max(detectors, 1) / self.false_alarm_rate)


class _Episodic:
    """An armed detector's episode (:class:`Cusum`'s, :class:`_Pooled`'s), ended or read."""

    __slots__ = ("episode", "episode_threshold")
    episode: float | None  # the episode's sum (None: not armed)
    episode_threshold: float

    def disarm(self) -> None:
        """End the episode, if any."""
        self.episode = None

    @property
    def cleared(self) -> bool:
        """The episode's labels favour ``p0`` by as much as an alarm would need the other way."""
        return self.episode is not None and self.episode <= -self.episode_threshold


class Cusum(_Episodic):
    """Page's CUSUM of the log-likelihood ratio of accuracy ``p1`` against ``p0``, on scores in [0, 1].

    A score ``x`` adds ``x * log(p1/p0) + (1 - x) * log((1-p1)/(1-p0))``; the statistic never
    goes below 0 and alarms at ``threshold``. While the scores' mean is ``p0`` its run length to
    a false alarm is at least ``exp(threshold)`` on average (the exponentiated increments are a
    supermartingale for any scores in [0, 1] by convexity). The scores since it last left 0 are
    counted: at an alarm, they estimate the change point and the accuracy after it.

    Armed (:mod:`mosel.drift_armed`), it also keeps an *episode*: the same log-likelihood ratio
    summed from the arming on, never clipped (:func:`episode_alarm` reads it). While the scores'
    mean is ``p0``, its exponential is a nonnegative supermartingale from 1.
    """

    __slots__ = (
        "episode_n", "episode_since", "episode_sum", "fail", "since_n", "since_sum", "threshold", "value",
        "win",
    )  # fmt: skip

    def __init__(self, p0: float, p1: float, threshold: float) -> None:
        p0 = min(max(p0, _CLAMP), 1 - _CLAMP)
        p1 = min(max(p1, _CLAMP), 1 - _CLAMP)
        self.win = math.log(p1 / p0)
        self.fail = math.log((1 - p1) / (1 - p0))
        self.threshold = threshold
        self.value = 0.0
        self.since_n = 0
        self.since_sum = 0.0
        self.episode = None
        self.episode_threshold = math.inf
        self.episode_since = 0.0  # requests served before it do not count
        self.episode_n = 0
        self.episode_sum = 0.0

    def step(self, x: float, at: float = math.inf) -> bool:
        """Add one score (to the episode too, if armed by ``at``, its request's service); True at an alarm."""
        increment = x * self.win + (1.0 - x) * self.fail
        value = self.value + increment
        if value <= 0.0:
            self.value, self.since_n, self.since_sum = 0.0, 0, 0.0
        else:
            self.value, self.since_n, self.since_sum = value, self.since_n + 1, self.since_sum + x
        if self.episode is not None and at >= self.episode_since:
            self.episode, self.episode_n, self.episode_sum = (
                self.episode + increment, self.episode_n + 1, self.episode_sum + x
            )  # fmt: skip
        return value >= self.threshold

    def arm(self, threshold: float, since: float) -> None:
        """Start an episode at ``threshold`` over requests served from ``since`` on; one running goes on."""
        if self.episode is None:
            self.episode, self.episode_n, self.episode_sum = 0.0, 0, 0.0
            self.episode_threshold, self.episode_since = threshold, since

    def reset(self) -> None:
        """Back to 0 (after an alarm); an episode ends."""
        self.value, self.since_n, self.since_sum = 0.0, 0, 0.0
        self.episode = None


def episode_alarm(detectors: Sequence[Cusum] | Sequence[_Pooled]) -> bool:
    """Whether an armed episode of ``detectors`` (one counterpart's down detectors) alarms now.

    It does when the mean of their episodes' likelihood ratios reaches ``e^h``, ``h`` the
    episode's threshold. The mean is itself a nonnegative supermartingale from 1 while the
    accuracy is the profile's, so by Ville's inequality an episode alarms with probability at
    most ``e^-h``, however long it lasts; it is never later than any one detector at ``h +
    log(len(detectors))`` (a union bound), and sooner where several see the drop.
    """
    if not detectors or detectors[0].episode is None:
        return False
    sums = [d.episode for d in detectors if d.episode is not None]
    top = max(sums)
    mean = top + math.log(sum(math.exp(v - top) for v in sums) / len(sums))
    return mean >= detectors[0].episode_threshold


@dataclass(frozen=True, slots=True)
class Alarm:
    """A monitor's alarm, as its ``on_alarm`` callback, its log line and its counters see it.

    Attributes:
        kind: ``"drift"``: the configuration's live accuracy fell below the profile's by at
            least the margin; ``"recovered"``: a drifted configuration is back at the
            profile's accuracy; ``"modality_drift"``: the configurations containing a modality
            lost accuracy together, by the pooled test (:class:`ModalityTracker`);
            ``"modality_recovered"``: they are back; ``"output_shift"``: its outputs'
            distribution moved away from the reference (label-free).
        model: the model's class name.
        configuration: the configuration (``"audio+video"``); for a modality alarm, the modality.
        profiled: the profile's accuracy of it (a modality alarm: of its configurations, weighted
            by their labels since the change).
        live: its live accuracy now (after a drift alarm: over the labels since the change).
        labels: the labels it has had in all.
        since_change: the labels since the estimated change point (0 for an output shift).
        value: the detector's statistic (CUSUM), the shift (population stability index), or for
            a modality alarm the estimated share of its contribution the modality lost.
        message: the log line.
        modality: the modality of a modality alarm (None for the others).
    """

    kind: AlarmKind
    model: str
    configuration: str
    profiled: float
    live: float
    labels: int
    since_change: int
    value: float
    message: str
    modality: str | None = None


class Tracker:
    """One configuration's live accuracy, drift detectors and shadow agreement.

    Two states. *In line*: the posterior is ``Beta(w * p0 + wins, w * (1 - p0) + losses)``
    (``w`` the prior weight, ``p0`` the profile's accuracy, the discounted label counts) and
    the down detectors watch for a drop. *Drifted* (after a drift alarm): the validation figure
    no longer describes the configuration, so the posterior restarts from the labels since the
    change point under Jeffreys' prior ``Beta(1/2, 1/2)``, and a recovery detector watches for
    a return to ``p0`` (from ``p0 - margin``).
    """

    __slots__ = (
        "agree", "alarms", "buckets", "compared", "down", "drifted", "key", "labels", "lam", "losses",
        "profiled", "settings", "shadowed", "up", "wins",
    )  # fmt: skip

    def __init__(
        self, key: str, profiled: float, settings: DriftSettings, threshold: float | None = None
    ) -> None:
        self.key = key
        self.profiled = profiled
        self.settings = settings
        self.lam = 1.0 - 1.0 / max(settings.memory, 1)
        self.wins = 0.0  # discounted scores of the current segment
        self.losses = 0.0
        self.labels = 0
        self.drifted = False
        self.alarms = 0
        h = settings.threshold if threshold is None else threshold
        self.down = [Cusum(profiled, profiled - d, h) for d in settings.deltas if profiled - d > _CLAMP]
        self.up = Cusum(max(profiled - settings.margin, _CLAMP), profiled, h)
        self.agree = 0.0  # discounted shadow agreements and comparisons
        self.compared = 0.0
        self.shadowed = 0
        self.buckets: dict[str, list[float]] = {}  # bucket -> [discounted wins, losses, labels]

    def observe(self, score: float, bucket: str | None = None, at: float = math.inf) -> AlarmKind | None:
        """One labelled request's score (``at``: when it was served); the alarm it raises, if any."""
        lam = self.lam
        self.wins = lam * self.wins + score
        self.losses = lam * self.losses + (1.0 - score)
        self.labels += 1
        if bucket is not None:
            counts = self.buckets.get(bucket)
            if counts is None:
                counts = self.buckets[bucket] = [0.0, 0.0, 0.0]
            counts[0] = lam * counts[0] + score
            counts[1] = lam * counts[1] + (1.0 - score)
            counts[2] += 1
        if self.drifted:
            if self.up.step(score):
                self._restart(self.up, drifted=False)
                return "recovered"
            return None
        fired = None
        for cusum in self.down:
            if cusum.step(score, at) and fired is None:
                fired = cusum
        if fired is None and episode_alarm(self.down):  # change: the likeliest detector's or the episode's
            fired = max(self.down, key=lambda c: c.episode or 0.0)
            if fired.since_n < fired.episode_n:
                fired.since_n, fired.since_sum = fired.episode_n, fired.episode_sum
        if fired is not None:
            self.alarms += 1
            self._restart(fired, drifted=True)
            return "drift"
        return None

    def _restart(self, cusum: Cusum, *, drifted: bool) -> None:
        """A new segment from ``cusum``'s change point: its scores since are the segment's labels."""
        self.drifted = drifted
        self.wins = cusum.since_sum
        self.losses = cusum.since_n - cusum.since_sum
        for detector in (*self.down, self.up):
            detector.reset()

    def reset(self) -> None:
        """Forget the labels and any drift: back to the profile's figure (an operator's reset)."""
        self.wins = self.losses = 0.0
        self.drifted = False
        for detector in (*self.down, self.up):
            detector.reset()

    def shadow(self, agreement: float) -> None:
        """A shadow run: ``agreement`` in [0, 1] of this configuration's answer with the best's."""
        lam = self.lam
        self.agree = lam * self.agree + agreement
        self.compared = lam * self.compared + 1.0
        self.shadowed += 1

    def _prior(self) -> tuple[float, float]:
        if self.drifted:
            return 0.5, 0.5
        w = self.settings.prior_weight
        return w * self.profiled, w * (1.0 - self.profiled)

    @property
    def live(self) -> float:
        """The posterior mean."""
        a, b = self._prior()
        total = a + b + self.wins + self.losses
        return (a + self.wins) / total if total > 0 else self.profiled

    @property
    def lower(self) -> float:
        """The posterior's lower bound at the settings' confidence (Wilson, at its pseudo-count)."""
        a, b = self._prior()
        return wilson_lower(self.live, a + b + self.wins + self.losses, self.settings.confidence)

    @property
    def priced(self) -> float:
        """What live floors price it at: the profile's figure, or, drifted, the lower bound (never above)."""
        return min(self.profiled, self.lower) if self.drifted else self.profiled

    @property
    def detector(self) -> float:
        """How close the watching detector is to its alarm, in [0, 1]."""
        if self.drifted:
            return min(self.up.value / self.up.threshold, 1.0)
        return min(max((c.value / c.threshold for c in self.down), default=0.0), 1.0)

    @property
    def since_change(self) -> int:
        """Labels (discounted) in the current segment."""
        return round(self.wins + self.losses)

    def bucket_live(self) -> dict[str, tuple[float, int]]:
        """Per size bucket: the posterior mean (the same prior) and the labels seen there."""
        a, b = self._prior()
        return {k: ((a + w) / (a + b + w + lo), int(n)) for k, (w, lo, n) in self.buckets.items()}


def contributions(accuracy: Mapping[Configuration, float]) -> dict[str, dict[Configuration, float]]:
    """Per modality, what it adds to each configuration containing it, where the profile tells.

    What ``m`` adds to ``c`` is ``accuracy[c] - accuracy[c - {m}]`` (``c - {m}`` empty: 0, the
    accuracy of answering nothing), kept where positive. Only modalities that add to two or more
    configurations are listed (one configuration's own detectors already test a lone one).
    """
    out: dict[str, dict[Configuration, float]] = {}
    for modality in sorted({m for c in accuracy for m in c}):
        added = {}
        for config, value in accuracy.items():
            rest = config - {modality}
            if modality not in config or (rest and rest not in accuracy):
                continue
            gain = value - (accuracy[rest] if rest else 0.0)
            if gain > 0.0:
                added[config] = gain
        if len(added) >= 2:
            out[modality] = added
    return out


class _Pooled(_Episodic):
    """Page's CUSUM over several configurations' labels, each with its own accuracies ``p0`` and ``p1``.

    The same statistic as :class:`Cusum`, a label of configuration ``i`` adding its own
    log-likelihood ratio; the exponentiated increments stay a supermartingale while every
    configuration is at its ``p0``, so Lorden's bound holds over the pooled labels. The labels
    since it last left 0 are counted per configuration.
    """

    __slots__ = (
        "episode_n", "episode_since", "episode_sum", "fail", "since_n", "since_sum", "threshold", "value",
        "win",
    )  # fmt: skip

    def __init__(self, p0: Sequence[float], p1: Sequence[float], threshold: float) -> None:
        lo, hi = _CLAMP, 1 - _CLAMP
        pairs = [(min(max(a, lo), hi), min(max(b, lo), hi)) for a, b in zip(p0, p1, strict=True)]
        self.win = [math.log(b / a) for a, b in pairs]
        self.fail = [math.log((1 - b) / (1 - a)) for a, b in pairs]
        self.threshold = threshold
        self.value = 0.0
        self.since_n = [0] * len(pairs)
        self.since_sum = [0.0] * len(pairs)
        self.episode = None
        self.episode_threshold = math.inf
        self.episode_since = 0.0
        self.episode_n = [0] * len(pairs)
        self.episode_sum = [0.0] * len(pairs)

    def step(self, i: int, x: float, at: float = math.inf) -> bool:
        """Add configuration ``i``'s score (to the episode too, as :meth:`Cusum.step`); True at an alarm."""
        increment = x * self.win[i] + (1.0 - x) * self.fail[i]
        value = self.value + increment
        if value <= 0.0:
            if self.value > 0.0:
                self.value = 0.0
                self.since_n = [0] * len(self.since_n)
                self.since_sum = [0.0] * len(self.since_sum)
        else:
            self.value = value
            self.since_n[i] += 1
            self.since_sum[i] += x
        if self.episode is not None and at >= self.episode_since:
            self.episode += increment
            self.episode_n[i] += 1
            self.episode_sum[i] += x
        return value >= self.threshold

    def arm(self, threshold: float, since: float) -> None:
        """As :meth:`Cusum.arm`."""
        if self.episode is None:
            self.episode = 0.0
            self.episode_n = [0] * len(self.episode_n)
            self.episode_sum = [0.0] * len(self.episode_sum)
            self.episode_threshold, self.episode_since = threshold, since

    def reset(self) -> None:
        """Back to 0; an episode ends."""
        self.value = 0.0
        self.since_n = [0] * len(self.since_n)
        self.since_sum = [0.0] * len(self.since_sum)
        self.episode = None


class ModalityTracker:
    """One modality's pooled drift detectors and posterior, over every configuration containing it.

    The model: a degraded modality ``m`` loses a share ``s`` of what it adds to each configuration
    ``c`` containing it (:func:`contributions`: ``a_c``), so ``c``'s accuracy becomes ``p_c - s *
    a_c`` for all of them at once. The labels of all of them then weigh on one test: CUSUMs of
    the summed log-likelihood ratios, each tuned to the share at which the configurations lose
    ``margin``, 2x and 4x it on average, and a recovery CUSUM from the smallest share back to 0.
    The posterior of ``s`` (flat on [0, 1], kept on a grid from the per-configuration label counts)
    gives each configuration's pooled lower bound, ``p_c - s_upper * a_c``: a configuration that
    shares the modality is priced down with the others' evidence before its own labels alarm.

    Two states, as :class:`Tracker`'s: in line (the counts discounted to about the last ``memory``
    labels) and drifted (the counts since the estimated change point).
    """

    __slots__ = (
        "_log_fail", "_log_win", "added", "alarms", "configs", "down", "drifted", "index", "labels", "lam",
        "losses", "modality", "profiled", "settings", "shares", "up", "wins",
    )  # fmt: skip

    def __init__(
        self,
        modality: str,
        added: Mapping[Configuration, float],
        profiled: Mapping[Configuration, float],
        settings: DriftSettings,
        threshold: float | None = None,
    ) -> None:
        self.modality = modality
        self.settings = settings
        self.configs = list(added)
        self.index = {c: i for i, c in enumerate(self.configs)}
        self.profiled = [float(profiled[c]) for c in self.configs]
        self.added = [float(added[c]) for c in self.configs]
        mean_added = sum(self.added) / len(self.added)
        self.shares = sorted({min(d / mean_added, 1.0) for d in settings.deltas})
        h = settings.threshold_for(len(settings.deltas)) if threshold is None else threshold
        p, a = self.profiled, self.added
        self.down = [_Pooled(p, [pc - s * ac for pc, ac in zip(p, a, strict=True)], h) for s in self.shares]
        low = self.shares[0]
        self.up = _Pooled([pc - low * ac for pc, ac in zip(p, a, strict=True)], p, h)
        grid = np.linspace(0.0, 1.0, _GRID)
        acc = np.clip(np.asarray(p)[:, None] - np.asarray(a)[:, None] * grid[None, :], _CLAMP, 1 - _CLAMP)
        self._log_win = np.log(acc)  # (configurations, grid)
        self._log_fail = np.log1p(-acc)
        self.lam = 1.0 - 1.0 / max(settings.memory, 1)
        self.wins = [0.0] * len(self.configs)
        self.losses = [0.0] * len(self.configs)
        self.labels = 0
        self.drifted = False
        self.alarms = 0

    def observe(self, config: Configuration, score: float, at: float = math.inf) -> AlarmKind | None:
        """One labelled request's score (any configuration; ``at``: when it was served); its alarm, if any."""
        i = self.index.get(config)
        if i is None:
            return None
        lam = self.lam
        self.wins = [lam * w for w in self.wins]
        self.losses = [lam * w for w in self.losses]
        self.wins[i] += score
        self.losses[i] += 1.0 - score
        self.labels += 1
        if self.drifted:
            if self.up.step(i, score):
                self._restart(self.up, drifted=False)
                return "modality_recovered"
            return None
        fired = None
        for cusum in self.down:
            if cusum.step(i, score, at) and fired is None:
                fired = cusum
        if fired is None and episode_alarm(self.down):  # as Tracker.observe's
            fired = max(self.down, key=lambda c: c.episode or 0.0)
            if sum(fired.since_n) < sum(fired.episode_n):
                fired.since_n, fired.since_sum = list(fired.episode_n), list(fired.episode_sum)
        if fired is not None:
            self.alarms += 1
            self._restart(fired, drifted=True)
            return "modality_drift"
        return None

    def _restart(self, cusum: _Pooled, *, drifted: bool) -> None:
        self.drifted = drifted
        self.wins = list(cusum.since_sum)
        self.losses = [n - w for n, w in zip(cusum.since_n, cusum.since_sum, strict=True)]
        for detector in (*self.down, self.up):
            detector.reset()

    def reset(self) -> None:
        """Forget the labels and any drift."""
        self.wins = [0.0] * len(self.configs)
        self.losses = [0.0] * len(self.configs)
        self.drifted = False
        for detector in (*self.down, self.up):
            detector.reset()

    def _posterior(self) -> npt.NDArray[np.float64]:
        loglik = np.asarray(self.wins) @ self._log_win + np.asarray(self.losses) @ self._log_fail
        post = np.exp(loglik - loglik.max())
        result: npt.NDArray[np.float64] = post / post.sum()
        return result

    @property
    def evidence(self) -> float:
        """The segment's log-likelihood at the likeliest share lost over that at none (nats)."""
        loglik = np.asarray(self.wins) @ self._log_win + np.asarray(self.losses) @ self._log_fail
        return float(loglik.max() - loglik[0])

    def labelled(self) -> set[Configuration]:
        """The configurations with labels in the current segment."""
        return {c for c, w, lo in zip(self.configs, self.wins, self.losses, strict=True) if w + lo > 0.5}

    @property
    def lost(self) -> float:
        """The posterior mean of the share of its contribution the modality lost."""
        return float(self._posterior() @ np.linspace(0.0, 1.0, _GRID))

    @property
    def lost_upper(self) -> float:
        """The posterior's upper bound of the share lost, at the settings' confidence."""
        cumulative = np.cumsum(self._posterior())
        at = int(np.searchsorted(cumulative, self.settings.confidence))
        return min(at, _GRID - 1) / (_GRID - 1)

    def bounds(self) -> dict[Configuration, float]:
        """Each configuration's pooled lower bound: its accuracy at the upper share lost."""
        s = self.lost_upper
        return {
            c: max(p - s * a, 0.0) for c, p, a in zip(self.configs, self.profiled, self.added, strict=True)
        }

    def segment(self) -> tuple[float, float, int]:
        """The labels of the current segment: their profiled and live mean accuracy, and their count."""
        counts = [w + lo for w, lo in zip(self.wins, self.losses, strict=True)]
        total = sum(counts)
        if total <= 0:
            return sum(self.profiled) / len(self.profiled), sum(self.profiled) / len(self.profiled), 0
        s = self.lost
        profiled = sum(n * p for n, p in zip(counts, self.profiled, strict=True)) / total
        lost = sum(n * a for n, a in zip(counts, self.added, strict=True)) / total * s
        return profiled, profiled - lost, round(total)

    @property
    def detector(self) -> float:
        """How close the watching detector is to its alarm, in [0, 1]."""
        if self.drifted:
            return min(self.up.value / self.up.threshold, 1.0)
        return min(max(c.value / c.threshold for c in self.down), 1.0)


def psi(reference: npt.NDArray[np.float64], recent: npt.NDArray[np.float64]) -> float:
    """Population stability index of two histograms (counts), each smoothed by half a count per bin.

    ``sum((q - p) * log(q / p))`` over the bins' shares: 0 for the same distribution; by the
    usual reading, below 0.1 no shift, 0.1 to 0.25 a moderate one, above 0.25 a large one.
    """
    p = reference + 0.5
    q = recent + 0.5
    p = p / p.sum()
    q = q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


class OutputShift:
    """Served outputs' confidence and predicted class against a reference, for one configuration.

    The reference is the first ``reference_rows`` rows given (or :meth:`set_reference`); the
    recent histograms discount each row by ``1 - 1/window``.
    """

    __slots__ = ("classes", "confidence_sum", "lam", "recent", "reference", "reference_rows", "rows")

    def __init__(self, reference_rows: int, window: int) -> None:
        self.reference_rows = reference_rows
        self.lam = 1.0 - 1.0 / max(window, 1)
        self.classes = 0
        self.reference: list[npt.NDArray[np.float64]] | None = None  # [confidence, class] counts
        self.recent: list[npt.NDArray[np.float64]] | None = None
        self.rows = 0  # rows seen in all (reference included)
        self.confidence_sum = 0.0  # discounted, over recent rows

    def _grown(
        self, counts: list[npt.NDArray[np.float64]] | None, classes: int
    ) -> list[npt.NDArray[np.float64]]:
        if counts is None:
            return [np.zeros(CONFIDENCE_BINS), np.zeros(classes)]
        if len(counts[1]) < classes:
            counts[1] = np.concatenate([counts[1], np.zeros(classes - len(counts[1]))])
        return counts

    def set_reference(self, confidences: npt.NDArray[np.float64], classes: npt.NDArray[np.int64]) -> None:
        """Take these rows as the reference (e.g. validation's outputs)."""
        self.classes = max(self.classes, int(classes.max(initial=-1)) + 1)
        self.reference = self._grown(None, self.classes)
        self._add(self.reference, confidences, classes, 1.0)
        self.rows = max(self.rows, self.reference_rows)

    def add(self, confidences: npt.NDArray[np.float64], classes: npt.NDArray[np.int64]) -> None:
        """Served rows' confidences (in [0, 1]) and predicted classes."""
        self.classes = max(self.classes, int(classes.max(initial=-1)) + 1)
        room = max(self.reference_rows - self.rows, 0)
        if room:
            self.reference = self._grown(self.reference, self.classes)
            self._add(self.reference, confidences[:room], classes[:room], 1.0)
            self.rows += len(classes[:room])
            confidences, classes = confidences[room:], classes[room:]
            if not len(classes):
                return
        self.recent = self._grown(self.recent, self.classes)
        decay = self.lam ** len(classes)
        self.confidence_sum = self.confidence_sum * decay + float(np.sum(confidences))
        self._add(self.recent, confidences, classes, decay)
        self.rows += len(classes)

    @staticmethod
    def _add(
        counts: list[npt.NDArray[np.float64]],
        confidences: npt.NDArray[np.float64],
        classes: npt.NDArray[np.int64],
        decay: float,
    ) -> None:
        bins = np.minimum(
            (np.clip(confidences, 0.0, 1.0) * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1
        )
        counts[0] *= decay
        counts[1] *= decay
        counts[0] += np.bincount(bins, minlength=CONFIDENCE_BINS)
        counts[1] += np.bincount(classes, minlength=len(counts[1]))[: len(counts[1])]

    def shift(self) -> dict[str, float]:
        """PSI of recent rows against the reference per signal; empty before both exist."""
        reference, recent = self.reference, self.recent
        if reference is None or recent is None or recent[0].sum() <= 0:
            return {}
        classes = self.classes
        reference = self._grown(reference, classes)
        recent = self._grown(recent, classes)
        return {"confidence": psi(reference[0], recent[0]), "class": psi(reference[1], recent[1])}

    @property
    def confidence_mean(self) -> float | None:
        """The recent rows' mean confidence (None before any past the reference)."""
        if self.recent is None:
            return None
        total = float(self.recent[0].sum())
        return self.confidence_sum / total if total > 0 else None


@dataclass(frozen=True, slots=True)
class ConfigurationAccuracy:
    """One configuration's live figures (see :class:`AccuracySnapshot`).

    Attributes:
        profiled: the profile's accuracy (the prior's centre, the detectors' reference).
        live: the posterior mean (the labels discounted to about the last ``memory``).
        lower: the posterior's lower bound at the monitor's confidence.
        priced: the accuracy decisions price it at: the profile's, or with live floors and
            drifted, its lower bound (never above the profile's).
        labels: labels received for it.
        drifted: a drift alarm holds (until it recovers or is reset).
        alarms: drift alarms raised so far.
        detector: the watching detector's statistic over its threshold, in [0, 1] (1: alarm).
        agreement: shadow evaluation: the recent share of its answers the most accurate
            configuration agreed with (None before any shadow run).
        shadowed: shadow runs of it so far.
        confidence_mean: its recent outputs' mean confidence (label-free; None before any).
        output_shift: signal (``"confidence"``, ``"class"``) -> PSI of its recent outputs
            against the reference (empty until both exist).
        buckets: size bucket (``"64"``, ``"64x128"``) -> (posterior mean there, labels there),
            for a profile with size buckets.
    """

    profiled: float
    live: float
    lower: float
    priced: float
    labels: int
    drifted: bool
    alarms: int
    detector: float
    agreement: float | None = None
    shadowed: int = 0
    confidence_mean: float | None = None
    output_shift: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    buckets: Mapping[str, tuple[float, int]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class ModalityAccuracy:
    """One modality's pooled figures (see :class:`ModalityTracker`).

    Attributes:
        configurations: the configurations it adds to (pooled), as keys (``"audio+video"``).
        lost: the estimated share of what it adds to them that it lost (0: in line).
        lost_upper: the upper bound of that share at the monitor's confidence.
        labels: labels of those configurations it has seen.
        drifted: a modality drift alarm holds.
        alarms: modality drift alarms raised so far.
        detector: the watching detector's statistic over its threshold, in [0, 1] (1: alarm).
    """

    configurations: tuple[str, ...]
    lost: float
    lost_upper: float
    labels: int
    drifted: bool
    alarms: int
    detector: float


@dataclass(frozen=True, slots=True)
class AccuracySnapshot:
    """A monitor's figures at one moment (``mosel.stats(model).accuracy``).

    Attributes:
        configurations: configuration (``"audio+video"``) -> its :class:`ConfigurationAccuracy`.
        counters: ``labelled`` (requests labelled), ``unknown`` (labels for an id not held:
            never served here, or forgotten), ``expired`` (jobs forgotten unlabelled),
            ``duplicate`` (a request labelled again: ignored), ``alarms``, ``recoveries``,
            ``modality_alarms``, ``modality_recoveries`` (pooled), ``output_shifts``,
            ``benign_shifts`` (arming episodes their labels cleared), ``shadow_runs``,
            ``shadow_skipped`` (samples dropped unrun), ``shadow_aborted`` (runs abandoned for a
            job that arrived), ``repriced`` (times live floors re-priced the plan).
        pending: served jobs waiting for labels.
        settings: the detectors' and posterior's settings.
        live_floors: whether decisions price drifted configurations at their lower bound.
        modalities: modality -> its pooled :class:`ModalityAccuracy` (empty when not pooled).
    """

    configurations: Mapping[str, ConfigurationAccuracy]
    counters: Mapping[str, int]
    pending: int
    settings: DriftSettings
    live_floors: bool
    modalities: Mapping[str, ModalityAccuracy] = field(default_factory=lambda: MappingProxyType({}))
