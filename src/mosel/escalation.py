"""Per-row escalation, what the profile keeps of it: a confidence calibration, and chains.

A *chain* runs a cheap configuration A on every row of a job, reads the confidence of each row's
output, and computes the missing branches of a richer configuration B ⊃ A (A's features reused,
fusion run again) only for the rows whose confidence falls below a threshold; optionally a third
stage B ⊂ C does the same for the rows still unsure after B.

What a chain is worth is read from a :class:`Calibration`, measured by the profiler on the
validation rows: for every configuration, its confidence cut into quantile bins, each bin's row
count and every richer configuration's summed score in it; for every pair A ⊂ B that a third
stage can follow, the same over the joint bins of A's and B's confidence. Any chain's accuracy,
escalated shares and per-row expected gain follow from sums over bins, so chains are planned,
priced and served without keeping a single validation row.

The confidence signal is the model's own ``@mosel.confidence`` method, or for single-label class
logits the maximum softmax probability or the top-2 margin, whichever ranks the validation rows
better (:attr:`Calibration.signal`, :attr:`Calibration.ranking`). No signal, no calibration, no
chain: the model serves as without escalation.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from mosel.jsonvalues import json_dict, json_field, json_float, json_int, json_list, json_str, show

__all__ = [
    "DEFAULT_BINS",
    "MIN_ROWS",
    "RECOMMENDED_ROWS",
    "SIGNALS",
    "Calibration",
    "Chain",
    "RowSample",
    "bins_for",
    "ranking_score",
    "wilson_lower",
]

Configuration = frozenset[str]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

SIGNALS: Final = ("max_probability", "margin")
"""The default confidence signals of single-label class logits (``"custom"``: ``@mosel.confidence``)."""
DEFAULT_BINS: Final = 16
"""Quantile bins of each configuration's confidence (fewer with few validation rows)."""
MIN_ROWS: Final = 1000
"""Below this many validation rows the profiler warns that escalation's estimates are loose."""
RECOMMENDED_ROWS: Final = 2000
"""Validation rows the profiler recommends for escalation (about ±1 point on a chain's accuracy)."""
WEAK_RANKING: Final = 0.6
"""A signal whose ranking score (an AUROC of confidence against score) stays below this is no signal."""


