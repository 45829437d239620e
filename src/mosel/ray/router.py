"""The slack-aware Ray Serve request router: each replica's load report prices the request there."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from mosel.errors import MoselError
from mosel.profiles import Profile
from mosel.ray.request import IDS_KEY, LOAD_KEY, Feedback, Request
from mosel.routing import RouteRequest, SlackRouter
from mosel.stats import Load

__all__ = ["SlackRequestRouter"]

_log = logging.getLogger("mosel")

_MAX_EXPECTED: Final = 4096
"""Requests ranked and not yet routed that the router remembers (the oldest are forgotten)."""
_FORGET_AFTER_S: Final = 60.0
"""The router forgets a replica that has been no candidate for this long (at least 10 x stale_after_s)."""
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
    router first saw it, and a replica that keeps renewing its load is known however far its
    clock lags (the loads' age counts on this process's clock). When no replica has a fresh
    load (start-up, a stalled controller) or the request is not a :class:`Request`, it falls
    back to Serve's power of two choices (two random replicas; Serve probes their queue lengths
    and takes the shorter).

    A :class:`Feedback` (a job's labels, :meth:`Client.feedback`) goes to the replica whose
    result ids it carries (each replica reports its process token), the others after; it is not
    a job and counts against nothing.

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
        feedback = _feedback_of(pending_request)
        if feedback is not None:  # labels go to the replica whose process served the job
            token = feedback.token
            home = [r for r in candidate_replicas if token and (r.routing_stats or {}).get(IDS_KEY) == token]
            return [home, [r for r in candidate_replicas if r not in home]] if home else [candidate_replicas]
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


def _feedback_of(pending: PendingRequest | None) -> Feedback | None:
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, Feedback):
            return arg
    return None


def _request_of(pending: PendingRequest | None) -> Request | None:
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, Request):
            return arg
    return None
