"""The test guest image and its agent, booted under qemu (TCG, software emulation).

Each test boots the image built by ``swarm_testing.guest_image`` (once per session,
from the cache) with a minimal qemu command line of its own: the two virtio-serial
ports of the contract as unix-socket chardevs (qemu the server), a qcow2 overlay on
the base, the serial console to a file, QMP on a socket. A small host-side speaker
plays the host's part of the wire protocol (docs/VMS.md).

Every qemu started here is killed by its PID in a finally; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from swarm_testing.guest_image import (
    DEFAULT_CACHE,
    PROBE_INIT,
    PROBE_LINE,
    GuestImage,
    GuestImageError,
    build_guest_image,
    build_probe_image,
)
from swarm_testing.waiting import eventually

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(150)]

BOOT_DEADLINE = 75.0  # s until HELLO under TCG: ~10 s idle, ~25 s on a loaded 2-core machine
STEP_DEADLINE = 30.0  # s for any later event (the agent polls outputs once a second)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest_image()


class Speaker:
    """The host end of the two ports: lines out on ``org.swarm.vac.host``, lines in
    from ``org.swarm.vac.guest``, collected in ``received``."""

    def __init__(self, host_sock: Path, guest_sock: Path) -> None:
        self.host_sock, self.guest_sock = host_sock, guest_sock
        self.received: list[str] = []
        self._buf = b""
        self._out: socket.socket | None = None
        self._in: socket.socket | None = None

    def connect(self, deadline: float = 10.0) -> None:
        """Connect both ports (qemu creates the sockets as it starts)."""
        self._out = _connect(self.host_sock, deadline)
        self._in = _connect(self.guest_sock, deadline)
        self._in.settimeout(0.2)

    def close(self) -> None:
        for s in (self._out, self._in):
            if s is not None:
                s.close()
        self._out = self._in = None
        self._buf = b""

    def send(self, line: str) -> None:
        assert self._out is not None
        self._out.sendall(line.encode() + b"\n")

    def send_file(self, relpath: str, data: bytes) -> None:
        self.send(f"FILE {relpath} {base64.b64encode(data).decode()}")

    def _pump(self) -> None:
        assert self._in is not None
        try:
            chunk = self._in.recv(1 << 20)
        except TimeoutError:
            return
        if not chunk:
            raise AssertionError("qemu closed the guest port")
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        self.received.extend(line.decode() for line in lines)

    def wait_for(self, what: str, match: Callable[[str], bool], timeout: float) -> str:
        """The first received line (new or already collected) that ``match`` accepts."""

        def check() -> str | None:
            self._pump()
            return next((line for line in self.received if match(line)), None)

        return eventually(what, check, timeout, interval=0)

    def outputs(self) -> dict[str, bytes]:
        """The last content the guest shipped for each joboutputs file."""
        got: dict[str, bytes] = {}
        for line in self.received:
            if line.startswith("FILE joboutputs/"):
                _, rel, b64 = line.split(" ", 2)
                got[rel.removeprefix("joboutputs/")] = base64.b64decode(b64)
        return got


def _connect(path: Path, deadline: float) -> socket.socket:
    def attempt() -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        return s

    return eventually(f"qemu's socket {path.name}", attempt, deadline, interval=0.05)


class Guest:
    """One qemu booting the test image under TCG, with a speaker on its ports."""

    def __init__(self, image: GuestImage, vmdir: Path, software: Path | None) -> None:
        self.dir = vmdir
        self.overlay = vmdir / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image.path,
             self.overlay],
            check=True, timeout=30,
        )  # fmt: skip
        self.console = vmdir / "console.log"
        self.qmp_sock = vmdir / "qmp.sock"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-smp", "1",
            "-display", "none", "-nic", "none", "-no-reboot", "-nodefaults",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2",
            "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=vachost,path={vmdir / 'host.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=vachost,name=org.swarm.vac.host",
            "-chardev", f"socket,id=vacguest,path={vmdir / 'guest.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=vacguest,name=org.swarm.vac.guest",
        ]  # fmt: skip
        if software is not None:
            argv += ["-virtfs", f"local,path={software},mount_tag=swarm-software,"
                     "security_model=none,readonly=on"]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.speaker = Speaker(vmdir / "host.sock", vmdir / "guest.sock")

    def wait_exit(self, timeout: float) -> int:
        """qemu's exit status, once it has exited by itself."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"qemu still running after {timeout:g} s\n{self.log()}") from None

    def log(self) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "--- console (last lines) ---\n" + "\n".join(text.splitlines()[-25:])

    def powerdown(self) -> None:
        """Press the ACPI power button through QMP (``system_powerdown``)."""

        async def press() -> None:
            qmp = QMPClient("test")
            await asyncio.wait_for(qmp.connect(str(self.qmp_sock)), 10)
            try:
                await asyncio.wait_for(qmp.execute("system_powerdown"), 10)
            finally:
                await qmp.disconnect()

        asyncio.run(press())

    def kill(self) -> None:
        self.speaker.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def boot(tmp_path: Path, guest_image: GuestImage) -> Iterator[Callable[..., Guest]]:
    guests: list[Guest] = []

    def start(software: Path | None = None) -> Guest:
        g = Guest(guest_image, tmp_path, software)
        guests.append(g)
        g.speaker.connect()
        return g

    try:
        yield start
    finally:
        for g in guests:
            g.kill()


