"""The request handling of the HTTP front door: :class:`Service`, over a model or another backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from torch import Tensor, nn

from mosel.errors import DeadlineError, InputError, NotMonitoredError, ShutdownError, SLOError
from mosel.execution import Result
from mosel.http.backend import (
    Backend,
    LocalModel,
    LocalServing,
    Serving,
    Submitted,
    bool_masks,
)
from mosel.http.wire import (
    ARRIVED,
    CLOSED,
    HTTP_EVENTS,
    INLINE_BODY,
    LARGE_BODY,
    MAX_BODY_BYTES,
    OVERLOAD,
    REQUEST_ID,
    SLO_FIELDS,
    Budget,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelSource,
    PredictRequest,
    Prepared,
    Readiness,
    charge,
    decode_inputs,
    encode_output,
    error_status,
    prediction_of,
)
from mosel.schema import ModalitySchema
from mosel.slo import SLO
from mosel.stats import BUCKETS_MS, Histogram
from mosel.trees import Tree

__all__ = ["Service"]


def _error(status: int, exc: BaseException, name: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": name or type(exc).__name__, "detail": str(exc)}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _failed(serving: Serving, exc: BaseException, *, decoding: bool = False) -> JSONResponse:
    """The answer to an error raised while preparing (``decoding``) or serving a request."""
    status = error_status(exc)
    if decoding and status == 500 and isinstance(exc, (ValueError, TypeError)):
        return _error(400, exc, "InputError")  # what decoding raised on a value that does not fit
    headers = {"Retry-After": str(serving.retry_after_s())} if isinstance(exc, OVERLOAD) else {}
    return _error(status, exc, **headers)


_LATE_MS: Final = 1e-6
"""The deadline of a ``best_effort`` job whose deadline passed before it was submitted (served late)."""


class _TooLarge(Exception):
    """A body over the service's limit (answered 413 without reading the rest)."""


def _unread(done: asyncio.Future[Any]) -> None:
    """Retrieve what nobody will read (a result, an error) so that asyncio does not log it."""
    if not done.cancelled():
        done.exception()


async def _disconnected(receive: Callable[[], Awaitable[Mapping[str, Any]]]) -> None:
    """Returns when the ASGI server says the client disconnected (``http.disconnect``).

    Called once the body has been read: nothing else is due on the channel until the response,
    so a server that sends anything else is not listened to further (this then never returns).
    """
    message = await receive()
    if message.get("type") != "http.disconnect":
        await asyncio.Event().wait()


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
                    "served answers: arrival to the response handed to the server, ms",
                    labels=["model"],
                )
                cumulative, buckets = 0, []
                for le, count in zip((*BUCKETS_MS, math.inf), counts):
                    cumulative += count
                    buckets.append(("+Inf" if le == math.inf else str(le), cumulative))
                histogram.add_metric([model_name], buckets, total_ms)
                yield histogram

        return Collector()


def _own_id(headers: Mapping[str, str]) -> str | None:
    """The request's ``X-Request-Id`` (its first 256 characters), under which its labels may come too."""
    own = headers.get(REQUEST_ID)
    return own[:256] if own else None


def _closed() -> JSONResponse:
    """The answer of a closed service's ``/predict``: 503 ``ShutdownError``, retry elsewhere."""
    return _error(503, ShutdownError(CLOSED), **{"Retry-After": "1"})


def _validation_parts(exc: ValidationError) -> tuple[list[Any], str]:
    """Pydantic's errors of a body, and what each says (``where: message``), joined."""
    errors = list(exc.errors(include_url=False))
    parts = []
    for item in errors:
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return errors, "; ".join(parts)


def _invalid_body(exc: ValidationError) -> InputError | SLOError:
    """The error of a body that is not a ``/predict`` body: an ``SLOError`` if only SLO fields are bad."""
    errors, detail = _validation_parts(exc)
    if errors and all((item.get("loc") or ("",))[0] in SLO_FIELDS for item in errors):
        return SLOError(
            "the SLO fields take JSON numbers (deadline_ms, min_accuracy, confidence; not strings) and "
            "booleans (per_request, best_effort; true or false): " + detail
        )
    return InputError("the body must be a JSON object {'inputs': {modality: lists}, ...}: " + detail)


