"""One HTTP front door for a mosel model: a FastAPI router, served alone or mounted (e.g. on Ray Serve).

Needs the ``http`` extra (``pip install 'mosel[http]'``: FastAPI, pydantic, prometheus-client);
``import mosel`` never imports this module.

::

    app = mosel.http.create_app(model)                  # a FastAPI app; its lifespan closes the model
    router = mosel.http.create_router(model)            # or mount the routes in your own app
    app = mosel.http.create_app(lambda: load_model())   # a model that exists only later (a replica)

Routes: ``POST /predict``, ``GET /metrics`` (Prometheus text), ``GET /healthz`` (alive),
``GET /readyz`` (a profile is attached and still fits the model). The request handling lives in
:class:`Service`, which holds only its model (or a function returning it), so any number of
apps, routers or Ray Serve replicas can each serve their own model. ``docs/http.md`` describes
the headers, bodies and status codes, and ``docs/failures.md`` what each fault at the front door
does: a deadline counts from the request's arrival at the handler (receiving and decoding the
body are charged), a body over ``max_body_bytes`` is refused (413) before it is read, large
bodies are decoded on a bounded worker pool, a client that disconnects has its queued job
withdrawn, and non-finite inputs are refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import optree
import torch
from torch import Tensor, nn

try:
    from fastapi import APIRouter, FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mosel.http needs the http extra: pip install 'mosel[http]'") from exc

import mosel
from mosel import trees
from mosel.errors import (
    AccuracyUnreachableError,
    DeadlineError,
    InputError,
    MoselError,
    NotProfiledError,
    ProfileMismatchError,
    QueueFullError,
    ShutdownError,
    SLOError,
)
from mosel.execution import Result
from mosel.runtime import close, profile_of, prometheus_collector, readiness, settle, submit_now
from mosel.schema import LeafSchema, ModalitySchema, decode
from mosel.spec import spec_of
from mosel.stats import BUCKETS_MS, Histogram
from mosel.trees import Tree

__all__ = [
    "CLOSED",
    "CONFIDENCE",
    "DEADLINE_AT",
    "DECODE_STEP",
    "DEADLINE_MS",
    "MIN_ACCURACY",
    "REQUEST_START",
    "Budget",
    "ErrorBody",
    "HTTP_EVENTS",
    "Health",
    "MAX_BODY_BYTES",
    "ModelSource",
    "PredictRequest",
    "PredictResponse",
    "Readiness",
    "Service",
    "charge",
    "create_app",
    "create_router",
    "decode_inputs",
    "encode_output",
    "error_status",
    "prediction_of",
    "readiness",
]

DEADLINE_MS: Final = "X-Deadline-Ms"
"""Header: the job's deadline in milliseconds, counted from ``X-Request-Start`` when given."""
MIN_ACCURACY: Final = "X-Min-Accuracy"
"""Header: the floor on the job's expected accuracy, in [0, 1]."""
CONFIDENCE: Final = "X-Confidence"
"""Header: plan the floor against each configuration's lower bound at this confidence (e.g. 0.95)."""
REQUEST_START: Final = "X-Request-Start"
"""Header: when the request entered the system upstream, wall-clock epoch (see :func:`charge`)."""
DEADLINE_AT: Final = "X-Deadline-At"
"""Header: the absolute wall-clock epoch at which the request's deadline passes."""

OVERLOAD: Final = (DeadlineError, QueueFullError, ShutdownError)
"""Errors answered 503 with a ``Retry-After``: the model is busy (or closed), retry later or elsewhere."""
LARGE_BODY: Final = 256 * 1024
"""Bodies larger than this (bytes) are parsed and decoded on the service's decode pool, off the event loop."""
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
"""The default limit on a ``/predict`` body (8 MiB): a larger one is answered 413 unread.

Parsing JSON and turning its lists into tensors hold Python's GIL (single C calls), on the order
of 20-40 ms per MB on one core: the limit also bounds how long one body can delay the event loop.
"""
DECODE_STEP: Final = 1 << 16
"""About how many numbers of a large input are turned into a tensor at a time (see :func:`decode_inputs`)."""
HTTP_EVENTS: Final = (
    "served_on_time",
    "served_late",
    "served_without_deadline",
    "deadline_spent_receiving",
    "client_gone_before_submit",
    "client_gone_withdrawn",
    "client_gone_running",
)
"""The events ``/metrics`` counts at the front door (``mosel_http_events_total{event=...}``).

``served_on_time``/``served_late``: answers 200 whose ``deadline_met`` was true/false (measured
at the handler: from the request's arrival until its response was handed to the server);
``deadline_spent_receiving``: answered 503 ``DeadlineError`` because receiving and decoding
the body used the whole deadline (nothing computed); ``client_gone_*``: the client disconnected
before its job was submitted, while it was queued (withdrawn, never computed), or while it ran
(it finished, its answer dropped).
"""
CLOSED: Final = "the service is closed (Service.close(), or its app shut down); it takes no new requests"
"""Why a closed :class:`Service` answers ``/predict`` 503 ``ShutdownError`` and ``/readyz`` not ready."""

