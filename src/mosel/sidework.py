"""What a server's threads do for its accuracy monitor: idle-time work and live floors' re-pricing.

* :func:`idle_work`: asked by the executor thread while nothing is queued or running. It digests
  served outputs (the label-free shift) and runs shadow evaluations: one kept request at the most
  accurate configuration, only when the monitor's device-time share allows and each step (a
  branch, fusion) is predicted short. The device is lent for it (:meth:`mosel.core.CoreView.lend`):
  a job arriving meanwhile queues (it never runs beside it) and the run is abandoned at the end
  of its step, so the job waits one step at most.
* :func:`start_repricing`: live floors changed; a background thread builds the live profile
  (:func:`mosel.monitoring.live_profile`) and swaps it into the scheduler under the lock. Nothing
  of it runs on a caller's thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mosel.monitoring import Monitor, Sample, live_profile
from mosel.plan import PlannerConfig
from mosel.pricing import Pricer
from mosel.profiles import priced_ahead

if TYPE_CHECKING:
    from mosel.server import Server

__all__ = ["idle_work", "longest_step_us", "start_repricing"]

_log = logging.getLogger("mosel")


def idle_work(server: Server) -> tuple[Callable[[], None] | None, float | None]:
    """What the executor does while idle (the server's lock is held): work to run outside it, or a wait.

    Returns ``(work, None)``: run ``work`` outside the lock, then look again; ``(None, wait_s)``:
    nothing now, look again in ``wait_s`` seconds (None: when woken).
    """
    monitor = server.monitor
    if monitor is None or server.closed:
        return None, None
    if monitor.digest_waiting:
        return monitor.digest, None
    while True:
        wait_s = monitor.shadow_wait_s(time.monotonic())
        if wait_s is None or wait_s > 0.0:
            return None, wait_s
        sample = monitor.take_sample()
        if sample is None:
            return None, None
        step_us = longest_step_us(server.scheduler.pricer, sample.best)
        if step_us <= monitor.shadow_limit_us():
            server.scheduler.lend(server.clock.now(), step_us)
            return functools.partial(_shadow, server, monitor, sample), None
        monitor.skip(sample)


def longest_step_us(pricer: Pricer, best: frozenset[str]) -> float:
    """The price of the longest step of a one-request shadow run at ``best``: a branch, or fusion.

    A job arriving during a run waits for the step running at most (then the run is abandoned).
    """
    parts = pricer.cost.parts(((best, 1),))
    tail, correction = pricer.tail, pricer.correction
    return max(tail.price(correction[part] * value) for part, value in parts.items())


def _shadow(server: Server, monitor: Monitor, sample: Sample) -> None:
    """Run ``sample`` at its most accurate configuration, a step at a time (outside the lock).

    Between steps (each branch, then fusion) it gives the device back as soon as a job is
    queued: the job waits one step at most, the run is abandoned.
    """
    started = time.perf_counter()
    model, spec, scheduler = server.model, server.spec, server.scheduler
    try:
        with torch.inference_mode():
            features = {}
            for m in spec.modalities:
                if m in sample.best:
                    if scheduler.queue:  # read without the lock: a hint, checked again at each step
                        monitor.skip(sample, aborted=True, device_s=time.perf_counter() - started)
                        return
                    features[m] = getattr(model, spec.branches[m])(sample.inputs[m])
            if scheduler.queue:
                monitor.skip(sample, aborted=True, device_s=time.perf_counter() - started)
                return
            output = getattr(model, spec.fusion)(features)
            device = server.device()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        monitor.shadowed(sample, output, time.perf_counter() - started)
    except Exception:  # a shadow run never fails anything else: it is left out
        _log.debug("mosel: a shadow run failed; left out", exc_info=True)
        monitor.skip(sample, device_s=time.perf_counter() - started)
    finally:
        with server.lock:
            scheduler.lend_back(server.clock.now())
            server.cond.notify()


def start_repricing(ref: weakref.ref[Server]) -> None:
    """Re-price the server's plan at its monitor's live floors on a background thread (one at a time)."""
    server = ref()
    if server is None or server.closed or server.monitor is None:
        return
    with server.lock:
        if server.repricer is not None and server.repricer.is_alive():
            server.reprice_again = True
            return
        server.reprice_again = False
        thread = threading.Thread(target=_reprice_main, args=(ref,), name="mosel-floors", daemon=True)
        server.repricer = thread
    thread.start()


def _reprice_main(ref: weakref.ref[Server]) -> None:
    """Build live profiles and swap them in until the monitor's floors stop moving."""
    while True:
        server = ref()
        if server is None or server.closed or server.monitor is None:
            return
        monitor = server.monitor
        table = monitor.priced()
        declared = {m: s.buckets for m, s in server.spec.sizings.items()}
        exact = monitor.config.rebuild == "exact"
        try:
            for solve in (False, True) if exact else (False,):
                planner = PlannerConfig(workers=1) if solve else None
                live = live_profile(server.base_profile, table, exact=solve, planner=planner)
                priced = priced_ahead(live, declared)
                with server.lock:
                    server.scheduler.set_profile(live, priced)
                monitor.applied(table)
                _log.info(
                    "mosel: %s serves at live floors %s (%s plan)",
                    monitor.name,
                    {
                        live.key(c): round(a, 4)
                        for c, a in table.items()
                        if a != server.base_profile.accuracy[c]
                    },
                    "exact" if solve else "repriced",
                )
        except Exception:
            _log.exception("mosel: re-pricing at live floors failed; decisions keep their prices")
            return
        with server.lock:
            again = server.reprice_again or monitor.needs_reprice()
            server.reprice_again = False
            if not again:
                server.repricer = None
                return
        del server
