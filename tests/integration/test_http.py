"""The HTTP front door (mosel.http) against a small real model, profiled on the CPU."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

try:  # starlette >= 1.0 speaks httpx2; older versions httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

import mosel  # noqa: E402
import mosel.http  # noqa: E402
from mosel.runtime import _state  # noqa: E402


@mosel.multimodal
class TextAudio(nn.Module):
    """Text as token ids and a boolean mask (an embedding needs integer ids), audio as floats."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 3)
        self.audio = nn.Linear(3, 3)
        self.gate: threading.Event | None = None  # when set: audio waits for it (holds the executor)
        self.entered = threading.Event()

    @mosel.modality("text")
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        ids, mask = text["input_ids"], text["attention_mask"]
        if ids.dtype != torch.int64 or mask.dtype != torch.bool:
            raise TypeError(f"text arrived as {ids.dtype}/{mask.dtype}")
        return (self.embed(ids) * mask[..., None]).sum(1)

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(30)
        if bool((audio == 666).any()):
            raise RuntimeError("the audio encoder cannot take 666")
        return self.audio(audio)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(features.values())).sum(0)


def batch(b: int, t: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    return {"text": {"input_ids": ids, "attention_mask": mask}, "audio": torch.randn(b, 3, generator=g)}


def as_json(x: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "text": {k: v.tolist() for k, v in x["text"].items()},
        "audio": x["audio"].tolist(),
    }


def by_hand(model: TextAudio, x: Mapping[str, Any], modalities: list[list[str]]) -> Tensor:
    rows = []
    with torch.no_grad():
        for i, config in enumerate(modalities):
            feats = {}
            if "text" in config:
                feats["text"] = model.encode_text({k: v[i : i + 1] for k, v in x["text"].items()})
            if "audio" in config:
                feats["audio"] = model.encode_audio(x["audio"][i : i + 1])
            rows.append(model.fuse(feats))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return profile_text_audio()


def profile_text_audio() -> mosel.Profile:
    """Profile a TextAudio on the CPU (every configuration below accuracy 1.0)."""
    model = TextAudio().eval()
    data = []
    for s, t in enumerate((3, 5, 3, 5)):  # sequence lengths vary: the schema records None
        x = batch(6, t, s)
        with torch.no_grad():
            full = model.fuse({"text": model.encode_text(x["text"]), "audio": model.encode_audio(x["audio"])})
        target = full.argmax(-1)
        target[::2] = (target[::2] + 1) % 3  # every configuration below 1.0: a floor of 1.0 is unreachable
        data.append((x, target))
    result = mosel.profile(model, data, max_batch_size=4, warmup=0, repeats=2, cost_checks=0, progress=False)
    mosel.close(model)
    assert max(result.accuracy.values()) < 1.0
    return result


@pytest.fixture
def model(profile: mosel.Profile) -> Iterator[TextAudio]:
    m = TextAudio().eval()  # the same weights (seeded): the profile fits it
    mosel.attach(m, profile)
    yield m
    if m.gate is not None:
        m.gate.set()
    mosel.close(m, cancel=True)


def post(client: TestClient, body: object, **headers: str) -> Any:
    return client.post("/predict", json=body, headers=headers)


def test_the_profile_records_the_input_schema(profile: mosel.Profile) -> None:
    text = profile.input_schema["text"]
    assert {(leaf.path, leaf.dtype, leaf.shape) for leaf in text.leaves} == {
        (("input_ids",), "int64", (None,)),
        (("attention_mask",), "bool", (None,)),
    }
    (audio,) = profile.input_schema["audio"].leaves
    assert (audio.path, audio.dtype, audio.shape) == ((), "float32", (3,))
    again = mosel.Profile.from_json(profile.to_json())
    assert again.input_schema == profile.input_schema
    older = {k: v for k, v in profile.to_json().items() if k != "input_schema"}
    assert mosel.Profile.from_json(older).input_schema == {}


def test_predict_serves_rows_as_their_configuration_by_hand(model: TextAudio) -> None:
    x = batch(3, 4, seed=11)
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(client, {"inputs": as_json(x)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["modalities"] == [["audio", "text"]] * 3
        expected = by_hand(model, x, body["modalities"])
        torch.testing.assert_close(torch.tensor(body["outputs"]), expected)
        assert body["prediction"] == expected.argmax(-1).tolist()
        assert body["deadline_met"] is None and body["deadline_ms"] is None and body["upstream_ms"] == 0.0
        for field in ("expected_accuracy", "predicted_latency_ms", "measured_latency_ms", "completion_ms"):
            assert isinstance(body[field], float)
        assert "queue_ms" in body and "reason" in body
        text_only = post(client, {"inputs": {"text": as_json(x)["text"]}})
        assert text_only.json()["modalities"] == [["text"]] * 3


def test_token_ids_stay_integers_and_float_leaves_take_the_profiled_dtype(model: TextAudio) -> None:
    x = batch(2, 6, seed=3)  # a sequence length never seen in profiling: the schema left it open
    body = as_json(x)
    body["text"]["attention_mask"] = [[int(v) for v in row] for row in body["text"]["attention_mask"]]
    body["audio"] = [[1, 0, 2], [0, 0, 1]]  # integers for a float32 leaf: cast
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(client, {"inputs": body})
        assert response.status_code == 200, response.text
        x["audio"] = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
        torch.testing.assert_close(
            torch.tensor(response.json()["outputs"]), by_hand(model, x, response.json()["modalities"])
        )


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"audio": [[1.0, 2.0]]}, r"audio has shape \(1, 2\), the model takes \(B, 3\)"),
        ({"audio": [1.0, 2.0, 3.0]}, r"audio has shape \(3,\), the model takes 2 dimensions"),
        ({"text": {"input_ids": [1, 2], "attention_mask": [True, True]}}, r"text\['attention_mask'\]"),
        ({"text": {"input_ids": [[1.5, 2]], "attention_mask": [[True, True]]}}, "fractional"),
        ({"text": {"input_ids": [[1, 2]]}}, r"missing: \['attention_mask'\]"),
        ({"text": [[1, 2]]}, "must be an object"),
        ({"text": {"input_ids": [[1, 2]], "attention_mask": [[True, 7]]}}, "booleans"),
        ({"smell": [[1.0]]}, "unknown modality 'smell'"),
        (
            {"audio": [[1.0, 2.0, 3.0]], "text": {"input_ids": [[1]] * 2, "attention_mask": [[True]] * 2}},
            "disagree",
        ),
        ({"audio": [[1.0, 2.0], [3.0]]}, "rectangular"),
        ({"audio": 3}, "must be a"),
        ({}, "none of the modalities"),
    ],
)
def test_inputs_that_do_not_fit_answer_400_naming_modality_and_leaf(
    model: TextAudio, inputs: object, message: str
) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(client, {"inputs": inputs})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "InputError"
        assert re.search(message, response.json()["detail"]), response.json()["detail"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "invalid json"),
        (b"[1, 2]", "should be an object"),
        (b'{"audio": [[1, 2, 3]]}', "inputs: field required; audio: extra inputs are not permitted"),
        (b"", "should be an object"),
        (b'{"inputs": {}, "deadline_ms": "soon"}', "deadline_ms: input should be a valid number"),
    ],
)
def test_a_body_that_is_not_a_request_answers_400(model: TextAudio, content: bytes, message: str) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        response = client.post("/predict", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == ("SLOError" if b"deadline_ms" in content else "InputError")
        assert message in response.json()["detail"].lower()


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [
        ({"X-Deadline-Ms": "soon"}, {}, 400, "SLOError"),
        ({"X-Deadline-Ms": "-5"}, {}, 400, "SLOError"),
        ({"X-Min-Accuracy": "nan"}, {}, 400, "SLOError"),
        ({"X-Min-Accuracy": "1.5"}, {}, 400, "SLOError"),
        ({}, {"deadline_ms": 0}, 400, "SLOError"),
        ({"X-Request-Start": "yesterday"}, {}, 400, "SLOError"),
        ({"X-Min-Accuracy": "1.0"}, {}, 422, "AccuracyUnreachableError"),
        ({}, {"min_accuracy": 1.0}, 422, "AccuracyUnreachableError"),
        ({"X-Deadline-Ms": "0.0001"}, {}, 503, "DeadlineError"),
        ({}, {"deadline_ms": 0.0001}, 503, "DeadlineError"),
    ],
)
def test_slo_errors_map_to_status_codes(
    model: TextAudio, headers: dict[str, str], body: dict[str, object], status: int, error: str
) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(client, {"inputs": as_json(batch(1, 3, 0))} | body, **headers)
        assert response.status_code == status, response.text
        assert response.json()["error"] == error
        assert "Traceback" not in response.text
        assert ("retry-after" in response.headers) == (status == 503)


