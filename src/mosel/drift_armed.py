"""Label-free arming of the labelled drift detectors: a CUSUM of served outputs' confidence.

A degraded input shows in the model's own confidence long before enough labels come back: on
AV-Digits with the audio 15 points worse, a served output's confidence carries about ten times
the evidence of a label (docs/monitoring.md). Confidence alone does not say that accuracy fell,
so it never raises a drift alarm here; it *arms* its labelled counterpart (a configuration's
detectors, or a modality's pooled ones), which then runs an *episode*: label-free evidence arms,
labels confirm.

The confidence test: each configuration's reference is the histogram
(:data:`mosel.drift.CONFIDENCE_BINS` bins) of its first ``reference_rows`` served rows'
confidence (or validation's). The alternative tilts it towards low confidence, ``q_b ~ p_b *
exp(-theta * c_b)`` (``c_b`` the bin's middle), with ``theta`` such that the mean confidence
falls by ``drop``: a row in bin ``b`` adds ``log(q_b / p_b)`` to Page's CUSUM. One detector per
configuration, and one per modality over the rows of every configuration containing it (as
:class:`mosel.drift.ModalityTracker` pools labels). While the rows are as the reference, ``exp``
of the statistic is a supermartingale; by the excursion argument of
:mod:`mosel.drift_threshold` a detector whose smallest increment is ``w`` starts at most ``(1 -
e^w) / (e^h - e^w)`` false armings per row it reads, so each gets the threshold ``h`` at which
the detectors reading a row together start at most ``rate``. A detector is armed from its
crossing until its statistic falls back to 0.

The episode: each down detector of the armed counterpart sums the log-likelihood ratios of the
labels of requests served since the shift's estimated start (the row where the confidence
statistic last left 0; :meth:`mosel.drift.Cusum.arm`), never clipped at 0, and the counterpart
alarms when the mean of their exponentials reaches ``e^h`` (:func:`mosel.drift.episode_alarm`,
:func:`episode_threshold`). While the accuracy is the profile's, that mean is a nonnegative
supermartingale from 1, so by Ville's inequality an episode alarms with probability at most
``e^-h``: ``armed_false_alarm_rate`` per episode, however long it lasts and whatever moved the
confidence (exactly for the rows served after the arming; those between the estimated start and
the arming took part in it, and a row's confidence and correctness go together: measured on
benign shifts in docs/benchmarks.md). An episode whose labels favour the profile's accuracy by
as much (the smallest drop's sum at ``-h``) ends: the shift was benign, and the configurations
it read take their recent rows as the new reference (:meth:`Arming.rereference`), so that the
same shift does not arm again.

The stated bound of the whole: false drift alarms at most ``false_alarm_rate`` per label (the
detectors' own statistics, at their unarmed threshold), plus ``armed_false_alarm_rate`` per
arming episode; without any shift, at most ``arm_rate`` episodes start per served row.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from mosel.drift import CONFIDENCE_BINS, Configuration, ModalityTracker, Tracker

__all__ = ["Arming", "ConfidenceCusum", "confidence_bins", "episode_threshold", "tilted"]

_MIDDLES = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS


def confidence_bins(confidences: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Each confidence's bin (as :class:`mosel.drift.OutputShift` counts them)."""
    scaled = (np.clip(confidences, 0.0, 1.0) * CONFIDENCE_BINS).astype(np.int64)
    return np.minimum(scaled, CONFIDENCE_BINS - 1)


def tilted(reference: npt.NDArray[np.float64], drop: float) -> npt.NDArray[np.float64]:
    """Per bin, ``log(q_b / p_b)``: the reference tilted so its mean confidence falls by ``drop``.

    The reference is counts, smoothed by half a count per bin; the tilt goes at most to ``theta = 50``.
    """
    p = np.asarray(reference, dtype=np.float64) + 0.5
    p = p / p.sum()
    mean = float(p @ _MIDDLES)

    def log_ratio(theta: float) -> npt.NDArray[np.float64]:
        weights = -theta * _MIDDLES
        return weights - math.log(float(p @ np.exp(weights)))

    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        if mean - float((p * np.exp(log_ratio(mid))) @ _MIDDLES) < drop:
            low = mid
        else:
            high = mid
    return log_ratio(high)


