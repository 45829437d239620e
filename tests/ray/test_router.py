"""SlackRequestRouter and DegradationPolicy as plain objects: no Ray instance needed."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

import mosel
from mosel.ray import LOAD_KEY, DegradationPolicy, Request, SlackRequestRouter
from tests.ray.models import profiles
from tests.unit.helpers import tiny_inputs


@dataclass
class FakeReplica:
    replica_id: str
    routing_stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakePending:
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    metadata: Any = field(default_factory=lambda: SimpleNamespace(internal_request_id=uuid.uuid4().hex))


def reported(drain_ms: float, *, age_s: float = 0.0) -> dict[str, Any]:
    load = mosel.Load(
        drain_ms=drain_ms, queued_jobs=int(drain_ms > 0), queued_requests=int(drain_ms > 0),
        latency_margin=1.0, overhead_ms=0.1, degraded_share=0.0, at_s=time.time() - age_s,
    )  # fmt: skip
    return {LOAD_KEY: load.to_json()}


@pytest.fixture
def router() -> SlackRequestRouter:
    router = SlackRequestRouter.__new__(SlackRequestRouter)  # Serve's constructor needs a deployment
    router.initialize_state(profile=profiles()["tiny"].to_json(), stale_after_s=1.0, seed=0)
    return router


def rank(router: SlackRequestRouter, replicas: list[FakeReplica], request: Any) -> list[list[Any]]:
    return ranked(router, replicas, FakePending([request]))


def ranked(router: SlackRequestRouter, replicas: list[FakeReplica], pending: FakePending) -> list[list[Any]]:
    return asyncio.run(router.choose_replicas(replicas, pending))  # type: ignore[arg-type]


def test_the_replica_with_slack_comes_first(router: SlackRequestRouter) -> None:
    busy, idle = FakeReplica("busy", reported(50.0)), FakeReplica("idle", reported(0.0))
    request = Request(tiny_inputs(2), deadline_ms=10.0, min_accuracy=0.6)
    for _ in range(3):
        assert rank(router, [busy, idle], request) == [[idle], [busy]]
    assert router.decisions == {"slack": 3, "fallback": 0}


def test_stale_or_missing_loads_fall_back_to_two_random_choices(router: SlackRequestRouter) -> None:
    replicas = [FakeReplica("a", reported(0.0, age_s=30.0)), FakeReplica("b"), FakeReplica("c")]
    ranks = rank(router, replicas, Request(tiny_inputs(1), deadline_ms=10.0))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    assert rank(router, replicas, "not a mosel request")[0][0] in replicas
    assert router.decisions == {"slack": 0, "fallback": 2}


def test_only_candidates_are_chosen(router: SlackRequestRouter) -> None:
    a, b = FakeReplica("a", reported(0.0)), FakeReplica("b", reported(40.0))
    request = Request(tiny_inputs(1), deadline_ms=10.0)
    assert rank(router, [a, b], request)[0] == [a]
    assert rank(router, [b], request) == [[b], []]  # a is known but full: not a candidate now


def test_a_bad_slo_is_refused_where_the_request_is_made() -> None:
    with pytest.raises(mosel.SLOError, match="min_accuracy"):
        Request(tiny_inputs(1), min_accuracy=7.0)  # before it travels: the rules of model.infer
    with pytest.raises(mosel.SLOError, match="deadline_ms"):
        Request(tiny_inputs(1), deadline_ms=float("nan"))


def test_the_transit_so_far_is_charged(router: SlackRequestRouter) -> None:
    request = Request(tiny_inputs(3), deadline_ms=100.0, sent_at_s=time.time() - 0.06)
    routed = router._route_request(request, time.time())
    assert routed.n == 3
    assert routed.deadline_ms is not None and routed.deadline_ms <= 40.0
    assert routed.available == frozenset({"audio", "video", "text"})


def context(shares: list[float], current: int = 2, drains: list[float] | None = None) -> Any:
    metrics = {"mosel_degraded_share": dict(enumerate(shares))} if shares else {}
    if drains is not None:
        metrics["mosel_drain_ms"] = dict(enumerate(drains))
    return SimpleNamespace(
        aggregated_metrics=metrics, current_num_replicas=current, target_num_replicas=current,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state={},
    )  # fmt: skip


def test_degradation_policy_scales_on_mosels_signals() -> None:
    policy = DegradationPolicy(upper=0.2, lower=0.05, drain_upper_ms=100.0)
    assert policy(context([0.5, 0.3]))[0] == 3
    assert policy(context([0.5, 0.3], current=3))[0] == 3  # capped at max_replicas
    assert policy(context([0.0, 0.01], drains=[0.0, 10.0]))[0] == 1
    assert policy(context([0.0, 0.01], drains=[0.0, 300.0]))[0] == 3  # a long drain scales up too
    assert policy(context([0.1, 0.1]))[0] == 2
    assert policy(context([]))[0] == 2  # nothing reported yet: keep the target
    _, state = policy(context([0.5, 0.3]))
    assert state["mosel"]["degraded_share"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        DegradationPolicy(upper=0.1, lower=0.2)


def test_equally_good_replicas_are_all_first_choices(router: SlackRequestRouter) -> None:
    profile = profiles()["tiny"].to_json()  # first: building it can take over stale_after_s on a busy machine
    a, b = FakeReplica("a", reported(0.0)), FakeReplica("b", reported(0.0))
    request = Request(tiny_inputs(1), deadline_ms=50.0)
    assert sorted(r.replica_id for r in rank(router, [a, b], request)[0]) == ["a", "b"]  # Serve picks
    router.initialize_state(profile=profile, seed=0, ties="slack")
    assert len(rank(router, [a, b], request)[0]) == 1  # SlackRouter's own single pick
    with pytest.raises(ValueError):
        router.initialize_state(profile=profile, ties="nobody")


# ------------------------------------------------- counting what Serve routed (on_request_routed)

NOW = 1_000_000.0  # the frozen wall clock of these tests: the drains do not decay while they run


def report_at(drain_ms: float, at_s: float) -> dict[str, Any]:
    load = mosel.Load(
        drain_ms=drain_ms, queued_jobs=0, queued_requests=0, latency_margin=1.0, overhead_ms=0.1,
        degraded_share=0.0, at_s=at_s,
    )  # fmt: skip
    return {LOAD_KEY: load.to_json()}


def drain_ms(router: SlackRequestRouter, replicas: list[FakeReplica]) -> dict[str, float]:
    """SlackRouter's drain estimate of each replica now (its report plus what was routed there since)."""
    loads: list[mosel.Load | None] = [None] * len(router.slots)
    for replica in replicas:
        loads[router.slots[replica.replica_id]] = mosel.Load.from_json(replica.routing_stats[LOAD_KEY])
    predictions = router.slack.predict(loads, mosel.RouteRequest(n=1), NOW)
    out = {}
    for replica in replicas:
        prediction = predictions[router.slots[replica.replica_id]]
        assert prediction is not None
        out[replica.replica_id] = prediction.drain_ms
    return out


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)


