"""How long ``GET /healthz`` takes on a ``mosel.http`` server while large ``/predict`` bodies arrive.

A uvicorn server (its own process, as in production) serves a small model whose audio input is
a wide float row. Clients send large JSON bodies (``--mb`` MB each, ``--senders`` at once) while
another client asks ``/healthz`` every 10 ms; the health latencies are reported with and without
the load, with the large bodies' answers (status and time). Run it against any version of
``mosel.http`` (``PYTHONPATH=<src> python benchmarks/http_health.py``) to compare.

Run: python benchmarks/http_health.py [--mb 15] [--senders 2] [--seconds 6] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from torch import Tensor, nn

import mosel

WIDTH = 1000


@mosel.multimodal
class Wide(nn.Module):
    """One wide float modality (a spectrogram row, say), one token modality."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.audio = nn.Linear(WIDTH, 4)
        self.embed = nn.Embedding(10, 4)

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        return self.audio(audio)

    @mosel.modality("text")
    def encode_text(self, text: Tensor) -> Tensor:
        return self.embed(text).sum(1)

    @mosel.fusion
    def fuse(self, features: Any) -> Tensor:
        return torch.stack(list(features.values())).sum(0)


def serve(port: int) -> None:
    """The server process: profile the model, serve it with uvicorn on ``port``."""
    import uvicorn

    import mosel.http

    model = Wide().eval()
    g = torch.Generator().manual_seed(0)
    data = [
        ({"audio": torch.randn(8, WIDTH, generator=g), "text": torch.randint(0, 10, (8, 4), generator=g)},
         torch.randint(0, 4, (8,), generator=g))
        for _ in range(3)
    ]  # fmt: skip
    mosel.profile(model, data, max_batch_size=8, warmup=1, repeats=2, cost_checks=0, progress=False)
    uvicorn.run(mosel.http.create_app(model), host="127.0.0.1", port=port, log_level="warning")


def get(port: int, path: str) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, (time.perf_counter() - started) * 1000.0


def post(port: int, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        status = response.status
    except (ConnectionError, OSError):  # a server that answers 413 and closes may cut our upload
        status = -1
    finally:
        conn.close()
    return status, (time.perf_counter() - started) * 1000.0


def health_while(port: int, seconds: float, load: threading.Event | None) -> list[float]:
    """``/healthz`` latencies (ms), one request every 10 ms for ``seconds`` (or while ``load`` is unset)."""
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (load is not None and load.is_set()):
        latencies.append(get(port, "/healthz")[1])
        time.sleep(0.01)
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 2),
        "p99_ms": round(values[min(len(values) - 1, int(0.99 * len(values)))], 2),
        "max_ms": round(values[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=15.0, help="size of each large body, MB")
    parser.add_argument("--senders", type=int, default=2, help="large bodies in flight at once")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long the load lasts")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=os.environ.copy())
    try:
        for _ in range(600):
            try:
                if get(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        rows = max(1, int(args.mb * 1e6 / (WIDTH * 21)))  # ~21 bytes a JSON float
        rng = random.Random(0)
        body = json.dumps({"inputs": {"audio": [[rng.random() for _ in range(WIDTH)] for _ in range(rows)]}})
        payload = body.encode()
        idle = health_while(port, 2.0, None)
        answers: list[tuple[int, float]] = []
        stop = threading.Event()

        def sender() -> None:
            while not stop.is_set():
                answers.append(post(port, payload))

        threads = [threading.Thread(target=sender, daemon=True) for _ in range(args.senders)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        loaded = health_while(port, args.seconds, None)
        stop.set()
        for t in threads:
            t.join(300)
        result = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "body_mb": round(len(payload) / 1e6, 2),
            "rows": rows,
            "senders": args.senders,
            "healthz_idle": summary(idle),
            "healthz_under_load": summary(loaded),
            "large_bodies": {
                "statuses": sorted({status for status, _ in answers}),
                "answered": len(answers),
                **{k: v for k, v in summary([ms for _, ms in answers]).items() if k != "n"},
            },
        }
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
