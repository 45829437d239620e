"""One HTTP front door for a mosel model: a FastAPI router, served alone or mounted (e.g. on Ray Serve).

Needs the ``http`` extra (``pip install 'mosel[http]'``: FastAPI, pydantic, prometheus-client);
``import mosel`` never imports this module.

::

    app = mosel.http.create_app(model)                  # a FastAPI app; its lifespan closes the model
    router = mosel.http.create_router(model)            # or mount the routes in your own app
    app = mosel.http.create_app(lambda: load_model())   # a model that exists only later (a replica)

Routes: ``POST /predict``, ``POST /feedback`` (a served job's labels, for accuracy monitoring),
``GET /metrics`` (Prometheus text), ``GET /healthz`` (alive),
``GET /readyz`` (a profile is attached and still fits the model). The request handling lives in
:class:`Service`, which holds only its model (or a function returning it), so any number of
apps, routers or Ray Serve replicas can each serve their own model; or a :class:`Backend`
(``mosel.ray.HTTPIngress`` is a ``Service`` over a Ray deployment's handle). ``docs/http.md`` describes
the headers, bodies and status codes, and ``docs/failures.md`` what each fault at the front door
does: a deadline counts from the request's arrival (receiving and decoding the
body are charged), a body over ``max_body_bytes`` is refused (413) before it is read, large
bodies are decoded on a bounded worker pool, a client that disconnects has its queued job
withdrawn, and non-finite inputs are refused.
"""

from __future__ import annotations

import importlib.util

if not all(importlib.util.find_spec(name) for name in ("fastapi", "pydantic", "starlette")):
    raise ImportError("mosel.http needs the http extra: pip install 'mosel[http]'")

from mosel.http.app import StampArrival, create_app, create_router
from mosel.http.backend import Backend, LocalModel, Serving, Submitted
from mosel.http.service import Service
from mosel.http.wire import (
    ARRIVED,
    CLOSED,
    CONFIDENCE,
    DEADLINE_AT,
    DEADLINE_MS,
    DECODE_STEP,
    HTTP_EVENTS,
    INLINE_BODY,
    LARGE_BODY,
    MAX_BODY_BYTES,
    MIN_ACCURACY,
    OVERLOAD,
    REQUEST_ID,
    REQUEST_START,
    Budget,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelSource,
    PredictRequest,
    PredictResponse,
    Readiness,
    charge,
    decode_inputs,
    encode_output,
    error_status,
    prediction_of,
)
from mosel.runtime import readiness

__all__ = [
    "ARRIVED",
    "CLOSED",
    "CONFIDENCE",
    "DEADLINE_AT",
    "DEADLINE_MS",
    "DECODE_STEP",
    "HTTP_EVENTS",
    "INLINE_BODY",
    "LARGE_BODY",
    "MAX_BODY_BYTES",
    "MIN_ACCURACY",
    "OVERLOAD",
    "REQUEST_ID",
    "REQUEST_START",
    "Backend",
    "Budget",
    "ErrorBody",
    "FeedbackRequest",
    "FeedbackResponse",
    "Health",
    "LocalModel",
    "ModelSource",
    "PredictRequest",
    "PredictResponse",
    "Readiness",
    "Service",
    "Serving",
    "StampArrival",
    "Submitted",
    "charge",
    "create_app",
    "create_router",
    "decode_inputs",
    "encode_output",
    "error_status",
    "prediction_of",
    "readiness",
]
