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
  the deadline allows, then :class:`mosel.ReplicaError`. Every wait of :class:`Client` ends by
  the deadline plus its ``grace_ms`` (:class:`mosel.DeadlineError`), or ``timeout_s`` without
  one; a cancelled caller cancels its job, which leaves the replica's queue.
- Routing: :class:`SlackRequestRouter`, a Ray Serve ``RequestRouter`` that reads the
  :class:`mosel.Load` each replica reports (``record_routing_stats``) and lets
  :class:`mosel.routing.SlackRouter` pick the replica where the request is predicted to get
  the highest accuracy within its deadline; a replica without a fresh report gets bounded
  probe traffic; with no fresh statistics at all it falls back to Serve's power of two
  choices. :func:`http_ingress` puts an HTTP front door before the deployment whose requests
  the slack router places (Serve's proxy alone routes HTTP by Serve's own router).
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
from mosel.errors import DeadlineError, InputError, MoselError, QueueFullError, ReplicaError
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
    "HTTPIngress",
    "MoselReplica",
    "Request",
    "SlackRequestRouter",
    "autoscaling_config",
    "deployment",
    "http_ingress",
]

_log = logging.getLogger("mosel")
LOAD_KEY: Final = "mosel.load"
"""The key of a replica's :class:`mosel.Load` (its JSON form) in its Serve routing stats."""
ProfileSource = str | os.PathLike[str] | Profile | Callable[[nn.Module], Profile]
"""A saved profile's path, a profile, or a function that profiles the replica's model on start-up."""
_MAX_EXPECTED: Final = 4096
"""Requests ranked and not yet routed that the router remembers (the oldest are forgotten)."""
_FORGET_AFTER_S: Final = 60.0
"""The router forgets a replica that has been no candidate for this long (at least 10 x stale_after_s)."""
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


def _reported_load(routing_stats: Mapping[str, Any] | None) -> Load | None:
    """The replica's last reported load, whatever its age (None: none, or unreadable)."""
    data = (routing_stats or {}).get(LOAD_KEY)
    if data is None:
        return None
    try:
        return Load.from_json(data)
    except MoselError:
        return None


