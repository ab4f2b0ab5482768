"""The node's VMs: started on request from images in the node's mount, watched, stopped.

A node daemon owns one :class:`VmService` (``Node.vms``), on its event loop.

Starting a VM (:meth:`VmService.start_vm`), in this order, nothing started
before every check passed:

1. the image ``REPO/NAME/VERSION`` must be in the node's mount: an image the
   site policy refuses fails with the policy's reason (:class:`ImageRefused`),
   an unknown one says so;
2. its VM type must not be backed off after an abort (Vac's back-off);
3. its cores are taken from the node's :class:`runner.cores.CoreLedger`, all
   free now or the VM is refused (never overcommitted);
4. its lifetime is capped at the lease's end;
5. then its directory ``DATA_DIR/vms/ID/`` (``record.json`` written
   atomically at every change, ``joboutputs/``, ``serial.log``,
   ``qemu.log``), the qcow2 overlay over the read-only base in the mount,
   qemu (the accelerator chosen once per daemon) and the port link.

While it runs a watch task ends it: at ``ends - grace`` (its lifetime, or
the lease's end, which is re-read every :data:`LEASE_RECHECK` seconds; a
moved ``shutdowntime`` is also sent into the guest's MJF at once) it is
asked to stop; a stale heartbeat destroys it (``700 heartbeat``).

Stopping (:meth:`VmService.stop_vm`, the end of its time, node shutdown):
``STOP`` on the port and the ACPI power button, ``grace`` seconds, QMP
``quit``, then SIGKILL to qemu's PID. When qemu is gone its cores are
released, the outcome judged (:func:`vm.contract.judge`), the VM type backed
off after an abort, the overlay and sockets removed, the record written.

Invariants: a VM's cores are held exactly while its qemu may run; no qemu
outlives :meth:`VmService.stop` (node shutdown), and a qemu left by a node
that was killed is killed at the next start (found by its recorded PID and
its working directory); a guest cannot make the node store more than the
contract's bounds (:class:`vm.contract.OutputLimits`) or hold a line longer
than :data:`vm.channel.MAX_LINE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.cores import CoreLedger
from runner.exceptions import RunnerError
from runner.lease import Lease
from swarm.status import VmReport, VmsReport, to_json
from trust.durable import write_file_atomic
from vm.channel import (
    READY,
    STOP,
    Done,
    GuestEvent,
    Hello,
    OutputFile,
    PortLink,
    Refused,
    encode_file,
)
from vm.config import ImageName, IncomingRequest, VmRequest, VmSettings, parse_image_name
from vm.contract import (
    HEARTBEAT_FILE,
    LIVE,
    SHUTDOWN_FILE,
    BackOff,
    Ending,
    NodeShare,
    OutputLimits,
    State,
    VmShare,
    changed_features,
    heartbeat_stale,
    judge,
    machine_job_features,
    next_state,
    vm_end,
)
from vm.exceptions import (
    BackedOff,
    ImageRefused,
    MigrationError,
    NoFreeCores,
    QemuError,
    QemuExited,
    UnknownVm,
    VmError,
    VmRefused,
)
from vm.handshake import KeyPair, parse_public_key
from vm.qemu import (
    DISK_SOCKET,
    FROM_GUEST_SOCKET,
    MEMORY_SOCKET,
    QMP_SOCKET,
    SOFTWARE_TAG,
    TO_GUEST_SOCKET,
    Accelerator,
    AcceleratorChoice,
    QemuProcess,
    QemuSpec,
    command_line,
    create_overlay,
    probe_serial_line,
    remove_psk,
    write_psk,
)
from vm.relay import IncomingRelay, OutgoingRelay

log = logging.getLogger("vm.manager")

MIGRATE_DEADLINE = 300.0  # seconds for the disk mirror, and again for the memory
RELAY_FINISH_DEADLINE = 60.0  # seconds for a complete migration's streams to drain
LEASE_RECHECK = 5.0  # seconds between reads of the lease (a moved shutdowntime)
WATCH_TICK = 1.0  # seconds between a VM's checks (heartbeat, end of its time)
OVERLAY = "disk.qcow2"
RECORD = "record.json"
OLD = ".old"  # under vms/: the directories of ended VMs whose id came here again
MAX_REFUSED_SHOWN = 20


@dataclass(frozen=True)
class Waiting:
    """A migration's destination, waiting: what its source needs
    (``POST /v1/vms/incoming``'s answer, with the node's migration host)."""

    vm: VmReport
    nbd_port: int  # the disk relay's port
    migrate_port: int  # the memory relay's port
    key: str  # the destination's X25519 public key (64 hex digits)


@dataclass(frozen=True)
class ImageLookup:
    """An image the node can boot: its file in the mount and its format."""

    path: Path
    format: str


ImageFinder = Callable[[ImageName], ImageLookup]


def physical_cores(cpuinfo: str, logical: int) -> int:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; ``logical`` if none."""
    pairs: set[tuple[str, str]] = set()
    phys = core = ""
    for line in [*cpuinfo.splitlines(), ""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if core:
                pairs.add((phys, core))
            phys = core = ""
    return len(pairs) or logical


def _host_cores() -> tuple[int, int]:
    logical = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            return physical_cores(f.read(), logical), logical
    except OSError:
        return logical, logical


class _Vm:
    """One VM's live state (the loop's; written to its record at each change)."""

    def __init__(self, report: VmReport, vm_dir: Path, user_data: bytes | None) -> None:
        self.report = report
        self.dir = vm_dir
        self.user_data = user_data
        self.state = State(report.state)
        self.qemu: QemuProcess | None = None
        self.link: PortLink | None = None
        self.share: VmShare | None = None
        self.sent: dict[str, bytes] = {}  # MJF files as last sent
        self.limits = OutputLimits()
        self.message: bytes | None = None
        self.stop_requested = False
        self.stale = False
        self.stop_grace: float | None = None
        self.stopping_task: asyncio.Task[None] | None = None
        self.migrated_to: str | None = None
        self.migration_pair: KeyPair | None = None  # made by prepare_migration, used once
        self.relays: list[IncomingRelay | OutgoingRelay] = []  # a migration's, while it runs
        self.tasks: list[asyncio.Task[Any]] = []
        self.booted = asyncio.Event()  # its start ended (running or failed)
        self.hello = asyncio.Event()  # its agent said HELLO
        self.done = asyncio.Event()  # qemu gone, outcome recorded


class VmService:
    """See the module docstring. ``start`` inside a running loop."""

    def __init__(
        self,
        settings: VmSettings,
        *,
        data_dir: Path,
        cores: CoreLedger,
        lease_at: Callable[[float], Lease],
        find_image: ImageFinder | None = None,
        software: Path | None = None,
        migration_host: str = "127.0.0.1",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.root = data_dir / "vms"
        self.cores = cores
        self.lease_at = lease_at
        self.find_image: ImageFinder = find_image or _no_images
        self.software = software if settings.software else None
        self.migration_host = migration_host  # where a migration's destination listens
        self.clock = clock
        self.backoff = BackOff(settings.backoff_seconds)
        self.accelerator = AcceleratorChoice(
            settings.accelerator,
            self._probe if settings.probe_image is not None else None,
            probe_seconds=settings.probe_seconds,
        )
        self.vms: dict[str, _Vm] = {}
        self.node_share: NodeShare | None = None
        self.phys_cores, self.log_cores = _host_cores()
        self._lease_task: asyncio.Task[None] | None = None
        self._closing = False
        self._trial = asyncio.Lock()  # held while the first VM tries KVM
        # The loop it runs on, from ``start``: the masonry thread reaches it there (vm.job).
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the records of earlier VMs (ending any qemu a killed node left)
        and follow the lease."""
        self.root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._load_records)
        self.loop = asyncio.get_running_loop()
        self._lease_task = asyncio.create_task(self._follow_lease())

    async def stop(self, grace: float | None = None) -> None:
        """Stop every VM (STOP + power button, ``grace``, quit, kill), all at
        once; nothing is left running. Safe twice."""
        self._closing = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lease_task
            self._lease_task = None
        live = [v for v in self.vms.values() if v.state in LIVE]
        await asyncio.gather(
            *(self._stop(v, grace, "the node is shutting down") for v in live),
            return_exceptions=True,
        )

    # -- starting --------------------------------------------------------------------------

    async def start_vm(self, request: VmRequest) -> VmReport:
        """Start a VM (see the module docstring); its report once qemu runs.

        Raises:
            ImageRefused: the site policy refuses the image (nothing started).
            VmRefused: unknown image, backed-off type, no free cores, no time
                left in the lease or no lease, the node shutting down (nothing
                started).
            QemuError: the overlay or qemu could not start; the VM is
                recorded as failed with why.
        """
        if self._closing:
            raise VmRefused("the node is shutting down")
        image = self.find_image(request.image)  # ImageRefused / VmRefused
        vm_type = str(request.image)
        now = self.clock()
        why = self.backoff.refusal(vm_type, now)
        if why is not None:
            raise BackedOff(why)
        try:
            lease = await asyncio.to_thread(self.lease_at, time.monotonic())
        except RunnerError as exc:  # no source gives the lease: no VM can be sized
            raise VmRefused(f"the node's lease is unknown: {exc}") from None
        node = self._node_share(lease)
        s = self.settings
        cores = request.cores or s.cores
        memory = request.memory or s.memory
        lifetime = min(request.lifetime or s.lifetime, node.lease_end - now)
        if lifetime <= 0:
            raise VmRefused(f"the node's lease ends at {node.lease_end:.0f}: no time for a VM")
        if not self.cores.claim_vm(lease.cores, cores):
            use = self.cores.snapshot()
            busy = use.node + use.site + use.vm
            raise NoFreeCores(
                f"{cores} cores asked, {max(0, lease.cores - busy)} free of the lease's"
                f" {lease.cores} ({use.vm} held by VMs, {use.node} by node jobs,"
                f" {use.site} by site ranges)"
            )
        vm_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(3)}"
        vm_dir = self.root / vm_id
        report = VmReport(
            id=vm_id,
            image=vm_type,
            state=State.STARTING.value,
            cores=cores,
            memory=memory,
            created=now,
            dir=str(vm_dir),
            software=self.software is not None,
            job=request.job,
        )
        try:
            vm_dir.mkdir(parents=True)
            (vm_dir / "joboutputs").mkdir()
        except OSError as exc:
            self.cores.release_vm(cores)
            raise VmError(f"cannot make {vm_dir}: {exc.strerror}") from None
        vm = _Vm(report, vm_dir, request.user_data)
        vm.share = VmShare(vm_id, cores, memory, now, lifetime, s.grace)
        self.vms[vm_id] = vm
        self._save(vm)
        try:
            await self._boot(vm, image, node)
        except BaseException as exc:
            await self._fail(vm, exc)
            raise
        finally:
            vm.booted.set()
        if self._closing:  # the node began to shut down while qemu started
            self._begin_stop(vm, self.settings.grace, "the node is shutting down")
        return vm.report

    async def _boot(self, vm: _Vm, image: ImageLookup, node: NodeShare) -> None:
        """The accelerator, then qemu; KVM on trial (``auto`` without a probe
        guest): the first VM boots under KVM while every other start waits,
        and is restarted under TCG if its agent says no HELLO in time."""
        if self.accelerator.chosen is not None:
            await self._run_qemu(vm, image, node, self.accelerator.chosen)
        else:
            async with self._trial:
                accel = await self.accelerator.choose()
                if not accel.provisional:
                    await self._run_qemu(vm, image, node, accel)
                else:
                    await self._try_kvm(vm, image, node, accel)
        vm.tasks.append(asyncio.create_task(self._watch(vm)))

    async def _try_kvm(
        self, vm: _Vm, image: ImageLookup, node: NodeShare, trial: Accelerator
    ) -> None:
        """Run the first VM under KVM on trial: KVM if its agent says HELLO
        within the probe's time, else it is started again under TCG."""
        seconds = self.accelerator.probe_seconds
        try:
            await self._run_qemu(vm, image, node, trial)
        except QemuExited as exc:  # seen: qemu aborts on an MSR under KVM on some hosts
            why = f"KVM unusable ({exc})"
        else:
            assert vm.qemu is not None
            hello = asyncio.create_task(vm.hello.wait())
            ended = asyncio.create_task(vm.qemu.proc.wait())  # qemu may also die under KVM later
            try:
                await asyncio.wait(
                    {hello, ended}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                hello.cancel()
                ended.cancel()
            if vm.hello.is_set():
                verdict = Accelerator(
                    "kvm", f"KVM: the first VM's agent said HELLO within {seconds:g} s"
                )
                self.accelerator.settle(verdict)
                self._update(vm, accelerator_why=verdict.why)
                return
            if vm.qemu.proc.returncode is not None:
                why = f"KVM unusable ({vm.qemu.exit_reason()})"
            else:
                why = (
                    f"no agent HELLO within {seconds:g} s under KVM"
                    " (the first VM was restarted under TCG)"
                )
        verdict = Accelerator("tcg", f"software emulation: {why}")
        self.accelerator.settle(verdict)
        log.warning("vm %s: %s", vm.report.id, verdict.why)
        await self._discard_qemu(vm)
        await self._run_qemu(vm, image, node, verdict)

    async def _run_qemu(
        self, vm: _Vm, image: ImageLookup, node: NodeShare, accel: Accelerator
    ) -> None:
        s = self.settings
        self._update(vm, accelerator=accel.name, accelerator_why=accel.why)
        overlay = vm.dir / OVERLAY
        overlay.unlink(missing_ok=True)  # a VM restarted after a KVM trial starts afresh
        await create_overlay(s.qemu_img, image.path, image.format, overlay, s.start_timeout)
        spec = QemuSpec(
            qemu=s.qemu,
            overlay=overlay,
            memory=vm.report.memory,
            cores=vm.report.cores,
            accelerator=accel.name,
            software=self.software,
        )
        vm.qemu = await QemuProcess.start(command_line(spec), vm.dir, deadline=s.start_timeout)
        assert vm.share is not None
        vm.sent = machine_job_features(vm.share, node)
        self._update(
            vm,
            state=State.RUNNING,
            pid=vm.qemu.pid,
            started=self.clock(),
            ends=vm_end(vm.share, node),
        )
        log.info(
            "vm %s: %s started (pid %d, %s, %d cores)",
            vm.report.id,
            vm.report.image,
            vm.qemu.pid,
            accel.name,
            vm.report.cores,
        )
        vm.link = PortLink(
            vm.qemu.path(TO_GUEST_SOCKET),
            vm.qemu.path(FROM_GUEST_SOCKET),
            greeting=lambda: self._greeting(vm),
            on_event=lambda e: self._on_event(vm, e),
            name=f"vm {vm.report.id}",
        )
        vm.tasks = [
            asyncio.create_task(vm.link.run()),
            asyncio.create_task(self._watch_disk(vm)),
        ]

    async def _discard_qemu(self, vm: _Vm) -> None:
        """End a qemu that is not the VM's to keep (a failed KVM trial)."""
        if vm.link is not None:
            vm.link.close()
        for t in vm.tasks:
            t.cancel()
        for t in vm.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 5.0)
        vm.tasks, vm.link = [], None
        if vm.qemu is not None:
            await vm.qemu.kill()
            vm.qemu.close()
            vm.qemu = None
        self._cleanup_files(vm)  # its sockets too: the next qemu binds them afresh
        self._update(vm, pid=None, agent=None, booted=None)

    def _greeting(self, vm: _Vm) -> list[bytes]:
        lines = [encode_file(k, v) for k, v in sorted(vm.sent.items())]
        if vm.user_data is not None:
            lines.append(encode_file("user_data", vm.user_data))
        lines.append(READY)
        if vm.stop_requested:
            lines.append(STOP)
        return lines

    async def _probe(self, deadline: float) -> str | None:
        s = self.settings
        assert s.probe_image is not None
        work = self.root / ".kvm-probe"
        work.mkdir(parents=True, exist_ok=True)
        overlay = work / "probe.qcow2"
        overlay.unlink(missing_ok=True)
        try:
            await create_overlay(s.qemu_img, s.probe_image, "raw", overlay, s.start_timeout)
        except QemuError as exc:
            return str(exc)
        # No QMP: the probe is killed by its PID, whatever it does.
        spec = QemuSpec(s.qemu, overlay, memory=64 << 20, cores=1, accelerator="kvm", qmp=False)
        return await probe_serial_line(command_line(spec), work, s.probe_line.encode(), deadline)

    # -- while it runs ---------------------------------------------------------------------

    async def _on_event(self, vm: _Vm, event: GuestEvent) -> None:
        if isinstance(event, Hello):
            vm.hello.set()
            self._update(vm, agent=event.version, booted=vm.report.booted or self.clock())
            if vm.link is not None:
                await vm.link.send(self._greeting(vm))
        elif isinstance(event, OutputFile):
            problem = vm.limits.check(event.name, len(event.data))
            if problem is not None:
                self._refused(vm, problem)
                return
            path = vm.dir / "joboutputs" / event.name
            durable = event.name != HEARTBEAT_FILE  # a beat a second need not reach the disk
            try:
                await asyncio.to_thread(write_file_atomic, path, event.data, durable=durable)
            except OSError as exc:
                self._refused(vm, f"output {event.name}: cannot store: {exc.strerror}")
                return
            changes: dict[str, Any] = {}
            if event.name == HEARTBEAT_FILE:
                changes["last_heartbeat"] = self.clock()
            if event.name == SHUTDOWN_FILE:
                vm.message = event.data
            if event.name not in vm.report.outputs:
                changes["outputs"] = sorted([*vm.report.outputs, event.name])
            if changes:
                self._update(vm, **changes)
        elif isinstance(event, Refused):
            self._refused(vm, event.reason)
        elif isinstance(event, Done):
            log.info("vm %s: the guest is done", vm.report.id)

    def _refused(self, vm: _Vm, why: str) -> None:
        if len(vm.report.refused) < MAX_REFUSED_SHOWN:
            self._update(vm, refused=[*vm.report.refused, why])

    async def _watch(self, vm: _Vm) -> None:
        """End the VM when its time is up or its heartbeat is stale; record
        its end when qemu is gone."""
        assert vm.qemu is not None and vm.share is not None
        s = self.settings
        while vm.qemu.running:
            now = self.clock()
            if vm.state is State.RUNNING:
                ends = vm.report.ends or now
                if heartbeat_stale(
                    now=now,
                    started=vm.share.started,
                    hello=vm.report.booted,
                    last_heartbeat=vm.report.last_heartbeat,
                    heartbeat_seconds=s.heartbeat_seconds,
                    boot_seconds=s.boot_seconds,
                ):
                    log.warning("vm %s: heartbeat stale: destroyed", vm.report.id)
                    vm.stale = True
                    self._begin_stop(vm, 0.0, "heartbeat stale", ask=False)
                elif now >= ends - s.grace:
                    why = "its lifetime ends" if ends < self._lease_end() else "the lease ends"
                    self._begin_stop(vm, max(0.0, ends - now), why)
            await vm.qemu.wait(WATCH_TICK)
        await self._finish(vm)

    async def _watch_disk(self, vm: _Vm) -> None:
        """A full overlay file system: qemu pauses the guest (its ENOSPC
        policy); the node records why and ends the VM at once."""
        assert vm.qemu is not None
        while vm.qemu.running:
            try:
                data = await vm.qemu.block_io_error()
            except QemuError:
                return
            if not data.get("nospace"):
                log.warning("vm %s: disk I/O error: %s", vm.report.id, data)
                continue
            why = (
                f"overlay disk full: no space left for {vm.dir / OVERLAY} on the node"
                " (qemu paused the guest)"
            )
            log.error("vm %s: %s", vm.report.id, why)
            self._update(vm, error=why)
            self._begin_stop(vm, 0.0, why, ask=False)
            return

    def _lease_end(self) -> float:
        return self.node_share.lease_end if self.node_share else float("inf")

    def _node_share(self, lease: Lease) -> NodeShare:
        share = NodeShare(
            lease_cores=lease.cores,
            power_per_core=lease.power_per_core,
            lease_end=lease.deadline,
            phys_cores=self.phys_cores,
            log_cores=self.log_cores,
        )
        self.node_share = share
        return share

    async def _follow_lease(self) -> None:
        """Re-read the lease; send a moved shutdowntime into every guest at once."""
        while True:
            await asyncio.sleep(LEASE_RECHECK)
            if not any(v.state is State.RUNNING for v in self.vms.values()):
                continue
            try:
                lease = await asyncio.to_thread(self.lease_at, time.monotonic())
            except Exception as exc:  # the lease is the runner's: keep the last one
                log.warning("vm: cannot read the lease: %s", exc)
                continue
            await self.lease_changed(lease)

    async def lease_changed(self, lease: Lease) -> None:
        """The node's lease now: every running VM's MJF is updated in place and
        its end moved (it is stopped by ``ends - grace``)."""
        node = self._node_share(lease)
        for vm in list(self.vms.values()):
            if vm.state is not State.RUNNING or vm.share is None:
                continue
            new = machine_job_features(vm.share, node)
            changed = changed_features(vm.sent, new)
            vm.sent = new
            if changed:
                self._update(vm, ends=vm_end(vm.share, node))
                log.info("vm %s: MJF changed: %s", vm.report.id, ", ".join(sorted(changed)))
                if vm.link is not None:
                    await vm.link.send([encode_file(k, v) for k, v in sorted(changed.items())])

    # -- stopping --------------------------------------------------------------------------

    def _begin_stop(self, vm: _Vm, grace: float, why: str, *, ask: bool = True) -> None:
        if vm.stopping_task is None:
            vm.stopping_task = asyncio.create_task(self._stop_now(vm, grace, why, ask))

    async def _stop_now(self, vm: _Vm, grace: float, why: str, ask: bool) -> None:
        assert vm.qemu is not None
        vm.stop_requested = True
        if vm.state is State.RUNNING:
            self._update(vm, state=State.STOPPING, error=vm.report.error or (None if ask else why))
        log.info("vm %s: stopping (%s), grace %g s", vm.report.id, why, grace)
        if ask:
            if vm.link is not None:
                await vm.link.send([STOP])
            await vm.qemu.powerdown()
        await vm.qemu.end(grace)

    async def _stop(self, vm: _Vm, grace: float | None, why: str) -> None:
        if vm.state is State.INCOMING and not await self._arrived(vm):
            # a migration that is not coming (or not complete): give it up
            await self._fail(vm, VmError(f"the incoming migration was abandoned: {why}"))
            return
        if not vm.booted.is_set():  # its start (a KVM trial too) is still underway
            await vm.booted.wait()  # every step of a start has a deadline
        if vm.state not in LIVE or vm.qemu is None:
            return
        self._begin_stop(vm, self.settings.grace if grace is None else grace, why)
        await vm.done.wait()

    async def wait_vm(self, vm_id: str) -> VmReport:
        """One VM's report once it is over (qemu gone, outcome recorded).

        Raises:
            UnknownVm: no such VM on this node.
        """
        vm = self.vms.get(vm_id)
        if vm is None:
            raise UnknownVm(f"no VM {vm_id!r} on this node")
        await vm.done.wait()
        return vm.report

    async def stop_vm(self, vm_id: str, grace: float | None = None) -> VmReport:
        """Stop one VM (see the module docstring); its report once qemu is gone.

        Raises:
            UnknownVm: no such VM on this node.
        """
        vm = self.vms.get(vm_id)
        if vm is None:
            raise UnknownVm(f"no VM {vm_id!r} on this node")
        await self._stop(vm, grace, "stopped on request")
        return vm.report

    async def _finish(self, vm: _Vm) -> None:
        """qemu is gone: release, judge, back off, record."""
        assert vm.qemu is not None and vm.share is not None
        status = vm.qemu.proc.returncode
        if vm.link is not None:
            vm.link.close()
        for t in vm.tasks:  # the link ends on close; the disk watch waits on an event
            if t is not asyncio.current_task():
                t.cancel()
        waits: list[asyncio.Task[Any] | None] = [*vm.tasks, vm.stopping_task]
        for w in waits:
            if w is not None and w is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(w, 5.0)
        vm.qemu.close()
        self.cores.release_vm(vm.report.cores)
        if vm.migrated_to is not None:  # it runs on the destination now: no outcome here
            self._cleanup_files(vm)
            self._update(
                vm, state=State.MIGRATED, pid=None, stopped=self.clock(),
                outcome=f"migrated to {vm.migrated_to}",
            )  # fmt: skip
            log.info("vm %s: migrated to %s", vm.report.id, vm.migrated_to)
            vm.done.set()
            return
        if vm.stale:
            ending = Ending.HEARTBEAT
        elif vm.stop_requested:
            ending = Ending.HOST_STOP
        elif status not in (0, None):
            ending = Ending.CRASHED
        else:
            ending = Ending.GUEST
        stopped = self.clock()
        outcome = judge(
            started=vm.share.started,
            stopped=stopped,
            ending=ending,
            message=vm.message,
            fizzle_seconds=self.settings.fizzle_seconds,
        )
        self.backoff.record(vm.report.image, outcome, stopped)
        error = vm.report.error
        if ending is Ending.CRASHED:
            error = f"qemu exited with status {status}: {vm.qemu.log_tail() or '-'}"
        self._cleanup_files(vm)
        self._update(
            vm,
            state=State.STOPPED,
            pid=None,
            stopped=stopped,
            code=outcome.code,
            outcome=outcome.text,
            aborted=outcome.aborted,
            fizzled=outcome.fizzled,
            message_problem=outcome.message_problem,
            error=error,
        )
        log.info("vm %s: stopped: %s %s", vm.report.id, outcome.code or "-", outcome.text)
        vm.done.set()

    def _cleanup_files(self, vm: _Vm) -> None:
        for name in (OVERLAY, QMP_SOCKET, TO_GUEST_SOCKET, FROM_GUEST_SOCKET):
            with contextlib.suppress(OSError):
                (vm.dir / name).unlink()
        remove_psk(vm.dir)

    # -- live migration ----------------------------------------------------------------------

    async def incoming(self, req: IncomingRequest, *, host: str) -> Waiting:
        """Destination of a migration: the VM's qemu waiting for its disk (NBD
        export of an empty overlay over this node's own copy of the signed
        base image) and its memory, each behind a relay on ``host`` that
        admits only the holder of the migration's key (:mod:`vm.relay`). The
        key is derived from ``req.source_key`` and a key pair made here, whose
        public half the answer carries. It runs here once the memory arrived.

        Raises:
            ImageRefused, VmRefused: as for :meth:`start_vm` (this node's policy,
                mount and cores decide), or the id is already here.
            VmConfigError: ``source_key`` is not a usable public key (nothing started).
            QemuError, MigrationError: the overlay, qemu or a relay could not
                start (recorded as failed).
        """
        if self._closing:
            raise VmRefused("the node is shutting down")
        earlier = self.vms.get(req.vm_id)
        if earlier is not None and earlier.state not in (State.FAILED, State.MIGRATED):
            raise VmRefused(f"VM {req.vm_id} is already on this node")
        if req.software and self.software is None:
            raise VmRefused("the VM has the software mount (9p); this node exports none")
        pair = KeyPair()
        source_key = parse_public_key("source_key", req.source_key)
        keys = pair.keys(source_key, vm_id=req.vm_id, source=False, field="source_key")
        image = self.find_image(req.image)
        try:
            lease = await asyncio.to_thread(self.lease_at, time.monotonic())
        except RunnerError as exc:
            raise VmRefused(f"the node's lease is unknown: {exc}") from None
        node = self._node_share(lease)
        if not self.cores.claim_vm(lease.cores, req.cores):
            raise VmRefused(f"{req.cores} cores asked, not free of the lease's {lease.cores}")
        now = self.clock()
        vm_dir = self.root / req.vm_id
        if earlier is not None:  # a failed try, or the VM left and comes back: kept aside
            try:
                _set_aside(vm_dir, self.root / OLD / req.vm_id)
            except OSError as exc:
                self.cores.release_vm(req.cores)
                raise VmError(f"cannot set {vm_dir} aside: {exc.strerror}") from None
        report = VmReport(
            id=req.vm_id, image=str(req.image), state=State.STARTING.value, cores=req.cores,
            memory=req.memory, created=now, dir=str(vm_dir), software=req.software,
            accelerator=req.accelerator, accelerator_why=f"as on {req.source} (migrated)",
            migrated_from=req.source, agent=req.agent,
        )  # fmt: skip
        try:
            vm_dir.mkdir(parents=True)
            (vm_dir / "joboutputs").mkdir()
        except OSError as exc:
            self.cores.release_vm(req.cores)
            raise VmError(f"cannot make {vm_dir}: {exc.strerror}") from None
        vm = _Vm(report, vm_dir, req.user_data)
        vm.share = VmShare(req.vm_id, req.cores, req.memory, req.started,
                           req.ends - req.started, self.settings.grace)  # fmt: skip
        self.vms[req.vm_id] = vm
        self._save(vm)
        s = self.settings
        try:
            overlay = vm.dir / OVERLAY
            await create_overlay(s.qemu_img, image.path, image.format, overlay, s.start_timeout)
            spec = QemuSpec(
                qemu=s.qemu, overlay=overlay, memory=req.memory, cores=req.cores,
                accelerator=req.accelerator, software=self.software if req.software else None,
                incoming=True,
            )  # fmt: skip
            # read by qemu at each TLS handshake; gone on arrival. Its directory
            # (0700) also holds qemu's two listening sockets, for the relays only.
            write_psk(vm.dir, keys.psk)
            vm.qemu = await QemuProcess.start(command_line(spec), vm.dir, deadline=s.start_timeout)
            await vm.qemu.add_tls("server")
            await vm.qemu.export_disk()
            await vm.qemu.incoming()
            name = f"vm {req.vm_id}"
            disk = IncomingRelay(key=keys.admission, channel="disk",
                                 target=vm.qemu.path(DISK_SOCKET), name=name)  # fmt: skip
            memory = IncomingRelay(key=keys.admission, channel="memory",
                                   target=vm.qemu.path(MEMORY_SOCKET), name=name)  # fmt: skip
            vm.relays = [disk, memory]
            nbd_port, migrate_port = await disk.start(host), await memory.start(host)
        except BaseException as exc:
            await self._fail(vm, exc)
            raise
        vm.sent = machine_job_features(vm.share, node)
        self._update(vm, state=State.INCOMING, pid=vm.qemu.pid, ends=vm_end(vm.share, node))
        vm.tasks = [asyncio.create_task(self._await_incoming(vm))]
        return Waiting(vm.report, nbd_port, migrate_port, pair.public_hex)

    async def _arrived(self, vm: _Vm) -> bool:
        """Does the destination's qemu run the VM already (the memory came,
        :meth:`_await_incoming` is about to see it)?"""
        if vm.qemu is None or not vm.qemu.running:
            return False
        try:
            return bool((await vm.qemu.execute("query-status")).get("status") == "running")
        except QemuError:
            return False

    async def _close_relays(self, vm: _Vm) -> None:
        relays, vm.relays = vm.relays, []
        for r in relays:
            await r.close()

    async def _fail(self, vm: _Vm, exc: BaseException) -> None:
        """A start (or an incoming migration) failed: end what began, record why."""
        if vm.link is not None:
            vm.link.close()
        for t in vm.tasks:
            if t is not asyncio.current_task():
                t.cancel()
        await self._close_relays(vm)
        if vm.qemu is not None:
            await vm.qemu.kill()
            vm.qemu.close()
        self.cores.release_vm(vm.report.cores)
        self._cleanup_files(vm)
        error = str(exc) if isinstance(exc, VmError) else f"{type(exc).__name__}: {exc}"
        self._update(vm, state=State.FAILED, error=error, pid=None, stopped=self.clock())
        vm.done.set()
        vm.booted.set()

    async def _await_incoming(self, vm: _Vm) -> None:
        """Destination: wait for the memory; then run the VM here."""
        assert vm.qemu is not None
        q = vm.qemu
        end = time.monotonic() + 2 * MIGRATE_DEADLINE
        try:
            while True:
                if not q.running:
                    raise QemuError(f"qemu exited during the migration: {q.log_tail() or '-'}")
                if time.monotonic() > end:
                    raise QemuError("the migration did not arrive in time")
                if (await q.execute("query-status")).get("status") == "running":
                    break
                await asyncio.sleep(0.1)
            await self._close_relays(vm)
            await q.end_export()
            await q.drop_tls()  # this VM may move on: the source's credentials are a client's
            remove_psk(vm.dir)
        except (QemuError, Exception) as exc:
            log.error("vm %s: incoming migration failed: %s", vm.report.id, exc)
            vm.tasks = []
            await self._fail(vm, exc)
            return
        # The agent says HELLO again when it sees the ports reopen; until then
        # its heartbeat is counted from its arrival.
        self._update(vm, state=State.RUNNING, started=self.clock(), booted=self.clock())
        log.info("vm %s: arrived from %s", vm.report.id, vm.report.migrated_from)
        vm.link = PortLink(
            q.path(TO_GUEST_SOCKET), q.path(FROM_GUEST_SOCKET),
            greeting=lambda: self._greeting(vm), on_event=lambda e: self._on_event(vm, e),
            name=f"vm {vm.report.id}",
        )  # fmt: skip
        vm.tasks = [
            asyncio.create_task(vm.link.run()),
            asyncio.create_task(self._watch_disk(vm)),
        ]
        vm.booted.set()
        await self._watch(vm)

    async def _refuse_blocked(self, vm_id: str, q: QemuProcess) -> None:
        """Raises VmRefused if qemu would refuse to migrate the VM now."""
        blockers = await q.migration_blockers()
        if blockers:
            raise VmRefused(migration_blocked(vm_id, blockers))

    async def prepare_migration(self, vm_id: str) -> IncomingRequest:
        """Source of a migration, first step: what the destination needs
        (``POST /v1/vms/incoming``'s body, ``source`` left for the caller to
        name), with the public half of a fresh X25519 key pair for this
        migration only, kept here for :meth:`migrate_vm` (a later prepare
        replaces it). A VM that qemu would not migrate now (a guest with the
        software mount's 9p export mounted) is refused here, before any
        destination starts anything.

        Raises:
            UnknownVm: no such VM.
            VmRefused: it is not running, or qemu blocks its migration (why).
            QemuError: QMP failed.
        """
        vm = self.vms.get(vm_id)
        if vm is None:
            raise UnknownVm(f"no VM {vm_id!r} on this node")
        if vm.state is not State.RUNNING or vm.share is None or vm.qemu is None:
            raise VmRefused(f"VM {vm_id} is {vm.state.value}: only a running VM migrates")
        await self._refuse_blocked(vm_id, vm.qemu)
        vm.migration_pair = KeyPair()
        r = vm.report
        return IncomingRequest(
            vm_id=vm_id, image=parse_image_name(r.image), cores=r.cores, memory=r.memory,
            accelerator=r.accelerator or "tcg", software=r.software, started=r.created,
            ends=r.ends or vm.share.started + vm.share.lifetime, source="",
            source_key=vm.migration_pair.public_hex, agent=r.agent, user_data=vm.user_data,
        )  # fmt: skip

    async def migrate_vm(
        self, vm_id: str, *, host: str, nbd_port: int, migrate_port: int, to: str, key: bytes
    ) -> VmReport:
        """Source of a migration: mirror the overlay into the destination's
        NBD export, send the memory, end the qemu here; the report (state
        ``migrated``). ``key`` is the destination's public key: with the key
        pair :meth:`prepare_migration` made (used once: gone after this call,
        whatever its end) it gives the TLS key of both streams and the
        admission key of the destination's relays, which both streams reach
        through this daemon's relays. The guest keeps running throughout
        (paused for qemu's downtime only); on failure it keeps running here.

        Raises:
            UnknownVm: no such VM.
            VmRefused: it is not running, no migration was prepared, or qemu
                blocks its migration (why).
            VmConfigError: ``key`` is not a usable public key.
            MigrationError: the destination's relay refused or did not answer
                (it runs on here).
            QemuError: the mirror or the migration failed (it runs on here).
        """
        vm = self.vms.get(vm_id)
        if vm is None:
            raise UnknownVm(f"no VM {vm_id!r} on this node")
        if vm.state is not State.RUNNING or vm.qemu is None:
            raise VmRefused(f"VM {vm_id} is {vm.state.value}: only a running VM migrates")
        pair, vm.migration_pair = vm.migration_pair, None
        if pair is None:
            raise VmRefused(
                f"no migration of VM {vm_id} was prepared (POST /v1/vms/{vm_id}/migration first)"
            )
        keys = pair.keys(key, vm_id=vm_id, source=True)  # VmConfigError
        q = vm.qemu
        await self._refuse_blocked(vm_id, q)  # the guest may have mounted since
        self._update(vm, state=State.MIGRATING)
        name = f"vm {vm_id}"
        relays = [
            OutgoingRelay(key=keys.admission, channel="disk", path=q.path(DISK_SOCKET),
                          host=host, port=nbd_port, name=name),
            OutgoingRelay(key=keys.admission, channel="memory", path=q.path(MEMORY_SOCKET),
                          host=host, port=migrate_port, name=name),
        ]  # fmt: skip
        began = time.monotonic()
        try:
            write_psk(vm.dir, keys.psk)  # its directory (0700) holds the relays' sockets too
            vm.relays = list(relays)
            for r in relays:
                await r.start()
            await q.add_tls("client")  # qemu reads the client's key here, once
            await q.mirror_to(MIGRATE_DEADLINE)
            info = await q.migrate_to(MIGRATE_DEADLINE)
            await q.cancel_mirror()  # the destination has the disk and runs
            # qemu's last bytes may still be on their way through the relays:
            # the streams end when the destination has loaded them.
            ended = await asyncio.gather(*(r.finish(RELAY_FINISH_DEADLINE) for r in relays))
            for r, ok in zip(relays, ended, strict=True):
                if not ok:
                    log.warning("vm %s: the %s stream to %s did not end within %g s",
                                vm_id, r.channel, to, RELAY_FINISH_DEADLINE)  # fmt: skip
        except (QemuError, MigrationError) as exc:
            await q.cancel_mirror()
            await q.drop_tls()
            if q.running:
                self._update(vm, state=State.RUNNING)
            # a relay knows better than qemu why its stream ended (a refused key)
            cause = next((r.error for r in relays if r.error is not None), exc)
            kind = MigrationError if isinstance(cause, MigrationError) else QemuError
            raise kind(f"migration of {vm_id} to {to} failed: {cause}") from None
        finally:
            await self._close_relays(vm)
            remove_psk(vm.dir)
        vm.migrated_to = to
        self._update(
            vm, migrated_to=to, migration_seconds=time.monotonic() - began,
            migration_downtime_ms=info.get("downtime"),
        )  # fmt: skip
        with contextlib.suppress(QemuError):
            await q.execute("quit")
        try:
            await asyncio.wait_for(vm.done.wait(), 15.0)  # _watch sees qemu gone
        except TimeoutError:
            await q.kill()
            await vm.done.wait()
        return vm.report

    # -- records ---------------------------------------------------------------------------

    def _update(self, vm: _Vm, *, state: State | None = None, **changes: Any) -> None:
        if state is not None and state is not vm.state:
            vm.state = next_state(vm.state, state)
            changes["state"] = state.value
        vm.report = dataclasses.replace(vm.report, **changes)
        self._save(vm)

    def _save(self, vm: _Vm) -> None:
        data = json.dumps(to_json(vm.report), indent=1).encode()
        try:
            write_file_atomic(vm.dir / RECORD, data, durable=vm.state not in LIVE)
        except OSError as exc:  # a full disk must not stop the VM's bookkeeping
            log.error("vm %s: cannot write its record: %s", vm.report.id, exc.strerror)

    def _load_records(self) -> None:
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            try:
                doc = json.loads((d / RECORD).read_text())
                report = VmReport(**doc)
            except (OSError, ValueError, TypeError) as exc:
                if not d.name.startswith("."):  # .kvm-probe, OLD: no VMs
                    log.warning("vm: ignoring %s: %s", d, exc)
                continue
            vm = _Vm(report, d, None)
            if vm.state in LIVE:
                left = _end_left_qemu(report.pid, d)
                for name in (OVERLAY, QMP_SOCKET, TO_GUEST_SOCKET, FROM_GUEST_SOCKET):
                    with contextlib.suppress(OSError):
                        (d / name).unlink()
                remove_psk(d)
                vm.report = dataclasses.replace(
                    report,
                    state=State.STOPPED.value,
                    pid=None,
                    stopped=report.stopped or time.time(),
                    outcome="the node daemon stopped while it ran"
                    + (f" (its qemu, pid {report.pid}, was killed)" if left else ""),
                )
                vm.state = State.STOPPED
                self._save(vm)
            vm.done.set()
            self.vms[report.id] = vm

    # -- reports ---------------------------------------------------------------------------

    def get(self, vm_id: str) -> VmReport:
        """Raises: UnknownVm."""
        vm = self.vms.get(vm_id)
        if vm is None:
            raise UnknownVm(f"no VM {vm_id!r} on this node")
        return vm.report

    def list(self) -> list[VmReport]:
        return [v.report for _, v in sorted(self.vms.items())]

    def status(self) -> VmsReport:
        chosen = self.accelerator.chosen
        live = [v for v in self.vms.values() if v.state in LIVE]
        return VmsReport(
            accelerator=None if chosen is None else chosen.name,
            accelerator_why=None if chosen is None else chosen.why,
            running=len(live),
            cores=sum(v.report.cores for v in live),
            backed_off=self.backoff.snapshot(self.clock()),
            vms=self.list(),
            ledger=dataclasses.asdict(self.cores.snapshot()),
        )


def migration_blocked(vm_id: str, blockers: list[str]) -> str:
    """One line: why qemu will not migrate ``vm_id`` now (its ``blocked-reasons``)."""
    why = "; ".join(" ".join(b.split()) for b in blockers)
    hint = ""
    if any("VirtFS" in b or SOFTWARE_TAG in b for b in blockers):
        hint = (
            " (the guest has the software mount (9p) mounted: qemu 7.2 cannot migrate it"
            " until the guest unmounts /swarm, which the agent does when its payload exits)"
        )
    return f"VM {vm_id} cannot migrate now: {why}{hint}"


def _set_aside(vm_dir: Path, old: Path) -> None:
    """Move an ended VM's directory to ``old/N`` (the first free N), so its
    id may come to this node again and nothing of the earlier one is lost.

    Raises:
        OSError: it cannot be moved.
    """
    old.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.name) for p in old.iterdir() if p.name.isdigit()), default=0)
    vm_dir.rename(old / str(n))


