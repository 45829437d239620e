"""The simulated device: how long a batch really takes, as a function of when it runs.

A batch's time has two parts. The *body*: its predicted execution time times a ratio, plus a
dispatch overhead, both drawn from a :class:`~mosel.tail.Residuals` sample (and optionally times a
lognormal ``noise``). *Stalls*: rare events with their own rate per second of device time and
their own length (a garbage collection, a burst of page faults, a noisy neighbour); a batch running
when one begins is delayed by its length (:class:`Stalls`, fitted from a recorded sample by
:func:`fit_stalls`). Their instants lie on the device's busy clock by default (``Stalls.clock``).

How draws are made (``draws=``):

* ``"time-grid"`` (common random numbers): time is cut into slots of ``slot_ms``; the k-th batch
  that starts in slot j takes draw (j, k) of a sequence seeded by the machine's seed. Two policies
  run on machines with the same seed see the same machine: batches that start in the same slot
  get the same ratio and overhead, and stalls strike at the same seeded instants (after the same
  device time, or at the same moment on the wall clock). A difference in their violations is a
  difference in their decisions, not in their luck. Within one run, draws stay independent (no
  two batches take the same (j, k)).
* ``"per-batch"``: one seeded stream, the n-th batch takes the n-th draw (what
  :func:`mosel.simulate` did before): two policies share draws only until their batch sequences
  first differ.

A sample with batch times (``Residuals.at_s``) replays a recorded machine's phases: each batch
takes the residuals of the recorded batch nearest in time, under either kind of draws.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np

from mosel.jsonvalues import json_dict, json_field, json_float, json_int, json_list
from mosel.tail import Residuals

__all__ = ["DRAWS", "SLOT_MS", "STALL_CLOCKS", "Machine", "Stalls", "fit_stalls", "stall_indices"]

Draws = Literal["time-grid", "per-batch"]
DRAWS: Final = ("time-grid", "per-batch")
"""The ways a :class:`Machine` draws its residuals (see the module's docstring)."""
STALL_CLOCKS: Final = ("device", "wall")
"""The clocks a :class:`Stalls` process can run on."""
SLOT_MS: Final = 1.0
"""Length of a time slot of the ``"time-grid"`` draws."""
FENCE_SIGMAS: Final = 10.0
""":func:`stall_indices`: a stall's log-ratio lies this many robust standard deviations above the median."""
_BLOCK: Final = 1024  # slots drawn at once
_STALL_BLOCK_S: Final = 1.0  # stall instants drawn per second of virtual time
_BODY, _STALL = 1, 2  # seed-sequence tags of the two streams


@dataclass(frozen=True, slots=True)
class Stalls:
    """Rare delays of the device: a rate, and a length distribution.

    Attributes:
        rate_per_s: stalls per second of device time: the instants of a Poisson process.
        lengths_ms: each stall's length is drawn uniformly from these (the lengths observed).
        observed: how many stalls the rate was fitted from (0: not fitted).
        device_s: over how many seconds of device time (0: not fitted).
        clock: ``"device"`` (default): the instants lie on the device's busy clock (the sum
            of its batches' times so far), so every one strikes a batch, after as much work
            whatever the load: stalls driven by the work done (a garbage collection triggered
            by allocations, page faults). ``"wall"``: on the virtual clock; one that begins
            while the device is idle delays nothing (a noisy neighbour).
    """

    rate_per_s: float
    lengths_ms: tuple[float, ...]
    observed: int = 0
    device_s: float = 0.0
    clock: str = "device"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s >= 0.0):
            raise ValueError(f"Stalls.rate_per_s must be finite and >= 0, got {self.rate_per_s!r}")
        if not self.lengths_ms or not all(math.isfinite(v) and v >= 0.0 for v in self.lengths_ms):
            raise ValueError(
                f"Stalls.lengths_ms must hold at least one finite length >= 0, got {self.lengths_ms!r}"
            )
        if self.clock not in STALL_CLOCKS:
            raise ValueError(f"Stalls.clock={self.clock!r}: use one of {list(STALL_CLOCKS)}")

    @property
    def mean_ms(self) -> float:
        """Mean stall length."""
        return statistics.fmean(self.lengths_ms)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "rate_per_s": self.rate_per_s,
            "lengths_ms": list(self.lengths_ms),
            "observed": self.observed,
            "device_s": self.device_s,
            "clock": self.clock,
        }

    @classmethod
    def from_json(cls, data: Any) -> Stalls:
        """Inverse of :meth:`to_json`; ValueError on malformed data."""
        data = json_dict(data, "stalls")
        lengths = json_list(json_field(data, "lengths_ms", "stalls"), "stalls.lengths_ms")
        return cls(
            json_float(json_field(data, "rate_per_s", "stalls"), "stalls.rate_per_s", low=0.0),
            tuple(json_float(v, "stalls.lengths_ms[]", low=0.0) for v in lengths),
            json_int(data.get("observed", 0), "stalls.observed", low=0),
            json_float(data.get("device_s", 0.0), "stalls.device_s", low=0.0),
            str(data.get("clock", "device")),
        )


