"""The wire protocol between the node and a guest agent, and the host's side of the ports.

Two virtio-serial ports carry ASCII lines ending in ``\\n``, fields separated
by one space (``docs/VMS.md``, the guest contract)::

    host -> guest:  FILE <relpath> <base64>   relpath: machinefeatures/KEY,
                                              jobfeatures/KEY or user_data
                    READY                     the set above is complete
                    STOP                      the host asks the guest to stop
    guest -> host:  HELLO <agent-version>
                    FILE joboutputs/<name> <base64>
                    DONE

The protocol core (:func:`encode_file`, :class:`GuestDecoder`) has no socket
in it, in the manner of h11: bytes in, events out. Decoding is strict and
bounded: a line longer than :data:`MAX_LINE` is dropped up to its newline and
a malformed one is skipped, each giving a :class:`Refused` event that says
why; nothing a guest sends can raise out of :meth:`GuestDecoder.receive`,
or make it hold more than :data:`MAX_LINE` bytes.

:class:`PortLink` is the one place that touches the ports: the node's
connection to the two unix-socket chardevs qemu serves, reconnecting until
closed (qemu restarted the socket, a migration, a daemon restart), every
write with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from vm.contract import MJF_KEY, OUTPUT_NAME

log = logging.getLogger("vm.channel")

MAX_LINE = (1 << 20) + (1 << 10)  # bytes, the newline included
_VERSION = re.compile(rb"^[\x21-\x7e]{1,64}\Z")
_B64 = re.compile(rb"^[A-Za-z0-9+/]*={0,2}\Z")
PORT_TO_GUEST = "org.swarm.vac.host"
PORT_FROM_GUEST = "org.swarm.vac.guest"


# -- host -> guest ---------------------------------------------------------------------


def host_path_problem(relpath: str) -> str | None:
    """None if ``relpath`` is a file the host may send, else why not."""
    if relpath == "user_data":
        return None
    kind, _, key = relpath.partition("/")
    if kind in ("machinefeatures", "jobfeatures") and MJF_KEY.match(key):
        return None
    return f"{relpath[:80]!r} is not machinefeatures/KEY, jobfeatures/KEY or user_data"


def encode_file(relpath: str, data: bytes) -> bytes:
    """``FILE relpath base64\\n``.

    Raises:
        ValueError: ``relpath`` is not a host file, or the line would be
            longer than :data:`MAX_LINE`.
    """
    problem = host_path_problem(relpath)
    if problem is not None:
        raise ValueError(problem)
    line = b"FILE " + relpath.encode() + b" " + base64.b64encode(data) + b"\n"
    if len(line) > MAX_LINE:
        raise ValueError(f"{relpath}: {len(data)} bytes do not fit one line of {MAX_LINE}")
    return line


READY = b"READY\n"
STOP = b"STOP\n"


def max_file_bytes(relpath: str) -> int:
    """The largest file ``relpath`` can carry in one line (base64 grows it by 4/3)."""
    room = MAX_LINE - len(b"FILE  \n") - len(relpath.encode())
    return room // 4 * 3


# -- guest -> host ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    version: str


@dataclass(frozen=True)
class OutputFile:
    name: str  # a $JOBOUTPUTS file name (OUTPUT_NAME)
    data: bytes


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Refused:
    """A line that was not one of the protocol's; nothing else happened."""

    reason: str


GuestEvent = Hello | OutputFile | Done | Refused


def guest_line(*fields: bytes) -> bytes:
    """A guest's line (what the agent writes; tests and fakes use it)."""
    return b" ".join(fields) + b"\n"


def decode_guest_line(line: bytes) -> GuestEvent:
    """One line (without its newline) from a guest, strictly."""
    if line == b"DONE":
        return Done()
    verb, _, rest = line.partition(b" ")
    if verb == b"HELLO":
        if not _VERSION.match(rest):
            return Refused(f"HELLO with a bad agent version {rest[:40]!r}")
        return Hello(rest.decode("ascii"))
    if verb == b"FILE":
        path, sep, payload = rest.partition(b" ")
        kind, _, name = path.partition(b"/")
        if not sep or kind != b"joboutputs":
            return Refused(f"FILE {path[:80]!r} is not joboutputs/NAME followed by base64")
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not OUTPUT_NAME.match(text) or text in (".", ".."):
            return Refused(f"output name {name[:80]!r} is not [A-Za-z0-9._-]{{1,64}}")
        if len(payload) % 4 or not _B64.match(payload):
            return Refused(f"FILE joboutputs/{text}: the content is not base64")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            return Refused(f"FILE joboutputs/{text}: the content is not base64")
        return OutputFile(text, data)
    return Refused(f"unknown line {line[:40]!r}")


