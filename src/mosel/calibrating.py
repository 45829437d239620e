"""Escalation's calibration, measured while profiling: every validation row's score and confidence.

The profiler hands each configuration's output and scores on every validation batch to a
:class:`RowRecord`; :func:`calibrate` then picks the signal (the model's ``@mosel.confidence``, or
for class logits the maximum softmax probability or the top-2 margin, whichever ranks the rows
better), bins it (:meth:`mosel.escalation.Calibration.fit`) and times what one later stage costs
besides its branches and fusion, on this device.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from mosel import trees
from mosel.chains import ESCALATION
from mosel.errors import OutputError
from mosel.escalation import MIN_ROWS, RECOMMENDED_ROWS, WEAK_RANKING, Calibration, Chain, ranking_score
from mosel.execution import Later, run_chained
from mosel.plan import Strategy
from mosel.spec import ModelSpec
from mosel.stages import class_logits, confidence_of, default_signals
from mosel.trees import Tree

__all__ = ["FEWEST_ROWS", "RowRecord", "calibrate"]

Configuration = frozenset[str]
FEWEST_ROWS: Final = 200
"""Below this many validation rows no calibration is made (no escalation); below
:data:`mosel.escalation.MIN_ROWS` one is made with a warning."""
OVERHEAD_REPEATS: Final = 9
_log = logging.getLogger("mosel")


class RowRecord:
    """Every validation row's score under each configuration, and its confidence under each signal."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.scores: dict[Configuration, list[Any]] = {c: [] for c in spec.configurations}
        self.confidences: dict[str, dict[Configuration, list[Any]]] = {}
        self.problem: str | None = None
        """Why the outputs have no confidence signal (None: they have one)."""

    def observe(self, model: nn.Module, configuration: Configuration, output: Tree, scores: Tensor) -> None:
        """One batch's output and scores under ``configuration``."""
        self.scores[configuration].append(scores.detach().to("cpu", torch.float64).numpy())
        if self.problem is not None:
            return
        rows = len(scores)
        signals: Mapping[str, Tensor]
        if self.spec.confidence is not None:
            try:
                signals = {"custom": confidence_of(model, self.spec, "custom", output, rows)}
            except OutputError as exc:
                self.problem = str(exc)
                return
        elif class_logits(output):
            assert isinstance(output, Tensor)
            signals = default_signals(output)
        else:
            self.problem = (
                f"the fusion returns {type(output).__name__}, not class logits (a floating (batch, classes) "
                f"tensor): declare @mosel.confidence for per-row escalation"
            )
            return
        for name, value in signals.items():
            per = self.confidences.setdefault(name, {c: [] for c in self.spec.configurations})
            per[configuration].append(value.numpy())


def calibrate(
    model: nn.Module, spec: ModelSpec, record: RowRecord, sample: Mapping[str, Tree], max_batch_size: int
) -> tuple[Calibration | None, list[str]]:
    """The calibration of the recorded rows (None: no signal, or too few rows), and warnings to give.

    ``sample``: validation inputs of ``max_batch_size`` rows, to time a later stage's overhead.
    """
    if record.problem is not None or not record.confidences or len(spec.modalities) < 2:
        _log.info(
            "profiling %s: no per-row escalation (%s)", spec.model_class, record.problem or "one modality"
        )
        return None, []
    scores = {c: np.concatenate(s) for c, s in record.scores.items()}
    rows = len(next(iter(scores.values())))
    if rows < FEWEST_ROWS:
        _log.info(
            "profiling %s: %d validation rows are too few to calibrate per-row escalation (at least %d; "
            "%d recommended); it serves without",
            spec.model_class, rows, FEWEST_ROWS, RECOMMENDED_ROWS,
        )  # fmt: skip
        return None, []
    confidences = {
        signal: {c: np.concatenate(v) for c, v in per.items()} for signal, per in record.confidences.items()
    }
    ranking = {
        signal: statistics.fmean(ranking_score(per[c], scores[c]) for c in spec.configurations)
        for signal, per in confidences.items()
    }
    signal = max(ranking, key=lambda name: (ranking[name], name == "max_probability"))
    if ranking[signal] < WEAK_RANKING:
        _log.info(
            "profiling %s: the confidence signal %r ranks the validation rows little better than chance "
            "(%.3f); no per-row escalation", spec.model_class, signal, ranking[signal],
        )  # fmt: skip
        return None, []
    calibration = Calibration.fit(signal, confidences[signal], scores, ranking=ranking)
    notes = []
    if rows < MIN_ROWS:
        notes.append(
            f"per-row escalation is calibrated on {rows} validation rows; its accuracy estimates carry "
            f"about ±{100 * (0.25 / rows) ** 0.5:.1f} points (one standard error) and its thresholds may "
            f"miss a floor by as much: profile on at least {RECOMMENDED_ROWS} rows"
        )
    overhead = _stage_overhead(model, spec, calibration, sample, max_batch_size)
    return calibration.with_overhead(overhead), notes


def _stage_overhead(
    model: nn.Module, spec: ModelSpec, calibration: Calibration, sample: Mapping[str, Tree], most: int
) -> float:
    """The median time a later stage takes besides its branches and fusion (µs), every row escalating."""
    everything = frozenset(spec.modalities)
    first = min(
        (c for c in calibration.edges if c != everything), key=lambda c: (len(c), sorted(c)), default=None
    )
    if first is None:
        return 0.0
    bins = calibration.bins(first)
    chain = Chain(
        (first, everything), (bins,), (calibration.edges[first],), (calibration.gains(first, everything),),
        (1.0,), calibration.accuracy(everything), calibration.rows,
    )  # fmt: skip
    later = Later(calibration.signal)
    samples = []
    with torch.inference_mode():
        for n in sorted({1, max(1, most // 4), most}):
            rows = {m: trees.take(x, slice(0, n), spec.batch_dim(m)) for m, x in sample.items()}
            for _ in range(OVERHEAD_REPEATS):
                parts: dict[str, float] = {}
                run_chained(model, spec, Strategy(((first, n),), 0, 0), [chain] * n, rows, later, None, parts)
                samples.append(parts.get(ESCALATION, 0.0))
    return float(statistics.median(samples))
