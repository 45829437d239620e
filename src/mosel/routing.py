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
  the report; replicas without a fresh report get bounded probe traffic.
"""

from __future__ import annotations

import bisect
import collections
import math
import numbers
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from mosel.errors import InputError, SLOError
from mosel.jobs import chunk_sizes, floor_units
from mosel.plan import ACCURACY_SCALE, Strategy
from mosel.profiles import Profile
from mosel.slo import SLO, real
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
        # A budget left, not a deadline: it may be spent (<= 0) by the time of routing.
        if self.deadline_ms is not None:
            left = real(self.deadline_ms)
            if left is None or not math.isfinite(left):
                raise SLOError(
                    f"RouteRequest.deadline_ms must be a finite number of milliseconds left (or None), "
                    f"got {self.deadline_ms!r}"
                )
        SLO.of(min_accuracy=self.min_accuracy)  # the floor's one rule


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


_MAX_SENT: Final = 1024
"""Sends a router remembers per replica; beyond, the two oldest merge into one (a conservative sum)."""


class _Track:
    """One replica's books: its last report as the router read it, and the sends since."""

    __slots__ = ("entries", "fold", "received_s", "renewed", "report", "requests", "stamp_s")

    def __init__(self) -> None:
        self.entries: collections.deque[tuple[float, float, int]] = collections.deque()
        self.requests = 0  # the sum of the entries' requests
        self.report: Load | None = None
        self.stamp_s = -math.inf  # when the router takes ``report`` to have been taken
        self.received_s = -math.inf  # the router's clock when it first read ``report``
        self.renewed = False  # ``report`` replaced an earlier, earlier-stamped one: still reporting
        # (rate, backlog after the last entry, that entry's time): the fluid queue of ``report``
        # and every entry, kept up to date as sends are added in time order.
        self.fold: tuple[float, float, float] | None = None


