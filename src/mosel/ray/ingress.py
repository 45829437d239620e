"""An HTTP front door before a mosel deployment whose requests the slack router places."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from mosel.errors import InputError, MoselError, ReplicaError
from mosel.profiles import Profile
from mosel.ray.client import Client
from mosel.ray.request import Request

__all__ = ["HTTPIngress", "http_ingress"]

_log = logging.getLogger("mosel")

# ---------------------------------------------------------------------------------- HTTP


class HTTPIngress:
    """A Serve ingress deployment: mosel's ``POST /predict`` in front of a mosel deployment.

    Build it with :func:`http_ingress`. Serve's HTTP proxy routes a request to an ingress
    replica with Serve's own router (the request is opaque bytes to it); the ingress decodes
    it and calls the mosel deployment through its handle with a :class:`Request`, so that
    :class:`SlackRequestRouter` picks the mosel replica, and the time before (upstream, the
    proxy, the ingress) is charged to the deadline. The routes and bodies are those of
    :mod:`mosel.http` (``docs/http.md``): ``POST /predict``, ``POST /feedback`` (a served
    job's labels, to the replica that served it) and ``GET /healthz``; a
    replica's ``/metrics`` and ``/readyz`` are not served here (each mosel replica reports
    through Serve). A client that disconnects cancels the job, which leaves its replica's
    queue; the wait for an answer is bounded as :class:`Client` bounds it.

    Args:
        model: the mosel deployment's handle (Serve passes it for the bound application).
        profile: the profile's JSON form (inputs are decoded with its schema).
        timeout_s: the :class:`Client` bound without a deadline.
        grace_ms: the :class:`Client` grace past a deadline.
    """

    def __init__(
        self,
        model: DeploymentHandle,
        profile: Mapping[str, Any],
        timeout_s: float = 60.0,
        grace_ms: float = 100.0,
    ) -> None:
        self.client = Client(model, timeout_s=timeout_s, grace_ms=grace_ms)
        self.profile = Profile.from_json(dict(profile))

    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app (Serve calls this on each ingress replica, after the constructor)."""
        from fastapi import FastAPI  # noqa: PLC0415  (Ray Serve ships FastAPI; mosel.http needs it too)
        from fastapi import Request as HTTPRequest  # noqa: PLC0415
        from fastapi.responses import JSONResponse  # noqa: PLC0415

        from mosel import http  # noqa: PLC0415

        app = FastAPI(title="mosel on Ray Serve")

        async def predict(request: HTTPRequest) -> Any:
            return await self.predict(request)

        predict.__annotations__["request"] = HTTPRequest  # FastAPI cannot resolve a local name's string
        app.add_api_route("/predict", predict, methods=["POST"], response_model=http.PredictResponse)

        async def feedback(request: HTTPRequest) -> Any:
            return await self.feedback(request)

        feedback.__annotations__["request"] = HTTPRequest
        app.add_api_route("/feedback", feedback, methods=["POST"], response_model=http.FeedbackResponse)

        @app.get("/healthz", response_model=http.Health)
        async def healthz() -> Any:
            return JSONResponse(http.Health().model_dump())

        return app

    async def predict(self, request: Any) -> Any:
        """``POST /predict``: decode, charge the time upstream, send the job on, answer it."""
        from fastapi.responses import JSONResponse  # noqa: PLC0415
        from pydantic import ValidationError  # noqa: PLC0415

        from mosel import http  # noqa: PLC0415

        now_s = time.time()
        raw = await request.body()
        try:
            if len(raw) > http.LARGE_BODY:
                job, budget = await asyncio.to_thread(self._prepare, raw, request.headers, now_s)
            else:
                job, budget = self._prepare(raw, request.headers, now_s)
        except ValidationError as exc:
            return _error_answer(400, "InputError", f"the body is not a valid /predict body: {exc}")
        except (ValueError, TypeError) as exc:  # InputError, SLOError, DeadlineError (spent upstream)
            return _answer_error(exc)
        received_ms = (time.time() - now_s) * 1000.0
        try:
            result = await self.client.ainfer(job)
        except MoselError as exc:
            return _answer_error(exc)
        output = result.output
        answer = http.PredictResponse(
            outputs=http.encode_output(output),
            prediction=http.prediction_of(output),
            id=result.id,
            received_ms=received_ms,
            modalities=[sorted(c) for c in result.modalities],
            expected_accuracy=result.expected_accuracy,
            predicted_latency_ms=result.predicted_latency_ms,
            measured_latency_ms=result.measured_latency_ms,
            queue_ms=None if math.isnan(result.queue_ms) else result.queue_ms,
            completion_ms=result.completion_ms,
            deadline_met=result.deadline_met,
            reason=result.reason,
            upstream_ms=budget.upstream_ms,
            deadline_ms=budget.deadline_ms,
        )
        return JSONResponse(answer.model_dump())

    async def feedback(self, request: Any) -> Any:
        """``POST /feedback``: a job's labels, to the replica that served it (:meth:`Client.feedback`)."""
        from fastapi.responses import JSONResponse  # noqa: PLC0415
        from pydantic import ValidationError  # noqa: PLC0415

        from mosel import http  # noqa: PLC0415

        try:
            body = http.FeedbackRequest.model_validate_json(await request.body() or b"null")
        except ValidationError as exc:
            return _error_answer(400, "InputError", f"the body is not a valid /feedback body: {exc}")
        try:
            labelled = await asyncio.to_thread(self.client.feedback, body.id, body.labels)
        except MoselError as exc:
            return _answer_error(exc)
        if labelled == 0:
            detail = f"no replica holds a served job {body.id!r} waiting for labels (or it was labelled)"
            return _error_answer(404, "UnknownId", detail)
        return JSONResponse(http.FeedbackResponse(labelled=labelled).model_dump())

    def _prepare(self, raw: bytes, headers: Mapping[str, str], now_s: float) -> tuple[Request, Any]:
        """The job to send (stamped ``now_s``, with the deadline left after upstream) and its budget."""
        import torch  # noqa: PLC0415

        from mosel import http  # noqa: PLC0415
        from mosel.schema import decode  # noqa: PLC0415

        body = http.PredictRequest.model_validate_json(raw or b"null")
        budget = http.charge(headers, body, now_s)
        modalities = self.profile.modalities
        unknown = [m for m in body.inputs if m not in modalities]
        if unknown:
            raise InputError(f"unknown modality {unknown[0]!r}; the model takes {list(modalities)}")
        schema = self.profile.input_schema
        inputs = {m: decode(m, v, schema.get(m)) for m, v in body.inputs.items() if v is not None}
        present = None
        if body.present is not None:
            present = {m: torch.tensor(v, dtype=torch.bool) for m, v in body.present.items()}
        job = Request(
            inputs,
            deadline_ms=budget.deadline_ms,
            min_accuracy=budget.min_accuracy,
            best_effort=body.best_effort,
            confidence=budget.confidence,
            per_request=body.per_request,
            present=present,
            sent_at_s=now_s,
            request_id=headers.get(http.REQUEST_ID) or None,
        )
        return job, budget


