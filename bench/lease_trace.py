"""``python -m bench.lease_trace``: elastic jobs with masonry vs fixed-length jobs
over a trace of leases, on a compressed time scale, in one run.

The trace: ``--leases`` (30) leases whose time limits are spread geometrically
from 10 minutes to two days (a fixed seed shuffles their order), each on the
whole node (``--cores``, default all). Time is compressed: one lease-hour
lasts ``--hour`` wall seconds (0.25), so a two-day lease runs 12 s. Work is
real: an event burns one lease-minute of one core in a ``/bin/sh`` loop
(calibrated at start; ``/bin/sh`` so a task's own start costs well under a
millisecond), ``--events-per-task`` (6) events per task, one task per run of
the command, every task a real child process of the gather.

Both modes run the same runner code (``runner.masonry``, ``runner.node_run``)
with the confinement a root node uses (tasks as ``nobody``, a memory cgroup
per job from the lease's memory), and both are ended by a watchdog at the
lease's end, like a batch system: a job still running then is *killed by the
lease* (its tasks are cut at once) and all its CPU counts as wasted.

* elastic: a queue of elastic specs (``max_events`` unbounded, safety 0.8);
  the pilot sizes each job to the time left (the measured work per event is
  learned across leases), keeps filling the lease while a job of
  ``min_events`` (one task) fits, and each job stops dispatch when its next
  task would not end before the lease does;
* baseline: jobs of a fixed event count (``--baseline-hours`` of the whole
  node, 8), run back to back as before elastic jobs, until the lease kills
  the one running at its end.

Figures: utilisation = CPU time of committed tasks / (cores x lease time),
summed over the trace (idle cores and killed jobs are the loss), and the same
relative to the machine's capacity: before each lease, ``cores`` CPU-bound
loops run for ``--probe-seconds`` and the CPU time they get per core and wall
second is the most any workload can get then (on the VM this was written on,
two busy processes get 85-95 % of 2 x wall, varying with the host's load,
with no steal time reported to the guest; one gets 100 %); jobs killed
by the lease; scatter overhead per task = the gather's own busy time (scatter,
reaping, the commit's renames and fsyncs, bookkeeping), outside waiting and
outside starting the command (``Popen``: fork/exec, shown apart), per task
run. A dispatch microbenchmark (``--dispatch-tasks`` instant tasks) gives the
same overhead with nothing else running, and the same loop polling every 5 ms
instead of waking on pidfds, as the loop was before.

Where things are: :mod:`bench.lease_trace_accounting` (the parameters, the CPU
accounting), :mod:`bench.lease_trace_modes` (one lease in each mode, the probes),
:mod:`bench.lease_trace_report` (the markdown); this module runs the trace and is
the command line.

Writes ``bench/results/lease_trace.json`` and ``bench/results/LEASE_TRACE.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.lease_trace_accounting import CpuUsage, Params, lease_hours, mode_totals
from bench.lease_trace_modes import WORK, Trace
from bench.lease_trace_report import markdown
from bench.report import machine
from bench.util import ROOT, say

RESULTS = ROOT / "bench" / "results"
GiB = 1 << 30


def parse_args(argv: list[str] | None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m bench.lease_trace", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="12 leases, 1 lease-hour = 0.1 s")
    ap.add_argument("--leases", type=int)
    ap.add_argument("--hour", type=float, help="wall seconds per lease-hour (0.25)")
    ap.add_argument("--min-hours", type=float, default=1 / 6)
    ap.add_argument("--max-hours", type=float, default=48.0)
    ap.add_argument("--events-per-task", type=int, default=48)
    ap.add_argument("--baseline-hours", type=float, default=8.0)
    ap.add_argument("--safety", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-per-core-gib", type=float, default=2.0)
    ap.add_argument("--dispatch-tasks", type=int)
    ap.add_argument(
        "--reserve", type=float, default=0.03, help="seconds a job keeps before the lease end"
    )
    ap.add_argument(
        "--probe-seconds", type=float, default=0.4, help="machine-capacity probe before each lease"
    )
    a = ap.parse_args(argv)
    return Params(
        leases=a.leases or (12 if a.quick else 30),
        min_hours=a.min_hours,
        max_hours=a.max_hours,
        hour=a.hour or (0.1 if a.quick else 0.25),
        events_per_task=a.events_per_task,
        baseline_hours=a.baseline_hours,
        safety=a.safety,
        seed=a.seed,
        cores=a.cores,
        memory_per_core=int(a.memory_per_core_gib * GiB),
        dispatch_tasks=a.dispatch_tasks or (500 if a.quick else 2000),
        reserve=a.reserve,
        probe_seconds=a.probe_seconds,
    )


def from_bench_run(quick: bool, only: list[str] | None) -> int:
    """The hook ``python -m bench.run`` (``make bench``) calls: the lease trace,
    unless ``--only`` names other sections."""
    if only and "lease" not in only:
        return 0
    argv = ["--quick"] if quick else []
    return main(argv, command="python -m bench.run " + shlex.join(sys.argv[1:]))


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    p = parse_args(argv)
    started = time.monotonic()
    trace = Trace(p)
    trace.prepare()
    hours = lease_hours(p)
    total_wall = 2 * p.hour * sum(hours)
    say(f"{p.leases} leases, {sum(hours):.0f} lease-hours: about {total_wall:.0f} s for both modes")
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows: list[dict[str, Any]] = []
    modes: dict[str, dict[str, Any]] = {}
    for mode in ("elastic", "baseline"):
        results = []
        with CpuUsage() as usage:
            for i, h in enumerate(hours):
                capacity = trace.capacity()
                with CpuUsage() as lease_usage:
                    r = trace.elastic(i, h) if mode == "elastic" else trace.baseline(i, h)
                r.process_cpu = lease_usage.gather_cpu
                r.span = lease_usage.wall
                r.capacity = capacity
                r.others_cpu = max(
                    0.0,
                    lease_usage.machine_busy
                    - (r.useful_cpu + r.wasted_cpu)
                    - lease_usage.gather_cpu,
                )
                results.append(r)
                say(
                    f"{mode} lease {i + 1}/{len(hours)} ({h:.2f} h, {r.wall:.2f} s): "
                    f"{r.jobs} jobs, {r.events} events, {r.utilisation(p.cores):.1%}"
                    + (f", {r.jobs_killed} killed" if r.jobs_killed else "")
                )
        totals = mode_totals(results, p.cores, p.event_seconds)
        totals["process_cpu_seconds"] = usage.gather_cpu
        totals["wall_seconds"] = usage.wall
        modes[mode] = totals
        for i, r in enumerate(results):
            if mode == "elastic":
                rows.append({"hours": r.hours})
            rows[i][mode] = {**asdict(r), "utilisation": r.utilisation(p.cores)}
    say("dispatch microbenchmark")
    dispatch, dispatch_polling = trace.dispatch()
    e = modes["elastic"]
    goals = {
        "utilisation": e["utilisation"] >= 0.97,
        "utilisation_of_capacity": e["utilisation_of_capacity"] >= 0.97,
        "no_job_killed": e["jobs_killed_by_lease"] == 0,
        "overhead": e["dispatch_cpu_ms_per_task"] < 1.0
        and dispatch["dispatch_cpu_ms_per_task"] < 1.0,
    }
    user = trace.confinement.user
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "command": command
        or "python -m bench.lease_trace " + shlex.join(sys.argv[1:] if argv is None else argv),
        "loadavg_start": loadavg,
        "job_user": str(user) if user else f"uid {os.geteuid()} (not root: no switch)",
        "memory_limit": f"{p.memory_per_core * p.cores} bytes per job (a cgroup per job,"
        " or RLIMIT_DATA per task without cgroups)",
        "runtime_seconds": time.monotonic() - started,
        "notes": [
            "A job killed by the lease loses all its CPU (its output never leaves the node);"
            " an elastic job that stopped itself at the lease end keeps its committed events"
            " and goes back to the queue.",
            "Idle time after the pilot stops (nothing fits any more) is not waited for: it"
            " counts as lost in the utilisation.",
            "Utilisation counts the CPU of committed tasks, including each task's own start"
            " (the launcher sh + setpriv and burn.sh's /bin/sh, ~2 ms of CPU per task);"
            " the gather's own CPU is reported apart.",
            "The overhead goal is checked on the gather's CPU time: on this shared 2-core"
            " machine its wall time also counts being preempted by the tasks (which keep"
            " both cores busy) and by other processes; both are shown.",
            "Capacity: before each lease, as many CPU-bound loops as cores run for"
            f" {p.probe_seconds} s; the CPU time they get / (cores x wall) is what any"
            " workload could get then. On a dedicated node it is 100 %; on this VM the"
            " host takes a varying share of the second vCPU (no steal time is reported).",
            "The CPU of other processes is what /proc/stat shows busy minus our tasks"
            " (wait4) and this process, over each lease; it includes kernel threads"
            " (e.g. ext4 journal commits for our fsyncs).",
        ],
    }
    record = {
        "meta": meta,
        "params": {**asdict(p), "event_seconds": p.event_seconds},
        "burn_turns": trace.turns,
        "burn_turns_per_cpu_second": trace.turns_per_second,
        "elastic": modes["elastic"],
        "baseline": modes["baseline"],
        "dispatch": dispatch,
        "dispatch_polling": dispatch_polling,
        "goals": goals,
        "leases": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lease_trace.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    (RESULTS / "LEASE_TRACE.md").write_text(text)
    shutil.rmtree(WORK, ignore_errors=True)
    sys.stdout.write(text)
    say("wrote bench/results/lease_trace.json and bench/results/LEASE_TRACE.md")
    if not all(goals.values()):
        say("goal(s) missed: " + ", ".join(k for k, v in goals.items() if not v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