class Service:
    """The request handling of the HTTP front door, for one model (or another :class:`Backend`).

    Every route of :func:`create_router` calls one method here; a Ray Serve deployment class
    may hold a ``Service`` and call its methods from its own routes instead. Once closed
    (:meth:`close`), it serves no more: ``/predict`` answers 503 ``ShutdownError`` with a
    ``Retry-After`` and ``/readyz`` not ready (the model's scheduler is not restarted).

    The rules (body limit, decoding off the event loop, deadlines from arrival, disconnects,
    ``deadline_met`` and the metrics) are the same whatever serves the jobs: a model in this
    process (:class:`~mosel.http.backend.LocalModel`), or a Ray Serve deployment
    (``mosel.ray.HTTPIngress`` is a ``Service`` over its handle).

    Args:
        model: the model (profiled or attached), or a function returning it, called when a
            request needs it (a model built after the app, e.g. in a replica's constructor); or
            a :class:`~mosel.http.backend.Backend`.
        input_schema: modality -> schema to decode inputs with, instead of the profile's
            (a synthetic profile has none); for a model, not a backend.
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
        model: ModelSource | Backend,
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
        if isinstance(model, Backend):
            if input_schema is not None:
                raise ValueError("input_schema is for a model; a Backend gives its own schema")
            self.backend: Backend = model
        else:
            self.backend = LocalModel(model, input_schema)
        self._clock = clock
        self._timer = timer
        self.max_body_bytes = max_body_bytes
        self.allow_non_finite = bool(allow_non_finite)
        self._workers = decode_workers
        self._pools: list[concurrent.futures.ThreadPoolExecutor | None] = [None, None]  # medium, large
        self._counters = _Counters()
        self._closed = False
        self._lock = threading.Lock()  # no job is admitted once close() has begun

    @property
    def timer(self) -> Callable[[], float]:
        """The monotonic clock a request's time since its arrival is measured with."""
        return self._timer

    @property
    def clock(self) -> Callable[[], float]:
        """The wall clock upstream time is charged with."""
        return self._clock

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _local(self) -> LocalModel:
        if not isinstance(self.backend, LocalModel):
            raise TypeError(
                f"this service serves {type(self.backend).__qualname__}, not a model in this process"
            )
        return self.backend

    def model(self) -> nn.Module:
        """The served model (calling the function given for it, if any); a model's service only."""
        return self._local().model()

    def schema(self, model: nn.Module) -> Mapping[str, ModalitySchema]:
        """The input schema requests are decoded with (see :meth:`LocalModel.schema_of`)."""
        return self._local().schema_of(model)

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
        return self._prepare(LocalServing(self._local(), model), raw, headers, now_s, None)

    def _prepare(
        self,
        serving: Serving,
        raw: bytes,
        headers: Mapping[str, str],
        now_s: float,
        arrived: float | None,
        abandoned: Callable[[], bool] | None = None,
    ) -> Prepared:
        """:meth:`prepare`; with ``arrived``, a deadline already spent is refused before decoding.

        ``abandoned``: asked between the decode's steps (the client went away: stop).
        """
        try:
            body = PredictRequest.model_validate_json(raw or b"null")
        except ValidationError as exc:
            raise _invalid_body(exc) from None
        budget = charge(headers, body, now_s)
        if arrived is not None and budget.deadline_ms is not None and not body.best_effort:
            spent_ms = (self._timer() - arrived) * 1000.0
            if spent_ms >= budget.deadline_ms:  # e.g. a slow upload, or a wait for the decode pool
                raise self._spent(budget, spent_ms)
        schema = serving.schema()  # after a change of the model is handled: never waits
        options: dict[str, Any] = {"allow_non_finite": self.allow_non_finite}
        if abandoned is not None:
            options["abandoned"] = abandoned
        inputs = decode_inputs(serving.target, body.inputs, schema, **options)
        return inputs, bool_masks(body.present), body, budget

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
        arrived, now_s = self._arrival(request.scope)
        response = await self._predict(request, arrived, now_s)
        self._counters.answered(response.status_code)
        return response

    def _arrival(self, scope: Mapping[str, Any]) -> tuple[float, float]:
        """When the request arrived, on the service's timer and clock.

        As :class:`~mosel.http.StampArrival` stamped it when the app was first called for it
        (with this service's timer and clock), else now (the handler's entry).
        """
        timer, clock = self._timer, self._clock
        stamp = scope.get(ARRIVED)
        now = timer()
        if isinstance(stamp, tuple) and len(stamp) == 4 and stamp[0] is timer and stamp[1] is clock:
            arrived, at_s = stamp[2], stamp[3]
            if isinstance(arrived, float) and isinstance(at_s, float) and arrived <= now:
                return arrived, at_s
        return now, clock()

    async def _predict(self, request: Request, arrived: float, now_s: float) -> Response:
        if self._closed:
            return _closed()
        try:
            serving = self.backend.serving()
        except Exception as exc:  # the model is not built (yet)
            return _error(503, exc)
        try:
            raw = await self._body(request)
        except _TooLarge as exc:  # the rest is never read: the connection closes after the answer
            return _error(413, exc, "InputError", Connection="close")
        except ClientDisconnect:
            return self._gone_before_submit()
        except InputError as exc:
            return _error(400, exc)
        # Nothing else is due on the channel until the response: from here on, the next message
        # says the client went away (some servers' one-shot checks miss it; see _disconnected).
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            return await self._serve(request, serving, raw, gone, arrived, now_s)
        finally:
            gone.cancel()

    async def _serve(  # noqa: PLR0911 (one answer per outcome: 499, 503, 499, 503, 499, 500, 200)
        self,
        request: Request,
        serving: Serving,
        raw: bytes,
        gone: asyncio.Future[None],
        arrived: float,
        now_s: float,
    ) -> Response:
        """Decode the body, submit its job and await it, while the client is still there."""
        if gone.done():  # gone before its body was decoded: nothing is decoded
            return self._gone_before_submit()
        prepared = await self._decoded(serving, raw, request.headers, gone, arrived, now_s)
        if isinstance(prepared, Response):
            return prepared
        inputs, present, body, budget = prepared
        del prepared
        received_ms = (self._timer() - arrived) * 1000.0
        left = None if budget.deadline_ms is None else budget.deadline_ms - received_ms
        if left is not None and left <= 0 and body.best_effort:
            left = _LATE_MS  # served late, as best_effort asks, at once with its cheapest strategy
        elif left is not None and left <= 0:
            spent = self._spent(budget, received_ms)
            return _error(503, spent, **{"Retry-After": str(serving.retry_after_s())})
        if gone.done():  # gone while its body was decoded: nothing is submitted
            return self._gone_before_submit()
        try:
            with self._lock:  # checked and admitted at once: close() cannot slip in between
                if self._closed:
                    return _closed()
                slo = SLO.of(left, budget.min_accuracy, body.best_effort, budget.confidence, body.per_request)
                job = serving.submit(inputs, slo, present, request_id=_own_id(request.headers))
            del inputs, present
            result = await self._outcome(job, gone)
        except Exception as exc:
            return _failed(serving, exc)
        if result is None:  # the client is gone: nobody reads this answer
            return Response(status_code=499)
        return self._served(result, budget, arrived, received_ms)

    def _gone_before_submit(self) -> Response:
        self._counters.event("client_gone_before_submit")
        return Response(status_code=499)

    async def _decoded(
        self,
        serving: Serving,
        raw: bytes,
        headers: Mapping[str, str],
        gone: asyncio.Future[None],
        arrived: float,
        now_s: float,
    ) -> Prepared | Response:
        """The body parsed and decoded, or the answer that refuses it (400, 503, 499).

        Large bodies decode on the decode pool. A client that goes away meanwhile is answered
        499 at once: a decode still waiting for the pool never runs, one running stops at its
        next step (:func:`~mosel.http.decode_inputs`' ``abandoned``).
        """
        try:
            if len(raw) <= INLINE_BODY:
                return self._prepare(serving, raw, headers, now_s, arrived)
            abandoned = threading.Event()
            loop = asyncio.get_running_loop()
            pool = self._decode_pool(large=len(raw) > LARGE_BODY)
            work = loop.run_in_executor(
                pool, self._prepare, serving, raw, headers, now_s, arrived, abandoned.is_set
            )
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                abandoned.set()
                work.cancel()
                work.add_done_callback(_unread)
                return self._gone_before_submit()
            return work.result()
        except Exception as exc:
            return _failed(serving, exc, decoding=True)

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

    def _decode_pool(self, *, large: bool = True) -> concurrent.futures.ThreadPoolExecutor:
        """The pool of ``decode_workers`` threads for large bodies; one thread for medium ones."""
        lane = 1 if large else 0
        with self._lock:
            if self._closed:
                raise ShutdownError(CLOSED)
            pool = self._pools[lane]
            if pool is None:
                workers, name = (
                    (self._workers, "mosel-http-decode") if large else (1, "mosel-http-decode-medium")
                )
                pool = self._pools[lane] = concurrent.futures.ThreadPoolExecutor(
                    workers, thread_name_prefix=name
                )
            return pool

    async def _outcome(self, job: Submitted, gone: asyncio.Future[None]) -> Result | None:
        """The job's result, or None when the client disconnected first (its queued job withdrawn).

        A job already running when the client goes runs to its end; its result is dropped.
        Cancelling the handler (a server that cancels on disconnect, e.g. Ray Serve) cancels
        the job the same way.
        """
        waiting = job.waiting
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            job.cancel()  # cancels the job (a queued one leaves the queue)
            waiting.cancel()
            raise
        if waiting.done():
            return waiting.result()
        withdrawn = job.cancel()
        waiting.add_done_callback(_unread)
        if withdrawn:
            waiting.cancel()
        self._counters.event("client_gone_withdrawn" if withdrawn else "client_gone_running")
        return None

    def _served(self, result: Result, budget: Budget, arrived: float, received_ms: float) -> Response:
        """The 200 answer; ``completion_ms`` and ``deadline_met`` are read last, when it is whole."""
        outputs = json.dumps(encode_output(result.output), separators=(",", ":"), allow_nan=False)
        fields: dict[str, Any] = {
            "prediction": prediction_of(result.output),
            "id": result.id,
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

    async def feedback(self, request: Request) -> Response:
        """``POST /feedback``: the labels of a served job, scored by the model's accuracy monitor.

        ``id`` is the job's ``Result.id`` (the ``id`` of its ``/predict`` answer) or the
        ``X-Request-Id`` it was sent with. 200 ``{"labelled": n}``; 404 for an id no monitor
        holds (never served here, or forgotten after its horizon), 409 when the model is not
        monitored, 400 for malformed labels, 503 when nothing can serve. Scoring runs on the
        thread pool, off the event loop.
        """
        body = await self._feedback_body(request)
        if isinstance(body, Response):
            return body
        try:
            labelled = await run_in_threadpool(self.backend.feedback, body.id, body.labels)
        except NotMonitoredError as exc:
            return JSONResponse({"error": "NotMonitored", "detail": str(exc)}, status_code=409)
        except InputError as exc:
            return _error(400, exc)
        except Exception as exc:  # nothing can serve now (the model not built, no replica answered)
            return _error(503, exc, **{"Retry-After": "1"})
        if labelled is None:
            where = "never served here, or past its horizon"
            detail = f"no served job {body.id!r} waits for labels here ({where})"
            return JSONResponse({"error": "UnknownId", "detail": detail}, status_code=404)
        return JSONResponse(FeedbackResponse(labelled=labelled).model_dump())

    async def _feedback_body(self, request: Request) -> FeedbackRequest | Response:
        """The body of a ``/feedback`` request, or the answer that refuses it (400, 413)."""
        try:
            return FeedbackRequest.model_validate_json(await self._body(request) or b"null")
        except ValidationError as exc:
            form = "the body must be a JSON object {'id': ..., 'labels': [...]}: "
            return _error(400, InputError(form + _validation_parts(exc)[1]))
        except (_TooLarge, InputError, ClientDisconnect) as exc:
            return _error(413 if isinstance(exc, _TooLarge) else 400, exc, "InputError")

    def metrics(self) -> Response:
        """``GET /metrics``: the model's statistics and the front door's, in the Prometheus text format.

        The model's (``mosel_events_total``, ``mosel_completion_ms``, ...) count from the job's
        arrival at the model; the front door's (``mosel_http_*``) from the request's arrival at
        the handler to its response, as the client sees it.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest  # noqa: PLC0415

        try:
            registry = CollectorRegistry()
            for collector in self.backend.collectors():
                registry.register(collector)
            registry.register(self._counters.collector(self.backend.name()))
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
        reason = CLOSED if self._closed else self.backend.readiness()
        ready = Readiness(ready=reason is None, reason=reason)
        return JSONResponse(ready.model_dump(), status_code=200 if reason is None else 503)

    def close(self) -> None:
        """Take no more requests; close the model's scheduler (queued jobs finish), if the model exists.

        Requests admitted before finish; later ones answer 503 ``ShutdownError`` (see the class).
        """
        with self._lock:
            self._closed = True
            pools, self._pools = self._pools, [None, None]
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=False)
        self.backend.close()
