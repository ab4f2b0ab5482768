"""qemu for one VM: its command line, its overlay, its process and its QMP monitor.

:func:`command_line` is pure (a :class:`QemuSpec` in, argv out): the per-VM
qcow2 overlay over the read-only base image (the file in the node's FUSE
mount), the two virtio-serial ports of the guest contract backed by unix
socket chardevs qemu serves (``server=on,wait=off``), the optional read-only
9p export of the node's software mount (tag ``swarm-software``), the serial
console to a file, no display, no network device.

:class:`QemuProcess` is the thin adapter: qemu runs in its own process group
(a signal to the node is not one to qemu; the node ends it itself), with its
working directory the VM's directory so every socket path is short (a unix
socket path has at most 107 bytes; the node reaches them through
``/proc/self/fd/DIRFD/NAME``); QMP goes through the ``qemu.qmp`` library and
every call has a deadline. Stopping is ACPI ``system_powerdown``, then
``quit``, then SIGKILL to the PID, each step only if the one before did not
end qemu in time.

Live migration (the libvirt way: the destination's NBD export of an empty
overlay, the source's ``blockdev-mirror sync=top`` into it, then
``migrate``) runs both streams over TLS: a ``tls-creds-psk`` object over a
key file (``migration-tls/keys.psk``, identity ``swarm``) that exists only
while that migration runs; the NBD server takes no client without it. qemu
never faces the network for it: both streams go through unix sockets of
that private directory (0700), the destination's qemu listening on them and
the source's qemu connecting to the node daemon's, whose relays
(:mod:`vm.relay`) carry them between the nodes.

:class:`AcceleratorChoice` decides KVM or TCG once per daemon: ``kvm`` and
``tcg`` are taken as configured; ``auto`` boots a probe guest under KVM that
must print a line on its serial console within a deadline, and falls back to
TCG (software emulation) when ``/dev/kvm`` is unusable or the probe fails (on
some machines a Linux guest hangs under KVM right after the BIOS); without a
probe guest the first VM itself is the probe (its agent must say HELLO in
time under KVM, else it is restarted under TCG).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm.channel import PORT_FROM_GUEST, PORT_TO_GUEST
from vm.exceptions import QemuError, QemuExited

log = logging.getLogger("vm.qemu")

QMP_SOCKET = "qmp.sock"
TO_GUEST_SOCKET = "vac-host.sock"  # chardev of org.swarm.vac.host (host -> guest)
FROM_GUEST_SOCKET = "vac-guest.sock"  # chardev of org.swarm.vac.guest (guest -> host)
SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
SOFTWARE_TAG = "swarm-software"
ACCELERATORS = ("auto", "kvm", "tcg")
QMP_DEADLINE = 10.0  # seconds for one QMP command
EXPORT = "swarm-disk"  # the destination's NBD export of its overlay
MIRROR_JOB = "swarm-mirror"
MIRROR_TARGET = "swarm-mirror-target"
TLS_CREDS = "swarm-tls"  # the migration's tls-creds-psk object (NBD export and memory stream)
PSK_DIR = "migration-tls"  # in the VM's directory, 0700: keys.psk (0600) while it migrates
PSK_FILE = "keys.psk"  # the name qemu's tls-creds-psk reads in its dir
PSK_USER = "swarm"  # the PSK identity both sides name
DISK_SOCKET = f"{PSK_DIR}/disk.sock"  # the NBD stream's unix socket (relative to qemu's cwd)
MEMORY_SOCKET = f"{PSK_DIR}/memory.sock"  # the memory stream's
MiB = 1 << 20


@dataclass(frozen=True)
class QemuSpec:
    """What one VM's qemu is started with. Paths in ``vm_dir``'s names are
    relative to it (qemu's working directory)."""

    qemu: str  # the qemu-system-x86_64 to run
    overlay: Path  # the VM's qcow2 overlay (its backing file is the base image)
    memory: int  # bytes
    cores: int
    accelerator: str  # "kvm" or "tcg"
    software: Path | None = None  # the node's mount root, exported read-only over 9p
    disk: str = "virtio"  # the drive's interface
    qmp: bool = True  # the KVM probe runs without a monitor
    incoming: bool = False  # a migration's destination: waits for migrate-incoming


def _opt(value: object) -> str:
    """A value inside a qemu option list: commas are doubled."""
    return str(value).replace(",", ",,")


def command_line(spec: QemuSpec) -> list[str]:
    """qemu's argv for ``spec`` (see the module docstring)."""
    if spec.accelerator not in ("kvm", "tcg"):
        raise ValueError(f"accelerator {spec.accelerator!r} is not kvm or tcg")
    argv = [
        spec.qemu,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        f"pc,accel={spec.accelerator}",
        "-cpu",
        "host" if spec.accelerator == "kvm" else "max",
        "-m",
        f"{max(1, spec.memory // MiB)}M",
        "-smp",
        str(spec.cores),
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",  # a guest that reboots (or panics) has ended
        "-drive",
        f"file={_opt(spec.overlay)},format=qcow2,if={spec.disk},cache=writeback",
        "-chardev",
        f"socket,id=vac_host,path={TO_GUEST_SOCKET},server=on,wait=off",
        "-chardev",
        f"socket,id=vac_guest,path={FROM_GUEST_SOCKET},server=on,wait=off",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        f"virtserialport,bus=vser0.0,chardev=vac_host,name={PORT_TO_GUEST}",
        "-device",
        f"virtserialport,bus=vser0.0,chardev=vac_guest,name={PORT_FROM_GUEST}",
        "-chardev",
        f"file,id=console,path={SERIAL_LOG}",
        "-serial",
        "chardev:console",
    ]
    if spec.qmp:
        argv += ["-qmp", f"unix:{QMP_SOCKET},server=on,wait=off"]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    if spec.software is not None:
        argv += [
            "-fsdev",
            f"local,id=swsoft,path={_opt(spec.software)},security_model=none,readonly=on",
            "-device",
            f"virtio-9p-pci,fsdev=swsoft,mount_tag={SOFTWARE_TAG}",
        ]
    return argv


async def run_bounded(argv: list[str], deadline: float, what: str) -> str:
    """Run ``argv`` (a short tool: qemu-img) to its end within ``deadline``
    seconds; its output.

    Raises:
        QemuError: it could not start, failed (its message), or took longer
            (it is killed).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise QemuError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), deadline)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise QemuError(f"{what}: {argv[0]} did not finish within {deadline:g} s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        last = " ".join(text.splitlines()[-2:]) if text else f"exit status {proc.returncode}"
        raise QemuError(f"{what}: {last}")
    return text


async def create_overlay(
    qemu_img: str, base: Path, base_format: str, overlay: Path, deadline: float
) -> None:
    """A qcow2 overlay at ``overlay`` whose backing file is ``base`` (never written).

    Raises:
        QemuError: qemu-img failed or did not finish within ``deadline``.
    """
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base)]
    await run_bounded([*argv, str(overlay)], deadline, "overlay")


def write_psk(vm_dir: Path, psk: str) -> None:
    """``vm_dir/PSK_DIR/keys.psk`` (dir 0700, file 0600, created afresh) in
    the ``identity:hexkey`` form qemu's ``tls-creds-psk`` reads.

    Raises:
        QemuError: the file could not be written.
    """
    remove_psk(vm_dir)
    d = vm_dir / PSK_DIR
    try:
        d.mkdir(mode=0o700)
        fd = os.open(d / PSK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{PSK_USER}:{psk}\n".encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise QemuError(f"cannot write the migration key in {d}: {exc.strerror}") from None


def remove_psk(vm_dir: Path) -> None:
    """Remove the migration key of ``vm_dir`` and the migration's sockets
    (nothing if there are none)."""
    d = vm_dir / PSK_DIR
    with contextlib.suppress(OSError):
        for entry in os.listdir(d):  # only ours: the key and the two sockets
            with contextlib.suppress(OSError):
                (d / entry).unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


class QemuProcess:
    """One running qemu (see the module docstring). Create with :meth:`start`."""

    def __init__(self, proc: asyncio.subprocess.Process, vm_dir: Path, dirfd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.vm_dir = vm_dir
        self._dirfd = dirfd
        self._qmp: Any = None

    def path(self, name: str) -> Path:
        """A socket of this VM's directory, by a path short enough to connect to."""
        return Path(f"/proc/self/fd/{self._dirfd}/{name}")

    @classmethod
    async def start(cls, argv: list[str], vm_dir: Path, *, deadline: float) -> QemuProcess:
        """Start qemu in ``vm_dir`` (its own process group) and connect QMP.

        Raises:
            QemuError: qemu could not be started, exited, or its QMP socket
                did not answer within ``deadline`` seconds (qemu is killed
                then; the message carries the end of its log).
        """
        dirfd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with open(vm_dir / QEMU_LOG, "ab") as qlog:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=vm_dir,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=qlog,
                    stderr=qlog,
                    start_new_session=True,
                )
        except OSError as exc:
            os.close(dirfd)
            raise QemuError(f"cannot run {argv[0]}: {exc.strerror}") from None
        self = cls(proc, vm_dir, dirfd)
        try:
            await self._connect_qmp(deadline)
        except BaseException:
            await self.kill()
            self.close()
            raise
        return self

    def log_tail(self, lines: int = 3) -> str:
        return _tail(self.vm_dir / QEMU_LOG, lines)

    def exit_reason(self) -> str:
        """Why qemu ended (call once it has): its status and last words."""
        return exit_reason(self.proc.returncode, self.vm_dir / QEMU_LOG)

    async def _connect_qmp(self, deadline: float) -> None:
        from qemu.qmp import QMPClient
        from qemu.qmp.error import QMPError

        end = time.monotonic() + deadline
        why = "no QMP socket"
        while time.monotonic() < end:
            if self.proc.returncode is not None:
                break
            if not os.path.exists(self.path(QMP_SOCKET)):  # qemu has not bound it yet
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.05)
                continue
            client = QMPClient(f"vm-{self.pid}")
            try:
                await asyncio.wait_for(
                    client.connect(str(self.path(QMP_SOCKET))), end - time.monotonic()
                )
                self._qmp = client
                return
            except (OSError, QMPError, TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
                with contextlib.suppress(Exception):
                    await client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 0.1)
        if self.proc.returncode is not None:
            raise QemuExited(self.exit_reason())
        raise QemuError(f"qemu's QMP did not answer within {deadline:g} s: {why}")

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        """A QMP command, within :data:`QMP_DEADLINE`.

        Raises:
            QemuError: no monitor, qemu refused it, or no answer in time.
        """
        from qemu.qmp.error import QMPError

        if self._qmp is None:
            raise QemuError(f"{command}: no QMP connection")
        try:
            return await asyncio.wait_for(self._qmp.execute(command, args), QMP_DEADLINE)
        except TimeoutError:
            raise QemuError(f"{command}: no QMP answer within {QMP_DEADLINE:g} s") from None
        except (QMPError, OSError) as exc:
            raise QemuError(f"{command}: {exc}") from None

    async def block_io_error(self) -> dict[str, Any]:
        """The data of qemu's next ``BLOCK_IO_ERROR`` event (waits until one
        comes; the caller cancels it when qemu is gone).

        Raises:
            QemuError: no QMP connection.
        """
        if self._qmp is None:
            raise QemuError("BLOCK_IO_ERROR: no QMP connection")
        with self._qmp.listener("BLOCK_IO_ERROR") as listener:
            event = await listener.get()
        return dict(event.get("data", {}))

    # -- live migration (the libvirt way: NBD + blockdev-mirror sync=top, then migrate) --

    async def disk_node(self) -> str:
        """The node name of the VM's disk (its qcow2 overlay).

        Raises:
            QemuError: no disk, or QMP failed.
        """
        for b in await self.execute("query-block"):
            inserted = b.get("inserted")
            if inserted and inserted.get("node-name"):
                return str(inserted["node-name"])
        raise QemuError("query-block: the VM has no disk")

    async def add_tls(self, endpoint: str) -> None:
        """The migration's TLS credentials: a ``tls-creds-psk`` object of
        ``endpoint`` ("server": the destination, "client": the source) over
        the key :func:`write_psk` wrote (relative: qemu runs in the VM's
        directory), used for the memory stream as well.

        Raises:
            QemuError: QMP failed (no key file, ...).
        """
        creds: dict[str, Any] = {"qom-type": "tls-creds-psk", "id": TLS_CREDS,
                                 "endpoint": endpoint, "dir": PSK_DIR}  # fmt: skip
        if endpoint == "client":  # the server looks the client's identity up in the file
            creds["username"] = PSK_USER
        await self.execute("object-add", creds)
        await self.execute("migrate-set-parameters", {"tls-creds": TLS_CREDS})

    async def drop_tls(self) -> None:
        """Forget the migration's credentials (errors ignored: they may be gone)."""
        with contextlib.suppress(QemuError):
            await self.execute("migrate-set-parameters", {"tls-creds": ""})
        with contextlib.suppress(QemuError):
            await self.execute("object-del", {"id": TLS_CREDS})

    async def migration_blockers(self) -> list[str]:
        """Why qemu would refuse to migrate this VM now (``query-migrate``'s
        ``blocked-reasons``: a guest with the 9p export mounted, ...); empty
        if nothing blocks it.

        Raises:
            QemuError: QMP failed.
        """
        info = await self.execute("query-migrate")
        return [str(r) for r in info.get("blocked-reasons") or []]

    async def export_disk(self) -> None:
        """Destination: serve the (empty) overlay over NBD, writable, for the
        source's mirror, on :data:`DISK_SOCKET` (the daemon's relay reaches
        it); only to a client holding the migration's key (:meth:`add_tls`
        first: a plain NBD client is refused).

        Raises:
            QemuError: QMP failed.
        """
        node = await self.disk_node()
        addr = {"type": "unix", "data": {"path": DISK_SOCKET}}
        await self.execute("nbd-server-start", {"addr": addr, "tls-creds": TLS_CREDS})
        await self.execute(
            "block-export-add",
            {"type": "nbd", "id": EXPORT, "node-name": node, "writable": True, "name": EXPORT},
        )

    async def end_export(self) -> None:
        """Destination: stop serving the disk (errors ignored: it may be gone)."""
        with contextlib.suppress(QemuError):
            await self.execute("block-export-del", {"id": EXPORT, "mode": "hard"})
        with contextlib.suppress(QemuError):
            await self.execute("nbd-server-stop")

    async def mirror_to(self, deadline: float) -> None:
        """Source: mirror the overlay (``sync=top``: the base is the same
        signed image on both sides) into the destination's NBD export (over
        TLS: :meth:`add_tls` first; through the daemon's relay at
        :data:`DISK_SOCKET`), until the mirror is in step (then every write
        goes to both).

        Raises:
            QemuError: QMP failed, the job failed, or not ready in time.
        """
        node = await self.disk_node()
        server = {"type": "unix", "path": DISK_SOCKET}
        await self.execute(
            "blockdev-add",
            {"driver": "nbd", "node-name": MIRROR_TARGET, "server": server, "export": EXPORT,
             "tls-creds": TLS_CREDS},
        )  # fmt: skip
        await self.execute(
            "blockdev-mirror",
            {"job-id": MIRROR_JOB, "device": node, "target": MIRROR_TARGET, "sync": "top"},
        )
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            jobs = [j for j in await self.execute("query-block-jobs") if j["device"] == MIRROR_JOB]
            if not jobs:
                raise QemuError("the disk mirror ended before it was in step")
            if jobs[0].get("ready"):
                return
            await asyncio.sleep(0.1)
        raise QemuError(f"the disk mirror was not in step within {deadline:g} s")

    async def cancel_mirror(self) -> None:
        """Source: end the mirror and drop its target (errors ignored)."""
        with contextlib.suppress(QemuError):
            await self.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
        for _ in range(50):
            try:
                jobs = await self.execute("query-block-jobs")
            except QemuError:
                return
            if not any(j["device"] == MIRROR_JOB for j in jobs):
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(QemuError):
            await self.execute("blockdev-del", {"node-name": MIRROR_TARGET})

    async def migrate_to(self, deadline: float) -> dict[str, Any]:
        """Source: send the memory and device state (over TLS: :meth:`add_tls`
        first; through the daemon's relay at :data:`MEMORY_SOCKET`); qemu's
        final report.

        Raises:
            QemuError: the migration failed or did not complete in time (it
                is cancelled; the guest keeps running here).
        """
        await self.execute("migrate", {"uri": f"unix:{MEMORY_SOCKET}"})
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            info: dict[str, Any] = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            await asyncio.sleep(0.05)
        with contextlib.suppress(QemuError):
            await self.execute("migrate_cancel")
        raise QemuError(f"the migration did not complete within {deadline:g} s")

    async def incoming(self) -> None:
        """Destination: listen for the memory on :data:`MEMORY_SOCKET` (TLS:
        :meth:`add_tls` first; the daemon's relay reaches it).

        Raises:
            QemuError: QMP failed.
        """
        await self.execute("migrate-incoming", {"uri": f"unix:{MEMORY_SOCKET}"})

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def wait(self, timeout: float | None = None) -> int | None:
        """qemu's exit status, or None if it still runs after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def powerdown(self) -> None:
        """Press the ACPI power button (errors are logged: stopping goes on)."""
        try:
            await self.execute("system_powerdown")
        except QemuError as exc:
            log.info("vm %s: system_powerdown: %s", self.pid, exc)

    async def end(self, grace: float) -> int:
        """End qemu: wait ``grace`` s (the caller already asked the guest to
        stop), then ``quit`` (5 s), then SIGKILL. Its exit status."""
        status = await self.wait(grace)
        if status is None and self.running:
            with contextlib.suppress(QemuError):
                await self.execute("quit")
            status = await self.wait(5.0)
        if status is None:
            await self.kill()
            status = self.proc.returncode
        return -9 if status is None else status

    async def kill(self) -> None:
        """SIGKILL qemu by its PID (it is our child: the PID is still ours)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10.0)

    def close(self) -> None:
        """Drop the QMP connection and the directory handle (qemu must be gone)."""
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            # The socket is gone with qemu; disconnect() only tidies the client.
            task = asyncio.ensure_future(qmp.disconnect())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1


