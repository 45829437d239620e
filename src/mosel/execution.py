"""Running batches on the model: row selection, branch and fusion calls, fault isolation, results.

Each branch runs once over the rows that need it (a slice when they are contiguous, a gather
otherwise), fusion runs once per configuration group, and outputs keep the input order. A batch
of several jobs runs as one execution, split back per job; if it fails, each job runs alone so
that only the job whose rows fail fails. A job's :class:`Work` holds its tensors and outputs,
and :func:`result_of` turns a finished job into the caller's :class:`Result`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mosel import trees
from mosel.chains import Escalated, StageBudget
from mosel.errors import ExecutionError, OutputError
from mosel.escalation import Chain
from mosel.jobs import Batch, Job
from mosel.plan import ACCURACY_SCALE, Strategy
from mosel.spec import ModelSpec
from mosel.stages import Chained, checked, escalate
from mosel.trees import Tree

__all__ = [
    "Later",
    "Result",
    "RowPlanCache",
    "Work",
    "checked",
    "concat",
    "execute",
    "is_out_of_memory",
    "own_error",
    "process_token",
    "result_of",
    "run_batch",
    "run_chained",
    "run_recovering",
    "run_task",
]

_log = logging.getLogger("mosel")
Configuration = frozenset[str]
_token = secrets.token_hex(4)
"""This process's prefix of result ids (a forked child draws its own)."""


def _forked() -> None:
    global _token  # noqa: PLW0603 (one value per process)
    _token = secrets.token_hex(4)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def process_token() -> str:
    """The prefix of this process's result ids (``Result.id`` is ``"<token>-<counter>"``)."""
    return _token


RowPlanCache = dict[tuple[tuple[tuple[Configuration, int], ...], torch.device], "RowPlan"]


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
        escalated: per request, whether it escalated past its chain's first configuration
            (``modalities`` is then the configuration it ended at); all False without chains.
        id: the job's id, ``"<process token>-<counter>"``: unique within the process and, by
            its random per-process token, across processes (replicas); report the job's
            labels under it with :func:`mosel.feedback` (see ``docs/monitoring.md``).
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
    escalated: tuple[bool, ...] = ()
    id: str = ""


@dataclass(frozen=True, slots=True)
class RowPlan:
    """Precomputed row selections of one strategy: what each branch reads, what each fusion reads.

    Each branch entry is (modality, its rows' selection or None for all, rows, batch dimension,
    the branch's attribute, how errors name it).
    """

    branch_rows: tuple[tuple[str, slice | Tensor | None, int, int, str, str], ...]
    group_rows: tuple[tuple[Configuration, int, tuple[tuple[str, slice], ...]], ...]
    modalities: tuple[Configuration, ...]
    fusion: str  # the fusion's attribute
    fusion_what: str  # how errors name it


def _row_plan(strategy: Strategy, spec: ModelSpec, device: torch.device) -> RowPlan:
    n = strategy.n
    starts: list[int] = []
    offset = 0
    for _, count in strategy.groups:
        starts.append(offset)
        offset += count
    branch_rows: list[tuple[str, slice | Tensor | None, int, int, str, str]] = []
    group_slices: list[list[tuple[str, slice]]] = [[] for _ in strategy.groups]
    for m in spec.modalities:
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
        name = spec.branches[m]
        branch_rows.append((m, selection, len(rows), spec.batch_dim(m), name, f"branch {name!r} ({m!r})"))
    groups = tuple(
        (config, count, tuple(slices)) for (config, count), slices in zip(strategy.groups, group_slices)
    )
    per_request = tuple(config for config, count in strategy.groups for _ in range(count))
    return RowPlan(tuple(branch_rows), groups, per_request, spec.fusion, f"fusion {spec.fusion!r}")


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
    device: torch.device | None = None,
) -> RowPlan:
    """The row selections of ``strategy`` on the inputs' device (cached per groups and device)."""
    if device is None:
        device = trees.device(next(iter(inputs.values())))
    key = (strategy.groups, device)
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = _row_plan(strategy, spec, device)
        if cache is not None:
            cache[key] = plan
    return plan


