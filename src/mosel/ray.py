"""Scale a mosel model out as Ray Serve replicas, one mosel scheduler per replica.

Needs the ``ray`` extra (``pip install 'mosel[ray]'``); the rest of mosel never imports Ray.

::

    import mosel.ray
    from ray import serve

    app = mosel.ray.deployment(make_model, "av.profile.json", num_replicas=2)
    client = mosel.ray.Client(serve.run(app, name="av"))
    result = client.infer({"audio": a, "video": v}, deadline_ms=40.0, min_accuracy=0.72)

- Each replica builds its model with ``factory()``, attaches the saved profile (or profiles on
  its own device at start-up when ``profile`` is a function) and serves with its own online
  stage: the replica's scheduler sees every job routed to it.
- A :class:`Request` carries its SLO and the wall-clock time it was sent; the time it spent
  before reaching the replica (ingress, router, transport) is charged to its deadline, so the
  replica plans with the budget that is really left. A :class:`mosel.Result` comes back with
  ``completion_ms`` and ``queue_ms`` counted from the send and ``deadline_met`` against the
  caller's deadline.
- Errors: mosel's typed errors come back as the same types (:class:`Client` unwraps Ray's
  ``RayTaskError``); Serve's back-pressure (``max_queued_requests``) becomes
  :class:`mosel.QueueFullError`; a replica that dies under a job is retried on another while
  the deadline allows, then :class:`mosel.ReplicaError`.
- Routing: :class:`SlackRequestRouter`, a Ray Serve ``RequestRouter`` that reads the
  :class:`mosel.Load` each replica reports (``record_routing_stats``) and lets
  :class:`mosel.routing.SlackRouter` pick the replica where the request is predicted to get
  the highest accuracy within its deadline; with stale or missing statistics it falls back to
  Serve's power of two choices.
- Autoscaling: replicas report mosel's own signals (``record_autoscaling_stats``), which
  :class:`DegradationPolicy`, a Serve custom autoscaling policy, turns into a replica count.

Clocks: deadlines cross processes as wall-clock (``time.time``) timestamps; across hosts they
are only as good as the hosts' clock synchronisation (NTP keeps it to a millisecond or so).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import ray
import ray.exceptions
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from torch import Tensor, nn

from mosel import methods
from mosel.errors import DeadlineError, MoselError, QueueFullError, ReplicaError
from mosel.execution import Result
from mosel.profiles import Profile
from mosel.routing import RouteRequest, SlackRouter
from mosel.runtime import attach, close, load, stats
from mosel.scheduler import SchedulerConfig
from mosel.stats import Load, StatsSnapshot
from mosel.trees import Tree

__all__ = [
    "LOAD_KEY",
    "Client",
    "DegradationPolicy",
    "MoselReplica",
    "Request",
    "SlackRequestRouter",
    "autoscaling_config",
    "deployment",
]

_log = logging.getLogger("mosel")
LOAD_KEY: Final = "mosel.load"
"""The key of a replica's :class:`mosel.Load` (its JSON form) in its Serve routing stats."""
ProfileSource = str | os.PathLike[str] | Profile | Callable[[nn.Module], Profile]
"""A saved profile's path, a profile, or a function that profiles the replica's model on start-up."""
_MAX_EXPECTED: Final = 4096
"""Requests ranked and not yet routed that the router remembers (the oldest are forgotten)."""
_REPLICA_LOST: Final = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.RayActorError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)