@pytest.mark.usefixtures("frozen")
def test_what_serve_routes_between_two_reports_is_counted(router: SlackRequestRouter) -> None:
    """ties='serve': the job counts against the replica Serve took, at its predicted cost.

    Serve takes "a" whenever it is a first choice (the worst case: a tie-break that herds).
    After two jobs there, "a" cannot give the third its best accuracy within 2 ms: "b" alone.
    """
    a, b = FakeReplica("a", report_at(0.0, NOW - 0.001)), FakeReplica("b", report_at(0.0, NOW - 0.001))
    request = Request(tiny_inputs(2), deadline_ms=2.0, sent_at_s=NOW)
    for sent in range(2):
        pending = FakePending([request])
        first = ranked(router, [a, b], pending)[0]
        assert {r.replica_id for r in first} == {"a", "b"}
        router.on_request_routed(pending, "a", None)  # type: ignore[arg-type]
        assert drain_ms(router, [a, b])["a"] == pytest.approx(0.93 * (sent + 1))
        assert drain_ms(router, [a, b])["b"] == 0.0
    assert rank(router, [a, b], request) == [[b], [a]]
    # A newer report already counts them: the local additions are dropped.
    a.routing_stats = report_at(0.5, NOW)
    assert drain_ms(router, [a, b])["a"] == pytest.approx(0.5)


