"""An HTTP front door before a mosel deployment whose requests the slack router places."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from mosel.profiles import Profile
from mosel.ray.client import Client

__all__ = ["HTTPIngress", "http_ingress"]

_log = logging.getLogger("mosel")

# ---------------------------------------------------------------------------------- HTTP


class HTTPIngress:
    """A Serve ingress deployment: mosel's HTTP front door in front of a mosel deployment.

    Build it with :func:`http_ingress`. Serve's HTTP proxy routes a request to an ingress
    replica with Serve's own router (the request is opaque bytes to it); the ingress is a
    :class:`mosel.http.Service` over the deployment (:class:`mosel.ray.backend.DeploymentBackend`):
    it reads, limits and decodes the body with every rule of :mod:`mosel.http` (413 above
    ``max_body_bytes``, decoding off the event loop, non-finite inputs refused, the deadline
    from the request's arrival with the time upstream and the decode charged, a client gone
    before its job was sent has nothing sent, ``deadline_met`` and ``completion_ms`` as the
    client sees them) and calls the mosel deployment through its handle with a
    :class:`Request`, so that :class:`SlackRequestRouter` picks the mosel replica. Its routes
    are :mod:`mosel.http`'s: ``POST /predict``, ``POST /feedback`` (a served job's labels, by its
    ``id`` or ``X-Request-Id``, to the replica that served it), ``GET /metrics`` (the front door's own
    ``mosel_http_*``; each mosel replica reports its statistics through Serve), ``GET
    /healthz``, ``GET /readyz``. A client that disconnects cancels the job, which leaves its
    replica's queue; the wait for an answer is bounded as :class:`Client` bounds it.

    Args:
        model: the mosel deployment's handle (Serve passes it for the bound application).
        profile: the profile's JSON form (inputs are decoded with its schema).
        timeout_s: the :class:`Client` bound without a deadline.
        grace_ms: the :class:`Client` grace past a deadline.
        max_body_bytes: the largest body taken (see :class:`mosel.http.Service`).
        allow_non_finite: take NaN and infinities in inputs (refused by default).
        decode_workers: threads decoding large bodies (see :class:`mosel.http.Service`).
    """

    def __init__(
        self,
        model: DeploymentHandle,
        profile: Mapping[str, Any],
        timeout_s: float = 60.0,
        grace_ms: float = 100.0,
        *,
        max_body_bytes: int = 8 * 1024 * 1024,
        allow_non_finite: bool = False,
        decode_workers: int = 1,
    ) -> None:
        self.client = Client(model, timeout_s=timeout_s, grace_ms=grace_ms)
        self.profile = Profile.from_json(dict(profile))
        self.options: dict[str, Any] = {
            "max_body_bytes": max_body_bytes,
            "allow_non_finite": allow_non_finite,
            "decode_workers": decode_workers,
        }
        self.service: Any = None  # the mosel.http.Service, made with the app

    def __serve_build_asgi_app__(self) -> Any:
        """The FastAPI app (Serve calls this on each ingress replica, after the constructor)."""
        from fastapi import FastAPI  # noqa: PLC0415  (Ray Serve ships FastAPI; mosel.http needs it too)

        from mosel import http  # noqa: PLC0415
        from mosel.ray.backend import DeploymentBackend  # noqa: PLC0415

        options = getattr(self, "options", {})  # an instance made without the constructor: the defaults
        self.service = http.Service(DeploymentBackend(self.client, self.profile), **options)
        app = FastAPI(title="mosel on Ray Serve")
        app.include_router(http.create_router(self.service))
        app.add_middleware(http.StampArrival, timer=self.service.timer, clock=self.service.clock)
        return app

    async def predict(self, request: Any) -> Any:
        """``POST /predict`` (:meth:`mosel.http.Service.predict` over the deployment)."""
        if getattr(self, "service", None) is None:
            self.__serve_build_asgi_app__()
        return await self.service.predict(request)


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
    max_body_bytes: int = 8 * 1024 * 1024,
    allow_non_finite: bool = False,
    decode_workers: int = 1,
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
        max_body_bytes: the largest body taken (413 above it; see :class:`mosel.http.Service`).
        allow_non_finite: take NaN and infinities in inputs (refused with 400 by default).
        decode_workers: threads per ingress replica decoding large bodies, off its event loop.
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
        .bind(
            model,
            priced.to_json(),
            timeout_s,
            grace_ms,
            max_body_bytes=max_body_bytes,
            allow_non_finite=allow_non_finite,
            decode_workers=decode_workers,
        )
    )
