"""Job masonry: keep filling a lease with elastic jobs from a queue directory.

The queue is a directory of job spec files (``*.toml``). Each file is one job:
the pilot takes the first one (in name order) that still fits the time left,
moves it to ``running/`` while it runs (beside ``NAME.started``, when it
started) and to ``done/`` afterwards, beside its report. A spec that does
not fit stays queued for a node with a longer lease; a malformed spec goes
to ``rejected/`` with the reason. The pilot stops when no queued job fits
(at least ``min_events``), when the queue is empty, when jobs cannot be
confined (a node problem: the job stays queued), or when asked to stop.
A job that stopped itself at the lease's end (its next task would not have
finished in time) goes back to the queue, resumes from its journal
on a later lease, and is not retried by this pilot, which goes on with jobs
that still fit. A job stopped because the lease moved earlier cuts its
running tasks by the new end (less its end reserve) when that comes before
the grace period is over.

The clock and the lease source are injected: ``lease_at(now)`` is called
before each job, so a shutdowntime moved earlier in MJF is seen by the next
sizing.

Cores shared with site ranges: with a :class:`runner.cores.CoreLedger`,
each job takes the cores free when it starts (at least one; it waits at most
``core_wait`` seconds for site ranges to end, and site pulls pause while it
waits), is sized to them, and gives them back when it ends.

VM specs (a ``[vm]`` table; :mod:`runner.vm_jobs`): with the node's VM side,
the pilot starts a VM spec when its cores are all free and the lease has its
``min_seconds`` left, and goes on without waiting for the VM; the VM's end
files the spec in ``done/`` later. Elastic jobs take the cores left.

One owner per queue: whoever moves specs through ``running/`` (a pilot, or a
job service for its whole life) holds a :class:`QueueLock`, an ``flock`` on
``QUEUE/.lock`` that the kernel drops when its holder dies, SIGKILL included.
So a spec that the next owner finds in ``running/`` belongs to no living
process: it goes back to the queue at once and resumes from its journal
(committed tasks are kept, none is run twice).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from runner.confine import Confinement
from runner.cores import CoreLedger
from runner.elastic import END_RESERVE, end_reserve, run_elastic_job
from runner.exceptions import ConfinementError, JobRefused, JobSpecError, QueueBusy, RunnerError
from runner.lease import Lease
from runner.pid_lock import take_pid_lock
from runner.sizing import WorkHistory
from runner.spec import decode_spec, parse_spec, read_spec_file
from runner.stop import StopRequest
from runner.vm_jobs import (
    VM_SUFFIX,
    RunningVms,
    StartAnswer,
    VmJob,
    VmLauncher,
    is_vm_spec,
    vm_fit,
)
from trust.durable import write_file_atomic

log = logging.getLogger("runner.masonry")

# ``running/NAME.started`` holds when the running job NAME started (epoch
# seconds), for views of the queue (the dashboard draws running jobs from it).
STARTED_SUFFIX = ".started"


@dataclass
class PilotReport:
    jobs_run: list[dict[str, object]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    events_done: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "jobs_run": self.jobs_run,
            "refused": self.refused,
            "rejected": self.rejected,
            "stopped": self.stopped,
            "events_done": self.events_done,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
        }


class QueueLock:
    """Exclusive ownership of a queue directory (see the module docstring)."""

    def __init__(self, queue: str | Path) -> None:
        self.queue = Path(queue)
        self._fd: int | None = None

    def acquire(self) -> list[str]:
        """Take the queue and put specs orphaned in ``running/`` back into it.

        Returns the names of the specs put back.

        Raises:
            QueueBusy: another live process holds the queue.
            OSError: the queue directory cannot be created or locked.
        """
        for sub in ("", "running", "done", "rejected"):
            (self.queue / sub).mkdir(parents=True, exist_ok=True)
        self._fd = take_pid_lock(
            self.queue / ".lock",
            lambda holder: QueueBusy(
                f"queue {self.queue} is in use by another pilot or job service (pid {holder})"
            ),
        )
        return recover_orphans(self.queue)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> QueueLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def recover_orphans(queue: Path) -> list[str]:
    """Move every spec in ``running/`` back to the queue (the caller holds the
    queue, so no living process runs them). Returns their names."""
    back = []
    for suffix in (STARTED_SUFFIX, VM_SUFFIX):
        for stale in (queue / "running").glob(f"*{suffix}"):
            stale.unlink(missing_ok=True)  # its job (or VM) is not running any more
    for spec in sorted((queue / "running").glob("*.toml")):
        target = queue / spec.name
        if target.exists():  # never clobber a spec: keep the queued one
            log.warning(
                "job %s is both queued and orphaned in running/: kept queued",
                spec.stem,
                extra={"job": spec.stem},
            )
            continue
        os.replace(spec, target)
        back.append(spec.name)
        log.warning(
            "job %s was running when its runner died: queued again",
            spec.stem,
            extra={"job": spec.stem},
        )
    if back:
        fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return back


def _reject(qdir: Path, current: Path, spec: Path, reason: str) -> None:
    write_file_atomic(qdir / "rejected" / f"{spec.stem}.reason", (reason + "\n").encode())
    os.replace(current, qdir / "rejected" / spec.name)


class _JobStop:
    """One job's stop request: the pilot's stop, forwarded (its reason and
    grace), or this job's own (the lease moved earlier: the job stops, the
    pilot goes on).  ``close`` when the job is over."""

    def __init__(self, pilot: StopRequest) -> None:
        self.pilot = pilot
        self.request = StopRequest()
        pilot.subscribe(self._forward)
        if pilot.requested:
            self._forward()

    def _forward(self) -> None:
        self.request.request(self.pilot.reason or "stop", self.pilot.grace)

    def close(self) -> None:
        self.pilot.unsubscribe(self._forward)


def _probes(
    should_stop: Callable[[], str | None] | None,
    lease_at: Callable[[float], Lease],
    clock: Callable[[], float],
    deadline: float,
    job_stop: StopRequest,
    grace: float,
    reserve_floor: float,
) -> Callable[[], str | None]:
    """``should_stop`` for one job: the caller's probe, then whether the lease
    now ends more than a second before it did when the job was sized.

    A lease that moved earlier also bounds the running tasks' grace: they are
    cut by the new end less the job's end reserve, not ``grace`` seconds from
    now (which could be after the batch system kills the slot), through the
    job's own stop request ``job_stop``.
    """

    def probe() -> str | None:
        if should_stop is not None:
            reason = should_stop()
            if reason:
                return reason
        now = clock()
        try:
            lease = lease_at(now)
        except RunnerError:
            return None  # a transient problem reading MJF is no reason to stop
        end = now + lease.time_left
        if end < deadline - 1.0:
            where = lease.sources.get("time_left", "the lease")
            reason = f"the lease now ends {deadline - end:.0f} s earlier ({where})"
            left = lease.time_left - end_reserve(lease.time_left, reserve_floor)
            job_stop.request(reason, grace=max(0.0, min(grace, left)))
            return reason
        return None

    return probe


def run_pilot(
    queue: str | Path,
    workroot: str | Path,
    lease_at: Callable[[float], Lease],
    clock: Callable[[], float],
    *,
    history: WorkHistory | None = None,
    stop: StopRequest | None = None,
    should_stop: Callable[[], str | None] | None = None,
    grace: float = 10.0,
    confinement: Confinement | None = None,
    reserve_floor: float = END_RESERVE,
    owner: QueueLock | None = None,
    cores: CoreLedger | None = None,
    core_wait: float = 300.0,
    vms: VmLauncher | None = None,
    running_vms: RunningVms | None = None,
) -> PilotReport:
    """Run queued jobs until none fits the lease; see the module docstring.

    ``owner`` is the caller's held :class:`QueueLock` on ``queue`` (a job
    service holds one for its life); without it the pilot takes the queue
    for its run.

    Every job stops (and goes back to the queue) when ``should_stop`` gives a
    reason or when ``lease_at`` says the lease now ends earlier than when the
    job was sized (e.g. a moved MJF shutdowntime); the pilot then goes on with
    jobs that fit the new lease. ``confinement`` says
    how jobs' tasks are confined. Jobs are sized to the time left less their
    end reserve (:func:`runner.elastic.end_reserve`, at least
    ``reserve_floor`` seconds), in whole rounds of tasks. With ``cores``
    each job runs on the cores it could take from that ledger (see the module
    docstring); none free for ``core_wait`` seconds stops the pilot, the job
    stays queued. With ``vms`` (the node's VM side) and ``running_vms`` (the
    caller's record of the VMs its pilots started), VM specs are started
    without waiting for them (:mod:`runner.vm_jobs`); without them a VM spec
    stays queued.

    Raises:
        LeaseError: ``lease_at`` could not establish the lease.
        QueueBusy: without ``owner``, another live process holds the queue.
    """
    qdir = Path(queue)
    with contextlib.ExitStack() as stack:
        if owner is None or not owner.held:
            stack.enter_context(QueueLock(qdir))
        return _run_pilot(
            qdir,
            Path(workroot),
            lease_at,
            clock,
            history=history,
            stop=stop or StopRequest(),
            should_stop=should_stop,
            grace=grace,
            confinement=confinement,
            reserve_floor=reserve_floor,
            cores=cores,
            core_wait=core_wait,
            vms=vms,
            running_vms=running_vms,
        )


def _start_vm(
    qdir: Path,
    path: Path,
    job: VmJob,
    lease: Lease,
    cores: CoreLedger | None,
    vms: VmLauncher,
    running_vms: RunningVms,
    reserve_floor: float,
    report: PilotReport,
) -> StartAnswer:
    """Start the VM of the spec at ``path`` if it fits (:func:`runner.vm_jobs.vm_fit`)
    and file the spec by the answer; the VM's end files it later."""
    fit = vm_fit(job, lease, None if cores is None else cores.snapshot(), reserve_floor)
    if fit.problem is not None:
        report.refused[path.name] = fit.problem
        return StartAnswer.WAIT if fit.wait else StartAnswer.REFUSED
    running = qdir / "running" / path.name
    started = running.with_suffix(STARTED_SUFFIX)
    job_id = path.stem
    started_at = time.time()
    write_file_atomic(started, f"{started_at}\n".encode())
    os.replace(path, running)  # before the VM exists: its end finds the spec in running/
    try:
        answer = vms.start(
            job,
            job_id=job_id,
            lifetime=fit.lifetime,
            capacity=lease.cores,
            on_end=lambda outcome: running_vms.ended(job_id, str(outcome.get("id")), outcome),
        )
    except BaseException:
        os.replace(running, path)
        started.unlink(missing_ok=True)
        raise
    if answer.answer is StartAnswer.STARTED:
        assert answer.vm_id is not None
        running_vms.add(job_id, answer.vm_id)
        report.refused.pop(path.name, None)
        report.jobs_run.append(
            {"spec": path.name, "kind": "vm", "vm": answer.vm_id, "started_at": started_at}
        )
        log.info("VM job %s: vm %s started", job_id, answer.vm_id, extra={"job": job_id})
        return answer.answer
    started.unlink(missing_ok=True)
    if answer.answer is StartAnswer.REJECTED:
        _reject(qdir, running, path, answer.reason)
        report.rejected[path.name] = answer.reason
    else:
        os.replace(running, path)
        report.refused[path.name] = answer.reason
    return answer.answer


def _run_pilot(
    qdir: Path,
    workroot: Path,
    lease_at: Callable[[float], Lease],
    clock: Callable[[], float],
    *,
    history: WorkHistory | None,
    stop: StopRequest,
    should_stop: Callable[[], str | None] | None,
    grace: float,
    confinement: Confinement | None,
    reserve_floor: float,
    cores: CoreLedger | None = None,
    core_wait: float = 300.0,
    vms: VmLauncher | None = None,
    running_vms: RunningVms | None = None,
) -> PilotReport:
    report = PilotReport()
    t0 = clock()
    vm_fault: str | None = None  # the node cannot start VMs: none is tried again this pilot
    deferred: set[str] = set()  # stopped at the lease end during this pilot
    pace: dict[str, float] = {}  # job name -> wall seconds per event, measured by this pilot
    while True:
        if stop.requested:
            report.stopped = f"stop requested ({stop.reason})"
            break
        now = clock()
        lease = lease_at(now)
        candidates = sorted(
            p for p in qdir.glob("*.toml") if p.is_file() and p.name not in deferred
        )
        if not candidates and not deferred:
            report.stopped = "queue empty"
            break
        ran = False
        for path in candidates:
            if stop.requested:
                break
            vm_job: VmJob | None = None
            try:
                data = decode_spec(read_spec_file(path), "<file>", f"{path} ")
                if is_vm_spec(data):
                    if vms is None or running_vms is None:
                        report.refused[path.name] = (
                            "a VM job: this pilot starts no VMs (a node daemon with [vm] does)"
                        )
                        continue
                    vm_job = vms.parse(data)
                else:
                    spec = parse_spec(data)
            except JobSpecError as exc:
                _reject(qdir, path, path, str(exc))
                report.rejected[path.name] = str(exc)
                continue
            if vm_job is not None:
                assert vms is not None and running_vms is not None
                if vm_fault is not None:
                    report.refused[path.name] = vm_fault
                    continue
                answer = _start_vm(
                    qdir, path, vm_job, lease, cores, vms, running_vms, reserve_floor, report
                )
                if answer is StartAnswer.STARTED:
                    ran = True  # and go on: the next spec may fill the cores left
                elif answer is StartAnswer.NODE_FAULT:
                    vm_fault = report.refused[path.name]
                continue
            if cores is not None and vms is not None:
                use = cores.snapshot()
                if use.vm and lease.cores - (use.node + use.site + use.vm) <= 0:
                    # VMs run for hours: waiting core_wait for one to end would
                    # stall the pilot; a VM's end wakes the service instead.
                    report.refused[path.name] = (
                        f"waits for a free core ({use.vm} of the lease's {lease.cores} held by VMs)"
                    )
                    continue
            held = 0
            job_lease = lease
            if cores is not None:
                held = cores.claim_node(lease.cores, timeout=core_wait, stop=lambda: stop.requested)
                if not held:
                    report.stopped = (
                        f"stop requested ({stop.reason})"
                        if stop.requested
                        else f"no core came free in {core_wait:g} s (site ranges hold them)"
                    )
                    break
                job_lease = replace(lease, cores=held)
            running = qdir / "running" / path.name
            started_at = time.time()  # epoch, for the dashboard's masonry chart
            started = running.with_suffix(STARTED_SUFFIX)
            job_stop: _JobStop | None = None
            try:
                # Before the spec moves: whoever sees it running finds when it started.
                write_file_atomic(started, f"{started_at}\n".encode())
                os.replace(path, running)
                job_stop = _JobStop(stop)
                result = run_elastic_job(
                    spec,
                    job_lease,
                    workroot / path.stem,
                    history=history,
                    stop=job_stop.request,
                    should_stop=_probes(
                        should_stop,
                        lease_at,
                        clock,
                        now + lease.time_left,
                        job_stop.request,
                        grace,
                        reserve_floor,
                    ),
                    grace=grace,
                    confinement=confinement,
                    masonry=True,
                    reserve_floor=reserve_floor,
                    seconds_per_event=pace.get(spec.name)
                    or (history.pace(spec.name) if history is not None else None),
                )
            except JobRefused as exc:
                os.replace(running, path)
                report.refused[path.name] = str(exc)
                continue
            except ConfinementError as exc:
                # The node, not the job, is at fault: keep the job, stop the pilot.
                os.replace(running, path)
                report.stopped = f"cannot confine jobs: {exc}"
                break
            except RunnerError as exc:
                _reject(qdir, running, path, str(exc))
                report.rejected[path.name] = str(exc)
                continue
            finally:
                if job_stop is not None:
                    job_stop.close()
                started.unlink(missing_ok=True)
                if held:
                    assert cores is not None
                    cores.release_node(held)
            report.refused.pop(path.name, None)
            when = {"started_at": started_at, "ended_at": time.time()}
            measured_pace = result.report.seconds_per_event
            if measured_pace is not None:
                pace[spec.name] = measured_pace
                if history is not None:
                    history.record_pace(spec.name, measured_pace)
            report.events_done += result.report.events_done
            report.cpu_seconds += result.report.cpu_seconds
            if result.report.stopped and not result.report.complete:
                # Cut by a shutdown or stopped at the lease's end: back to the
                # queue; its journal resumes it later (on this node or the next
                # lease). Not in this pilot: a smaller job may still fit.
                os.replace(running, path)
                report.jobs_run.append({"spec": path.name, **result.to_json(), **when})
                deferred.add(path.name)
                ran = True
                break
            summary = {"spec": path.name, **result.to_json(), **when}
            # The report first: whoever sees the spec in done/ finds its report.
            write_file_atomic(
                qdir / "done" / f"{path.stem}.report.json", json.dumps(summary, indent=1).encode()
            )
            os.replace(running, qdir / "done" / path.name)
            report.jobs_run.append(summary)
            ran = True
            break  # re-read the lease and the queue before the next job
        if report.stopped:
            break
        if not ran:
            report.stopped = "no queued job fits the lease"
            break
    report.wall_seconds = clock() - t0
    return report
