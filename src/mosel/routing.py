"""Request routers for scale-out: which replica of a model should serve the next request.

Each replica runs its own mosel scheduler and reports a :class:`mosel.Load` now and then; a
router picks a replica for each incoming request from the loads it last saw. Pure Python, no
serving framework: the same routers run in :func:`mosel.simulate_replicas` (virtual clock) and
behind a real deployment (wall clock; ``now_s`` and :attr:`Load.at_s` are then ``time.time()``).

- :class:`RandomRouter`: uniformly at random.
- :class:`PowerOfTwoRouter`: two replicas at random, the one with fewer queued requests (the
  idea of Ray Serve's default router), counting the requests it sent since each report.
- :class:`SlackRouter`: the replica where the request is predicted to get the highest accuracy
  within its deadline, from the profile's strategy frontiers priced at each replica's reported
  latency correction, margin, overhead and drain, plus what the router itself sent there since
  the report.
"""

from __future__ import annotations

import bisect
import math
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mosel.errors import InputError, SLOError
from mosel.jobs import chunk_sizes, floor_units
from mosel.plan import ACCURACY_SCALE, Strategy
from mosel.profiles import Profile
from mosel.stats import Load

__all__ = [
    "PowerOfTwoRouter",
    "Prediction",
    "RandomRouter",
    "RouteRequest",
    "Router",
    "SlackRouter",
]

Configuration = frozenset[str]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a router knows of a request (one job) when it picks a replica.

    Attributes:
        n: requests (rows) in the job.
        deadline_ms: the budget left until the job's deadline, from the moment of routing
            (None: no deadline).
        min_accuracy: the job's accuracy floor (None: none).
        available: the modalities the job carries (None: every modality of the profile).
    """

    n: int
    deadline_ms: float | None = None
    min_accuracy: float | None = None
    available: Configuration | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
            raise InputError(f"RouteRequest.n must be an int >= 1 (requests in the job), got {self.n!r}")
        if self.deadline_ms is not None and (
            isinstance(self.deadline_ms, bool)
            or not isinstance(self.deadline_ms, numbers.Real)
            or not math.isfinite(self.deadline_ms)
        ):
            raise SLOError(
                f"RouteRequest.deadline_ms must be a finite number of milliseconds left (or None), "
                f"got {self.deadline_ms!r}"
            )
        if self.min_accuracy is not None and (
            isinstance(self.min_accuracy, bool)
            or not isinstance(self.min_accuracy, numbers.Real)
            or not 0.0 <= self.min_accuracy <= 1.0
        ):
            raise SLOError(
                f"RouteRequest.min_accuracy must be in [0, 1] (or None), got {self.min_accuracy!r}"
            )


class Router(Protocol):
    """Picks a replica for each request."""

    name: str

    def choose(
        self, loads: Sequence[Load | None], request: RouteRequest, now_s: float, rng: random.Random
    ) -> int:
        """The index of the replica that should serve ``request``.

        Args:
            loads: each replica's last reported load (None: none received yet).
            request: the request to place.
            now_s: the time now, on the clock of the loads' ``at_s``.
            rng: the router's source of randomness (seeded in simulations).
        """
        ...


class _Sent:
    """Requests a router sent to each replica after that replica's last report.

    A report taken at ``at_s`` already counts what arrived before it; what the router sent
    since is added locally, so that a burst between two reports is not sent to one replica.
    Entries are (sent at, priced cost in ms, requests), oldest first.
    """

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent: list[list[tuple[float, float, int]]] = []

    def since(self, i: int, load: Load | None) -> list[tuple[float, float, int]]:
        """What was sent to replica ``i`` after ``load`` was taken (older entries are dropped)."""
        while len(self.sent) <= i:
            self.sent.append([])
        entries = self.sent[i]
        if load is not None and entries and entries[0][0] <= load.at_s:
            entries[:] = [e for e in entries if e[0] > load.at_s]
        return entries

    def drain_ms(self, i: int, load: Load, now_s: float) -> float:
        """Replica ``i``'s predicted drain now: its report's, less the time since, plus what was sent.

        The replica is a fluid queue: it drains at one millisecond per millisecond and each
        request sent adds its priced cost when sent. A replica whose running batch overran its
        prediction at the report (:attr:`Load.overrun_ms`) is stalled: it drains nothing until
        a later report says otherwise.
        """
        rate = 0.0 if load.overrun_ms > 0.0 else 1000.0
        backlog, at = load.drain_ms, load.at_s
        for sent_at, cost_ms, _ in self.since(i, load):
            backlog = max(backlog - (sent_at - at) * rate, 0.0) + cost_ms
            at = sent_at
        return max(backlog - (now_s - at) * rate, 0.0)

    def queued_requests(self, i: int, load: Load | None) -> int:
        """Replica ``i``'s reported queued requests plus the requests sent there since."""
        reported = 0 if load is None else load.queued_requests
        return reported + sum(requests for _, _, requests in self.since(i, load))

    def add(self, i: int, now_s: float, cost_ms: float, requests: int) -> None:
        """Record that ``requests`` priced ``cost_ms`` were sent to replica ``i`` at ``now_s``."""
        while len(self.sent) <= i:
            self.sent.append([])
        entries = self.sent[i]
        if entries and now_s < entries[-1][0]:  # recorded late (a hook): keep them in time order
            bisect.insort(entries, (now_s, cost_ms, requests))
        else:
            entries.append((now_s, cost_ms, requests))