class ConfidenceCusum:
    """Page's CUSUM of served rows' confidence over some configurations (each its own ratios)."""

    __slots__ = ("armed", "pushed", "ratios", "readers", "started", "threshold", "value")

    def __init__(self, readers: int) -> None:
        self.ratios: dict[Configuration, npt.NDArray[np.float64]] = {}
        self.readers = readers  # the detectors that read one row at most (the rate is shared)
        self.threshold = math.inf
        self.value = 0.0
        self.armed = False
        self.started = 0.0  # when the statistic last left 0: the shift's estimated start
        self.pushed: dict[Configuration, float] = {}  # each configuration's rows' sum since then

    def add_reference(self, config: Configuration, ratios: npt.NDArray[np.float64], rate: float) -> None:
        """Read ``config``'s rows with these per-bin ratios; the threshold for ``rate`` per row."""
        self.ratios[config] = ratios
        low = math.exp(min(float(r.min()) for r in self.ratios.values()))
        self.threshold = math.log(low + self.readers * max(1.0 - low, 0.0) / rate)

    def forget(self, config: Configuration) -> None:
        """Stop reading ``config``'s rows (until :meth:`add_reference` gives them again)."""
        self.ratios.pop(config, None)

    def restart(self) -> None:
        """Back to 0, disarmed."""
        self.value, self.armed = 0.0, False
        self.pushed.clear()

    def step(self, config: Configuration, bins: npt.NDArray[np.int64], times: Sequence[float]) -> bool | None:
        """Add ``config``'s rows (served at ``times``); True when it arms, False when it disarms."""
        ratios = self.ratios.get(config)
        if ratios is None:
            return None
        change = None
        value, threshold, push = self.value, self.threshold, self.pushed.get(config, 0.0)
        for x, at in zip(ratios[bins].tolist(), times, strict=True):
            if value <= 0.0 < x:
                self.started = at
            value = max(value + x, 0.0)
            if value <= 0.0:
                self.pushed.clear()
                push = 0.0
            else:
                push += x
            if not self.armed and value >= threshold:
                self.armed, change = True, True
            elif self.armed and value <= 0.0:
                self.armed, change = False, (None if change else False)
        self.value = value
        if value > 0.0:
            self.pushed[config] = push
        return change