def stall_indices(ratios: Sequence[float], fence_sigmas: float = FENCE_SIGMAS) -> list[int]:
    """Indices of the ratios that are stalls rather than the body's spread.

    A ratio is a stall when its log lies more than ``fence_sigmas`` robust standard deviations
    (1.4826 times the median absolute deviation of the log-ratios) above the median log-ratio.
    """
    logs = [math.log(max(r, 1e-12)) for r in ratios]
    centre = statistics.median(logs)
    scale = 1.4826 * statistics.median(abs(v - centre) for v in logs)
    if scale == 0.0:
        return [i for i, v in enumerate(logs) if v > centre + 1e-12]
    return [i for i, v in enumerate(logs) if v > centre + fence_sigmas * scale]


def fit_stalls(
    residuals: Residuals,
    *,
    device_s: float,
    predicted_us: float,
    fence_sigmas: float = FENCE_SIGMAS,
) -> tuple[Residuals, Stalls]:
    """Separate a recorded sample's stalls from its body, and fit their rate and lengths.

    Args:
        residuals: the recorded sample (ratios of measured over predicted execution time).
        device_s: how many seconds of device time the sample covers (its batches' total time).
        predicted_us: the predicted execution time of a typical recorded batch: a stall's
            length is its ratio's excess over the body's median times this.
        fence_sigmas: see :func:`stall_indices`.

    Returns:
        The body (the sample without its stalls' batches) and the
        stalls (rate = stalls / ``device_s``).
    """
    if not (math.isfinite(device_s) and device_s > 0.0):
        raise ValueError(f"fit_stalls(device_s={device_s!r}): give the sample's device time in seconds, > 0")
    if not (math.isfinite(predicted_us) and predicted_us > 0.0):
        raise ValueError(f"fit_stalls(predicted_us={predicted_us!r}): give a typical batch's time, > 0")
    out = set(stall_indices(residuals.ratios, fence_sigmas))
    if len(out) == len(residuals.ratios):
        raise ValueError("fit_stalls: every ratio is a stall; the sample has no body")
    keep = [i for i in range(len(residuals.ratios)) if i not in out]
    ratios = tuple(residuals.ratios[i] for i in keep)
    median = statistics.median(ratios)
    paired = len(residuals.overhead_us) == len(residuals.ratios)
    overheads = tuple(residuals.overhead_us[i] for i in keep) if paired else residuals.overhead_us
    body = Residuals(ratios, overheads, tuple(residuals.at_s[i] for i in keep) if residuals.at_s else ())
    lengths = tuple(sorted((residuals.ratios[i] - median) * predicted_us / 1e3 for i in out)) or (0.0,)
    return body, Stalls(len(out) / device_s, lengths, len(out), device_s)


