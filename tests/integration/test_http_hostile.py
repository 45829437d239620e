"""The front door against a hostile review's probes (issue 21, second round): each class of fault.

Headers in every epoch unit, strict SLO fields, clients gone while their bodies are decoded,
the Ray ingress as a front door over another backend, readiness after partial moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi import FastAPI
from fastapi.testclient import TestClient

import mosel
import mosel.http

from .test_http import TextAudio, post, profile_text_audio
from .test_http_frontdoor import FakeTimer, raw_request, read_response, reprofiler, uvicorn_server, wait_until

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


# ---------------------------------------------------------------- readiness: computed, whole-model


def test_under_warn_readiness_runs_the_handling_serving_runs_without_a_request(model: TextAudio) -> None:
    """Moved, served (warned, re-pinned), moved back: ready at once; compiled: the same answer throughout."""
    mosel.attach(model, mosel.profile_of(model), on_stale="warn")
    with TestClient(mosel.http.create_app(model)) as client:
        model.double()
        with pytest.warns(mosel.MoselWarning, match="moved from"):
            assert post(client, AUDIO).status_code == 200
        away = client.get("/readyz")
        assert away.status_code == 503 and "measured in torch.float32" in away.json()["reason"]
        model.float()
        with pytest.warns(mosel.MoselWarning, match="moved from"):
            back = client.get("/readyz")  # no request needed
        assert back.status_code == 200, back.json()
        assert post(client, AUDIO).status_code == 200
        mosel.compile_branches(model, backend="eager")
        with pytest.warns(mosel.MoselWarning, match="compiled parts changed"):
            before = client.get("/readyz")
        assert before.status_code == 503 and "compiled parts" in before.json()["reason"]
        assert post(client, AUDIO).status_code == 200  # serves on, as warn says
        after = client.get("/readyz")
        assert after.status_code == 503 and after.json() == before.json()


@pytest.mark.parametrize(
    "move",
    [
        lambda m: m.audio.double(),
        lambda m: m.audio.half(),
        lambda m: setattr(m.audio.bias, "data", m.audio.bias.data.double()),
    ],
    ids=["audio.double()", "audio.half()", "one bias"],
)
def test_a_partial_move_is_a_move(model: TextAudio, move: Any) -> None:
    """Only a part of the model moved (its first parameter did not): not ready, and refused with 503."""
    with TestClient(mosel.http.create_app(model)) as client:
        assert client.get("/readyz").status_code == 200
        move(model)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "parameters or buffers moved" in ready.json()["reason"]
        refused = post(client, AUDIO)
        assert refused.status_code == 503 and refused.json()["error"] == "ProfileMismatchError", refused.text
        model.float()
        assert client.get("/readyz").status_code == 200
        assert post(client, AUDIO).status_code == 200


def test_serving_alone_sees_a_partial_move(model: TextAudio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mosel.runtime, "LAYOUT_CHECK_S", 0.0)  # serving looks at every tensor each call
    assert model.infer({"audio": torch.ones(1, 3)}).output.shape == (1, 3)  # type: ignore[operator]
    model.audio.double()
    with pytest.raises(mosel.ProfileMismatchError, match="parameters or buffers moved"):
        model.infer({"audio": torch.ones(1, 3)})  # type: ignore[operator]
    with TestClient(mosel.http.create_app(model)) as client:
        assert post(client, AUDIO).json()["error"] == "ProfileMismatchError"


@pytest.mark.parametrize("on_stale", ["warn", "reprofile"])
def test_an_explicit_input_schema_follows_the_models_dtype(profile: mosel.Profile, on_stale: str) -> None:
    started, go, calls = threading.Event(), threading.Event(), []
    go.set()
    m = TextAudio().eval()
    mosel.attach(m, profile, on_stale="warn" if on_stale == "warn" else reprofiler(started, go, calls))
    schema = {k: dataclasses.replace(v) for k, v in profile.input_schema.items()}
    try:
        with TestClient(mosel.http.create_app(m, input_schema=schema)) as client:
            assert post(client, AUDIO).status_code == 200
            m.double()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mosel.MoselWarning)
                if on_stale == "reprofile":
                    wait_until(lambda: client.get("/readyz").status_code == 200, "the re-profile")
                served = post(client, AUDIO)
            assert served.status_code == 200, served.text  # float64 inputs for a float64 model
    finally:
        mosel.close(m, cancel=True)


# ---------------------------------------------------------------- decoding in steps


def record_pieces(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Count the numbers each GIL-holding step (a ``torch.tensor`` of a list) turns into a tensor."""
    sizes: list[int] = []
    tensor = torch.tensor

    def counting(data: Any, *args: Any, **kwargs: Any) -> Any:
        made = tensor(data, *args, **kwargs)
        if isinstance(data, list):
            sizes.append(made.numel())
        return made

    monkeypatch.setattr(mosel.http.wire, "DECODE_STEP", step)
    monkeypatch.setattr(torch, "tensor", counting)
    return sizes


