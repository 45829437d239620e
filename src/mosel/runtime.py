"""Serving a profiled model: ``attach``, ``infer`` and the execution of one strategy.

The request path validates, looks the strategy up in the plan (a bisection), and runs tensor work:
each branch once over the rows that need it, one fusion call per configuration group, outputs
concatenated back in input order. Nothing is solved or introspected per call.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import Tensor, nn

from mosel.errors import (
    AccuracyUnreachableError,
    DeadlineError,
    InputError,
    MoselWarning,
    NotProfiledError,
    ProfileMismatchError,
    SLOError,
)
from mosel.plan import ACCURACY_SCALE, Frontier, Strategy, accuracy_units
from mosel.profiles import Profile, fingerprint_of
from mosel.spec import PROVIDED_ATTR, ModelSpec, spec_of

__all__ = ["Result", "attach", "execute", "infer", "profile_of"]

Configuration = frozenset[str]
STATE_ATTR: Final = "_mosel_state"


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
class _RowPlan:
    """Precomputed row selections of one strategy: what each branch reads, what each fusion reads."""

    branch_rows: tuple[tuple[str, slice | Tensor | None], ...]
    group_rows: tuple[tuple[Configuration, int, tuple[tuple[str, slice], ...]], ...]
    modalities: tuple[Configuration, ...]


def _row_plan(strategy: Strategy, modalities: tuple[str, ...], device: torch.device) -> _RowPlan:
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
    return _RowPlan(tuple(branch_rows), groups, per_request)


def execute(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    inputs: Mapping[str, Tensor],
    cache: dict[tuple[Strategy, torch.device], _RowPlan] | None = None,
) -> Tensor:
    """Run one strategy over ``inputs`` (already validated, on the model's device, n rows).

    Rows are assigned to the strategy's groups in order; each branch runs once over the rows
    whose configuration contains it; fusion runs once per group; outputs keep the input order.
    """
    return _run(model, spec, _plan_rows(strategy, spec, inputs, cache), inputs)


def _plan_rows(
    strategy: Strategy,
    spec: ModelSpec,
    inputs: Mapping[str, Tensor],
    cache: dict[tuple[Strategy, torch.device], _RowPlan] | None,
) -> _RowPlan:
    device = next(iter(inputs.values())).device
    key = (strategy, device)
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = _row_plan(strategy, spec.modalities, device)
        if cache is not None:
            cache[key] = plan
    return plan


def _run(model: nn.Module, spec: ModelSpec, plan: _RowPlan, inputs: Mapping[str, Tensor]) -> Tensor:
    features: dict[str, Tensor] = {}
    for m, selection in plan.branch_rows:
        x = inputs[m]
        if selection is not None:
            x = x[selection] if isinstance(selection, slice) else x.index_select(0, selection)
        features[m] = getattr(model, spec.branches[m])(x)
    fuse: Callable[[Mapping[str, Tensor]], Tensor] = getattr(model, spec.fusion)
    if len(plan.group_rows) == 1:
        return fuse(features)
    outputs = [fuse({m: features[m][s] for m, s in slices}) for _, _, slices in plan.group_rows]
    return torch.cat(outputs)


class _ModelState:
    """Per-model serving state, stored on the instance as ``_mosel_state`` (not a Module/buffer)."""

    def __init__(self, profile: Profile, spec: ModelSpec, model_class: type[nn.Module]) -> None:
        self.profile = profile
        self.spec = spec
        self.model_class = model_class
        self.lock = threading.Lock()
        self.probe: Tensor | None = None
        self.row_plans: dict[tuple[Strategy, torch.device], _RowPlan] = {}
        self.full: dict[tuple[Configuration, int], Strategy] = {}
        cost = profile.cost_model()
        for (available, n), _ in profile.plan.frontiers.items():
            groups = ((available, n),)
            self.full[(available, n)] = Strategy(groups, cost.latency_us(groups), cost.accuracy_units(groups))

    def device(self, model: nn.Module) -> torch.device:
        """The model's device, read from one of its tensors (``.to()`` updates it in place)."""
        if self.probe is None:
            self.probe = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0))
        return self.probe.device

    def run(
        self, model: nn.Module, strategy: Strategy, tensors: Mapping[str, Tensor]
    ) -> tuple[Tensor, tuple[Configuration, ...]]:
        """Execute ``strategy``; returns the output and each request's configuration."""
        plan = _plan_rows(strategy, self.spec, tensors, self.row_plans)
        return _run(model, self.spec, plan, tensors), plan.modalities

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with the model (e.g. to another process): the profile travels as its JSON form.
        return (_restore_state, (self.profile.to_json(), self.model_class))