class Arming:
    """The confidence detectors of a monitor's configurations and modality pools (see the module)."""

    __slots__ = ("drop", "members", "pools", "rate", "reference_rows", "references", "rows", "watchers")

    def __init__(
        self,
        configurations: Iterable[Configuration],
        pools: Mapping[str, Sequence[Configuration]],
        *,
        reference_rows: int,
        rate: float,
        drop: float,
    ) -> None:
        configs = list(configurations)
        self.rate = rate
        self.drop = drop
        self.reference_rows = reference_rows
        self.references = {c: np.zeros(CONFIDENCE_BINS) for c in configs}
        self.rows = dict.fromkeys(configs, 0)
        readers = {c: 1 + sum(c in members for members in pools.values()) for c in configs}
        self.pools = {m: ConfidenceCusum(max(readers[c] for c in members)) for m, members in pools.items()}
        own = {c: ConfidenceCusum(readers[c]) for c in configs}
        self.watchers: dict[Configuration, list[tuple[Hashable, ConfidenceCusum]]] = {
            c: [(c, own[c]), *((m, self.pools[m]) for m, members in pools.items() if c in members)]
            for c in configs
        }
        self.members: dict[Hashable, tuple[ConfidenceCusum, list[Configuration]]] = {
            **{c: (own[c], [c]) for c in configs},
            **{m: (self.pools[m], list(members)) for m, members in pools.items()},
        }

    def set_reference(self, config: Configuration, confidences: npt.NDArray[np.float64]) -> None:
        """Take these rows (e.g. validation's) as ``config``'s reference."""
        counts = np.bincount(confidence_bins(confidences), minlength=CONFIDENCE_BINS)
        self.references[config] = counts.astype(np.float64)
        self.rows[config] = max(self.rows[config], self.reference_rows)
        self._referenced(config)

    def _referenced(self, config: Configuration) -> None:
        ratios = tilted(self.references[config], self.drop)
        for _, cusum in self.watchers[config]:
            cusum.add_reference(config, ratios, self.rate)

    def add(
        self, config: Configuration, confidences: npt.NDArray[np.float64], times: Sequence[float]
    ) -> list[tuple[Hashable, bool]]:
        """Served rows of ``config`` (served at ``times``): the detectors armed or disarmed."""
        bins = confidence_bins(np.asarray(confidences, dtype=np.float64))
        room = max(self.reference_rows - self.rows[config], 0)
        if room:
            self.references[config] += np.bincount(bins[:room], minlength=CONFIDENCE_BINS)
            self.rows[config] += len(bins[:room])
            bins, times = bins[room:], times[room:]
            if self.rows[config] >= self.reference_rows:
                self._referenced(config)
        changes = []
        if len(bins):
            for name, cusum in self.watchers[config]:
                change = cusum.step(config, bins, times)
                if change is not None:
                    changes.append((name, change))
        return changes

    def armed(self) -> dict[Hashable, float]:
        """The configurations and modalities whose confidence detector is armed now, and since when.

        Since: the serving time of the row where its statistic last left 0 (the shift's
        estimated start).
        """
        return {name: cusum.started for name, (cusum, _) in self.members.items() if cusum.armed}

    def rereference(self, name: Hashable) -> None:
        """A benign shift of ``name`` (a configuration or a modality): its detector disarms.

        The configurations whose rows moved it (their rows' sum since its statistic last left 0
        above 0) take their next ``reference_rows`` served rows as reference, their own
        detectors restarted; the others keep theirs.
        """
        cusum, configs = self.members[name]
        configs = [c for c in configs if cusum.pushed.get(c, 0.0) > 0.0]
        cusum.restart()
        for config in configs:
            self.members[config][0].restart()
            self.references[config] = np.zeros(CONFIDENCE_BINS)
            self.rows[config] = 0
            for _, watcher in self.watchers[config]:
                watcher.forget(config)


def episode_threshold(false_alarm_rate: float) -> float:
    """An episode's threshold, ``log(1 / false_alarm_rate)`` (nats; :func:`mosel.drift.episode_alarm`).

    An episode whose labels are at the profile's accuracy alarms with probability at most
    ``false_alarm_rate``.
    """
    return -math.log(false_alarm_rate)


def apply(
    arming: Arming | None,
    trackers: Mapping[Configuration, Tracker],
    modalities: Mapping[str, ModalityTracker],
    threshold: float,
) -> None:
    """Start an episode in each labelled down detector (in line) whose counterpart is armed; end the others'.

    The episodes alarm at ``threshold`` and read the requests served from the armed
    counterpart's estimated start on. Called when what is armed changes, and when a detector is
    back in line (recovered, or reset) while its counterpart stays armed. Without arming: nothing.

    A configuration's detectors are armed by its own confidence detector, a modality's pooled
    ones by the modality's: a configuration whose outputs did not move (image+video when the
    audio degrades) runs no episode, though a modality it shares is armed. An episode already
    running goes on.
    """
    if arming is None:
        return
    armed = arming.armed()
    for config, tracker in trackers.items():
        for cusum in tracker.down:
            if config in armed:
                cusum.arm(threshold, armed[config])
            else:
                cusum.disarm()
    for m, pool in modalities.items():
        for pooled in pool.down:
            if m in armed:
                pooled.arm(threshold, armed[m])
            else:
                pooled.disarm()
