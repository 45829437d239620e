"""mosel on Ray Serve: replicas, SLOs, typed errors, back-pressure, a replica killed under load.

Every wait has a timeout; nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import ray
import torch
from ray import serve

import mosel
import mosel.ray
from tests.ray.models import make_slow, make_tiny
from tests.unit.helpers import tiny_inputs

pytestmark = pytest.mark.usefixtures("ray_serve")
COLUMNS = ("audio", "video", "text")
ACTORS = {"num_cpus": 0.25}  # several replicas fit on the fixture's 2 CPUs


def check_rows(result: mosel.Result, n: int, floor: float | None) -> None:
    """Each row is the right request's, computed in the modalities the result says, floor kept."""
    expected = tiny_inputs(n)
    video = expected["video"].sum(dim=(1, 2))[:, None] * 10.0
    full = torch.cat([expected["audio"], video, expected["text"] * 100.0], dim=1)
    assert result.output.shape == (n, 3)
    assert len(result.modalities) == n
    for row, config in enumerate(result.modalities):
        for col, modality in enumerate(COLUMNS):
            want = full[row, col] if modality in config else 0.0
            assert float(result.output[row, col]) == pytest.approx(float(want))
    if floor is not None:
        assert result.expected_accuracy >= floor - 1e-9


@pytest.fixture(scope="module")
def tiny(profile_paths: dict[str, str]) -> Iterator[mosel.ray.Client]:
    app = mosel.ray.deployment(
        make_tiny, profile_paths["tiny"], name="tiny", num_replicas=2, ray_actor_options=ACTORS, seed=0
    )
    handle = serve.run(app, name="tiny", route_prefix=None)
    yield mosel.ray.Client(handle, timeout_s=60.0)
    serve.delete("tiny")


def test_concurrent_jobs_resolve_with_their_rows_and_floors(tiny: mosel.ray.Client) -> None:
    floors = [None, 0.6, 0.7, 0.85, 0.9]
    jobs = [(1 + i % 5, floors[i % len(floors)]) for i in range(40)]

    async def run() -> list[mosel.Result | BaseException]:
        calls = [tiny.ainfer(tiny_inputs(n), deadline_ms=5000.0, min_accuracy=f) for n, f in jobs]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120.0)

    results = asyncio.run(run())
    for (n, floor), result in zip(jobs, results):
        assert isinstance(result, mosel.Result), repr(result)
        check_rows(result, n, floor)
        assert result.completion_ms >= result.measured_latency_ms
        assert result.deadline_met is not None


def test_the_router_counts_what_serve_routed(tiny: mosel.ray.Client) -> None:
    """Serve calls the slack router's on_request_routed for every job it sends (ties="serve")."""

    async def run() -> list[mosel.Result]:
        calls = [tiny.ainfer(tiny_inputs(2), deadline_ms=5000.0) for _ in range(12)]
        return await asyncio.wait_for(asyncio.gather(*calls), 120.0)

    assert len(asyncio.run(run())) == 12
    # The handle's request router, in this process (Serve 2.60's internals; skip if they moved).
    wrapper = getattr(getattr(tiny.handle, "_router", None), "_asyncio_router", None)
    router = getattr(wrapper, "request_router", None)
    if not isinstance(router, mosel.ray.SlackRequestRouter):
        pytest.skip(f"the handle's request router is not reachable in this Ray version ({wrapper!r})")
    assert sum(router.decisions.values()) >= 12
    assert router.expected == {}  # every ranked job was routed, and the hook took it off the list
    # No ranking follows the last job's hook: at least its send is still on SlackRouter's books.
    assert sum(router.slack._sent.in_flight(slot) for slot in router.slots.values()) >= 1


def test_threads_share_the_deployment(tiny: mosel.ray.Client) -> None:
    results: list[mosel.Result] = []

    def call(n: int) -> None:
        results.append(tiny.infer(tiny_inputs(n), deadline_ms=5000.0, min_accuracy=0.7))

    threads = [threading.Thread(target=call, args=(n,)) for n in (1, 2, 3, 4) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120.0)
        assert not t.is_alive()
    assert len(results) == len(threads)
    for result in results:
        check_rows(result, result.output.shape[0], 0.7)


def test_typed_errors_come_back_as_mosel_types(tiny: mosel.ray.Client) -> None:
    with pytest.raises(mosel.AccuracyUnreachableError) as unreachable:
        tiny.infer(tiny_inputs(2), min_accuracy=0.99)
    assert type(unreachable.value) is mosel.AccuracyUnreachableError
    assert unreachable.value.best_accuracy == pytest.approx(0.9)
    with pytest.raises(mosel.SLOError):
        tiny.infer(tiny_inputs(2), deadline_ms=-1.0)
    with pytest.raises(mosel.InputError):
        tiny.infer({"smell": torch.ones(2, 1)})


def test_time_before_the_replica_counts_against_the_deadline(tiny: mosel.ray.Client) -> None:
    late = mosel.ray.Request(tiny_inputs(2), deadline_ms=50.0, sent_at_s=time.time() - 1.0)
    with pytest.raises(mosel.DeadlineError) as caught:
        tiny.infer(late)
    assert caught.value.deadline_ms == 50.0
    assert caught.value.predicted_ms >= 1000.0
    served = tiny.infer(mosel.ray.Request(tiny_inputs(2), deadline_ms=60_000.0, sent_at_s=time.time() - 0.5))
    assert served.completion_ms >= 500.0  # counted from the send, not from the replica's arrival
    assert served.queue_ms >= 500.0
    assert served.deadline_met is True
    late_anyway = mosel.ray.Request(
        tiny_inputs(1), deadline_ms=50.0, best_effort=True, sent_at_s=late.sent_at_s
    )
    best_effort = tiny.infer(late_anyway)
    assert best_effort.deadline_met is False
    check_rows(best_effort, 1, None)