def _check(loads: Sequence[Load | None]) -> None:
    if not loads:
        raise InputError("a router needs at least one replica; got loads=[] (start a replica first)")


class RandomRouter:
    """Each request to a replica drawn uniformly at random."""

    name = "random"

    def choose(
        self, loads: Sequence[Load | None], request: RouteRequest, now_s: float, rng: random.Random
    ) -> int:
        """A replica drawn uniformly at random (see :meth:`Router.choose`)."""
        _check(loads)
        return rng.randrange(len(loads))


class PowerOfTwoRouter:
    """Power of two choices: sample two replicas, send to the one with fewer queued requests.

    The queue lengths are the replicas' last reports plus the requests this router sent since
    each report (``count_sent``; as Ray Serve's router counts its own in-flight requests).
    Replicas without a report count as empty.
    """

    name = "power-of-two"

    def __init__(self, *, count_sent: bool = True) -> None:
        self.count_sent = count_sent
        self._sent = _Sent()

    def choose(
        self, loads: Sequence[Load | None], request: RouteRequest, now_s: float, rng: random.Random
    ) -> int:
        """The shorter queue of two replicas drawn at random (see :meth:`Router.choose`)."""
        _check(loads)
        choice = _two_choices(loads, self._sent if self.count_sent else None, rng)
        if self.count_sent:
            self._sent.add(choice, now_s, 0.0, request.n)
        return choice


def _two_choices(loads: Sequence[Load | None], sent: _Sent | None, rng: random.Random) -> int:
    if len(loads) == 1:
        return 0
    a, b = rng.sample(range(len(loads)), 2)

    def queued(i: int) -> int:
        load = loads[i]
        if sent is not None:
            return sent.queued_requests(i, load)
        return 0 if load is None else load.queued_requests

    return b if queued(b) < queued(a) else a


@dataclass(frozen=True, slots=True)
class Prediction:
    """What :class:`SlackRouter` predicts for a request on one replica.

    Attributes:
        meets: some admissible strategy is predicted to finish within the deadline.
        accuracy: the expected accuracy of the most accurate such strategy (of the cheapest
            admissible one when none fits).
        finish_ms: predicted completion from now: the replica's drain plus that strategy's price.
        cost_ms: that strategy's price on the replica (latency x correction x margin + overhead,
            per chunk).
        drain_ms: the replica's drain as the router sees it now.
    """

    meets: bool
    accuracy: float
    finish_ms: float
    cost_ms: float
    drain_ms: float