def _answer_error(exc: BaseException) -> Any:
    """The HTTP answer of an error: mosel.http's status; a lost replica is 503 too (retry)."""
    from mosel import http  # noqa: PLC0415

    if not isinstance(exc, MoselError):
        return _error_answer(400, "InputError", str(exc))
    retry = isinstance(exc, (*http.OVERLOAD, ReplicaError))
    status = 503 if retry else http.error_status(exc)
    return _error_answer(status, type(exc).__name__, str(exc), retry=retry)


def _error_answer(status: int, name: str, detail: str, *, retry: bool = False) -> Any:
    from fastapi.responses import JSONResponse  # noqa: PLC0415

    headers = {"Retry-After": "1"} if retry else None
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)


def http_ingress(
    model: serve.Application | DeploymentHandle,
    profile: str | os.PathLike[str] | Profile,
    *,
    name: str = "mosel-http",
    num_replicas: int = 1,
    max_ongoing_requests: int = 256,
    ray_actor_options: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
    grace_ms: float = 100.0,
) -> serve.Application:
    """An HTTP front door for a mosel deployment whose requests the slack router places.

    Serve's HTTP proxy routes each HTTP request to a replica of the *ingress* deployment with
    Serve's own router; routed to a mosel deployment directly (a ``mosel.http`` app mounted on
    each replica, as in ``examples/ray_serve``), it is never seen by :class:`SlackRequestRouter`.
    This ingress (:class:`HTTPIngress`, a few light replicas without a model) decodes each request
    and calls ``model`` through its handle with a :class:`Request`, so the slack router places
    it::

        mosel_app = mosel.ray.deployment(make_model, "av.profile.json", num_replicas=4)
        serve.run(mosel.ray.http_ingress(mosel_app, "av.profile.json"), route_prefix="/av")
        # POST /av/predict, with mosel.http's body and headers (docs/http.md)

    Args:
        model: the mosel application, from :func:`deployment` (deployed with the ingress), or
            the handle of one already running (``serve.get_deployment_handle(name, app)``).
        profile: the profile the replicas serve with (a path or a Profile): inputs are decoded
            with its schema.
        name: the ingress deployment's name.
        num_replicas: ingress replicas (each holds no model; one is enough for most loads).
        max_ongoing_requests: requests one ingress replica holds at once.
        ray_actor_options: per-ingress-replica resources (default: a tenth of a CPU).
        timeout_s: the longest an answer is awaited without a deadline (see :class:`Client`).
        grace_ms: how long past a deadline an answer is awaited (see :class:`Client`).
    """
    priced = profile if isinstance(profile, Profile) else Profile.load(profile)
    ingress = serve.ingress()(HTTPIngress)
    return (
        serve.deployment(ingress)
        .options(
            name=name,
            num_replicas=num_replicas,
            max_ongoing_requests=max_ongoing_requests,
            ray_actor_options=dict(ray_actor_options or {"num_cpus": 0.1}),
        )
        .bind(model, priced.to_json(), timeout_s, grace_ms)
    )
