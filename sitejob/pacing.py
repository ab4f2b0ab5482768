"""Whether a site range fits this node's lease, and this node's pace of a job (pure).

The worker (``sitejob/worker.py``) pulls a range only when its estimate fits
the lease: ``estimate x MARGIN <= time left - end reserve``. The estimate is
this node's smoothed wall seconds per event of the job times the range's
events, or, before any range of the job ran here,
``cpu_work_per_event / power_per_core`` per event. After each reported
range the pace moves towards the range's measured seconds per event by the
weight :data:`EWMA`.

No clock, no broker, no lease source: numbers in, numbers out.
"""

from __future__ import annotations

from runner.elastic import end_reserve

MARGIN = 1.2  # an estimate x this must fit before the lease's end (less the reserve)
EWMA = 0.3  # weight of the newest range in this node's pace of a job


def per_event(measured: float | None, cpu_work_per_event: float, power_per_core: float) -> float:
    """Estimated wall seconds per event: the measured pace, else the spec's
    work per event on one core of this node's power."""
    if measured is not None:
        return measured
    return cpu_work_per_event / power_per_core


def usable(time_left: float, reserve_floor: float) -> float:
    """Seconds from now until ranges must be done (the end reserve kept free)."""
    return time_left - end_reserve(time_left, reserve_floor)


def fits(seconds_per_event: float, count: int, usable_seconds: float) -> bool:
    """A range of ``count`` events fits in ``usable_seconds``, with the margin."""
    return seconds_per_event * count * MARGIN <= usable_seconds


def smoothed(was: float | None, measured: float) -> float:
    """The pace after a range measured at ``measured`` seconds per event."""
    return measured if was is None else (1 - EWMA) * was + EWMA * measured
