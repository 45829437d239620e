"""The threaded server: real threads, real futures, a real (tiny) model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel.testing import synthetic_profile


@mosel.multimodal
class Slow(nn.Module):
    """Output row i = input row i (audio) + 1000 * video; a NaN input poisons its batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.bias = nn.Parameter(torch.zeros(1))

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        if torch.isnan(audio).any():
            raise ValueError("poisoned input")
        time.sleep(self.delay_s)
        return audio + self.bias

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        time.sleep(self.delay_s)
        return video * 1000

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return sum(features.values())  # type: ignore[return-value]


def served(delay_s: float = 0.0, **config: object) -> Slow:
    model = Slow(delay_s).eval()
    profile = synthetic_profile(
        model,
        branch_us={
            "audio": [50.0 + 5 * b for b in range(1, 9)],
            "video": [300.0 + 40 * b for b in range(1, 9)],
        },
        accuracy={"audio": 0.7, "video": 0.6, "audio+video": 0.9},
    )
    mosel.attach(model, profile, scheduler=mosel.SchedulerConfig(**config))  # type: ignore[arg-type]
    return model


def rows(n: int, base: float) -> dict[str, Tensor]:
    x = torch.arange(n, dtype=torch.float32)[:, None] + base
    return {"audio": x, "video": torch.zeros(n, 1)}


def test_sixty_four_threads_all_resolve_with_their_own_rows() -> None:
    model = served(delay_s=0.0005)
    results: dict[int, Tensor] = {}
    barrier = threading.Barrier(64)

    def client(i: int) -> None:
        barrier.wait()
        if i % 2:
            results[i] = model.infer(rows(1 + i % 5, 100.0 * i)).output
        else:
            results[i] = model.submit(rows(1 + i % 5, 100.0 * i)).result(timeout=30).output

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        list(pool.map(client, range(64)))
    for i, out in results.items():
        torch.testing.assert_close(out, rows(1 + i % 5, 100.0 * i)["audio"])
    snap = mosel.stats(model)
    assert snap.counters["submitted"] == 64
    assert snap.counters["served_on_time"] == 64
    assert snap.histograms["completion"]["count"] == 64
    mosel.close(model)


def test_a_poisoned_job_fails_alone_even_in_a_merged_batch() -> None:
    model = served(delay_s=0.002)
    blocker = model.submit(rows(1, 0.0))  # keeps the executor busy while the others queue up
    good = [model.submit(rows(2, 10.0 * i)) for i in range(3)]
    poisoned = model.submit({"audio": torch.full((2, 1), float("nan")), "video": torch.zeros(2, 1)})
    more = [model.submit(rows(2, 50.0 + i)) for i in range(2)]
    with pytest.raises(ValueError, match="poisoned"):
        poisoned.result(timeout=30)
    for i, future in enumerate(good):
        torch.testing.assert_close(future.result(timeout=30).output, rows(2, 10.0 * i)["audio"])
    for future in [blocker, *more]:
        assert future.result(timeout=30).output.shape[0] >= 1
    snap = mosel.stats(model)
    assert snap.counters["failed_error"] == 1
    assert snap.counters.get("batches_merged", 0) >= 1
    # The server keeps serving.
    torch.testing.assert_close(model.infer(rows(3, 7.0)).output, rows(3, 7.0)["audio"])
    mosel.close(model)


@pytest.mark.parametrize("cancel", [False, True])
def test_shutdown_with_a_full_queue_resolves_everything(cancel: bool) -> None:
    model = served(delay_s=0.003)
    futures = [model.submit(rows(3, float(i))) for i in range(40)]
    mosel.close(model, cancel=cancel, timeout=30)
    outcomes = []
    for future in futures:
        assert future.done()
        outcomes.append(type(future.exception()).__name__ if future.exception() else "ok")
    if cancel:
        assert "ShutdownError" in outcomes
    else:
        assert set(outcomes) == {"ok"}


def test_submit_after_close_starts_a_new_scheduler_and_serving_closes() -> None:
    model = served()
    with mosel.serving(model):
        assert model.infer(rows(1, 1.0)).output.item() == 1.0
    assert model.infer(rows(1, 2.0)).output.item() == 2.0
    mosel.close(model)


def test_cancelled_future_leaves_the_queue() -> None:
    model = served(delay_s=0.005)
    model.submit(rows(1, 0.0))
    victims = [model.submit(rows(4, float(i))) for i in range(5)]
    assert victims[-1].cancel()
    server = model.__dict__["_mosel_state"].server
    with server.cond:
        assert all(t.job.payload.future is not victims[-1] for t in server.scheduler.queue)
    for future in victims[:-1]:
        future.result(timeout=30)
    assert mosel.stats(model).counters["cancelled"] == 1
    mosel.close(model)