def bins_for(rows: int) -> int:
    """The number of confidence bins for ``rows`` validation rows: at least 50 rows a bin, 4 to 16."""
    return max(4, min(DEFAULT_BINS, rows // 50))


def ranking_score(confidence: FloatArray, score: FloatArray) -> float:
    """How well ``confidence`` ranks rows by ``score``: the AUROC (0.5: no better than chance).

    The probability that a correct row (weighted by its score) has a higher confidence than a
    wrong one (weighted by one minus its score), ties counting half. 0.5 when all rows score alike.
    """
    positive = np.asarray(score, dtype=np.float64)
    negative = 1.0 - positive
    total = positive.sum() * negative.sum()
    if total <= 0.0:
        return 0.5
    values, inverse = np.unique(np.asarray(confidence, dtype=np.float64), return_inverse=True)
    neg = np.bincount(inverse, weights=negative, minlength=len(values))
    pos = np.bincount(inverse, weights=positive, minlength=len(values))
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / total)


def wilson_lower(p: float, n: int, confidence: float) -> float:
    """One-sided lower Wilson score bound of a proportion ``p`` measured on ``n`` rows."""
    n = max(n, 1)
    z = statistics.NormalDist().inv_cdf(confidence)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def _key(configuration: Configuration, modalities: Sequence[str]) -> str:
    return "+".join(m for m in modalities if m in configuration)


def _parse(text: object, modalities: Sequence[str], what: str) -> Configuration:
    configuration = frozenset(json_str(text, what).split("+"))
    if not configuration or not configuration <= set(modalities):
        raise ValueError(
            f"{what} names an unknown configuration {show(text)}; modalities are {list(modalities)}"
        )
    return configuration


@dataclass(frozen=True, slots=True)
class Calibration:
    """What the validation rows said about confidence: per configuration and per pair of them.

    Attributes:
        signal: the confidence signal: ``"max_probability"``, ``"margin"`` (of class logits) or
            ``"custom"`` (the model's ``@mosel.confidence`` method).
        rows: validation rows it was measured on.
        ranking: signal -> its ranking score on these rows (mean over configurations of an AUROC
            of confidence against score): how the profiler chose :attr:`signal`.
        edges: configuration -> the inner edges of its confidence bins, ascending (a row of
            confidence ``c`` is in bin ``searchsorted(edges, c, side="right")``).
        counts: configuration -> validation rows per bin of its confidence.
        scores: (A, D), D ⊇ A -> D's summed score over the rows of each bin of A's confidence.
        joint_counts: (A, B), A ⊂ B with a configuration above B -> rows per joint bin (A's bin
            times B's bin count plus B's bin).
        joint_scores: (A, B, D), D ⊇ B -> D's summed score per joint bin of (A, B).
        stage_overhead_us: what one later stage costs besides its branches and fusion (the
            confidences, choosing rows, gathering and scattering them), measured by the profiler:
            one figure, for every batch size (a profile written before
            :attr:`stage_overhead_by_rows`; otherwise the median of that table).
        stage_overhead_by_rows: per batch size measured (ascending), that figure for a batch of
            that many rows (empty: :attr:`stage_overhead_us` at every size). Read through
            :meth:`overhead_us`.
    """

    signal: str
    rows: int
    ranking: Mapping[str, float]
    edges: Mapping[Configuration, tuple[float, ...]]
    counts: Mapping[Configuration, tuple[int, ...]]
    scores: Mapping[tuple[Configuration, Configuration], tuple[float, ...]]
    joint_counts: Mapping[tuple[Configuration, Configuration], tuple[int, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    joint_scores: Mapping[tuple[Configuration, Configuration, Configuration], tuple[float, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    stage_overhead_us: float = 0.0
    stage_overhead_by_rows: tuple[tuple[int, float], ...] = ()

    @classmethod
    def fit(
        cls,
        signal: str,
        confidences: Mapping[Configuration, FloatArray],
        scores: Mapping[Configuration, FloatArray],
        *,
        bins: int | None = None,
        ranking: Mapping[str, float] | None = None,
        stage_overhead_us: float | Mapping[int, float] = 0.0,
    ) -> Calibration:
        """The calibration of per-row ``confidences`` and ``scores`` (every configuration, one row order).

        ``stage_overhead_us``: a later stage's overhead, one figure or per batch size (:meth:`with_overhead`).

        Raises:
            ValueError: the arrays disagree on their configurations or their number of rows.
        """
        configurations = list(scores)
        if set(confidences) != set(configurations) or not configurations:
            raise ValueError("confidences and scores must cover the same configurations")
        rows = len(scores[configurations[0]])
        if rows == 0 or any(len(a) != rows for a in (*scores.values(), *confidences.values())):
            raise ValueError("every configuration needs one confidence and one score per validation row")
        count = bins or bins_for(rows)
        score = {c: np.asarray(s, dtype=np.float64) for c, s in scores.items()}
        index: dict[Configuration, IntArray] = {}
        edges: dict[Configuration, tuple[float, ...]] = {}
        counts: dict[Configuration, tuple[int, ...]] = {}
        summed: dict[tuple[Configuration, Configuration], tuple[float, ...]] = {}
        for c in configurations:
            x = np.asarray(confidences[c], dtype=np.float64)
            inner = np.unique(np.quantile(x, np.linspace(0.0, 1.0, count + 1)[1:-1]))
            inner = inner[inner > x.min()]  # no empty first bin
            edges[c] = tuple(float(v) for v in inner)
            index[c] = np.searchsorted(inner, x, side="right").astype(np.int64)
            counts[c] = _tallied(index[c], len(inner) + 1)
            for d in configurations:
                if c <= d:
                    summed[(c, d)] = _tallied(index[c], len(inner) + 1, score[d])
        joint_counts, joint_scores = _joint(configurations, index, edges, score)
        return cls(
            signal,
            rows,
            MappingProxyType(dict(ranking or {})),
            MappingProxyType(edges),
            MappingProxyType(counts),
            MappingProxyType(summed),
            MappingProxyType(joint_counts),
            MappingProxyType(joint_scores),
        ).with_overhead(stage_overhead_us)

    def accuracy(self, configuration: Configuration) -> float:
        """The mean score of ``configuration`` over the validation rows (its profiled accuracy)."""
        return sum(self.scores[(configuration, configuration)]) / self.rows

    def bins(self, configuration: Configuration) -> int:
        """How many confidence bins ``configuration`` has."""
        return len(self.edges[configuration]) + 1

    def gains(self, lower: Configuration, upper: Configuration) -> tuple[float, ...]:
        """Per bin of ``lower``'s confidence, the mean score ``upper`` adds over ``lower`` (0: empty bin)."""
        counts = self.counts[lower]
        low, high = self.scores[(lower, lower)], self.scores[(lower, upper)]
        return tuple((h - s) / k if k else 0.0 for k, s, h in zip(counts, low, high))

    def histogram(self, configuration: Configuration) -> tuple[float, ...]:
        """The validation rows' share in each confidence bin of ``configuration`` (sums to 1)."""
        counts = self.counts[configuration]
        return tuple(k / self.rows for k in counts)

    def overhead_us(self, rows: int) -> float:
        """What one later stage of a batch of ``rows`` rows costs besides its branches and fusion (µs).

        Linear between the batch sizes of :attr:`stage_overhead_by_rows`, the nearest one's figure
        outside them; :attr:`stage_overhead_us` without that table.
        """
        table = self.stage_overhead_by_rows
        if not table:
            return self.stage_overhead_us
        at = bisect.bisect_left(table, rows, key=lambda entry: entry[0])
        if at == 0:
            return table[0][1]
        if at == len(table):
            return table[-1][1]
        (low, low_us), (high, high_us) = table[at - 1], table[at]
        return low_us + (rows - low) * (high_us - low_us) / (high - low)

    def with_overhead(self, stage_overhead_us: float | Mapping[int, float]) -> Calibration:
        """The same calibration with another measured stage overhead: one figure, or per batch size.

        Raises:
            ValueError: a batch size below 1 or a negative or non-finite figure.
        """
        if isinstance(stage_overhead_us, Mapping):
            table = tuple(sorted((int(n), float(us)) for n, us in stage_overhead_us.items()))
            single = float(statistics.median(us for _, us in table)) if table else 0.0
        else:
            table, single = (), float(stage_overhead_us)
        figures = (single, *(us for _, us in table))
        if any(n < 1 for n, _ in table) or not all(math.isfinite(v) and v >= 0.0 for v in figures):
            raise ValueError(
                f"a stage overhead must be a finite number of µs >= 0 (per batch size >= 1), got "
                f"{stage_overhead_us!r}"
            )
        return Calibration(
            self.signal, self.rows, self.ranking, self.edges, self.counts, self.scores, self.joint_counts,
            self.joint_scores, single, table,
        )  # fmt: skip

    def check(self, accuracy: Mapping[Configuration, float], modalities: Sequence[str]) -> None:
        """ValueError unless the calibration's accuracies are the profile's (``accuracy``)."""
        for c, value in accuracy.items():
            if (c, c) not in self.scores:
                raise ValueError(f"calibration has no bins for configuration {_key(c, modalities)!r}")
            mine = self.accuracy(c)
            if abs(mine - value) > 1e-6:
                raise ValueError(
                    f"calibration gives configuration {_key(c, modalities)!r} accuracy {mine:.6f}, the "
                    f"profile {value:.6f}: they were measured on different rows"
                )

    def to_json(self, modalities: Sequence[str]) -> dict[str, Any]:
        """A JSON-ready dict (configurations as ``"a+b"`` keys)."""

        def key(c: Configuration) -> str:
            return _key(c, modalities)

        return {
            "signal": self.signal,
            "rows": self.rows,
            "ranking": dict(self.ranking),
            "stage_overhead_us": self.stage_overhead_us,
            **(
                {"stage_overhead_by_rows": [[n, us] for n, us in self.stage_overhead_by_rows]}
                if self.stage_overhead_by_rows
                else {}
            ),
            "bins": {
                key(c): {
                    "edges": list(edges),
                    "counts": list(self.counts[c]),
                    "scores": {key(d): list(s) for (a, d), s in self.scores.items() if a == c},
                }
                for c, edges in self.edges.items()
            },
            "joint": [
                {
                    "from": key(a),
                    "to": key(b),
                    "counts": list(counts),
                    "scores": {
                        key(d): list(s) for (x, y, d), s in self.joint_scores.items() if (x, y) == (a, b)
                    },
                }
                for (a, b), counts in self.joint_counts.items()
            ],
        }

    @classmethod
    def from_json(cls, data: Any, modalities: Sequence[str]) -> Calibration:
        """Inverse of :meth:`to_json`; ValueError naming the bad field."""
        data = json_dict(data, "calibration")
        signal = json_str(json_field(data, "signal", "calibration"), "calibration.signal")
        if signal not in (*SIGNALS, "custom"):
            raise ValueError(f"calibration.signal must be one of {[*SIGNALS, 'custom']}, got {show(signal)}")
        rows = json_int(json_field(data, "rows", "calibration"), "calibration.rows", low=1)
        ranking = {
            json_str(k, "calibration.ranking key"): json_float(
                v, f"calibration.ranking[{k!r}]", low=0.0, high=1.0
            )
            for k, v in json_dict(data.get("ranking", {}), "calibration.ranking").items()
        }
        overhead = json_float(data.get("stage_overhead_us", 0.0), "calibration.stage_overhead_us", low=0.0)
        by_rows = _parse_overheads(data.get("stage_overhead_by_rows", []))
        edges, counts, scores = _parse_bins(json_field(data, "bins", "calibration"), modalities, rows)
        joint_counts, joint_scores = _parse_joint(data.get("joint", []), modalities, rows, counts)
        return cls(
            signal,
            rows,
            MappingProxyType(ranking),
            MappingProxyType(edges),
            MappingProxyType(counts),
            MappingProxyType(scores),
            MappingProxyType(joint_counts),
            MappingProxyType(joint_scores),
            overhead,
            by_rows,
        )


def _parse_overheads(data: object) -> tuple[tuple[int, float], ...]:
    """A calibration's stage overhead per batch size: ``[[rows, us], ...]``, rows strictly ascending."""
    where = "calibration.stage_overhead_by_rows"
    table = []
    for i, item in enumerate(json_list(data, where)):
        rows, us = json_list(item, f"{where}[{i}]", length=2)
        table.append((json_int(rows, f"{where}[{i}][0]", low=1), json_float(us, f"{where}[{i}][1]", low=0.0)))
    if any(a[0] >= b[0] for a, b in itertools.pairwise(table)):
        raise ValueError(f"{where} must list its batch sizes strictly ascending, got {[n for n, _ in table]}")
    return tuple(table)


def _parse_bins(
    data: object, modalities: Sequence[str], rows: int
) -> tuple[
    dict[Configuration, tuple[float, ...]],
    dict[Configuration, tuple[int, ...]],
    dict[tuple[Configuration, Configuration], tuple[float, ...]],
]:
    """A calibration's bins per configuration: edges, counts, and the summed scores of those above."""
    edges: dict[Configuration, tuple[float, ...]] = {}
    counts: dict[Configuration, tuple[int, ...]] = {}
    scores: dict[tuple[Configuration, Configuration], tuple[float, ...]] = {}
    for text, item in json_dict(data, "calibration.bins").items():
        where = f"calibration.bins[{text!r}]"
        c = _parse(text, modalities, where)
        entry = json_dict(item, where)
        e = tuple(
            json_float(v, f"{where}.edges[]")
            for v in json_list(json_field(entry, "edges", where), f"{where}.edges")
        )
        if any(a >= b for a, b in itertools.pairwise(e)):
            raise ValueError(f"{where}.edges must be strictly ascending")
        edges[c] = e
        counts[c] = tuple(
            json_int(v, f"{where}.counts[]", low=0)
            for v in json_list(json_field(entry, "counts", where), f"{where}.counts", length=len(e) + 1)
        )
        if sum(counts[c]) != rows:
            raise ValueError(f"{where}.counts must count calibration.rows = {rows} rows")
        for d_text, values in json_dict(json_field(entry, "scores", where), f"{where}.scores").items():
            d = _parse(d_text, modalities, f"{where}.scores")
            if not c <= d:
                raise ValueError(f"{where}.scores[{d_text!r}] is not a configuration above {text!r}")
            scores[(c, d)] = _sums(values, f"{where}.scores[{d_text!r}]", counts[c])
        if (c, c) not in scores:
            raise ValueError(f"{where} lacks its own scores")
    if not counts:
        raise ValueError("calibration.bins is empty")
    return edges, counts, scores


def _parse_joint(
    data: object, modalities: Sequence[str], rows: int, counts: Mapping[Configuration, tuple[int, ...]]
) -> tuple[
    dict[tuple[Configuration, Configuration], tuple[int, ...]],
    dict[tuple[Configuration, Configuration, Configuration], tuple[float, ...]],
]:
    """A calibration's joint bins of pairs A ⊂ B."""
    joint_counts: dict[tuple[Configuration, Configuration], tuple[int, ...]] = {}
    joint_scores: dict[tuple[Configuration, Configuration, Configuration], tuple[float, ...]] = {}
    for i, item in enumerate(json_list(data, "calibration.joint")):
        where = f"calibration.joint[{i}]"
        entry = json_dict(item, where)
        a = _parse(json_field(entry, "from", where), modalities, f"{where}.from")
        b = _parse(json_field(entry, "to", where), modalities, f"{where}.to")
        if not (a < b and a in counts and b in counts):
            raise ValueError(f"{where} must go from a configuration to a larger one, both binned")
        size = len(counts[a]) * len(counts[b])
        cells = tuple(
            json_int(v, f"{where}.counts[]", low=0)
            for v in json_list(json_field(entry, "counts", where), f"{where}.counts", length=size)
        )
        if sum(cells) != rows:
            raise ValueError(f"{where}.counts must count {rows} rows")
        joint_counts[(a, b)] = cells
        for d_text, values in json_dict(json_field(entry, "scores", where), f"{where}.scores").items():
            d = _parse(d_text, modalities, f"{where}.scores")
            if not b <= d:
                raise ValueError(f"{where}.scores[{d_text!r}] is not a configuration above its 'to'")
            joint_scores[(a, b, d)] = _sums(values, f"{where}.scores[{d_text!r}]", cells)
    return joint_counts, joint_scores


def _tallied(index: IntArray, size: int, weights: FloatArray | None = None) -> tuple[Any, ...]:
    """Rows (or their summed ``weights``) per bin."""
    values = np.bincount(index, weights=weights, minlength=size)
    return tuple(int(v) for v in values) if weights is None else tuple(float(v) for v in values)


def _joint(
    configurations: Sequence[Configuration],
    index: Mapping[Configuration, IntArray],
    edges: Mapping[Configuration, tuple[float, ...]],
    score: Mapping[Configuration, FloatArray],
) -> tuple[
    dict[tuple[Configuration, Configuration], tuple[int, ...]],
    dict[tuple[Configuration, Configuration, Configuration], tuple[float, ...]],
]:
    """The joint bins of every pair A ⊂ B that a third configuration C ⊃ B can follow."""
    counts: dict[tuple[Configuration, Configuration], tuple[int, ...]] = {}
    scores: dict[tuple[Configuration, Configuration, Configuration], tuple[float, ...]] = {}
    for a in configurations:
        for b in configurations:
            if not (a < b and any(b < c for c in configurations)):
                continue
            size = (len(edges[a]) + 1) * (len(edges[b]) + 1)
            cell = index[a] * (len(edges[b]) + 1) + index[b]
            counts[(a, b)] = _tallied(cell, size)
            for d in configurations:
                if b <= d:
                    scores[(a, b, d)] = _tallied(cell, size, score[d])
    return counts, scores


def _sums(values: object, what: str, counts: Sequence[int]) -> tuple[float, ...]:
    """Summed scores per bin: each between 0 and its bin's row count."""
    out = tuple(json_float(v, f"{what}[]", low=0.0) for v in json_list(values, what, length=len(counts)))
    if any(s > k + 1e-6 for s, k in zip(out, counts)):
        raise ValueError(f"{what} sums more score in a bin than it has rows")
    return out


@dataclass(frozen=True, slots=True)
class Chain:
    """An escalation chain: configurations run one after another on fewer and fewer rows.

    Stage 1 runs ``stages[0]`` on every row; at transition ``t`` the rows whose confidence under
    ``stages[t]`` falls in a bin below ``cuts[t]`` (confidence below :meth:`threshold`) go on to
    ``stages[t + 1]``, whose missing branches run on them alone, and fusion runs again.

    Attributes:
        stages: the configurations, strictly nested (two or three).
        cuts: per transition, the first confidence bin that stays.
        edges: per transition, the bin edges of its configuration's confidence.
        gains: per transition, the mean score the next configuration adds in each bin (calibrated).
        shares: per transition, the share of all rows that reaches its next configuration.
        accuracy: the accuracy per request it is credited: calibrated on the validation rows,
            less :data:`mosel.chains.FIT_Z` standard errors of its gap to its final configuration
            (never above that configuration's own).
        rows: the validation rows the calibration was measured on (for confidence bounds).
    """

    stages: tuple[Configuration, ...]
    cuts: tuple[int, ...]
    edges: tuple[tuple[float, ...], ...]
    gains: tuple[tuple[float, ...], ...]
    shares: tuple[float, ...]
    accuracy: float
    rows: int

    @property
    def first(self) -> Configuration:
        """The configuration every row runs."""
        return self.stages[0]

    def threshold(self, transition: int) -> float:
        """Rows whose confidence is below this escalate at ``transition`` (inf: every row)."""
        edges = self.edges[transition]
        cut = self.cuts[transition]
        return math.inf if cut > len(edges) else edges[cut - 1] if cut > 0 else -math.inf

    def bins(self, transition: int, confidence: FloatArray) -> IntArray:
        """The confidence bin of each row at ``transition``."""
        return np.searchsorted(self.edges[transition], confidence, side="right").astype(np.int64)

    def describe(self, modalities: Sequence[str]) -> str:
        """``"audio -> image+audio (28%) -> image+audio+video (9%)"``."""
        parts = [_key(self.stages[0], modalities)]
        for stage, share in zip(self.stages[1:], self.shares):
            parts.append(f"{_key(stage, modalities)} ({share:.0%})")
        return " -> ".join(parts)


@dataclass(frozen=True, slots=True)
class RowSample:
    """Rows with each configuration's confidence and score: what :func:`mosel.simulate` replays.

    Measure it on held-out rows (neither trained on nor profiled on): per configuration, every
    row's confidence under the profile's signal and its score under the metric. A simulated job
    draws its rows from it (seeded); a chain's rows escalate by their own confidences, and a
    job's measured accuracy is its rows' scores at the configurations they ended at.

    Attributes:
        confidence: configuration -> per-row confidence (float64).
        score: configuration -> per-row score in [0, 1].
    """

    confidence: Mapping[Configuration, FloatArray]
    score: Mapping[Configuration, FloatArray]

    def __post_init__(self) -> None:
        lengths = {len(a) for a in (*self.confidence.values(), *self.score.values())}
        if len(lengths) != 1 or 0 in lengths or set(self.confidence) != set(self.score):
            raise ValueError(
                "a RowSample needs, for the same configurations, one confidence and one score per row"
            )

    @property
    def rows(self) -> int:
        """How many rows the sample holds."""
        return len(next(iter(self.score.values())))
