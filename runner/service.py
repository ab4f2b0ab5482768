"""The node daemon's job service: a queue filled by the API, drained by masonry.

``JobService`` owns a queue directory (the layout of :mod:`runner.masonry`)
and a work root. ``submit`` validates a TOML spec and writes it atomically
into the queue (temporary dot-file, fsync, rename, fsync of the directory), so
the masonry loop never sees half a spec. One background thread (``start``)
runs :func:`runner.masonry.run_pilot` whenever jobs are queued, which keeps
filling the lease; when no queued job fits, the thread sleeps until the next
submission or ``recheck`` seconds (the lease may have been renewed). ``stop``
stops dispatch: running tasks finish within the grace period or are cut, the
job goes back to the queue and resumes from its journal at the next start.

Job ids sort in submission order (``YYYYMMDD-HHMMSS.mmm-xxxxxx``, UTC), so
masonry's name order is first come, first served. Specs dropped into the
queue directory by hand are jobs too; their id is the file's stem.

The service owns its queue for its whole life (a :class:`runner.masonry.QueueLock`,
taken when it is created): a job found in ``running/`` then was left by a
runner that died (a node crash, SIGKILL) and goes back to the queue at once;
the next start resumes it from its journal, each committed event exactly once.

Nothing here touches the event loop: the daemon calls ``submit``/``jobs``
through a thread (they do disk I/O) and ``stop`` from its shutdown path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.confine import DEFAULT_CGROUP_PARENT, Confinement, cgroup_parent_problem
from runner.cores import CoreLedger
from runner.exceptions import JobSpecError, RunnerConfigError, RunnerError, UnknownJob
from runner.job_user import DEFAULT_JOB_USER, job_user_for_node
from runner.lease import LEASE_KEYS, Lease, LeaseOptions, discover_lease, lease_config
from runner.masonry import STARTED_SUFFIX, PilotReport, QueueLock, run_pilot
from runner.power import PowerCache, benchmark_power
from runner.sizing import WorkHistory
from runner.spec import MAX_SPEC_BYTES, decode_spec, parse_spec
from runner.stop import StopRequest, grace_problem
from runner.vm_jobs import VM_SUFFIX, RunningVms, VmLauncher, is_vm_spec

log = logging.getLogger("runner.service")

STATES = ("queued", "running", "done", "rejected")
VM_STOP_SLACK = 30.0  # s beyond the grace for a stopped VM's end to be filed
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobService:
    """Queue + masonry thread; see the module docstring.

    ``lease_at(now)`` gives the lease at ``clock`` time ``now`` (called before
    each job, so a moved shutdowntime or a renewed lease is seen). With
    ``cores`` (the node's :class:`runner.cores.CoreLedger`, shared with the
    site worker) each job runs on the cores free when it starts.

    With ``vms`` (the node's VM side, which claims VMs' cores in ``cores``),
    specs with a ``[vm]`` table are VM jobs (:mod:`runner.vm_jobs`).

    Raises (when created):
        QueueBusy: another live pilot or job service owns ``queue_dir``.
        ValueError: ``vms`` without ``cores``.
    """

    def __init__(
        self,
        queue_dir: str | Path,
        workroot: str | Path,
        lease_at: Callable[[float], Lease],
        *,
        clock: Callable[[], float] = time.monotonic,
        history: WorkHistory | None = None,
        confinement: Confinement | None = None,
        grace: float = 10.0,
        should_stop: Callable[[], str | None] | None = None,
        recheck: float = 30.0,
        cores: CoreLedger | None = None,
        vms: VmLauncher | None = None,
    ) -> None:
        self.queue = Path(queue_dir)
        self.workroot = Path(workroot)
        self.lease_at = lease_at
        self.clock = clock
        self.history = history
        self.confinement = confinement
        self.grace = grace
        self.should_stop = should_stop
        self.recheck = recheck
        if vms is not None and cores is None:
            # A VM claims its cores in the node's ledger: elastic jobs must too.
            raise ValueError("a job service that starts VMs needs the node's core ledger")
        self.cores = cores
        self.vms = vms
        self._owner = QueueLock(self.queue)
        # Held from now on: specs left in running/ by a runner that died go back.
        self.recovered = self._owner.acquire()
        self.workroot.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # The VMs its pilots started; a VM's end files its spec and wakes the thread.
        self.running_vms = RunningVms(self.queue, on_change=self._wake.set)
        self._thread: threading.Thread | None = None
        self._stop = StopRequest()
        self._last_ms = 0
        self.last_pilot: PilotReport | None = None
        self.last_error: str | None = None

    # --- submission and queries (any thread)
    def submit(self, spec_text: str) -> str:
        """Validate ``spec_text`` (TOML) and queue it; returns the job id.

        A spec with a ``[vm]`` table is a VM job (:mod:`runner.vm_jobs`),
        checked by the node's VM side.

        Raises:
            JobSpecError: not TOML, too large, or a field is wrong (the
                message names it), or a VM job on a node without VMs;
                nothing is queued.
        """
        data = decode_spec(spec_text.encode())
        if is_vm_spec(data):
            if self.vms is None:
                raise JobSpecError("vm", "this node starts no VMs ([vm] enabled = false)")
            self.vms.parse(data)
        else:
            parse_spec(data)
        job_id = self._new_id()
        tmp = self.queue / f".{job_id}.toml.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(spec_text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.queue / f"{job_id}.toml")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._wake.set()
        return job_id

    def _new_id(self) -> str:
        with self._lock:
            ms = max(time.time_ns() // 1_000_000, self._last_ms + 1)
            self._last_ms = ms
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(ms // 1000))
        return f"{stamp}.{ms % 1000:03d}-{secrets.token_hex(3)}"

    def _paths(self, state: str) -> list[Path]:
        d = self.queue if state == "queued" else self.queue / state
        return sorted(p for p in d.glob("*.toml") if p.is_file())

    def _describe(self, path: Path, state: str) -> dict[str, Any]:
        job_id = path.stem
        out: dict[str, Any] = {"id": job_id, "state": state, "name": None, "kind": "elastic"}
        with contextlib.suppress(OSError, JobSpecError), open(path, "rb") as f:
            data = decode_spec(f.read(MAX_SPEC_BYTES + 1))
            name = data.get("name")
            out["name"] = name if isinstance(name, str) else None
            if is_vm_spec(data):
                out["kind"] = "vm"
        if out["kind"] == "vm" and state == "running":
            out["vm"] = None  # its VM is starting
            with contextlib.suppress(OSError):
                out["vm"] = path.with_suffix(VM_SUFFIX).read_text().strip() or None
        journal = self.workroot / job_id / "journal.jsonl"
        if state in ("queued", "running") and out["kind"] == "elastic":
            with contextlib.suppress(OSError):
                out["tasks_committed"] = max(0, _count_lines(journal) - 1)
        if state == "running":
            with contextlib.suppress(OSError, ValueError):
                out["started_at"] = float(path.with_suffix(STARTED_SUFFIX).read_text())
        if state == "queued" and self.last_pilot is not None:
            refused = self.last_pilot.refused.get(path.name)
            if refused:
                out["refused"] = refused
        if state == "done":
            with contextlib.suppress(OSError, ValueError):
                report = path.with_name(f"{job_id}.report.json").read_text()
                out["report"] = json.loads(report)
        if state == "rejected":
            with contextlib.suppress(OSError):
                out["reason"] = path.with_name(f"{job_id}.reason").read_text().strip()
        return out

    def jobs(self) -> list[dict[str, Any]]:
        """Every job (queued, running, done, rejected), in submission order.

        The directories are listed one after the other while the masonry
        thread moves specs between them, so one listing can miss a job that
        moved the other way meanwhile (running back to queued when it does
        not fit). So the names are listed twice and every job seen is kept,
        in the state seen last; a job is missed only if it moved back during
        both listings.
        """
        states: dict[str, tuple[Path, str]] = {}
        for _ in range(2):
            for state in STATES:
                for path in self._paths(state):
                    states[path.stem] = (path, state)
        return [self._describe(*states[k]) for k in sorted(states)]

    def job(self, job_id: str) -> dict[str, Any]:
        """One job by id.

        Raises:
            UnknownJob: no such job (or not a valid id).
        """
        if not _ID.match(job_id):
            raise UnknownJob(f"{job_id!r} is not a job id")
        for _ in range(2):  # the masonry thread may move it between two looks
            for state in reversed(STATES):
                d = self.queue if state == "queued" else self.queue / state
                path = d / f"{job_id}.toml"
                if path.is_file():
                    return self._describe(path, state)
        raise UnknownJob(f"no job {job_id!r} in {self.queue}")

    def status(self) -> dict[str, Any]:
        """The service itself: whether it runs, and the last pilot's outcome."""
        t = self._thread
        return {
            "running": t is not None and t.is_alive(),
            "stopping": self._stop.requested,
            "last_pilot_stopped": None if self.last_pilot is None else self.last_pilot.stopped,
            "last_error": self.last_error,
            "vms_running": len(self.running_vms),
        }

    # --- the masonry thread
    def start(self) -> None:
        """Run the masonry loop in a background thread (no-op if it runs)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = StopRequest()
            self._thread = threading.Thread(target=self._loop, name="swarm-masonry", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop (cutting running tasks at once) and give up the queue."""
        self.stop(grace=0)
        self._owner.release()

    def _has_queued(self) -> bool:
        return any(p.is_file() for p in self.queue.glob("*.toml"))

    def _loop(self) -> None:
        stop = self._stop
        while not stop.requested:
            self._wake.clear()
            if self._has_queued():
                try:
                    self.last_pilot = run_pilot(
                        self.queue,
                        self.workroot,
                        self.lease_at,
                        self.clock,
                        history=self.history,
                        stop=stop,
                        should_stop=self.should_stop,
                        grace=self.grace,
                        confinement=self.confinement,
                        owner=self._owner,
                        cores=self.cores,
                        vms=self.vms,
                        running_vms=self.running_vms,
                    )
                    self.last_error = None
                except RunnerError as exc:
                    self.last_error = str(exc)
                    log.warning("job service: %s", exc)
                except Exception as exc:  # keep serving; the log has the traceback
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("job service: masonry failed")
                if stop.requested:
                    break
            # A submission during the pilot has set the event: no wait then.
            self._wake.wait(self.recheck)

    def stop(self, grace: float | None = None, wait: bool = True) -> None:
        """Stop dispatch; running tasks get ``grace`` seconds (default: the
        service's), then are cut; the VMs its pilots started are asked to
        stop within the same grace (their specs go to ``done/`` with their
        outcome). With ``wait``, return once the thread ended and the VMs are
        gone (at most the grace and :data:`VM_STOP_SLACK` more for them)."""
        self._stop.request("job service stopped", grace)
        self._wake.set()
        vm_grace = self.grace if grace is None else grace
        if self.vms is not None and len(self.running_vms):
            self.vms.stop(self.running_vms.vm_ids(), vm_grace, wait=wait)
        t = self._thread
        if wait and t is not None:
            t.join()
        if wait and self.vms is not None:
            self.running_vms.wait_empty(vm_grace + VM_STOP_SLACK)