def run(
    model: nn.Module,
    spec: ModelSpec,
    plan: RowPlan,
    inputs: Mapping[str, Tree],
    parts_us: dict[str, float] | None = None,
    features_out: dict[str, Tree] | None = None,
) -> Tree:
    """Execute a row plan; with ``parts_us``, add the time of each branch and of fusion to it.

    Every branch and fusion output is checked to have exactly one row per request it was given
    (:class:`~mosel.errors.OutputError` otherwise), so a misbehaving model fails its own rows
    rather than handing rows of one request to another. ``features_out`` receives each branch's
    features (a chain's later stages reuse them).
    """
    features: dict[str, Tree] = {}
    clock = time.perf_counter
    for m, selection, rows, dim, name, what in plan.branch_rows:
        x = inputs[m]
        if selection is not None:
            x = trees.take(x, selection, dim)
        if parts_us is None:
            features[m] = checked(getattr(model, name)(x), rows, what, dim)
        else:
            t0 = clock()
            features[m] = checked(getattr(model, name)(x), rows, what, dim)
            parts_us[m] = parts_us.get(m, 0.0) + (clock() - t0) * 1e6
    fuse: Callable[[Mapping[str, Tree]], Tree] = getattr(model, plan.fusion)
    what = plan.fusion_what
    t0 = clock()
    if len(plan.group_rows) == 1:
        output = checked(fuse(features), plan.group_rows[0][1], what)
    else:
        dims = spec.batch_dims
        outputs = [
            checked(fuse({m: trees.take(features[m], s, dims.get(m, 0)) for m, s in slices}), count, what)
            for _, count, slices in plan.group_rows
        ]
        output = concat(outputs, what)
    if parts_us is not None:
        parts_us["fusion"] = parts_us.get("fusion", 0.0) + (clock() - t0) * 1e6
    if features_out is not None:
        features_out.update(features)
    return output


@dataclass(frozen=True, slots=True)
class Later:
    """How a batch's chains run their later stages: the confidence signal, the time they may take."""

    signal: str
    budget: StageBudget | None = None
    clock: Callable[[], float] | None = None


def run_chained(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    chains: Sequence[Chain | None],
    inputs: Mapping[str, Tree],
    later: Later,
    cache: RowPlanCache | None = None,
    parts_us: dict[str, float] | None = None,
    device: torch.device | None = None,
) -> Chained:
    """Run ``strategy`` (a batch's first stage, rows in its groups' order), then the rows' chains."""
    plan = plan_rows(Strategy(strategy.groups, 0, 0), spec, inputs, cache, device)
    features: dict[str, Tree] = {}
    output = run(model, spec, plan, inputs, parts_us, features)
    selections = {m: selection for m, selection, *_ in plan.branch_rows}
    return escalate(
        model, spec, inputs, output, plan.modalities, chains, features, selections, later.signal,
        later.budget, later.clock, parts_us,
    )  # fmt: skip


def run_task(
    model: nn.Module,
    spec: ModelSpec,
    strategy: Strategy,
    inputs: Mapping[str, Tree],
    cache: RowPlanCache | None,
    later: Later | None,
    parts_us: dict[str, float] | None = None,
    device: torch.device | None = None,
) -> tuple[Tree, Chained | None]:
    """One task's rows at its strategy: a chain's stages, or :func:`run_recovering`."""
    chain = strategy.chain
    if chain is None or later is None:
        return run_recovering(model, spec, strategy, inputs, cache, parts_us, device), None
    done = run_chained(model, spec, strategy, [chain] * strategy.n, inputs, later, cache, parts_us, device)
    return done.output, done


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
    device: torch.device | None = None,
) -> Tree:
    """:func:`run` a strategy; on a device out-of-memory error, split the batch and retry.

    A strategy of several groups retries group by group; a single group retries in halves,
    down to one row before the error is raised. ``device``: the inputs' (default: read from them).
    """
    try:
        return run(model, spec, plan_rows(strategy, spec, inputs, cache, device), inputs, parts_us)
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


class Work:
    """What a driver keeps of a job beside the scheduler: its future, its tensors, its outputs."""

    __slots__ = ("device", "future", "inputs", "order", "outputs", "rows")

    def __init__(
        self, future: Future[Any] | None, inputs: Any, order: Tensor | None, device: torch.device
    ) -> None:
        self.future = future
        self.inputs = inputs  # modality -> tree, rows grouped by presence; None once released
        self.order = order  # gathers outputs back into the caller's row order (None: in order)
        self.device = device  # where the inputs are, and the model was when the job was made
        self.outputs: list[tuple[int, Tree]] = []  # (task index, output), joined once all are in
        # (task index, each row's final configuration, whether it escalated), for tasks that ran a chain
        self.rows: list[tuple[int, tuple[Configuration, ...], tuple[bool, ...]]] = []


def own_error(error: BaseException) -> BaseException:
    """``error`` as a job's failure: a ``BaseException`` that is not an ``Exception`` is wrapped."""
    if isinstance(error, Exception):
        return error
    wrapped = ExecutionError(
        f"the model's code raised {type(error).__name__} while serving this job; the job is failed "
        f"and the model keeps serving"
    )
    wrapped.__cause__ = error
    return wrapped