def test_the_stricter_slo_of_header_and_body_applies(model: TextAudio) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(
            client, {"inputs": as_json(batch(1, 3, 0)), "deadline_ms": 50_000}, **{"X-Deadline-Ms": "40000"}
        )
        assert response.status_code == 200
        assert response.json()["deadline_ms"] == 40_000
        assert response.json()["deadline_met"] is True
        # A NaN objective is refused even when the other source gives a valid one (min/max drop NaN).
        for field, header in (("min_accuracy", "X-Min-Accuracy"), ("deadline_ms", "X-Deadline-Ms")):
            for value, other in ((float("nan"), "0.5"), (0.5, "nan")):
                body = json.dumps({"inputs": as_json(batch(1, 3, 0)), field: value})
                answer = client.post(
                    "/predict", content=body, headers={header: other, "content-type": "application/json"}
                )
                assert answer.status_code == 400 and answer.json()["error"] == "SLOError", (field, value)


def test_upstream_time_is_charged_to_the_deadline(model: TextAudio) -> None:
    x = {"inputs": as_json(batch(1, 3, 0))}
    with TestClient(mosel.http.create_app(model)) as client:
        started = time.time() - 2.0
        charged = post(client, x, **{"X-Deadline-Ms": "60000", "X-Request-Start": f"t={started:.3f}"})
        assert charged.status_code == 200, charged.text
        assert charged.json()["upstream_ms"] >= 2000.0
        assert charged.json()["deadline_ms"] <= 58_000.0
        in_ms = post(client, x, **{"X-Deadline-Ms": "60000", "X-Request-Start": str(int(started * 1000))})
        assert in_ms.json()["upstream_ms"] >= 1990.0  # whole milliseconds
        until = post(client, x, **{"X-Deadline-At": f"{time.time() + 30:.3f}"})
        assert 0 < until.json()["deadline_ms"] <= 30_000.0
        doomed = post(client, x, **{"X-Deadline-Ms": "1500", "X-Request-Start": f"{started:.3f}"})
        assert doomed.status_code == 503 and doomed.json()["error"] == "DeadlineError"
        assert "upstream" in doomed.json()["detail"] and int(doomed.headers["retry-after"]) >= 1
        passed = post(client, x, **{"X-Deadline-At": f"{time.time() - 1:.3f}"})
        assert passed.status_code == 503 and passed.json()["error"] == "DeadlineError"