class Machine:
    """One simulated device's batch times (see the module's docstring).

    Args:
        residuals: the body's sample; None: exact predictions (times ``noise`` if given).
        seed: the machine's seed; ``stream`` tells apart machines of one seed (replicas).
        noise: relative standard deviation of a lognormal factor on execution times.
        stalls: the stall process (None: none).
        draws: ``"time-grid"`` or ``"per-batch"``.
        slot_ms: slot length of the time grid.
        slowdown: a factor on every execution time (a slower device than the profiled one).
    """

    def __init__(
        self,
        residuals: Residuals | None,
        *,
        seed: int,
        stream: int = 0,
        noise: float = 0.0,
        stalls: Stalls | None = None,
        draws: str = "time-grid",
        slot_ms: float = SLOT_MS,
        slowdown: float = 1.0,
    ) -> None:
        if draws not in DRAWS:
            raise ValueError(f"draws={draws!r}: use one of {list(DRAWS)}")
        if not (math.isfinite(slot_ms) and slot_ms > 0.0):
            raise ValueError(f"slot_ms={slot_ms!r}: must be a finite number of milliseconds > 0")
        self.residuals = residuals
        self.noise = noise
        self.stalls = stalls if stalls is not None and stalls.rate_per_s > 0.0 else None
        self.grid = draws == "time-grid"
        self.slot_s = slot_ms / 1e3
        self.slowdown = slowdown
        self._entropy = (int(seed) % 2**63, int(stream))
        # The stream of "per-batch" draws, as simulate seeded it: replica k > 0 by "seed:k".
        self.rng = random.Random(seed if stream == 0 else f"{seed}:{stream}")
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self._stall_blocks: dict[int, tuple[list[float], list[float]]] = {}
        self._slot, self._in_slot = -1, 0
        self.stalls_met = 0  # stalls that struck a batch
        self.busy_s = 0.0  # the device's busy clock: every batch's time so far

    def batch(self, start_s: float, predicted_us: float) -> tuple[float, float]:
        """A batch predicted to take ``predicted_us`` starts at ``start_s``: its (execution_us, overhead_us).

        The execution time includes any stall that begins while the batch runs.
        """
        exec_us = predicted_us
        overhead_us = 0.0
        residuals = self.residuals
        if self.grid:
            u_ratio, u_overhead, z = self._draw(start_s)
            if residuals is not None:
                if residuals.at_s:
                    ratio, overhead_us = residuals.sample(self.rng, start_s)
                else:
                    ratio = _pick(residuals.ratios, u_ratio)
                    overhead_us = _pick(residuals.overhead_us, u_overhead) if residuals.overhead_us else 0.0
                exec_us *= ratio
            if self.noise:
                exec_us *= math.exp(-self.noise * self.noise / 2 + self.noise * z)
        else:
            if residuals is not None:
                ratio, overhead_us = residuals.sample(self.rng, start_s)
                exec_us *= ratio
            if self.noise:
                exec_us *= math.exp(self.rng.gauss(-self.noise * self.noise / 2, self.noise))
        exec_us *= self.slowdown
        if self.stalls is not None:
            on_device = self.stalls.clock == "device"
            stalled_us = self._stalled_us(self.busy_s if on_device else start_s, exec_us + overhead_us)
            exec_us += stalled_us
        self.busy_s += (exec_us + overhead_us) / 1e6
        return exec_us, overhead_us

    def _draw(self, start_s: float) -> tuple[float, float, float]:
        """The time grid's draw for the next batch starting at ``start_s``: two uniforms and a normal."""
        slot = math.floor(start_s / self.slot_s)
        if slot == self._slot:
            self._in_slot += 1
        else:
            self._slot, self._in_slot = slot, 0
        block, at = divmod(slot, _BLOCK)
        key = (block, self._in_slot)
        draws = self._blocks.get(key)
        if draws is None:
            rng = np.random.default_rng([*self._entropy, _BODY, block, self._in_slot])
            draws = np.stack([rng.random(_BLOCK), rng.random(_BLOCK), rng.standard_normal(_BLOCK)])
            if len(self._blocks) > 64:
                self._blocks.clear()  # time only moves forward: old blocks are never read again
            self._blocks[key] = draws
        return float(draws[0, at]), float(draws[1, at]), float(draws[2, at])

    def _stalled_us(self, start_s: float, busy_us: float) -> float:
        """Total length of the stalls that begin while a batch runs.

        The batch is busy for ``busy_us`` (plus the stalls) from ``start_s`` on the stalls' clock.
        """
        added_us = 0.0
        end_s = start_s + busy_us / 1e6
        t = start_s
        while True:
            begun = self._stalls_between(t, end_s)
            if not begun:
                break
            self.stalls_met += len(begun)
            extra_us = sum(begun) * 1e3
            added_us += extra_us
            t, end_s = end_s, end_s + extra_us / 1e6
        return added_us

    def _stalls_between(self, start_s: float, end_s: float) -> list[float]:
        """Lengths (ms) of the stalls beginning in ``[start_s, end_s)``."""
        lengths: list[float] = []
        for block in range(math.floor(start_s / _STALL_BLOCK_S), math.floor(end_s / _STALL_BLOCK_S) + 1):
            times, lens = self._stall_block(block)
            lo, hi = bisect.bisect_left(times, start_s), bisect.bisect_left(times, end_s)
            lengths += lens[lo:hi]
        return lengths

    def _stall_block(self, block: int) -> tuple[list[float], list[float]]:
        """The stall instants (ascending) and lengths of one second of virtual time."""
        hit = self._stall_blocks.get(block)
        if hit is None:
            assert self.stalls is not None
            rng = np.random.default_rng([*self._entropy, _STALL, block])
            count = int(rng.poisson(self.stalls.rate_per_s * _STALL_BLOCK_S))
            times = sorted((block + float(u)) * _STALL_BLOCK_S for u in rng.random(count))
            picks = rng.integers(0, len(self.stalls.lengths_ms), count)
            hit = (times, [self.stalls.lengths_ms[int(i)] for i in picks])
            if len(self._stall_blocks) > 64:  # batches never look back more than a block
                for old in [b for b in self._stall_blocks if b < block - 1]:
                    del self._stall_blocks[old]
            self._stall_blocks[block] = hit
        return hit


def _pick(values: Sequence[float], u: float) -> float:
    """The value at uniform ``u`` in [0, 1) of a sample (each equally likely)."""
    return values[min(int(u * len(values)), len(values) - 1)]
