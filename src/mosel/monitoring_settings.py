"""What monitoring is asked to do (:class:`Monitoring`), and how it reads labels and outputs.

The settings a user gives ``mosel.attach(..., monitoring=...)``, validated once; the default
metric (top-1) and pseudo-label (argmax); and the forms a job's labels may take (one per request,
or ``{row: label}``), read into rows and targets. :mod:`mosel.monitoring` does the watching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from mosel.drift import Alarm, DriftSettings
from mosel.errors import InputError
from mosel.trees import Tree

__all__ = ["Metric", "Monitoring", "argmax_label", "labelled_rows", "top1_scores"]

Metric = Callable[[Any, Any], Any]
"""``metric(outputs, targets) -> per-request scores`` in [0, 1] (the profiler's metric form)."""


def top1_scores(output: Tensor, target: Any) -> Tensor:
    """Top-1 accuracy per request (:func:`mosel.top1`; the profiler's default metric)."""
    target = torch.as_tensor(target, device=output.device)
    if target.is_floating_point() and not bool((target == target.round()).all()):  # also NaN, inf
        raise ValueError(f"top-1 labels are class indices (whole numbers), got {target.tolist()!r}")
    classes = output.shape[-1]
    if target.numel() and not bool(((target >= 0) & (target < classes)).all()):
        raise ValueError(f"top-1 labels are class indices in 0..{classes - 1}, got {target.tolist()!r}")
    scores: Tensor = (output.argmax(dim=-1) == target).to(torch.float64)
    return scores


def argmax_label(output: Tree) -> Any:
    """The default pseudo-label of an output: argmax over the last dimension of a float tensor."""
    if isinstance(output, Tensor) and output.is_floating_point() and output.dim() >= 2:
        return output.argmax(dim=-1)
    return output


@dataclass(frozen=True, slots=True)
class Monitoring:
    """How mosel watches a model's accuracy in production (``mosel.attach(..., monitoring=...)``).

    Attributes:
        metric: ``metric(outputs, targets) -> per-request scores`` in [0, 1], as given to
            ``mosel.profile`` (default top-1: ``outputs.argmax(-1) == targets``). Use the
            metric the profile was measured with, or the live figures are not comparable.
        horizon_s: a served job waits this long for its labels, then is forgotten.
        max_records: at most this many served jobs wait for labels (the oldest are forgotten).
            Each keeps its output (the tensors the caller got; no copy) and its configurations.
        prior_weight: the profile's accuracy counts as this many labels in each configuration's
            posterior (its validation ``sample_count`` is the most it could honestly count as).
        memory: each configuration's live estimate discounts labels so that about the last
            ``memory`` count.
        margin: alarm when a configuration's live accuracy falls at least this far below the
            profile's.
        false_alarm_rate: alarms per labelled request at most, on average, while accuracy is
            the profile's, all detectors together: every detector has the smallest threshold at
            which the bound of :mod:`mosel.drift_threshold` (per excursion of each detector that
            can read a label) allows no more. In ``N`` labels without drift there is a false
            alarm with probability at most ``N * false_alarm_rate``.
        confidence: the confidence of the live lower bound (what live floors price at).
        pooled: also test each modality over the labels of every configuration containing it
            (a degraded modality lowers them all; see :class:`mosel.drift.ModalityTracker`),
            and, with live floors, price the configurations containing a drifted modality at
            the pooled lower bound until their own labels alarm.
        live_floors: price a drifted configuration at its live lower bound (never above the
            profile's figure): a configuration that drifted below a job's floor is no longer
            chosen for it. The plan is re-priced off the request path.
        rebuild: how live floors rebuild the plan: ``"repriced"`` (milliseconds: each frontier
            re-priced over its strategies and every pure one, not proven complete) or
            ``"exact"`` (CP-SAT, seconds of CPU on a background thread; the repriced plan
            serves meanwhile).
        on_alarm: called with each :class:`mosel.drift.Alarm` (on the thread that delivered
            the label, or that digested the outputs; what it raises is logged).
        shadow_rate: the share of served jobs with a request served below the most accurate
            configuration whose one such request is kept for a shadow run (0: none).
        shadow_share: shadow runs take at most this share of the device's time.
        shadow_max_ms: a shadow run is skipped when predicted to take longer (None: a quarter
            of recent jobs' mean deadline; no limit without deadlines).
        shadow_keep_s: a kept request waits this long for idle time, then is dropped.
        reference_rows: the first rows served per configuration are its outputs' reference
            (label-free shift), unless :meth:`Monitor.set_reference` gave validation's.
        shift_threshold: an ``output_shift`` alarm when the population stability index of a
            configuration's recent confidences or classes exceeds this (re-armed below half).
        arm_rate: label-free arming (:mod:`mosel.drift_armed`): a CUSUM of served outputs'
            confidence per configuration and per modality, against the reference rows', at
            most this many false armings per served row. Armed, the labelled detectors of the
            configuration (or modality) run an episode over the requests served since the
            shift's estimated start, which alarms when their labels show the drop (labels still
            confirm) and ends, taking the recent outputs as the new reference, when they show
            none. False drift alarms are then at most
            ``false_alarm_rate`` per label plus ``armed_false_alarm_rate`` per episode. None:
            off (alarms on labels alone, several times later).
        armed_false_alarm_rate: the probability at most that an arming episode raises a drift
            alarm while the accuracy is the profile's (whatever moved the confidence), in (0, 1).
        arm_drop: the fall in mean confidence the arming test is tuned to.
        pseudo_label: turns the most accurate configuration's output into the targets its
            cheaper answer is scored against in a shadow run (default: argmax of a float
            tensor's last dimension).
        seed: seeds which jobs are sampled.
    """

    metric: Metric | None = None
    horizon_s: float = 86_400.0
    max_records: int = 100_000
    prior_weight: float = 100.0
    memory: int = 2000
    margin: float = 0.05
    false_alarm_rate: float = 1e-6
    confidence: float = 0.95
    pooled: bool = True
    live_floors: bool = False
    rebuild: Literal["repriced", "exact"] = "repriced"
    on_alarm: Callable[[Alarm], object] | None = None
    shadow_rate: float = 0.05
    shadow_share: float = 0.05
    shadow_max_ms: float | None = None
    shadow_keep_s: float = 5.0
    reference_rows: int = 1000
    shift_threshold: float = 0.25
    arm_rate: float | None = 1e-6
    armed_false_alarm_rate: float = 5e-3
    arm_drop: float = 0.075
    pseudo_label: Callable[[Tree], Any] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, value: object, *, zero: bool = False) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (value == 0 and not zero):  # type: ignore[operator]
                raise ValueError(
                    f"Monitoring.{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}"
                )

        for name in ("horizon_s", "prior_weight", "memory", "max_records", "shadow_keep_s", "reference_rows"):
            positive(name, getattr(self, name))
        positive("shadow_share", self.shadow_share, zero=True)
        positive("shift_threshold", self.shift_threshold)
        if self.shadow_max_ms is not None:
            positive("shadow_max_ms", self.shadow_max_ms)
        for name in ("margin", "false_alarm_rate", "armed_false_alarm_rate", "arm_drop") + (
            ("arm_rate",) if self.arm_rate is not None else ()
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0.0 < value < 1.0:
                raise ValueError(f"Monitoring.{name} must be in (0, 1), got {value!r}")
        if isinstance(self.shadow_rate, bool) or not 0.0 <= self.shadow_rate <= 1.0:
            raise ValueError(f"Monitoring.shadow_rate must be in [0, 1], got {self.shadow_rate!r}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(
                f"Monitoring.confidence must be in [0.5, 1) (e.g. 0.95), got {self.confidence!r}"
            )
        if self.rebuild not in ("repriced", "exact"):
            raise ValueError(f"Monitoring.rebuild must be 'repriced' or 'exact', got {self.rebuild!r}")

    @property
    def settings(self) -> DriftSettings:
        """The posterior's and the detectors' settings."""
        return DriftSettings(
            self.prior_weight,
            int(self.memory),
            self.margin,
            self.false_alarm_rate,
            self.confidence,
            self.pooled,
        )


def labelled_rows(labels: object, n: int) -> tuple[list[int], list[Any]]:
    """The rows a job's labels name, and their labels (InputError when malformed)."""
    if isinstance(labels, Mapping):
        return _mapped_rows(labels, n)
    if isinstance(labels, Tensor):
        if labels.dim() == 0 and n == 1:
            return [0], [labels]
        if labels.dim() == 0 or labels.shape[0] != n:
            raise InputError(
                f"labels must have one entry per request ({n}), got a tensor of shape {tuple(labels.shape)}"
            )
        return list(range(n)), list(labels.unbind(0))
    if isinstance(labels, Sequence) and not isinstance(labels, (str, bytes)):
        if len(labels) != n:
            raise InputError(
                f"labels must have one entry per request ({n}) or be {{row: label}}, got {len(labels)}"
            )
        rows = [i for i, value in enumerate(labels) if value is not None]
        return rows, [labels[i] for i in rows]
    if n == 1 and labels is not None:
        return [0], [labels]
    raise InputError(
        f"labels must be a sequence or tensor of one label per request, or {{row: label}}; "
        f"got {type(labels).__name__}"
    )


def _mapped_rows(labels: Mapping[Any, Any], n: int) -> tuple[list[int], list[Any]]:
    """``{row: label}`` as rows and labels (a row may be given as its decimal text)."""
    rows, targets = [], []
    for key, value in labels.items():
        row = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < n:
            raise InputError(f"labels name row {key!r}; the job has rows 0..{n - 1}")
        if value is not None:
            rows.append(row)
            targets.append(value)
    return rows, targets
