"""Running one strategy over a batch: row selection, branch and fusion calls, input checks.

Each branch runs once over the rows that need it (a slice when they are contiguous, a gather
otherwise), fusion runs once per configuration group, and outputs keep the input order.
"""

from __future__ import annotations

import decimal
import math
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from mosel import trees
from mosel.errors import InputError, OutputError, SLOError
from mosel.plan import Strategy
from mosel.spec import ModelSpec
from mosel.trees import Tree

__all__ = [
    "Result",
    "check_inputs",
    "check_slo",
    "checked",
    "concat",
    "execute",
    "is_out_of_memory",
    "run_recovering",
]

Configuration = frozenset[str]
RowPlanCache = dict[tuple[Strategy, torch.device], "RowPlan"]


@dataclass(frozen=True, slots=True)
class Result:
    """What ``infer`` returns for one job.

    Attributes:
        output: fusion outputs, one row per request, in input order: a tensor, or the same
            (nested) dict/tuple/list of tensors the fusion returns.
        modalities: per request, the configuration that was computed for it.
        expected_accuracy: request-weighted expected accuracy of the job's strategy (profiled).
        predicted_latency_ms: the cost model's prediction of the execution time.
        measured_latency_ms: measured execution time.
        completion_ms: time from the call's arrival until its result was assembled and handed
            over (waiting, execution and output assembly included; the caller's own wake-up not).
        strategies: the strategy of each chunk (one chunk unless the job exceeded max_batch_size).
        deadline_met: whether the result was handed over within the deadline (None: no deadline).
        queue_ms: time from the call's arrival until its (first) batch was dispatched; the
            rest of ``completion_ms`` beyond ``measured_latency_ms`` is dispatch and hand-over.
        reason: why the job was served below the most accurate strategy its floor and its
            modalities allowed (``"deadline: ..."``, ``"queue: ..."``, ``"spare capacity:
            ..."``, ``"arrivals: ..."``, ``"overload: ..."``, or the policy's own rule); None
            when it was served at its best.
    """

    output: Any
    modalities: tuple[Configuration, ...]
    expected_accuracy: float
    predicted_latency_ms: float
    measured_latency_ms: float
    completion_ms: float
    strategies: tuple[Strategy, ...]
    deadline_met: bool | None = None
    queue_ms: float = math.nan
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RowPlan:
    """Precomputed row selections of one strategy: what each branch reads, what each fusion reads."""

    branch_rows: tuple[tuple[str, slice | Tensor | None, int], ...]  # (modality, selection, rows)
    group_rows: tuple[tuple[Configuration, int, tuple[tuple[str, slice], ...]], ...]
    modalities: tuple[Configuration, ...]


def _row_plan(strategy: Strategy, modalities: tuple[str, ...], device: torch.device) -> RowPlan:
    n = strategy.n
    starts: list[int] = []
    offset = 0
    for _, count in strategy.groups:
        starts.append(offset)
        offset += count
    branch_rows: list[tuple[str, slice | Tensor | None, int]] = []
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
        branch_rows.append((m, selection, len(rows)))
    groups = tuple(
        (config, count, tuple(slices)) for (config, count), slices in zip(strategy.groups, group_slices)
    )
    per_request = tuple(config for config, count in strategy.groups for _ in range(count))
    return RowPlan(tuple(branch_rows), groups, per_request)


def execute(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    inputs: Mapping[str, Tree],
    cache: RowPlanCache | None = None,
) -> Tree:
    """Run one strategy over ``inputs`` (already validated, on the model's device, n rows).

    Rows are assigned to the strategy's groups in order; each branch runs once over the rows
    whose configuration contains it; fusion runs once per group; outputs keep the input order.
    """
    return run(model, spec, plan_rows(strategy, spec, inputs, cache), inputs)


def plan_rows(
    strategy: Strategy,
    spec: ModelSpec,
    inputs: Mapping[str, Tree],
    cache: RowPlanCache | None,
) -> RowPlan:
    """The row selections of ``strategy`` on the inputs' device (cached per strategy and device)."""
    device = trees.leaves(next(iter(inputs.values())))[0].device
    key = (strategy, device)
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = _row_plan(strategy, spec.modalities, device)
        if cache is not None:
            cache[key] = plan
    return plan


def checked(output: Tree, rows: int, what: str, dim: int = 0) -> Tree:
    """``output`` if it is a batched tree of exactly ``rows`` rows along ``dim``, or :class:`OutputError`."""
    if isinstance(output, Tensor) and output.dim() > dim and output.shape[dim] == rows:
        return output
    try:
        got = trees.check(output, dim)
    except trees.TreeError as exc:
        raise OutputError(
            f"{what} returned {type(output).__name__} that mosel cannot split into {rows} row(s): {exc}; "
            f"return a tensor (or a dict/tuple/list of tensors) with one row per request"
        ) from None
    if got != rows:
        raise OutputError(
            f"{what} returned {got} row(s) for {rows} request(s); it must return exactly one row per "
            f"request, in order (a reduction or a slice such as out[1:] drops rows)"
        )
    return output


