"""A model's serving state: ``attach``, its server, and what ``infer``/``submit``/``ainfer`` call.

The state lives on the instance as ``_mosel_state`` (never a Module, Parameter or buffer, so
``state_dict`` and ``.to()`` are unaffected). Its :class:`~mosel.server.Server` starts lazily, once,
however many threads use the model first; a process forked from a serving one starts its own.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Final, Literal, TypeVar

import torch
from torch import Tensor, nn

from mosel import methods
from mosel.compiling import COMPILED_ATTR, unwrap_compiled
from mosel.errors import (
    InputError,
    MoselWarning,
    NotMonitoredError,
    NotProfiledError,
    ProfileMismatchError,
    SpecError,
)
from mosel.execution import Result, RowPlanCache, execute
from mosel.interrupts import current_pid
from mosel.monitoring import Monitor, Monitoring
from mosel.plan import Strategy
from mosel.profiles import Fingerprint, Profile, fingerprint_of, priced_ahead
from mosel.requests import check_inputs
from mosel.scheduler import SchedulerConfig
from mosel.server import Server
from mosel.slo import SLO
from mosel.spec import ModelSpec, spec_of
from mosel.stats import Load, Stats, StatsSnapshot
from mosel.stats import prometheus_collector as _collector
from mosel.tail import TailModel, profile_sigma
from mosel.trees import Tree

__all__ = [
    "attach", "close", "feedback", "label_as", "load", "monitor", "monitor_of", "profile_of", "readiness",
    "run_configuration", "serving", "settle", "stats", "submit_now",
]  # fmt: skip

STATE_ATTR: Final = "_mosel_state"
OnStale = Literal["refuse", "warn"] | Callable[[nn.Module], Profile]
"""What serving does when the model moved to another device or dtype, or its compiled parts
changed, after ``attach``."""
M = TypeVar("M", bound=nn.Module)
Layout = frozenset[tuple[torch.device, torch.dtype]]
"""The (device, dtype) pairs of a model's parameters and buffers."""
LAYOUT_CHECK_S: Final = 1.0
"""Serving compares every parameter's and buffer's device and dtype with those pinned at most
this often (a whole-model move is seen at once, through the first tensor); readiness always does."""
_lock = threading.Lock()  # guards starting and closing servers (rare: first use, close, attach)
_states: weakref.WeakSet[_ModelState] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a forked child no other thread exists: locks they held are re-made, servers re-started."""
    global _lock  # noqa: PLW0603  (the one module-level lock, re-made once per fork)
    _lock = threading.Lock()
    for state in list(_states):
        state.stats = state.stats.forked()
        if state.monitor is not None:
            state.monitor.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ModelState:
    """Per-model serving state: the profile, row-plan cache, device probe and the server."""

    def __init__(
        self,
        profile: Profile,
        spec: ModelSpec,
        model_class: type[nn.Module],
        config: SchedulerConfig | None = None,
        on_stale: OnStale = "refuse",
        monitoring: Monitoring | None = None,
    ) -> None:
        self.profile = profile
        self.spec = spec
        self.model_class = model_class
        self.config = config
        self.on_stale = on_stale
        self.row_plans: RowPlanCache = {}
        self.probe: Tensor | None = None
        self.attached_as: tuple[torch.device, torch.dtype] | None = None  # the probe's, at attach
        # Every parameter and buffer, and their (device, dtype) pairs when pinned: a partial move
        # (model.audio.half()) leaves the probe where it was.
        self.tensors: tuple[Tensor, ...] = ()
        self.layout: Layout = frozenset()
        self.checked_at = -math.inf  # when the layout was last found unchanged (time.monotonic)
        self.layout_moved: str | None = None  # how it differs, as last found
        self.measured_layout: Layout | None = None  # the layout the profile fits (None: unknown)
        self.accepted: str | None = None  # how the profile did not fit at attach, accepted with a warning
        # The parts that can be compiled, and those compiled at attach (mosel.compile_branches).
        self.parts = (*spec.branches.values(), spec.fusion)
        self.compiled: tuple[str, ...] = ()
        self.stale_lock = threading.Lock()  # held while the stale model is handled (re-profiled)
        self.reprofiler: threading.Thread | None = None  # a re-profile started without waiting
        self.reprofile_error: str | None = None  # why the last one failed (None: none failed)
        self.server: Server | None = None
        self.stats = Stats()  # outlives servers: counters survive close() and a restart
        self.monitoring: Monitoring | None = None
        self.monitor: Monitor | None = None  # outlives servers too (labels arrive after a restart)
        self.watch(monitoring)
        # The declared size buckets' plans, priced now (offline) for every server to come.
        self.priced = priced_ahead(profile, {m: s.buckets for m, s in spec.sizings.items()})
        _states.add(self)

    def watch(self, monitoring: Monitoring | None) -> Monitor | None:
        """Monitor the model's accuracy with ``monitoring`` from now on (None: stop), its server too."""
        monitor = None
        if monitoring is not None:
            monitor = Monitor(self.profile, monitoring, self.spec, self.model_class.__qualname__)
        self.monitoring, self.monitor = monitoring, monitor
        self.stats.set_accuracy(None if monitor is None else monitor.snapshot)
        server = self.server
        if server is not None and not server.closed and server.pid == current_pid():
            server.set_monitor(monitor)
        return monitor

    def pin(self, model: nn.Module) -> None:
        """Remember the model's devices, dtypes and compiled parts now: serving checks they did not change."""
        tensors = tuple(itertools.chain(model.parameters(), model.buffers()))
        if tensors:
            probe = self.probe = tensors[0]
            self.attached_as = (probe.device, probe.dtype)
        self.tensors = tensors
        self.layout = _layout(tensors)
        self.layout_moved = None
        self.checked_at = time.monotonic()
        self.compiled = self.compiled_now(model)

    def compiled_now(self, model: nn.Module) -> tuple[str, ...]:
        """The parts of ``model`` compiled now (as :func:`mosel.compiled_parts`, without the spec lookup)."""
        found = model.__dict__
        for n in self.parts:
            if n in found:  # compiling a part sets it on the instance: none there, none compiled
                return tuple(n for n in self.parts if getattr(found.get(n), COMPILED_ATTR, False))
        return ()

    def moved(self, *, full: bool = False) -> str | None:
        """How the model moved since :meth:`pin` (device or dtype, of all or a part of it), or None.

        The first tensor is looked at every time; every tensor with ``full``, while a part is
        known to have moved, and otherwise every :data:`LAYOUT_CHECK_S` seconds.
        """
        probe, pinned = self.probe, self.attached_as
        if probe is not None and pinned is not None and (probe.device, probe.dtype) != pinned:
            return f"{pinned[0]}/{pinned[1]} to {probe.device}/{probe.dtype}"
        now = time.monotonic()
        if full or self.layout_moved is not None or now - self.checked_at >= LAYOUT_CHECK_S:
            layout = _layout(self.tensors)
            if layout == self.layout:
                self.layout_moved, self.checked_at = None, now
            else:
                self.layout_moved = (
                    f"{_show(self.layout)} to {_show(layout)} (some of its parameters or buffers moved)"
                )
        return self.layout_moved

    def changed(self, model: nn.Module, *, full: bool = False) -> str | None:
        """What changed since :meth:`pin` that makes the profile's latencies wrong, or None.

        A move to another device or dtype (``model.half()``, or of a part: ``model.audio.half()``),
        or other compiled parts (``mosel.compile_branches(model)`` after ``attach``). ``full``:
        look at every parameter and buffer now (see :meth:`moved`).
        """
        moved = self.moved(full=full)
        if moved is not None:
            return f"moved from {moved}"
        compiled = self.compiled_now(model)
        if compiled != self.compiled:
            return f"had its compiled parts changed from {list(self.compiled)} to {list(compiled)}"
        return None

    def float_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The float dtype inputs must take if the model moved from its profile's (else None)."""
        self.device(model)
        assert self.probe is not None
        dtype = self.probe.dtype
        measured = self.profile.fingerprint.dtype
        return dtype if dtype.is_floating_point and measured and str(dtype) != measured else None

    def device(self, model: nn.Module) -> torch.device:
        """The model's device, read from one of its tensors (``.to()`` updates it in place)."""
        if self.probe is None:
            self.probe = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0))
        return self.probe.device

    def serve(self, model: nn.Module, *, wait: bool = True) -> Server:
        """The model's server, started on first use (exactly one, whichever threads race to it).

        A model changed since attach is handled first (:func:`_stale`); with ``wait`` false, a
        re-profile is started in the background instead of waited for (see :func:`submit_now`).
        """
        server = self.server
        if self.changed(model) is not None:
            return _stale(model, self, wait=wait)
        if server is not None and not server.closed and server.pid == current_pid():
            return server
        with _lock:
            server = self.server
            # A server of the parent process (after fork) has no threads here: leave it, untouched.
            if server is None or server.closed or server.pid != current_pid():
                server = self.server = Server(
                    model,
                    self.spec,
                    self.profile,
                    functools.partial(self.device, model),
                    self.row_plans,
                    self.config,
                    stats=self.stats,
                    priced=self.priced,
                    float_dtype=functools.partial(self.float_dtype, model),
                    monitor=self.monitor,
                )
            return server

    def take_server(self) -> Server | None:
        """Detach the current server (to close it); the next use starts a new one."""
        with _lock:
            server, self.server = self.server, None
        return server if server is not None and server.pid == current_pid() else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with the model (e.g. to another process): the profile travels as its JSON form.
        on_stale = self.on_stale if isinstance(self.on_stale, str) else "refuse"
        return (_restore_state, (self.profile.to_json(), self.model_class, self.config, on_stale))


