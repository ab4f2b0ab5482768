"""One elastic job: size it to the lease just in time, run it, learn its cost.

The order matters: sizing happens before anything is created, so a refused
job leaves no trace; the measured HS06.s per event is recorded only from a
run that committed events, and it feeds the next sizing of the same job name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.confine import Confinement
from runner.lease import Lease
from runner.node_run import RunReport, StopRequest, run_job
from runner.sizing import Sizing, WorkHistory, size_job
from runner.spec import JobSpec

_RESERVE = 0.01
_RESERVE_MAX = 60.0


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
    whole_rounds: bool = False,
) -> ElasticResult:
    """Size ``spec`` to ``lease`` and run it on ``lease.cores`` workers.

    The lease's memory limits the whole job, confined as ``confinement``
    says; the lease's end (less a reserve for the gather, 1 % of the time
    left, at most a minute) is the run's deadline, so the job stops itself
    with its committed events rather than being killed by the lease.

    With ``whole_rounds`` (masonry, where the next job takes what is left), a
    job bound by the lease rather than by ``max_events`` runs a whole number
    of rounds (``cores x events_per_task`` events) when at least one fits, so
    that its workers finish their last tasks together instead of one core
    idling through another's last task.

    Raises:
        JobRefused: fewer than ``min_events`` fit; nothing was run or created.
        JournalError, TaskError, ConfinementError: see
            :func:`runner.node_run.run_job`.
    """
    measured = history.measured(spec.name) if history is not None else None
    sizing = size_job(spec, lease, measured)
    events = sizing.events
    round_ = lease.cores * spec.events_per_task
    if whole_rounds and sizing.capacity < spec.max_events and events >= round_:
        events = max(spec.min_events, events - events % round_)
    reserve = min(_RESERVE_MAX, _RESERVE * lease.time_left)
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
        task_estimate=sizing.cpu_work_per_event / lease.power_per_core * spec.events_per_task,
        clock=clock,
    )
    work: float | None = None
    # A resumed run's CPU time covers only part of its events: measure fresh runs only.
    new_events = 0 if report.resumed_tasks else report.events_done
    if history is not None and new_events > 0 and report.cpu_seconds > 0:
        work = history.record(spec.name, report.cpu_seconds, lease.power_per_core, new_events)
    return ElasticResult(sizing=sizing, report=report, measured_work_per_event=work)
