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


def test_a_callers_id_names_one_job_whatever_its_length_and_never_shadows_a_result_id() -> None:
    model = Tiny().eval()
    mosel.attach(model, tiny_profile(model), monitoring=mosel.Monitoring(shadow_rate=0.0))
    with TestClient(mosel.http.create_app(model)) as client:
        # an id given twice names the latest job; the first job finishing does not take it away
        first = client.post("/predict", json=_body(1), headers={"X-Request-Id": "dup"}).json()["id"]
        client.post("/predict", json=_body(1), headers={"X-Request-Id": "dup"})
        assert client.post("/feedback", json={"id": first, "labels": [2]}).json() == {"labelled": 1}
        assert client.post("/feedback", json={"id": "dup", "labels": [2]}).json() == {"labelled": 1}
        # an id of any length works as sent
        long = "trace-" + "x" * 600
        client.post("/predict", json=_body(1), headers={"X-Request-Id": long})
        assert client.post("/feedback", json={"id": long[:256], "labels": [2]}).status_code == 404
        assert client.post("/feedback", json={"id": long, "labels": [2]}).json() == {"labelled": 1}
        # a caller's id equal to another job's result id does not take that job's labels
        held = client.post("/predict", json=_body(1)).json()["id"]
        client.post("/predict", json=_body(1), headers={"X-Request-Id": held})
        assert client.post("/feedback", json={"id": held, "labels": [2]}).json() == {"labelled": 1}
        assert mosel.runtime.monitor_of(model) is not None
        assert not mosel.runtime.monitor_of(model).holds(held)  # type: ignore[union-attr]


@pytest.mark.parametrize("label", [1.5, 1e400, -1, 3, "2"])
def test_labels_top1_cannot_score_are_refused_and_nothing_is_marked(label: object) -> None:
    model = Tiny().eval()  # three classes
    mosel.attach(model, tiny_profile(model), monitoring=mosel.Monitoring(shadow_rate=0.0))
    with TestClient(mosel.http.create_app(model)) as client:
        rid = client.post("/predict", json=_body(1)).json()["id"]
        refused = client.post("/feedback", content=f'{{"id": "{rid}", "labels": [{_json(label)}]}}')
        assert refused.status_code == 400, refused.text
        assert client.post("/feedback", json={"id": rid, "labels": [2]}).json() == {"labelled": 1}


def _json(value: object) -> str:
    return '"2"' if value == "2" else ("1e400" if value == 1e400 else str(value))


def test_presence_masks_take_json_booleans_only() -> None:
    model = Tiny().eval()
    mosel.attach(model, tiny_profile(model))
    with TestClient(mosel.http.create_app(model)) as client:
        for present in ([1], ["yes"], ["off"], [None]):
            body = {**_body(1), "present": {"audio": present}}
            answer = client.post("/predict", json=body)
            assert answer.status_code == 400, (present, answer.text)
        assert client.post("/predict", json={**_body(1), "present": {"audio": [False]}}).status_code == 200