class SlackRequestRouter(RequestRouter):  # type: ignore[misc]
    """A Ray Serve request router that sends each job where mosel predicts it does best.

    Every replica reports its :class:`mosel.Load` (predicted time until its queue drains, its
    latency margin and overhead, its recent degradation) through Serve's routing stats. For
    each request the router hands the loads to :class:`mosel.routing.SlackRouter`, the same
    code the simulated scale-out uses, which predicts where the job gets the highest accuracy
    within its remaining deadline. The replicas predicted best are Serve's first choices (Serve
    takes the one with the fewest requests in flight; ``ties="slack"``: only SlackRouter's own
    pick) and the others follow, so a replica whose ``max_ongoing_requests`` is reached passes
    the request on.

    A replica whose load is missing or older than ``stale_after_s`` (one Serve just started,
    one whose reports stopped) is unknown, not absent: while another replica has a fresh load,
    SlackRouter prices it as a probe (optimistically) and it takes at most ``probe_jobs`` jobs
    per ``stale_after_s`` while a known replica is predicted on time, and every job it is
    predicted to finish first when every known replica is predicted late. A load stamped
    ahead of this process's clock (the replica's host clock runs ahead) reads as taken when the
    router first saw it. When no replica has a fresh load (start-up, a stalled controller) or
    the request is not a :class:`Request`, it falls back to Serve's power of two choices (two
    random replicas; Serve probes their queue lengths and takes the shorter).

    The replica chosen for a request goes to that request (Serve's default matching by request
    id; not FIFO, which would hand a replica chosen for one job's deadline to the oldest waiting
    job). A job counts against the replica Serve actually sent it to, whichever rank it came
    from: Serve calls :meth:`on_request_routed` once that replica accepted it, and the router
    records it with SlackRouter (:meth:`mosel.routing.SlackRouter.record`) at the cost it
    predicted there, so until the replica's next report its drain includes the router's own
    sends and a burst spreads instead of herding on the replica that looked emptiest. Under Ray
    Client Serve skips its rejection protocol and that hook: there the router counts a job
    when it first ranks it, where it will go: SlackRouter's single pick (``ties="slack"``), or
    an unknown replica it ranks alone first (a probe); other ``ties="serve"`` jobs are not
    counted. The router's state is bounded: what SlackRouter keeps (see there), requests
    awaiting the hook (4096 at most), and the replicas it has seen, forgotten a minute after
    they leave. Configure it with :func:`deployment` (``router="slack"``); its keyword
    arguments arrive in :meth:`initialize_state` from ``RequestRouterConfig.request_router_kwargs``.
    """

    def initialize_state(
        self,
        profile: str | Mapping[str, Any] | None = None,
        stale_after_s: float = 1.0,
        seed: int | None = None,
        ties: Literal["serve", "slack"] = "serve",
        probe_jobs: int = 4,
    ) -> None:
        """Set the router up (Serve calls it once, with ``request_router_kwargs``).

        Args:
            profile: the profile the replicas serve with: a path or its JSON form.
            stale_after_s: a replica whose load is older than this is unknown.
            seed: seeds the random choices (ties, the fallback).
            ties: ``"serve"``: every replica SlackRouter predicts to give the best accuracy on
                time is a first choice, and Serve takes the one with the fewest requests in
                flight (it counts them exactly); ``"slack"``: SlackRouter's single pick (ties
                by its own estimate of the drain since each report), as in the simulation.
                Either way a routed job is added to that estimate for the replica it went to.
            probe_jobs: jobs an unknown replica may hold while a known one is predicted on
                time (see :class:`mosel.routing.SlackRouter`).
        """
        if ties not in ("serve", "slack"):
            raise ValueError(f"ties must be 'serve' or 'slack', got {ties!r}")
        self.ties = ties
        if profile is None:
            raise ValueError("SlackRequestRouter needs the replicas' profile (a path or its JSON form)")
        self.profile = Profile.load(profile) if isinstance(profile, str) else Profile.from_json(dict(profile))
        self.stale_after_s = float(stale_after_s)
        self.rng = random.Random(seed)
        self.slack = SlackRouter(self.profile, stale_after_s=self.stale_after_s, probe_jobs=probe_jobs)
        self.slots: dict[ReplicaID, int] = {}  # a stable index per replica, for SlackRouter's accounting
        self.free: list[int] = []  # indices of forgotten replicas, to reuse
        self.width = 0  # indices handed out so far
        self.absent_since: dict[ReplicaID, float] = {}  # known replicas that were no candidate since
        self.forget_after_s = max(_FORGET_AFTER_S, 10.0 * self.stale_after_s)
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
        first, costs, probes = self._choose(candidate_replicas, request, now_s)
        if request is not None:
            if getattr(self, "_use_replica_queue_len_cache", True):
                self._expect(pending_request, costs, request.rows)
            elif first and (self.ties == "slack" or any(r.replica_id in probes for r in first)):
                # Serve runs without its rejection protocol (Ray Client) and never calls
                # on_request_routed: count a single pick now, where it will go (once: Serve may
                # rank the same request again while every replica is full).
                if self.ties == "serve":
                    first = [self.rng.choice([r for r in first if r.replica_id in probes])]
                if self._first_ranking(pending_request):
                    chosen = first[0].replica_id
                    self.slack.record(self._slot(chosen), now_s, costs.get(chosen), request.rows)
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
            self.slack.record(self._slot(replica_id), time.time(), costs.get(replica_id), rows)
        except Exception:  # never fail a request Serve has already sent over the router's books
            _log.exception("mosel.ray: could not count a job sent to %s", replica_id)

    def _slot(self, replica_id: ReplicaID) -> int:
        """The replica's index in SlackRouter's books (a new one, or a forgotten one's, if new)."""
        slot = self.slots.get(replica_id)
        if slot is None:
            if self.free:
                slot = self.free.pop()
            else:
                slot, self.width = self.width, self.width + 1
            self.slots[replica_id] = slot
        return slot

    def _forget_the_gone(self, present: Mapping[ReplicaID, Any], now_s: float) -> None:
        """Forget the replicas that have been no candidate for ``forget_after_s`` (they left)."""
        for replica_id in present:
            self.absent_since.pop(replica_id, None)
        if len(present) == len(self.slots):
            return
        for replica_id in [r for r in self.slots if r not in present]:
            since = self.absent_since.setdefault(replica_id, now_s)
            if now_s - since > self.forget_after_s:
                slot = self.slots.pop(replica_id)
                del self.absent_since[replica_id]
                self.slack.forget(slot)
                self.free.append(slot)

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
    ) -> tuple[list[RunningReplica] | None, dict[ReplicaID, float], set[ReplicaID]]:
        """SlackRouter's first choices among the candidates, the request's cost on each, the probes.

        The first choices are None to fall back to power of two; the costs are SlackRouter's
        predicted costs of the request on each candidate it priced; the probes are the
        candidates without a fresh load that it priced.
        """
        if request is None:
            return None, {}, set()
        by_id = {r.replica_id: r for r in candidates}
        self._forget_the_gone(by_id, now_s)
        replica_at = {self._slot(replica_id): replica for replica_id, replica in by_id.items()}
        loads: list[Load | None] = [None] * self.width
        for slot, replica in replica_at.items():
            loads[slot] = _reported_load(replica.routing_stats)
        try:
            routed = self._route_request(request, now_s)
            predictions = self.slack.predict(loads, routed, now_s, replicas=replica_at)
        except MoselError:  # a bad SLO or inputs: the replica raises the typed error to the caller
            return None, {}, set()
        priced = [(slot, p) for slot, p in enumerate(predictions) if p is not None]
        costs = {replica_at[slot].replica_id: p.cost_ms for slot, p in priced}
        probes = {replica_at[slot].replica_id for slot, p in priced if not p.known}
        if not any(p.known for _, p in priced):  # no fresh load: power of two
            return None, costs, probes
        if self.ties == "slack":
            return [replica_at[self.slack.pick(loads, predictions, self.rng)]], costs, probes
        meeting = [(slot, p) for slot, p in priced if p.meets]
        if meeting:
            top = max(p.accuracy for _, p in meeting)
            return [replica_at[slot] for slot, p in meeting if p.accuracy >= top - 1e-9], costs, probes
        first = min(p.finish_ms for _, p in priced)
        return [replica_at[slot] for slot, p in priced if p.finish_ms <= first], costs, probes

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
    probe_jobs: int = 4,
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
                "probe_jobs": probe_jobs,
            },
            **stats,
        )
    elif stats:  # Serve's router, with the replicas polled as often as the slack router's (a control)
        options["request_router_config"] = RequestRouterConfig(**stats)
    return serve.deployment(MoselReplica).options(**options).bind(factory, source, scheduler)