def _restore_state(
    profile_json: dict[str, Any],
    model_class: type[nn.Module],
    config: SchedulerConfig | None,
    on_stale: OnStale = "refuse",
) -> _ModelState:
    return _ModelState(Profile.from_json(profile_json), spec_of(model_class), model_class, config, on_stale)


def _stale(model: nn.Module, state: _ModelState, *, wait: bool = True) -> Server:
    """The model changed (device, dtype, compiled parts) after attach: refuse, warn, or re-profile.

    With ``wait`` false, a re-profile (``on_stale`` a function) runs on a background thread and
    this raises :class:`ProfileMismatchError` ("re-profiling") until it has attached its profile.
    """
    if state.on_stale == "refuse":
        how = state.changed(model)
        if how is not None:
            raise ProfileMismatchError(_refusal(model, how))
        return state.serve(model)
    if state.on_stale == "warn":
        _repin(model, state)
        return state.serve(model)
    if not wait:
        _start_reprofile(model, state)
        if _state(model) is state:
            raise ProfileMismatchError(_reprofiling(model, state))
        return _state(model).serve(model, wait=False)
    _reprofile(model, state)  # dropped if the model moved meanwhile: serve() looks again
    return _state(model).serve(model)


def _repin(model: nn.Module, state: _ModelState) -> None:
    """``on_stale="warn"``: warn once about the change, and take the model as it is now."""
    with state.stale_lock:
        how = state.changed(model, full=True)
        if how is not None:
            warnings.warn(
                f"{type(model).__qualname__} {how} after its profile was attached; serving on "
                f"with the old profile's latencies (decisions may miss deadlines)",
                MoselWarning,
                stacklevel=5,
            )
            state.pin(model)