class _Sent:
    """Requests a router sent to each replica after that replica's last report.

    A report taken at ``at_s`` already counts what arrived before it; what the router sent
    since is added locally, so that a burst between two reports is not sent to one replica.
    Entries are (sent at, priced cost in ms, requests), oldest first.

    The books stay small whatever happens to the reports: a report read before the router's
    clock says it was taken (clock skew) counts as taken when first read; sends older than
    ``horizon_s`` are forgotten (no fresh report can predate them); and beyond
    :data:`_MAX_SENT` entries the two oldest merge. Each operation is O(1) amortised: the fluid
    queue of the report and the entries is folded as they come (the forgotten and merged ones
    stay in it), and refolded only when a new report arrives.

    A report's age (:meth:`age_s`) is read on the router's clock: from when the router first
    read it, once the replica has renewed its report (a report stamped later than the one
    before, on the replica's own clock: it keeps reporting, whatever its clock says); before
    that, from its stamp. A renewed report whose stamp was already older than
    ``horizon_s`` when first read (the replica's clock lags) is taken as stamped then.
    """

    __slots__ = ("horizon_s", "tracks")

    def __init__(self, horizon_s: float | None = None) -> None:
        self.horizon_s = horizon_s
        self.tracks: list[_Track] = []

    def track(self, i: int) -> _Track:
        """Replica ``i``'s books (created empty)."""
        while len(self.tracks) <= i:
            self.tracks.append(_Track())
        return self.tracks[i]

    def entries(self, i: int) -> list[tuple[float, float, int]]:
        """What the books hold for replica ``i`` now, oldest first."""
        return list(self.track(i).entries)

    def forget(self, i: int) -> None:
        """Clear replica ``i``'s books (the replica is gone; its index may serve another)."""
        if i < len(self.tracks):
            self.tracks[i] = _Track()

    def observe(self, i: int, load: Load | None, now_s: float) -> _Track:
        """Bring replica ``i``'s books to ``now_s`` with its latest ``load`` (None: none yet).

        A new report stamped later than ``now_s`` (its host's clock runs ahead) is taken as
        stamped now, and so is one that renews an earlier report but is stamped more than the
        horizon ago (its host's clock lags). The sends it already counts (sent at or before its
        stamp) and those older than the horizon are dropped from the entries (a forgotten send
        stays in the fold: it was sent).
        """
        track = self.track(i)
        horizon = -math.inf if self.horizon_s is None else now_s - self.horizon_s
        if load is not None and load != track.report:
            track.renewed = track.report is not None and load.at_s > track.report.at_s
            track.report = load
            track.received_s = now_s
            stamp = min(load.at_s, now_s)
            track.stamp_s = now_s if track.renewed and stamp < horizon else stamp
            track.fold = None
        entries = track.entries
        while entries and (entries[0][0] <= track.stamp_s or entries[0][0] < horizon):
            track.requests -= entries.popleft()[2]
        return track

    def age_s(self, i: int, now_s: float) -> float:
        """Seconds since replica ``i``'s last report as the router reads it (inf: none).

        From when the router first read it, if it renewed an earlier report (the replica keeps
        reporting: a clock that lags cannot make it look silent); else from its stamp.
        """
        track = self.track(i)
        return max(now_s - (track.received_s if track.renewed else track.stamp_s), 0.0)

    def _fold(self, track: _Track, backlog_ms: float, rate: float) -> tuple[float, float, float]:
        """(rate, backlog, at): the fluid queue of ``backlog_ms`` at the report and the sends since."""
        fold = track.fold
        if fold is None or fold[0] != rate:
            backlog, at = backlog_ms, track.stamp_s
            for sent_at, cost_ms, _ in track.entries:
                backlog = max(backlog - max(sent_at - at, 0.0) * rate, 0.0) + cost_ms
                at = max(at, sent_at)
            fold = track.fold = (rate, backlog, at)
        return fold

    def drain_ms(self, i: int, load: Load, now_s: float) -> float:
        """Replica ``i``'s predicted drain now: its report's, less the time since, plus what was sent.

        The replica is a fluid queue: it drains at one millisecond per millisecond and each
        request sent adds its priced cost when sent. A replica whose running batch overran its
        prediction at the report (:attr:`Load.overrun_ms`) is stalled: it drains nothing until
        a later report says otherwise. Call :meth:`observe` with ``load`` first.
        """
        rate = 0.0 if load.overrun_ms > 0.0 else 1000.0
        _, backlog, at = self._fold(self.track(i), load.drain_ms, rate)
        return max(backlog - max(now_s - at, 0.0) * rate, 0.0)

    def unknown_drain_ms(self, i: int, load: Load | None, now_s: float) -> float:
        """An optimistic drain for replica ``i``, which has no fresh report.

        The fluid queue of its last report (if any), always draining, and of the sends since;
        O(1) amortised like :meth:`drain_ms`. Call :meth:`observe` with ``load`` first.
        """
        _, backlog, at = self._fold(self.track(i), 0.0 if load is None else load.drain_ms, 1000.0)
        return max(backlog - max(now_s - at, 0.0) * 1000.0, 0.0)

    def in_flight(self, i: int) -> int:
        """Jobs on replica ``i``'s books (sent since its last report, within the horizon)."""
        return len(self.track(i).entries)

    def queued_requests(self, i: int, load: Load | None) -> int:
        """Replica ``i``'s reported queued requests plus the requests sent there since."""
        reported = 0 if load is None else load.queued_requests
        return reported + self.track(i).requests

    def add(self, i: int, now_s: float, cost_ms: float, requests: int) -> None:
        """Record that ``requests`` priced ``cost_ms`` were sent to replica ``i`` at ``now_s``."""
        track = self.track(i)
        if now_s <= track.stamp_s:  # the replica's last report already counts it
            return
        entries = track.entries
        track.requests += requests
        if entries and now_s < entries[-1][0]:  # recorded late (a hook): keep them in time order
            ordered = list(entries)
            bisect.insort(ordered, (now_s, cost_ms, requests))
            track.entries = entries = collections.deque(ordered)
            track.fold = None
        else:
            entries.append((now_s, cost_ms, requests))
            if track.fold is not None:
                rate, backlog, at = track.fold
                track.fold = (rate, max(backlog - max(now_s - at, 0.0) * rate, 0.0) + cost_ms, max(at, now_s))
        if len(entries) > _MAX_SENT:  # never below the truth: drain between the two is not credited
            first, second = entries.popleft(), entries.popleft()
            entries.appendleft((second[0], first[1] + second[1], first[2] + second[2]))


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
        choice = _two_choices(loads, self._sent if self.count_sent else None, rng, now_s)
        if self.count_sent:
            self._sent.add(choice, now_s, 0.0, request.n)
        return choice


