"""The two modes of ``python -m bench.lease_trace`` on one lease, and the machine probes.

:class:`Trace` runs one lease as ``elastic`` (a queue of elastic specs through
``runner.masonry.run_pilot``) or as ``baseline`` (fixed-length jobs back to back
through ``runner.node_run.run_job``); both are ended by a watchdog at the lease's end
like a batch system, with the confinement a root node uses.  The work is real:
``burn.sh`` burns a calibrated number of loop turns per event (:func:`calibrate`).
:meth:`Trace.capacity` probes what CPU the machine gives busy loops right now, and
:meth:`Trace.dispatch` is the gather's overhead on instant tasks, event driven and
polling.  Everything runs below ``WORK``, which :meth:`Trace.prepare` recreates.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

from bench.lease_trace_accounting import LEASE_ENDED, LeaseResult, Params
from bench.util import ROOT, say
from runner.confine import Confinement
from runner.job_user import job_user_for_node
from runner.lease import Lease
from runner.masonry import run_pilot
from runner.node_run import RunReport, run_job
from runner.sizing import WorkHistory
from runner.spec import parse_spec
from runner.stop import StopRequest

WORK = ROOT / "bench" / "work" / "lease_trace"

BURN = """\
#!/bin/sh
# burn.sh FIRST COUNT OUTPUT ITERATIONS: COUNT synthetic events of ITERATIONS loop turns each
n=$1
end=$(($1 + $2))
it=$4
exec > "$3"
while [ "$n" -lt "$end" ]; do
    i=0
    while [ "$i" -lt "$it" ]; do i=$((i + 1)); done
    echo "event $n"
    n=$((n + 1))
