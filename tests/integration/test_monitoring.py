"""Accuracy monitoring on the threaded server: ids, labels, shadow runs in idle time, live floors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel import sidework
from mosel.execution import process_token
from tests.unit.helpers import tiny_inputs, tiny_profile

AT = frozenset({"audio", "text"})
ALL = frozenset({"audio", "video", "text"})


@mosel.multimodal
class Gated(nn.Module):
    """Tiny's three modalities; ``gate`` holds the audio branch; each fusion call is logged."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 10.0, 100.0]))
        self.gate = threading.Event()
        self.gate.set()
        self.shadow_gate = threading.Event()  # holds the audio branch of a shadow run
        self.shadow_gate.set()
        self.in_shadow = threading.Event()
        self.log: list[tuple[frozenset[str], int, bool, bool]] = []  # config, queued, in flight, lent

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        assert self.gate.wait(10.0)
        if self.__dict__["_mosel_state"].server.scheduler.lent:  # a shadow run
            self.in_shadow.set()
            assert self.shadow_gate.wait(10.0)
        return audio * self.scale[0]

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return video.sum(dim=(1, 2))[:, None] * self.scale[1]

    @mosel.modality("text")
    def encode_text(self, text: Tensor) -> Tensor:
        return text * self.scale[2]

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        scheduler = self.__dict__["_mosel_state"].server.scheduler
        self.log.append(
            (frozenset(features), len(scheduler.queue), scheduler.in_flight is not None, scheduler.lent)
        )
        rows = next(iter(features.values())).shape[0]
        cols = [features.get(m, torch.zeros(rows, 1)) for m in ("audio", "video", "text")]
        return torch.cat(cols, dim=1)


def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Wait for a background thread's effect (no timing is asserted: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the background work did not happen"
        time.sleep(0.005)


def _attach(model: nn.Module, **settings: Any) -> None:
    mosel.attach(
        model,
        tiny_profile(model),
        scheduler=mosel.SchedulerConfig(policy="aggressive"),  # the cheapest admissible: never upgrades
        monitoring=mosel.Monitoring(**settings),
    )


def test_results_carry_ids_and_their_labels_come_back() -> None:
    pytest.importorskip("prometheus_client")
    model = Gated()
    _attach(model, shadow_rate=0.0, reference_rows=4)
    with mosel.serving(model):
        results = [model.infer(tiny_inputs(2), deadline_ms=500.0, min_accuracy=0.7) for _ in range(3)]
        results += [model.submit(tiny_inputs(1), deadline_ms=500.0).result() for _ in range(3)]
        ids = [r.id for r in results]
        assert len(set(ids)) == len(ids) and all(i.startswith(process_token() + "-") for i in ids)
        assert [mosel.feedback(model, r.id, [2] * len(r.modalities)) for r in results] == [2, 2, 2, 1, 1, 1]
        assert mosel.label_as(model, results[0].id, "mine") is False  # fully labelled: forgotten
        accuracy = mosel.stats(model).accuracy
        assert accuracy is not None and accuracy.counters["labelled"] == 9
        labelled = {k: c.labels for k, c in accuracy.configurations.items() if c.labels}
        assert labelled == {"audio+text": 6, "audio": 3}  # without a floor: the cheapest
        assert accuracy.configurations["audio+text"].confidence_mean is not None  # past 4 reference rows
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(mosel.runtime.prometheus_collector(model))
        text = generate_latest(registry).decode()
        assert 'mosel_accuracy_live{configuration="audio+text",model="Gated"}' in text
        assert 'mosel_feedback_events_total{event="labelled",model="Gated"} 9.0' in text
        assert 'mosel_modality_lost{modality="audio",model="Gated"}' in text
    mosel.monitor(model, None)
    with pytest.raises(mosel.InputError, match="not monitored"):
        mosel.feedback(model, ids[0], [0])