ModelSource: TypeAlias = "nn.Module | Callable[[], nn.Module]"
"""A model, or a function that returns it when a request needs it (built later, e.g. on a replica)."""


class PredictRequest(BaseModel):
    """The body of ``POST /predict``."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(
        description=(
            "modality name -> its requests: a (nested) list of numbers or booleans (one tensor, "
            "requests along the modality's batch dimension), or an object of such lists for a "
            "structured modality, e.g. {'text': {'input_ids': [[...]], 'attention_mask': [[...]]}}. "
            "A modality left out is not computed."
        ),
    )
    deadline_ms: float | None = Field(
        None, description="deadline in ms from the request's arrival (or X-Request-Start); > 0"
    )
    min_accuracy: float | None = Field(None, description="floor on the expected accuracy, in [0, 1]")
    confidence: float | None = Field(
        None, description="plan the floor against lower confidence bounds of accuracy, in (0, 1)"
    )
    per_request: bool = Field(False, description="every request's configuration meets the floor")
    best_effort: bool = Field(False, description="serve late instead of answering 503 to a doomed deadline")
    present: dict[str, list[bool]] | None = Field(
        None, description="modality -> one boolean per request: which requests really have it"
    )


class PredictResponse(BaseModel):
    """The answer of ``POST /predict`` (200)."""

    outputs: Any = Field(description="the fusion output, one row per request: nested lists (or objects)")
    prediction: list[Any] | None = Field(
        description="argmax over the last dimension of a floating output of rank >= 2, else null"
    )
    modalities: list[list[str]] = Field(description="per request, the modalities computed for it")
    expected_accuracy: float
    predicted_latency_ms: float
    measured_latency_ms: float
    queue_ms: float | None = Field(description="arrival at the model to dispatch")
    received_ms: float = Field(
        description="arrival at this service to the job's submission: receiving, parsing, decoding the body"
    )
    completion_ms: float = Field(description="arrival at this service to the response handed to the server")
    deadline_met: bool | None = Field(
        description="completion_ms <= deadline_ms: the answer left within the deadline; null without one"
    )
    reason: str | None = Field(description="why the job was served below its best strategy, or null")
    upstream_ms: float = Field(description="time spent before this service, charged to the deadline")
    deadline_ms: float | None = Field(
        description=(
            "the deadline from the arrival at this service, after the upstream charge; the model was given "
            "what was left after receiving and decoding"
        )
    )


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="the mosel error class, e.g. DeadlineError (another name for a 500)")
    detail: str


class Health(BaseModel):
    """``GET /healthz``: the process answers."""

    status: str = "alive"


class Readiness(BaseModel):
    """``GET /readyz``."""

    ready: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """One request's SLO after charging the time spent upstream (see :func:`charge`).

    Attributes:
        deadline_ms: what is left of the deadline for the model (None: no deadline).
        min_accuracy: the floor (None: none).
        confidence: the confidence of the floor's bounds (None: plan on means).
        upstream_ms: time since ``X-Request-Start`` (0 without it).
    """

    deadline_ms: float | None
    min_accuracy: float | None
    confidence: float | None
    upstream_ms: float


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SLOError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise SLOError(f"{name} must be finite, got {text!r}")
    return value


def _epoch_s(name: str, text: str) -> float:
    """Wall-clock epoch seconds; milliseconds and microseconds are told apart by magnitude."""
    value = _number(name, text.strip().removeprefix("t="))
    if value <= 0:
        raise SLOError(f"{name} must be a positive wall-clock epoch time, got {text!r}")
    if value > 1e14:  # microseconds (1e14 s would be millions of years from now)
        return value / 1e6
    if value > 1e11:  # milliseconds (1e11 s is the year 5138)
        return value / 1e3
    return value


def _stricter(a: float | None, b: float | None, pick: Callable[[float, float], float]) -> float | None:
    """The stricter of two objectives; a NaN wins (min/max would drop it), so validation refuses it."""
    if a is None or b is None:
        return b if a is None else a
    return a if math.isnan(a) else b if math.isnan(b) else pick(a, b)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return headers.get(name.lower()) if value is None else value


def charge(headers: Mapping[str, str], body: PredictRequest, now_s: float) -> Budget:
    """The request's SLO from its headers and body, with the time spent upstream charged.

    The SLO is read from ``X-Deadline-Ms``, ``X-Min-Accuracy``, ``X-Confidence`` and the body
    fields of the same meaning; when both give one, the stricter applies. ``X-Request-Start``
    (when the request entered the system: a load balancer, a router) and ``X-Deadline-At``
    (when its deadline passes) are wall-clock epoch times in seconds, as ``time.time()`` and
    nginx's ``t=${msec}`` write them (a ``t=`` prefix is accepted; values in milliseconds or
    microseconds are recognised by their magnitude). The deadline left for the model is
    ``deadline_ms - (now - X-Request-Start)``, and at most ``X-Deadline-At - now``. Clocks of
    different hosts must agree (NTP); a start in the future counts as no time upstream.

    Args:
        headers: the request's headers (a case-insensitive mapping, or lower-case names).
        body: the parsed body.
        now_s: the arrival time, ``time.time()``.

    Raises:
        SLOError: a header is not a valid number, or the deadline is not positive.
        DeadlineError: the budget was spent upstream (a doomed request).
    """
    values: dict[str, float | None] = {}
    for name in (DEADLINE_MS, MIN_ACCURACY, CONFIDENCE):
        text = _header(headers, name)
        values[name] = None if text is None else _number(name, text)
    given = _stricter(values[DEADLINE_MS], body.deadline_ms, min)
    if given is not None and not (math.isfinite(given) and given > 0):
        raise SLOError(f"the deadline must be a positive finite number of milliseconds, got {given!r}")
    start = _header(headers, REQUEST_START)
    upstream_ms = 0.0 if start is None else max(0.0, (now_s - _epoch_s(REQUEST_START, start)) * 1000.0)
    left = None if given is None else given - upstream_ms
    at = _header(headers, DEADLINE_AT)
    if at is not None:
        left = _stricter(left, (_epoch_s(DEADLINE_AT, at) - now_s) * 1000.0, min)
    if left is not None and left <= 0:
        raise DeadlineError(
            f"the deadline passed before the request reached the model ({upstream_ms:.1f} ms upstream"
            + (f" of a {given:g} ms deadline" if given is not None else "")
            + (f", {DEADLINE_AT} {at}" if at is not None else "")
            + ")",
            deadline_ms=given if given is not None else 0.0,
            predicted_ms=upstream_ms,
            best_accuracy_within_deadline=None,
        )
    return Budget(
        deadline_ms=left,
        min_accuracy=_stricter(values[MIN_ACCURACY], body.min_accuracy, max),
        confidence=_stricter(values[CONFIDENCE], body.confidence, max),
        upstream_ms=upstream_ms,
    )


def _decode(modality: str, value: Any, schema: ModalitySchema | None, finite: bool) -> Tree:
    """:func:`mosel.schema.decode` (non-finite values refused with ``finite``), a few rows at a time.

    Turning a JSON list into a tensor is one C call that holds Python's GIL throughout; a large
    input is decoded in steps of about :data:`DECODE_STEP` numbers, so that the event loop (and
    ``/healthz``) runs in between. A value that does not decode is decoded again whole, for the
    error to describe the whole value.
    """
    chunks = _row_chunks(value, schema)
    if chunks is None:
        return decode(modality, value, schema, finite=finite)
    try:
        return trees.concat([decode(modality, chunk, schema, finite=finite) for chunk in chunks])
    except (ValueError, TypeError, RuntimeError):  # InputError, TreeError: the whole value says why
        return decode(modality, value, schema, finite=finite)


def _numbers(row: Any) -> int:
    """How many numbers one (rectangular) row of a JSON tensor holds, read along its first elements."""
    count = 1
    while isinstance(row, list):
        count *= len(row)
        row = row[0] if row else None
    return count


def _row_chunks(value: Any, schema: ModalitySchema | None) -> list[Any] | None:
    """``value`` in slices of rows of about :data:`DECODE_STEP` numbers, or None to decode it whole.

    Only where the rows are plain to find: a schema whose batch dimension is the first, and a
    bare tensor (a list of rows) or an object of tensors (each a list of rows, as many each).
    """
    if schema is None or schema.batch_dim != 0:
        return None
    if isinstance(value, list) and [leaf.path for leaf in schema.leaves] == [()]:
        rows, numbers = len(value), _numbers(value[0]) if value else 1
        return None if rows * numbers <= DECODE_STEP else _slices(value, rows, numbers)
    if (
        isinstance(value, dict)
        and all(len(leaf.path) == 1 and isinstance(leaf.path[0], str) for leaf in schema.leaves)
        and value
        and all(isinstance(v, list) for v in value.values())
        and len({len(v) for v in value.values()}) == 1
    ):
        parts: dict[str, list[Any]] = value
        rows = len(next(iter(parts.values())))
        numbers = sum(_numbers(v[0]) for v in parts.values()) if rows else 1
        if rows * numbers <= DECODE_STEP:
            return None
        step = max(1, DECODE_STEP // max(numbers, 1))
        return [{k: v[i : i + step] for k, v in parts.items()} for i in range(0, rows, step)]
    return None


def _slices(rows: list[Any], count: int, numbers: int) -> list[Any]:
    step = max(1, DECODE_STEP // max(numbers, 1))
    return [rows[i : i + step] for i in range(0, count, step)]


def decode_inputs(
    model: nn.Module,
    inputs: Mapping[str, Any],
    schema: Mapping[str, ModalitySchema],
    *,
    allow_non_finite: bool = False,
) -> dict[str, Tree]:
    """The JSON ``inputs`` of a request as tensors, each modality checked against ``schema``.

    A modality without a schema (a profile saved before schemas were recorded) takes its
    dtypes from the values (see :func:`mosel.schema.decode`). A NaN, an infinity, or a number
    beyond its leaf's float dtype (``1e39`` for float32) is refused unless ``allow_non_finite``.

    Raises:
        InputError: an unknown modality, or a value that does not fit (naming modality and leaf).
    """
    spec = spec_of(model)
    unknown = [m for m in inputs if m not in spec.branches]
    if unknown:
        raise InputError(f"unknown modality {unknown[0]!r}; {spec.model_class} takes {list(spec.modalities)}")
    finite = not allow_non_finite
    return {m: _decode(m, v, schema.get(m), finite) for m, v in inputs.items() if v is not None}


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value if math.isfinite(value) else None


def _tensor_json(t: Tensor) -> Any:
    t = t.detach().cpu()
    values = t.tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return _plain(values)  # JSON has no NaN or infinity: null
    return values


def encode_output(output: Tree) -> Any:
    """A fusion output as JSON: a tensor as nested lists (NaN and infinities as null), trees nested."""
    if isinstance(output, Tensor):
        return _tensor_json(output)
    return optree.tree_map(_tensor_json, output, none_is_leaf=False, namespace=trees.NAMESPACE)


def _null_where(values: Any, bad: Any) -> Any:
    if isinstance(bad, list):
        return [_null_where(v, b) for v, b in zip(values, bad)]
    return None if bad else values


def prediction_of(output: Tree) -> list[Any] | None:
    """The ``prediction`` of a response: argmax over the last dimension, per row.

    Only for a floating tensor of rank >= 2 (else None). A row (a vector along the last
    dimension) holding a NaN or an infinity has no definite argmax: its prediction is None.
    """
    if not (isinstance(output, Tensor) and output.dim() >= 2 and output.is_floating_point()):
        return None
    output = output.detach().cpu()
    prediction: list[Any] = output.argmax(dim=-1).tolist()
    bad = ~torch.isfinite(output).all(dim=-1)
    return _null_where(prediction, bad.tolist()) if bool(bad.any()) else prediction


def error_status(exc: BaseException) -> int:
    """The HTTP status of an error raised while serving a request.

    503 for overload and for a model that cannot serve now (a doomed deadline, a full queue, a
    closed scheduler, no fitting profile), 422 for an unreachable accuracy floor, 400 for bad
    inputs or SLO values, 500 for anything else (the model's own code failed).
    """
    if isinstance(exc, (*OVERLOAD, NotProfiledError, ProfileMismatchError)):
        return 503
    if isinstance(exc, AccuracyUnreachableError):
        return 422
    if isinstance(exc, (InputError, SLOError)):
        return 400
    return 500


def _drain_ms(model: nn.Module) -> float | None:
    """The model's predicted queue drain time, ``mosel.load(model).drain_ms`` (None if unknown)."""
    try:
        return float(mosel.load(model).drain_ms)
    except MoselError:
        return None


def _retry_after_s(model: nn.Module) -> int:
    """Seconds until the model's queue is predicted to have drained (at least 1)."""
    drain = _drain_ms(model)
    return 1 if drain is None or not math.isfinite(drain) else max(1, math.ceil(drain / 1000.0))


def _error(status: int, exc: BaseException, name: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": name or type(exc).__name__, "detail": str(exc)}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _failed(model: nn.Module, exc: BaseException, *, decoding: bool = False) -> JSONResponse:
    """The answer to an error raised while preparing (``decoding``) or serving a request."""
    status = error_status(exc)
    if decoding and status == 500 and isinstance(exc, (ValueError, TypeError)):
        return _error(400, exc, "InputError")  # what decoding raised on a value that does not fit
    headers = {"Retry-After": str(_retry_after_s(model))} if isinstance(exc, OVERLOAD) else {}
    return _error(status, exc, **headers)


_LATE_MS: Final = 1e-6
"""The deadline of a ``best_effort`` job whose deadline passed before it was submitted (served late)."""


class _TooLarge(Exception):
    """A body over the service's limit (answered 413 without reading the rest)."""


async def _disconnected(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Returns when the ASGI server says the client disconnected (``http.disconnect``).

    Called once the body has been read: nothing else is due on the channel until the response,
    so a server that sends anything else is not listened to further (this then never returns).
    """
    message = await receive()
    if message.get("type") != "http.disconnect":
        await asyncio.Event().wait()


def _follow_dtype(
    schema: Mapping[str, ModalitySchema], profiled: str, now: torch.dtype
) -> dict[str, ModalitySchema]:
    """``schema`` with the leaves profiled in the model's dtype (``profiled``) in its dtype ``now``."""
    name = str(now).removeprefix("torch.")
    return {
        m: ModalitySchema(
            s.batch_dim,
            tuple(
                LeafSchema(leaf.path, name, leaf.shape) if f"torch.{leaf.dtype}" == profiled else leaf
                for leaf in s.leaves
            ),
        )
        for m, s in schema.items()
    }


class _Counters:
    """The front door's own statistics (``mosel_http_*`` in ``/metrics``); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: dict[str, int] = dict.fromkeys(HTTP_EVENTS, 0)
        self.statuses: dict[int, int] = {}
        self.completion = Histogram()

    def event(self, name: str) -> None:
        with self._lock:
            self.events[name] += 1

    def answered(self, status: int) -> None:
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def served(self, met: bool | None, completion_ms: float) -> None:
        name = "served_without_deadline" if met is None else "served_on_time" if met else "served_late"
        with self._lock:
            self.events[name] += 1
            self.completion.observe(completion_ms)

    def collector(self, model_name: str) -> Any:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily  # noqa: PLC0415

        counters = self

        class Collector:
            def collect(self) -> Any:
                with counters._lock:
                    events = dict(counters.events)
                    statuses = dict(counters.statuses)
                    counts, total_ms = list(counters.completion.counts), counters.completion.sum_ms
                family = CounterMetricFamily(
                    "mosel_http_events",
                    "front-door events: answers on time or late as the client sees them, deadlines "
                    "spent receiving, clients gone",
                    labels=["model", "event"],
                )
                for name, value in events.items():
                    family.add_metric([model_name, name], value)
                yield family
                family = CounterMetricFamily(
                    "mosel_http_responses", "answers of /predict by HTTP status", labels=["model", "status"]
                )
                for status, value in sorted(statuses.items()):
                    family.add_metric([model_name, str(status)], value)
                yield family
                histogram = HistogramMetricFamily(
                    "mosel_http_completion_ms",
                    "served answers: arrival at the handler to the response handed to the server, ms",
                    labels=["model"],
                )
                cumulative, buckets = 0, []
                for le, count in zip((*BUCKETS_MS, math.inf), counts):
                    cumulative += count
                    buckets.append(("+Inf" if le == math.inf else str(le), cumulative))
                histogram.add_metric([model_name], buckets, total_ms)
                yield histogram

        return Collector()


def _closed() -> JSONResponse:
    """The answer of a closed service's ``/predict``: 503 ``ShutdownError``, retry elsewhere."""
    return _error(503, ShutdownError(CLOSED), **{"Retry-After": "1"})


def _validation_detail(exc: ValidationError) -> str:
    parts = []
    for item in exc.errors(include_url=False):
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "the body must be a JSON object {'inputs': {modality: lists}, ...}: " + "; ".join(parts)


class Service:
    """The request handling of the HTTP front door, for one model.

    Every route of :func:`create_router` calls one method here; a Ray Serve deployment class
    may hold a ``Service`` and call its methods from its own routes instead. Once closed
    (:meth:`close`), it serves no more: ``/predict`` answers 503 ``ShutdownError`` with a
    ``Retry-After`` and ``/readyz`` not ready (the model's scheduler is not restarted).

    Args:
        model: the model (profiled or attached), or a function returning it, called when a
            request needs it (a model built after the app, e.g. in a replica's constructor).
        input_schema: modality -> schema to decode inputs with, instead of the profile's
            (a synthetic profile has none).
        clock: wall-clock time in seconds (``time.time``), to charge upstream time with.
        max_body_bytes: the largest ``/predict`` body taken, in bytes; a larger one is answered
            413 before it is read (from its ``Content-Length``) or as soon as it grows past the
            limit (a chunked body).
        allow_non_finite: take NaN, infinities and values beyond a float leaf's range in inputs
            (refused with 400 ``InputError`` by default).
        decode_workers: threads that parse and decode bodies over 256 KiB, off the event loop;
            more large bodies wait their turn (their deadline counting), so they cannot take
            the threads other routes need.
        timer: a monotonic clock in seconds (``time.monotonic``), to measure the time since a
            request's arrival with.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        input_schema: Mapping[str, ModalitySchema] | None = None,
        clock: Callable[[], float] = time.time,
        max_body_bytes: int = MAX_BODY_BYTES,
        allow_non_finite: bool = False,
        decode_workers: int = 1,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
        if isinstance(decode_workers, bool) or not isinstance(decode_workers, int) or decode_workers < 1:
            raise ValueError(f"decode_workers must be a positive int, got {decode_workers!r}")
        self._source = model
        self._schema = input_schema
        self._clock = clock
        self._timer = timer
        self.max_body_bytes = max_body_bytes
        self.allow_non_finite = bool(allow_non_finite)
        self._workers = decode_workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._counters = _Counters()
        self._closed = False
        self._lock = threading.Lock()  # no job is admitted once close() has begun

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def model(self) -> nn.Module:
        """The served model (calling the function given for it, if any)."""
        if isinstance(self._source, nn.Module):
            return self._source
        return self._source()

    def schema(self, model: nn.Module) -> Mapping[str, ModalitySchema]:
        """The input schema requests are decoded with (the given one, else the profile's).

        The profile's is read when called (after a re-profile, the new profile's). Where the
        model's dtype is no longer the one it was profiled in (attached with
        ``on_stale="warn"``, then ``model.double()``), the leaves that had the model's dtype
        take its dtype now, so that inputs reach it in the dtype it computes in.
        """
        if self._schema is not None:
            return self._schema
        try:
            profile = profile_of(model)
        except NotProfiledError:
            return {}
        schema = profile.input_schema
        probe = next(itertools.chain(model.parameters(), model.buffers()), None)
        profiled = profile.fingerprint.dtype
        if probe is not None and probe.is_floating_point() and profiled and profiled != str(probe.dtype):
            return _follow_dtype(schema, profiled, probe.dtype)
        return schema

    def prepare(
        self, model: nn.Module, raw: bytes, headers: Mapping[str, str], now_s: float
    ) -> tuple[dict[str, Tree], dict[str, Tensor] | None, PredictRequest, Budget]:
        """Parse and decode one request: the inputs, presence masks, the body and the budget.

        A change of the model since ``attach`` is handled first (:func:`mosel.runtime.settle`:
        refused, warned about, or re-profiled in the background), so that the inputs are
        decoded with the schema of the profile that will serve them.

        Raises:
            InputError: the body is not valid JSON of the expected form, or inputs do not fit.
            SLOError: an SLO value is not valid.
            DeadlineError: the deadline was spent upstream.
            NotProfiledError, ProfileMismatchError: the model cannot serve now.
        """
        return self._prepare(model, raw, headers, now_s, None)

    def _prepare(
        self, model: nn.Module, raw: bytes, headers: Mapping[str, str], now_s: float, arrived: float | None
    ) -> tuple[dict[str, Tree], dict[str, Tensor] | None, PredictRequest, Budget]:
        """:meth:`prepare`; with ``arrived``, a deadline already spent is refused before decoding."""
        try:
            body = PredictRequest.model_validate_json(raw or b"null")
        except ValidationError as exc:
            raise InputError(_validation_detail(exc)) from None
        budget = charge(headers, body, now_s)
        if arrived is not None and budget.deadline_ms is not None and not body.best_effort:
            spent_ms = (self._timer() - arrived) * 1000.0
            if spent_ms >= budget.deadline_ms:  # e.g. a slow upload, or a wait for the decode pool
                raise self._spent(budget, spent_ms)
        settle(model)
        inputs = decode_inputs(model, body.inputs, self.schema(model), allow_non_finite=self.allow_non_finite)
        present = None
        if body.present is not None:
            present = {m: torch.tensor(v, dtype=torch.bool) for m, v in body.present.items()}
        return inputs, present, body, budget

    def _spent(self, budget: Budget, spent_ms: float) -> DeadlineError:
        """The error of a request whose deadline passed before its job could be submitted."""
        self._counters.event("deadline_spent_receiving")
        return DeadlineError(
            f"the deadline passed while the request was received and decoded ({spent_ms:.1f} ms since "
            f"its arrival, {budget.upstream_ms:.1f} ms upstream, {budget.deadline_ms:.1f} ms left at "
            f"arrival); nothing was computed. Send smaller bodies or a longer deadline",
            deadline_ms=budget.deadline_ms or 0.0,
            predicted_ms=spent_ms,
            best_accuracy_within_deadline=None,
        )

    async def predict(self, request: Request) -> Response:
        """``POST /predict``: serve the request's rows under its SLO (see ``docs/http.md``).

        The deadline counts from the handler's entry (the request's arrival; earlier with
        ``X-Request-Start``): receiving, parsing and decoding the body are charged to it, the
        model gets what is left, and ``deadline_met`` says whether the response was handed to
        the server within it.
        """
        arrived = self._timer()
        now_s = self._clock()
        response = await self._predict(request, arrived, now_s)
        self._counters.answered(response.status_code)
        return response

    async def _predict(self, request: Request, arrived: float, now_s: float) -> Response:
        if self._closed:
            return _closed()
        try:
            model = self.model()
        except Exception as exc:  # the model is not built (yet)
            return _error(503, exc)
        try:
            raw = await self._body(request)
        except _TooLarge as exc:  # the rest is never read: the connection closes after the answer
            return _error(413, exc, "InputError", Connection="close")
        except ClientDisconnect:
            self._counters.event("client_gone_before_submit")
            return Response(status_code=499)
        except InputError as exc:
            return _error(400, exc)
        try:
            if len(raw) > LARGE_BODY:
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(
                    self._decode_pool(), self._prepare, model, raw, request.headers, now_s, arrived
                )
            else:
                prepared = self._prepare(model, raw, request.headers, now_s, arrived)
        except Exception as exc:
            return _failed(model, exc, decoding=True)
        inputs, present, body, budget = prepared
        del raw, prepared
        received_ms = (self._timer() - arrived) * 1000.0
        left = None if budget.deadline_ms is None else budget.deadline_ms - received_ms
        if left is not None and left <= 0 and body.best_effort:
            left = _LATE_MS  # served late, as best_effort asks, at once with its cheapest strategy
        elif left is not None and left <= 0:
            spent = self._spent(budget, received_ms)
            return _error(503, spent, **{"Retry-After": str(_retry_after_s(model))})
        if await request.is_disconnected():  # gone while its body was decoded: nothing to compute
            self._counters.event("client_gone_before_submit")
            return Response(status_code=499)
        try:
            with self._lock:  # checked and admitted at once: close() cannot slip in between
                if self._closed:
                    return _closed()
                future = submit_now(
                    model,
                    inputs,
                    deadline_ms=left,
                    min_accuracy=budget.min_accuracy,
                    best_effort=body.best_effort,
                    confidence=budget.confidence,
                    per_request=body.per_request,
                    present=present,
                )
            del inputs, present
            result = await self._outcome(request, future)
        except Exception as exc:
            return _failed(model, exc)
        if result is None:  # the client is gone: nobody reads this answer
            return Response(status_code=499)
        return self._served(result, budget, arrived, received_ms)

    async def _body(self, request: Request) -> bytes:
        """The request's body, refused (:class:`_TooLarge`) once it is known to exceed the limit."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                raise InputError(f"Content-Length must be a number of bytes, got {declared!r}") from None
            if length > limit:
                raise _TooLarge(
                    f"the body is {length} bytes (Content-Length), more than this service takes "
                    f"({limit} bytes, max_body_bytes); send fewer requests per call"
                )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge(
                    f"the body grew past {limit} bytes (max_body_bytes) and was not read further; "
                    f"send fewer requests per call"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise ShutdownError(CLOSED)
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._workers, thread_name_prefix="mosel-http-decode"
                )
            return self._pool

    async def _outcome(self, request: Request, future: concurrent.futures.Future[Result]) -> Result | None:
        """The job's result, or None when the client disconnected first (its queued job withdrawn).

        A job already running when the client goes runs to its end; its result is dropped.
        Cancelling the handler (a server that cancels on disconnect, e.g. Ray Serve) cancels
        the job the same way.
        """
        waiting = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            waiting.cancel()  # cancels the job (a queued one leaves the queue)
            raise
        finally:
            gone.cancel()
        if waiting.done():
            return waiting.result()
        withdrawn = future.cancel()
        if not withdrawn:  # running: it finishes; its result or error goes unread
            waiting.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._counters.event("client_gone_withdrawn" if withdrawn else "client_gone_running")
        return None

    def _served(self, result: Result, budget: Budget, arrived: float, received_ms: float) -> Response:
        """The 200 answer; ``completion_ms`` and ``deadline_met`` are read last, when it is whole."""
        outputs = json.dumps(encode_output(result.output), separators=(",", ":"), allow_nan=False)
        fields: dict[str, Any] = {
            "prediction": prediction_of(result.output),
            "modalities": [sorted(c) for c in result.modalities],
            "expected_accuracy": result.expected_accuracy,
            "predicted_latency_ms": result.predicted_latency_ms,
            "measured_latency_ms": result.measured_latency_ms,
            "queue_ms": None if math.isnan(result.queue_ms) else result.queue_ms,
            "received_ms": received_ms,
            "reason": result.reason,
            "upstream_ms": budget.upstream_ms,
            "deadline_ms": budget.deadline_ms,
        }
        completion_ms = (self._timer() - arrived) * 1000.0
        met = None if budget.deadline_ms is None else completion_ms <= budget.deadline_ms
        fields["completion_ms"] = completion_ms
        fields["deadline_met"] = met
        content = '{"outputs":' + outputs + "," + json.dumps(fields, separators=(",", ":"))[1:]
        self._counters.served(met, completion_ms)
        return Response(content.encode(), media_type="application/json")

    def metrics(self) -> Response:
        """``GET /metrics``: the model's statistics and the front door's, in the Prometheus text format.

        The model's (``mosel_events_total``, ``mosel_completion_ms``, ...) count from the job's
        arrival at the model; the front door's (``mosel_http_*``) from the request's arrival at
        the handler to its response, as the client sees it.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest  # noqa: PLC0415

        try:
            model = self.model()
            registry = CollectorRegistry()
            registry.register(prometheus_collector(model))
            registry.register(self._counters.collector(type(model).__qualname__))
        except Exception as exc:
            return _error(503, exc)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def http_events(self) -> dict[str, int]:
        """The front door's event counts (:data:`HTTP_EVENTS`) and answers by status (``"status_503"``)."""
        counters = self._counters
        with counters._lock:
            return dict(counters.events) | {f"status_{k}": v for k, v in sorted(counters.statuses.items())}

    def healthz(self) -> Response:
        """``GET /healthz``: 200 while the process answers."""
        return JSONResponse(Health().model_dump())

    def readyz(self) -> Response:
        """``GET /readyz``: 200 when the model can serve (:func:`readiness`), else 503 with why.

        Computed on each probe, never waited for: a model changed since ``attach`` is handled
        now (a re-profile by ``on_stale`` starts in the background; ``"re-profiling: ..."``
        until its profile is attached). Never blocks: the router runs it on the event loop.
        """
        try:
            reason = CLOSED if self._closed else readiness(self.model())
        except Exception as exc:  # the model is not built (yet)
            reason = f"{type(exc).__name__}: {exc}"
        ready = Readiness(ready=reason is None, reason=reason)
        return JSONResponse(ready.model_dump(), status_code=200 if reason is None else 503)

    def close(self) -> None:
        """Take no more requests; close the model's scheduler (queued jobs finish), if the model exists.

        Requests admitted before finish; later ones answer 503 ``ShutdownError`` (see the class).
        """
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)
        try:
            model = self.model()
        except Exception:  # never built: nothing to close
            return
        close(model)


