"""The front door against a hostile review's probes (issue 21, second round): each class of fault.

Headers in every epoch unit, strict SLO fields, clients gone while their bodies are decoded,
the Ray ingress as a front door over another backend, readiness after partial moves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

import mosel
import mosel.http

from .test_http import TextAudio, post, profile_text_audio

AUDIO = {"inputs": {"audio": [[1.0, 2.0, 3.0]]}}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return profile_text_audio()


@pytest.fixture
def model(profile: mosel.Profile) -> Iterator[TextAudio]:
    m = TextAudio().eval()
    mosel.attach(m, profile)
    yield m
    if m.gate is not None:
        m.gate.set()
    mosel.close(m, cancel=True)


# ---------------------------------------------------------------- epoch headers, strict SLO fields

UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("prefix", ["", "t="])
def test_epoch_headers_are_read_in_every_unit(unit: str, prefix: str) -> None:
    now = time.time()
    scale = UNITS[unit]
    body = mosel.http.PredictRequest(inputs={}, deadline_ms=60_000)

    def epoch(t: float) -> str:
        return f"{prefix}{int(t * scale)}" if scale > 1 else f"{prefix}{t:.6f}"

    started = mosel.http.charge({"X-Request-Start": epoch(now - 2.0)}, body, now)
    assert 1990.0 <= started.upstream_ms <= 2010.0, started
    ahead = mosel.http.charge({"X-Deadline-At": epoch(now + 30.0)}, mosel.http.PredictRequest(inputs={}), now)
    assert ahead.deadline_ms is not None and 29_990.0 <= ahead.deadline_ms <= 30_010.0
    for passed_s in (0.5, 5.0, 3600.0):  # a spent deadline is spent, in any unit
        with pytest.raises(mosel.DeadlineError):
            mosel.http.charge({"X-Deadline-At": epoch(now - passed_s)}, body, now)


@pytest.mark.parametrize(
    "value", ["170000000000", "5e10", "12345", "1", "1e21", "3e19", "99999999999999", "-1700000000"]
)
def test_an_epoch_in_no_plausible_unit_is_refused_not_misread(value: str) -> None:
    body = mosel.http.PredictRequest(inputs={}, deadline_ms=100)
    for header in ("X-Request-Start", "X-Deadline-At"):
        with pytest.raises(mosel.SLOError, match=header):
            mosel.http.charge({header: value}, body, time.time())


def test_a_deadline_at_in_nanoseconds_that_passed_answers_503(model: TextAudio) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        for passed_s in (5.0, 0.2):
            at = str(int((time.time() - passed_s) * 1e9))
            answer = post(client, AUDIO, **{"X-Deadline-At": at})
            assert answer.status_code == 503 and answer.json()["error"] == "DeadlineError", answer.text
        answer = post(client, AUDIO, **{"X-Deadline-At": str(int((time.time() + 30) * 1e9))})
        assert answer.status_code == 200 and 0 < answer.json()["deadline_ms"] <= 30_000
    assert mosel.stats(model).counters["submitted"] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deadline_ms", '"50"'),
        ("deadline_ms", "true"),
        ("deadline_ms", "false"),
        ("deadline_ms", "[50]"),
        ("min_accuracy", '"0.5"'),
        ("min_accuracy", "true"),
        ("confidence", '"0.9"'),
        ("best_effort", '"yes"'),
        ("best_effort", "1"),
        ("per_request", "0"),
        ("per_request", '"false"'),
    ],
)
def test_the_bodys_slo_fields_are_strict(model: TextAudio, field: str, value: str) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        body = '{"inputs": {"audio": [[1.0, 2.0, 3.0]]}, "' + field + '": ' + value + "}"
        answer = client.post("/predict", content=body, headers=JSON)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "SLOError" and field in answer.json()["detail"]
        ok = '{"inputs": {"audio": [[1.0, 2.0, 3.0]]}, "deadline_ms": 60000, "best_effort": false}'
        assert client.post("/predict", content=ok, headers=JSON).status_code == 200
    assert mosel.stats(model).counters["submitted"] == 1
