"""VM jobs in the masonry queue: when the pilot starts a VM spec, and the VMs it started.

A VM spec is a job spec with a ``[vm]`` table (``docs/RUNNER.md``); the
node's VM side parses it and starts it (:class:`VmLauncher`, implemented by
:class:`vm.job.NodeVmLauncher` over the node's ``VmService``), so this module
knows no qemu and no event loop. The pilot does not wait for a VM: it starts
one while its cores are free and goes on filling the lease; the VM's end
arrives later through ``on_end`` and :class:`RunningVms` files its spec.

Invariants:

* cores: a VM starts only with all its cores free now in the node's
  :class:`runner.cores.CoreLedger` (the launcher claims them there, all or
  nothing), so VMs, node jobs and site ranges together never hold more than
  the lease's cores; elastic jobs take the cores that are left;
* time: a VM starts only if the lease's time left less the end reserve is at
  least its ``min_seconds``; its lifetime is capped at that time, so no VM the
  pilot started outlives the lease;
* a VM spec is in ``running/`` exactly while its VM may run (beside
  ``NAME.vm``, its VM id); when the VM ends its report is written to
  ``done/`` first, then the spec follows it there, whatever the outcome.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runner.cores import CoreUse
from runner.elastic import end_reserve
from runner.lease import Lease
from trust.durable import write_file_atomic

log = logging.getLogger("runner.vm_jobs")

# ``running/NAME.vm`` holds the VM id of a running VM job.
VM_SUFFIX = ".vm"
VM_TABLE = "vm"


def is_vm_spec(data: Mapping[str, Any]) -> bool:
    """Whether a decoded spec is a VM job (it has a ``[vm]`` table)."""
    return VM_TABLE in data


class VmJob(Protocol):
    """What the pilot needs of a parsed VM spec."""

    @property
    def name(self) -> str: ...

    @property
    def cores(self) -> int: ...

    @property
    def min_seconds(self) -> float: ...

    @property
    def lifetime(self) -> float | None: ...


class StartAnswer(enum.Enum):
    """What became of a VM start, and so of its spec."""

    STARTED = "started"  # the VM runs: the spec stays in running/
    WAIT = "wait"  # its cores are not free now: queued, tried again when some are
    REFUSED = "refused"  # not now (backed off, unknown image, no lease): queued, reason shown
    REJECTED = "rejected"  # never on this node (the site policy): to rejected/
    NODE_FAULT = "node fault"  # the node cannot start VMs (qemu): queued, no more VMs this pilot


@dataclass(frozen=True)
class VmStart:
    answer: StartAnswer
    vm_id: str | None = None
    reason: str = ""


VmEnded = Callable[[Mapping[str, Any]], None]


class VmLauncher(Protocol):
    """The node's VM side, as the masonry thread sees it."""

    def parse(self, data: Mapping[str, Any]) -> VmJob:
        """A decoded spec with a ``[vm]`` table, checked.

        Raises:
            JobSpecError: a field is missing, unknown or bad (names it).
        """
        ...

    def start(
        self, job: VmJob, *, job_id: str, lifetime: float, capacity: int, on_end: VmEnded
    ) -> VmStart:
        """Start ``job``'s VM (its cores claimed in the node's ledger, all or
        none) without waiting for it to end; ``on_end(outcome)`` is called
        once, from a thread that is not the caller's, when it is over.
        Returns within a deadline whatever the VM does."""
        ...

    def stop(self, vm_ids: list[str], grace: float, *, wait: bool) -> None:
        """Ask these VMs to stop (STOP, ACPI, ``grace``, then end them); with
        ``wait``, return once they are gone or a deadline passed."""
        ...


@dataclass(frozen=True)
class VmFit:
    """Whether a VM spec starts now: its lifetime, or why not."""

    lifetime: float = 0.0
    problem: str | None = None
    wait: bool = False  # its cores are held by others now (not a lack of lease)


