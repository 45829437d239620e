"""The Serve deployment class: one model, one profile, one mosel scheduler per replica."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve
from torch import nn

from mosel import methods
from mosel.errors import NotMonitoredError
from mosel.execution import Result, process_token
from mosel.monitoring import Monitoring
from mosel.profiles import Profile
from mosel.ray.request import IDS_KEY, LOAD_KEY, Feedback, Request
from mosel.runtime import attach, close, load, monitor_of, stats
from mosel.scheduler import SchedulerConfig
from mosel.stats import Load, StatsSnapshot

__all__ = ["MoselReplica"]

_log = logging.getLogger("mosel")

# ---------------------------------------------------------------------------------- the replica


class MoselReplica:
    """The Serve deployment class: one model, one profile, one mosel scheduler per replica.

    Build it with :func:`deployment` rather than directly.

    Args:
        factory: builds the model (called once, in the replica's process).
        profile: a saved profile's path, a profile's JSON form (:meth:`Profile.to_json`), or a
            function ``model -> Profile`` that profiles it here (on the replica's own device).
        scheduler: the online stage's configuration.
        monitoring: the replica's accuracy monitoring (``docs/monitoring.md``); None: off.
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        profile: str | os.PathLike[str] | Mapping[str, Any] | Callable[[nn.Module], Profile],
        scheduler: SchedulerConfig | None = None,
        monitoring: Monitoring | None = None,
    ) -> None:
        model = factory()
        if isinstance(profile, (str, os.PathLike)):
            profiled = Profile.load(profile)
        elif isinstance(profile, Mapping):
            profiled = Profile.from_json(dict(profile))
        else:
            profiled = profile(model)
        attach(model, profiled, scheduler=scheduler, monitoring=monitoring)
        self.model = model
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a plain instance, in a test)
            self.replica_id = f"local-{os.getpid()}"

    async def __call__(self, request: Request) -> Result:
        """Serve one job with the deadline left after its trip here."""
        transit_ms = max(time.time() - request.sent_at_s, 0.0) * 1000.0
        where = f"replica {self.replica_id} (ingress, routing, transport)"
        slo = request.slo.charged(transit_ms, where=where)
        result = await methods.ainfer(self.model, request.inputs, slo=slo, present=request.present)
        if request.request_id:
            monitor = monitor_of(self.model)
            if monitor is not None:
                monitor.alias(result.id, request.request_id)
        completion_ms = result.completion_ms + transit_ms
        deadline_ms = request.slo.deadline_ms
        return dataclasses.replace(
            result,
            completion_ms=completion_ms,
            queue_ms=result.queue_ms + transit_ms,
            deadline_met=None if deadline_ms is None else completion_ms <= deadline_ms,
        )

    def record_routing_stats(self) -> dict[str, Any]:
        """What this replica tells the routers (Serve polls it every ``stats_period_s``)."""
        return {LOAD_KEY: load(self.model).to_json(), "replica": self.replica_id, IDS_KEY: process_token()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The autoscaling signals of mosel, averaged per replica by Serve's controller."""
        now = load(self.model)
        return {
            "mosel_degraded_share": now.degraded_share,
            "mosel_drain_ms": now.drain_ms,
            "mosel_queued_requests": float(now.queued_requests),
        }

    def feedback(self, feedback: Feedback) -> int | None:
        """Score a served job's labels here; None when this replica holds no job of that id.

        Raises:
            NotMonitoredError: the replica's model is not monitored.
            InputError: the labels are malformed.
        """
        monitor = monitor_of(self.model)
        if monitor is None:
            raise NotMonitoredError(
                "the deployment's model is not monitored; build it with "
                "mosel.ray.deployment(..., monitoring=mosel.Monitoring())"
            )
        if not monitor.holds(feedback.result_id):
            return None
        return monitor.feedback(feedback.result_id, feedback.labels)

    def load(self) -> Load:
        """This replica's :class:`mosel.Load` now."""
        return load(self.model)

    def stats(self) -> StatsSnapshot:
        """This replica's serving statistics."""
        return stats(self.model)

    def __del__(self) -> None:
        # Serve calls __del__ on a graceful shutdown: queued jobs fail with ShutdownError.
        model = getattr(self, "model", None)
        if model is not None:
            close(model, cancel=True, timeout=5.0)