def _layout(tensors: tuple[Tensor, ...]) -> Layout:
    return frozenset((t.device, t.dtype) for t in tensors)


def _show(layout: Layout) -> str:
    return " + ".join(sorted(f"{device}/{dtype}" for device, dtype in layout)) or "no tensors"


def _refusal(model: nn.Module, how: str) -> str:
    return (
        f"{type(model).__qualname__} {how} after its profile was attached: the profile's latencies "
        f"no longer hold. Re-profile it there (mosel.profile(model, data)), attach a profile "
        f"measured there, or attach(model, profile, on_stale='warn') to serve on anyway"
    )


def _reprofiling(model: nn.Module, state: _ModelState) -> str:
    how = state.changed(model) or "changed"
    failed = state.reprofile_error
    return (
        f"re-profiling: {type(model).__qualname__} {how} after its profile was attached, and its "
        f"on_stale function is re-profiling it in the background; it serves once that profile is "
        f"attached" + (f" (the last attempt failed: {failed}; retrying)" if failed else "")
    )


def _reprofile(model: nn.Module, state: _ModelState) -> bool:
    """Run ``state.on_stale`` and attach its profile, once however many threads see the change.

    A profile measured while the model moved again (back, say) fits neither what it was nor
    what it is: it is dropped (False), and the change is handled afresh by the next look.
    """
    assert callable(state.on_stale)
    with state.stale_lock:
        if _state(model) is not state or state.changed(model, full=True) is None:
            return True  # another thread re-profiled meanwhile (or the model moved back)
        before = (_layout(state.tensors), state.compiled_now(model))
        profile = state.on_stale(model)  # re-profile, by the user's function
        if (_layout(state.tensors), state.compiled_now(model)) != before:
            return False
        attach(model, profile, scheduler=state.config, on_stale=state.on_stale, monitoring=state.monitoring)
        return True