def _restore_state(profile_json: dict[str, Any], model_class: type[nn.Module]) -> _ModelState:
    return _ModelState(Profile.from_json(profile_json), spec_of(model_class), model_class)


def _state(model: nn.Module) -> _ModelState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        spec_of(model)
        raise NotProfiledError(
            f"{type(model).__qualname__} has no profile; call mosel.profile(model, val_data) or "
            f"mosel.attach(model, mosel.Profile.load(path)) before infer()"
        )
    assert isinstance(state, _ModelState)
    return state


def profile_of(model: nn.Module) -> Profile:
    """The profile attached to ``model``; raises :class:`NotProfiledError` if there is none."""
    return _state(model).profile


def attach(model: nn.Module, profile: Profile, *, strict: bool = False) -> None:
    """Attach a profile (and its plan) to a model so that it can serve.

    A profile of another model class or other modalities is refused. One measured on another
    device, torch version or other weights is accepted with a :class:`MoselWarning`, or refused
    when ``strict`` is true.
    """
    spec = spec_of(model)
    if profile.modalities != spec.modalities:
        raise ProfileMismatchError(
            f"profile has modalities {list(profile.modalities)}, {type(model).__qualname__} declares "
            f"{list(spec.modalities)}; profile this model instead"
        )
    if profile.fingerprint.model_class != spec.model_class:
        raise ProfileMismatchError(
            f"profile was measured on {profile.fingerprint.model_class}, not {spec.model_class}; "
            f"profile this model instead"
        )
    here = fingerprint_of(model, spec.model_class)
    stale = [
        f"{name} {getattr(profile.fingerprint, name)!r} != {getattr(here, name)!r}"
        for name in ("device", "torch_version", "parameter_checksum")
        if getattr(profile.fingerprint, name) != getattr(here, name)
    ]
    if stale:
        message = (
            f"profile of {spec.model_class} does not match this model: {'; '.join(stale)}. "
            f"Latency or accuracy may be off; re-run mosel.profile on this device and weights"
        )
        if strict:
            raise ProfileMismatchError(message)
        warnings.warn(message, MoselWarning, stacklevel=2)
    model.__dict__[STATE_ATTR] = _ModelState(profile, spec, type(model))


def _check_slo(deadline_ms: float | None, min_accuracy: float | None) -> None:
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


def _check_inputs(
    inputs: object, spec: ModelSpec, device: torch.device
) -> tuple[dict[str, Tensor], Configuration, int]:
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