def test_retry_after_comes_from_the_predicted_queue_drain(
    model: TextAudio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mosel, "load", lambda m: SimpleNamespace(drain_ms=2500.0), raising=False)
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(client, {"inputs": as_json(batch(1, 3, 0))}, **{"X-Deadline-Ms": "0.0001"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"


def hold_executor(model: TextAudio) -> None:
    """Start a job whose audio branch waits on the model's gate: the executor is busy until it opens."""
    model.gate = threading.Event()
    model.submit({"audio": torch.zeros(1, 3)})  # type: ignore[operator]
    assert model.entered.wait(30)


def test_a_full_queue_answers_503(profile: mosel.Profile) -> None:
    model = TextAudio().eval()
    mosel.attach(model, profile, scheduler=mosel.SchedulerConfig(max_queued_requests=2))
    try:
        hold_executor(model)
        waiting = model.submit({"audio": torch.ones(2, 3)})  # type: ignore[operator]
        with TestClient(mosel.http.create_app(model)) as client:
            response = post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}})
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "QueueFullError"
            assert int(response.headers["retry-after"]) >= 1
            assert model.gate is not None
            model.gate.set()
            assert waiting.result(30).output.shape == (2, 3)
    finally:
        if model.gate is not None:
            model.gate.set()
        mosel.close(model)


async def queued_request(client: httpx.AsyncClient, model: TextAudio) -> asyncio.Future[httpx.Response]:
    """POST /predict, returning once the job waits in the model's queue (its executor is held)."""
    request = asyncio.ensure_future(client.post("/predict", json={"inputs": {"audio": [[1.0, 2.0, 3.0]]}}))
    server = _state(model).server
    assert server is not None
    while not server.scheduler.queue and not request.done():
        await asyncio.sleep(0.001)
    return request