def vm_fit(job: VmJob, lease: Lease, use: CoreUse | None, reserve_floor: float) -> VmFit:
    """Pure: whether ``job`` may start under ``lease`` with the ledger at ``use``.

    The time the VM may run is the lease's time left less the end reserve
    (:func:`runner.elastic.end_reserve`); below ``min_seconds`` the spec
    stays queued for a node with a longer lease. The cores must all be free
    now (``capacity - node - site - vm``); otherwise it waits.
    """
    usable = lease.time_left - end_reserve(lease.time_left, reserve_floor)
    if usable < job.min_seconds:
        return VmFit(
            problem=f"VM job {job.name!r} needs min_seconds {job.min_seconds:g} s; the lease"
            f" has {max(0.0, usable):.0f} s left (less the end reserve)"
        )
    if job.cores > lease.cores:
        return VmFit(
            problem=f"VM job {job.name!r} asks {job.cores} cores; the lease has {lease.cores}"
        )
    if use is not None:
        free = lease.cores - (use.node + use.site + use.vm)
        if job.cores > free:
            return VmFit(
                problem=f"VM job {job.name!r} waits for {job.cores} free cores ({max(0, free)}"
                f" free of the lease's {lease.cores}: {use.vm} held by VMs, {use.node} by"
                f" node jobs, {use.site} by site ranges)",
                wait=True,
            )
    lifetime = min(job.lifetime if job.lifetime is not None else math.inf, usable)
    return VmFit(lifetime=lifetime)


def done_report(spec: str, vm_id: str, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """The ``done/NAME.report.json`` of a VM job: its VM's outcome, and
    ``started_at``/``ended_at`` (epoch seconds) and ``wall_seconds`` as elastic
    jobs have them (the dashboard's masonry chart draws both kinds)."""
    started = float(outcome.get("started") or outcome.get("created") or time.time())
    ended = float(outcome.get("stopped") or time.time())
    return {
        "spec": spec,
        "kind": "vm",
        "vm": vm_id,
        "started_at": started,
        "ended_at": ended,
        "wall_seconds": max(0.0, ended - started),
        "outcome": dict(outcome),
    }


class RunningVms:
    """The VMs a job service's pilots started, by job id; files each spec when
    its VM ends. Thread-safe: ``ended`` comes from the VM side's thread."""

    def __init__(self, queue: Path, on_change: Callable[[], None] = lambda: None) -> None:
        self.queue = queue
        self._on_change = on_change
        self._cond = threading.Condition()
        self._running: dict[str, str] = {}  # job id -> VM id
        self._early: dict[str, Mapping[str, Any]] = {}  # ended before the pilot recorded it

    def add(self, job_id: str, vm_id: str) -> None:
        """The pilot started ``vm_id`` for ``job_id`` (its spec is in ``running/``)."""
        try:  # for views of the queue only: a full disk must not lose the VM's end
            write_file_atomic(
                self.queue / "running" / f"{job_id}{VM_SUFFIX}", f"{vm_id}\n".encode()
            )
        except OSError as exc:
            log.error("VM job %s: cannot record its VM %s: %s", job_id, vm_id, exc)
        with self._cond:
            early = self._early.pop(job_id, None)
            if early is None:
                self._running[job_id] = vm_id
                return
        self._file(job_id, vm_id, early)

    def ended(self, job_id: str, vm_id: str, outcome: Mapping[str, Any]) -> None:
        """``vm_id`` of ``job_id`` is over: report and spec to ``done/``."""
        with self._cond:
            if self._running.pop(job_id, None) is None:
                self._early[job_id] = outcome  # add() files it
                return
        self._file(job_id, vm_id, outcome)

    def _file(self, job_id: str, vm_id: str, outcome: Mapping[str, Any]) -> None:
        running = self.queue / "running" / f"{job_id}.toml"
        try:
            # The report first: whoever sees the spec in done/ finds its report.
            report = done_report(f"{job_id}.toml", vm_id, outcome)
            write_file_atomic(
                self.queue / "done" / f"{job_id}.report.json", json.dumps(report, indent=1).encode()
            )
            os.replace(running, self.queue / "done" / running.name)
        except OSError as exc:  # a full disk: the spec stays in running/, queued at the next start
            log.error("VM job %s: cannot file its outcome: %s", job_id, exc)
        finally:
            for suffix in (VM_SUFFIX, ".started"):
                (self.queue / "running" / f"{job_id}{suffix}").unlink(missing_ok=True)
            with self._cond:
                self._cond.notify_all()
            self._on_change()
        log.info(
            "VM job %s: vm %s ended: %s %s",
            job_id,
            vm_id,
            outcome.get("code") or "-",
            outcome.get("outcome") or outcome.get("error") or "",
        )

    def vm_ids(self) -> list[str]:
        with self._cond:
            return sorted(self._running.values())

    def vm_of(self, job_id: str) -> str | None:
        with self._cond:
            return self._running.get(job_id)

    def __len__(self) -> int:
        with self._cond:
            return len(self._running)

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no VM job runs, at most ``timeout`` seconds; whether none does."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