@pytest.mark.parametrize(("rows", "tokens"), [(2, 1000), (1, 5000), (3, 130), (40, 7)])
def test_a_leaf_decodes_in_steps_of_at_most_decode_step_numbers_even_within_a_row(
    model: TextAudio, profile: mosel.Profile, monkeypatch: pytest.MonkeyPatch, rows: int, tokens: int
) -> None:
    ids = [[(i * 7 + j) % 10 for j in range(tokens)] for i in range(rows)]
    mask = [[bool((i + j) % 3) for j in range(tokens)] for i in range(rows)]
    inputs = {"text": {"input_ids": ids, "attention_mask": mask}, "audio": [[0.5, 1.5, 2.5]] * rows}
    whole = mosel.http.decode_inputs(model, inputs, profile.input_schema)
    sizes = record_pieces(monkeypatch, 64)
    stepped = mosel.http.decode_inputs(model, inputs, profile.input_schema)
    assert sizes and max(sizes) <= 64 and sum(sizes) == 2 * rows * tokens + 3 * rows  # each number once
    for part in ("input_ids", "attention_mask"):
        assert torch.equal(stepped["text"][part], whole["text"][part])  # type: ignore[index]
        assert stepped["text"][part].dtype == whole["text"][part].dtype  # type: ignore[index]
    assert isinstance(inputs["text"]["input_ids"], list)  # the body itself is left as it was


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda rows: rows[-1].__setitem__(2, float("nan")), r"audio holds nan at \(2999, 2\)"),
        (lambda rows: rows.__setitem__(1500, [1.0, 2.0]), "rectangular"),
        (lambda rows: rows.__setitem__(2999, 5.0), "rectangular"),
        (lambda rows: rows[10].__setitem__(0, "x"), "rectangular"),
    ],
)
def test_a_bad_value_is_refused_without_decoding_the_whole_input_in_one_step(
    model: TextAudio, profile: mosel.Profile, monkeypatch: pytest.MonkeyPatch, bad: Any, message: str
) -> None:
    rows: list[Any] = [[0.5, 1.5, 2.5] for _ in range(3000)]
    bad(rows)
    sizes = record_pieces(monkeypatch, 300)
    with pytest.raises(mosel.InputError, match=message):
        mosel.http.decode_inputs(model, {"audio": rows}, profile.input_schema)
    assert max(sizes, default=0) <= 300  # no step took the whole input


# ---------------------------------------------------------------- clients gone while their bodies decode


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_clients_gone_while_their_large_bodies_wait_or_decode_have_nothing_submitted(
    model: TextAudio, monkeypatch: pytest.MonkeyPatch, http: str
) -> None:
    """Three large bodies, one decode worker: one decoding, two waiting; every client closes at once.

    Each is answered (499) as soon as its client is gone, without waiting for the decode; the
    two waiting are never decoded, and nothing is submitted.
    """
    entered: list[int] = []
    release = threading.Event()
    decode = mosel.http.decode_inputs

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.append(1)
        assert release.wait(30)
        return decode(*args, **kwargs)

    monkeypatch.setattr(mosel.http.service, "decode_inputs", slow)
    service = mosel.http.Service(model)  # one decode worker
    app = FastAPI()
    app.include_router(mosel.http.create_router(service))
    body = json.dumps(AUDIO).encode() + b" " * (mosel.http.LARGE_BODY + 1000)
    with uvicorn_server(app, http) as port:
        connections = [raw_request(port, body) for _ in range(3)]
        wait_until(lambda: len(entered) == 1, "the first body to be decoding")
        for connection in connections:
            connection.close()
        wait_until(
            lambda: service.http_events()["client_gone_before_submit"] == 3, "all three to be seen gone"
        )
        release.set()
        again = raw_request(port, json.dumps(AUDIO).encode())
        assert read_response(again)[0] == 200
        again.close()
    events = service.http_events()
    assert events["status_499"] == 3 and events["status_200"] == 1, events
    assert len(entered) == 2  # the first large body and the last request: the two waiting never decoded
    assert mosel.stats(model).counters["submitted"] == 1  # only the last request's job


