"""Routers: random, power of two choices, and the slack-aware router (pure functions of loads)."""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mosel
from mosel.jobs import floor_units
from mosel.routing import Prediction

from .helpers import Tiny, tiny_profile

ALL = frozenset({"audio", "video", "text"})


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


def load(
    drain_ms: float = 0.0, queued: int = 0, at_s: float = 0.0, margin: float = 1.0, overhead_ms: float = 0.0
) -> mosel.Load:
    return mosel.Load(
        drain_ms=drain_ms, queued_jobs=queued, queued_requests=queued, latency_margin=margin,
        overhead_ms=overhead_ms, degraded_share=0.0, at_s=at_s,
    )  # fmt: skip


def test_random_router_spreads_uniformly_and_is_seeded() -> None:
    router = mosel.RandomRouter()
    request = mosel.RouteRequest(n=1)
    picks = [router.choose([None] * 4, request, 0.0, random.Random(7)) for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same pick
    rng = random.Random(0)
    counts = collections.Counter(router.choose([load()] * 4, request, 0.0, rng) for _ in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 800
    with pytest.raises(mosel.InputError, match=r"loads=\[\]"):
        router.choose([], request, 0.0, rng)


def test_power_of_two_picks_the_shorter_of_two_queues() -> None:
    rng = random.Random(1)
    request = mosel.RouteRequest(n=1)
    loads = [load(queued=5), load(queued=2)]
    assert {mosel.PowerOfTwoRouter(count_sent=False).choose(loads, request, 0.0, rng) for _ in range(50)} == {
        1
    }
    # Among many, the longest queue is never chosen (it always loses its comparison).
    loads = [load(queued=q) for q in (3, 9, 1, 4)]
    router = mosel.PowerOfTwoRouter(count_sent=False)
    assert 1 not in {router.choose(loads, request, 0.0, rng) for _ in range(200)}
    assert mosel.PowerOfTwoRouter().choose([load()], request, 0.0, rng) == 0


def test_power_of_two_counts_what_it_sent_since_the_last_report() -> None:
    rng = random.Random(2)
    router = mosel.PowerOfTwoRouter()
    loads = [load(at_s=0.0), load(at_s=0.0)]
    picks = [router.choose(loads, mosel.RouteRequest(n=2), 0.001 * k, rng) for k in range(1, 11)]
    assert collections.Counter(picks) == {0: 5, 1: 5}  # alternates: never more than one apart
    # A newer report already counts those requests: they no longer add to it.
    fresh = [load(queued=0, at_s=1.0), load(queued=3, at_s=1.0)]
    assert {router.choose(fresh, mosel.RouteRequest(n=1), 1.0, rng)} == {0}


def test_slack_prefers_the_replica_where_the_request_gets_more_accuracy(profile: mosel.Profile) -> None:
    router = mosel.SlackRouter(profile)
    request = mosel.RouteRequest(n=2, deadline_ms=1.0, min_accuracy=0.6)
    busy, idle = load(drain_ms=0.6), load(drain_ms=0.1)
    predictions = router.predict([busy, idle], request, 0.0)
    assert all(isinstance(p, Prediction) and p.meets for p in predictions)
    assert predictions[1] is not None and predictions[0] is not None
    assert predictions[1].accuracy > predictions[0].accuracy
    assert router.choose([busy, idle], request, 0.0, random.Random(0)) == 1


def test_slack_breaks_accuracy_ties_by_most_slack_and_else_picks_the_earliest_finish(
    profile: mosel.Profile,
) -> None:
    rng = random.Random(0)
    roomy = mosel.RouteRequest(n=1, deadline_ms=100.0)  # every replica serves it at its best
    assert mosel.SlackRouter(profile).choose([load(3.0), load(1.0), load(2.0)], roomy, 0.0, rng) == 1
    hopeless = mosel.RouteRequest(n=8, deadline_ms=0.05, min_accuracy=0.6)
    router = mosel.SlackRouter(profile)
    predictions = router.predict([load(3.0), load(1.0), load(2.0)], hopeless, 0.0)
    assert not any(p is not None and p.meets for p in predictions)
    assert router.choose([load(3.0), load(1.0), load(2.0)], hopeless, 0.0, rng) == 1
    # The margin and the overhead are part of the price.
    request = mosel.RouteRequest(n=4, deadline_ms=2.0, min_accuracy=0.6)
    slow = load(0.0, margin=3.0, overhead_ms=0.5)
    fast = load(0.0)
    [on_slow, on_fast] = router.predict([slow, fast], request, 0.0)
    assert on_slow is not None and on_fast is not None
    assert on_slow.accuracy < on_fast.accuracy or on_slow.cost_ms > on_fast.cost_ms


def test_slack_spreads_a_burst_between_two_reports(profile: mosel.Profile) -> None:
    """Without counting what it sent, every request of a burst would go to the same replica."""
    rng = random.Random(3)
    router = mosel.SlackRouter(profile)
    loads = [load(at_s=0.0) for _ in range(8)]
    picks = [
        router.choose(loads, mosel.RouteRequest(n=4, deadline_ms=5.0, min_accuracy=0.6), 1e-6, rng)
        for _ in range(16)
    ]
    assert sorted(collections.Counter(picks).values()) == [2] * 8
    # Unequal reports: the emptiest replica takes requests only until it is no longer the emptiest.
    uneven = [load(drain_ms=0.05 * i, at_s=0.0) for i in range(8)]
    router = mosel.SlackRouter(profile)
    request = mosel.RouteRequest(n=4, deadline_ms=5.0, min_accuracy=0.6)
    counts = collections.Counter(router.choose(uneven, request, 1e-6, rng) for _ in range(16))
    assert len(counts) >= 6 and max(counts.values()) <= 4
    # The local additions drain with time, and a newer report replaces them.
    [before] = router.predict(loads[:1], mosel.RouteRequest(n=1), 1e-6)
    [later] = router.predict(loads[:1], mosel.RouteRequest(n=1), 1e-6 + 0.0005)
    [reported] = router.predict([load(at_s=0.001)], mosel.RouteRequest(n=1), 0.001)
    assert before is not None and later is not None and reported is not None
    assert before.drain_ms > later.drain_ms > 0.0 and reported.drain_ms == 0.0


def test_slack_prices_each_replica_at_its_reported_latency_correction(profile: mosel.Profile) -> None:
    router = mosel.SlackRouter(profile)
    request = mosel.RouteRequest(n=4, deadline_ms=100.0)
    slow = dataclasses.replace(load(), latency_correction=2.0)
    [on_slow, on_fast] = router.predict([slow, load()], request, 0.0)
    assert on_slow is not None and on_fast is not None
    assert on_slow.accuracy == on_fast.accuracy and on_slow.cost_ms == pytest.approx(2 * on_fast.cost_ms)
    # Equal queues: the request goes to the faster replica (it finishes first).
    assert router.choose([slow, load()], request, 0.0, random.Random(0)) == 1


def test_slack_sees_a_stalled_replica_drain_nothing_until_the_next_report(profile: mosel.Profile) -> None:
    """A replica whose batch overran its prediction is not expected to empty while it lasts."""
    router = mosel.SlackRouter(profile)
    stalled = dataclasses.replace(load(drain_ms=8.0, at_s=0.0), overrun_ms=4.0)
    healthy = load(drain_ms=8.0, at_s=0.0)
    request = mosel.RouteRequest(n=1, deadline_ms=50.0)
    [s, h] = router.predict([stalled, healthy], request, 0.006)
    assert s is not None and h is not None
    assert s.drain_ms == pytest.approx(8.0) and h.drain_ms == pytest.approx(2.0)
    assert router.choose([stalled, healthy], request, 0.006, random.Random(0)) == 1
    # What the router sends there adds up undrained; a later report (no overrun) replaces it all.
    router.record(0, 0.006, 1.5, 1)
    [s] = router.predict([stalled], request, 0.009)
    assert s is not None and s.drain_ms == pytest.approx(9.5)
    [s] = router.predict([load(drain_ms=1.0, at_s=0.01)], request, 0.0105)
    assert s is not None and s.drain_ms == pytest.approx(0.5)


def test_slack_falls_back_to_power_of_two_without_fresh_loads(profile: mosel.Profile) -> None:
    rng = random.Random(4)
    router = mosel.SlackRouter(profile, stale_after_s=0.5)
    request = mosel.RouteRequest(n=1, deadline_ms=1.0)
    stale = [load(queued=9, at_s=0.0), load(queued=1, at_s=0.0)]
    assert {router.choose(stale, request, 10.0, rng) for _ in range(5)} == {1}
    assert router.predict(stale, request, 10.0) == [None, None]
    # A fresh load is preferred to a stale one, however short the stale queue.
    mixed = [load(drain_ms=0.5, queued=9, at_s=10.0), load(queued=0, at_s=0.0)]
    assert router.choose(mixed, request, 10.0, rng) == 0
    # An unreachable floor cannot be predicted anywhere: power of two too.
    assert router.predict(mixed, mosel.RouteRequest(n=1, min_accuracy=0.99), 10.0) == [None, None]
    with pytest.raises(mosel.InputError, match="stale_after_s"):
        mosel.SlackRouter(profile, stale_after_s=0.0)


def test_route_request_validation(profile: mosel.Profile) -> None:
    with pytest.raises(mosel.InputError, match=r"RouteRequest.n .*0"):
        mosel.RouteRequest(n=0)
    with pytest.raises(mosel.SLOError, match=r"deadline_ms .*inf"):
        mosel.RouteRequest(n=1, deadline_ms=float("inf"))
    with pytest.raises(mosel.SLOError, match=r"min_accuracy .*1.5"):
        mosel.RouteRequest(n=1, min_accuracy=1.5)
    with pytest.raises(mosel.InputError, match=r"available=\['smell'\]"):
        mosel.SlackRouter(profile).choose(
            [load()], mosel.RouteRequest(n=1, available=frozenset({"smell"})), 0.0, random.Random(0)
        )
    # Jobs larger than max_batch_size are priced as their chunks.
    big = mosel.SlackRouter(profile).predict([load()], mosel.RouteRequest(n=20), 0.0)[0]
    small = mosel.SlackRouter(profile).predict([load()], mosel.RouteRequest(n=7), 0.0)[0]
    assert big is not None and small is not None and big.cost_ms > 2 * small.cost_ms


def _meets(profile: mosel.Profile, load: mosel.Load, request: mosel.RouteRequest) -> bool:
    """Oracle: does any strategy meeting the floor fit the deadline on this replica?"""
    frontier = profile.plan.frontier(ALL, request.n)
    assert request.deadline_ms is not None
    return any(
        s.accuracy_units >= floor_units(request.min_accuracy, request.n)
        and s.latency_us / 1000.0 * load.latency_margin + load.overhead_ms
        <= request.deadline_ms - load.drain_ms
        for s in frontier.strategies
    )


@settings(max_examples=200, deadline=None)
@given(
    drains=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=6),
    margins=st.lists(st.floats(1.0, 3.0), min_size=6, max_size=6),
    overheads=st.lists(st.floats(0.0, 0.5), min_size=6, max_size=6),
    n=st.integers(1, 8),
    deadline_ms=st.floats(0.05, 6.0),
    floor=st.sampled_from([None, 0.55, 0.6, 0.7, 0.8, 0.9]),
    seed=st.integers(0, 1000),
)
def test_slack_never_picks_a_predicted_miss_when_a_predicted_hit_exists(
    profile: mosel.Profile,
    drains: list[float],
    margins: list[float],
    overheads: list[float],
    n: int,
    deadline_ms: float,
    floor: float | None,
    seed: int,
) -> None:
    loads = [load(d, margin=m, overhead_ms=o, at_s=1.0) for d, m, o in zip(drains, margins, overheads)]
    request = mosel.RouteRequest(n=n, deadline_ms=deadline_ms, min_accuracy=floor)
    choice = mosel.SlackRouter(profile).choose(loads, request, 1.0, random.Random(seed))
    hits = [_meets(profile, item, request) for item in loads]
    if any(hits):
        assert hits[choice]
    else:  # nobody meets it: the replica predicted to finish first at its cheapest admissible strategy
        frontier = profile.plan.frontier(ALL, n)
        cheapest = frontier.strategies[frontier.index_meeting(floor_units(floor, n))]
        finish = [x.drain_ms + cheapest.latency_us / 1000.0 * x.latency_margin + x.overhead_ms for x in loads]
        assert finish[choice] == pytest.approx(min(finish))


def test_slack_record_is_what_choose_counts(profile: mosel.Profile) -> None:
    """choose = predict + pick + record; a caller that lets someone else pick records the send."""
    loads = [load(at_s=0.0), load(at_s=0.0)]
    request = mosel.RouteRequest(n=4, deadline_ms=5.0, min_accuracy=0.6)
    chooser, recorder = mosel.SlackRouter(profile), mosel.SlackRouter(profile)
    rng_a, rng_b = random.Random(5), random.Random(5)
    for _ in range(6):
        choice = chooser.choose(loads, request, 1e-6, rng_a)
        predictions = recorder.predict(loads, request, 1e-6)
        assert recorder.pick(loads, predictions, rng_b) == choice
        recorder.record(choice, 1e-6, predictions[choice], request.n)
    assert chooser.predict(loads, request, 1e-6) == recorder.predict(loads, request, 1e-6)
    # Sent elsewhere than the pick, it counts there at the cost given (or a Prediction's cost).
    router = mosel.SlackRouter(profile)
    router.record(1, 1e-6, 2.0, 3)
    [p0, p1] = router.predict(loads, mosel.RouteRequest(n=1), 1e-6)
    assert p0 is not None and p1 is not None and (p0.drain_ms, p1.drain_ms) == (0.0, 2.0)
    # Unpriced (a fallback): only the queued requests, which power of two reads.
    router.record(0, 1e-6, None, 5)
    assert router.predict(loads, mosel.RouteRequest(n=1), 1e-6)[0] == p0
    # With nothing predicted, pick falls back to power of two: 3 queued requests < 5.
    assert {router.pick(loads, [None, None], random.Random(i)) for i in range(5)} == {1}
    for bad in (
        (-1, 1.0, 1),
        (0, float("nan"), 1),
        (0, -1.0, 1),
        (0, 1.0, 0),
        (True, 1.0, 1),
        (0, True, 1),
        (0, "1", 1),
    ):
        with pytest.raises(mosel.InputError, match="record"):
            router.record(bad[0], 0.0, bad[1], bad[2])


def test_slack_record_late_keeps_the_sends_in_time_order(profile: mosel.Profile) -> None:
    """A send recorded after a later one (a hook firing late) still drains in time order."""
    loads = [load(at_s=0.0)]
    in_order, late = mosel.SlackRouter(profile), mosel.SlackRouter(profile)
    in_order.record(0, 0.001, 1.0, 1)
    in_order.record(0, 0.002, 1.0, 1)
    late.record(0, 0.002, 1.0, 1)
    late.record(0, 0.001, 1.0, 1)
    request = mosel.RouteRequest(n=1)
    assert late.predict(loads, request, 0.0025) == in_order.predict(loads, request, 0.0025)
    # A report taken between them drops only the earlier one.
    newer = [load(at_s=0.0015)]
    [p] = late.predict(newer, request, 0.002)
    assert p is not None and p.drain_ms == pytest.approx(1.0)


# ------------------------------------------------------ unknown replicas, clock skew, bounded books


def test_a_replica_without_a_report_takes_the_jobs_its_late_peer_would_miss(profile: mosel.Profile) -> None:
    """New (no report) or silent (stale report): unknown, not absent; a predicted miss is no better."""
    late = load(drain_ms=10_000.0, queued=500, at_s=100.0)
    for unknown in (None, load(at_s=90.0)):  # just added; silent for 10 s
        router = mosel.SlackRouter(profile)
        rng = random.Random(0)
        picks = [
            router.choose([late, unknown], mosel.RouteRequest(n=2, deadline_ms=50.0), 100.0 + k * 1e-3, rng)
            for k in range(50)
        ]
        assert picks.count(1) == 50, picks  # its own sends to it (about 1 ms each) stay far below 10 s
        # The known replica is predicted late for everyone: the unknown is preferred in either order.
        router = mosel.SlackRouter(profile)
        assert router.choose([unknown, late], mosel.RouteRequest(n=1, deadline_ms=50.0), 100.0, rng) == 0


def test_an_unknown_replica_gets_bounded_probe_traffic_beside_an_on_time_peer(profile: mosel.Profile) -> None:
    known = load(drain_ms=5.0, queued=3, at_s=100.0)  # every request still meets its deadline here
    request = mosel.RouteRequest(n=1, deadline_ms=500.0)
    for unknown in (None, load(at_s=90.0)):
        router = mosel.SlackRouter(profile, probe_jobs=3)
        rng = random.Random(1)
        picks = [router.choose([known, unknown], request, 100.0 + k * 1e-4, rng) for k in range(200)]
        assert picks.count(1) == 3  # probes: at most probe_jobs while no report counts them
        [on_known, on_unknown] = router.predict([known, unknown], request, 100.02)
        assert on_known is not None and on_known.known and on_unknown is None
        # Probes older than stale_after_s are forgotten: the silent replica gets a few more.
        peer = load(at_s=101.5)
        later = [router.choose([peer, unknown], request, 101.5 + k * 1e-4, rng) for k in range(50)]
        assert later.count(1) == 3
        # Once it reports, it is known and routed on as any other.
        [_, reported] = router.predict([known, load(at_s=101.6)], request, 101.6)
        assert reported is not None and reported.known
    # probe_jobs=0: nothing while a known replica is on time.
    router = mosel.SlackRouter(profile, probe_jobs=0)
    assert {router.choose([known, None], request, 100.0, random.Random(i)) for i in range(20)} == {0}
    for bad in (-1, 1.5, True):
        with pytest.raises(mosel.InputError, match="probe_jobs"):
            mosel.SlackRouter(profile, probe_jobs=bad)  # type: ignore[arg-type]


def test_a_report_stamped_ahead_of_the_routers_clock_reads_as_taken_now(profile: mosel.Profile) -> None:
    """A replica whose clock runs 5 s ahead is not 5 s behind; its reports still age on the router's clock."""
    request = mosel.RouteRequest(n=1, deadline_ms=50.0)
    for skew_s in (0.001, 5.0, 3600.0):
        router = mosel.SlackRouter(profile, stale_after_s=1.0)
        ahead, behind = load(drain_ms=0.0, at_s=100.0 + skew_s), load(drain_ms=3.0, at_s=100.0)
        [a, b] = router.predict([ahead, behind], request, 100.0)
        assert a is not None and b is not None
        assert a.drain_ms == 0.0 and b.drain_ms == pytest.approx(3.0) and a.known
        assert router.choose([ahead, behind], request, 100.0, random.Random(0)) == 0
        # What the router sends after it read the report counts, and drains at the usual pace.
        router.record(0, 100.0005, 2.0, 1)
        [a, _] = router.predict([ahead, behind], request, 100.001)
        assert a is not None and a.drain_ms == pytest.approx(1.5)
        # The same report, unrenewed, goes stale stale_after_s after the router first read it.
        [a, _] = router.predict([ahead, load(at_s=101.5)], request, 101.5)
        assert a is not None and not a.known


def test_the_books_stay_bounded_without_reports(profile: mosel.Profile) -> None:
    """10,000 choices and never a report: the router's books do not grow with them."""
    request = mosel.RouteRequest(n=1, deadline_ms=50.0)
    rng = random.Random(0)
    slack, two = mosel.SlackRouter(profile, stale_after_s=1.0), mosel.PowerOfTwoRouter()
    silent: list[mosel.Load | None] = [None] * 4
    for k in range(10_000):
        now = 1e-3 * k  # 10 s of a steady stream
        slack.choose(silent, request, now, rng)
        two.choose(silent, request, now, rng)
    # Sends older than stale_after_s are forgotten: about one second's worth remain.
    assert sum(len(slack._sent.entries(i)) for i in range(4)) <= 1_001
    assert sum(len(two._sent.entries(i)) for i in range(4)) <= 4 * 1024  # never forgets: merged
    assert sum(two._sent.queued_requests(i, None) for i in range(4)) == 10_000  # and loses none
    # Reports that never come again: the same load read 10,000 times at one instant.
    stuck = [load(at_s=0.0) for _ in range(4)]
    router = mosel.SlackRouter(profile, stale_after_s=1.0)
    for _ in range(10_000):
        router.choose(stuck, request, 0.5, rng)
    sizes = [len(router._sent.entries(i)) for i in range(4)]
    assert max(sizes) <= 1024
    assert sum(router._sent.queued_requests(i, None) for i in range(4)) == 10_000
    # Merging the oldest sends loses no cost: sent at one instant, the drains add up to them all.
    predictions = router.predict(stuck, mosel.RouteRequest(n=1), 0.5)
    costs = [sum(cost for _, cost, _ in router._sent.entries(i)) for i in range(4)]
    assert all(p is not None and p.drain_ms == pytest.approx(c) and c > 0 for p, c in zip(predictions, costs))


@pytest.mark.parametrize("lag_s", [0.0, 0.5, 0.9, 3.0, 30.0, 900.0])
def test_a_replica_whose_clock_lags_is_known_while_it_keeps_reporting(
    profile: mosel.Profile, lag_s: float
) -> None:
    """A busy replica and an idle one report every 0.5 s; the idle one's clock lags by ``lag_s``.

    It keeps reporting, so it is known (its reports age from when the router reads them) and
    takes its share of the traffic, as with synchronised clocks; once its reports stop, it goes
    unknown ``stale_after_s`` later, on the router's clock.
    """
    router = mosel.SlackRouter(profile, stale_after_s=1.0)
    rng = random.Random(0)
    request = mosel.RouteRequest(1, deadline_ms=60.0)
    counts = [0, 0]
    for step in range(400):  # 4 s of 100 requests/s
        now = 1000.0 + step * 0.01
        tick = 1000.0 + (step // 50) * 0.5  # the last report (on the true clock)
        busy, idle = load(drain_ms=40.0, queued=4, at_s=tick), load(drain_ms=0.0, at_s=tick - lag_s)
        choice = router.choose([busy, idle], request, now, rng)
        counts[choice] += 1
        if step >= 50:  # from its second report on, the lagging replica is known
            [_, b] = router.predict([busy, idle], request, now)
            assert b is not None and b.known, (step, lag_s)
    assert counts[1] >= 150, counts  # about half, as with synchronised clocks (both are on time)
    # Its reports stop: it is unknown stale_after_s after the router read the last one.
    last = load(drain_ms=0.0, at_s=1003.5 - lag_s)
    [_, b] = router.predict([load(at_s=1004.9), last], request, 1004.49)
    assert b is not None and b.known
    [_, b] = router.predict([load(at_s=1005.0), last], request, 1005.0)
    assert b is None or not b.known


class _CountingDeque(collections.deque):  # type: ignore[type-arg]
    """A router's books that count how many entries are read."""

    read = 0

    def __iter__(self) -> Any:
        for item in super().__iter__():
            _CountingDeque.read += 1
            yield item


def test_a_choice_costs_the_same_however_many_requests_were_routed(profile: mosel.Profile) -> None:
    """1 known replica predicted late and 20 unknown: each choice reads none of the books' entries."""
    router = mosel.SlackRouter(profile, stale_after_s=1.0)
    rng = random.Random(0)
    loads: list[mosel.Load | None] = [load(drain_ms=10_000.0, at_s=5000.0), *([None] * 20)]
    request = mosel.RouteRequest(1, deadline_ms=50.0)
    for k in range(2000):
        router.choose(loads, request, 5000.0 + k * 1e-5, rng)
    assert sum(len(router._sent.entries(i)) for i in range(21)) >= 1900  # the books hold the sends
    for i in range(21):
        track = router._sent.track(i)
        track.entries = _CountingDeque(track.entries)
    # The fluid queue of an unknown replica, folded as its sends came, is the one folded afresh.
    expected = []
    for i in range(1, 21):
        backlog, at = 0.0, -1e18
        for sent_at, cost_ms, _ in list(collections.deque.__iter__(router._sent.track(i).entries)):
            backlog = max(backlog - max(sent_at - at, 0.0) * 1000.0, 0.0) + cost_ms
            at = max(at, sent_at)
        expected.append(max(backlog - max(5000.02 - at, 0.0) * 1000.0, 0.0))
    predictions = router.predict(loads, request, 5000.02)
    assert [p.drain_ms for p in predictions[1:] if p is not None] == pytest.approx(expected)
    _CountingDeque.read = 0
    for k in range(2000, 3000):
        router.choose(loads, request, 5000.0 + k * 1e-5, rng)
    assert _CountingDeque.read == 0