def test_queue_full_is_a_typed_error() -> None:
    model = served(delay_s=0.01, max_queued_requests=6)
    model.submit(rows(1, 0.0))
    time.sleep(0.002)
    model.submit(rows(4, 0.0))
    with pytest.raises(mosel.QueueFullError, match="max_queued_requests=6"):
        model.submit(rows(4, 0.0))
    mosel.close(model, cancel=True)


def test_ainfer_awaits_without_blocking_the_loop() -> None:
    model = served(delay_s=0.001)

    async def main() -> list[Tensor]:
        return [r.output for r in await asyncio.gather(*(model.ainfer(rows(2, 10.0 * i)) for i in range(8)))]

    outputs = asyncio.run(main())
    for i, out in enumerate(outputs):
        torch.testing.assert_close(out, rows(2, 10.0 * i)["audio"])
    mosel.close(model)


def test_out_of_memory_splits_the_batch_and_retries() -> None:
    model = served()
    calls: list[int] = []
    original = model.encode_video

    def flaky(video: Tensor) -> Tensor:
        calls.append(video.shape[0])
        if video.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(video)

    model.encode_video = flaky  # type: ignore[method-assign]
    out = model.infer(rows(8, 0.0)).output
    torch.testing.assert_close(out, rows(8, 0.0)["audio"])
    assert max(calls) == 8 and calls[-1] <= 2
    mosel.close(model)


def test_prometheus_export() -> None:
    prometheus = pytest.importorskip("prometheus_client")
    model = served()
    model.infer(rows(2, 1.0))
    registry = prometheus.CollectorRegistry()
    registry.register(mosel.runtime.prometheus_collector(model, "slow"))
    text = prometheus.generate_latest(registry).decode()
    assert 'mosel_events_total{event="submitted",model="slow"} 1.0' in text
    assert "mosel_completion_ms_bucket" in text
    assert 'mosel_requests_by_configuration_total{configuration="audio+video",model="slow"} 2.0' in text
    assert 'mosel_latency_margin{model="slow"} 1.0' in text
    assert 'mosel_dispatch_overhead_ms{model="slow"}' in text
    mosel.close(model)


def test_the_server_records_residuals_overheads_and_queue_waits() -> None:
    model = served(delay_s=0.001)
    with mosel.serving(model):
        futures = [model.submit(rows(2, 10.0 * i), deadline_ms=500.0) for i in range(60)]  # type: ignore[operator]
        results = [f.result(timeout=30) for f in futures]
        lone = model.infer(rows(1, 0.0))  # type: ignore[operator]
    for result in [*results, lone]:
        assert result.queue_ms >= 0.0
        assert result.completion_ms >= result.queue_ms + result.measured_latency_ms - 1e-6
    snapshot = mosel.stats(model)  # after close: the record survives
    residuals = snapshot.residuals
    assert residuals is not None and len(residuals.ratios) >= 5
    assert len(residuals.overhead_us) == len(residuals.ratios)  # every batch settled, lone one included
    assert all(o > 0.0 for o in residuals.overhead_us)
    assert residuals.bias > 1.0  # a sleeping branch is slower than its synthetic table
    assert snapshot.latency_margin >= 1.0 and snapshot.overhead_ms >= 0.0


def test_a_job_below_its_best_says_why() -> None:
    model = served()
    everything = frozenset({"audio", "video"})
    frontier = mosel.profile_of(model).plan.frontier(everything, 2)
    cheapest_ms = frontier.strategies[0].predicted_latency_ms
    best_ms = frontier.best.predicted_latency_ms
    cold = model.infer(rows(2, 0.0), deadline_ms=1000.0, min_accuracy=0.6)  # type: ignore[operator]
    assert cold.reason is not None and cold.reason.startswith("arrivals"), cold.reason  # the first
    # A quiet span after it (far longer than 4.7 cheapest batches) rules out a flood: the next is
    # upgraded. Only a lower bound on the time passed matters, so the sleep races nothing.
    time.sleep(max(0.05, 0.01 * cheapest_ms))
    roomy = model.infer(rows(2, 0.0), deadline_ms=1000.0, min_accuracy=0.6)  # type: ignore[operator]
    assert roomy.reason is None and roomy.expected_accuracy == pytest.approx(0.9)
    tight_ms = (cheapest_ms + best_ms) / 2 + 0.001
    tight = model.infer(rows(2, 0.0), deadline_ms=tight_ms, min_accuracy=0.6)  # type: ignore[operator]
    assert tight.expected_accuracy < 0.9
    assert tight.reason is not None and tight.reason.startswith("deadline"), tight.reason
    mosel.close(model)
    static = served(policy="aggressive")
    cheap = static.infer(rows(1, 0.0), deadline_ms=1000.0, min_accuracy=0.6)  # type: ignore[operator]
    assert cheap.reason is not None and cheap.reason.startswith("policy 'aggressive'"), cheap.reason
    mosel.close(static)