@pytest.mark.usefixtures("frozen")
def test_a_replica_of_the_second_rank_is_counted_at_its_own_price(router: SlackRequestRouter) -> None:
    a, b = (
        FakeReplica("a", report_at(0.0, NOW - 0.001)),
        FakeReplica("b", report_at(2.5, NOW - 0.001)),
    )  # 1.5 ms left now
    request = Request(tiny_inputs(2), deadline_ms=2.0, sent_at_s=NOW)
    pending = FakePending([request])
    assert ranked(router, [a, b], pending) == [[a], [b]]
    router.on_request_routed(pending, "b", None)  # type: ignore[arg-type]  # "a" was full: Serve went on
    # On "b" (0.5 ms left) the job was priced at the strategy that fits there, cheaper than on "a".
    after = drain_ms(router, [a, b])
    assert 0.0 < after["b"] - 1.5 < 0.5 and after["a"] == 0.0
    router.on_request_routed(pending, "b", None)  # type: ignore[arg-type]  # called twice: counted once
    assert drain_ms(router, [a, b]) == after
    # A replica that was not a candidate when ranking (it came up since): counted, unpriced.
    pending = FakePending([request])
    ranked(router, [a, b], pending)
    router.on_request_routed(pending, "new", None)  # type: ignore[arg-type]
    assert router.slack._sent.queued_requests(router.slots["new"], None) == 2


@pytest.mark.usefixtures("frozen")
def test_the_hook_ignores_what_it_cannot_price(router: SlackRequestRouter) -> None:
    a, b = FakeReplica("a", report_at(0.0, NOW - 0.001)), FakeReplica("b", report_at(0.0, NOW - 0.001))
    for pending in (
        FakePending(["not a mosel request"]),  # another method's call: ranked at random, not counted
        FakePending([Request(tiny_inputs(1), deadline_ms=2.0)], metadata=None),  # no request id
    ):
        ranked(router, [a, b], pending)
        router.on_request_routed(pending, "a", None)  # type: ignore[arg-type]
    never_ranked = FakePending([Request(tiny_inputs(1))])
    router.on_request_routed(never_ranked, "a", None)  # type: ignore[arg-type]
    assert router.expected == {}
    assert drain_ms(router, [a, b]) == {"a": 0.0, "b": 0.0}
    assert router.slack._sent.queued_requests(router.slots["a"], None) == 0


@pytest.mark.usefixtures("frozen")
def test_a_fallback_is_counted_as_requests_without_a_cost(router: SlackRequestRouter) -> None:
    stale = [FakeReplica("a", report_at(0.0, NOW - 30.0)), FakeReplica("b", report_at(0.0, NOW - 30.0))]
    pending = FakePending([Request(tiny_inputs(3), deadline_ms=2.0, sent_at_s=NOW)])
    assert len(ranked(router, stale, pending)) == 1  # power of two
    router.on_request_routed(pending, "b", None)  # type: ignore[arg-type]
    assert router.slack._sent.queued_requests(router.slots["b"], None) == 3
    assert router.slack._sent.entries(router.slots["b"]) == [(NOW, 0.0, 3)]


@pytest.mark.usefixtures("frozen")
def test_ties_slack_counts_once_per_routed_job_however_often_it_ranks(router: SlackRequestRouter) -> None:
    router.initialize_state(profile=profiles()["tiny"].to_json(), seed=0, ties="slack")
    a, b = FakeReplica("a", report_at(0.0, NOW - 0.001)), FakeReplica("b", report_at(0.0, NOW - 0.001))
    pending = FakePending([Request(tiny_inputs(2), deadline_ms=2.0, sent_at_s=NOW)])
    picks = [ranked(router, [a, b], pending)[0][0].replica_id for _ in range(3)]  # Serve backing off
    assert drain_ms(router, [a, b]) == {"a": 0.0, "b": 0.0}  # nothing counted while ranking
    pick = picks[-1]  # the newest ranking is the one Serve acts on
    router.on_request_routed(pending, pick, None)  # type: ignore[arg-type]
    assert drain_ms(router, [a, b])[pick] == pytest.approx(0.93)
    other = "b" if pick == "a" else "a"
    assert rank(router, [a, b], pending.args[0])[0][0].replica_id == other  # the most slack
    # Under Ray Client, Serve never calls the hook: the single pick is counted when it ranks.
    router._use_replica_queue_len_cache = False
    again = FakePending([Request(tiny_inputs(2), deadline_ms=2.0, sent_at_s=NOW)])
    for _ in range(3):  # ranked again while every replica is full: counted once
        ranked(router, [a, b], again)
    assert drain_ms(router, [a, b]) == {"a": pytest.approx(0.93), "b": pytest.approx(0.93)}