def rows_of(
    spec: ModelSpec, inputs: Mapping[str, Tree], offset: int, n: int, total: int
) -> Mapping[str, Tree]:
    """Rows ``offset .. offset + n`` of a job's ``total`` input rows, along each batch dimension."""
    if offset == 0 and n == total:
        return inputs
    return {m: trees.take(t, slice(offset, offset + n), spec.batch_dim(m)) for m, t in inputs.items()}


def run_batch(
    model: nn.Module,
    spec: ModelSpec,
    batch: Batch,
    cache: RowPlanCache,
    device: torch.device,
    *,
    propagate: bool,
    later: Later | None = None,
) -> tuple[dict[int, Tree], dict[int, BaseException], dict[str, float] | None, Escalated | None]:
    """Run every task of a batch of :class:`Work` jobs on ``device``.

    Returns each task's output (by position) or error, on a CPU the time of each branch and of
    fusion (None on an accelerator, where they would need a synchronisation each), and what the
    batch's chains did (None without). Several jobs run as one execution, split back per job;
    when it fails, each job runs alone so that only the jobs whose rows fail fail. A job's last
    chunk joins its chunks' outputs in its :class:`Work`. ``later``: how chains run their later
    stages (None: every task runs its strategy's first stage only, as a static strategy).

    Raises:
        BaseException: with ``propagate`` (on the caller's own thread), a ``BaseException`` that
            is not an ``Exception`` (Ctrl-C, ``SystemExit``) raised by the model's code; without,
            it fails only its job (wrapped, :func:`own_error`).
    """
    outputs: dict[int, Tree] = {}
    errors: dict[int, BaseException] = {}
    rows: dict[int, Chained] = {}
    record: Escalated | None = None
    kind = device.type
    cuda = kind == "cuda"
    timings: dict[str, float] | None = {} if kind == "cpu" else None
    later = (
        dataclasses.replace(later, budget=batch.later)
        if later is not None and batch.later is not None
        else None
    )
    try:
        with contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode():
            if len(batch.tasks) == 1:
                task = batch.tasks[0]
                inputs = rows_of(spec, task.job.payload.inputs, task.offset, task.n, task.job.n)
                outputs[0], done = run_task(model, spec, task.strategy, inputs, cache, later, timings, device)
                if done is not None:
                    rows[0], record = done, done.record
            else:
                outputs, rows, record = _run_merged(model, spec, batch, cache, timings, later)
            if cuda:
                torch.cuda.synchronize(device)
    except BaseException as exc:
        if not isinstance(exc, Exception) and propagate:
            raise  # on the caller's own thread: theirs to see, once the scheduler is told
        record = None
        if len(batch.tasks) == 1:
            errors[0] = own_error(exc)
        else:  # fail only the jobs the error belongs to: re-run each task alone
            _log.info("merged batch failed (%r); re-running its %d jobs separately", exc, len(batch.tasks))
            outputs, errors, rows = _run_separately(model, spec, batch, cache, later)
    _assemble(spec, batch, outputs, errors, rows)
    return outputs, errors, timings if not errors else None, record


def _assemble(
    spec: ModelSpec,
    batch: Batch,
    outputs: dict[int, Tree],
    errors: dict[int, BaseException],
    rows: Mapping[int, Chained],
) -> None:
    """Hand each task's output to its job; a job's last chunk joins its chunks' outputs."""
    for position, output in sorted(outputs.items()):
        task = batch.tasks[position]
        job = task.job
        work: Work = job.payload
        work.outputs.append((task.index, output))
        done = rows.get(position)
        if done is not None:
            work.rows.append((task.index, done.modalities, done.escalated))
        if len(work.outputs) == len(job.tasks) > 1:
            parts = [out for _, out in sorted(work.outputs, key=lambda pair: pair[0])]
            try:
                work.outputs = [(0, concat(parts, f"fusion {spec.fusion!r}"))]
            except OutputError as exc:
                errors[position] = exc


