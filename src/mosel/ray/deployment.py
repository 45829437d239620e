"""Building a mosel deployment: replicas, their router and their autoscaling, as Serve options."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from torch import nn

from mosel.monitoring import Monitoring
from mosel.profiles import Profile
from mosel.ray.replica import MoselReplica
from mosel.ray.router import SlackRequestRouter
from mosel.scheduler import SchedulerConfig

__all__ = ["ProfileSource", "deployment"]

_log = logging.getLogger("mosel")

ProfileSource = str | os.PathLike[str] | Profile | Callable[[nn.Module], Profile]
"""A saved profile's path, a profile, or a function that profiles the replica's model on start-up."""
# ---------------------------------------------------------------------------------- building it


def deployment(
    factory: Callable[[], nn.Module],
    profile: ProfileSource,
    *,
    name: str = "mosel",
    scheduler: SchedulerConfig | None = None,
    num_replicas: int | None = None,
    autoscaling: AutoscalingConfig | Mapping[str, Any] | None = None,
    router: Literal["slack", "serve"] = "slack",
    router_profile: str | os.PathLike[str] | Profile | None = None,
    stale_after_s: float = 2.0,
    stats_period_s: float | None = None,
    max_ongoing_requests: int = 64,
    max_queued_requests: int = -1,
    ray_actor_options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    ties: Literal["serve", "slack"] = "serve",
    probe_jobs: int = 4,
    monitoring: Monitoring | None = None,
) -> serve.Application:
    """A Ray Serve application serving ``factory()``'s model with mosel, one scheduler per replica.

    ``serve.run(app)`` returns a ``DeploymentHandle``; wrap it in :class:`Client` for
    ``infer``/``ainfer`` with typed errors, or bind the app into an ingress deployment.

    Args:
        factory: builds the model in each replica (importable or cloudpickle-able).
        profile: the path of a saved profile (``profile.save``), a profile, or a function
            ``model -> Profile`` that profiles each replica's model on its own device at start-up
            (``lambda m: mosel.profile(m, data)``; one profile per device type).
        name: the deployment's name.
        scheduler: each replica's online-stage configuration.
        num_replicas: a fixed replica count (default 1, unless ``autoscaling`` is given).
        autoscaling: a Serve autoscaling config (see :func:`autoscaling_config` for mosel's own
            signal), or None.
        router: ``"slack"``: :class:`SlackRequestRouter`; ``"serve"``: Serve's default power of
            two choices.
        router_profile: the profile the router prices requests with; default ``profile`` (a
            function ``profile`` needs one given here for the slack router).
        stale_after_s: a replica whose load is older than this is unknown to the slack router
            (it gets bounded probe traffic; see :class:`SlackRequestRouter`).
        stats_period_s: how often Serve asks each replica for its load; default 0.5 s with
            the slack router, Serve's own (10 s) with Serve's router, which does not read it.
        max_ongoing_requests: jobs one replica holds at once (running and in its mosel queue);
            beyond it Serve queues them in the caller's handle. mosel schedules only what it
            holds, so keep it above the queue a replica can serve within a deadline.
        max_queued_requests: jobs a caller's handle may queue beyond that (-1: unbounded);
            beyond it the call fails with :class:`mosel.QueueFullError` (through :class:`Client`)
            or Serve's ``BackPressureError`` (HTTP 503).
        ray_actor_options: per-replica resources, e.g. ``{"num_gpus": 1}`` for one replica per GPU.
        seed: seeds the slack router's random choices (ties, the fallback).
        ties: how the slack router breaks ties between replicas predicted equally good (see
            :meth:`SlackRequestRouter.initialize_state`).
        probe_jobs: jobs the slack router sends a replica without a fresh load while another
            is predicted on time (see :class:`mosel.routing.SlackRouter`).
        monitoring: each replica's accuracy monitoring (labels come back with
            :meth:`Client.feedback`; the slack router takes them to the replica that served
            the job); None: off.
    """
    if isinstance(profile, Profile):
        source: Any = profile.to_json()
    elif isinstance(profile, (str, os.PathLike)):
        source = os.fspath(profile)
    elif callable(profile):
        source = profile
    else:
        raise TypeError(
            f"profile must be a path, a mosel.Profile or a function model -> Profile, got {profile!r}"
        )
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": dict(ray_actor_options or {"num_cpus": 1}),
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = 1 if num_replicas is None else num_replicas
    if router not in ("slack", "serve"):
        raise ValueError(f"router must be 'slack' or 'serve', got {router!r}")
    period = stats_period_s if stats_period_s is not None else 0.5 if router == "slack" else None
    stats: dict[str, Any] = {}
    if period is not None:
        stats = {
            "request_routing_stats_period_s": period,
            "request_routing_stats_timeout_s": max(10 * period, 1.0),
        }
    if router == "slack":
        kwargs = {"stale_after_s": stale_after_s, "seed": seed, "ties": ties, "probe_jobs": probe_jobs}
        options["request_router_config"] = _slack_router(
            profile if router_profile is None else router_profile, kwargs, stats
        )
    elif stats:  # Serve's router, with the replicas polled as often as the slack router's (a control)
        options["request_router_config"] = RequestRouterConfig(**stats)
    return serve.deployment(MoselReplica).options(**options).bind(factory, source, scheduler, monitoring)


def _slack_router(
    priced: ProfileSource, kwargs: dict[str, Any], stats: dict[str, Any]
) -> RequestRouterConfig:
    """The Serve configuration of :class:`SlackRequestRouter`, pricing with ``priced``."""
    if isinstance(priced, Profile):
        priced_json: Any = priced.to_json()
    elif isinstance(priced, (str, os.PathLike)):
        priced_json = Profile.load(priced).to_json()
    else:
        raise ValueError(
            "router='slack' with a profiling function needs router_profile= (a path or a Profile)"
        )
    return RequestRouterConfig(
        request_router_class=SlackRequestRouter,
        request_router_kwargs={"profile": priced_json, **kwargs},
        **stats,
    )
