"""Labels over HTTP: ``POST /feedback`` on mosel.http's router, by result id or ``X-Request-Id``."""

from __future__ import annotations

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import mosel  # noqa: E402
import mosel.http  # noqa: E402
from tests.unit.helpers import Tiny, tiny_inputs, tiny_profile  # noqa: E402


def _body(n: int) -> dict[str, object]:
    return {"inputs": {m: t.tolist() for m, t in tiny_inputs(n).items()}, "min_accuracy": 0.7}


def test_labels_come_back_over_http_by_id_and_by_the_callers_id() -> None:
    model = Tiny().eval()
    mosel.attach(model, tiny_profile(model), monitoring=mosel.Monitoring(shadow_rate=0.0))
    with TestClient(mosel.http.create_app(model)) as client:
        answer = client.post("/predict", json=_body(2), headers={"X-Deadline-Ms": "500"})
        assert answer.status_code == 200
        rid = answer.json()["id"]
        assert rid and answer.json()["modalities"]
        labelled = client.post("/feedback", json={"id": rid, "labels": [2, None]})
        assert labelled.status_code == 200 and labelled.json() == {"labelled": 1}
        assert client.post("/feedback", json={"id": rid, "labels": {"1": 0}}).json() == {"labelled": 1}
        # the caller's own id
        answer = client.post("/predict", json=_body(1), headers={"X-Request-Id": "order-17"})
        assert client.post("/feedback", json={"id": "order-17", "labels": [2]}).json() == {"labelled": 1}
        # refusals
        gone = client.post("/feedback", json={"id": "order-17", "labels": [2]})  # fully labelled: forgotten
        assert gone.status_code == 404 and gone.json()["error"] == "UnknownId"
        answer = client.post("/predict", json=_body(2))
        bad = client.post("/feedback", json={"id": answer.json()["id"], "labels": [1]})
        assert bad.status_code == 400 and "one entry per request" in bad.json()["detail"]
        assert client.post("/feedback", json={"labels": [1]}).status_code == 400
        metrics = client.get("/metrics").text
        assert 'mosel_feedback_events_total{event="labelled",model="Tiny"} 3.0' in metrics
        assert "mosel_accuracy_live" in metrics
    accuracy = mosel.stats(model).accuracy
    assert accuracy is not None and accuracy.counters["labelled"] == 3


def test_feedback_to_a_model_not_monitored_is_a_conflict() -> None:
    model = Tiny().eval()
    mosel.attach(model, tiny_profile(model))
    with TestClient(mosel.http.create_app(model)) as client:
        answer = client.post("/predict", json=_body(1))
        refused = client.post("/feedback", json={"id": answer.json()["id"], "labels": [0]})
        assert refused.status_code == 409 and refused.json()["error"] == "NotMonitored"