def test_shadow_runs_only_when_nothing_is_queued_or_running() -> None:
    model = Gated()
    _attach(model, shadow_rate=1.0, shadow_share=1.0, shadow_max_ms=1000.0)
    with mosel.serving(model):
        model.gate.clear()  # the first job holds the device; the others queue behind it
        futures = [model.submit(tiny_inputs(1), deadline_ms=5000.0, min_accuracy=0.7)]
        server = model.__dict__["_mosel_state"].server
        _until(lambda: server.scheduler.in_flight is not None)
        futures += [model.submit(tiny_inputs(1), deadline_ms=5000.0, min_accuracy=0.7) for _ in range(4)]
        model.gate.set()
        results = [f.result() for f in futures]
        assert all(r.modalities == (AT,) for r in results)
        _until(lambda: mosel.stats(model).accuracy.counters["shadow_runs"] >= 1)  # type: ignore[union-attr]
        served = [entry for entry in model.log if entry[0] == AT]
        shadows = [entry for entry in model.log if entry[0] == ALL]
        assert len(served) >= 1 and shadows
        first_shadow = model.log.index(shadows[0])
        assert first_shadow > max(i for i, entry in enumerate(model.log) if entry[0] == AT)
        # every shadow run started with the device lent: nothing queued, nothing running
        assert all(not in_flight and lent for _, _, in_flight, lent in shadows)
        accuracy = mosel.stats(model).accuracy
        assert accuracy is not None and accuracy.configurations["audio+text"].agreement is not None


def test_live_floors_stop_choosing_a_drifted_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = sidework.live_profile

    def spied(*args: Any, **kwargs: Any) -> mosel.Profile:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(sidework, "live_profile", spied)
    alarms: list[mosel.Alarm] = []
    model = Gated()
    _attach(model, live_floors=True, shadow_rate=0.0, on_alarm=alarms.append)
    with mosel.serving(model):
        for _ in range(200):
            result = model.infer(tiny_inputs(1), deadline_ms=500.0, min_accuracy=0.7)
            assert result.modalities == (AT,)
            mosel.feedback(model, result.id, [0])  # wrong: audio+text has drifted
            if alarms:
                break
        assert [a.kind for a in alarms] == ["drift"] and alarms[0].configuration == "audio+text"
        _until(lambda: mosel.stats(model).accuracy.counters["repriced"] >= 1)  # type: ignore[union-attr]
        result = model.infer(tiny_inputs(1), deadline_ms=500.0, min_accuracy=0.7)
        assert AT not in result.modalities
        assert result.expected_accuracy >= 0.7
        accuracy = mosel.stats(model).accuracy
        assert accuracy is not None
        priced = accuracy.configurations["audio+text"].priced
        assert accuracy.configurations["audio+text"].drifted and priced < 0.65
    assert threads and set(threads) == {"mosel-floors"}  # never on a caller's thread
    assert mosel.profile_of(model).accuracy[AT] == 0.7  # the profile itself is left alone


def test_a_job_arriving_during_a_shadow_run_waits_one_step_and_the_run_is_abandoned() -> None:
    model = Gated()
    _attach(model, shadow_rate=1.0, shadow_share=1.0, shadow_max_ms=1000.0)
    with mosel.serving(model):
        model.shadow_gate.clear()
        assert model.infer(tiny_inputs(1), deadline_ms=500.0, min_accuracy=0.7).modalities == (AT,)
        assert model.in_shadow.wait(10.0)  # the executor runs its shadow, held
        server = model.__dict__["_mosel_state"].server
        done = threading.Event()

        def call() -> None:
            model.infer(tiny_inputs(1), deadline_ms=5000.0, min_accuracy=0.7)
            done.set()

        thread = threading.Thread(target=call)
        thread.start()
        _until(lambda: bool(server.scheduler.queue))  # it queues rather than run beside the shadow
        assert not done.is_set()
        with server.lock:
            assert server.scheduler.busy_until > server.clock.now() or server.scheduler.lent
        model.shadow_gate.set()
        thread.join(10.0)
        assert done.is_set()
        counters = mosel.stats(model).accuracy.counters  # type: ignore[union-attr]
        assert counters["shadow_aborted"] == 1  # abandoned after its step, for the job
