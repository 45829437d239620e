"""Measuring a model: branch and fusion latency on this device, and accuracy per configuration."""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from mosel import trees
from mosel.bucketing import SizedRows, new_widths, padding_changes, repeat_rows
from mosel.calibrating import RowRecord, calibrate, top1
from mosel.compiling import compiled_parts, unwrap_compiled
from mosel.errors import InputError, MoselWarning, SLOError
from mosel.execution import execute
from mosel.plan import CostModel, Plan, PlannerConfig, build_plan, configuration_key
from mosel.profiles import (
    BucketKey,
    CostCheck,
    LatencyTable,
    Profile,
    cost_model_of,
    fingerprint_of,
    model_device,
    plan_buckets,
)
from mosel.requests import check_inputs
from mosel.runtime import attach
from mosel.schema_recorder import SchemaRecorder
from mosel.spec import ModelSpec, spec_of
from mosel.timing import NewWidths, Timings, default_sizes, progress
from mosel.timing import Timer as _Timer
from mosel.timing import central as _central
from mosel.trees import Tree

__all__ = ["Metric", "profile", "top1"]

Configuration = frozenset[str]
Metric = Callable[[Tensor, Any], Tensor]
"""``metric(output, target) -> per-request scores`` in [0, 1], shape (batch,)."""

T = TypeVar("T")
_log = logging.getLogger("mosel")

COST_CHECK_WARN = 0.25
"""Warn when the cost model's median relative error over the checks exceeds this."""
SIZED_CHECKS = 2
"""End-to-end cost checks at each size bucket other than the reference (none with ``cost_checks=0``)."""
THREADS_GAIN = 0.8
"""A profile timed at another thread count than the caller's is kept when its checks err this much less."""


def _split_batch(item: object) -> tuple[Mapping[str, Tensor], Any]:
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], Mapping):
        raise InputError(
            f"validation data must yield (inputs: dict[str, Tensor], target) pairs, got {type(item).__name__}"
        )
    return item[0], item[1]


def _checked_sum(scores: object, rows: int, metric: Metric, configuration: str) -> float:
    """Sum of one batch of metric scores, after checking there is one finite score in [0, 1] per row."""
    name = getattr(metric, "__qualname__", None) or repr(metric)
    if not isinstance(scores, Tensor) or scores.shape[:1] != (rows,) or scores.numel() != rows:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise InputError(
            f"metric {name} must return a tensor of one score per request, shape ({rows},), "
            f"got {shape} for configuration {configuration!r}"
        )
    if scores.is_complex():
        raise InputError(
            f"metric {name} returned complex scores ({scores.dtype}) for configuration {configuration!r}; "
            f"return real per-request scores in [0, 1]"
        )
    values = scores.detach().to(torch.float64)
    bad = ~torch.isfinite(values) | (values < 0) | (values > 1)
    if bool(bad.any()):
        value = float(values[bad][0])
        raise InputError(
            f"metric {name} scored a request {value} under configuration {configuration!r}; a metric must "
            f"return per-request scores in [0, 1] (e.g. 1.0 for a correct answer, 0.0 for a wrong one)"
        )
    return float(values.sum())


def _accuracy(
    model: nn.Module,
    spec: ModelSpec,
    data: Iterable[object],
    metric: Metric,
    device: torch.device,
    show: bool,
    schema: SchemaRecorder | None = None,
    sized: SizedRows | None = None,
    rows_seen: RowRecord | None = None,
) -> tuple[dict[Configuration, float], int, dict[str, Tree]]:
    """Accuracy of every configuration; each branch runs once per batch, its features reused.

    Also returns the first batch. ``schema`` observes every batch and watches the branches'
    embedding lookups; ``sized`` sorts the sized modalities' rows into their size buckets;
    ``rows_seen`` keeps every row's score and confidences (for escalation's calibration).
    """
    fuse = getattr(model, spec.fusion)
    totals = dict.fromkeys(spec.configurations, 0.0)
    count = 0
    sample: dict[str, Tree] | None = None
    total = len(data) if isinstance(data, Sequence) else None
    compiled = set(compiled_parts(model))
    first = True
    for item in progress(data, total, "mosel: accuracy", show):
        inputs, target = _split_batch(item)
        missing = [m for m in spec.modalities if inputs.get(m) is None]
        if missing:
            raise InputError(f"validation inputs must hold every modality; missing {missing}")
        batch, _, rows = check_inputs(inputs, spec, device)
        if schema is not None:
            schema.observe(batch)
        if sample is None:
            sample = batch
        if sized is not None:
            sized.observe(batch)
        if schema is not None and first:
            _watch_embeddings(model, spec, batch, schema, compiled)
            first = False
        features = {m: getattr(model, spec.branches[m])(batch[m]) for m in spec.modalities}
        for config in spec.configurations:
            output, scores = _scored(fuse, features, config, metric, target, spec)
            totals[config] += _checked_sum(scores, rows, metric, configuration_key(config, spec.modalities))
            if rows_seen is not None:
                rows_seen.observe(model, config, output, scores)
        count += rows
    if sample is None or count == 0:
        raise InputError("validation data is empty; pass at least one (inputs, target) batch")
    return {c: totals[c] / count for c in spec.configurations}, count, sample