class SlackRouter:
    """Send each request where it is predicted to get the highest accuracy within its deadline.

    For each replica with a fresh load (taken at most ``stale_after_s`` ago), the request's
    budget there is its deadline less the replica's drain (its report's, less the time since,
    plus the priced cost of what this router sent there since the report). The predicted
    accuracy is that of the most accurate strategy of the profile's frontier for the request's
    size, among those meeting its floor, whose price (the profile's latency x the replica's
    latency correction x its margin + its overhead) fits the budget. A replica whose running
    batch overran at its report is taken to drain nothing until its next report. The router
    picks the highest predicted accuracy, ties broken by the earliest predicted finish (the
    most slack), exact ties at random; when no replica is predicted to meet the deadline, the
    one predicted to finish first. With no fresh load, or a floor no strategy reaches, it falls
    back to power of two choices.

    A job of more than the profile's ``max_batch_size`` rows is priced as the scheduler splits
    it (near-equal chunks run one after another), each chunk at the largest chunk's strategy.
    Queued jobs' options are taken as reported (late binding may lower them to make room), and
    the replica's EDF order is ignored: the prediction is conservative for tight deadlines.

    Args:
        profile: the model's profile (the replicas serve this model).
        stale_after_s: a load older than this is ignored.
    """

    name = "slack"

    def __init__(self, profile: Profile, *, stale_after_s: float = 1.0) -> None:
        if not (isinstance(stale_after_s, (int, float)) and stale_after_s > 0.0):
            raise InputError(
                f"SlackRouter stale_after_s must be a positive number of seconds, got {stale_after_s!r}"
            )
        self.profile = profile
        self.stale_after_s = float(stale_after_s)
        self._sent = _Sent()
        self._options: dict[tuple[Configuration, int, float | None], tuple[int, tuple[Strategy, ...]]] = {}

    def options(self, request: RouteRequest) -> tuple[int, tuple[Strategy, ...]]:
        """(chunks, the admissible strategies of one chunk, fastest first) for ``request``.

        Empty when no strategy meets the floor.
        """
        available = request.available or frozenset(self.profile.modalities)
        key = (available, request.n, request.min_accuracy)
        cached = self._options.get(key)
        if cached is None:
            plan = self.profile.plan
            sizes = (
                chunk_sizes(request.n, plan.max_batch_size)
                if request.n > plan.max_batch_size
                else [request.n]
            )
            try:
                frontier = plan.frontier(available, max(sizes))
            except KeyError:
                raise InputError(
                    f"RouteRequest.available={sorted(available)} is not a non-empty subset of the profile's "
                    f"modalities {list(self.profile.modalities)}; name only modalities the model has"
                ) from None
            first = frontier.index_meeting(floor_units(request.min_accuracy, frontier.n))
            cached = self._options[key] = (len(sizes), frontier.strategies[first:])
            if len(self._options) > 4096:
                self._options.clear()
        return cached

    def fresh(self, load: Load | None, now_s: float) -> bool:
        """Is ``load`` recent enough to route on?"""
        return load is not None and load.age_s(now_s) <= self.stale_after_s

    def predict(
        self, loads: Sequence[Load | None], request: RouteRequest, now_s: float
    ) -> list[Prediction | None]:
        """The prediction on every replica.

        None where the load is stale or missing, or where no strategy meets the floor.
        """
        chunks, options = self.options(request)
        budget = math.inf if request.deadline_ms is None else request.deadline_ms
        predictions: list[Prediction | None] = []
        for i, load in enumerate(loads):
            if not options or load is None or not self.fresh(load, now_s):
                predictions.append(None)
                continue
            drain = self._sent.drain_ms(i, load, now_s)
            left = budget - drain
            per_us = load.latency_correction * load.latency_margin / 1000.0
            best = None
            for strategy in reversed(options):  # most accurate first
                cost = chunks * (strategy.latency_us * per_us + load.overhead_ms)
                if cost <= left:
                    best = (True, strategy, cost)
                    break
            if best is None:
                cheapest = options[0]
                best = (False, cheapest, chunks * (cheapest.latency_us * per_us + load.overhead_ms))
            meets, strategy, cost = best
            predictions.append(
                Prediction(
                    meets=meets,
                    accuracy=strategy.accuracy_units / (strategy.n * ACCURACY_SCALE),
                    finish_ms=drain + cost,
                    cost_ms=cost,
                    drain_ms=drain,
                )
            )
        return predictions

    def pick(
        self, loads: Sequence[Load | None], predictions: Sequence[Prediction | None], rng: random.Random
    ) -> int:
        """The replica :meth:`choose` takes given ``predictions`` (from :meth:`predict`), not recorded.

        The highest predicted accuracy on time, ties to the earliest predicted finish, exact ties
        at random; with no prediction at all, power of two choices on the queued requests.
        """
        _check(loads)
        known = [(i, p) for i, p in enumerate(predictions) if p is not None]
        if not known:
            return _two_choices(loads, self._sent, rng)
        meeting = [(i, p) for i, p in known if p.meets]
        if meeting:
            top = max(p.accuracy for _, p in meeting)
            candidates = [(i, p) for i, p in meeting if p.accuracy == top]
        else:
            candidates = known
        first = min(p.finish_ms for _, p in candidates)
        tied = [i for i, p in candidates if p.finish_ms == first]
        return tied[rng.randrange(len(tied))] if len(tied) > 1 else tied[0]

    def record(self, i: int, now_s: float, sent: Prediction | float | None, n: int) -> None:
        """Count a job of ``n`` requests sent to replica ``i`` at ``now_s`` until its next report.

        ``sent``: the job's :class:`Prediction` on that replica (its ``cost_ms`` is added to the
        replica's drain), or the cost in ms, or None (not priced, e.g. a power-of-two fallback:
        it counts only as queued requests). A report taken after ``now_s`` already counts the
        job and the local entry is dropped. :meth:`choose` records its own pick; a caller that
        lets someone else pick among the predictions (Ray Serve) records the send here.
        """
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise InputError(f"SlackRouter.record needs a replica index >= 0, got {i!r}")
        if isinstance(sent, bool) or not (sent is None or isinstance(sent, (Prediction, numbers.Real))):
            raise InputError(f"SlackRouter.record needs a Prediction, a cost in ms or None, got {sent!r}")
        cost = sent.cost_ms if isinstance(sent, Prediction) else 0.0 if sent is None else float(sent)
        if not (math.isfinite(cost) and cost >= 0.0):
            raise InputError(f"SlackRouter.record needs a finite cost >= 0 ms, got {sent!r}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise InputError(f"SlackRouter.record needs n >= 1 requests, got {n!r}")
        self._sent.add(int(i), now_s, cost, int(n))

    def choose(
        self, loads: Sequence[Load | None], request: RouteRequest, now_s: float, rng: random.Random
    ) -> int:
        """The replica with the best predicted accuracy on time (see the class and :meth:`Router.choose`).

        :meth:`predict`, :meth:`pick`, then :meth:`record` of the pick.
        """
        _check(loads)
        predictions = self.predict(loads, request, now_s)
        choice = self.pick(loads, predictions, rng)
        self.record(choice, now_s, predictions[choice], request.n)
        return choice