_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorBody, "description": "bad inputs or SLO values (InputError, SLOError)"},
    413: {"model": ErrorBody, "description": "the body is larger than the service takes (max_body_bytes)"},
    422: {"model": ErrorBody, "description": "the accuracy floor is unreachable (AccuracyUnreachableError)"},
    500: {"model": ErrorBody, "description": "the model's code failed (the error's class name)"},
    503: {
        "model": ErrorBody,
        "description": (
            "overload or not ready: DeadlineError (with Retry-After), QueueFullError, ShutdownError, "
            "NotProfiledError, ProfileMismatchError"
        ),
    },
}


def _header_doc(name: str, text: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": text,
    }


_PREDICT_OPENAPI: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    },
    "parameters": [
        _header_doc(DEADLINE_MS, "deadline in milliseconds (from X-Request-Start when given)"),
        _header_doc(MIN_ACCURACY, "floor on the expected accuracy, in [0, 1]"),
        _header_doc(CONFIDENCE, "plan the floor on lower confidence bounds, e.g. 0.95"),
        _header_doc(REQUEST_START, "wall-clock epoch seconds (or ms/us) when the request entered upstream"),
        _header_doc(DEADLINE_AT, "wall-clock epoch seconds (or ms/us) at which the deadline passes"),
    ],
}


