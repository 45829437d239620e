"""mosel inside an HTTP service: the AV-Digits model behind ``mosel.http``.

``mosel.http.create_app(model)`` is a FastAPI app with ``POST /predict`` (inputs as JSON, the SLO
in ``X-Deadline-Ms`` / ``X-Min-Accuracy`` headers or body fields, the time spent upstream charged
from ``X-Request-Start``), ``GET /metrics`` (Prometheus), ``GET /healthz`` and ``GET /readyz``;
its lifespan closes the model. Inputs are decoded with the input schema the profile recorded
(token ids stay integers, floats take the profiled dtype, a wrong shape is a 400 naming the
modality). Overload answers 503 with a ``Retry-After``, an unreachable floor 422, bad input 400.
``docs/http.md`` has the details; to mount the routes in your own app, use
``app.include_router(mosel.http.create_router(model))``.

Run: ``python examples/service/app.py`` (needs uvicorn), then::

    curl -s localhost:8000/readyz
    curl -s -H 'X-Deadline-Ms: 30' -H 'content-type: application/json' \\
         -d '{"inputs": {"audio": [[...]], "video": [[...]]}}' localhost:8000/predict
"""

from __future__ import annotations

import sys
from pathlib import Path

import mosel
from mosel.http import create_app

__all__ = ["create_app", "main"]


def main() -> None:  # pragma: no cover - interactive
    import uvicorn

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from av_digits import data
    from av_digits import model as av_model

    model = av_model.train(data.load("train"))
    mosel.profile(model, data.load("test").batches(100), max_batch_size=32)
    uvicorn.run(create_app(model, title="mosel AV-Digits"), host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
