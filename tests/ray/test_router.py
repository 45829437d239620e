"""SlackRequestRouter and DegradationPolicy as plain objects: no Ray instance needed."""

from __future__ import annotations

import asyncio
import time
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
    return asyncio.run(router.choose_replicas(replicas, FakePending([request])))  # type: ignore[arg-type]


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


def test_a_bad_slo_is_left_to_the_replica(router: SlackRequestRouter) -> None:
    replicas = [FakeReplica("a", reported(0.0)), FakeReplica("b", reported(0.0))]
    ranks = rank(router, replicas, Request(tiny_inputs(1), min_accuracy=7.0))
    assert len(ranks) == 1  # fallback; the replica raises SLOError to the caller


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
    a, b = FakeReplica("a", reported(0.0)), FakeReplica("b", reported(0.0))
    request = Request(tiny_inputs(1), deadline_ms=50.0)
    assert sorted(r.replica_id for r in rank(router, [a, b], request)[0]) == ["a", "b"]  # Serve picks
    router.initialize_state(profile=profiles()["tiny"].to_json(), seed=0, ties="slack")
    assert len(rank(router, [a, b], request)[0]) == 1  # SlackRouter's own single pick
    with pytest.raises(ValueError):
        router.initialize_state(profile=profiles()["tiny"].to_json(), ties="nobody")
