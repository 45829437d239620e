"""What crosses the wire at ``/predict``: headers, bodies, the budget a request brings, tensors as JSON."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import optree
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mosel import trees
from mosel.errors import (
    AccuracyUnreachableError,
    DeadlineError,
    InputError,
    NotProfiledError,
    ProfileMismatchError,
    QueueFullError,
    ReplicaError,
    ShutdownError,
    SLOError,
)
from mosel.schema import ModalitySchema, decode, leaf_name, parse_list
from mosel.slo import SLO
from mosel.spec import spec_of
from mosel.trees import Tree

__all__ = [
    "ARRIVED",
    "CLOSED",
    "HTTP_EVENTS",
    "CONFIDENCE",
    "DEADLINE_AT",
    "DEADLINE_MS",
    "DECODE_STEP",
    "INLINE_BODY",
    "LARGE_BODY",
    "MAX_BODY_BYTES",
    "MIN_ACCURACY",
    "OVERLOAD",
    "REQUEST_ID",
    "REQUEST_START",
    "Budget",
    "ErrorBody",
    "FeedbackRequest",
    "FeedbackResponse",
    "Health",
    "ModelSource",
    "PredictRequest",
    "PredictResponse",
    "Readiness",
    "charge",
    "decode_inputs",
    "encode_output",
    "error_status",
    "prediction_of",
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
REQUEST_ID: Final = "X-Request-Id"
"""Header: the caller's own id for the job; its labels may come to ``/feedback`` under it (monitoring)."""

OVERLOAD: Final = (DeadlineError, QueueFullError, ShutdownError, ReplicaError)
"""Errors answered 503 with a ``Retry-After``: the model is busy (or closed, or its replica was
lost), retry later or elsewhere."""
LARGE_BODY: Final = 256 * 1024
"""Bodies larger than this (bytes) are parsed and decoded on the service's decode pool, off the event loop."""
INLINE_BODY: Final = 16 * 1024
"""Bodies up to this size (bytes) are parsed and decoded on the event loop (under a millisecond);
larger ones up to :data:`LARGE_BODY` on a thread of their own, off the loop and never behind a
large body (a 256 KiB body takes about 10 ms to decode: on the loop, it delayed every other
request's arrival)."""
ARRIVED: Final = "mosel.arrived"
"""The ASGI scope key :class:`~mosel.http.StampArrival` stamps a request's arrival under."""
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
"""The default limit on a ``/predict`` body (8 MiB): a larger one is answered 413 unread.

Parsing JSON and turning its lists into tensors hold Python's GIL (single C calls), on the order
of 20-40 ms per MB on one core: the limit also bounds how long one body can delay the event loop.
"""
DECODE_STEP: Final = 1 << 14
"""At most about how many numbers of an input leaf are turned into a tensor at a time, holding the GIL
(within a row, where a row holds more; see :func:`decode_inputs`)."""
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

Prepared: TypeAlias = "tuple[dict[str, Tree], dict[str, Tensor] | None, PredictRequest, Budget]"
"""A decoded request: its inputs, presence masks, body and budget."""
ModelSource: TypeAlias = "nn.Module | Callable[[], nn.Module]"
"""A model, or a function that returns it when a request needs it (built later, e.g. on a replica)."""
SLO_FIELDS: Final = frozenset({"deadline_ms", "min_accuracy", "confidence", "per_request", "best_effort"})
"""The body fields of :class:`PredictRequest` that make the SLO (a bad one is an ``SLOError``)."""


class PredictRequest(BaseModel):
    """The body of ``POST /predict``.

    The SLO fields are strict, as ``model.infer``'s keywords are: a number for the objectives
    (``"50"`` or ``true`` is refused), a JSON boolean for ``per_request`` and ``best_effort``.
    """

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
        None, strict=True, description="deadline in ms from the request's arrival (or X-Request-Start); > 0"
    )
    min_accuracy: float | None = Field(
        None, strict=True, description="floor on the expected accuracy, in [0, 1]"
    )
    confidence: float | None = Field(
        None, strict=True, description="plan the floor against lower confidence bounds of accuracy, in (0, 1)"
    )
    per_request: bool = Field(False, strict=True, description="every request's configuration meets the floor")
    best_effort: bool = Field(
        False, strict=True, description="serve late instead of answering 503 to a doomed deadline"
    )
    present: dict[str, list[bool]] | None = Field(
        None, description="modality -> one boolean per request: which requests really have it"
    )


class PredictResponse(BaseModel):
    """The answer of ``POST /predict`` (200)."""

    outputs: Any = Field(description="the fusion output, one row per request: nested lists (or objects)")
    prediction: list[Any] | None = Field(
        description="argmax over the last dimension of a floating output of rank >= 2, else null"
    )
    id: str = Field(description="the job's id, to report its labels to /feedback with (monitoring)")
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