def _run_merged(
    model: nn.Module,
    spec: ModelSpec,
    batch: Batch,
    cache: RowPlanCache,
    timings: dict[str, float] | None,
    later: Later | None,
) -> tuple[dict[int, Tree], dict[int, Chained], Escalated | None]:
    """One execution for several jobs' rows, grouped by configuration, split back after."""
    pieces: dict[str, list[Tree]] = {m: [] for m in spec.modalities}
    layout: list[tuple[int, Configuration, int]] = []  # (task position, configuration, rows)
    chains: list[Chain | None] = []
    for config, _ in batch.merged.groups:
        for position, (task, strategy) in enumerate(zip(batch.tasks, batch.strategies)):
            start = 0
            for c, count in strategy.groups:
                if c == config:
                    rows = rows_of(spec, task.job.payload.inputs, task.offset + start, count, task.job.n)
                    for m, t in rows.items():
                        pieces[m].append(t)
                    layout.append((position, config, count))
                    chains.extend([strategy.chain if later is not None else None] * count)
                start += count
    inputs = {m: trees.concat(ts, spec.batch_dim(m)) for m, ts in pieces.items() if ts}
    done: Chained | None = None
    if any(chain is not None for chain in chains):
        assert later is not None
        done = run_chained(model, spec, batch.merged, chains, inputs, later, cache, timings)
        merged = done.output
    else:
        merged = run_recovering(model, spec, batch.merged, inputs, cache, timings)
    parts: dict[tuple[int, Configuration], tuple[Tree, int]] = {}
    offset = 0
    for position, config, count in layout:
        parts[(position, config)] = (trees.take(merged, slice(offset, offset + count)), offset)
        offset += count
    outputs = {}
    rows_done: dict[int, Chained] = {}
    for position, strategy in enumerate(batch.strategies):
        chunks = [parts[(position, c)][0] for c, _ in strategy.groups]
        # A slice of the merged output would keep every merged job's rows in its storage.
        outputs[position] = trees.concat(chunks) if len(chunks) > 1 else trees.copy(chunks[0])
        if done is not None:
            spans = [range(parts[(position, c)][1], parts[(position, c)][1] + k) for c, k in strategy.groups]
            mine = [i for span in spans for i in span]
            rows_done[position] = Chained(
                outputs[position],
                tuple(done.modalities[i] for i in mine),
                tuple(done.escalated[i] for i in mine),
                done.record,
            )
    return outputs, rows_done, done.record if done is not None else None


def _run_separately(
    model: nn.Module, spec: ModelSpec, batch: Batch, cache: RowPlanCache, later: Later | None
) -> tuple[dict[int, Tree], dict[int, BaseException], dict[int, Chained]]:
    outputs: dict[int, Tree] = {}
    errors: dict[int, BaseException] = {}
    rows: dict[int, Chained] = {}
    for position, task in enumerate(batch.tasks):
        try:
            with torch.inference_mode():
                inputs = rows_of(spec, task.job.payload.inputs, task.offset, task.n, task.job.n)
                outputs[position], done = run_task(model, spec, task.strategy, inputs, cache, later)
                if done is not None:
                    rows[position] = done
        except BaseException as exc:  # on the executor thread: the job's own failure
            errors[position] = own_error(exc)
    return outputs, errors, rows


def result_of(job: Job[Work], completion_ms: float, reason: str | None) -> Result:
    """The caller's result of a finished job (its tensors are released)."""
    work = job.payload
    output = work.outputs[0][1]
    tasks = job.tasks
    strategies = (tasks[0].strategy,) if len(tasks) == 1 else tuple(task.strategy for task in tasks)
    modalities: tuple[Configuration, ...] = ()
    escalated: tuple[bool, ...] = ()
    units = 0
    chained = {index: (configs, flags) for index, configs, flags in work.rows} if work.rows else {}
    for index, strategy in enumerate(strategies):
        units += strategy.accuracy_units
        if index in chained:
            modalities += chained[index][0]
            escalated += chained[index][1]
            continue
        for config, count in strategy.groups:
            modalities += (config,) * count
        escalated += (False,) * strategy.n
    if work.order is not None:  # rows were grouped by presence: back to the caller's order
        back = work.order.tolist()
        output = trees.take(output, work.order.to(trees.device(output)))
        modalities = tuple(modalities[i] for i in back)
        escalated = tuple(escalated[i] for i in back)
    work.inputs = None  # release the request's tensors
    deadline_ms = job.slo.deadline_ms
    return Result(
        output=output,
        modalities=modalities,
        expected_accuracy=units / (job.n * ACCURACY_SCALE),
        predicted_latency_ms=job.predicted_us / 1000.0,
        measured_latency_ms=job.measured_us / 1000.0,
        completion_ms=completion_ms,
        strategies=strategies,
        queue_ms=(job.started - job.arrival) * 1000.0,
        reason=reason,
        deadline_met=None if deadline_ms is None else completion_ms <= deadline_ms,
        escalated=escalated,
        id=f"{_token}-{job.id}",
    )