def exit_reason(returncode: int | None, log_path: Path) -> str:
    """``qemu exited with status N: <the end of its log>``."""
    return f"qemu exited with status {returncode}: {_tail(log_path) or '-'}"


def _tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` lines of a log, on one line ("" if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " ".join(text.strip().splitlines()[-lines:])


# -- the accelerator ---------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" or "tcg"
    why: str  # how it was chosen (shown in the VM's status)
    provisional: bool = False  # KVM on trial: the first VM's agent must say HELLO in time


def kvm_usable(path: str = "/dev/kvm") -> str | None:
    """None if ``path`` can be opened read-write, else why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    os.close(fd)
    return None


class AcceleratorChoice:
    r"""KVM or TCG, decided once per daemon (see the module docstring).

    ``probe(deadline)`` boots the probe guest under KVM and returns None if it
    printed its line within ``deadline`` seconds, else why not. Without a
    probe guest, ``auto`` with a usable ``/dev/kvm`` gives KVM *on trial*
    (``provisional``): the caller boots the first VM under KVM and
    :meth:`settle`\ s the verdict (its agent said HELLO within
    ``probe_seconds``, or it is restarted under TCG).
    """

    def __init__(
        self,
        setting: str,
        probe: Callable[[float], Awaitable[str | None]] | None,
        *,
        probe_seconds: float,
        kvm_problem: Callable[[], str | None] = kvm_usable,
    ) -> None:
        if setting not in ACCELERATORS:
            raise ValueError(f"accelerator {setting!r} is not one of {', '.join(ACCELERATORS)}")
        self.setting = setting
        self._probe = probe
        self.probe_seconds = probe_seconds
        self._kvm_problem = kvm_problem
        self._chosen: Accelerator | None = None
        self._lock = asyncio.Lock()

    @property
    def chosen(self) -> Accelerator | None:
        """The verdict, once there is one (never a provisional choice)."""
        return self._chosen

    async def choose(self) -> Accelerator:
        async with self._lock:
            if self._chosen is not None:
                return self._chosen
            decided = await self._decide()
            if not decided.provisional:
                self.settle(decided)
            return decided

    def settle(self, verdict: Accelerator) -> None:
        """The accelerator every VM of this daemon gets from now on."""
        self._chosen = verdict
        log.info("vm accelerator: %s (%s)", verdict.name, verdict.why)

    async def _decide(self) -> Accelerator:
        if self.setting != "auto":
            return Accelerator(self.setting, "configured (accelerator)")
        problem = self._kvm_problem()
        if problem is not None:
            return Accelerator("tcg", f"software emulation: KVM unusable ({problem})")
        if self._probe is None:
            return Accelerator(
                "kvm",
                f"KVM on trial: the first VM's agent must say HELLO within"
                f" {self.probe_seconds:g} s",
                provisional=True,
            )
        failed = await self._probe(self.probe_seconds)
        if failed is not None:
            kind = "KVM unusable" if failed.startswith("qemu exited") else "the KVM probe failed"
            return Accelerator("tcg", f"software emulation: {kind} ({failed})")
        return Accelerator("kvm", f"KVM: the probe guest booted within {self.probe_seconds:g} s")


async def probe_serial_line(
    argv: list[str], work_dir: Path, line: bytes, deadline: float
) -> str | None:
    """Run a probe guest (``argv``, writing its serial console to
    ``work_dir/serial.log``) until ``line`` appears there or ``deadline``
    seconds pass; the guest is killed either way. None: the line appeared."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / SERIAL_LOG).unlink(missing_ok=True)
    try:
        with open(work_dir / QEMU_LOG, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=work_dir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
    except OSError as exc:
        return f"cannot run {argv[0]}: {exc.strerror}"
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                if line in (work_dir / SERIAL_LOG).read_bytes():
                    return None
            if proc.returncode is not None:
                # qemu itself failed (seen: an MSR assertion under KVM on
                # some hosts): say what it printed last.
                return exit_reason(proc.returncode, work_dir / QEMU_LOG)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.2)
        return f"no {line.decode(errors='replace')!r} on its console within {deadline:g} s"
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
