"""The drift detectors' common threshold for a stated false-alarm rate, bounded per excursion.

Lorden's bound (a CUSUM's mean run to a false alarm is at least ``exp(threshold)`` labels) holds
for any CUSUM, but counts each detector as if it could start an excursion towards its threshold
on every label at full odds. A CUSUM of accuracy ``p1 = p0 - d`` against ``p0`` does much better:

* an excursion (the statistic leaving 0) starts only on a label that scores below 1;
* started at ``f > 0``, it reaches the threshold ``h`` before falling back below 0 with
  probability at most ``(e^f - e^w) / (e^h - e^w)``, ``w`` the smallest increment (the
  exponentiated statistic is a supermartingale while the accuracy is ``p0``, and it leaves the
  interval below 0 no lower than ``w``: optional stopping);
* averaged over the label that starts it, ``E[(e^f - e^w)^+]`` is at most ``1 - e^w = d / p0``
  for any scores in [0, 1] of mean ``p0`` (the worst are 0 or 1, by convexity).

So a detector raises at most ``(1 - e^w) / (e^h - e^w)`` false alarms per label it reads, for
any order or mix of labels while every configuration is at its profile's accuracy: about
``d / p0`` times Lorden's ``e^-h`` (a tenth to a fifth at mosel's margins). A pooled detector
reads several configurations, each with its own ``w``; the denominator takes the smallest.
The expected number of false alarms bounds the probability of any, so in ``N`` labels there is
one with probability at most ``N`` times the rate.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping

from mosel.drift import Configuration, ModalityTracker, Tracker

__all__ = ["alarm_rate", "excursion_threshold", "tune"]

_HIGHEST: float = 200.0
"""The search's upper end (a threshold of 200 nats: no stated rate asks for more)."""


def alarm_rate(detectors: Iterable[Mapping[Hashable, float]], threshold: float) -> float:
    """The most false alarms per label that ``detectors`` at ``threshold`` raise together.

    Args:
        detectors: each detector as ``{what it reads: its increment on a label scoring 1}``, that
            increment ``log(p1 / p0) < 0`` (a label of a configuration the detector does not
            read adds nothing to it).
        threshold: the common threshold (nats).

    Returns:
        ``max`` over what a label can be of the sum, over the detectors reading it, of
        ``(1 - e^w) / (e^h - e^{w_min})``: the bound above.
    """
    per_key: dict[Hashable, float] = {}
    for detector in detectors:
        if not detector:
            continue
        lowest = math.exp(min(detector.values()))
        room = math.exp(threshold) - lowest
        if room <= 0:
            return math.inf
        for key, win in detector.items():
            per_key[key] = per_key.get(key, 0.0) + max(1.0 - math.exp(win), 0.0) / room
    return max(per_key.values(), default=0.0)


def excursion_threshold(detectors: Iterable[Mapping[Hashable, float]], false_alarm_rate: float) -> float:
    """The smallest common threshold at which ``detectors`` keep to ``false_alarm_rate`` alarms per label.

    Args:
        detectors: as :func:`alarm_rate`'s.
        false_alarm_rate: alarms per label, all detectors together, in (0, 1).

    Returns:
        The threshold (nats), to a thousandth above the exact one; 0 without detectors.
    """
    found = [dict(d) for d in detectors]
    if alarm_rate(found, 0.0) <= false_alarm_rate:
        return 0.0
    low, high = 0.0, _HIGHEST
    while high - low > 1e-3:
        mid = (low + high) / 2
        if alarm_rate(found, mid) <= false_alarm_rate:
            high = mid
        else:
            low = mid
    return high


def tune(
    trackers: Mapping[Configuration, Tracker], modalities: Iterable[ModalityTracker], false_alarm_rate: float
) -> float:
    """Give every detector of ``trackers`` and ``modalities`` the common threshold for ``false_alarm_rate``.

    The down detectors (a configuration's and each modality's pooled ones) set it by
    :func:`excursion_threshold`; the recovery detectors, watched only after an alarm, take the same.

    Returns:
        The threshold (nats).
    """
    pools = list(modalities)
    detectors: list[dict[Hashable, float]] = [{c: d.win} for c, t in trackers.items() for d in t.down]
    detectors += [dict(zip(m.configs, d.win, strict=True)) for m in pools for d in m.down]
    threshold = excursion_threshold(detectors, false_alarm_rate)
    for tracker in trackers.values():
        for cusum in (*tracker.down, tracker.up):
            cusum.threshold = threshold
    for pool in pools:
        for pooled in (*pool.down, pool.up):
            pooled.threshold = threshold
    return threshold