def test_backpressure_is_queue_full(profile_paths: dict[str, str]) -> None:
    app = mosel.ray.deployment(
        make_slow, profile_paths["slow"], name="narrow", num_replicas=1, router="serve",
        max_ongoing_requests=1, max_queued_requests=1, ray_actor_options=ACTORS,
    )  # fmt: skip
    client = mosel.ray.Client(serve.run(app, name="narrow", route_prefix=None), timeout_s=60.0)
    try:

        async def run() -> list[mosel.Result | BaseException]:
            calls = [client.ainfer(tiny_inputs(1)) for _ in range(12)]
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120.0)

        results = asyncio.run(run())
        full = [r for r in results if isinstance(r, mosel.QueueFullError)]
        served = [r for r in results if isinstance(r, mosel.Result)]
        assert len(full) + len(served) == len(results), results
        assert full and served
    finally:
        serve.delete("narrow")


def _replica_actors(app: str) -> list[ray.actor.ActorHandle]:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"::{app}#" in a["name"]]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def test_a_replica_killed_under_load(profile_paths: dict[str, str]) -> None:
    app = mosel.ray.deployment(
        make_slow, profile_paths["slow"], name="fragile", num_replicas=2, ray_actor_options=ACTORS,
        max_ongoing_requests=4, seed=0,
    )  # fmt: skip
    client = mosel.ray.Client(serve.run(app, name="fragile", route_prefix=None), retries=2, timeout_s=60.0)
    try:
        replicas = _replica_actors("fragile")
        assert len(replicas) == 2

        async def run() -> list[mosel.Result | BaseException]:
            jobs = [client.ainfer(tiny_inputs(2), min_accuracy=0.6) for _ in range(24)]
            calls = [asyncio.ensure_future(job) for job in jobs]
            await asyncio.sleep(0.3)  # some are running, others queued, when the replica dies
            ray.kill(replicas[0], no_restart=False)
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 150.0)

        results = asyncio.run(run())
        for result in results:
            if isinstance(result, mosel.Result):
                check_rows(result, 2, 0.6)
            else:
                assert isinstance(result, mosel.ReplicaError), repr(result)
        assert any(isinstance(r, mosel.Result) for r in results)
        after = client.infer(tiny_inputs(3), min_accuracy=0.6)  # the deployment serves on
        check_rows(after, 3, 0.6)
    finally:
        serve.delete("fragile")


def _running(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def test_autoscaling_on_mosels_signal_adds_a_replica_under_load(profile_paths: dict[str, str]) -> None:
    scaling = mosel.ray.autoscaling_config(
        min_replicas=1, max_replicas=2, upper=0.99, lower=0.0, drain_upper_ms=1.0,
        upscale_delay_s=0.0, downscale_delay_s=600.0,
    )  # fmt: skip
    app = mosel.ray.deployment(
        make_slow, profile_paths["slow"], name="elastic", autoscaling=scaling, ray_actor_options=ACTORS
    )
    client = mosel.ray.Client(serve.run(app, name="elastic", route_prefix=None), timeout_s=60.0)
    try:
        assert _running("elastic", "elastic") == 1

        async def load_until_scaled(limit_s: float) -> bool:
            until = time.monotonic() + limit_s
            while time.monotonic() < until:  # a queue that takes longer than 1 ms to drain, all along
                await asyncio.gather(*(client.ainfer(tiny_inputs(2)) for _ in range(6)))
                if _running("elastic", "elastic") == 2:
                    return True
            return False

        assert asyncio.run(load_until_scaled(120.0)), "no second replica within 120 s of load"
        check_rows(client.infer(tiny_inputs(2), min_accuracy=0.6), 2, 0.6)
    finally:
        serve.delete("elastic")


def test_http_through_the_ingress_is_placed_by_the_slack_router(
    tiny: mosel.ray.Client, profile_paths: dict[str, str]
) -> None:
    """HTTP decoded by HTTPIngress reaches the mosel deployment as a Request the slack router ranks."""
    from fastapi.testclient import TestClient

    front = mosel.ray.HTTPIngress(tiny.handle, mosel.Profile.load(profile_paths["tiny"]).to_json())
    wrapper = getattr(getattr(tiny.handle, "_router", None), "_asyncio_router", None)
    router = getattr(wrapper, "request_router", None)
    before = dict(router.decisions) if isinstance(router, mosel.ray.SlackRequestRouter) else None
    body = {"inputs": {m: x.tolist() for m, x in tiny_inputs(3).items()}}
    with TestClient(front.__serve_build_asgi_app__()) as http:
        answer = http.post("/predict", json=body, headers={"X-Deadline-Ms": "5000", "X-Min-Accuracy": "0.7"})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["modalities"]) == 3 and answer.json()["expected_accuracy"] >= 0.7
    if before is not None:
        assert router.decisions["slack"] + router.decisions["fallback"] > sum(before.values())
    # Deployed in Serve (its own app, in front of the running deployment): Serve builds it.
    app = mosel.ray.http_ingress(
        serve.get_deployment_handle("tiny", app_name="tiny"), profile_paths["tiny"], name="tiny-http",
        ray_actor_options=ACTORS,
    )  # fmt: skip
    serve.run(app, name="tiny-http", route_prefix="/tiny")
    try:
        status = serve.status().applications["tiny-http"].deployments["tiny-http"]
        assert status.replica_states.get("RUNNING", 0) == 1
    finally:
        serve.delete("tiny-http")
