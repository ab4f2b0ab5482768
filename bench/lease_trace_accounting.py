"""The lease trace's parameters and its CPU accounting (``python -m bench.lease_trace``).

:class:`Params` is the trace (how many leases, how long, the compressed clock, the
node); :func:`lease_hours` spreads the leases' time limits.  :class:`LeaseResult` sums
one lease's job reports: a job killed by the lease (``stopped == LEASE_ENDED``) loses
all its CPU, a job that stopped itself keeps its committed events.  :class:`CpuUsage`
measures this process's and the whole machine's CPU over a span (``/proc/stat`` and
``getrusage``), and :func:`mode_totals` sums a mode's leases into the record's figures.
Nothing here starts a process.
"""

from __future__ import annotations

import os
import random
import resource
import time
from dataclasses import dataclass
from typing import Any

from runner.node_run import RunReport

LEASE_ENDED = "lease ended"


@dataclass(frozen=True)
class Params:
    leases: int
    min_hours: float
    max_hours: float
    hour: float  # wall seconds per lease-hour
    events_per_task: int
    baseline_hours: float
    safety: float
    seed: int
    cores: int
    memory_per_core: int
    dispatch_tasks: int
    reserve: float  # seconds a job keeps before the lease end (compressed: not 1 s)
    probe_seconds: float  # length of each machine-capacity probe

    @property
    def event_seconds(self) -> float:
        """CPU seconds of one event: one lease-minute of one core."""
        return self.hour / 60.0


def lease_hours(p: Params) -> list[float]:
    """Time limits spread geometrically over [min_hours, max_hours], shuffled."""
    n = p.leases
    ratio = (p.max_hours / p.min_hours) ** (1 / max(1, n - 1))
    hours = [p.min_hours * ratio**i for i in range(n)]
    random.Random(p.seed).shuffle(hours)
    return hours


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


class CpuUsage:
    """CPU used by this process, its children, and the whole machine over a span."""

    def __enter__(self) -> CpuUsage:
        self.busy0, self.total0 = system_busy()
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.wall0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, _ = system_busy()
        s = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.monotonic() - self.wall0
        self.machine_busy = busy1 - self.busy0
        self.gather_cpu = (s.ru_utime + s.ru_stime) - (self.self0.ru_utime + self.self0.ru_stime)


@dataclass
class LeaseResult:
    hours: float
    wall: float  # the lease's length in wall seconds
    jobs: int = 0
    jobs_complete: int = 0
    jobs_killed: int = 0
    jobs_stopped_at_end: int = 0
    events: int = 0
    useful_cpu: float = 0.0
    wasted_cpu: float = 0.0
    task_runs: int = 0
    dispatch_seconds: float = 0.0
    dispatch_cpu_seconds: float = 0.0
    spawn_seconds: float = 0.0
    commit_seconds: float = 0.0
    gather_cpu_seconds: float = 0.0
    ran_seconds: float = 0.0  # until the pilot stopped (elastic) or the lease ended
    pilot_stopped: str = ""
    others_cpu: float = 0.0  # other processes (and kernel threads) during the lease
    process_cpu: float = 0.0  # this whole process (gather, pilot, bench) during the lease
    span: float = 0.0  # wall seconds measured (the run, its set-up and clean-up)
    capacity: float = 1.0  # the machine's capacity measured just before the lease

    def add(self, r: dict[str, Any] | RunReport) -> None:
        d: dict[str, Any] = r if isinstance(r, dict) else r.to_json()
        self.jobs += 1
        self.task_runs += int(d["task_runs"])
        self.dispatch_seconds += float(d["dispatch_seconds"])
        self.dispatch_cpu_seconds += float(d["dispatch_cpu_seconds"])
        self.spawn_seconds += float(d["spawn_seconds"])
        self.commit_seconds += float(d["commit_seconds"])
        self.gather_cpu_seconds += float(d["gather_cpu_seconds"])
        cpu, committed = float(d["cpu_seconds"]), float(d["cpu_seconds_committed"])
        if d["stopped"] == LEASE_ENDED:
            self.jobs_killed += 1
            self.wasted_cpu += cpu  # a killed job's output is lost
            return
        if d["complete"]:
            self.jobs_complete += 1
        elif d["stopped"]:
            self.jobs_stopped_at_end += 1  # stopped itself: committed events kept
        self.events += int(d["events_done"])
        self.useful_cpu += committed
        self.wasted_cpu += cpu - committed

    def utilisation(self, cores: int) -> float:
        return self.useful_cpu / (cores * self.wall)

    def others_in_lease(self, cores: int) -> float:
        """Other processes' CPU over the lease, at the rate measured over the span."""
        if self.span <= 0:
            return 0.0
        return min(cores * self.wall, self.others_cpu * self.wall / self.span)


def mode_totals(results: list[LeaseResult], cores: int, event_seconds: float) -> dict[str, Any]:
    lease_core_seconds = cores * sum(r.wall for r in results)
    useful = sum(r.useful_cpu for r in results)
    runs = sum(r.task_runs for r in results)
    others = sum(r.others_in_lease(cores) for r in results)
    return {
        "utilisation": useful / lease_core_seconds,
        "capacity": sum(r.capacity * r.wall for r in results) / sum(r.wall for r in results),
        "capacity_min": min(r.capacity for r in results),
        "capacity_max": max(r.capacity for r in results),
        "utilisation_of_capacity": useful / sum(cores * r.wall * r.capacity for r in results),
        "others_cpu_seconds_in_leases": others,
        "useful_cpu_seconds": useful,
        "wasted_cpu_seconds": sum(r.wasted_cpu for r in results),
        "lease_core_seconds": lease_core_seconds,
        "jobs": sum(r.jobs for r in results),
        "jobs_complete": sum(r.jobs_complete for r in results),
        "jobs_killed_by_lease": sum(r.jobs_killed for r in results),
        "jobs_stopped_at_lease_end": sum(r.jobs_stopped_at_end for r in results),
        "leases_with_a_kill": sum(1 for r in results if r.jobs_killed),
        "events": sum(r.events for r in results),
        "task_runs": runs,
        "dispatch_ms_per_task": sum(r.dispatch_seconds for r in results) / max(1, runs) * 1e3,
        "dispatch_cpu_ms_per_task": sum(r.dispatch_cpu_seconds for r in results)
        / max(1, runs)
        * 1e3,
        "spawn_ms_per_task": sum(r.spawn_seconds for r in results) / max(1, runs) * 1e3,
        "commit_ms_per_task": sum(r.commit_seconds for r in results) / max(1, runs) * 1e3,
        "gather_cpu_ms_per_task": sum(r.gather_cpu_seconds for r in results) / max(1, runs) * 1e3,
    }