def _count_lines(path: Path) -> int:
    """Newlines in ``path``, read in blocks (a journal may be large)."""
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n


@dataclass(frozen=True)
class RunnerSettings:
    """What the ``[runner]`` table says, shared by the job service and the site
    worker: where jobs live, the lease, the confinement, the grace."""

    queue: Path
    work: Path
    state: Path
    lease_at: Callable[[float], Lease]
    confinement: Confinement
    grace: float

    @property
    def history(self) -> WorkHistory:
        return WorkHistory(self.state / "work_per_event.json")


RUNNER_KEYS = ("queue", "work", "state", "job_user", "cgroup_parent", "grace", *LEASE_KEYS)


def runner_settings(
    runner: Mapping[str, Any],
    data_dir: Path,
    *,
    environ: Mapping[str, str] = os.environ,
) -> RunnerSettings:
    """The ``[runner]`` table checked (keys: see :func:`job_service_from_config`).

    Raises:
        RunnerConfigError: an unknown key or an unusable value (one line naming
            ``runner.KEY`` and what it accepts).
        ConfinementError: the node is root and ``job_user`` does not exist.
    """
    unknown = sorted(set(runner) - set(RUNNER_KEYS))
    if unknown:
        raise RunnerConfigError(
            f"runner.{unknown[0]}: unknown key (known: {', '.join(sorted(RUNNER_KEYS))})"
        )

    def text(key: str, default: str) -> str:
        value = runner.get(key, default)
        if not isinstance(value, str):
            raise RunnerConfigError(f"runner.{key}: expected a string, got {value!r}")
        return value

    problem = cgroup_parent_problem(text("cgroup_parent", DEFAULT_CGROUP_PARENT))
    if problem is not None:
        raise RunnerConfigError(f"runner.cgroup_parent: {problem}")
    grace = runner.get("grace", 10.0)
    problem = grace_problem(grace)
    if problem is not None:
        raise RunnerConfigError(f"runner.grace: {problem}")
    config = lease_config(runner)
    state = Path(text("state", str(data_dir / "runner")))
    cache = PowerCache(state / "power.json")

    def lease_at(now: float) -> Lease:
        wall = time.time()
        return discover_lease(
            now=wall,
            environ=environ,
            config=config,
            options=LeaseOptions(),
            detected_cores=os.cpu_count(),
            benchmark=lambda cores: benchmark_power(cache, cores, wall),
        )

    return RunnerSettings(
        queue=Path(text("queue", str(data_dir / "jobs" / "queue"))),
        work=Path(text("work", str(data_dir / "jobs" / "work"))),
        state=state,
        lease_at=lease_at,
        confinement=Confinement(
            user=job_user_for_node(text("job_user", DEFAULT_JOB_USER)),
            cgroup_parent=text("cgroup_parent", DEFAULT_CGROUP_PARENT) or None,
        ),
        grace=float(grace),
    )


