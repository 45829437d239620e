"""mosel.ray.HTTPIngress: HTTP in, a mosel.ray.Request to the mosel deployment's handle out.

The handle is a fake (no Ray instance): what the ingress hands it is what the slack router
sees. tests/ray/test_serve.py sends one through a real deployment and its slack router.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import mosel
import mosel.ray
from tests.unit.helpers import Tiny, tiny_profile

BODY = {"inputs": {"audio": [[1.0], [2.0]], "video": [[[1.0] * 3] * 2] * 2, "text": [[0.5], [1.5]]}}


@dataclass
class Answer:
    value: Any

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        await asyncio.sleep(0)
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value

    def cancel(self) -> None:
        pass


@dataclass
class FakeHandle:
    answer: Any
    requests: list[mosel.ray.Request] = field(default_factory=list)

    def remote(self, request: mosel.ray.Request) -> Answer:
        self.requests.append(request)
        return Answer(self.answer)


def result(rows: int = 2) -> mosel.Result:
    return mosel.Result(
        output=torch.tensor([[1.0, 2.0, 3.0]] * rows), modalities=(frozenset({"audio", "text"}),) * rows,
        expected_accuracy=0.7, predicted_latency_ms=1.0, measured_latency_ms=1.5, completion_ms=4.0,
        strategies=(), deadline_met=True, queue_ms=1.0,
    )  # fmt: skip


def ingress(answer: Any) -> tuple[TestClient, FakeHandle]:
    handle = FakeHandle(answer)
    front = mosel.ray.HTTPIngress(handle, tiny_profile(Tiny()).to_json())  # type: ignore[arg-type]
    return TestClient(front.__serve_build_asgi_app__()), handle


def test_the_ingress_sends_a_request_the_slack_router_can_place() -> None:
    http, handle = ingress(result())
    start = time.time() - 0.25  # the request entered the system 250 ms ago, upstream
    answer = http.post(
        "/predict", json=BODY,
        headers={
            "X-Deadline-Ms": "1000", "X-Min-Accuracy": "0.7", "X-Request-Start": f"{start:.6f}",
            "X-Request-Id": "order-7",
        },
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    [sent] = handle.requests
    assert sent.request_id == "order-7"  # the replica labels the job under it too
    assert isinstance(sent, mosel.ray.Request)  # what SlackRequestRouter prices (not opaque HTTP bytes)
    assert sent.rows == 2 and sent.min_accuracy == 0.7
    assert set(sent.inputs) == {"audio", "video", "text"} and sent.inputs["video"].shape == (2, 2, 3)
    assert sent.deadline_ms is not None and 700.0 < sent.deadline_ms <= 750.0  # the 250 ms are charged
    body = answer.json()
    assert body["outputs"] == [[1.0, 2.0, 3.0]] * 2 and body["prediction"] == [2, 2]
    assert body["modalities"] == [["audio", "text"]] * 2 and body["deadline_met"] is True
    assert body["upstream_ms"] >= 250.0  # the model was given what was left after the decode too
    assert math.isclose(body["deadline_ms"] - body["received_ms"], sent.deadline_ms, abs_tol=1e-6)
    assert http.get("/healthz").json() == {"status": "alive"}


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (mosel.DeadlineError("late", deadline_ms=5.0, predicted_ms=9.0, best_accuracy_within_deadline=None),
         503, "DeadlineError"),
        (mosel.ReplicaError("lost"), 503, "ReplicaError"),
        (mosel.AccuracyUnreachableError("too high", min_accuracy=0.99, best_accuracy=0.9), 422,
         "AccuracyUnreachableError"),
    ],
)  # fmt: skip
def test_the_ingress_answers_mosels_errors_with_their_status(answer: Any, status: int, error: str) -> None:
    http, _ = ingress(answer)
    reply = http.post("/predict", json=BODY, headers={"X-Deadline-Ms": "1000"})
    assert reply.status_code == status and reply.json()["error"] == error
    assert ("Retry-After" in reply.headers) == (status == 503)


def test_the_ingress_refuses_what_it_cannot_send() -> None:
    http, handle = ingress(result())
    for body, headers, status in (
        ({"inputs": {"smell": [[1.0]]}}, {}, 400),
        ({"inputs": "nothing"}, {}, 400),
        (BODY, {"X-Deadline-Ms": "soon"}, 400),
        (
            BODY,
            {"X-Deadline-Ms": "100", "X-Request-Start": f"{time.time() - 1.0:.6f}"},
            503,
        ),  # spent upstream
    ):
        reply = http.post("/predict", json=body, headers=headers)
        assert reply.status_code == status, (body, headers, reply.text)
    assert handle.requests == []  # none of them was sent on


@dataclass
class SlowAnswer(Answer):
    after_s: float = 0.0

    async def _get(self) -> Any:
        await asyncio.sleep(self.after_s)  # the answer's way back (the object store, the network)
        return await super()._get()


@dataclass
class SlowHandle(FakeHandle):
    after_s: float = 0.0

    def remote(self, request: mosel.ray.Request) -> Answer:
        self.requests.append(request)
        return SlowAnswer(self.answer, self.after_s)


def test_the_ingress_is_mosel_https_front_door_with_all_its_rules() -> None:
    """Body limits, non-finite inputs, deadline_met as the client sees it, metrics: as mosel.http."""
    handle = SlowHandle(result())
    front = mosel.ray.HTTPIngress(handle, tiny_profile(Tiny()).to_json(), max_body_bytes=4096)  # type: ignore[arg-type]
    with TestClient(front.__serve_build_asgi_app__()) as http:
        big = json.dumps(BODY).encode() + b" " * 8192
        refused = http.post("/predict", content=big, headers={"content-type": "application/json"})
        assert refused.status_code == 413 and refused.headers["connection"] == "close"
        declared = http.post("/predict", content=b"{}", headers={"content-length": str(1 << 30)})
        assert declared.status_code == 413
        nan = '{"inputs": {"audio": [[NaN], [1.0]], "text": [[1], [2]]}}'
        answer = http.post("/predict", content=nan, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and "audio" in answer.json()["detail"], answer.text
        wrong = http.post("/predict", json=BODY | {"deadline_ms": "100"})
        assert wrong.status_code == 400 and wrong.json()["error"] == "SLOError"
        assert handle.requests == []  # none of them was sent on
        handle.after_s = 0.15  # the replica met its deadline (its result says so); the answer came late
        late = http.post("/predict", json=BODY | {"deadline_ms": 100})
        assert late.status_code == 200, late.text
        assert late.json()["deadline_met"] is False and late.json()["completion_ms"] >= 150.0
        handle.after_s = 0.0
        assert http.post("/predict", json=BODY | {"deadline_ms": 60_000}).json()["deadline_met"] is True
        metrics = http.get("/metrics").text
        assert 'mosel_http_events_total{event="served_late",model="Tiny"} 1.0' in metrics
        assert 'mosel_http_responses_total{model="Tiny",status="413"} 2.0' in metrics
        assert http.get("/readyz").status_code == 200
    assert front.service is not None and front.service.http_events()["served_on_time"] == 1


def test_the_ingress_options_reach_the_front_door() -> None:
    handle = SlowHandle(result())
    front = mosel.ray.HTTPIngress(handle, tiny_profile(Tiny()).to_json(), allow_non_finite=True)  # type: ignore[arg-type]
    with TestClient(front.__serve_build_asgi_app__()) as http:
        nan = '{"inputs": {"audio": [[NaN], [1.0]]}}'
        assert (
            http.post("/predict", content=nan, headers={"content-type": "application/json"}).status_code
            == 200
        )
    assert math.isnan(float(handle.requests[0].inputs["audio"][0, 0]))