def _start_reprofile(model: nn.Module, state: _ModelState) -> None:
    """Start :func:`_reprofile` on a background thread, unless one runs already."""
    with _lock:
        if state.reprofiler is not None and state.reprofiler.is_alive():
            return
        thread = threading.Thread(
            target=_reprofile_main, args=(model, state), name="mosel-reprofile", daemon=True
        )
        state.reprofiler = thread
        thread.start()


def _reprofile_main(model: nn.Module, state: _ModelState) -> None:
    try:
        attached = _reprofile(model, state)
    except BaseException as exc:  # reported by readiness and the refusals; the next look retries
        state.reprofile_error = f"{type(exc).__name__}: {exc}"
    else:
        state.reprofile_error = None if attached else "the model moved again while it was re-profiled"


def _state(model: nn.Module) -> _ModelState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        spec_of(model)
        raise NotProfiledError(
            f"{type(model).__qualname__} has no profile; call mosel.profile(model, val_data) or "
            f"mosel.attach(model, mosel.Profile.load(path)) before serving"
        )
    assert isinstance(state, _ModelState)
    return state


def profile_of(model: nn.Module) -> Profile:
    """The profile attached to ``model``; raises :class:`NotProfiledError` if there is none."""
    return _state(model).profile


def readiness(model: nn.Module) -> str | None:
    """Why ``model`` cannot serve now, or None when it can.

    Ready means: a profile is attached, and the model is still on the device, in the dtype and
    with the compiled parts it had at ``attach`` (a change, e.g. ``model.half()`` or
    ``mosel.compile_branches(model)``, makes the profile's latencies wrong; see
    ``mosel.attach(on_stale=...)``), and its profile was measured in that dtype and on that kind
    of device.

    Every parameter and buffer is looked at (a part moved, ``model.audio.half()``, is a move).
    It runs the handling serving runs for such a change, without waiting for a request:
    ``on_stale="refuse"`` is not ready; ``"warn"`` warns once and takes the model as it is now,
    as serving does, and is then ready exactly when the profile fits it (moved back: ready;
    moved elsewhere, or compiled: not ready, though it serves on); with an ``on_stale``
    function, the re-profile starts now on a background thread and readiness says
    ``"re-profiling: ..."`` until its profile is attached. A mismatch ``attach`` accepted (with
    its :class:`MoselWarning`: a profile measured in another dtype, or without the compiled
    parts the model has) is served, and so ready, while the model stays as it was then.
    """
    try:
        state = _state(model)
    except (NotProfiledError, SpecError) as exc:
        return str(exc)
    how = state.changed(model, full=True)
    if how is not None:
        if callable(state.on_stale):
            _start_reprofile(model, state)
            if _state(model) is not state:  # it finished already
                return readiness(model)
            return _reprofiling(model, state)
        if state.on_stale == "refuse":
            return f"the model {how} after its profile was attached (on_stale='refuse'); re-profile or attach"
        _repin(model, state)
    why = _measured_elsewhere(state, model)
    return None if why == state.accepted else why


def _measured_elsewhere(state: _ModelState, model: nn.Module) -> str | None:
    """How the model now differs from what its profile was measured on (None: it fits).

    Its dtype and device kind, every tensor's (device, dtype) where known (the layout at
    ``attach`` when the profile fitted then), and its compiled parts.
    """
    probe = state.probe
    measured = state.profile.fingerprint
    if probe is None:
        return None
    if measured.dtype and measured.dtype != str(probe.dtype):
        return f"the profile was measured in {measured.dtype}, the model is in {probe.dtype} now"
    kind = measured.device.split(":", 1)[0]
    if kind in ("cpu", "cuda", "mps", "xpu") and kind != probe.device.type:
        return f"the profile was measured on {measured.device}, the model is on {probe.device} now"
    fits = state.measured_layout
    if fits is not None and state.layout != fits:
        return (
            f"the profile was measured with the model's tensors in {_show(fits)}; they are in "
            f"{_show(state.layout)} now"
        )
    compiled = state.compiled_now(model)
    if measured.dtype and tuple(measured.compiled) != compiled:  # "": an older profile, not recorded
        return (
            f"the profile was measured with the compiled parts {list(measured.compiled)}, the model has "
            f"{list(compiled)} now"
        )
    return None