@dataclass(frozen=True, slots=True)
class Request:
    """One job on its way to a replica: its inputs, its SLO, and when it was sent.

    Attributes:
        inputs: modality name -> tensor (or tree of tensors), as for ``model.infer``.
        deadline_ms: latency SLO counted from ``sent_at_s``; None: no deadline.
        min_accuracy: floor on the job's expected accuracy; None: no floor.
        best_effort: serve late rather than fail when the deadline cannot be met.
        confidence: plan the floor against the lower confidence bound of each accuracy.
        per_request: every request's configuration meets the floor on its own.
        present: modality -> bool tensor: which rows really have the modality.
        sent_at_s: wall-clock time (``time.time()``) the job entered the system, e.g. when the
            ingress received it; everything from then on counts against the deadline.
        rows: the job's number of requests (the router prices it); default: the first
            dimension of the first tensor in ``inputs``.
    """

    inputs: Mapping[str, Tree]
    deadline_ms: float | None = None
    min_accuracy: float | None = None
    best_effort: bool = False
    confidence: float | None = None
    per_request: bool = False
    present: Mapping[str, Tensor] | None = None
    sent_at_s: float = field(default_factory=time.time)
    rows: int = 0

    def __post_init__(self) -> None:
        if self.rows <= 0:
            object.__setattr__(self, "rows", _rows(self.inputs))

    def remaining_ms(self, now_s: float) -> float | None:
        """Deadline left at wall-clock ``now_s`` (None without a valid deadline)."""
        if not _valid_deadline(self.deadline_ms):
            return None
        assert self.deadline_ms is not None
        return self.deadline_ms - max(now_s - self.sent_at_s, 0.0) * 1000.0


def _rows(inputs: Mapping[str, Tree]) -> int:
    """The first dimension of the first tensor among the inputs (1 if there is none)."""
    pending: list[Any] = list(inputs.values())
    while pending:
        item = pending.pop(0)
        if isinstance(item, Tensor):
            return int(item.shape[0]) if item.dim() else 1
        if isinstance(item, Mapping):
            pending[:0] = list(item.values())
        elif isinstance(item, (list, tuple)):
            pending[:0] = list(item)
    return 1


