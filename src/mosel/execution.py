"""Running one strategy over a batch: row selection, branch and fusion calls, input checks.

Each branch runs once over the rows that need it (a slice when they are contiguous, a gather
otherwise), fusion runs once per configuration group, and outputs keep the input order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mosel.errors import InputError, SLOError
from mosel.plan import Strategy
from mosel.spec import ModelSpec

__all__ = ["Result", "check_inputs", "check_slo", "execute", "is_out_of_memory", "run_recovering"]

Configuration = frozenset[str]
RowPlanCache = dict[tuple[Strategy, torch.device], "RowPlan"]


@dataclass(frozen=True, slots=True)
class Result:
    """What ``infer`` returns for one job.

    Attributes:
        output: fusion outputs, one row per request, in input order.
        modalities: per request, the configuration that was computed for it.
        expected_accuracy: request-weighted expected accuracy of the job's strategy (profiled).
        predicted_latency_ms: the cost model's prediction of the execution time.
        measured_latency_ms: measured execution time.
        completion_ms: time from the call's arrival to the result (waiting included).
        strategies: the strategy of each chunk (one chunk unless the job exceeded max_batch_size).
    """

    output: Tensor
    modalities: tuple[Configuration, ...]
    expected_accuracy: float
    predicted_latency_ms: float
    measured_latency_ms: float
    completion_ms: float
    strategies: tuple[Strategy, ...]


@dataclass(frozen=True, slots=True)
class RowPlan:
    """Precomputed row selections of one strategy: what each branch reads, what each fusion reads."""

    branch_rows: tuple[tuple[str, slice | Tensor | None], ...]
    group_rows: tuple[tuple[Configuration, int, tuple[tuple[str, slice], ...]], ...]
    modalities: tuple[Configuration, ...]


def _row_plan(strategy: Strategy, modalities: tuple[str, ...], device: torch.device) -> RowPlan:
    n = strategy.n
    starts: list[int] = []
    offset = 0
    for _, count in strategy.groups:
        starts.append(offset)
        offset += count
    branch_rows: list[tuple[str, slice | Tensor | None]] = []
    group_slices: list[list[tuple[str, slice]]] = [[] for _ in strategy.groups]
    for m in modalities:
        members = [i for i, (c, _) in enumerate(strategy.groups) if m in c]
        if not members:
            continue
        position = 0
        rows: list[int] = []
        for i in members:
            count = strategy.groups[i][1]
            group_slices[i].append((m, slice(position, position + count)))
            rows.extend(range(starts[i], starts[i] + count))
            position += count
        selection: slice | Tensor | None
        if len(rows) == n:
            selection = None
        elif rows == list(range(rows[0], rows[0] + len(rows))):
            selection = slice(rows[0], rows[0] + len(rows))
        else:
            selection = torch.tensor(rows, dtype=torch.long, device=device)
        branch_rows.append((m, selection))
    groups = tuple(
        (config, count, tuple(slices)) for (config, count), slices in zip(strategy.groups, group_slices)
    )
    per_request = tuple(config for config, count in strategy.groups for _ in range(count))
    return RowPlan(tuple(branch_rows), groups, per_request)


def execute(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    inputs: Mapping[str, Tensor],
    cache: RowPlanCache | None = None,
) -> Tensor:
    """Run one strategy over ``inputs`` (already validated, on the model's device, n rows).

    Rows are assigned to the strategy's groups in order; each branch runs once over the rows
    whose configuration contains it; fusion runs once per group; outputs keep the input order.
    """
    return run(model, spec, plan_rows(strategy, spec, inputs, cache), inputs)


def plan_rows(
    strategy: Strategy,
    spec: ModelSpec,
    inputs: Mapping[str, Tensor],
    cache: RowPlanCache | None,
) -> RowPlan:
    device = next(iter(inputs.values())).device
    key = (strategy, device)
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = _row_plan(strategy, spec.modalities, device)
        if cache is not None:
            cache[key] = plan
    return plan


def run(
    model: nn.Module,
    spec: ModelSpec,
    plan: RowPlan,
    inputs: Mapping[str, Tensor],
    parts_us: dict[str, float] | None = None,
) -> Tensor:
    """Execute a row plan; with ``parts_us``, add the time of each branch and of fusion to it."""
    features: dict[str, Tensor] = {}
    clock = time.perf_counter
    for m, selection in plan.branch_rows:
        x = inputs[m]
        if selection is not None:
            x = x[selection] if isinstance(selection, slice) else x.index_select(0, selection)
        if parts_us is None:
            features[m] = getattr(model, spec.branches[m])(x)
        else:
            t0 = clock()
            features[m] = getattr(model, spec.branches[m])(x)
            parts_us[m] = parts_us.get(m, 0.0) + (clock() - t0) * 1e6
    fuse: Callable[[Mapping[str, Tensor]], Tensor] = getattr(model, spec.fusion)
    t0 = clock()
    if len(plan.group_rows) == 1:
        output = fuse(features)
    else:
        output = torch.cat([fuse({m: features[m][s] for m, s in slices}) for _, _, slices in plan.group_rows])
    if parts_us is not None:
        parts_us["fusion"] = parts_us.get("fusion", 0.0) + (clock() - t0) * 1e6
    return output


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def run_recovering(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    inputs: Mapping[str, Tensor],
    cache: RowPlanCache | None,
    parts_us: dict[str, float] | None = None,
) -> Tensor:
    """:func:`run` a strategy; on a device out-of-memory error, split the batch and retry.

    A strategy of several groups retries group by group; a single group retries in halves,
    down to one row before the error is raised.
    """
    try:
        return run(model, spec, plan_rows(strategy, spec, inputs, cache), inputs, parts_us)
    except Exception as exc:
        if not is_out_of_memory(exc) or strategy.n == 1:
            raise
        if inputs and next(iter(inputs.values())).is_cuda:
            torch.cuda.empty_cache()
    if len(strategy.groups) > 1:
        parts = [((group,), group[1]) for group in strategy.groups]
    else:
        config, count = strategy.groups[0]
        parts = [(((config, count // 2),), count // 2), (((config, count - count // 2),), count - count // 2)]
    outputs, offset = [], 0
    for groups, count in parts:
        piece = {m: t[offset : offset + count] for m, t in inputs.items()}
        outputs.append(run_recovering(model, spec, Strategy(groups, 0, 0), piece, cache, parts_us))
        offset += count
    return torch.cat(outputs)


def check_slo(deadline_ms: float | None, min_accuracy: float | None) -> None:
    """Raise :class:`SLOError` unless both values are valid (None means "not given")."""
    if deadline_ms is not None and (
        isinstance(deadline_ms, bool)
        or not isinstance(deadline_ms, (int, float))
        or not math.isfinite(deadline_ms)
        or deadline_ms <= 0
    ):
        raise SLOError(f"deadline_ms must be a positive finite number of milliseconds, got {deadline_ms!r}")
    if min_accuracy is not None and (
        isinstance(min_accuracy, bool)
        or not isinstance(min_accuracy, (int, float))
        or not 0.0 <= min_accuracy <= 1.0
    ):
        raise SLOError(f"min_accuracy must be a number in [0, 1], got {min_accuracy!r}")


def check_inputs(
    inputs: object, spec: ModelSpec, device: torch.device
) -> tuple[dict[str, Tensor], Configuration, int]:
    """Validate a job's inputs; returns the tensors on ``device``, the modalities present, the size."""
    if not isinstance(inputs, Mapping):
        raise InputError(
            f"inputs must map modality names to tensors, e.g. {{{spec.modalities[0]!r}: tensor}}, "
            f"got {type(inputs).__name__}"
        )
    unknown = [k for k in inputs if k not in spec.branches]
    if unknown:
        raise InputError(
            f"unknown modality {unknown[0]!r} in inputs; {spec.model_class} declares {list(spec.modalities)}"
        )
    tensors: dict[str, Tensor] = {}
    n = -1
    for m in spec.modalities:
        value = inputs.get(m)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise InputError(f"inputs[{m!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() == 0:
            raise InputError(f"inputs[{m!r}] is a scalar; its first dimension must be the request dimension")
        if n >= 0 and value.shape[0] != n:
            sizes = {k: int(v.shape[0]) for k, v in tensors.items()} | {m: int(value.shape[0])}
            raise InputError(f"inputs disagree on the number of requests (first dimension): {sizes}")
        n = int(value.shape[0])
        tensors[m] = value if value.device == device else value.to(device, non_blocking=True)
    if not tensors:
        raise InputError(f"inputs hold none of the modalities {list(spec.modalities)}")
    if n == 0:
        raise InputError("inputs hold zero requests; the first dimension must be at least 1")
    return tensors, frozenset(tensors), n
