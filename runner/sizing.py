"""Event sizing: how many events a job gets, decided just in time.

    events = floor(min(max_events, safety * time_left * power_per_core * cores
                                   / cpu_work_per_event,
                       MAX_TASKS * events_per_task))

``cpu_work_per_event`` (HS06.s) comes from the spec until the job type has
been measured; afterwards the mean of the recent measurements recorded in the
:class:`WorkHistory` is used, so a spec that under- or over-states its cost is
corrected from the second run on. Fewer than ``min_events`` refuses the job.
A run has at most ``MAX_TASKS`` tasks (:mod:`runner.scatter`); a job with more
events than that gets the rest in later runs of the same spec.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runner.exceptions import JobRefused
from runner.lease import Lease
from runner.scatter import MAX_TASKS
from runner.spec import JobSpec

_HISTORY_KEEP = 5


@dataclass(frozen=True)
class Sizing:
    events: int
    cpu_work_per_event: float
    work_source: str  # "spec" or "measured (n runs)"
    capacity: float  # events the lease could hold before max_events and floor


def size_job(spec: JobSpec, lease: Lease, measured_work: float | None = None) -> Sizing:
    """Number of events for ``spec`` on ``lease``.

    Raises:
        JobRefused: fewer than ``spec.min_events`` events fit.
    """
    work = measured_work if measured_work is not None else spec.cpu_work_per_event
    source = "measured" if measured_work is not None else "spec"
    capacity = spec.safety * lease.time_left * lease.power_per_core * lease.cores / work
    task_cap = MAX_TASKS * spec.events_per_task
    # A hair of tolerance so that an exact fit is not lost to float rounding.
    events = math.floor(min(float(spec.max_events), capacity, float(task_cap)) + 1e-9)
    if events < spec.min_events:
        why = (
            f"{MAX_TASKS} tasks of {spec.events_per_task} events"
            if task_cap < spec.min_events
            else f"{lease.time_left:.0f} s left x {lease.cores} cores x "
            f"{lease.power_per_core:g} HS06 x safety {spec.safety:g} "
            f"/ {work:g} HS06.s per event from {source}"
        )
        raise JobRefused(
            f"job {spec.name!r} refused: only {events} events fit the lease "
            f"(min_events {spec.min_events}; {why})",
            events=events,
            min_events=spec.min_events,
        )
    return Sizing(events=events, cpu_work_per_event=work, work_source=source, capacity=capacity)


class WorkHistory:
    """Measured HS06.s per event, per job name, in a small JSON file; beside it
    (``<stem>.pace.json``) the measured pace of tasks on this node, wall
    seconds per event per worker, which masonry uses to size jobs.

    Writes are atomic (temporary file + rename), so a crash leaves the old
    history. An unreadable history is treated as empty: it only tunes sizing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.pace_path = self.path.with_name(f"{self.path.stem}.pace.json")

    def _load(self, path: Path | None = None) -> dict[str, list[float]]:
        try:
            data = json.loads((path or self.path).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            k: [float(x) for x in v if isinstance(x, int | float) and x > 0]
            for k, v in data.items()
            if isinstance(v, list)
        }

    def measured(self, name: str) -> float | None:
        """Mean of the recent measurements for ``name``, or None if never measured."""
        values = self._load().get(name)
        if not values:
            return None
        return sum(values) / len(values)

    def record(self, name: str, cpu_seconds: float, power_per_core: float, events: int) -> float:
        """Record one run; returns the HS06.s per event it measured."""
        if events <= 0:
            raise ValueError("events must be positive")
        work = cpu_seconds * power_per_core / events
        if work <= 0:
            return work
        self._append(self.path, name, work)
        return work

    def pace(self, name: str) -> float | None:
        """Mean recent wall seconds per event per worker of ``name``'s tasks."""
        values = self._load(self.pace_path).get(name)
        if not values:
            return None
        return sum(values) / len(values)

    def record_pace(self, name: str, seconds_per_event: float) -> None:
        if seconds_per_event > 0:
            self._append(self.pace_path, name, seconds_per_event)

    def _append(self, path: Path, name: str, value: float) -> None:
        data = self._load(path)
        data[name] = ([*data.get(name, []), value])[-_HISTORY_KEEP:]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".history.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
