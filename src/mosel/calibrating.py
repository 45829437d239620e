"""Escalation's calibration, measured while profiling: every validation row's score and confidence.

The profiler hands each configuration's output and scores on every validation batch to a
:class:`RowRecord`; :func:`calibrate` then picks the signal (the model's ``@mosel.confidence``, or
for class logits the maximum softmax probability or the top-2 margin, whichever ranks the rows
better), bins it (:meth:`mosel.escalation.Calibration.fit`) and times what one later stage costs
besides its branches and fusion, on this device, per batch size (:func:`overhead_sizes`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from mosel import trees
from mosel.chains import ESCALATION, StageBudget
from mosel.errors import OutputError
from mosel.escalation import (
    MIN_ROWS,
    RECOMMENDED_ROWS,
    WEAK_RANKING,
    Calibration,
    Chain,
    FloatArray,
    RowSample,
    ranking_score,
)
from mosel.execution import Later, execute, run_chained
from mosel.plan import CostModel, PlannerConfig, Strategy, build_plan
from mosel.profiles import Profile, cost_model_of, plan_buckets
from mosel.spec import ModelSpec, spec_of
from mosel.stages import class_logits, confidence_of, default_signals
from mosel.trees import Tree

__all__ = ["FEWEST_ROWS", "RowRecord", "calibrate", "overhead_sizes", "recalibrated", "record_rows", "top1"]

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

    def arrays(self) -> tuple[dict[Configuration, FloatArray], dict[str, dict[Configuration, FloatArray]]]:
        """Per configuration every row's score; per signal and configuration every row's confidence."""
        scores = {c: np.concatenate(s) for c, s in self.scores.items()}
        confidences = {
            signal: {c: np.concatenate(v) for c, v in per.items()} for signal, per in self.confidences.items()
        }
        return scores, confidences

    def ranking(self) -> dict[str, float]:
        """Per signal, how well it ranks the rows (mean over configurations of its AUROC)."""
        scores, confidences = self.arrays()
        return {
            signal: statistics.fmean(ranking_score(per[c], scores[c]) for c in scores)
            for signal, per in confidences.items()
        }

    def best_signal(self) -> str:
        """The signal that ranks the rows best (max probability on a tie)."""
        ranking = self.ranking()
        return max(ranking, key=lambda name: (ranking[name], name == "max_probability"))

    def calibration(self, signal: str | None = None, bins: int | None = None) -> Calibration:
        """These rows' calibration under ``signal`` (default: :meth:`best_signal`).

        Raises:
            ValueError: the outputs have no confidence signal (:attr:`problem` says why).
        """
        if self.problem is not None or not self.confidences:
            raise ValueError(f"no confidence signal: {self.problem or 'no rows'}")
        scores, confidences = self.arrays()
        chosen = signal or self.best_signal()
        return Calibration.fit(chosen, confidences[chosen], scores, bins=bins, ranking=self.ranking())

    def sample(self, signal: str) -> RowSample:
        """These rows as a :class:`~mosel.escalation.RowSample` under ``signal`` (to replay in simulation)."""
        scores, confidences = self.arrays()
        return RowSample(MappingProxyType(confidences[signal]), MappingProxyType(scores))


def record_rows(
    model: nn.Module, data: Iterable[tuple[Mapping[str, Tree], Any]], metric: Callable[[Tensor, Any], Tensor]
) -> RowRecord:
    """Every configuration's score and confidences on every row of ``data`` (``(inputs, target)`` pairs).

    What the profiler records, for rows of your own: held-out rows to replay in
    :func:`mosel.simulate` (:meth:`RowRecord.sample`), or to measure a chain's accuracy on.
    """
    spec = spec_of(model)
    record = RowRecord(spec)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    fuse = getattr(model, spec.fusion)
    with torch.inference_mode():
        for inputs, target in data:
            batch = {m: trees.to_device(x, device) for m, x in inputs.items()}
            features = {m: getattr(model, spec.branches[m])(batch[m]) for m in spec.modalities}
            for config in spec.configurations:
                output = fuse({m: features[m] for m in config})
                record.observe(model, config, output, metric(output, target))
    return record


def recalibrated(
    profile: Profile,
    model: nn.Module,
    data: Iterable[tuple[Mapping[str, Tree], Any]],
    *,
    metric: Callable[[Tensor, Any], Tensor] | None = None,
    signal: str | None = None,
    bins: int | None = None,
    stage_overhead_us: float | Mapping[int, float] | None = None,
    planner: PlannerConfig | None = None,
) -> Profile:
    """``profile``'s latencies with accuracies and a calibration measured on ``data`` (plan rebuilt).

    For calibrating on more (or other) validation rows than the profile was measured on, without
    timing again. ``signal``: the confidence signal (default: the one that ranks the rows
    better); ``stage_overhead_us``: a later stage's overhead, one figure or per batch size
    (default the profile's own calibration's, else 0).
    """
    spec = spec_of(model)
    record = record_rows(model, data, metric or top1)
    calibration = record.calibration(signal, bins)
    if stage_overhead_us is None:
        old = profile.calibration
        stage_overhead_us = 0.0 if old is None else dict(old.stage_overhead_by_rows) or old.stage_overhead_us
    accuracy = {c: calibration.accuracy(c) for c in spec.configurations}
    cost = cost_model_of(profile.modalities, profile.branch_latency, profile.fusion_latency, accuracy)
    updated = dataclasses.replace(
        profile,
        accuracy=MappingProxyType(accuracy),
        sample_count=calibration.rows,
        plan=build_plan(cost, planner),
        calibration=calibration.with_overhead(stage_overhead_us),
    )
    return plan_buckets(updated, planner) if updated.sized else updated


def top1(output: Tensor, target: Any) -> Tensor:
    """Top-1 accuracy per request: ``output.argmax(-1) == target`` (the profiler's default metric)."""
    target = torch.as_tensor(target, device=output.device)
    scores: Tensor = (output.argmax(dim=-1) == target).to(torch.float64)
    return scores


def calibrate(
    model: nn.Module,
    spec: ModelSpec,
    record: RowRecord,
    sample: Mapping[str, Tree],
    max_batch_size: int,
    cost: CostModel | None = None,
) -> tuple[Calibration | None, list[str]]:
    """The calibration of the recorded rows (None: no signal, or too few rows), and warnings to give.

    ``sample``: validation inputs of ``max_batch_size`` rows, to time a later stage's overhead
    at each of :func:`overhead_sizes`;
    ``cost``: the profile's cost model (with it, that time includes pricing the stage's rows,
    as serving does).
    """
    if record.problem is not None or not record.confidences or len(spec.modalities) < 2:
        _log.info(
            "profiling %s: no per-row escalation (%s)", spec.model_class, record.problem or "one modality"
        )
        return None, []
    scores, confidences = record.arrays()
    rows = len(next(iter(scores.values())))
    if rows < FEWEST_ROWS:
        _log.info(
            "profiling %s: %d validation rows are too few to calibrate per-row escalation (at least %d; "
            "%d recommended); it serves without",
            spec.model_class, rows, FEWEST_ROWS, RECOMMENDED_ROWS,
        )  # fmt: skip
        return None, []
    ranking = record.ranking()
    signal = record.best_signal()
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
    overheads = _stage_overhead(model, spec, calibration, sample, max_batch_size, cost)
    return calibration.with_overhead(overheads), notes


def overhead_sizes(most: int) -> list[int]:
    """The batch sizes a later stage's overhead is timed at: 1, the powers of two below ``most``, ``most``."""
    return sorted({1, most, *(1 << k for k in range(most.bit_length()) if 1 << k < most)})


def _stage_overhead(
    model: nn.Module,
    spec: ModelSpec,
    calibration: Calibration,
    sample: Mapping[str, Tree],
    most: int,
    cost: CostModel | None = None,
) -> dict[int, float]:
    """Per batch size (:func:`overhead_sizes`), a later stage's median time besides its model work (µs).

    One row escalating at batch size 1, about half the rows of the larger batches (those below
    the median confidence of the batch's rows), so that gathering the rows that go on and
    merging their outputs back is counted. With ``cost``, each stage also prices its rows
    against a time limit they fit, as a served batch's stage does
    (:class:`mosel.chains.StageBudget`).
    """
    everything = frozenset(spec.modalities)
    first = min(
        (c for c in calibration.edges if c != everything), key=lambda c: (len(c), sorted(c)), default=None
    )
    if first is None:
        return {}
    later = Later(calibration.signal)
    if cost is not None:
        budget = StageBudget(cost, {}, 1.0, 0.0, finish_by=math.inf, reserve_us=0.0)
        later = Later(calibration.signal, budget, time.perf_counter)
    accuracy = calibration.accuracy(everything)
    out = {}
    with torch.inference_mode():
        output = execute(model, spec, Strategy(((first, most),), 0, 0), sample)
        confidence = confidence_of(model, spec, calibration.signal, output, most)
        for n in overhead_sizes(most):
            # half the rows below: the mean of the two middle confidences (torch's median is the lower)
            threshold = math.inf if n == 1 else float(np.median(confidence[:n].numpy()))
            chain = Chain(
                (first, everything), (1,), ((threshold,),), ((0.0, 0.0),), (0.5,), accuracy, calibration.rows
            )
            rows = {m: trees.take(x, slice(0, n), spec.batch_dim(m)) for m, x in sample.items()}
            samples = []
            for _ in range(OVERHEAD_REPEATS):
                parts: dict[str, float] = {}
                run_chained(model, spec, Strategy(((first, n),), 0, 0), [chain] * n, rows, later, None, parts)
                samples.append(parts.get(ESCALATION, 0.0))
            out[n] = float(statistics.median(samples))
    return out
