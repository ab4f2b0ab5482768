"""The runner's subcommands (``swarm lease``, ``swarm job run``, ``swarm pilot``).

``add_runner_commands`` registers them on the ``swarm`` parser.  Handlers
return 0 done, 3 job refused (nothing ran), 4 job stopped or incomplete, and
raise :class:`RunnerError` for everything else: ``swarm``'s ``main`` (and
:func:`main` here) prints it as one line and exits with :func:`exit_status`
(2 for a bad ``[runner]`` key or option, 1 for any other error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from runner.confine import DEFAULT_CGROUP_PARENT, Confinement, cgroup_parent_problem
from runner.elastic import run_elastic_job
from runner.exceptions import JobRefused, RunnerConfigError, RunnerError
from runner.job_user import DEFAULT_JOB_USER, job_user_for_node
from runner.lease import Lease, LeaseOptions, discover_lease, lease_option, shutdown_probe
from runner.masonry import run_pilot
from runner.power import PowerCache, benchmark_power
from runner.sizing import WorkHistory
from runner.spec import load_spec
from runner.stop import StopRequest, grace_problem, stop_on_sigterm

_STATE = Path(os.environ.get("SWARM_RUNNER_STATE", "/var/lib/swarm/runner"))

JOB_REFUSED = 3  # exit status of `job run`: the job does not fit the lease, nothing ran
JOB_INCOMPLETE = 4  # exit status of `job run`: stopped, or not every event done


def _lease(a: argparse.Namespace, wall_now: float, elapsed: float = 0.0) -> Lease:
    """The lease now; ``--time-left`` counts from ``elapsed`` seconds ago."""
    cache = PowerCache(_STATE / "power.json")
    time_left = None if a.time_left is None else max(0.0, a.time_left - elapsed)
    return discover_lease(
        now=wall_now,
        environ=os.environ,
        options=LeaseOptions(
            cores=a.cores, power_per_core=a.power, time_left=time_left, memory=None
        ),
        detected_cores=os.cpu_count(),
        benchmark=lambda cores: benchmark_power(cache, cores, wall_now),
    )


def _confinement(a: argparse.Namespace) -> Confinement:
    return Confinement(
        user=job_user_for_node(a.job_user),
        cgroup_parent=None if a.no_cgroup else a.cgroup_parent,
    )


def cmd_lease(a: argparse.Namespace) -> int:
    lease = _lease(a, time.time())
    if a.json:
        print(json.dumps(lease.to_json(), indent=1))
        return 0
    for name in ("cores", "power_per_core", "time_left", "memory"):
        print(f"{name:15} {getattr(lease, name)!s:>15}   from {lease.sources.get(name)}")
    for w in lease.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def cmd_job_run(a: argparse.Namespace) -> int:
    spec = load_spec(a.spec)
    lease = _lease(a, time.time())
    history = WorkHistory(_STATE / "work_per_event.json") if not a.no_history else None
    try:
        with stop_on_sigterm(StopRequest()) as stop:
            result = run_elastic_job(
                spec,
                lease,
                a.output,
                history=history,
                stop=stop,
                should_stop=shutdown_probe(os.environ, lease.deadline, time.time),
                grace=a.grace,
                confinement=_confinement(a),
            )
    except JobRefused as exc:
        if a.json:
            print(json.dumps({"refused": str(exc), "events_planned": 0, "events_done": 0}))
        print(f"swarm: {exc}", file=sys.stderr)
        return JOB_REFUSED
    out: dict[str, Any] = result.to_json()
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        r = result.report
        print(
            f"{r.job}: {r.events_done}/{r.events_planned} events, "
            f"{r.wall_seconds:.1f} s wall, {r.cpu_seconds:.1f} s CPU -> {r.output}"
        )
    return 0 if result.report.complete else JOB_INCOMPLETE


def cmd_pilot(a: argparse.Namespace) -> int:
    start_wall, start_mono = time.time(), time.monotonic()
    _lease(a, start_wall)  # a lease error ends the pilot before it starts

    def lease_at(mono: float) -> Lease:
        # Re-read before each job (and once a second while one runs): a moved
        # MJF shutdowntime stops the job and re-sizes the next.
        elapsed = mono - start_mono
        return _lease(a, start_wall + elapsed, elapsed)

    with stop_on_sigterm(StopRequest()) as stop:
        report = run_pilot(
            a.queue,
            a.work or Path(a.queue) / "work",
            lease_at,
            time.monotonic,
            history=WorkHistory(_STATE / "work_per_event.json"),
            stop=stop,
            grace=a.grace,
            confinement=_confinement(a),
        )
    print(json.dumps(report.to_json(), indent=1))
    return 0


def _grace(text: str) -> float:
    """argparse ``type=`` for ``--grace``: seconds from 0 to ``MAX_GRACE``."""
    try:
        value: object = float(text)
    except ValueError:
        value = text
    problem = grace_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    assert isinstance(value, float)
    return value


def _cgroup_parent(text: str) -> str:
    problem = cgroup_parent_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _lease_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cores", type=lease_option("cores"), help="cores of the lease (default: discovered)"
    )
    p.add_argument(
        "--time-left", type=lease_option("time_left"), metavar="SECONDS", help="seconds left"
    )
    p.add_argument(
        "--power",
        type=lease_option("power_per_core"),
        metavar="HS06_PER_CORE",
        help="HS06 per core",
    )


def _confinement_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--job-user",
        default=DEFAULT_JOB_USER,
        metavar="USER",
        help=f"user tasks run as when the node runs as root (default {DEFAULT_JOB_USER})",
    )
    p.add_argument(
        "--cgroup-parent",
        type=_cgroup_parent,
        default=DEFAULT_CGROUP_PARENT,
        metavar="NAME",
        help=f"swarm-owned parent of the jobs' memory cgroups (default {DEFAULT_CGROUP_PARENT})",
    )
    p.add_argument(
        "--no-cgroup", action="store_true", help="limit memory per task with RLIMIT_DATA only"
    )


def add_runner_commands(sub: Any) -> Any:
    """Register ``lease``, ``job run`` and ``pilot`` on a subparsers object;
    returns ``job``'s subparsers (``swarm`` adds the node's queue commands there)."""
    s = sub.add_parser("lease", help="what this node advertises, and where each value came from")
    _lease_options(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lease)

    job = sub.add_parser("job", help="elastic jobs; a node's queue (elastic and VM jobs)")
    jsub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    s = jsub.add_parser("run", help="size one elastic job to the lease and run it now")
    s.add_argument("spec", type=Path)
    _lease_options(s)
    s.add_argument("--output", required=True, type=Path, help="the job's work directory")
    s.add_argument("--grace", type=_grace, default=10.0, help="seconds for tasks on SIGTERM")
    s.add_argument("--no-history", action="store_true", help="ignore measured work per event")
    s.add_argument("--json", action="store_true")
    _confinement_options(s)
    s.set_defaults(func=cmd_job_run)

    s = sub.add_parser("pilot", help="fill the lease with jobs from a queue directory")
    s.add_argument("queue", type=Path)
    s.add_argument("--work", type=Path, help="work directories (default QUEUE/work)")
    s.add_argument("--grace", type=_grace, default=10.0, help="seconds for tasks on SIGTERM")
    _lease_options(s)
    _confinement_options(s)
    s.set_defaults(func=cmd_pilot)
    return jsub


def exit_status(exc: RunnerError) -> int:
    """The exit status for a runner error: 2 for misuse (a bad key or option), else 1."""
    return 2 if isinstance(exc, RunnerConfigError) else 1


def main(argv: list[str] | None = None) -> int:
    """The runner's commands on their own (tests; ``swarm.cli`` wires the same)."""
    p = argparse.ArgumentParser(prog="swarm")
    add_runner_commands(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    try:
        code: int = a.func(a)
        return code
    except RunnerError as exc:
        print(f"swarm: {exc}", file=sys.stderr)
        return exit_status(exc)