def _two_choices(
    loads: Sequence[Load | None], sent: _Sent | None, rng: random.Random, now_s: float | None = None
) -> int:
    """Power of two choices on the queued requests (``now_s``: bring the two's books up to date first)."""
    if len(loads) == 1:
        return 0
    a, b = rng.sample(range(len(loads)), 2)

    def queued(i: int) -> int:
        load = loads[i]
        if sent is not None:
            if now_s is not None:
                sent.observe(i, load, now_s)
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
        known: True when priced from the replica's fresh report; False for a replica the router
            has no fresh report of (new, or silent), priced optimistically as a probe (see
            :class:`SlackRouter`).
    """

    meets: bool
    accuracy: float
    finish_ms: float
    cost_ms: float
    drain_ms: float
    known: bool = True


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
    one predicted to finish first. With no fresh load at all, or a floor no strategy reaches,
    it falls back to power of two choices.

    A replica without a fresh load (just started, or silent for ``stale_after_s``) is unknown,
    not absent: while at least one replica is known it is priced as a probe, optimistically
    (its last report, if any, drained since at full speed, plus what the router sent it since,
    at the known replicas' mean correction, margin and overhead), and competes with the known
    ones as above. While some known replica is predicted to meet the request's deadline, an
    unknown one competes only while fewer than ``probe_jobs`` jobs the router sent it in the
    last ``stale_after_s`` are uncounted by a report: a new replica takes a bounded share at
    once, and one that stopped reporting at most ``probe_jobs`` such jobs per
    ``stale_after_s``. When every known replica is predicted late, the unknown ones compete
    without that bound (a probe cannot do worse than a predicted miss): they take the request
    while their optimistic finish is the earliest. A report stamped later
    than the router's clock reads as taken when the router first saw it (clock skew never makes
    a replica look behind); once a replica renews its reports, their age counts on the router's
    clock from when it first read each (a lagging clock never makes a reporting replica look
    silent; see ``docs/scale-out.md``). The router's books are bounded: sends older than ``stale_after_s``
    are forgotten and at most 1024 are kept per replica; a choice costs O(replicas), whatever
    the number of requests routed.

    A job of more than the profile's ``max_batch_size`` rows is priced as the scheduler splits
    it (near-equal chunks run one after another), each chunk at the largest chunk's strategy.
    Queued jobs' options are taken as reported (late binding may lower them to make room), and
    the replica's EDF order is ignored: the prediction is conservative for tight deadlines.

    Args:
        profile: the model's profile (the replicas serve this model).
        stale_after_s: a load older than this is ignored; the replica is unknown.
        probe_jobs: jobs an unknown replica may hold from this router (uncounted by a report,
            sent within ``stale_after_s``) while a known replica is predicted on time; 0: then
            none.
    """

    name = "slack"

    def __init__(self, profile: Profile, *, stale_after_s: float = 1.0, probe_jobs: int = 4) -> None:
        if not (
            isinstance(stale_after_s, (int, float))
            and not isinstance(stale_after_s, bool)
            and math.isfinite(stale_after_s)
            and stale_after_s > 0.0
        ):
            raise InputError(
                f"SlackRouter stale_after_s must be a positive number of seconds, got {stale_after_s!r}"
            )
        if isinstance(probe_jobs, bool) or not isinstance(probe_jobs, int) or probe_jobs < 0:
            raise InputError(
                f"SlackRouter probe_jobs must be an int >= 0 (jobs per unknown replica), got {probe_jobs!r}"
            )
        self.profile = profile
        self.stale_after_s = float(stale_after_s)
        self.probe_jobs = int(probe_jobs)
        self._sent = _Sent(horizon_s=self.stale_after_s)
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
        """Whether ``load`` is recent by its own stamp (:meth:`predict` judges on the router's clock)."""
        return load is not None and load.age_s(now_s) <= self.stale_after_s

    def predict(
        self,
        loads: Sequence[Load | None],
        request: RouteRequest,
        now_s: float,
        *,
        replicas: Collection[int] | None = None,
    ) -> list[Prediction | None]:
        """The prediction on every replica.

        None where no strategy meets the floor, for a replica not in ``replicas``, and for an
        unknown replica (no fresh load) that gets no probe: while no replica is known, or, while
        a known one is predicted on time, once it holds ``probe_jobs`` of the router's jobs. An
        unknown replica's prediction has ``known=False``.

        Args:
            loads: each replica's last reported load (None: none received yet).
            request: the request to place.
            now_s: the time now, on the clock of the loads' ``at_s``.
            replicas: the indices that may take the request (default: all).
        """
        chunks, options = self.options(request)
        budget = math.inf if request.deadline_ms is None else request.deadline_ms
        predictions: list[Prediction | None] = [None] * len(loads)
        indices = (
            range(len(loads)) if replicas is None else sorted(i for i in replicas if 0 <= i < len(loads))
        )
        unknown: list[int] = []
        prices: list[tuple[float, float]] = []
        for i in indices:
            load = loads[i]
            self._sent.observe(i, load, now_s)
            if load is None or self._sent.age_s(i, now_s) > self.stale_after_s:
                unknown.append(i)
                continue
            per_us = load.latency_correction * load.latency_margin / 1000.0
            prices.append((per_us, load.overhead_ms))
            if options:
                drain = self._sent.drain_ms(i, load, now_s)
                predictions[i] = _priced(chunks, options, budget, drain, per_us, load.overhead_ms, known=True)
        if not (options and prices and unknown):
            return predictions
        per_us = math.fsum(p for p, _ in prices) / len(prices)
        overhead_ms = math.fsum(o for _, o in prices) / len(prices)
        capped = any(p is not None and p.meets for p in predictions)  # else a probe cannot do worse
        for i in unknown:
            if not capped or self._sent.in_flight(i) < self.probe_jobs:
                drain = self._sent.unknown_drain_ms(i, loads[i], now_s)
                predictions[i] = _priced(chunks, options, budget, drain, per_us, overhead_ms, known=False)
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
        job and the local entry is dropped; so is an entry older than ``stale_after_s``.
        :meth:`choose` records its own pick; a caller that lets someone else pick among the
        predictions (Ray Serve) records the send here.
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

    def forget(self, i: int) -> None:
        """Clear what the router remembers of replica ``i`` (it is gone; ``i`` may name a new one)."""
        self._sent.forget(i)

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


def _priced(
    chunks: int,
    options: tuple[Strategy, ...],
    budget_ms: float,
    drain_ms: float,
    per_us: float,
    overhead_ms: float,
    *,
    known: bool,
) -> Prediction:
    """The most accurate of ``options`` whose price fits the budget left after ``drain_ms``."""
    left = budget_ms - drain_ms
    for strategy in reversed(options):  # most accurate first
        cost = chunks * (strategy.latency_us * per_us + overhead_ms)
        if cost <= left:
            return _prediction(True, strategy, cost, drain_ms, known)
    cheapest = options[0]
    cost = chunks * (cheapest.latency_us * per_us + overhead_ms)
    return _prediction(False, cheapest, cost, drain_ms, known)


def _prediction(meets: bool, strategy: Strategy, cost_ms: float, drain_ms: float, known: bool) -> Prediction:
    return Prediction(
        meets=meets,
        accuracy=strategy.accuracy_units / (strategy.n * ACCURACY_SCALE),
        finish_ms=drain_ms + cost_ms,
        cost_ms=cost_ms,
        drain_ms=drain_ms,
        known=known,
    )
