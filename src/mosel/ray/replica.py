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
from mosel.execution import Result
from mosel.profiles import Profile
from mosel.ray.request import LOAD_KEY, Request
from mosel.runtime import attach, close, load, stats
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
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        profile: str | os.PathLike[str] | Mapping[str, Any] | Callable[[nn.Module], Profile],
        scheduler: SchedulerConfig | None = None,
    ) -> None:
        model = factory()
        if isinstance(profile, (str, os.PathLike)):
            attach(model, Profile.load(profile), scheduler=scheduler)
        elif isinstance(profile, Mapping):
            attach(model, Profile.from_json(dict(profile)), scheduler=scheduler)
        else:
            attach(model, profile(model), scheduler=scheduler)
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
        return {LOAD_KEY: load(self.model).to_json(), "replica": self.replica_id}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The autoscaling signals of mosel, averaged per replica by Serve's controller."""
        now = load(self.model)
        return {
            "mosel_degraded_share": now.degraded_share,
            "mosel_drain_ms": now.drain_ms,
            "mosel_queued_requests": float(now.queued_requests),
        }

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