def _chunks(n: int, max_batch_size: int) -> list[int]:
    parts = -(-n // max_batch_size)
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _choose(
    frontier: Frontier,
    full: Strategy,
    budget_us: float | None,
    floor: int,
    best_effort: bool,
    deadline_ms: float | None,
    waited_ms: float,
    min_accuracy: float | None,
) -> Strategy:
    """Among strategies meeting the floor, the most accurate predicted to fit the budget."""
    best = frontier.best
    if best.accuracy_units < floor:
        raise AccuracyUnreachableError(
            f"min_accuracy={min_accuracy} is above the best expected accuracy "
            f"{best.expected_accuracy:.4f} reachable with modalities {sorted(frontier.available)}; "
            f"lower the floor or send more modalities",
            min_accuracy=float(min_accuracy or 0.0),
            best_accuracy=best.expected_accuracy,
        )
    if budget_us is None:
        return full if floor == 0 else best
    fitting = frontier.best_within(budget_us)
    if fitting is not None and fitting.accuracy_units >= floor:
        return fitting
    cheapest = frontier.cheapest_meeting(floor)
    assert cheapest is not None
    if best_effort:
        return cheapest
    predicted_ms = waited_ms + cheapest.latency_us / 1000.0
    assert deadline_ms is not None
    raise DeadlineError(
        f"deadline_ms={deadline_ms} cannot be met for {frontier.n} request(s) at min_accuracy="
        f"{min_accuracy}: the fastest admissible strategy is predicted to finish at "
        f"{predicted_ms:.2f} ms"
        + (
            f"; the best accuracy that fits is {fitting.expected_accuracy:.4f}"
            if fitting is not None
            else "; nothing fits"
        )
        + "; relax the deadline or the floor, or pass best_effort=True",
        deadline_ms=float(deadline_ms),
        predicted_ms=predicted_ms,
        best_accuracy_within_deadline=fitting.expected_accuracy if fitting is not None else None,
    )


def infer(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    deadline_ms: float | None = None,
    min_accuracy: float | None = None,
    best_effort: bool = False,
) -> Result:
    """Serve one job: pick the strategy from the plan and run it. See ``Model.infer``."""
    arrival = time.perf_counter()
    state = _state(model)
    _check_slo(deadline_ms, min_accuracy)
    profile = state.profile
    tensors, available, n = _check_inputs(inputs, state.spec, state.device(model))
    floor_per_request = accuracy_units(min_accuracy) if min_accuracy is not None else 0
    plan = profile.plan
    with state.lock, torch.inference_mode():
        started = time.perf_counter()
        waited_ms = (started - arrival) * 1000.0
        budget_us = None if deadline_ms is None else (deadline_ms - waited_ms) * 1000.0
        outputs, modalities, strategies, offset = [], [], [], 0
        for size in [n] if n <= plan.max_batch_size else _chunks(n, plan.max_batch_size):
            strategy = _choose(
                plan.frontier(available, size),
                state.full[(available, size)],
                None if budget_us is None else budget_us * size / n,
                floor_per_request * size,
                best_effort,
                deadline_ms,
                waited_ms,
                min_accuracy,
            )
            chunk = tensors if size == n else {m: t[offset : offset + size] for m, t in tensors.items()}
            output, rows = state.run(model, strategy, chunk)
            outputs.append(output)
            modalities.append(rows)
            strategies.append(strategy)
            offset += size
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if output.is_cuda:
            torch.cuda.synchronize(output.device)
        finished = time.perf_counter()
    return Result(
        output=output,
        modalities=modalities[0]
        if len(modalities) == 1
        else tuple(itertools.chain.from_iterable(modalities)),
        expected_accuracy=sum(s.accuracy_units for s in strategies) / (n * ACCURACY_SCALE),
        predicted_latency_ms=sum(s.latency_us for s in strategies) / 1000.0,
        measured_latency_ms=(finished - started) * 1000.0,
        completion_ms=(finished - arrival) * 1000.0,
        strategies=tuple(strategies),
    )


def model_infer(
    self: nn.Module,
    inputs: Mapping[str, Tensor],
    *,
    deadline_ms: float | None = None,
    min_accuracy: float | None = None,
    best_effort: bool = False,
) -> Result:
    """Serve one job (the rows of ``inputs``) under an optional deadline and accuracy floor.

    Args:
        self: the model.
        inputs: modality name -> tensor whose first dimension is the request dimension. A
            modality left out (or None) is not computed for any request of this job.
        deadline_ms: latency SLO from the moment of the call, queueing included. None: no
            deadline.
        min_accuracy: floor on the job's expected accuracy (from the profile). None: no floor.
        best_effort: when no admissible strategy fits the deadline, serve late with the fastest
            one that meets the floor instead of raising :class:`mosel.DeadlineError`.

    Returns:
        A :class:`mosel.Result`. With neither SLO, every available modality is computed.

    Thread-safe: concurrent callers are served one job at a time.
    """
    return infer(self, inputs, deadline_ms=deadline_ms, min_accuracy=min_accuracy, best_effort=best_effort)


setattr(model_infer, PROVIDED_ATTR, True)
model_infer.__name__ = "infer"
model_infer.__qualname__ = "infer"