def test_a_decode_stops_at_its_next_step_once_its_client_is_gone(
    model: TextAudio, profile: mosel.Profile
) -> None:
    gone = threading.Event()
    gone.set()
    rows = [[0.5, 1.5, 2.5]] * 100_000
    with pytest.raises(mosel.http.wire.Abandoned):
        mosel.http.decode_inputs(model, {"audio": rows}, profile.input_schema, abandoned=gone.is_set)


# ---------------------------------------------------------------- arrival: as early as the app sees it


@pytest.mark.parametrize("kib", [17, 64, 200, 256])
def test_no_body_over_inline_body_is_decoded_on_the_event_loop(
    model: TextAudio, monkeypatch: pytest.MonkeyPatch, kib: int
) -> None:
    """A 256 KiB body takes ~10 ms to decode: on the loop it held up every other request's arrival."""
    on_loop: list[bool] = []
    decode = mosel.http.decode_inputs

    def where(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return decode(*args, **kwargs)

    monkeypatch.setattr(mosel.http.service, "decode_inputs", where)
    rows = [[0.125, 1.25, 2.5]] * min(kib * 1024 // 20, 2000)
    body = json.dumps({"inputs": {"audio": rows}}).encode()
    body += b" " * max(0, kib * 1024 - len(body))
    small = json.dumps(AUDIO).encode()
    assert len(small) <= mosel.http.INLINE_BODY < len(body) <= mosel.http.LARGE_BODY + 1024 * 1024
    with TestClient(mosel.http.create_app(model)) as client:
        assert client.post("/predict", content=body, headers=JSON).status_code == 200
        assert client.post("/predict", content=small, headers=JSON).status_code == 200
    assert on_loop == [False, True]  # only the small body, under a millisecond, on the loop


class Busy:
    """ASGI middleware between the arrival stamp and the handler that takes ``ms`` on the service's timer."""

    def __init__(self, app: Any, timer: Any, ms: float) -> None:
        self.app, self.timer, self.ms = app, timer, ms

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.timer.now_s += self.ms / 1000.0  # e.g. an event loop busy with other requests
        await self.app(scope, receive, send)


def test_the_deadline_counts_from_the_arrival_stamp_not_the_handlers_entry(model: TextAudio) -> None:
    timer = FakeTimer()
    service = mosel.http.Service(model, timer=timer)
    app = FastAPI()
    app.include_router(mosel.http.create_router(service))
    app.add_middleware(Busy, timer=timer, ms=500.0)
    app.add_middleware(mosel.http.StampArrival, timer=service.timer, clock=service.clock)  # outermost
    with TestClient(app) as client:
        refused = post(client, AUDIO, **{"X-Deadline-Ms": "400"})
        assert refused.status_code == 503 and refused.json()["error"] == "DeadlineError", refused.text
        served = post(client, AUDIO, **{"X-Deadline-Ms": "1500"}).json()  # 1 s left: a busy host serves it
        assert served["received_ms"] >= 500.0 and served["completion_ms"] >= 500.0
        late = post(client, AUDIO | {"best_effort": True}, **{"X-Deadline-Ms": "400"}).json()
        assert late["deadline_met"] is False
    assert mosel.stats(model).counters["submitted"] == 2
    # A stamp taken with another timer is not used: the handler's entry is.
    other = mosel.http.Service(model, timer=FakeTimer())
    app = FastAPI()
    app.include_router(mosel.http.create_router(other))
    app.add_middleware(mosel.http.StampArrival)  # time.monotonic: not the service's
    with TestClient(app) as client:
        assert post(client, AUDIO, **{"X-Deadline-Ms": "400"}).json()["received_ms"] == 0.0