class FeedbackRequest(BaseModel):
    """The body of ``POST /feedback``: the ground truth of a served job, when it arrives."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        description="the job's id: the `id` of its /predict answer, or the X-Request-Id it was sent with"
    )
    labels: list[Any] | dict[str, Any] = Field(
        description=(
            "one label per request in the job's row order (null for a request without one), or "
            "{row: label} for some; what the monitor's metric takes (a class index for top-1)"
        )
    )


class FeedbackResponse(BaseModel):
    """The answer of ``POST /feedback`` (200)."""

    labelled: int = Field(description="requests scored now (requests labelled before are not counted again)")


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


_EPOCH_UNITS: Final = (1.0, 1e3, 1e6, 1e9)
"""Seconds, milliseconds, microseconds, nanoseconds: an epoch header's units, told apart by magnitude."""
_EPOCH_S: Final = (1e9, 1e10)
"""The wall-clock epochs (seconds) a header may name: from September 2001 to the year 2286."""


def _epoch_s(name: str, text: str) -> float:
    """Wall-clock epoch seconds from seconds, milliseconds, microseconds or nanoseconds.

    The unit is told by the magnitude: each unit's plausible epochs (2001 to 2286) lie in its
    own decade, ``[1e9, 1e10)`` times the unit. A value in none of them is refused rather than
    misread (a unit off by a thousand would charge years, or nothing).
    """
    value = _number(name, text.strip().removeprefix("t="))
    low, high = _EPOCH_S
    for scale in _EPOCH_UNITS:
        if low * scale <= value < high * scale:
            return value / scale
    raise SLOError(
        f"{name} must be a wall-clock epoch time (since 1970) in seconds, milliseconds, microseconds or "
        f"nanoseconds, between the years 2001 and 2286 (e.g. {name}: t=1764432000.123); got {text!r}, "
        f"which is none of these"
    )


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
    nginx's ``t=${msec}`` write them (a ``t=`` prefix is accepted; values in milliseconds,
    microseconds or nanoseconds are recognised by their magnitude, and a value that is none of
    these, between the years 2001 and 2286, is refused). The deadline left for the model is
    ``deadline_ms - (now - X-Request-Start)``, and at most ``X-Deadline-At - now``. Clocks of
    different hosts must agree (NTP); a start in the future counts as no time upstream.

    Args:
        headers: the request's headers (a case-insensitive mapping, or lower-case names).
        body: the parsed body.
        now_s: the arrival time, ``time.time()``.

    The SLO is validated by :meth:`mosel.slo.SLO.of` (the rules of ``model.infer``) and the time
    upstream charged by :meth:`mosel.slo.SLO.charged`: a best-effort request whose deadline was
    spent upstream is served at once rather than refused.

    Raises:
        SLOError: a header is not a valid number, or an SLO value is not valid.
        DeadlineError: the budget was spent upstream (a doomed request).
    """
    values: dict[str, float | None] = {}
    for name in (DEADLINE_MS, MIN_ACCURACY, CONFIDENCE):
        text = _header(headers, name)
        values[name] = None if text is None else _number(name, text)
    slo = SLO.of(
        _stricter(values[DEADLINE_MS], body.deadline_ms, min),
        _stricter(values[MIN_ACCURACY], body.min_accuracy, max),
        body.best_effort,
        _stricter(values[CONFIDENCE], body.confidence, max),
        body.per_request,
    )
    start = _header(headers, REQUEST_START)
    upstream_ms = 0.0 if start is None else max(0.0, (now_s - _epoch_s(REQUEST_START, start)) * 1000.0)
    slo = slo.charged(upstream_ms, where="this service")
    at = _header(headers, DEADLINE_AT)
    if at is not None:
        until_ms = (_epoch_s(DEADLINE_AT, at) - now_s) * 1000.0
        slo = slo.within(until_ms, where="this service", why=f"{DEADLINE_AT} {at}, {-until_ms:.1f} ms ago")
    return Budget(
        deadline_ms=slo.deadline_ms,
        min_accuracy=slo.min_accuracy,
        confidence=slo.confidence,
        upstream_ms=upstream_ms,
    )


class Abandoned(Exception):
    """The request's client went away while its inputs were decoded: the decode stopped."""


def _decode(
    modality: str,
    value: Any,
    schema: ModalitySchema | None,
    finite: bool,
    abandoned: Callable[[], bool] | None = None,
) -> Tree:
    """:func:`mosel.schema.decode` (non-finite values refused with ``finite``), large leaves in steps.

    Turning a JSON list into a tensor is one C call that holds Python's GIL throughout: a leaf
    of more than :data:`DECODE_STEP` numbers is turned into a tensor a piece of about that many
    numbers at a time (within a row, where a row is that large), so that the event loop (and
    ``/healthz``) runs in between; the schema's checks then run once on the whole tensor (torch
    operations, which let the GIL go), and a bad value is reported as for the whole value.
    ``abandoned`` is asked between pieces; when it says so, :class:`Abandoned` is raised.
    """
    if schema is not None:
        value = _parsed_in_steps(modality, value, schema, abandoned)
    return decode(modality, value, schema, finite=finite)