def create_router(
    model: ModelSource | Service,
    *,
    prefix: str = "",
    input_schema: Mapping[str, ModalitySchema] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    allow_non_finite: bool = False,
    decode_workers: int = 1,
) -> APIRouter:
    """An ``APIRouter`` with ``/predict``, ``/metrics``, ``/healthz`` and ``/readyz`` for ``model``.

    Include it in any FastAPI app (``app.include_router(router, prefix="/av")``); closing the
    model on shutdown is then the app's business (``mosel.close(model)``), see :func:`create_app`.
    ``/healthz`` and ``/readyz`` answer on the event loop, so no busy thread pool delays them.

    Args:
        model: the model, a function returning it (called per request: a model built later),
            or a :class:`Service` (then the options below are the service's own).
        prefix: a path prefix for the routes.
        input_schema: decode inputs with this schema instead of the profile's (see :class:`Service`).
        max_body_bytes: the largest ``/predict`` body taken (413 above it; see :class:`Service`).
        allow_non_finite: take NaN and infinities in inputs (refused by default).
        decode_workers: threads decoding large bodies (see :class:`Service`).
    """
    service = (
        model
        if isinstance(model, Service)
        else Service(
            model,
            input_schema=input_schema,
            max_body_bytes=max_body_bytes,
            allow_non_finite=allow_non_finite,
            decode_workers=decode_workers,
        )
    )

    async def healthz() -> Response:
        return service.healthz()

    async def readyz() -> Response:
        return service.readyz()

    router = APIRouter(prefix=prefix)
    router.add_api_route(
        "/predict",
        service.predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_OPENAPI,
        summary="Serve a job of requests under its deadline and accuracy floor",
    )
    router.add_api_route(
        "/metrics",
        service.metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        summary="Prometheus text exposition of the model's statistics",
    )
    router.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health, summary="Alive")
    router.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready, with the reason"}},
        summary="Ready: a profile is attached and fits the model",
    )
    return router


def create_app(
    model: ModelSource,
    *,
    title: str = "mosel",
    input_schema: Mapping[str, ModalitySchema] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    allow_non_finite: bool = False,
    decode_workers: int = 1,
) -> FastAPI:
    """A FastAPI app serving ``model`` with :func:`create_router`; its lifespan closes the model.

    Args:
        model: the model (profiled or attached), or a function returning it (called per request;
            for Ray Serve, ``serve.ingress(lambda: create_app(...))`` builds the app on the replica).
        title: the OpenAPI title.
        input_schema: decode inputs with this schema instead of the profile's.
        max_body_bytes: the largest ``/predict`` body taken (413 above it; see :class:`Service`).
        allow_non_finite: take NaN and infinities in inputs (refused by default).
        decode_workers: threads decoding large bodies (see :class:`Service`).
    """
    service = Service(
        model,
        input_schema=input_schema,
        max_body_bytes=max_body_bytes,
        allow_non_finite=allow_non_finite,
        decode_workers=decode_workers,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        del app
        yield
        await run_in_threadpool(service.close)  # queued jobs finish; every future resolves

    app = FastAPI(title=title, lifespan=lifespan)
    app.include_router(create_router(service))
    return app