def run(
    model: nn.Module,
    spec: ModelSpec,
    plan: RowPlan,
    inputs: Mapping[str, Tree],
    parts_us: dict[str, float] | None = None,
) -> Tree:
    """Execute a row plan; with ``parts_us``, add the time of each branch and of fusion to it.

    Every branch and fusion output is checked to have exactly one row per request it was given
    (:class:`~mosel.errors.OutputError` otherwise), so a misbehaving model fails its own rows
    rather than handing rows of one request to another.
    """
    features: dict[str, Tree] = {}
    clock = time.perf_counter
    for m, selection, rows in plan.branch_rows:
        x = inputs[m]
        dim = spec.batch_dim(m)
        if selection is not None:
            x = trees.take(x, selection, dim)
        name = spec.branches[m]
        if parts_us is None:
            features[m] = checked(getattr(model, name)(x), rows, f"branch {name!r} ({m!r})", dim)
        else:
            t0 = clock()
            features[m] = checked(getattr(model, name)(x), rows, f"branch {name!r} ({m!r})", dim)
            parts_us[m] = parts_us.get(m, 0.0) + (clock() - t0) * 1e6
    fuse: Callable[[Mapping[str, Tree]], Tree] = getattr(model, spec.fusion)
    what = f"fusion {spec.fusion!r}"
    t0 = clock()
    if len(plan.group_rows) == 1:
        output = checked(fuse(features), plan.group_rows[0][1], what)
    else:
        outputs = [
            checked(fuse({m: trees.take(features[m], s, spec.batch_dim(m)) for m, s in slices}), count, what)
            for _, count, slices in plan.group_rows
        ]
        output = concat(outputs, what)
    if parts_us is not None:
        parts_us["fusion"] = parts_us.get("fusion", 0.0) + (clock() - t0) * 1e6
    return output