def _scored(
    fuse: Callable[[Mapping[str, Tree]], Tree],
    features: Mapping[str, Tree],
    config: Configuration,
    metric: Metric,
    target: Any,
    spec: ModelSpec,
) -> tuple[Tree, Any]:
    """A configuration's output on a batch's features, and the metric's scores of it."""
    try:
        output = fuse({m: features[m] for m in config})
        return output, metric(output, target)
    except Exception as exc:
        name = getattr(metric, "__qualname__", repr(metric))
        raise InputError(
            f"metric {name} failed on configuration "
            f"{configuration_key(config, spec.modalities)!r}: {type(exc).__name__}: {exc}; "
            f"check that the targets have one entry per request of the batch"
        ) from exc


def _watch_embeddings(
    model: nn.Module, spec: ModelSpec, batch: Mapping[str, Tree], schema: SchemaRecorder, compiled: set[str]
) -> None:
    """Run each branch once more on ``batch``, eagerly, for ``schema`` to see its embedding lookups.

    A call of its own, its output dropped: the watch (a torch function mode) turns off fast paths
    such as ``nn.TransformerEncoder``'s nested tensors, which must not change the accuracy measured,
    and it cannot run inside compiled code.
    """
    for m in spec.modalities:
        name = spec.branches[m]
        branch = getattr(type(model), name).__get__(model) if name in compiled else getattr(model, name)
        with schema.watch(m, batch[m]):
            branch(batch[m])


