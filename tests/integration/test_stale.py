"""Stale profiles (issue 13, item 7): a model that moves after attach, and compiled branches."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch

import mosel
from mosel.profiles import Fingerprint
from mosel.runtime import _state, readiness, settle

from ..unit.helpers import Tiny, tiny_inputs, tiny_profile


def attached(**options: object) -> Tiny:
    model = Tiny()
    mosel.attach(model, tiny_profile(model), **options)  # type: ignore[arg-type]
    return model


def test_the_fingerprint_records_dtype_and_compiled_parts_and_reads_older_profiles() -> None:
    model = Tiny()
    measured = tiny_profile(model).fingerprint
    assert measured.dtype == "torch.float32" and measured.compiled == ()
    assert Fingerprint.from_json(measured.to_json()) == measured
    older = {k: v for k, v in measured.to_json().items() if k not in ("dtype", "compiled")}
    assert Fingerprint.from_json(older).dtype == ""


def test_a_model_cast_after_attach_is_refused_with_what_to_do() -> None:
    model = attached()
    assert model.infer(tiny_inputs(2)).output.dtype == torch.float32  # type: ignore[operator]
    model.double()
    with pytest.raises(
        mosel.ProfileMismatchError, match=r"moved from cpu/torch.float32 to cpu/torch.float64"
    ) as info:
        model.infer({k: v.double() for k, v in tiny_inputs(2).items()})  # type: ignore[operator]
    assert "mosel.profile" in str(info.value) and "on_stale" in str(info.value)
    with pytest.raises(mosel.ProfileMismatchError):
        model.submit(tiny_inputs(1))  # type: ignore[operator]
    model.float()  # back where it was profiled: serves again
    assert model.infer(tiny_inputs(1)).output.shape == (1, 3)  # type: ignore[operator]
    mosel.close(model)


def test_warn_serves_on_after_one_warning() -> None:
    model = attached(on_stale="warn")
    model.double()
    inputs = {k: v.double() for k, v in tiny_inputs(2).items()}
    with pytest.warns(mosel.MoselWarning, match="moved from"):
        model.infer(inputs)  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.infer(inputs).output.dtype == torch.float64  # type: ignore[operator]
    mosel.close(model)


def test_a_reprofile_function_runs_once_and_its_profile_serves() -> None:
    calls: list[torch.dtype] = []

    def reprofile(model: torch.nn.Module) -> mosel.Profile:
        calls.append(next(model.parameters()).dtype)
        return tiny_profile(model)

    model = attached(on_stale=reprofile)
    model.double()
    inputs = {k: v.double() for k, v in tiny_inputs(2).items()}
    for _ in range(3):
        model.infer(inputs)  # type: ignore[operator]
    assert calls == [torch.float64]
    assert mosel.profile_of(model).fingerprint.dtype == "torch.float64"
    mosel.close(model)


def test_on_stale_is_validated() -> None:
    with pytest.raises(ValueError, match="on_stale"):
        attached(on_stale="ignore")


def test_torch_compile_of_the_whole_model_is_refused_with_the_alternative() -> None:
    model = Tiny()
    wrapped = torch.compile(model, backend="eager")
    with pytest.raises(mosel.SpecError, match="compile_branches"):
        mosel.attach(wrapped, tiny_profile(model))
    with pytest.raises(mosel.SpecError, match="compile_branches"):
        mosel.profile(wrapped, [])


def test_compiled_branches_serve_and_are_recorded_in_the_fingerprint() -> None:
    model = Tiny()
    eager = tiny_profile(model)
    assert mosel.compile_branches(model, backend="eager") is model
    assert mosel.compiled_parts(model) == ("encode_audio", "encode_video", "encode_text")
    assert mosel.compile_branches(model, fusion=True, backend="eager") is model  # adds the fusion only
    assert isinstance(model, Tiny) and set(model.state_dict()) == {"scale"}
    compiled = tiny_profile(model)
    assert compiled.fingerprint.compiled == ("encode_audio", "encode_video", "encode_text", "fuse")
    # Profiled for real, each compiled branch is timed eager too, in the same rounds; JSON keeps both.
    data = [({m: x.repeat(2, *([1] * (x.dim() - 1))) for m, x in tiny_inputs(4).items()}, torch.zeros(8))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mosel.MoselWarning)  # a sub-microsecond toy: checks are noise
        measured = mosel.profile(model, data, max_batch_size=2, warmup=1, repeats=2, metric=lambda o, t: t)
    assert set(measured.eager_latency) == {"audio", "video", "text"}
    assert mosel.Profile.from_json(measured.to_json()).eager_latency == measured.eager_latency
    with pytest.warns(mosel.MoselWarning, match="compiled"):
        mosel.attach(model, eager)  # measured eager: its latencies do not hold
    mosel.attach(model, compiled)
    result = model.infer(tiny_inputs(3))  # type: ignore[operator]
    reference = Tiny()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(result.output, reference.fuse({
        "audio": reference.encode_audio(tiny_inputs(3)["audio"]),
        "video": reference.encode_video(tiny_inputs(3)["video"]),
        "text": reference.encode_text(tiny_inputs(3)["text"]),
    }))  # fmt: skip
    mosel.close(model)


def test_readiness_starts_the_reprofile_in_the_background_and_turns_ready() -> None:
    """A readiness check runs the stale handling: no call to the model is needed (issue 21, item 5)."""
    go = threading.Event()
    calls: list[torch.dtype] = []

    def reprofile(model: torch.nn.Module) -> mosel.Profile:
        calls.append(next(model.parameters()).dtype)
        go.wait(10)
        return tiny_profile(model)

    model = attached(on_stale=reprofile)
    state = _state(model)
    assert readiness(model) is None
    model.double()
    reason = readiness(model)
    assert reason is not None and reason.startswith("re-profiling") and "moved from" in reason
    assert readiness(model) == reason  # one re-profile, however often it is asked
    with pytest.raises(mosel.ProfileMismatchError, match="re-profiling"):
        settle(model)  # what a front door runs: never waits
    go.set()
    assert state.reprofiler is not None
    state.reprofiler.join(30)
    assert readiness(model) is None
    assert calls == [torch.float64]
    inputs = {k: v.double() for k, v in tiny_inputs(2).items()}
    assert model.infer(inputs).output.dtype == torch.float64  # type: ignore[operator]
    assert calls == [torch.float64]
    mosel.close(model)


def test_a_call_during_a_background_reprofile_waits_for_it_and_does_not_reprofile_again() -> None:
    go = threading.Event()
    calls: list[torch.dtype] = []

    def reprofile(model: torch.nn.Module) -> mosel.Profile:
        calls.append(next(model.parameters()).dtype)
        go.wait(10)
        return tiny_profile(model)

    model = attached(on_stale=reprofile)
    model.double()
    assert readiness(model) is not None  # started
    inputs = {k: v.double() for k, v in tiny_inputs(2).items()}
    results: list[object] = []
    caller = threading.Thread(target=lambda: results.append(model.infer(inputs)))  # type: ignore[operator]
    caller.start()
    time.sleep(0.05)  # lets the caller reach the re-profile's lock (it passes either way)
    go.set()
    caller.join(30)
    assert len(results) == 1 and calls == [torch.float64]
    mosel.close(model)


def test_a_failed_background_reprofile_is_reported_and_retried() -> None:
    attempts: list[int] = []

    def reprofile(model: torch.nn.Module) -> mosel.Profile:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("validation data unavailable")
        return tiny_profile(model)

    model = attached(on_stale=reprofile)
    state = _state(model)
    model.double()
    readiness(model)
    assert state.reprofiler is not None
    state.reprofiler.join(30)
    reason = readiness(model)  # reports the failure and starts a second attempt
    assert reason is not None and "validation data unavailable" in reason
    state.reprofiler.join(30)
    assert readiness(model) is None and len(attempts) == 2
    mosel.close(model)


def test_compiling_after_attach_is_a_change_the_profile_does_not_fit() -> None:
    """mosel.compiling promises it: a compilation change after attach is refused (or handled by on_stale)."""
    model = attached()
    assert model.infer(tiny_inputs(1)).output.shape == (1, 3)  # type: ignore[operator]
    mosel.compile_branches(model, backend="eager")
    with pytest.raises(mosel.ProfileMismatchError, match=r"compiled parts changed from \[\] to \['encode_"):
        model.infer(tiny_inputs(1))  # type: ignore[operator]
    reason = readiness(model)
    assert reason is not None and "compiled parts changed" in reason
    warned = attached(on_stale="warn")
    mosel.compile_branches(warned, backend="eager")
    with pytest.warns(mosel.MoselWarning, match="compiled parts changed"):
        before = readiness(warned)  # the handling serving runs: warned once, the compiled parts pinned
    assert before is not None and "measured with the compiled parts []" in before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settle(warned)  # warned once already
        assert readiness(warned) == before  # the same answer before and after a request
    mosel.close(model)
    mosel.close(warned)


@pytest.mark.parametrize("then", ["back", "elsewhere"])
def test_a_model_moved_again_during_a_background_reprofile_never_serves_with_the_wrong_profile(
    then: str,
) -> None:
    """double() starts a re-profile (measured in float64); the model moves again before it returns.

    Back to float32: the attached profile fits again (ready at once); the float64 profile is
    dropped. Elsewhere (half): it is dropped too, and the next look re-profiles for half.
    """
    go = threading.Event()
    started = threading.Event()
    calls: list[torch.dtype] = []

    def reprofile(model: torch.nn.Module) -> mosel.Profile:
        calls.append(next(model.parameters()).dtype)
        measured = tiny_profile(model)  # measured now, in the model's dtype
        started.set()
        assert go.wait(10)
        return measured

    model = attached(on_stale=reprofile)
    state = _state(model)
    model.double()
    reason = readiness(model)
    assert reason is not None and reason.startswith("re-profiling")
    assert started.wait(10)
    if then == "back":
        model.float()
        assert readiness(model) is None  # the attached profile fits again, while the re-profile runs
        with warnings.catch_warnings():  # attaching a float64 profile would only warn
            warnings.simplefilter("ignore", mosel.MoselWarning)
            go.set()
            assert state.reprofiler is not None
            state.reprofiler.join(30)
        assert readiness(model) is None
        assert mosel.profile_of(model).fingerprint.dtype == "torch.float32" and calls == [torch.float64]
        assert model.infer(tiny_inputs(2)).output.dtype == torch.float32  # type: ignore[operator]
    else:
        model.half()
        go.set()
        assert state.reprofiler is not None
        state.reprofiler.join(30)
        assert mosel.profile_of(model).fingerprint.dtype == "torch.float32"  # the float64 one was dropped
        started.clear()
        reason = readiness(model)  # a second re-profile, for half
        assert reason is not None and reason.startswith("re-profiling") and "moved again" in reason
        state.reprofiler.join(30)
        assert readiness(model) is None and calls == [torch.float64, torch.float16]
        assert mosel.profile_of(model).fingerprint.dtype == "torch.float16"
    mosel.close(model)
