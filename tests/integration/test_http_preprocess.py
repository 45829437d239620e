"""The HTTP front door's pre-processing hook (issue 23, point 4): raw inputs -> model inputs, server-side.

The hook runs off the event loop, inside the front door's rules (deadline charging, the body
limit, disconnects, metrics); its failures answer 400 naming the field, and what it returns is
checked against the profile's input schema, so that a wrong hook is a 400, never a 500.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from fastapi import FastAPI
from fastapi.testclient import TestClient

import mosel
import mosel.http
from mosel.errors import InputError

from .test_http import TextAudio, by_hand, post, profile_text_audio
from .test_http_frontdoor import FakeTimer, metric, raw_request, read_response, uvicorn_server, wait_until


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


def tokenize(captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """'3 1 4' -> token ids, padded with 0 to the longest caption, and the bool mask."""
    rows = [[int(w) for w in c.split()] for c in captions]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


CAPTIONS = ["3 1 4", "1 5", "9 2 6 5"]
AUDIO = [[0.5, -1.0, 2.0], [0.0, 1.0, 1.0], [3.0, 0.0, -2.0]]


def b64(values: Any, dtype: str = "float32") -> dict[str, Any]:
    array = np.asarray(values, dtype=dtype)
    return {"$b64": base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes()).decode(),
            "dtype": dtype, "shape": list(array.shape)}  # fmt: skip


def test_a_field_hook_serves_raw_text_as_the_same_inputs_by_hand(model: TextAudio) -> None:
    threads: list[str] = []

    def hook(captions: Sequence[str]) -> dict[str, torch.Tensor]:
        threads.append(threading.current_thread().name)
        return tokenize(captions)

    app = mosel.http.create_app(model, preprocess={"text": hook})
    with TestClient(app) as client:
        response = post(client, {"inputs": {"text": CAPTIONS, "audio": AUDIO}})  # audio: no hook, JSON lists
        assert response.status_code == 200, response.text
        answer = response.json()
        inputs = {"text": tokenize(CAPTIONS), "audio": torch.tensor(AUDIO)}
        torch.testing.assert_close(
            torch.tensor(answer["outputs"]), by_hand(model, inputs, answer["modalities"])
        )
        assert answer["modalities"] == [["audio", "text"]] * 3
        binary = post(client, {"inputs": {"text": CAPTIONS, "audio": b64(AUDIO)}})  # a binary leaf beside it
        assert binary.json()["outputs"] == answer["outputs"]
    assert threads and all(name.startswith("mosel-http-decode") for name in threads), threads  # off the loop


def test_a_whole_inputs_hook_gets_the_raw_json_and_its_mappings_are_taken(model: TextAudio) -> None:
    seen: list[Any] = []

    class Encoding(dict[str, Any]):  # a Mapping subclass, as a tokenizer's BatchEncoding is
        pass

    def hook(inputs: dict[str, Any]) -> dict[str, Any]:
        seen.append(inputs)
        return {"text": Encoding(tokenize(inputs["captions"])), "audio": np.asarray(inputs["audio"])}

    with TestClient(mosel.http.create_app(model, preprocess=hook)) as client:
        response = post(client, {"inputs": {"captions": CAPTIONS, "audio": b64(AUDIO, "float64")}})
    assert response.status_code == 200, response.text
    assert isinstance(seen[0]["audio"], np.ndarray) and seen[0]["audio"].dtype == np.float64  # decoded for it
    inputs = {"text": tokenize(CAPTIONS), "audio": torch.tensor(AUDIO)}
    torch.testing.assert_close(
        torch.tensor(response.json()["outputs"]), by_hand(model, inputs, response.json()["modalities"])
    )


class Odd(Exception):
    pass


def failing(exc: BaseException) -> Any:
    def hook(value: Any) -> Any:
        raise exc

    return hook


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ({"text": failing(KeyError("caption"))}, r"missing field 'caption' in inputs\['text'\]"),
        (failing(KeyError("text")), "missing field 'text' in inputs"),
        ({"text": failing(InputError("captions must be strings"))}, r"^captions must be strings$"),
        (
            {"text": failing(Odd("the tokenizer broke"))},
            r"inputs\['text'\]: .* failed on it: Odd: the tokenizer broke",
        ),
        ({"text": failing(ZeroDivisionError("division by zero"))}, r"inputs\['text'\].*ZeroDivisionError"),
        # What a hook returns is checked against the schema: never a 500 from inside the model.
        (
            {"text": lambda c: {"input_ids": torch.ones(1, 2), "attention_mask": torch.ones(1, 2).bool()}},
            r"text\['input_ids'\] is float32, the model takes int64",
        ),
        (
            {
                "text": lambda c: {
                    "input_ids": torch.full((1, 2), 10),
                    "attention_mask": torch.ones(1, 2).bool(),
                }
            },
            r"text\['input_ids'\] holds 10 at \(0, 0\); the model takes integers in \[0, 9\]",
        ),
        ({"text": lambda c: {"input_ids": torch.ones(1, 2).long()}}, r"text has the parts"),
        ({"text": lambda c: torch.ones(1, 2).long()}, r"text has the parts"),
        (lambda v: {"smell": torch.ones(1, 3)}, "returned modality 'smell'"),
        (lambda v: [torch.ones(1, 3)], "must return a mapping"),
        (lambda v: {"audio": torch.tensor([[float("nan"), 0.0, 0.0]])}, r"audio holds nan"),
        (lambda v: {"audio": torch.ones(1, 4)}, r"audio has shape \(1, 4\), the model takes \(B, 3\)"),
    ],
)
def test_a_failing_or_mistaken_hook_answers_400_naming_the_field_and_nothing_is_computed(
    model: TextAudio, hook: Any, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="mosel"),
        TestClient(mosel.http.create_app(model, preprocess=hook)) as client,
    ):
        response = post(client, {"inputs": {"text": CAPTIONS[:1], "audio": AUDIO[:1]}})
        metrics = client.get("/metrics").text
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "InputError"
    assert re.search(message, response.json()["detail"]), response.json()["detail"]
    assert mosel.stats(model).counters.get("submitted", 0) == 0
    assert metric(metrics, "mosel_http_responses_total", status="400") == 1
    unexpected = "Odd" in message or "ZeroDivision" in message
    assert any("pre-processing hook" in r.getMessage() for r in caplog.records) is unexpected  # logged


def test_a_raw_body_goes_to_the_hook_with_the_slo_from_the_headers(model: TextAudio) -> None:
    bodies: list[mosel.http.RawBody] = []

    def hook(value: mosel.http.RawBody | dict[str, Any]) -> dict[str, Any]:
        assert isinstance(value, mosel.http.RawBody)
        bodies.append(value)
        return {"audio": np.frombuffer(value.data, dtype="<f4").reshape(-1, 3).copy()}

    data = np.asarray(AUDIO, dtype="<f4").tobytes()
    with TestClient(mosel.http.create_app(model, preprocess=hook)) as client:
        headers = {"content-type": "audio/x-raw; format=f32le", "X-Deadline-Ms": "60000"}
        response = client.post("/predict", content=data, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["deadline_ms"] == 60000.0 and response.json()["modalities"] == [["audio"]] * 3
        assert bodies[0].data == data and bodies[0].content_type.startswith("audio/x-raw")
        bad = client.post(
            "/predict", content=data, headers={"content-type": "audio/wav", "X-Deadline-Ms": "x"}
        )
        assert bad.status_code == 400 and bad.json()["error"] == "SLOError"
    with TestClient(mosel.http.create_app(model, preprocess={"text": tokenize})) as client:
        refused = client.post("/predict", content=data, headers={"content-type": "audio/wav"})
    assert refused.status_code == 400 and "one function" in refused.json()["detail"]


def test_the_hooks_time_is_charged_to_the_deadline(model: TextAudio, monkeypatch: pytest.MonkeyPatch) -> None:
    timer = FakeTimer()
    spend_ms = [600.0]

    def slow(captions: Sequence[str]) -> dict[str, torch.Tensor]:
        timer.now_s += spend_ms[0] / 1000.0
        return tokenize(captions)

    app = FastAPI()
    app.include_router(
        mosel.http.create_router(mosel.http.Service(model, timer=timer, preprocess={"text": slow}))
    )
    with TestClient(app) as client:
        served = post(client, {"inputs": {"text": CAPTIONS}}, **{"X-Deadline-Ms": "1000"}).json()
        assert served["received_ms"] == pytest.approx(600.0) and served["deadline_met"] is True
        spend_ms[0] = 1500.0
        refused = post(client, {"inputs": {"text": CAPTIONS}}, **{"X-Deadline-Ms": "1000"})
        assert refused.status_code == 503 and "received and decoded" in refused.json()["detail"]
    assert mosel.stats(model).counters.get("submitted", 0) == 1


def test_the_body_limit_holds_before_the_hook(model: TextAudio) -> None:
    called: list[object] = []
    app = mosel.http.create_app(model, max_body_bytes=100, preprocess=lambda v: called.append(v) or {})
    with TestClient(app) as client:
        response = client.post("/predict", content=b"x" * 101, headers={"content-type": "audio/wav"})
    assert response.status_code == 413 and called == []


def test_a_client_gone_while_the_hook_runs_has_nothing_submitted(model: TextAudio) -> None:
    entered, release = threading.Event(), threading.Event()

    def blocking(captions: Sequence[str]) -> dict[str, torch.Tensor]:
        entered.set()
        release.wait(30)
        return tokenize(captions)

    service = mosel.http.Service(model, preprocess={"text": blocking})
    app = FastAPI()
    app.include_router(mosel.http.create_router(service))
    with uvicorn_server(app) as port:
        conn = raw_request(port, json.dumps({"inputs": {"text": CAPTIONS}}).encode())
        assert entered.wait(30)
        conn.close()
        wait_until(
            lambda: service.http_events()["client_gone_before_submit"] == 1, "the handler to see it go"
        )
        release.set()
        again = raw_request(port, json.dumps({"inputs": {"text": CAPTIONS}}).encode())
        status, _, body = read_response(again)
        again.close()
    assert status == 200, body
    assert mosel.stats(model).counters.get("submitted", 0) == 1  # only the second request's job


def test_a_hook_of_the_wrong_form_is_refused_when_the_service_is_made(model: TextAudio) -> None:
    with pytest.raises(TypeError, match="function of the raw inputs"):
        mosel.http.Service(model, preprocess=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'text' maps to str"):
        mosel.http.Service(model, preprocess={"text": "tokenize"})  # type: ignore[dict-item]


def test_finite_outputs_whose_sum_overflows_are_answered_as_they_are() -> None:
    """The finiteness screen of an answer is its sum; an overflowing sum is checked value by value."""
    big = torch.tensor([[6e4, 6e4, 1.0], [1.0, 6e4, 6e4]], dtype=torch.float16)  # sums to inf in float16
    assert mosel.http.encode_output(big) == big.tolist()
    assert mosel.http.prediction_of(big) == [0, 1]
    with_nan = torch.tensor([[6e4, float("nan")], [1.0, 2.0]], dtype=torch.float16)
    assert mosel.http.encode_output(with_nan) == [[60000.0, None], [1.0, 2.0]]
    assert mosel.http.prediction_of(with_nan) == [None, 1]