def settle(model: nn.Module) -> None:
    """Handle a change of the model since ``attach`` as serving does, without waiting.

    What a front door runs before it decodes a request with the profile's input schema: with
    ``on_stale="warn"`` it warns once; with ``"refuse"`` it raises; with a function it starts
    the re-profile in the background and raises until its profile is attached. Never blocks
    for a re-profile.

    Raises:
        NotProfiledError: no profile is attached.
        ProfileMismatchError: the change is refused, or the model is being re-profiled.
    """
    _state(model).serve(model, wait=False)


def _stale_reasons(profile: Profile, spec: ModelSpec, here: Fingerprint) -> list[str]:
    """What in ``profile`` does not fit the model (fingerprint ``here``, declaration ``spec``)."""
    stale = [
        f"{name} {getattr(profile.fingerprint, name)!r} != {getattr(here, name)!r}"
        for name in ("device", "torch_version", "parameter_checksum", "dtype", "compiled", "threads")
        if getattr(profile.fingerprint, name) != getattr(here, name)
        and not (name in ("dtype", "threads") and not getattr(profile.fingerprint, name))  # older: unknown
    ]
    if set(profile.sized) != set(spec.sizings):
        stale.append(
            f"modalities priced per input size {sorted(profile.sized)} != declared with size= "
            f"{sorted(spec.sizings)} (jobs would be priced at one size)"
        )
    padding = [
        m
        for m, s in profile.sized.items()
        if m in spec.sizings and s.padded != (spec.sizings[m].padding is not None)
    ]
    if padding:
        stale.append(
            f"modalities {padding} are padded to their size buckets' edges in the profile or in the "
            f"declaration (pad=), not in both (jobs would run at other widths than the profile timed)"
        )
    return stale


def attach(
    model: nn.Module,
    profile: Profile,
    *,
    strict: bool = False,
    scheduler: SchedulerConfig | None = None,
    on_stale: OnStale = "refuse",
    monitoring: Monitoring | None = None,
) -> None:
    """Attach a profile (and its plan) to a model so that it can serve.

    A profile of another model class or other modalities is refused. One measured on another
    device, dtype, torch version, other weights or other compiled branches is accepted with a
    :class:`MoselWarning`, or refused when ``strict`` is true. ``scheduler`` configures the
    online stage. A model that was already serving is closed first (its queued jobs finish).

    ``on_stale`` says what serving does when the model moves to another device or dtype after
    this call (``model.to("cuda")``, ``model.half()``), or its compiled parts change
    (``mosel.compile_branches(model)``), which makes the profile's latencies wrong:
    ``"refuse"`` (the default) raises :class:`ProfileMismatchError` on every call until a
    fitting profile is attached; ``"warn"`` warns once and serves on; a function
    ``model -> Profile`` (e.g. ``lambda m: mosel.profile(m, validation_data)``) re-profiles
    once, on the first call or :func:`readiness` check that sees the change, and attaches the
    result (a readiness check, or :func:`submit_now`, starts it in the background).

    ``monitoring`` (a :class:`mosel.Monitoring`) watches the accuracy the profile promises in
    production: labels reported with :func:`feedback`, live accuracy per configuration, drift
    alarms, shadow runs and, with ``live_floors``, re-priced floors (``docs/monitoring.md``).
    """
    model = unwrap_compiled(model)
    if not (on_stale in ("refuse", "warn") or callable(on_stale)):
        raise ValueError(
            f"on_stale must be 'refuse', 'warn' or a function model -> Profile, got {on_stale!r}"
        )
    spec = spec_of(model)
    if profile.modalities != spec.modalities:
        raise ProfileMismatchError(
            f"profile has modalities {list(profile.modalities)}, {type(model).__qualname__} declares "
            f"{list(spec.modalities)}; profile this model instead"
        )
    if profile.fingerprint.model_class != spec.model_class:
        raise ProfileMismatchError(
            f"profile was measured on {profile.fingerprint.model_class}, not {spec.model_class}; "
            f"profile this model instead"
        )
    stale = _stale_reasons(profile, spec, fingerprint_of(model, spec.model_class))
    if stale:
        message = (
            f"profile of {spec.model_class} does not match this model: {'; '.join(stale)}. "
            f"Latency or accuracy may be off; re-run mosel.profile on this device and weights"
        )
        if strict:
            raise ProfileMismatchError(message)
        warnings.warn(message, MoselWarning, stacklevel=2)
    old = model.__dict__.get(STATE_ATTR)
    state = _ModelState(profile, spec, type(model), scheduler, on_stale, monitoring)
    state.pin(model)
    state.accepted = _measured_elsewhere(state, model)
    if state.accepted is None:
        state.measured_layout = state.layout
    model.__dict__[STATE_ATTR] = state
    if isinstance(old, _ModelState):
        server = old.take_server()
        if server is not None:
            server.close()