def job_service_from_config(
    runner: Mapping[str, Any],
    data_dir: Path,
    *,
    environ: Mapping[str, str] = os.environ,
    cores: CoreLedger | None = None,
    vms: VmLauncher | None = None,
) -> JobService:
    """A ``JobService`` from the ``[runner]`` table of the node's config.

    Keys (all optional): ``queue`` (default ``DATA_DIR/jobs/queue``),
    ``work`` (``DATA_DIR/jobs/work``), ``state`` (``DATA_DIR/runner``: DB12
    cache, measured work per event), ``job_user`` (``nobody``; used when the
    node runs as root), ``cgroup_parent`` (``swarm-jobs``; ``""`` for rlimits
    only), ``grace`` (10 s, 0 to ``MAX_GRACE``), and the lease's ``cores``,
    ``power_per_core``, ``time_left``, ``shutdowntime``, ``memory`` (a size:
    ``"200M"``; see :func:`runner.lease.lease_value` and
    :func:`runner.lease.assemble_lease`; MJF from ``environ`` comes first).
    ``cores``: the node's core ledger, shared with the site worker and VMs;
    ``vms``: the node's VM side (VM jobs; :mod:`runner.vm_jobs`).

    Raises:
        RunnerConfigError: an unknown key or an unusable value (one line naming
            ``runner.KEY`` and what it accepts).
        ConfinementError: the node is root and ``job_user`` does not exist.
        QueueBusy: another live pilot or job service owns the queue.
    """
    settings = runner_settings(runner, data_dir, environ=environ)
    return JobService(
        settings.queue,
        settings.work,
        settings.lease_at,
        history=settings.history,
        confinement=settings.confinement,
        grace=settings.grace,
        cores=cores,
        vms=vms,
    )