def test_the_requests_awaiting_the_hook_are_bounded(
    router: SlackRequestRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The globals the method reads: once a deployment with this router exists in the process,
    # Serve has cloudpickled the class by value and its methods read a copy of mosel.ray's.
    monkeypatch.setitem(SlackRequestRouter._expect.__globals__, "_MAX_EXPECTED", 3)
    replicas = [FakeReplica("a", reported(0.0))]
    pendings = [FakePending([Request(tiny_inputs(1))]) for _ in range(5)]
    for pending in pendings:
        ranked(router, replicas, pending)
    assert list(router.expected) == [p.metadata.internal_request_id for p in pendings[2:]]


# ------------------------------------------------- unknown replicas, clock skew, bounded state


@pytest.mark.usefixtures("frozen")
def test_a_new_replica_is_ranked_first_when_its_peer_is_predicted_late(router: SlackRequestRouter) -> None:
    late = FakeReplica("late", report_at(10_000.0, NOW - 0.1))
    for unknown in (FakeReplica("new"), FakeReplica("silent", report_at(0.0, NOW - 30.0))):
        request = Request(tiny_inputs(2), deadline_ms=50.0, sent_at_s=NOW)
        for _ in range(20):
            pending = FakePending([request])
            assert ranked(router, [late, unknown], pending) == [[unknown], [late]]
            router.on_request_routed(pending, unknown.replica_id, None)  # type: ignore[arg-type]
    assert router.decisions == {"slack": 40, "fallback": 0}


@pytest.mark.usefixtures("frozen")
def test_a_new_replica_beside_an_on_time_peer_gets_probe_jobs_only(router: SlackRequestRouter) -> None:
    profile = profiles()["tiny"].to_json()
    router.initialize_state(profile=profile, seed=0, probe_jobs=2)
    busy, new = FakeReplica("busy", report_at(1.0, NOW - 0.1)), FakeReplica("new")
    request = Request(tiny_inputs(1), deadline_ms=500.0, sent_at_s=NOW)
    firsts = []
    for _ in range(10):  # Serve takes the new replica whenever it is a first choice
        pending = FakePending([request])
        first = sorted(r.replica_id for r in ranked(router, [busy, new], pending)[0])
        firsts.append(first)
        router.on_request_routed(pending, "new" if "new" in first else "busy", None)  # type: ignore[arg-type]
    assert firsts == [["busy", "new"]] * 2 + [["busy"]] * 8
    # Under Ray Client (no hook), a probe is ranked alone and counted when first ranked.
    router.initialize_state(profile=profile, seed=0, probe_jobs=2)
    router._use_replica_queue_len_cache = False
    firsts = [[r.replica_id for r in rank(router, [busy, new], request)[0]] for _ in range(10)]
    assert firsts == [["new"]] * 2 + [["busy"]] * 8


@pytest.mark.usefixtures("frozen")
def test_a_load_stamped_ahead_of_the_routers_clock_is_not_read_as_behind(router: SlackRequestRouter) -> None:
    ahead = FakeReplica("ahead", report_at(0.0, NOW + 5.0))  # its host's clock runs 5 s ahead
    behind = FakeReplica("on-time", report_at(1.9, NOW - 0.0005))  # 1.4 ms of work left
    request = Request(
        tiny_inputs(1), deadline_ms=2.0, sent_at_s=NOW
    )  # the best strategy fits on "ahead" only
    assert rank(router, [ahead, behind], request) == [[ahead], [behind]]
    assert drain_ms(router, [ahead, behind]) == {"ahead": 0.0, "on-time": pytest.approx(1.4)}


def test_replicas_that_left_are_forgotten(
    router: SlackRequestRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [NOW]
    monkeypatch.setattr(time, "time", lambda: now[0])
    request = Request(tiny_inputs(1), deadline_ms=50.0, sent_at_s=NOW)
    for generation in range(100):  # replicas replaced every 2 minutes, for 200 minutes
        now[0] = NOW + 120.0 * generation
        pair = [FakeReplica(f"{generation}-{k}", report_at(0.0, now[0])) for k in range(2)]
        for _ in range(3):
            pending = FakePending([Request(tiny_inputs(1), deadline_ms=50.0, sent_at_s=now[0])])
            first = ranked(router, pair, pending)[0]
            router.on_request_routed(pending, first[0].replica_id, None)  # type: ignore[arg-type]
    assert len(router.slots) <= 4 and router.width <= 4
    assert len(router.slack._sent.tracks) <= 4
    assert rank(router, pair, request)[0]  # and it still routes