def is_hello(line: str) -> bool:
    return line.startswith("HELLO ")


def give_files(g: Guest, user_data: str, cores: int = 1) -> None:
    """The host's set: MJF keys and user_data, then READY."""
    g.speaker.send_file("machinefeatures/cores", f"{cores}\n".encode())
    g.speaker.send_file("jobfeatures/wall_limit_secs", b"600\n")
    g.speaker.send_file("user_data", user_data.encode())
    g.speaker.send("READY")


def test_probe_image_boots_linux_prints_its_line_and_powers_off(tmp_path: Path) -> None:
    """The accelerator probe is a Linux boot (a tiny non-Linux guest runs under this
    machine's KVM where Linux does not); under TCG it prints and qemu exits by itself."""
    probe = build_probe_image()
    console = tmp_path / "probe.log"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-nodefaults", "-display", "none",
         "-nic", "none", "-no-reboot", "-serial", f"file:{console}",
         "-drive", f"file={probe.path},if=virtio,format=raw,readonly=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.wait(BOOT_DEADLINE) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert PROBE_LINE in console.read_text(errors="replace").splitlines()


def test_concurrent_builders_end_with_one_complete_image(tmp_path: Path) -> None:
    """Two builds of the same inputs at once into an empty cache (its kernel package
    already fetched) both return the one image directory; no temporary is left."""
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    inputs = json.loads((build_probe_image().path.parent / "inputs.json").read_text())
    kernel_deb = DEFAULT_CACHE / "debs" / inputs["kernel_deb"]
    shutil.copyfile(kernel_deb, cache / "debs" / kernel_deb.name)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: build_probe_image(cache=cache), range(2))
    assert a == b
    assert sorted(p.name for p in cache.iterdir()) == sorted(["debs", a.key])
    assert PROBE_INIT.encode() in gzip.decompress(_initrd_of(a))


def _initrd_of(image: GuestImage) -> bytes:
    r = subprocess.run(["mtype", "-i", image.path, "::/initrd.gz"], capture_output=True,
                       check=True, timeout=30)  # fmt: skip
    return r.stdout


def test_bad_pad_is_refused_in_one_line() -> None:
    with pytest.raises(GuestImageError, match="pad_bytes must be >= 0"):
        build_guest_image(pad_bytes=-1)


def test_image_is_one_raw_bootable_file_with_its_pad(tmp_path: Path) -> None:
    image = build_guest_image(pad_bytes=4 * 1024 * 1024 + 1)
    assert image.pad_bytes == 4 * 1024 * 1024 + 512  # whole sectors
    assert image.path.stat().st_size == image.size == image.boot_bytes + image.pad_bytes
    with image.path.open("rb") as f:
        boot = f.read(512)
        f.seek(image.boot_bytes)
        pad = f.read(1 << 20)
    assert boot[510:512] == b"\x55\xaa"  # a BIOS boot sector
    assert b"SYSLINUX" in boot or b"SWARMVAC" in boot
    assert len(zlib.compress(pad)) > 0.99 * len(pad)  # incompressible
    assert build_guest_image(pad_bytes=4 * 1024 * 1024 + 1) == image  # cached


