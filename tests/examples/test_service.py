"""The HTTP service example (``mosel.http`` around a model): the test client, and a short concurrent load."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor, nn

try:  # starlette >= 1.0 speaks httpx2; older versions httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

import mosel
from mosel.schema import LeafSchema, ModalitySchema
from mosel.testing import synthetic_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from service.app import create_app


@mosel.multimodal
class Echo(nn.Module):
    """Two modalities; the prediction is the argmax of the summed features."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.scale = nn.Parameter(torch.ones(1))

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return audio * self.scale

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return video * self.scale

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return sum(features.values())  # type: ignore[return-value]


def served(delay_s: float = 0.0, delay_us: float = 50.0) -> Echo:
    model = Echo(delay_s)
    mosel.attach(
        model,
        synthetic_profile(
            model,
            branch_us={"audio": [delay_us] * 8, "video": [4 * delay_us] * 8},
            accuracy={"audio": 0.8, "video": 0.7, "audio+video": 0.9},
        ),
    )
    return model


BODY = {"inputs": {"audio": [[0.0, 1.0, 0.0]], "video": [[0.0, 0.0, 2.0]]}}


def test_predict_reads_slo_headers_and_reports_modalities() -> None:
    with TestClient(create_app(served())) as client:
        plain = client.post("/predict", json=BODY)
        assert plain.status_code == 200
        assert plain.json()["prediction"] == [2]
        assert plain.json()["modalities"] == [["audio", "video"]]
        tight = client.post(
            "/predict", json=BODY, headers={"X-Deadline-Ms": "1000", "X-Min-Accuracy": "0.75"}
        )
        assert tight.status_code == 200 and tight.json()["expected_accuracy"] >= 0.75
        audio_only = client.post("/predict", json={"inputs": {"audio": [[0.0, 3.0, 1.0]]}})
        assert audio_only.json()["modalities"] == [["audio"]]
        assert 'mosel_events_total{event="submitted",model="Echo"} 3.0' in client.get("/metrics").text
        assert client.get("/readyz").json()["ready"] is True


@pytest.mark.parametrize(
    ("body", "headers", "status", "error"),
    [
        (BODY, {"X-Deadline-Ms": "soon"}, 400, "SLOError"),
        (BODY, {"X-Deadline-Ms": "-5"}, 400, "SLOError"),
        (BODY, {"X-Min-Accuracy": "nan"}, 400, "SLOError"),
        ({"inputs": {"smell": [[1.0]]}}, {}, 400, "InputError"),
        ([1, 2], {}, 400, "InputError"),
        (BODY, {"X-Min-Accuracy": "0.99"}, 422, "AccuracyUnreachableError"),
        (BODY, {"X-Deadline-Ms": "0.001"}, 503, "DeadlineError"),
    ],
)
def test_errors_are_answers_not_stack_traces(
    body: object, headers: dict[str, str], status: int, error: str
) -> None:
    with TestClient(create_app(served())) as client:
        response = client.post("/predict", json=body, headers=headers)
        assert response.status_code == status
        assert response.json()["error"] == error
        assert "Traceback" not in response.text
        if status == 503:
            assert int(response.headers["retry-after"]) >= 1


def test_a_short_concurrent_load_with_overload_answers_503() -> None:
    model = served(delay_s=0.05, delay_us=50_000.0)
    app = create_app(model)

    async def load() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mosel") as client:
            requests = [
                client.post("/predict", json=BODY, headers={"X-Deadline-Ms": "120", "X-Min-Accuracy": "0.75"})
                for _ in range(200)
            ]
            return list(await asyncio.gather(*requests))

    responses = asyncio.run(load())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 3, codes
    # 200 one-row requests: merged 8 at a time (50 ms a batch), at most 16 finish within 120 ms of
    # their arrival, and the app takes them in far faster than the 160 a second that would need
    # (with 4 ms batches a quiet host could decode requests no faster than they were served).
    assert codes.count(503) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"] in ("DeadlineError", "QueueFullError")
        else:
            assert r.json()["expected_accuracy"] >= 0.75
    mosel.close(model)


@mosel.multimodal
class Tokens(nn.Module):
    """A text modality of token ids and a mask (an embedding needs int64 ids), and a float one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        nn.init.eye_(self.embed.weight[:3])

    @mosel.modality("text")
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        assert text["input_ids"].dtype == torch.int64 and text["attention_mask"].dtype == torch.bool
        weights = text["attention_mask"].unsqueeze(-1).float()
        return (self.embed(text["input_ids"]) * weights).sum(1)

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        assert audio.dtype == torch.float32
        return audio

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return sum(features.values())  # type: ignore[return-value]


def test_token_ids_stay_integers_masks_booleans_and_a_schema_fixes_dtypes() -> None:
    model = Tokens()
    mosel.attach(
        model,
        synthetic_profile(
            model,
            branch_us={"text": [50.0] * 8, "audio": [50.0] * 8},
            accuracy={"text": 0.8, "audio": 0.7, "text+audio": 0.9},
        ),
    )
    text = {
        "input_ids": [[2, 2, 0], [1, 0, 0]],
        "attention_mask": [[True, True, False], [True, False, False]],
    }
    body = {"inputs": {"text": text}}
    # A synthetic profile records no input schema: text follows its values, audio is given one.
    schema = {"audio": ModalitySchema(0, (LeafSchema((), "float32", (3,)),))}
    with TestClient(create_app(model, input_schema=schema)) as client:
        text_only = client.post("/predict", json=body)
        assert text_only.status_code == 200, text_only.text
        assert text_only.json()["prediction"] == [2, 1]
        both = client.post("/predict", json={"inputs": {"text": text, "audio": [[0, 0, 5], [0, 0, 0]]}})
        assert both.status_code == 200, both.text
        assert both.json()["prediction"] == [2, 1]
        ragged = client.post(
            "/predict", json={"inputs": {"text": {"input_ids": [[1, 2], [1]], "attention_mask": [[True]]}}}
        )
        assert ragged.status_code == 400 and ragged.json()["error"] == "InputError"
        scalar = client.post("/predict", json={"inputs": {"audio": 3}})
        assert scalar.status_code == 400 and "must be a (nested) list" in scalar.json()["detail"]
        short = client.post("/predict", json={"inputs": {"audio": [[1.0, 2.0]]}})
        assert short.status_code == 400 and "the model takes (B, 3)" in short.json()["detail"]
    mosel.close(model)