def _numbers(row: Any) -> int:
    """How many numbers one (rectangular) row of a JSON tensor holds, read along its first elements."""
    count = 1
    while isinstance(row, list):
        count *= len(row)
        row = row[0] if row else None
    return count


def _parsed_in_steps(
    modality: str, value: Any, schema: ModalitySchema, abandoned: Callable[[], bool] | None
) -> Any:
    """``value`` with each leaf list of more than :data:`DECODE_STEP` numbers parsed into a tensor.

    Leaves that cannot be found where the schema puts them are left for :func:`decode` to refuse.
    """
    for leaf in schema.leaves:
        found = _find(value, leaf.path)
        if not isinstance(found, list) or _numbers(found) <= DECODE_STEP:
            continue
        dtype = leaf.torch_dtype()
        parse_as = torch.float64 if dtype.is_floating_point else None
        tensor = _pieces(found, leaf_name(modality, leaf.path), parse_as, dtype, abandoned)
        value = _replaced(value, leaf.path, tensor)  # a copy along the path: the body's lists stay
    return value


def _find(value: Any, path: tuple[str | int, ...]) -> Any:
    """The part of ``value`` at ``path``, or None where it is not there."""
    for part in path:
        if isinstance(value, dict) and isinstance(part, str):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            return None
    return value


def _replaced(value: Any, path: tuple[str | int, ...], tensor: Tensor) -> Any:
    if not path:
        return tensor
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, tensor)}
    copy = list(value)
    copy[int(head)] = _replaced(value[int(head)], rest, tensor)
    return copy


def _parse_piece(piece: list[Any], where: str, parse_as: torch.dtype | None, dtype: torch.dtype) -> Tensor:
    """One step: a piece of a leaf's list as a tensor (one C call, holding the GIL)."""
    return parse_list(piece, where, parse_as, dtype)


def _pieces(
    value: list[Any],
    where: str,
    parse_as: torch.dtype | None,
    dtype: torch.dtype,
    abandoned: Callable[[], bool] | None,
) -> Tensor:
    """A nested list as one tensor, parsed about :data:`DECODE_STEP` numbers at a time.

    Consecutive elements are parsed together while they hold at most that many numbers; an
    element holding more is parsed the same way, one level down, and the elements stacked.
    Pieces of other shapes (a ragged list) are refused as :func:`mosel.schema.decode` would.
    """
    per = _numbers(value[0]) if value else 1
    parts: list[Tensor] = []
    try:
        if per <= DECODE_STEP:
            step = max(1, DECODE_STEP // max(per, 1))
            for i in range(0, len(value), step):
                if abandoned is not None and abandoned():
                    raise Abandoned(where)
                parts.append(_parse_piece(value[i : i + step], where, parse_as, dtype))
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        for element in value:
            if not isinstance(element, list):
                raise ValueError("a number beside lists")
            parts.append(_pieces(element, where, parse_as, dtype, abandoned))
        return torch.stack(parts)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{where} must be a rectangular list of numbers or booleans ({exc})") from None


def decode_inputs(
    model: nn.Module | Sequence[str],
    inputs: Mapping[str, Any],
    schema: Mapping[str, ModalitySchema],
    *,
    allow_non_finite: bool = False,
    abandoned: Callable[[], bool] | None = None,
) -> dict[str, Tree]:
    """The JSON ``inputs`` of a request as tensors, each modality checked against ``schema``.

    ``model``: the model, or the modalities it takes (a model elsewhere, e.g. a Ray deployment).
    A modality without a schema (a profile saved before schemas were recorded) takes its
    dtypes from the values (see :func:`mosel.schema.decode`). A NaN, an infinity, or a number
    beyond its leaf's float dtype (``1e39`` for float32) is refused unless ``allow_non_finite``.
    Leaves of more than :data:`DECODE_STEP` numbers are turned into tensors in steps (the GIL
    is let go in between); ``abandoned`` is asked between steps, and when it returns true the
    decode stops with :class:`Abandoned` (the request's client went away).

    Raises:
        InputError: an unknown modality, or a value that does not fit (naming modality and leaf).
        Abandoned: ``abandoned`` said so.
    """
    if isinstance(model, nn.Module):
        spec = spec_of(model)
        names, owner = tuple(spec.modalities), spec.model_class
    else:
        names, owner = tuple(model), "the model"
    unknown = [m for m in inputs if m not in names]
    if unknown:
        raise InputError(f"unknown modality {unknown[0]!r}; {owner} takes {list(names)}")
    finite = not allow_non_finite
    return {m: _decode(m, v, schema.get(m), finite, abandoned) for m, v in inputs.items() if v is not None}


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