def _no_images(image: ImageName) -> ImageLookup:
    raise VmRefused(f"unknown image {image}: this service has no images")


def _end_left_qemu(pid: int | None, vm_dir: Path) -> bool:
    """Kill the qemu a killed node left running for ``vm_dir``: only if
    ``pid`` still is a process whose working directory is ``vm_dir``."""
    if not pid:
        return False
    try:
        if os.readlink(f"/proc/{pid}/cwd") != str(vm_dir.resolve()):
            return False
        os.kill(pid, 9)
    except OSError:
        return False
    return True


def node_image_finder(node: Any) -> ImageFinder:
    """The :data:`ImageFinder` of a :class:`swarm.node.Node`: an image of a
    followed repository that the mount shows (the site policy accepted it),
    refused with the policy's reason, or unknown."""
    from trust.exceptions import TrustError

    def find(image: ImageName) -> ImageLookup:
        mount = node.config.mount
        if mount is None:
            raise VmRefused("the node has no mount (mount): VMs boot from images in it")
        follower = node.repos.get(image.repo)
        if follower is None:
            raise VmRefused(f"unknown image {image}: the node does not follow {image.repo}")
        key = f"{image.name}/{image.version}"
        refused = follower.refused_images.get(key)
        if refused is not None:
            raise ImageRefused(f"image {image} is refused by the site policy: {refused}")
        if (image.name, image.version) not in follower.images:
            raise VmRefused(f"unknown image {image}: not a signed image of {image.repo}")
        try:
            target = follower.trusted.image(image.name, image.version)
        except TrustError as exc:
            raise VmRefused(f"image {image}: {exc}") from None
        fmt = "raw" if target is None else target.format
        if fmt not in ("raw", "qcow2", "iso", "vmdk", "vhdx", "vdi"):
            raise VmRefused(f"image {image}: format {fmt!r} cannot be booted")
        path = mount / ".images" / image.repo / image.name / image.version
        return ImageLookup(path, "raw" if fmt == "iso" else fmt)

    return find
