"""Autoscaling on mosel's own signals: a Serve custom policy and its configuration."""

from __future__ import annotations

import logging
import statistics
from typing import Any

from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

__all__ = ["DegradationPolicy", "autoscaling_config"]

_log = logging.getLogger("mosel")

# ---------------------------------------------------------------------------------- autoscaling


class DegradationPolicy:
    """A Ray Serve custom autoscaling policy driven by mosel's own signals.

    Each replica reports the share of its recent jobs served below their best accuracy
    (``mosel_degraded_share``) and its predicted drain time (``mosel_drain_ms``). The policy
    adds a replica while the mean share is above ``upper`` (or the mean drain above
    ``drain_upper_ms``, when given), removes one while the share is below ``lower`` and the
    drain below half of ``drain_upper_ms``, and otherwise keeps the count. Serve applies
    ``min_replicas``/``max_replicas`` and the up/down-scale delays around it.

    Args:
        upper: degraded share above which to scale up.
        lower: degraded share below which to scale down.
        drain_upper_ms: predicted drain time above which to scale up; None: not used.
    """

    def __init__(self, upper: float = 0.25, lower: float = 0.02, drain_upper_ms: float | None = None) -> None:
        if not 0.0 <= lower < upper <= 1.0:
            raise ValueError(f"need 0 <= lower < upper <= 1, got lower={lower}, upper={upper}")
        self.upper = upper
        self.lower = lower
        self.drain_upper_ms = drain_upper_ms

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        """The replica count mosel's signals ask for."""
        metrics = ctx.aggregated_metrics or {}
        shares = list((metrics.get("mosel_degraded_share") or {}).values())
        drains = list((metrics.get("mosel_drain_ms") or {}).values())
        current = ctx.current_num_replicas
        if not shares:
            return ctx.target_num_replicas, ctx.policy_state
        share = statistics.fmean(shares)
        drain = statistics.fmean(drains) if drains else 0.0
        limit = self.drain_upper_ms
        if share > self.upper or (limit is not None and drain > limit):
            desired = current + 1
        elif share < self.lower and (limit is None or drain < limit / 2):
            desired = current - 1
        else:
            desired = current
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        state = dict(ctx.policy_state)
        state["mosel"] = {"degraded_share": share, "drain_ms": drain, "desired": desired}
        return desired, state


def autoscaling_config(
    *,
    min_replicas: int = 1,
    max_replicas: int = 4,
    upper: float = 0.25,
    lower: float = 0.02,
    drain_upper_ms: float | None = None,
    upscale_delay_s: float = 5.0,
    downscale_delay_s: float = 60.0,
    look_back_period_s: float = 12.0,
    **options: Any,
) -> AutoscalingConfig:
    """A Serve ``AutoscalingConfig`` that scales on :class:`DegradationPolicy`.

    Replicas report their signals every ``RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S``
    (an environment variable of the Ray cluster; Serve's default is 10 s, set it lower for
    faster reactions); Serve averages them over ``look_back_period_s`` (which it wants above its
    deprecated ``metrics_interval_s``, 10 s). ``options`` go to ``AutoscalingConfig`` as they are.
    """
    return AutoscalingConfig(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        upscale_delay_s=upscale_delay_s,
        downscale_delay_s=downscale_delay_s,
        look_back_period_s=look_back_period_s,
        policy=AutoscalingPolicy(
            policy_function=DegradationPolicy,
            policy_kwargs={"upper": upper, "lower": lower, "drain_upper_ms": drain_upper_ms},
        ),
        **options,
    )
