"""A defect found by ``test_reassignment_never_goes_below_a_floor``: a job served silently late.

The plan put the job's finish exactly on its deadline in integer microseconds, but starts were
rounded down: the real finish was up to a microsecond later. Starts now round up
(:func:`mosel.jobs.time_us`), deadlines down.
"""

from __future__ import annotations

import mosel
from mosel.scheduler import SchedulerConfig

from .helpers import Tiny, tiny_profile

GAPS_S = (0.0, 0.001953125, 0.0014914936686189278, 0.001953125, 0.0017653756442402048, 0.0007885244266354502,
          0.0006504229296502364, 0.0, 0.0)  # fmt: skip
SIZES = (1, 5, 6, 6, 2, 1, 1, 5, 8)


def test_no_job_is_served_silently_late() -> None:
    t, trace = 0.0, []
    for gap, n in zip(GAPS_S, SIZES, strict=True):
        t += gap
        trace.append(mosel.Arrival(t, n, deadline_ms=2.4609375))
    sim = mosel.simulate(tiny_profile(Tiny()), trace, SchedulerConfig(policy="mosel"))
    assert all(r.on_time for r in sim.records if r.served)