class GuestDecoder:
    """Bytes from the guest's port in, :data:`GuestEvent` out (see the module docstring)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False  # inside a line that was already too long

    def receive(self, data: bytes) -> list[GuestEvent]:
        """The events completed by ``data`` (never raises)."""
        events: list[GuestEvent] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            piece = data[start:nl]
            start = nl + 1
            if self._skipping:
                self._skipping = False
                self._buf.clear()
                continue
            if len(self._buf) + len(piece) + 1 > MAX_LINE:
                self._buf.clear()
                events.append(Refused(f"a line longer than {MAX_LINE} bytes"))
                continue
            self._buf += piece
            events.append(decode_guest_line(bytes(self._buf)))
            self._buf.clear()
        rest = data[start:]
        if not self._skipping:
            if len(self._buf) + len(rest) + 1 > MAX_LINE:
                self._buf.clear()
                self._skipping = True
                events.append(Refused(f"a line longer than {MAX_LINE} bytes"))
            else:
                self._buf += rest
        return events


# -- the ports -------------------------------------------------------------------------

RETRY_FIRST = 0.05  # seconds before reconnecting to a port qemu serves
RETRY_MAX = 1.0
WRITE_DEADLINE = 10.0  # a guest that does not read its port cannot hold the node


class PortLink:
    """The node's connection to one VM's two ports (unix sockets qemu serves).

    ``greeting()`` gives the lines to send whenever the host port (re)connects
    (the whole file set and READY); ``on_event`` gets every guest event, in
    order, on the loop. :meth:`run` keeps both connections up, reconnecting,
    until :meth:`close`.
    """

    def __init__(
        self,
        to_guest: Path,
        from_guest: Path,
        *,
        greeting: Callable[[], list[bytes]],
        on_event: Callable[[GuestEvent], Awaitable[None]],
        name: str = "vm",
    ) -> None:
        self.to_guest = to_guest
        self.from_guest = from_guest
        self._greeting = greeting
        self._on_event = on_event
        self.name = name
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self.connects = 0  # host-port connections made (a reconnect counts)
        self.refused = 0  # guest lines refused

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def send(self, lines: list[bytes]) -> bool:
        """Write ``lines`` to the guest if the host port is connected (else
        they go out with the next greeting). False: not sent."""
        async with self._write_lock:
            writer = self._writer
            if writer is None:
                return False
            try:
                writer.write(b"".join(lines))
                await asyncio.wait_for(writer.drain(), WRITE_DEADLINE)
            except (OSError, TimeoutError, ConnectionError) as exc:
                log.warning("%s: write to the guest failed: %s (reconnecting)", self.name, exc)
                self._drop_writer()
                return False
            return True

    def _drop_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    async def run(self) -> None:
        """Keep both ports connected until :meth:`close`."""
        tasks = [
            asyncio.create_task(self._host_port()),
            asyncio.create_task(self._guest_port()),
        ]
        try:
            await self._closed.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self._drop_writer()

    def close(self) -> None:
        self._closed.set()

    async def _connect(self, path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        delay = RETRY_FIRST
        while True:
            try:
                return await asyncio.wait_for(
                    asyncio.open_unix_connection(str(path), limit=MAX_LINE), 5.0
                )
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    async def _host_port(self) -> None:
        while True:
            reader, writer = await self._connect(self.to_guest)
            async with self._write_lock:
                self._writer = writer
                self.connects += 1
            await self.send(self._greeting())
            # Nothing comes this way; EOF means qemu dropped the connection.
            with contextlib.suppress(OSError, ConnectionError):
                while await reader.read(4096):
                    pass
            async with self._write_lock:
                if self._writer is writer:
                    self._drop_writer()

    async def _guest_port(self) -> None:
        while True:
            reader, writer = await self._connect(self.from_guest)
            decoder = GuestDecoder()  # a new connection starts a new line
            try:
                while data := await reader.read(1 << 16):
                    for event in decoder.receive(data):
                        if isinstance(event, Refused):
                            self.refused += 1
                            log.warning("%s: refused from the guest: %s", self.name, event.reason)
                        try:
                            await self._on_event(event)
                        except Exception:  # the node's handler: a bug, never the guest's fault
                            log.exception("%s: handling %s failed", self.name, type(event).__name__)
            except (OSError, ConnectionError) as exc:
                log.info("%s: guest port: %s (reconnecting)", self.name, exc)
            finally:
                writer.close()