def _valid_deadline(deadline_ms: object) -> bool:
    return (
        isinstance(deadline_ms, (int, float))
        and not isinstance(deadline_ms, bool)
        and math.isfinite(deadline_ms)
        and deadline_ms > 0
    )


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
        deadline: object = request.deadline_ms
        if _valid_deadline(deadline):
            assert isinstance(deadline, (int, float))
            left = deadline - transit_ms
            if left <= 0.0 and not request.best_effort:
                raise DeadlineError(
                    f"the job spent {transit_ms:.1f} ms of its {deadline:g} ms deadline before it "
                    f"reached replica {self.replica_id} (ingress, routing, transport)",
                    deadline_ms=float(deadline),
                    predicted_ms=transit_ms,
                    best_accuracy_within_deadline=None,
                )
            deadline = max(left, 1e-3)  # best effort: the fastest admissible strategy, late
        result = await methods.ainfer(
            self.model,
            request.inputs,
            deadline_ms=deadline,  # type: ignore[arg-type]  # an invalid value raises SLOError there
            min_accuracy=request.min_accuracy,
            best_effort=request.best_effort,
            confidence=request.confidence,
            per_request=request.per_request,
            present=request.present,
        )
        completion_ms = result.completion_ms + transit_ms
        return dataclasses.replace(
            result,
            completion_ms=completion_ms,
            queue_ms=result.queue_ms + transit_ms,
            deadline_met=None if result.deadline_met is None else completion_ms <= float(request.deadline_ms),  # type: ignore[arg-type]
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


# ---------------------------------------------------------------------------------- the router


def _fresh_load(routing_stats: Mapping[str, Any] | None, now_s: float, stale_after_s: float) -> Load | None:
    """The replica's reported load, or None when it has not reported or the report is stale."""
    data = (routing_stats or {}).get(LOAD_KEY)
    if data is None:
        return None
    try:
        reported = Load.from_json(data)
    except MoselError:
        return None
    return reported if reported.age_s(now_s) <= stale_after_s else None


class SlackRequestRouter(RequestRouter):  # type: ignore[misc]
    """A Ray Serve request router that sends each job where mosel predicts it does best.

    Every replica reports its :class:`mosel.Load` (predicted time until its queue drains, its
    latency margin and overhead, its recent degradation) through Serve's routing stats. For
    each request the router hands the fresh loads to :class:`mosel.routing.SlackRouter`, the
    same code the simulated scale-out uses, which predicts where the job gets the highest
    accuracy within its remaining deadline. The replicas predicted best are Serve's first
    choices (Serve takes the one with the fewest requests in flight; ``ties="slack"``: only
    SlackRouter's own pick) and the others follow, so a replica whose ``max_ongoing_requests``
    is reached passes the request on. When no replica has reported within ``stale_after_s``
    (start-up, a stalled controller) or the request is not a :class:`Request`, it falls back to Serve's
    power of two choices (two random replicas; Serve probes their queue lengths and takes the
    shorter).

    The replica chosen for a request goes to that request (Serve's default matching by request
    id; not FIFO, which would hand a replica chosen for one job's deadline to the oldest waiting
    job). A job counts against the replica Serve actually sent it to, whichever rank it came
    from: Serve calls :meth:`on_request_routed` once that replica accepted it, and the router
    records it with SlackRouter (:meth:`mosel.routing.SlackRouter.record`) at the cost it
    predicted there, so until the replica's next report its drain includes the router's own
    sends and a burst spreads instead of herding on the replica that looked emptiest. Under Ray
    Client Serve skips its rejection protocol and that hook: there only ``ties="slack"`` counts
    (its single pick, when it ranks). Configure it with :func:`deployment` (``router="slack"``);
    its keyword arguments arrive in :meth:`initialize_state` from
    ``RequestRouterConfig.request_router_kwargs``.
    """

    def initialize_state(
        self,
        profile: str | Mapping[str, Any] | None = None,
        stale_after_s: float = 1.0,
        seed: int | None = None,
        ties: Literal["serve", "slack"] = "serve",
    ) -> None:
        """Set the router up (Serve calls it once, with ``request_router_kwargs``).

        Args:
            profile: the profile the replicas serve with: a path or its JSON form.
            stale_after_s: a replica's load older than this is ignored.
            seed: seeds the random choices (ties, the fallback).
            ties: ``"serve"``: every replica SlackRouter predicts to give the best accuracy on
                time is a first choice, and Serve takes the one with the fewest requests in
                flight (it counts them exactly); ``"slack"``: SlackRouter's single pick (ties
                by its own estimate of the drain since each report), as in the simulation.
                Either way a routed job is added to that estimate for the replica it went to.
        """
        if ties not in ("serve", "slack"):
            raise ValueError(f"ties must be 'serve' or 'slack', got {ties!r}")
        self.ties = ties
        if profile is None:
            raise ValueError("SlackRequestRouter needs the replicas' profile (a path or its JSON form)")
        self.profile = Profile.load(profile) if isinstance(profile, str) else Profile.from_json(dict(profile))
        self.stale_after_s = float(stale_after_s)
        self.rng = random.Random(seed)
        self.slack = SlackRouter(self.profile, stale_after_s=self.stale_after_s)
        self.slots: dict[ReplicaID, int] = {}  # a stable index per replica, for SlackRouter's accounting
        # Serve's id of each request ranked and not yet routed -> (predicted cost per replica, rows)
        self.expected: dict[str, tuple[dict[ReplicaID, float], int]] = {}
        self.ranked: dict[str, None] = {}  # requests already counted at ranking (Ray Client), oldest first
        self.decisions: dict[str, int] = {"slack": 0, "fallback": 0}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank the candidates: mosel's choice first, then the rest (or two random ones).

        Nothing is counted here: Serve may call this several times for one request (while every
        replica is full, or after a rejection) and then take a replica of any rank. The
        predicted costs are kept (by Serve's request id) until :meth:`on_request_routed` says
        where the job went.
        """
        if not candidate_replicas:
            return []
        now_s = time.time()
        request = _request_of(pending_request)
        first, costs = self._choose(candidate_replicas, request, now_s)
        if request is not None:
            if getattr(self, "_use_replica_queue_len_cache", True):
                self._expect(pending_request, costs, request.rows)
            elif self.ties == "slack" and first and self._first_ranking(pending_request):
                # Serve runs without its rejection protocol (Ray Client) and never calls
                # on_request_routed: count SlackRouter's single pick now, where it will go
                # (once: Serve may rank the same request again while every replica is full).
                chosen = first[0].replica_id
                self.slack.record(self.slots[chosen], now_s, costs.get(chosen), request.rows)
        if not first:
            self.decisions["fallback"] += 1
            return [self.rng.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        self.decisions["slack"] += 1
        return [first, [r for r in candidate_replicas if r not in first]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Count the job against the replica Serve sent it to (Serve calls this once it accepted it).

        The job is priced as SlackRouter predicted it on that replica when it ranked them (any
        rank); a replica it had no prediction for (no fresh load, a power-of-two fallback) gets
        the job's requests without a cost, as :meth:`SlackRouter.choose` does on its fallback.
        A request that is not a :class:`Request` (another method's call) is not counted.
        """
        key = _request_key(pending_request)
        expected = None if key is None else self.expected.pop(key, None)
        if expected is None:
            return
        costs, rows = expected
        try:
            slot = self.slots.setdefault(replica_id, len(self.slots))
            self.slack.record(slot, time.time(), costs.get(replica_id), rows)
        except Exception:  # never fail a request Serve has already sent over the router's books
            _log.exception("mosel.ray: could not count a job sent to %s", replica_id)

    def _first_ranking(self, pending: PendingRequest | None) -> bool:
        """Is this the first time the router ranks this request (by Serve's request id)?"""
        key = _request_key(pending)
        if key is None:
            return True
        if key in self.ranked:
            return False
        self.ranked[key] = None
        while len(self.ranked) > _MAX_EXPECTED:
            self.ranked.pop(next(iter(self.ranked)))
        return True

    def _expect(self, pending: PendingRequest | None, costs: dict[ReplicaID, float], rows: int) -> None:
        """Keep a request's predicted costs until Serve says where it went (the newest ranking wins)."""
        key = _request_key(pending)
        if key is None:
            return
        self.expected.pop(key, None)
        self.expected[key] = (costs, rows)
        while len(self.expected) > _MAX_EXPECTED:  # requests cancelled, or sent without the hook
            self.expected.pop(next(iter(self.expected)))

    def _choose(
        self, candidates: list[RunningReplica], request: Request | None, now_s: float
    ) -> tuple[list[RunningReplica] | None, dict[ReplicaID, float]]:
        """SlackRouter's first choices among the candidates, and the request's cost on each.

        The first choices are None to fall back to power of two; the costs are SlackRouter's
        predicted costs of the request on each candidate it priced.
        """
        if request is None:
            return None, {}
        by_id = {r.replica_id: r for r in candidates}
        for replica_id in by_id:
            self.slots.setdefault(replica_id, len(self.slots))
        loads: list[Load | None] = [None] * len(self.slots)
        for replica_id, slot in self.slots.items():
            replica = by_id.get(replica_id)
            if replica is not None:
                loads[slot] = _fresh_load(replica.routing_stats, now_s, self.stale_after_s)
        if all(x is None for x in loads):
            return None, {}
        replica_at = {slot: by_id[i] for i, slot in self.slots.items() if i in by_id}
        try:
            routed = self._route_request(request, now_s)
            predictions = self.slack.predict(loads, routed, now_s)
        except MoselError:  # a bad SLO or inputs: the replica raises the typed error to the caller
            return None, {}
        known = [(slot, p) for slot, p in enumerate(predictions) if p is not None and slot in replica_at]
        costs = {replica_at[slot].replica_id: p.cost_ms for slot, p in known}
        if self.ties == "slack":
            chosen = replica_at.get(self.slack.pick(loads, predictions, self.rng))
            return (None if chosen is None else [chosen]), costs
        if not known:
            return None, costs
        meeting = [(slot, p) for slot, p in known if p.meets]
        if meeting:
            top = max(p.accuracy for _, p in meeting)
            return [replica_at[slot] for slot, p in meeting if p.accuracy >= top - 1e-9], costs
        first = min(p.finish_ms for _, p in known)
        return [replica_at[slot] for slot, p in known if p.finish_ms <= first], costs

    def _route_request(self, request: Request, now_s: float) -> RouteRequest:
        modalities = self.profile.modalities
        available = frozenset(m for m, x in request.inputs.items() if x is not None and m in modalities)
        left = request.remaining_ms(now_s)
        return RouteRequest(
            n=request.rows,
            deadline_ms=left,
            min_accuracy=request.min_accuracy,
            available=available or None,
        )


def _request_key(pending: PendingRequest | None) -> str | None:
    """The id Serve gives the request (the same across its routing attempts)."""
    key = getattr(getattr(pending, "metadata", None), "internal_request_id", None)
    return key if isinstance(key, str) and key else None


def _request_of(pending: PendingRequest | None) -> Request | None:
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, Request):
            return arg
    return None


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
        stale_after_s: the router ignores a replica's load older than this.
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
        priced = router_profile if router_profile is not None else profile
        if isinstance(priced, Profile):
            priced_json: Any = priced.to_json()
        elif isinstance(priced, (str, os.PathLike)):
            priced_json = Profile.load(priced).to_json()
        else:
            raise ValueError(
                "router='slack' with a profiling function needs router_profile= (a path or a Profile)"
            )
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=SlackRequestRouter,
            request_router_kwargs={
                "profile": priced_json,
                "stale_after_s": stale_after_s,
                "seed": seed,
                "ties": ties,
            },
            **stats,
        )
    elif stats:  # Serve's router, with the replicas polled as often as the slack router's (a control)
        options["request_router_config"] = RequestRouterConfig(**stats)
    return serve.deployment(MoselReplica).options(**options).bind(factory, source, scheduler)