done
"""


def _cpu_of(argv: list[str]) -> float:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def calibrate(burn: Path) -> float:
    """Loop turns of burn.sh per CPU second (median of 3; start cost removed)."""
    turns = 300_000
    rates = []
    for _ in range(3):
        empty = _cpu_of(["/bin/sh", str(burn), "0", "1", "/dev/null", "0"])
        full = _cpu_of(["/bin/sh", str(burn), "0", "1", "/dev/null", str(turns)])
        rates.append(turns / max(1e-6, full - empty))
    return sorted(rates)[1]


class Trace:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.burn = WORK / "burn.sh"
        self.history = WorkHistory(WORK / "work_per_event.json")
        self.confinement = Confinement(user=job_user_for_node())

    def prepare(self) -> None:
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        WORK.chmod(0o755)  # the job user runs burn.sh and writes below
        self.burn.write_text(BURN)
        self.burn.chmod(0o755)
        self.turns_per_second = calibrate(self.burn)
        self.turns = max(1, round(self.turns_per_second * self.p.event_seconds))
        say(
            f"burn.sh: {self.turns_per_second:,.0f} loop turns per CPU second; "
            f"an event = {self.turns} turns = {self.p.event_seconds * 1e3:.2f} ms of CPU"
        )

    def capacity(self) -> float:
        """CPU time ``cores`` CPU-bound loops get per core and wall second.

        The reference for utilisation: on this VM two busy processes get
        ~85-95 % of 2 x wall in CPU time, varying with the host's load (no
        steal time is reported to the guest), one gets ~100 %.
        """
        turns = str(round(self.turns_per_second * self.p.probe_seconds))
        t0 = time.monotonic()
        procs = [
            subprocess.Popen(["/bin/sh", str(self.burn), "0", "1", "/dev/null", turns])
            for _ in range(self.p.cores)
        ]
        cpu = 0.0
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
        return min(1.0, cpu / (self.p.cores * (time.monotonic() - t0)))

    def spec_data(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "command": [
                "/bin/sh",
                str(self.burn),
                "{first}",
                "{count}",
                "{output}",
                str(self.turns),
            ],
            # HS06.s at 1 HS06 per core: CPU seconds per event
            "cpu_work_per_event": self.p.event_seconds,
            "max_events": 10**9,
            "min_events": 2 * self.p.cores,
            "events_per_task": self.p.events_per_task,
            "safety": self.p.safety,
        }

    def lease(self, wall: float, t0: float) -> Lease:
        return Lease(
            cores=self.p.cores,
            power_per_core=1.0,
            time_left=wall,
            memory=self.p.memory_per_core * self.p.cores,
            now=t0,
            sources={"time_left": "trace"},
        )

    def elastic(self, i: int, hours: float) -> LeaseResult:
        res = LeaseResult(hours, hours * self.p.hour)
        base = WORK / f"elastic-{i:02d}"
        queue = base / "queue"
        queue.mkdir(parents=True)
        (base / "work").mkdir()
        base.chmod(0o755)
        (base / "work").chmod(0o755)
        for k in range(40):
            lines = [f"{k2} = {json.dumps(v)}" for k2, v in self.spec_data("mc-sim").items()]
            (queue / f"job-{k:03d}.toml").write_text("\n".join(lines) + "\n")
        stop = StopRequest()
        watchdog = threading.Timer(res.wall, stop.request, args=(LEASE_ENDED, 0.0))
        t0 = time.monotonic()
        lease = self.lease(res.wall, t0)
        watchdog.start()
        try:
            pilot = run_pilot(
                queue,
                base / "work",
                lease.at,
                time.monotonic,
                history=self.history,
                stop=stop,
                grace=0.0,
                confinement=self.confinement,
                reserve_floor=self.p.reserve,
            )
        finally:
            watchdog.cancel()
        res.ran_seconds = time.monotonic() - t0
        res.pilot_stopped = pilot.stopped
        for job in pilot.jobs_run:
            res.add(job)
        shutil.rmtree(base, ignore_errors=True)
        return res

    def baseline(self, i: int, hours: float) -> LeaseResult:
        res = LeaseResult(hours, hours * self.p.hour)
        base = WORK / f"baseline-{i:02d}"
        base.mkdir()
        base.chmod(0o755)
        events = round(self.p.baseline_hours * 60 * self.p.cores)
        spec = parse_spec({**self.spec_data("fixed"), "min_events": 1})
        stop = StopRequest()
        watchdog = threading.Timer(res.wall, stop.request, args=(LEASE_ENDED, 0.0))
        t0 = time.monotonic()
        watchdog.start()
        try:
            j = 0
            while not stop.requested:
                report = run_job(
                    spec,
                    events,
                    base / f"job-{j:03d}",
                    cores=self.p.cores,
                    stop=stop,
                    grace=0.0,
                    memory=self.p.memory_per_core * self.p.cores,
                    confinement=self.confinement,
                )
                res.add(report)
                j += 1
        finally:
            watchdog.cancel()
        res.ran_seconds = time.monotonic() - t0
        shutil.rmtree(base, ignore_errors=True)
        return res

    def dispatch(self) -> tuple[dict[str, float], dict[str, float]]:
        """Instant tasks: the gather's overhead with nothing else to do, woken by
        pidfds and polling every 5 ms, in alternating runs (the machine's load
        drifts), summed per loop."""
        spec = parse_spec(
            {
                "name": "instant",
                "command": [
                    *("/bin/sh", "-c", 'echo "event $1" > "$3"', "sh"),
                    *("{first}", "{count}", "{output}"),
                ],
                "cpu_work_per_event": 1.0,
                "max_events": 10**9,
                "events_per_task": 1,
            }
        )
        runs: dict[bool, list[RunReport]] = {False: [], True: []}
        rounds = 4
        for k in range(2 * rounds):
            polling = k % 2 == 1
            work = WORK / f"dispatch-{k}"
            work.mkdir()
            work.chmod(0o755)
            no_pidfd = mock.patch.object(os, "pidfd_open", side_effect=OSError("disabled"))
            with no_pidfd if polling else contextlib.nullcontext():
                r = run_job(
                    spec,
                    self.p.dispatch_tasks // rounds,
                    work,
                    cores=self.p.cores,
                    memory=self.p.memory_per_core * self.p.cores,
                    confinement=self.confinement,
                    poll_interval=0.005,
                )
            shutil.rmtree(work, ignore_errors=True)
            assert r.complete, r.failures[:3]
            runs[polling].append(r)

        def summary(rs: list[RunReport]) -> dict[str, float]:
            n = sum(r.task_runs for r in rs)
            wall = sum(r.wall_seconds for r in rs)
            return {
                "tasks": n,
                "dispatch_ms_per_task": sum(r.dispatch_seconds for r in rs) / n * 1e3,
                "dispatch_cpu_ms_per_task": sum(r.dispatch_cpu_seconds for r in rs) / n * 1e3,
                "spawn_ms_per_task": sum(r.spawn_seconds for r in rs) / n * 1e3,
                "commit_ms_per_task": sum(r.commit_seconds for r in rs) / n * 1e3,
                "gather_cpu_ms_per_task": sum(r.gather_cpu_seconds for r in rs) / n * 1e3,
                "wall_ms_per_task": wall / n * 1e3,
                "tasks_per_second": n / wall,
            }

        return summary(runs[False]), summary(runs[True])
