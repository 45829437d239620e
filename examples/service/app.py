"""mosel inside an HTTP service: a Starlette app around any profiled ``@mosel.multimodal`` model.

``POST /predict`` takes a JSON body mapping modality names to nested lists (first dimension =
requests), or to objects of them for structured modalities (``{"text": {"input_ids": [[...]],
"attention_mask": [[...]]}}``). Each list becomes one tensor whose dtype follows its values
(booleans: bool, integers: int64, so token ids stay integers, any float: float32) unless
``create_app(model, dtypes=...)`` fixes a modality's dtype. It reads the SLO from headers:
``X-Deadline-Ms`` and ``X-Min-Accuracy``. It awaits
``model.ainfer`` (the event loop never blocks) and answers the prediction with the modalities
used and the expected accuracy. Overload (a deadline the queue cannot meet, a full queue, a
shutdown) answers 503 with the reason and a ``Retry-After``; an unreachable floor 422; bad
input or SLO values 400. ``GET /stats`` returns the scheduler's counters.

Run the AV-Digits model behind it: ``python examples/service/app.py`` (needs uvicorn).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import mosel

OVERLOAD = (mosel.DeadlineError, mosel.QueueFullError, mosel.ShutdownError)


def _error(status: int, exc: Exception, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers
    )


def _header_float(request: Request, name: str) -> float | None:
    value = request.headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise mosel.SLOError(f"header {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise mosel.SLOError(f"header {name} must be finite, got {value!r}")
    return number


Dtypes = Mapping[str, "torch.dtype | Dtypes"]


def decode(value: Any, where: str, dtype: torch.dtype | Dtypes | None = None) -> Any:
    """JSON to tensors: an object is a dict of parts, a (nested) list one tensor.

    The tensor's dtype is ``dtype`` when given, else follows the values: bool, int64 for
    integers (token ids), float32 as soon as one value is a float.
    """
    if isinstance(value, dict):
        parts = dtype if isinstance(dtype, Mapping) else {}
        return {k: decode(v, f"{where}[{k!r}]", parts.get(k)) for k, v in value.items()}
    if not isinstance(value, list):
        raise mosel.InputError(
            f"{where} must be a list (requests first) or an object, got {type(value).__name__}"
        )
    try:
        tensor = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise mosel.InputError(f"{where} must be a rectangular list of numbers or booleans ({exc})") from None
    if isinstance(dtype, torch.dtype):
        return tensor.to(dtype)
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


def create_app(model: torch.nn.Module, dtypes: Dtypes | None = None) -> Starlette:
    """An ASGI app serving ``model`` (already profiled or attached).

    ``dtypes`` fixes the dtype of a modality's tensors (``{"audio": torch.float32}``, or
    ``{"text": {"input_ids": torch.int64}}`` for a part of a structured one); the others
    follow their JSON values.
    """
    spec = mosel.spec_of(model)
    fixed = dtypes or {}

    async def predict(request: Request) -> JSONResponse:
        try:
            deadline_ms = _header_float(request, "x-deadline-ms")
            min_accuracy = _header_float(request, "x-min-accuracy")
            body: Any = json.loads(await request.body())
            if not isinstance(body, dict):
                raise mosel.InputError(
                    f"the body must be a JSON object of modalities {list(spec.modalities)}"
                )
            inputs = {name: decode(value, f"body[{name!r}]", fixed.get(name)) for name, value in body.items()}
        except (ValueError, TypeError) as exc:  # includes mosel.SLOError and mosel.InputError
            return _error(400, exc)
        try:
            result = await model.ainfer(inputs, deadline_ms=deadline_ms, min_accuracy=min_accuracy)  # type: ignore[operator]
        except OVERLOAD as exc:
            return _error(503, exc, **{"Retry-After": "1"})
        except mosel.AccuracyUnreachableError as exc:
            return _error(422, exc)
        except (mosel.InputError, mosel.SLOError) as exc:
            return _error(400, exc)
        return JSONResponse(
            {
                "prediction": result.output.argmax(dim=-1).tolist(),
                "modalities": [sorted(c) for c in result.modalities],
                "expected_accuracy": result.expected_accuracy,
                "completion_ms": result.completion_ms,
            }
        )

    async def stats(request: Request) -> JSONResponse:
        del request
        snap = mosel.stats(model)
        return JSONResponse(
            {"counters": dict(snap.counters), "requests": dict(snap.requests_per_configuration)}
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        del app
        yield
        mosel.close(model)  # queued jobs finish; every future resolves

    async def health(request: Request) -> JSONResponse:
        del request
        return JSONResponse({"ok": True, "modalities": list(spec.modalities)})

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/stats", stats),
            Route("/healthz", health),
        ],
        lifespan=lifespan,
    )


def main() -> None:  # pragma: no cover - interactive
    import sys
    from pathlib import Path

    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from av_digits import data
    from av_digits import model as av_model

    model = av_model.train(data.load("train"))
    mosel.profile(model, data.load("test").batches(100), max_batch_size=32)
    uvicorn.run(create_app(model), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
