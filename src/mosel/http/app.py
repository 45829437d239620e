"""The routes: an ``APIRouter`` for any FastAPI app, or a whole app that closes the model with it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

from fastapi import APIRouter, FastAPI
from fastapi.responses import PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from mosel.http.service import Service
from mosel.http.wire import (
    ARRIVED,
    CONFIDENCE,
    DEADLINE_AT,
    DEADLINE_MS,
    MAX_BODY_BYTES,
    MIN_ACCURACY,
    REQUEST_ID,
    REQUEST_START,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelSource,
    PredictRequest,
    PredictResponse,
    Readiness,
)
from mosel.schema import ModalitySchema

__all__ = ["StampArrival", "create_app", "create_router"]


class StampArrival:
    """An ASGI middleware that stamps each request's arrival, for :class:`Service` to count from.

    The first thing run for a request (outermost): the stamp is taken before routing, other
    middleware and the handler, so time spent there (an event loop busy with other requests)
    counts against the deadline. :func:`create_app` installs it; for :func:`create_router` in
    your own app, add it last (outermost) with the service's timer and clock:
    ``app.add_middleware(mosel.http.StampArrival, timer=service.timer, clock=service.clock)``.
    A service uses a stamp taken with its own timer and clock only.
    """

    def __init__(
        self, app: Any, timer: Callable[[], float] = time.monotonic, clock: Callable[[], float] = time.time
    ) -> None:
        self.app = app
        self.timer = timer
        self.clock = clock

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Stamp an HTTP request's scope (once), then call the app."""
        if scope.get("type") == "http" and ARRIVED not in scope:
            scope[ARRIVED] = (self.timer, self.clock, self.timer(), self.clock())
        await self.app(scope, receive, send)


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
        _header_doc(REQUEST_ID, "the caller's id for the job: its labels may come to /feedback under it"),
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
    """An ``APIRouter`` with ``/predict``, ``/feedback``, ``/metrics``, ``/healthz`` and ``/readyz``.

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
        "/feedback",
        service.feedback,
        methods=["POST"],
        response_model=FeedbackResponse,
        responses={
            400: {"model": ErrorBody, "description": "malformed labels (InputError)"},
            404: {"model": ErrorBody, "description": "no served job waits for labels under this id"},
            409: {"model": ErrorBody, "description": "the model is not monitored"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
            }
        },
        summary="Report the ground truth of a served job (accuracy monitoring)",
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
    app.add_middleware(StampArrival, timer=service.timer, clock=service.clock)
    return app