# ---------------------------------------------------------------------------------- HTTP


class HTTPIngress:
    """A Serve ingress deployment: mosel's ``POST /predict`` in front of a mosel deployment.

    Build it with :func:`http_ingress`. Serve's HTTP proxy routes a request to an ingress
    replica with Serve's own router (the request is opaque bytes to it); the ingress decodes
    it and calls the mosel deployment through its handle with a :class:`Request`, so that
    :class:`SlackRequestRouter` picks the mosel replica, and the time before (upstream, the
    proxy, the ingress) is charged to the deadline. The routes and bodies are those of
    :mod:`mosel.http` (``docs/http.md``): ``POST /predict`` and ``GET /healthz``; a
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
        try:
            result = await self.client.ainfer(job)
        except MoselError as exc:
            return _answer_error(exc)
        output = result.output
        prediction = None
        if isinstance(output, Tensor) and output.dim() >= 2 and output.is_floating_point():
            prediction = output.argmax(dim=-1).tolist()
        answer = http.PredictResponse(
            outputs=http.encode_output(output),
            prediction=prediction,
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


# ---------------------------------------------------------------------------------- the caller


class Client:
    """Calls a mosel deployment through its ``DeploymentHandle`` with mosel's signature and errors.

    Every wait on the caller's behalf (for the result, for a replica to take the job, behind a
    replica's restart, before a retry) ends by the job's deadline plus ``grace_ms``; a job
    without a deadline, or best effort, waits at most ``timeout_s`` in all. Then the call
    cancels what it sent and raises :class:`mosel.DeadlineError` (the deadline passed; its
    ``predicted_ms`` and message give the time really spent since the job was sent) or
    :class:`mosel.ReplicaError` (``timeout_s`` passed). A job whose replica died under it is
    sent again (Serve takes another live replica, or waits for one) while its deadline leaves
    time and ``retries`` last; else :class:`mosel.ReplicaError`. Cancelling the caller (a
    cancelled ``ainfer`` task, Ctrl-C in ``infer``) cancels the Serve request: a job still in the
    replica's mosel queue is withdrawn and never computed (one already running finishes, its
    result unclaimed).

    Args:
        handle: what ``serve.run(app)`` (or ``serve.get_deployment_handle``) returned.
        retries: how many times a job whose replica died is sent again (while its deadline
            leaves time); then :class:`mosel.ReplicaError`.
        timeout_s: the longest a call waits in all, its retries included, when its job has no
            deadline or is best effort (and at most, with one); then :class:`mosel.ReplicaError`.
        grace_ms: how long past its deadline a call still waits for the replica's answer (a
            result that finished a little late, a typed error on its way back); then
            :class:`mosel.DeadlineError`.
    """

    def __init__(
        self, handle: DeploymentHandle, *, retries: int = 2, timeout_s: float = 60.0, grace_ms: float = 100.0
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError(f"Client retries must be an int >= 0, got {retries!r}")
        for name, value in (("timeout_s", timeout_s), ("grace_ms", grace_ms)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"Client {name} must be a finite number, got {value!r}")
        if timeout_s <= 0 or grace_ms < 0:
            raise InputError(
                f"Client needs timeout_s > 0 and grace_ms >= 0, got {timeout_s!r} and {grace_ms!r}"
            )
        self.handle = handle
        self.retries = retries
        self.timeout_s = float(timeout_s)
        self.grace_ms = float(grace_ms)

    def request(self, inputs: Mapping[str, Tree], **slo: Any) -> Request:
        """A :class:`Request` stamped now (``slo``: the keyword arguments of ``model.infer``)."""
        return Request(inputs, **slo)

    def infer(self, inputs: Mapping[str, Tree] | Request, **slo: Any) -> Result:
        """``model.infer`` on the deployment: blocks until the job's result or typed error."""
        call = _Call(self, inputs if isinstance(inputs, Request) else self.request(inputs, **slo))
        while True:
            wait_s = call.wait_s()
            response = self.handle.remote(call.request)
            try:
                result: Result = response.result(timeout_s=wait_s)
                return result
            except BaseException as exc:
                call.settle(exc, response)

    async def ainfer(self, inputs: Mapping[str, Tree] | Request, **slo: Any) -> Result:
        """``await model.ainfer`` on the deployment (call it from inside an event loop)."""
        call = _Call(self, inputs if isinstance(inputs, Request) else self.request(inputs, **slo))
        while True:
            wait_s = call.wait_s()
            response = self.handle.remote(call.request)
            try:
                result: Result = await asyncio.wait_for(_awaited(response), wait_s)
                return result
            except BaseException as exc:
                call.settle(exc, response)