def test_a_model_closed_under_a_queued_request_answers_503(model: TextAudio) -> None:
    hold_executor(model)
    app = mosel.http.create_app(model)

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mosel") as client:
            request = await queued_request(client, model)
            closing = threading.Thread(target=mosel.close, args=(model,), kwargs={"cancel": True})
            closing.start()
            response = await request
            assert model.gate is not None
            model.gate.set()
            closing.join(30)
            return response

    response = asyncio.run(main())
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "ShutdownError"
    assert "retry-after" in response.headers


def assert_closed(client: TestClient, prefix: str = "") -> None:
    """A closed service answers /predict 503 ShutdownError (naming why) and is not ready."""
    response = client.post(f"{prefix}/predict", json={"inputs": {"audio": [[1.0, 2.0, 3.0]]}})
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "ShutdownError", "detail": mosel.http.CLOSED}
    assert "service is closed" in mosel.http.CLOSED
    assert int(response.headers["retry-after"]) >= 1
    ready = client.get(f"{prefix}/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reason": mosel.http.CLOSED}
    assert client.get(f"{prefix}/healthz").status_code == 200  # the process still answers


def test_after_the_apps_shutdown_predict_answers_503_and_restarts_nothing(model: TextAudio) -> None:
    app = mosel.http.create_app(model)
    with TestClient(app) as client:
        assert post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}}).status_code == 200
        assert _state(model).server is not None
    assert _state(model).server is None  # the lifespan closed the model
    client = TestClient(app)  # outside its lifespan: the app has shut down
    assert_closed(client)
    assert _state(model).server is None  # the scheduler was not restarted
    assert mosel.stats(model).counters["submitted"] == 1


def test_a_closed_service_answers_503_and_restarts_nothing(model: TextAudio) -> None:
    service = mosel.http.Service(model)
    app = FastAPI()
    app.include_router(mosel.http.create_router(service), prefix="/av")
    with TestClient(app) as client:
        assert client.post("/av/predict", json={"inputs": {"audio": [[1.0, 2.0, 3.0]]}}).status_code == 200
        assert not service.closed
        service.close()
        assert service.closed and _state(model).server is None
        assert_closed(client, "/av")
        assert _state(model).server is None

    def not_built() -> nn.Module:
        raise RuntimeError("not built yet")

    unbuilt = mosel.http.Service(not_built)
    unbuilt.close()  # a model never built: nothing to close, and closed all the same
    assert unbuilt.closed
    other = FastAPI()
    other.include_router(mosel.http.create_router(unbuilt))
    assert_closed(TestClient(other))


def test_a_request_admitted_before_close_is_served(model: TextAudio) -> None:
    """A request queued before close() is served (queued jobs finish); one after it answers 503."""
    hold_executor(model)
    service = mosel.http.Service(model)
    app = FastAPI()
    app.include_router(mosel.http.create_router(service))

    async def main() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mosel") as client:
            queued = await queued_request(client, model)
            closing = threading.Thread(target=service.close)
            closing.start()
            while not service.closed:
                await asyncio.sleep(0.001)
            late = await client.post("/predict", json={"inputs": {"audio": [[1.0, 2.0, 3.0]]}})
            assert model.gate is not None
            model.gate.set()
            closing.join(30)
            return await queued, late

    served, late = asyncio.run(main())
    assert served.status_code == 200, served.text
    assert late.status_code == 503 and late.json()["error"] == "ShutdownError"
    assert _state(model).server is None


def test_an_execution_failure_answers_500_with_its_type(model: TextAudio) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        response = post(client, {"inputs": {"audio": [[666.0, 0.0, 0.0]]}})
        assert response.status_code == 500
        assert response.json() == {"error": "RuntimeError", "detail": "the audio encoder cannot take 666"}
        assert post(client, {"inputs": {"audio": [[1.0, 0.0, 0.0]]}}).status_code == 200  # serves on


def test_concurrent_requests_all_resolve_with_their_own_rows(model: TextAudio) -> None:
    jobs = [batch(1 + i % 4, 3 + i % 3, seed=100 + i) for i in range(24)]
    app = mosel.http.create_app(model)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mosel") as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            "/predict",
                            json={"inputs": as_json(x), "best_effort": True},
                            headers={"X-Deadline-Ms": str(0.5 + i % 3), "X-Min-Accuracy": "0.0"},
                        )
                        for i, x in enumerate(jobs)
                    )
                )
            )

    responses = asyncio.run(main())
    for x, response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["modalities"]) == x["audio"].shape[0]
        torch.testing.assert_close(torch.tensor(body["outputs"]), by_hand(model, x, body["modalities"]))
    assert mosel.stats(model).counters["submitted"] == len(jobs)


