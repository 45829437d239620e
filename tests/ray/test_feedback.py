"""Labels on Ray Serve: the replica's ``feedback``, the slack router taking them home, ``Client.feedback``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from ray import serve

import mosel
from mosel.execution import process_token
from mosel.ray import IDS_KEY, Feedback, MoselReplica, Request, SlackRequestRouter
from tests.ray.models import make_tiny, profiles
from tests.ray.test_router import FakePending, FakeReplica
from tests.unit.helpers import tiny_inputs


def test_the_slack_router_takes_labels_to_the_replica_that_served_the_job() -> None:
    router = SlackRequestRouter.__new__(SlackRequestRouter)  # Serve's constructor needs a deployment
    router.initialize_state(profile=profiles()["tiny"].to_json(), stale_after_s=1.0, seed=0)
    a, b = FakeReplica("a", {IDS_KEY: "0badcafe"}), FakeReplica("b", {IDS_KEY: "feedf00d"})

    def rank(feedback: Feedback) -> list[list[Any]]:
        return asyncio.run(router.choose_replicas([a, b], FakePending([feedback])))  # type: ignore[arg-type]

    assert rank(Feedback("feedf00d-17", [1])) == [[b], [a]]
    assert rank(Feedback("0badcafe-3", [1])) == [[a], [b]]
    assert rank(Feedback("order-17", [1])) == [[a, b]]  # a caller's own id: any replica may hold it
    assert router.expected == {} and router.decisions == {"slack": 0, "fallback": 0}  # not a job


def test_a_replica_scores_the_labels_of_its_own_jobs() -> None:
    monitoring = mosel.Monitoring(shadow_rate=0.0)
    replica = MoselReplica(make_tiny, profiles()["tiny"].to_json(), monitoring=monitoring)
    try:
        assert replica.record_routing_stats()[IDS_KEY] == process_token()
        result = asyncio.run(replica(Request(tiny_inputs(2), deadline_ms=500.0, request_id="order-9")))
        assert result.id.startswith(process_token() + "-")
        assert replica.feedback(Feedback(result.id, [2, None])) == 1
        assert replica.feedback(Feedback("order-9", {1: 2})) == 1
        assert replica.feedback(Feedback("somewhere-else-1", [0])) is None
        assert replica.stats().accuracy.counters["labelled"] == 2  # type: ignore[union-attr]
    finally:
        mosel.close(replica.model)
    plain = MoselReplica(make_tiny, profiles()["tiny"].to_json())
    try:
        with pytest.raises(mosel.InputError, match="not monitored"):
            plain.feedback(Feedback("x-1", [0]))
    finally:
        mosel.close(plain.model)


@pytest.fixture(scope="module")
def monitored(ray_serve: None, profile_paths: dict[str, str]) -> Iterator[mosel.ray.Client]:
    app = mosel.ray.deployment(
        make_tiny, profile_paths["tiny"], name="monitored", num_replicas=2,
        ray_actor_options={"num_cpus": 0.25}, seed=0, stats_period_s=0.2,
        monitoring=mosel.Monitoring(shadow_rate=0.0),
    )  # fmt: skip
    handle = serve.run(app, name="monitored", route_prefix=None)
    yield mosel.ray.Client(handle, timeout_s=60.0)
    serve.delete("monitored")


def test_client_feedback_reaches_the_replica_that_served_each_job(monitored: mosel.ray.Client) -> None:
    results = [monitored.infer(tiny_inputs(1), deadline_ms=5000.0) for _ in range(6)]
    assert [monitored.feedback(r.id, [2]) for r in results] == [1] * 6
    assert monitored.feedback(results[0].id, [2]) == 0  # labelled already: forgotten
    with pytest.raises(mosel.InputError, match="one entry per request"):
        result = monitored.infer(tiny_inputs(2), deadline_ms=5000.0)
        monitored.feedback(result.id, [2])


def test_the_http_ingress_takes_feedback_to_the_client() -> None:
    from fastapi.testclient import TestClient

    from mosel.ray import HTTPIngress
    from tests.unit.helpers import Tiny, tiny_profile

    sent: list[tuple[str, Any]] = []

    class Client:
        handle = None  # readiness is not looked at here

        def feedback(self, result_id: str, labels: Any) -> int:
            if result_id == "plain":
                raise mosel.NotMonitoredError("the deployment's model is not monitored")
            sent.append((result_id, labels))
            return 0 if result_id == "gone" else len(labels)

    ingress = HTTPIngress(object(), tiny_profile(Tiny()).to_json())  # type: ignore[arg-type]
    ingress.client = Client()  # type: ignore[assignment]
    with TestClient(ingress.__serve_build_asgi_app__()) as http:
        answer = http.post("/feedback", json={"id": "ab12-3", "labels": [1, 2]})
        assert answer.status_code == 200 and answer.json() == {"labelled": 2}
        assert sent == [("ab12-3", [1, 2])]
        assert http.post("/feedback", json={"id": "gone", "labels": [1]}).status_code == 404
        assert http.post("/feedback", json={"labels": [1]}).status_code == 400
        assert http.post("/feedback", json={"id": "plain", "labels": [1]}).status_code == 409