def profile(
    model: nn.Module,
    data: Iterable[Any],
    *,
    metric: Metric | None = None,
    max_batch_size: int = 32,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 2,
    repeats: int = 7,
    cost_checks: int = 12,
    planner: PlannerConfig | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    escalation: bool = True,
) -> Profile:
    """Profile ``model`` on its device and validation ``data``, plan, and attach the result.

    Args:
        model: an instance of a ``@mosel.multimodal`` class, in eval mode, on its serving device.
        data: iterable of ``(inputs, target)`` pairs; ``inputs`` maps every modality to a batch.
        metric: per-request score, ``metric(output, target) -> Tensor (batch,)``; default top-1.
        max_batch_size: largest job size profiled and planned; larger jobs are split.
        batch_sizes: sizes to time (others interpolated); default every size up to 32, a
            geometric grid beyond.
        warmup: untimed runs before each measurement.
        repeats: timed rounds over every (callable, batch size); the 10th percentile (robust
            to a busy host: interference only adds time) and the p95 are kept. When the end-to-end
            checks disagree with the tables by more than 25% (median), every table is timed
            for ``repeats`` more rounds and the checks are re-run, up to twice.
        cost_checks: end-to-end runs of strategies (mixed ones first) compared with the
            prediction; the warning below is based on them.
        threads: torch intra-op threads while profiling (restored after). Default: the current
            setting, and when the checks at it disagree with the tables by more than 25%
            (typically a busy host: more threads than free cores make timings erratic), every
            table is timed again at one thread and the thread count that predicts better is
            kept, with a warning saying which. The fingerprint records the count: serve with
            it (``torch.set_num_threads``; attach warns when it differs). A count given here is
            kept as it is.
        planner: CP-SAT planner settings.
        progress: show progress bars (tqdm); default: when stderr is a terminal.
        escalation: calibrate per-row escalation (:mod:`mosel.escalation`) when the outputs
            have a confidence signal (``@mosel.confidence``, or class logits) and there are at
            least 200 validation rows (a warning below 1,000; 2,000 or more recommended).
            False: no calibration, no chain.

    Returns:
        The :class:`Profile`, also attached to ``model``.
    """
    model = unwrap_compiled(model)
    spec = spec_of(model)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise SLOError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    sizes = sorted({1, max_batch_size, *(batch_sizes or default_sizes(max_batch_size))})
    if sizes[0] < 1 or sizes[-1] > max_batch_size:
        raise ValueError(f"batch_sizes must lie in 1..{max_batch_size}, got {list(batch_sizes or [])}")
    if model.training:
        warnings.warn(
            f"{type(model).__qualname__} is in training mode; call model.eval() before profiling "
            f"(dropout and batch norm change accuracy and latency)",
            MoselWarning,
            stacklevel=2,
        )
    show = sys.stderr.isatty() if progress is None else progress
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int (torch intra-op threads), got {threads!r}")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        settings = _Settings(
            max_batch_size, sizes, warmup, repeats, cost_checks, planner, show, threads is None, escalation
        )
        return _profile(model, spec, data, metric, settings)
    finally:
        torch.set_num_threads(saved_threads)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What :func:`profile` was asked for."""

    max_batch_size: int
    sizes: list[int]
    warmup: int
    repeats: int
    cost_checks: int
    planner: PlannerConfig | None
    show: bool
    auto_threads: bool
    escalation: bool = True


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """The tables of one thread count's timings, the plan built from them, and its checks.

    ``branch`` prices new widths for the unpadded sized modalities; ``raw`` is the cost
    model without them (what the rounds' own, repeated widths cost: the checks at those).
    """

    threads: int
    timings: Timings
    branch: dict[str, LatencyTable]
    fusion: dict[Configuration, LatencyTable]
    raw: CostModel
    plan: Plan
    checks: tuple[CostCheck, ...]

    @property
    def error(self) -> float:
        """The checks' median relative error (0 without checks)."""
        errors = [abs(c.relative_error) for c in self.checks]
        return statistics.median(errors) if errors else 0.0


def _profile(
    model: nn.Module, spec: ModelSpec, data: Iterable[Any], metric: Metric | None, settings: _Settings
) -> Profile:
    device = model_device(model)
    timer = _Timer(device, settings.warmup, settings.repeats)
    started = time.perf_counter()
    schema = SchemaRecorder(spec)
    most = settings.max_batch_size
    rows = SizedRows(spec, most)
    record = RowRecord(spec) if settings.escalation else None
    with torch.inference_mode():
        accuracy, samples, sample = _accuracy(
            model, spec, data, metric or top1, device, settings.show, schema, rows, record
        )
        notes = padding_changes(model, spec, sample)
        unreached = rows.unreached_warning(spec.model_class)
        notes += [unreached] if unreached else []
        big = {
            m: rows.timing_input(m, rows.reference[m])
            if m in rows.reference
            else repeat_rows(x, most, spec.batch_dim(m))
            for m, x in sample.items()
        }
        by_size = {m: {e: rows.timing_input(m, e) for e in rows.reached(m)[1:]} for m in spec.sizings}

        def timings() -> Timings:
            made = Timings(model, spec, big, by_size, rows.reference, settings.sizes, most)
            made.warm_up(settings.warmup)
            return made

        best, tried, factors = _measure(model, spec, rows, timings, timer, accuracy, settings)
        padded = {m: rows.padded(m) for m in spec.sizings}
        sized = best.timings.sized(factors, padded, {m: rows.widths(m) for m in spec.sizings})
        partial = plan_buckets(
            Profile(
                modalities=spec.modalities,
                max_batch_size=most,
                branch_latency=MappingProxyType(best.branch),
                fusion_latency=MappingProxyType(best.fusion),
                accuracy=MappingProxyType(accuracy),
                sample_count=samples,
                fingerprint=fingerprint_of(model, spec.model_class),  # at the thread count kept
                cost_checks=best.checks,
                plan=best.plan,
                sized=MappingProxyType(sized),
                eager_latency=MappingProxyType(best.timings.eager()),
            ),
            settings.planner,
        )
        count = min(SIZED_CHECKS, settings.cost_checks)
        checks = best.checks + _bucket_checks(model, spec, partial, best, rows, big, timer, count)
        calibration, more = (
            calibrate(model, spec, record, big, most, partial.cost_model())
            if record is not None
            else (None, [])
        )
        notes += more
        profiled_s = time.perf_counter() - started
    result = dataclasses.replace(
        partial, cost_checks=checks, input_schema=MappingProxyType(schema.schema()), calibration=calibration
    )
    for note in notes:
        warnings.warn(note, MoselWarning, stacklevel=3)
    _warn_costs(spec, result, tried, factors)
    _log.info(
        "profiled %s: %d sizes, %.1f s measuring, %.2f s planning (exact=%s)",
        spec.model_class,
        len(settings.sizes),
        profiled_s,
        best.plan.build_seconds,
        best.plan.exact,
    )
    attach(model, result)
    return result


def _measure(
    model: nn.Module,
    spec: ModelSpec,
    rows: SizedRows,
    timings: Callable[[], Timings],
    timer: _Timer,
    accuracy: Mapping[Configuration, float],
    settings: _Settings,
) -> tuple[_Attempt, list[tuple[int, float]], dict[str, NewWidths]]:
    """Time every table, plan and check, in up to three runs of ``repeats`` rounds.

    When the checks fail (median error above :data:`COST_CHECK_WARN`), the next run times fresh
    tables at one thread if allowed and not tried yet (a busy host), else adds rounds to the
    thread count that predicted best. Returns the attempt kept (the best; torch is left at its
    thread count), the median error of each run in order (its thread count too), and the
    cost of new widths of the unpadded sized modalities.
    """
    current = timings()
    factors: dict[str, NewWidths] | None = None
    kept: dict[int, _Attempt] = {}
    tried: list[tuple[int, float]] = []
    for run in range(3):
        current.measure(timer, settings.repeats, settings.show)
        if factors is None:  # once: a width is new only the first time
            factors = new_widths(model, spec, rows, settings.sizes, timer.once)
        threads = torch.get_num_threads()
        attempt = kept[threads] = _evaluate(model, spec, current, threads, factors, accuracy, timer, settings)
        tried.append((threads, attempt.error))
        if attempt.error <= COST_CHECK_WARN or run == 2:
            break
        if settings.auto_threads and threads > 1 and 1 not in kept:
            _log.info(
                "cost checks off by %.0f%% at %d threads; timing every table at 1",
                100 * attempt.error,
                threads,
            )
            torch.set_num_threads(1)
            current = timings()
            continue
        best = _best(kept, tried[0][0])
        _log.info("cost checks off by %.0f%% (median); timing every table again", 100 * attempt.error)
        torch.set_num_threads(best.threads)
        current = best.timings
    best = _best(kept, tried[0][0])
    torch.set_num_threads(best.threads)
    return best, tried, factors or {}


def _best(kept: Mapping[int, _Attempt], first: int) -> _Attempt:
    """The attempt whose checks erred least; the caller's thread count unless another errs 20% less.

    Serving at another thread count than the process's is a burden on the user: a marginal gain
    (noise, on a busy host) does not justify it.
    """
    best = min(kept.values(), key=lambda a: a.error)
    return kept[first] if best.error >= THREADS_GAIN * kept[first].error else best


def _evaluate(
    model: nn.Module,
    spec: ModelSpec,
    timings: Timings,
    threads: int,
    factors: Mapping[str, NewWidths],
    accuracy: Mapping[Configuration, float],
    timer: _Timer,
    settings: _Settings,
) -> _Attempt:
    """The tables of the samples so far, their plan, and the checks at the timed widths."""
    raw_branch, fusion = timings.tables()
    branch = {m: factors[m].priced(t) if m in factors else t for m, t in raw_branch.items()}
    cost = cost_model_of(spec.modalities, branch, fusion, accuracy)
    raw = cost if branch == raw_branch else cost_model_of(spec.modalities, raw_branch, fusion, accuracy)
    plan = build_plan(cost, settings.planner)
    checks = _check_costs(model, spec, plan, timings.big, timer, settings.cost_checks, (), raw)
    return _Attempt(threads, timings, branch, fusion, raw, plan, checks)


def _bucket_checks(
    model: nn.Module,
    spec: ModelSpec,
    profile: Profile,
    best: _Attempt,
    rows: SizedRows,
    big: Mapping[str, Tree],
    timer: _Timer,
    count: int,
) -> tuple[CostCheck, ...]:
    """``count`` checks at every other combination of measured size buckets.

    At a bucket with a width held out (an unpadded modality), the checks run once each at it,
    never run before, against the tables at new widths (``fresh``); otherwise at
    the bucket's timed widths against the tables without them.
    """
    raw_branch, _ = best.timings.tables()
    raw = dataclasses.replace(
        profile,
        branch_latency=MappingProxyType(raw_branch),
        sized=MappingProxyType(best.timings.sized({}, {}, {})),
    )
    checks: list[CostCheck] = []
    for key in (profile.reference_bucket, *profile.sized_plans):
        inputs = dict(big)
        held: dict[str, list[Tree]] = {}
        for m, edge in zip(profile.sized, key, strict=True):
            held[m] = rows.held_out(m, edge)
            if edge != rows.reference[m]:
                inputs[m] = rows.timing_input(m, edge)
        widths = max(len(h) for h in held.values()) if held else 0
        fresh = [inputs | {m: h[i % len(h)] for m, h in held.items() if h} for i in range(widths)]
        if key == profile.reference_bucket and not fresh:
            continue  # checked with the tables
        plan = profile.priced_at(key)[0]
        predict = profile.cost_at(key) if fresh else raw.cost_at(key)
        checks += _check_costs(model, spec, plan, inputs, timer, count, key, predict, fresh)
    return tuple(checks)


def _warn_costs(
    spec: ModelSpec,
    profile: Profile,
    tried: list[tuple[int, float]],
    factors: Mapping[str, NewWidths],
) -> None:
    """One warning: the thread count changed, the checks fail, or new widths are mispriced."""
    errors = [abs(c.relative_error) for c in profile.cost_checks]
    error = statistics.median(errors) if errors else 0.0
    fresh = [abs(c.relative_error) for c in profile.cost_checks if c.fresh]
    parts = []
    kept = profile.fingerprint.threads
    if len({threads for threads, _ in tried}) > 1:
        first, first_error = tried[0]
        one = next(e for t, e in reversed(tried) if t == 1)
        parts.append(
            f"its cost checks at {first} threads were off by {first_error:.0%} (median), as on a busy "
            f"host; timed again at 1 thread they were off by {one:.0%}. The profile kept was timed at "
            f"{kept} thread{'s' if kept > 1 else ''} (fingerprint.threads): serve with "
            f"torch.set_num_threads({kept}) (attach warns when the count differs)"
        )
    if error > COST_CHECK_WARN:
        hint = "" if len(tried) > 1 and any(t == 1 for t, _ in tried) else ", pass threads=1 (a busy host)"
        parts.append(
            f"the cost model predicts end-to-end latency with a median error of {error:.0%} over "
            f"{len(errors)} checks (timed at {kept} thread{'s' if kept > 1 else ''}); deadlines may be "
            f"missed. Profile on an idle machine{hint}, or raise repeats"
        )
    if fresh and statistics.median(fresh) > COST_CHECK_WARN:
        measured = {m: w.span() for m, w in factors.items()}
        parts.append(
            f"at input widths the branches never ran at, {len(fresh)} checks are off by "
            f"{statistics.median(fresh):.0%} (median; a new width costs {measured} of a repeated one): "
            f"declare pad=mosel.Padding(...) on the sized modalities so that jobs are padded to their "
            f"bucket's edge and shapes repeat"
        )
    if parts:
        warnings.warn(f"profiling {spec.model_class}: {'; '.join(parts)}", MoselWarning, stacklevel=4)


def _check_costs(
    model: nn.Module,
    spec: ModelSpec,
    plan: Plan,
    big: Mapping[str, Tree],
    timer: _Timer,
    count: int,
    bucket: BucketKey = (),
    predict: CostModel | None = None,
    fresh: Sequence[Mapping[str, Tree]] = (),
) -> tuple[CostCheck, ...]:
    """Time a few strategies end to end (mixed ones first) against their predicted latency.

    ``predict``: the cost model predicting them (default: the plan's own latencies). With
    ``fresh`` inputs (at widths no branch ran at before), the i-th strategy runs once, at the
    i-th of them (strategies share shapes: at one width, only the first would meet new ones),
    instead of at ``big`` after the timer's warm-up; at most one check per fresh input.
    """
    count = min(count, len(fresh)) if fresh else count
    if count <= 0:
        return ()
    everything = frozenset(spec.modalities)
    candidates = []
    for n in sorted(
        {plan.max_batch_size, max(1, plan.max_batch_size // 2), max(1, plan.max_batch_size // 4)},
        reverse=True,
    ):
        strategies = plan.frontier(everything, n).strategies
        mixed = [s for s in strategies if len(s.groups) > 1]
        pure = [s for s in strategies if len(s.groups) == 1]
        picks = [mixed[len(mixed) // 2], mixed[0], mixed[-1]] if mixed else []
        candidates += picks + pure[-1:]
    checks: list[CostCheck] = []
    seen = set()
    for strategy in candidates:
        if strategy in seen:
            continue
        seen.add(strategy)
        inputs = fresh[len(checks)] if fresh else big
        rows = {m: trees.take(x, slice(0, strategy.n), spec.batch_dim(m)) for m, x in inputs.items()}
        call = functools.partial(execute, model, spec, strategy, rows)
        samples = [timer.once(call)] if fresh else timer(call)
        predicted = strategy.latency_us if predict is None else predict.latency_us(strategy.groups)
        checks.append(CostCheck(strategy.groups, float(predicted), _central(samples), bucket, bool(fresh)))
        if len(checks) >= count:
            break
    return tuple(checks)