def concat(outputs: Sequence[Tree], what: str) -> Tree:
    """Outputs of several chunks joined along the batch dimension, or :class:`OutputError`."""
    try:
        return trees.concat(outputs)
    except trees.TreeError as exc:
        raise OutputError(
            f"{what} returned outputs for different groups of requests that do not concatenate: {exc}; "
            f"return the same structure, dtype and trailing shape whatever the number of rows "
            f"(a .squeeze() on a one-row batch changes it)"
        ) from None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def run_recovering(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    inputs: Mapping[str, Tree],
    cache: RowPlanCache | None,
    parts_us: dict[str, float] | None = None,
) -> Tree:
    """:func:`run` a strategy; on a device out-of-memory error, split the batch and retry.

    A strategy of several groups retries group by group; a single group retries in halves,
    down to one row before the error is raised.
    """
    try:
        return run(model, spec, plan_rows(strategy, spec, inputs, cache), inputs, parts_us)
    except Exception as exc:
        if not is_out_of_memory(exc) or strategy.n == 1:
            raise
        if any(leaf.is_cuda for value in inputs.values() for leaf in trees.leaves(value)):
            torch.cuda.empty_cache()
    if len(strategy.groups) > 1:
        parts = [((group,), group[1]) for group in strategy.groups]
    else:
        config, count = strategy.groups[0]
        parts = [(((config, count // 2),), count // 2), (((config, count - count // 2),), count - count // 2)]
    outputs, offset = [], 0
    for groups, count in parts:
        piece = {
            m: trees.take(t, slice(offset, offset + count), spec.batch_dim(m)) for m, t in inputs.items()
        }
        outputs.append(run_recovering(model, spec, Strategy(groups, 0, 0), piece, cache, parts_us))
        offset += count
    return concat(outputs, f"fusion {spec.fusion!r}")


MAX_DEADLINE_MS: Final = 1e15
"""Deadlines beyond this (about 31,700 years) are served as this: no clock gets there."""


def _real(value: object) -> float | None:
    """``value`` as a float if it is a real number, else None.

    Python, numpy and ``Decimal`` numbers, and 0-d numpy arrays or tensors of a real dtype, are
    real numbers here; bools are not.
    """
    if isinstance(value, Tensor) and value.dim() == 0:
        if value.dtype == torch.bool or value.is_complex():
            return None
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        if value.dtype.kind not in "iuf":
            return None
        value = value.item()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() or value.is_infinite() else math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        huge: Any = value
        return math.inf if huge > 0 else -math.inf


def check_confidence(confidence: object, min_accuracy: float | None) -> float | None:
    """Validate ``confidence`` (None: the floor is on the profiled mean); returns it as a float.

    Raises:
        SLOError: not a real number in [0.5, 1), or given without a floor.
    """
    if confidence is None:
        return None
    value = _real(confidence)
    if value is None or not 0.5 <= value < 1.0:
        raise SLOError(f"confidence must be a number in [0.5, 1) (e.g. 0.95), got {confidence!r}")
    if min_accuracy is None:
        raise SLOError(f"confidence={confidence!r} applies to min_accuracy, which was not given")
    return value


def check_slo(deadline_ms: object, min_accuracy: object) -> tuple[float | None, float | None]:
    """Validate both SLO values (None means "not given"); returns them as floats.

    Raises:
        SLOError: a value that is not a real number, a deadline that is not positive and finite
            (a huge integer is served as :data:`MAX_DEADLINE_MS`), a floor outside [0, 1].
    """
    deadline: float | None = None
    if deadline_ms is not None:
        deadline = _real(deadline_ms)
        if (
            deadline is None
            or math.isnan(deadline)
            or deadline <= 0
            or (deadline == math.inf and isinstance(deadline_ms, (float, np.floating)))
        ):
            raise SLOError(
                f"deadline_ms must be a positive finite number of milliseconds, got {deadline_ms!r}"
            )
        deadline = min(deadline, MAX_DEADLINE_MS)
    floor: float | None = None
    if min_accuracy is not None:
        floor = _real(min_accuracy)
        if floor is None or not 0.0 <= floor <= 1.0:
            raise SLOError(f"min_accuracy must be a number in [0, 1], got {min_accuracy!r}")
    return deadline, floor


def group_by_presence(
    tensors: dict[str, Tree], available: Configuration, n: int, present: object, spec: ModelSpec
) -> tuple[dict[str, Tree], tuple[tuple[Configuration, int], ...], Tensor | None]:
    """Rows grouped by the modalities each has, from a per-row presence mask.

    ``present`` maps modality names to a bool tensor of ``n`` (row ``i`` has the modality when
    ``present[m][i]``); a modality left out of it is present in every row that has it in
    ``tensors``. Returns the inputs with rows reordered so that each group is contiguous (a
    stable order: rows keep their order within a group), the groups as (modalities, rows), and
    the index that puts outputs back into the caller's row order (None: no reordering).

    Raises:
        InputError: a mask for a modality not in the inputs, not a bool tensor of ``n`` rows, or
            a row left with no modality.
    """
    if present is None:
        return tensors, ((available, n),), None
    if not isinstance(present, Mapping):
        raise InputError(
            f"present must map modality names to bool tensors of {n} rows, got {type(present).__name__}"
        )
    masks: dict[str, Tensor] = {}
    for m, mask in present.items():
        if m not in available:
            raise InputError(
                f"present[{m!r}]: {m!r} is not among the inputs' modalities {sorted(available)}; a mask "
                f"marks which rows of a given modality are real"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            what = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise InputError(f"present[{m!r}] must be a bool tensor of shape ({n},), got {what}")
        masks[m] = mask.detach().cpu()
    columns = [m for m in spec.modalities if m in available]
    bits = torch.zeros(n, dtype=torch.int64)
    for i, m in enumerate(columns):
        has = masks.get(m)
        bits |= (torch.ones(n, dtype=torch.int64) if has is None else has.to(torch.int64)) << i
    empty = torch.nonzero(bits == 0).flatten()
    if len(empty):
        raise InputError(f"present leaves row {int(empty[0])} with no modality; every request needs one")
    keys, counts = torch.unique(bits, return_counts=True)
    groups = tuple(
        (frozenset(m for i, m in enumerate(columns) if int(key) >> i & 1), int(count))
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True)
    )
    if len(groups) == 1:
        return tensors, groups, None
    order = torch.argsort(bits, stable=True)
    reordered = {m: trees.take(t, order.to(trees.device(t)), spec.batch_dim(m)) for m, t in tensors.items()}
    return reordered, groups, torch.argsort(order)


def check_inputs(
    inputs: object, spec: ModelSpec, device: torch.device
) -> tuple[dict[str, Tree], Configuration, int]:
    """Validate a job's inputs; returns them on ``device``, the modalities present, the size.

    A modality's input is a tensor or a (nested) dict/tuple/list of tensors whose first dimension
    is the request dimension; None (or leaving the modality out) means "not available".
    """
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
    tensors: dict[str, Tree] = {}
    sizes: dict[str, int] = {}
    for m in spec.modalities:
        value = inputs.get(m)
        if value is None:
            continue
        dim = spec.batch_dim(m)
        if isinstance(value, Tensor) and value.dim() > dim:
            rows = int(value.shape[dim])
        else:
            try:
                rows = trees.check(value, dim)
            except trees.TreeError as exc:
                kind = "a scalar" if isinstance(value, Tensor) else f"a {type(value).__name__}"
                raise InputError(
                    f"inputs[{m!r}] is {kind} mosel cannot split into requests: {exc}; it must be a "
                    f"torch.Tensor (or a dict/tuple/list of tensors) whose dimension {dim} is the "
                    f"request dimension"
                ) from None
        sizes[m] = rows
        tensors[m] = trees.to_device(value, device)
    if not tensors:
        raise InputError(f"inputs hold none of the modalities {list(spec.modalities)}")
    if len(set(sizes.values())) > 1:
        raise InputError(
            f"inputs disagree on the number of requests (each modality's batch dimension): {sizes}"
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise InputError("inputs hold zero requests; the first dimension must be at least 1")
    return tensors, frozenset(tensors), n