# ---------------------------------------------------------------------------------- the caller


class Client:
    """Calls a mosel deployment through its ``DeploymentHandle`` with mosel's signature and errors.

    Args:
        handle: what ``serve.run(app)`` (or ``serve.get_deployment_handle``) returned.
        retries: how many times a job whose replica died is sent again (while its deadline
            leaves time); then :class:`mosel.ReplicaError`.
        timeout_s: the longest a call waits for its result; then :class:`mosel.ReplicaError`.
    """

    def __init__(self, handle: DeploymentHandle, *, retries: int = 2, timeout_s: float = 60.0) -> None:
        self.handle = handle
        self.retries = retries
        self.timeout_s = timeout_s

    def request(self, inputs: Mapping[str, Tree], **slo: Any) -> Request:
        """A :class:`Request` stamped now (``slo``: the keyword arguments of ``model.infer``)."""
        return Request(inputs, **slo)

    def infer(self, inputs: Mapping[str, Tree] | Request, **slo: Any) -> Result:
        """``model.infer`` on the deployment: blocks until the job's result or typed error."""
        request = inputs if isinstance(inputs, Request) else self.request(inputs, **slo)
        for attempt in range(self.retries + 1):
            response = self.handle.remote(request)
            try:
                result: Result = response.result(timeout_s=self.timeout_s)
                return result
            except BaseException as exc:
                self._settle(exc, response, request, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def ainfer(self, inputs: Mapping[str, Tree] | Request, **slo: Any) -> Result:
        """``await model.ainfer`` on the deployment (call it from inside an event loop)."""
        request = inputs if isinstance(inputs, Request) else self.request(inputs, **slo)
        for attempt in range(self.retries + 1):
            response = self.handle.remote(request)
            try:
                result: Result = await asyncio.wait_for(_awaited(response), self.timeout_s)
                return result
            except BaseException as exc:
                self._settle(exc, response, request, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _settle(
        self, exc: BaseException, response: DeploymentResponse, request: Request, attempt: int
    ) -> None:
        """Turn what a call raised into mosel's error, or return to retry it."""
        error = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        if isinstance(error, MoselError):
            raise error from None
        if isinstance(error, BackPressureError):
            raise QueueFullError(f"the deployment is overloaded: {error}") from error
        if isinstance(error, (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError)):
            response.cancel()
            raise ReplicaError(f"no result within {self.timeout_s:g} s") from error
        if isinstance(error, _REPLICA_LOST):
            left = request.remaining_ms(time.time())
            if attempt < self.retries and (left is None or left > 0.0 or request.best_effort):
                _log.warning("mosel.ray: replica lost under a job (%s); retrying", type(error).__name__)
                return
            raise ReplicaError(f"the replica serving the job was lost: {error}") from error
        if not isinstance(exc, Exception):  # cancelled, interrupted: the job is withdrawn
            response.cancel()
            raise exc
        raise error


async def _awaited(response: DeploymentResponse) -> Any:
    return await response