class _Call:
    """One :class:`Client` call: its job, its attempts, and the bound on its waits."""

    __slots__ = ("attempt", "client", "deadline_binds", "lost", "request", "started")

    def __init__(self, client: Client, request: Request) -> None:
        self.client = client
        self.request = request
        self.started = time.monotonic()
        self.attempt = 0
        self.lost: BaseException | None = None  # the replica loss that caused the last retry
        self.deadline_binds = False

    def wait_s(self) -> float:
        """How long the next wait may last; raises the call's typed error when nothing is left."""
        client, request = self.client, self.request
        by_timeout = client.timeout_s - (time.monotonic() - self.started)
        left_ms = None if request.best_effort else request.remaining_ms(time.time())
        by_deadline = math.inf if left_ms is None else (left_ms + client.grace_ms) / 1000.0
        self.deadline_binds = by_deadline <= by_timeout
        wait = min(by_timeout, by_deadline)
        if wait <= 0.0:
            raise self.expired()
        return wait

    def expired(self) -> MoselError:
        """The error of a call whose deadline (plus grace) or timeout passed before an answer."""
        request, client = self.request, self.client
        lost = ""
        if self.lost is not None:
            lost = (
                f"; its replica was lost ({type(self.lost).__name__}), no replica answered the retry in time"
            )
        if self.deadline_binds and request.deadline_ms is not None:
            spent_ms = max(time.time() - request.sent_at_s, 0.0) * 1000.0
            return DeadlineError(
                f"no answer within the job's {request.deadline_ms:g} ms deadline and the client's "
                f"{client.grace_ms:g} ms grace: {spent_ms:.0f} ms spent since it was sent{lost}; the "
                "request was cancelled",
                deadline_ms=float(request.deadline_ms),
                predicted_ms=spent_ms,
                best_accuracy_within_deadline=None,
            )
        return ReplicaError(
            f"no answer within the client's timeout_s={client.timeout_s:g} s{lost}; the request was "
            "cancelled (raise timeout_s, or give the job a deadline)"
        )

    def settle(self, exc: BaseException, response: DeploymentResponse) -> None:
        """Turn what a wait raised into mosel's error, or return to send the job again."""
        error = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, BaseException):
            error = error.cause
        if isinstance(error, MoselError):
            raise error from None
        if isinstance(error, BackPressureError):
            raise QueueFullError(f"the deployment is overloaded: {error}") from error
        if isinstance(error, (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError)):
            _cancel(response)
            raise self.expired() from None
        if isinstance(error, _REPLICA_LOST):
            self.lost = error
            request = self.request
            left = request.remaining_ms(time.time())
            if self.attempt >= self.client.retries:
                raise ReplicaError(
                    f"the replica serving the job was lost ({type(error).__name__}) and its "
                    f"{self.client.retries} retries are spent: {error}"
                ) from error
            if left is not None and left <= 0.0 and not request.best_effort:
                raise ReplicaError(
                    f"the replica serving the job was lost ({type(error).__name__}) and no time is "
                    f"left before its {request.deadline_ms:g} ms deadline to send it again: {error}"
                ) from error
            self.attempt += 1
            _log.warning("mosel.ray: replica lost under a job (%s); retrying", type(error).__name__)
            return
        if not isinstance(exc, Exception):  # cancelled, interrupted: the job is withdrawn
            _cancel(response)
            raise exc
        raise error


def _cancel(response: DeploymentResponse) -> None:
    """Cancel a Serve request (best effort: a request that already finished stays so)."""
    try:
        response.cancel()
    except Exception:  # never hide the caller's own error behind a failed cancel
        _log.debug("mosel.ray: could not cancel a request", exc_info=True)


async def _awaited(response: DeploymentResponse) -> Any:
    return await response