def test_healthz_metrics_and_readyz(model: TextAudio) -> None:
    with TestClient(mosel.http.create_app(model)) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        assert client.get("/readyz").json() == {"ready": True, "reason": None}
        assert post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}}).status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'mosel_events_total{event="submitted",model="TextAudio"} 1.0' in metrics.text
        model.double()
        stale = client.get("/readyz")
        assert stale.status_code == 503 and not stale.json()["ready"]
        assert "torch.float32 to cpu/torch.float64" in stale.json()["reason"]
        refused = post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}})
        assert refused.status_code == 503 and refused.json()["error"] == "ProfileMismatchError"
        model.float()
        assert client.get("/readyz").status_code == 200


def test_readyz_without_a_profile_and_a_model_built_later(profile: mosel.Profile) -> None:
    holder: dict[str, TextAudio] = {}

    def current() -> TextAudio:
        return holder["model"]

    with TestClient(mosel.http.create_app(current)) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        assert post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}}).status_code == 503
        holder["model"] = TextAudio().eval()
        unprofiled = client.get("/readyz")
        assert unprofiled.status_code == 503 and "no profile" in unprofiled.json()["reason"]
        response = post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}})
        assert response.status_code == 503 and response.json()["error"] == "NotProfiledError"
        mosel.attach(holder["model"], profile)
        assert client.get("/readyz").status_code == 200
        assert post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}}).status_code == 200
    assert _state(holder["model"]).server is None  # the lifespan closed it


def test_the_router_mounts_under_a_prefix_and_documents_predict(model: TextAudio) -> None:
    app = FastAPI()
    app.include_router(mosel.http.create_router(model), prefix="/av")
    with TestClient(app) as client:
        assert post(client, {"inputs": {"audio": [[1.0, 2.0, 3.0]]}}).status_code == 404  # not at the root
        response = client.post("/av/predict", json={"inputs": {"audio": [[1.0, 2.0, 3.0]]}})
        assert response.status_code == 200
        spec = client.get("/openapi.json").json()
        operation = spec["paths"]["/av/predict"]["post"]
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert {
            "X-Deadline-Ms",
            "X-Min-Accuracy",
            "X-Confidence",
            "X-Request-Start",
            "X-Deadline-At",
        } <= headers
        assert "inputs" in operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert {"400", "422", "500", "503"} <= set(operation["responses"])
        assert {"/av/metrics", "/av/healthz", "/av/readyz"} <= set(spec["paths"])
    mosel.close(model)


def test_import_mosel_does_not_import_fastapi() -> None:
    code = "import sys, mosel; assert 'fastapi' not in sys.modules and 'pydantic' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_presence_masks_and_a_confidence_floor_from_the_body_and_headers(
    model: TextAudio, profile: mosel.Profile
) -> None:
    x = batch(2, 3, seed=5)
    with TestClient(mosel.http.create_app(model)) as client:
        masked = post(client, {"inputs": as_json(x), "present": {"audio": [True, False]}})
        assert masked.status_code == 200, masked.text
        assert masked.json()["modalities"][1] == ["text"]
        torch.testing.assert_close(
            torch.tensor(masked.json()["outputs"]), by_hand(model, x, masked.json()["modalities"])
        )
        best = max(profile.accuracy.values())  # reachable on the mean, not at 95% confidence
        assert post(client, {"inputs": as_json(x), "min_accuracy": best}).status_code == 200
        bounded = post(client, {"inputs": as_json(x), "min_accuracy": best}, **{"X-Confidence": "0.95"})
        assert bounded.status_code == 422 and bounded.json()["error"] == "AccuracyUnreachableError"


def test_tree_outputs_and_non_finite_values_encode_as_json() -> None:
    nan = float("nan")
    tree = {"logits": torch.tensor([[1.0, nan], [float("inf"), 2.0]]), "parts": (torch.tensor([1, 2]),)}
    assert mosel.http.encode_output(tree) == {"logits": [[1.0, None], [None, 2.0]], "parts": ([1, 2],)}
    assert mosel.http.encode_output(torch.ones(1, 2, dtype=torch.float16)) == [[1.0, 1.0]]
