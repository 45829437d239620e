"""Labels wired back over HTTP: a monitored model behind ``mosel.http`` whose audio degrades.

A two-modality model (``mosel.testing.ToyAV``: cheap audio, costly video) is trained, profiled and
served with ``mosel.http`` over a real socket (uvicorn), its accuracy monitored with live floors.
A client sends jobs with an accuracy floor and its own id for each (``X-Request-Id``); the ground
truth arrives later (here: a second later, from the client's own records) and goes back with
``POST /feedback``. Part-way, the audio's noise is raised (a microphone goes bad): the drift
alarm fires, the audio configuration is re-priced at its live lower bound, and the jobs with a
floor are served with video alone instead (the audio+video fusion drifted too). ``GET /metrics``
shows what an operator would see.

Run: python examples/monitoring_http.py            (under a minute on two cores; needs uvicorn)
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import deque

import httpx
import torch
import uvicorn

import mosel
import mosel.http
from mosel.testing import ToyAV, toy_av_batches, toy_av_data, train_toy_av

FLOOR = 0.5
LABEL_DELAY_S = 1.0
JOBS = 600
DRIFT_AT = 200


def serve(app: object) -> tuple[uvicorn.Server, str]:
    """Start ``app`` on a free local port in a background thread; its server and base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    torch.manual_seed(0)
    model = train_toy_av(ToyAV())
    profile = mosel.profile(model, toy_av_batches(600, 100), max_batch_size=16, progress=False)
    print("profiled accuracy:", {profile.key(c): round(a, 3) for c, a in profile.accuracy.items()})

    def alarm(event: mosel.Alarm) -> None:
        live, profiled = event.live, event.profiled
        print(f"  ALARM ({event.kind}) {event.configuration}: live {live:.3f}, profiled {profiled:.3f}")

    monitoring = mosel.Monitoring(live_floors=True, shadow_rate=0.1, on_alarm=alarm)
    mosel.attach(model, profile, monitoring=monitoring)
    server, url = serve(mosel.http.create_app(model))
    rng = random.Random(0)
    started = time.monotonic()
    waiting: deque[tuple[float, str, list[int]]] = deque()  # (when the truth arrives, my id, labels)
    served: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for i in range(JOBS):
            drifted = i >= DRIFT_AT
            x, y = toy_av_data(2, seed=10_000 + i, audio_noise=8.0 if drifted else 2.0)
            mine = f"order-{i}"
            answer = client.post(
                "/predict",
                json={"inputs": {m: t.tolist() for m, t in x.items()}},
                headers={"X-Min-Accuracy": str(FLOOR), "X-Deadline-Ms": "200", "X-Request-Id": mine},
            )
            if answer.status_code == 200:
                body = answer.json()
                key = "+".join(sorted(body["modalities"][0]))
                served[key] = served.get(key, 0) + 1
                waiting.append((time.monotonic() + LABEL_DELAY_S, mine, y.tolist()))
            while waiting and waiting[0][0] <= time.monotonic():  # the ground truth has arrived
                _, mine, labels = waiting.popleft()
                client.post("/feedback", json={"id": mine, "labels": labels})
            if i + 1 in (DRIFT_AT, JOBS - 200, JOBS):
                state = "audio degraded" if drifted else "clean"
                print(f"after {i + 1} jobs, {time.monotonic() - started:.0f} s ({state}): served {served}")
                served = {}
            time.sleep(rng.expovariate(500.0))
        metrics = client.get("/metrics").text
    server.should_exit = True
    print("\nwhat /metrics says (live accuracy, what decisions price, drift):")
    for line in metrics.splitlines():
        if line.startswith(("mosel_accuracy_live{", "mosel_accuracy_priced{", "mosel_accuracy_drifted{")):
            print(" ", line)
    accuracy = mosel.stats(model).accuracy
    assert accuracy is not None
    print("monitor counters:", dict(accuracy.counters))
    mosel.close(model)


if __name__ == "__main__":
    main()