def close(model: nn.Module, *, cancel: bool = False, timeout: float | None = None) -> None:
    """Shut the model's scheduler down; every future resolves.

    Queued jobs finish, or with ``cancel`` fail with :class:`mosel.ShutdownError`. Serving the
    model again starts a new scheduler.
    """
    state = model.__dict__.get(STATE_ATTR)
    if isinstance(state, _ModelState):
        server = state.take_server()
        if server is not None:
            server.close(cancel=cancel, timeout=timeout)


@contextlib.contextmanager
def serving(model: M, *, cancel: bool = False) -> Iterator[M]:
    """``with mosel.serving(model): ...`` closes the model's scheduler on exit."""
    try:
        yield model
    finally:
        close(model, cancel=cancel)


def run_configuration(model: nn.Module, inputs: Mapping[str, Tree], configuration: Iterable[str]) -> Tree:
    """Compute ``configuration`` (a set of modality names) for every row of ``inputs``, by hand.

    What a served row must equal: the branches of those modalities over the rows, then the
    fusion over their features, outside any scheduler (no profile needed). For checking that a
    served result is row-exact: run each row's ``Result.modalities`` with this and compare.

    Raises:
        InputError: the inputs do not fit the model, or lack a modality of the configuration.
    """
    spec = spec_of(model)
    wanted = frozenset(configuration)
    unknown = sorted(wanted - set(spec.modalities))
    if not wanted or unknown:
        raise InputError(
            f"configuration {sorted(wanted)} must be a non-empty set of {list(spec.modalities)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    tensors, available, n = check_inputs({m: inputs[m] for m in inputs if m in wanted}, spec, device)
    if available != wanted:
        raise InputError(f"configuration {sorted(wanted)} needs inputs for {sorted(wanted - available)}")
    with torch.inference_mode():
        return execute(model, spec, Strategy(((wanted, n),), 0, 0), tensors)


def stats(model: nn.Module) -> StatsSnapshot:
    """A snapshot of the model's serving statistics (counters, histograms, latency correction).

    The statistics belong to the model, not to one scheduler: they survive ``close`` and count on
    when serving resumes; ``attach`` starts them afresh. Reading them starts nothing.
    """
    return _state(model).stats.snapshot()


def monitor(model: nn.Module, monitoring: Monitoring | None = None) -> None:
    """Watch ``model``'s accuracy with ``monitoring`` from now on; ``None`` stops watching.

    ``mosel.monitor(model, mosel.Monitoring())`` turns it on with the default settings: the
    same as ``attach(..., monitoring=...)`` for a model already attached. Jobs served before
    are not held (their labels count as unknown); a new monitor's figures start afresh.

    Raises:
        NotProfiledError: no profile is attached.
    """
    _state(model).watch(monitoring)


def feedback(model: nn.Module, result_id: str, labels: object) -> int:
    """Report the ground truth of a served job, when it arrives (minutes or days later).

    Args:
        model: the model that served it.
        result_id: the job's :attr:`mosel.Result.id`, or a key given to :func:`label_as`.
        labels: one label per request, in the job's row order (a sequence or a tensor; None for
            a request without one), or ``{row: label}`` for some; what the metric of
            ``Monitoring`` takes as targets (class indices for the default top-1).

    Returns:
        The requests scored now: 0 for an id not held (never served by this process, or
        forgotten after ``Monitoring.horizon_s`` / ``max_records``) or requests already labelled.

    Raises:
        NotProfiledError: no profile is attached.
        NotMonitoredError: monitoring is off.
        InputError: the labels are malformed (their number, a row out
            of range, labels the metric cannot score).
    """
    return _monitor(model).feedback(result_id, labels)


def label_as(model: nn.Module, result_id: str, key: str) -> bool:
    """Let the labels of ``result_id`` also come as ``key`` (the caller's own id for the job).

    A key names one job (given again, the latest job given it). Returns False, changing
    nothing, when ``result_id`` is not held (see :func:`feedback`) or ``key`` is another held
    job's own id.

    Raises:
        NotMonitoredError: monitoring is off.
        InputError: ``key`` is not a non-empty string.
    """
    return _monitor(model).alias(result_id, key)


def monitor_of(model: nn.Module) -> Monitor | None:
    """The model's accuracy monitor (None when monitoring is off): its figures, ``reset``, aliases.

    Raises:
        NotProfiledError: no profile is attached.
    """
    return _state(model).monitor


def _monitor(model: nn.Module) -> Monitor:
    monitor = _state(model).monitor
    if monitor is None:
        raise NotMonitoredError(
            f"{type(model).__qualname__} is not monitored, so labels have nowhere to go; attach it with "
            f"mosel.attach(model, profile, monitoring=mosel.Monitoring()) or call mosel.monitor(model, "
            f"mosel.Monitoring())"
        )
    return monitor


def load(model: nn.Module) -> Load:
    """What the model's scheduler would tell a router now: a :class:`mosel.Load`.

    Thread-safe and cheap (a few numpy sums under the scheduler's lock, no solving); reading it
    starts nothing. A model whose server has not started (or was closed) reports an empty load
    priced with the last scheduler's tail model, or the profile's prior before any.

    Raises:
        NotProfiledError: no profile is attached.
    """
    state = _state(model)
    server = state.server
    if server is not None and not server.closed and server.pid == current_pid():
        return server.load()
    prices = state.stats.prices()
    if prices is None:
        quantile = (state.config or SchedulerConfig()).latency_quantile
        prices = (TailModel(quantile, profile_sigma(state.profile)).margin, 0.0)
    margin, overhead_ms = prices
    return Load(
        drain_ms=0.0,
        queued_jobs=0,
        queued_requests=0,
        latency_margin=margin,
        overhead_ms=overhead_ms,
        degraded_share=0.0,
        at_s=time.time(),
    )


def prometheus_collector(model: nn.Module, name: str | None = None) -> Any:
    """A ``prometheus_client`` collector for the model's statistics (needs ``prometheus_client``).

    Register it with ``prometheus_client.REGISTRY.register(mosel.runtime.prometheus_collector(model))``.
    """
    return _collector(_state(model).stats, name or type(model).__qualname__)


class _Runtime:
    """The serving implementation behind ``model.infer``/``submit``/``ainfer`` (:mod:`mosel.methods`)."""

    def infer(self, model: nn.Module, inputs: object, slo: SLO, present: object) -> Result:
        return _state(model).serve(model).infer(inputs, slo, present)

    def submit(self, model: nn.Module, inputs: object, slo: SLO, present: object) -> Future[Result]:
        return _state(model).serve(model).submit(inputs, slo, present)

    async def ainfer(self, model: nn.Module, inputs: object, slo: SLO, present: object) -> Result:
        return await _state(model).serve(model).ainfer(inputs, slo, present)


def submit_now(model: nn.Module, inputs: object, slo: SLO, present: object = None) -> Future[Result]:
    """``model.submit``, for a thread that must not wait (an event loop): see :func:`settle`.

    A model changed since ``attach`` whose ``on_stale`` is a function is re-profiled in the
    background; meanwhile this raises :class:`ProfileMismatchError` instead of running it here.
    """
    return _state(model).serve(model, wait=False).submit(inputs, slo, present)


methods.register(_Runtime())
