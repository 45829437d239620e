"""On a real local Serve instance: a cancelled caller's queued job is withdrawn; a dead replica
with a slow replacement holds its caller no longer than the deadline plus the client's grace.

The replica's model (tests.ray.models.Gated) is held and released through files, so the tests
wait on what the replica did, never on how fast this machine is (every wait has a long limit).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray import serve

import mosel
import mosel.ray
from tests.ray.models import Gated, make_gated, seen
from tests.unit.helpers import tiny_inputs, tiny_profile

pytestmark = pytest.mark.usefixtures("ray_serve")
ACTORS = {"num_cpus": 0.25}


def marked(value: float) -> dict[str, torch.Tensor]:
    """One row whose audio value is ``value`` (it shows in the model's log when computed)."""
    inputs = tiny_inputs(1)
    inputs["audio"] = torch.tensor([[value]])
    return inputs


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    until = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > until:
            raise AssertionError(f"still waiting after {limit_s:g} s for {what}")
        time.sleep(0.02)


async def until_async(condition: Callable[[], Any], what: str, limit_s: float = 60.0) -> None:
    until = time.monotonic() + limit_s
    while not await asyncio.to_thread(condition):
        if time.monotonic() > until:
            raise AssertionError(f"still waiting after {limit_s:g} s for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """One replica of a Gated model (its folder, its handle); the gate and holds are opened at the end."""
    folder = str(tmp_path)
    app = mosel.ray.deployment(
        functools.partial(make_gated, folder), tiny_profile(Gated(folder)), name="gated", num_replicas=1,
        ray_actor_options=ACTORS, seed=0,
    )  # fmt: skip
    handle = serve.run(app, name="gated", route_prefix=None)
    try:
        yield tmp_path, handle
    finally:
        for name in ("gate", "hold"):
            (tmp_path / name).unlink(missing_ok=True)
        serve.delete("gated")


def queued_jobs(handle: Any) -> int:
    load: mosel.Load = handle.load.remote().result(timeout_s=30.0)
    return load.queued_jobs


def test_a_cancelled_caller_withdraws_its_queued_job(gated: tuple[Path, Any]) -> None:
    folder, handle = gated
    client = mosel.ray.Client(handle)
    (folder / "gate").touch()  # the first job holds the replica's executor until the gate opens
    holder = handle.remote(mosel.ray.Request(marked(1.0)))
    wait_until(lambda: seen(folder) == [1.0], "the first job to start")

    async def cancel_while_queued() -> None:
        # A Client.ainfer task cancelled; then a raw Serve request cancelled (what Serve does on
        # an HTTP client's disconnect: it cancels the request's task in the replica).
        task = asyncio.ensure_future(client.ainfer(marked(777.0), deadline_ms=120_000.0))
        await until_async(lambda: queued_jobs(handle) == 1, "the marked job to queue in the replica")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_async(lambda: queued_jobs(handle) == 0, "the cancelled job to leave the queue")
        response = handle.remote(mosel.ray.Request(marked(888.0)))
        await until_async(lambda: queued_jobs(handle) == 1, "the second marked job to queue")
        response.cancel()
        await until_async(lambda: queued_jobs(handle) == 0, "the second cancelled job to leave the queue")

    asyncio.run(cancel_while_queued())
    (folder / "gate").unlink()
    assert holder.result(timeout_s=60.0).output.shape == (1, 3)  # the running job finished unharmed
    after = client.infer(marked(5.0))
    assert float(after.output[0, 0]) == 5.0
    assert seen(folder) == [1.0, 5.0]  # the marked rows never reached the model
    stats: mosel.StatsSnapshot = handle.stats.remote().result(timeout_s=30.0)
    assert stats.counters.get("cancelled", 0) == 2


def test_a_dead_replica_with_a_slow_replacement_answers_by_the_deadline(gated: tuple[Path, Any]) -> None:
    folder, handle = gated
    client = mosel.ray.Client(handle)  # grace_ms: 100 by default
    (folder / "hold").touch()  # the replacement replica waits in its constructor until the test ends
    (folder / "gate").touch()
    [replica] = _replica_actors("gated")

    async def run() -> mosel.Result:
        call = asyncio.ensure_future(client.ainfer(marked(1.0), deadline_ms=4000.0))
        await until_async(lambda: seen(folder) == [1.0], "the job to start")
        ray.kill(replica, no_restart=False)  # dies under the job
        return await asyncio.wait_for(call, 120.0)

    with pytest.raises(
        mosel.DeadlineError, match=r"no answer within the job.s 4000 ms deadline.*replica was lost"
    ) as caught:
        asyncio.run(run())
    # The time really spent: the deadline and the grace, not the replacement's start-up (which
    # is still under way: it waits for the end of this test).
    assert 4000.0 <= caught.value.predicted_ms < 4000.0 + 100.0 + 10_000.0


def _replica_actors(app: str) -> list[ray.actor.ActorHandle]:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"::{app}#" in a["name"]]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
