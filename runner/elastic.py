"""One elastic job: size it to the lease just in time, run it, learn its cost.

The order matters: sizing happens before anything is created, so a refused
job leaves no trace; the measured HS06.s per event is recorded only from a
run that committed events, and it feeds the next sizing of the same job name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from runner.confine import Confinement
from runner.exceptions import JobRefused
from runner.lease import Lease
from runner.node_run import RunReport, run_job
from runner.sizing import Sizing, WorkHistory, size_job
from runner.spec import JobSpec
from runner.stop import StopRequest

# What a job keeps of its lease for cutting, gathering and reporting:
# 1 % of the time left, at least END_RESERVE (tunable: a compressed-time
# benchmark uses less), at most a minute.
_RESERVE = 0.01
_RESERVE_MAX = 60.0
END_RESERVE = 1.0


def end_reserve(time_left: float, floor: float = END_RESERVE) -> float:
    """Seconds before the lease's end by which a job's tasks must be done."""
    return min(_RESERVE_MAX, max(floor, _RESERVE * time_left))


@dataclass(frozen=True)
class ElasticResult:
    sizing: Sizing
    report: RunReport
    measured_work_per_event: float | None

    def to_json(self) -> dict[str, object]:
        return {
            **self.report.to_json(),
            "cpu_work_per_event_used": self.sizing.cpu_work_per_event,
            "cpu_work_per_event_source": self.sizing.work_source,
            "cpu_work_per_event_measured": self.measured_work_per_event,
        }


def run_elastic_job(
    spec: JobSpec,
    lease: Lease,
    workdir: str | Path,
    *,
    history: WorkHistory | None = None,
    stop: StopRequest | None = None,
    should_stop: Callable[[], str | None] | None = None,
    grace: float = 10.0,
    confinement: Confinement | None = None,
    clock: Callable[[], float] = time.monotonic,
    masonry: bool = False,
    reserve_floor: float = END_RESERVE,
    seconds_per_event: float | None = None,
) -> ElasticResult:
    """Size ``spec`` to ``lease`` and run it on ``lease.cores`` workers.

    The lease's memory limits the whole job, confined as ``confinement``
    says; the lease's end less :func:`end_reserve` is the run's deadline, so
    the job stops itself with its committed events rather than being killed
    by the lease.

    With ``masonry`` (a pilot, where the next job takes what is left), the
    job is sized to the time left less the reserve, and a job bound by the
    lease rather than by ``max_events`` runs a whole number
    of rounds (``cores x events_per_task`` events) when at least one fits, so
    that its workers finish their last tasks together instead of one core
    idling through another's last task; a job of less than one round gets
    smaller tasks, one per worker, so that the end of a lease is filled too.
    ``seconds_per_event`` (wall time per event of a task, measured by an
    earlier run of the same job type) is how long a task is expected to take
    before this run has measured its own; in masonry it also bounds the size:
    ``safety x usable time x cores / seconds_per_event``.

    Raises:
        JobRefused: fewer than ``min_events`` fit; nothing was run or created.
        JournalError, TaskError, ConfinementError: see
            :func:`runner.node_run.run_job`.
    """
    measured = history.measured(spec.name) if history is not None else None
    reserve = end_reserve(lease.time_left, reserve_floor)
    if masonry:
        sizing = size_job(
            spec, replace(lease, time_left=max(0.0, lease.time_left - reserve)), measured
        )
    else:
        sizing = size_job(spec, lease, measured)
    events = sizing.events
    if masonry and seconds_per_event:
        # The measured pace also counts what CPU work per event does not:
        # starting tasks, the gather, other processes taking cores.
        usable = max(0.0, lease.time_left - reserve)
        paced = math.floor(spec.safety * usable * lease.cores / seconds_per_event + 1e-9)
        if paced < spec.min_events:
            raise JobRefused(
                f"job {spec.name!r} refused: only {paced} events fit the lease at the "
                f"measured pace of {seconds_per_event:.3g} s per event per core "
                f"(min_events {spec.min_events})",
                events=paced,
                min_events=spec.min_events,
            )
        events = min(events, paced)
    round_ = lease.cores * spec.events_per_task
    if masonry and sizing.capacity < spec.max_events:
        if events >= round_:
            events = max(spec.min_events, events - events % round_)
        else:  # less than a round: smaller tasks, one per worker
            spec = replace(spec, events_per_task=-(-events // lease.cores))
    report = run_job(
        spec,
        events,
        workdir,
        cores=lease.cores,
        stop=stop,
        should_stop=should_stop,
        grace=grace,
        memory=lease.memory,
        confinement=confinement,
        deadline=clock() + lease.time_left - reserve,
        task_estimate=(seconds_per_event or sizing.cpu_work_per_event / lease.power_per_core)
        * spec.events_per_task,
        clock=clock,
    )
    work: float | None = None
    # A resumed run's CPU time covers only part of its events: measure fresh runs only.
    new_events = 0 if report.resumed_tasks else report.events_done
    if history is not None and new_events > 0 and report.cpu_seconds > 0:
        work = history.record(spec.name, report.cpu_seconds, lease.power_per_core, new_events)
    return ElasticResult(sizing=sizing, report=report, measured_work_per_event=work)