def test_guest_reads_mjf_runs_software_ships_heartbeat_and_200_then_powers_off(
    boot: Callable[..., Guest], tmp_path: Path
) -> None:
    software = tmp_path / "software"
    (software / "bin").mkdir(parents=True)
    (software / "bin" / "square.sh").write_text('echo "square=$(( $1 * $1 ))"\n')
    g = boot(software)
    hello = g.speaker.wait_for("HELLO", is_hello, BOOT_DEADLINE)
    boot_s = time.monotonic() - g.started
    assert hello == "HELLO 1"
    give_files(
        g,
        cores=3,
        user_data=(
            "touch $JOBOUTPUTS/vm-heartbeat\n"
            'echo "cores=$(cat $MACHINEFEATURES/cores)" > $JOBOUTPUTS/result\n'
            "sh $SWARM_SOFTWARE/bin/square.sh 12 >> $JOBOUTPUTS/result\n"
            "echo '200 done' > $JOBOUTPUTS/shutdown_message\n"
        ),
    )
    g.speaker.wait_for("DONE", lambda line: line == "DONE", STEP_DEADLINE)
    assert g.wait_exit(STEP_DEADLINE) == 0, g.log()
    outputs = g.speaker.outputs()
    assert outputs["result"] == b"cores=3\nsquare=144\n", g.log()
    assert "vm-heartbeat" in outputs
    assert outputs["shutdown_message"] == b"200 done\n"
    assert g.speaker.received[-1] == "DONE"
    print(f"boot to HELLO under TCG: {boot_s:.1f} s")


def test_user_data_exiting_without_shutdown_message_gets_none_invented(
    boot: Callable[..., Guest],
) -> None:
    g = boot()
    g.speaker.wait_for("HELLO", is_hello, BOOT_DEADLINE)
    give_files(g, "echo hi > $JOBOUTPUTS/said\n")
    g.speaker.wait_for("DONE", lambda line: line == "DONE", STEP_DEADLINE)
    assert g.wait_exit(STEP_DEADLINE) == 0
    assert g.speaker.outputs() == {"said": b"hi\n"}


LOOPING_PAYLOAD = "while :; do touch $JOBOUTPUTS/vm-heartbeat; sleep 1; done\n"


def test_stop_ends_the_payload_with_100_and_powers_off(boot: Callable[..., Guest]) -> None:
    g = boot()
    g.speaker.wait_for("HELLO", is_hello, BOOT_DEADLINE)
    give_files(g, LOOPING_PAYLOAD)
    g.speaker.wait_for("heartbeat", lambda x: x.startswith("FILE joboutputs/vm-heartbeat "), 30)
    g.speaker.send("STOP")
    g.speaker.wait_for("DONE", lambda line: line == "DONE", STEP_DEADLINE)
    assert g.wait_exit(STEP_DEADLINE) == 0
    assert g.speaker.outputs()["shutdown_message"] == b"100 Shutdown as requested by the host\n"


def test_acpi_power_button_stops_like_stop(boot: Callable[..., Guest]) -> None:
    g = boot()
    g.speaker.wait_for("HELLO", is_hello, BOOT_DEADLINE)
    give_files(g, LOOPING_PAYLOAD)
    g.speaker.wait_for("heartbeat", lambda x: x.startswith("FILE joboutputs/vm-heartbeat "), 30)
    g.powerdown()
    g.speaker.wait_for("DONE", lambda line: line == "DONE", STEP_DEADLINE)
    assert g.wait_exit(STEP_DEADLINE) == 0
    assert g.speaker.outputs()["shutdown_message"] == b"100 Shutdown as requested by the host\n"


def test_reopened_port_gets_hello_again_and_nothing_resent(boot: Callable[..., Guest]) -> None:
    g = boot()
    g.speaker.wait_for("HELLO", is_hello, BOOT_DEADLINE)
    give_files(g, "echo once > $JOBOUTPUTS/first\n" + LOOPING_PAYLOAD)
    g.speaker.wait_for("first output", lambda x: x.startswith("FILE joboutputs/first "), 30)
    g.speaker.close()  # as a daemon restart does
    g.speaker.received.clear()
    # A close and reconnect faster than the guest's kernel can tell it apart from no
    # close at all shows the guest nothing (hence the host sends its set on every
    # connect); here the test reconnects once the guest has seen the close.
    eventually("the guest to see the close", lambda: "end of file on the host port" in g.log(), 30)
    g.speaker.connect()
    g.speaker.wait_for("HELLO again", is_hello, STEP_DEADLINE)
    g.speaker.wait_for("heartbeat", lambda x: x.startswith("FILE joboutputs/vm-heartbeat "), 30)
    g.speaker.send("STOP")
    g.speaker.wait_for("DONE", lambda line: line == "DONE", STEP_DEADLINE)
    assert g.wait_exit(STEP_DEADLINE) == 0
    assert "first" not in g.speaker.outputs()  # shipped before, unchanged: not again
