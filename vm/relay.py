"""The migration relays: the node daemon, not qemu, faces the network.

Destination (:class:`IncomingRelay`): a TCP listener per stream (the NBD
disk export, the memory stream) on the node's migration host; qemu listens
on a unix socket in the VM's private migration directory (0700), which only
the daemon reaches. Each connection must pass the admission handshake of
:mod:`vm.handshake` within :data:`ADMISSION_DEADLINE` seconds, reading at
most :data:`vm.handshake.PROOF_BYTES` bytes of it, before a single byte of it
reaches qemu; a refused one is closed and logged, and the listener keeps
listening (a hostile or confused peer that connects first cannot make the
migration fail). At most :data:`MAX_PENDING` connections wait for admission
at once, at most :data:`MAX_PENDING_PER_HOST` of them from one address; more
are closed at once (so one host holding connections open cannot crowd out
the source).

Source (:class:`OutgoingRelay`): qemu migrates (and mirrors its disk) to a
unix socket of the daemon in its own private migration directory; for each
connection qemu opens, the daemon connects to the destination, answers its
challenge and, once admitted, relays.

Relaying copies bytes as they come (no buffering beyond asyncio's transport
water marks, ``TCP_NODELAY`` on, as asyncio sets it): the guest's pause at the
switch-over is qemu's own. qemu's TLS-PSK runs end to end inside the
relayed stream: a relay sees only ciphertext. Every connection of a relay is
closed by :meth:`close`, which the migration calls whatever its end; on
success the source first lets its streams end by themselves
(:meth:`finish`), since qemu reports the migration complete while its last
bytes are still in the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from vm.exceptions import MigrationError
from vm.handshake import (
    ADMITTED,
    MAGIC,
    NONCE_BYTES,
    PROOF_BYTES,
    admits,
    greeting,
    new_nonce,
    nonce_of,
    proof,
)

log = logging.getLogger("vm.relay")

ADMISSION_DEADLINE = 5.0  # seconds for a peer to answer the challenge (and to get one)
CONNECT_DEADLINE = 10.0  # seconds for the source to reach the destination's relay
MAX_PENDING = 64  # connections waiting for admission at once, per listener
MAX_PENDING_PER_HOST = 8  # of those, from one address
CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then half-close (the other direction goes on)."""
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Relay both ways until both ends closed (or either broke); close both."""
    tasks = [asyncio.ensure_future(_pipe(a[0], b[1])), asyncio.ensure_future(_pipe(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for w in (a[1], b[1]):
            w.close()


async def admit(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    key: bytes,
    channel: str,
    deadline: float = ADMISSION_DEADLINE,
) -> str | None:
    """The relay's side of the handshake: None if the peer proved ``key``
    for ``channel`` within ``deadline`` seconds, else why not (the caller
    closes). Reads at most :data:`PROOF_BYTES` bytes of the peer's."""
    nonce = new_nonce()
    try:
        writer.write(greeting(nonce))
        answer = await asyncio.wait_for(reader.readexactly(PROOF_BYTES), deadline)
    except TimeoutError:
        return f"no answer to the challenge within {deadline:g} s"
    except asyncio.IncompleteReadError as exc:
        return f"closed after {len(exc.partial)} bytes of its answer"
    except OSError as exc:
        return f"connection broken: {exc.strerror or exc}"
    if not admits(key, channel, nonce, answer):
        return "wrong answer to the challenge (not the migration's key)"
    writer.write(ADMITTED)
    return None


async def answer_challenge(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    key: bytes,
    channel: str,
    deadline: float = ADMISSION_DEADLINE,
) -> None:
    """The source's side of the handshake, on a fresh connection to the relay.

    Raises:
        MigrationError: the peer is not a migration relay, refused the
            answer (a different key), or did not answer in time.
    """
    try:
        try:
            hello = await asyncio.wait_for(reader.readexactly(len(MAGIC) + NONCE_BYTES), deadline)
        except asyncio.IncompleteReadError:
            raise MigrationError(
                f"the destination's {channel} relay closed the connection before its challenge"
                " (too many connections wait for admission there?)"
            ) from None
        nonce = nonce_of(hello)
        if nonce is None:
            raise MigrationError(f"the {channel} port does not greet as a migration relay")
        writer.write(proof(key, channel, nonce))
        verdict = await asyncio.wait_for(reader.readexactly(len(ADMITTED)), deadline)
    except TimeoutError:
        raise MigrationError(
            f"the destination's {channel} relay did not answer within {deadline:g} s"
        ) from None
    except asyncio.IncompleteReadError:
        raise MigrationError(
            f"the destination refused the {channel} stream: its key differs"
            " (a wrong or forged public key)"
        ) from None
    except OSError as exc:
        raise MigrationError(f"the {channel} connection broke: {exc.strerror or exc}") from None
    if verdict != ADMITTED:
        raise MigrationError(f"the destination's {channel} relay answered {verdict!r}")


async def _tracked(
    tasks: set[asyncio.Task[None]],
    work: Coroutine[Any, Any, None],
    writer: asyncio.StreamWriter,
) -> None:
    """Run one connection's ``work`` as a task of ``tasks`` (which the relay's
    close cancels; asyncio's own connection task is never cancelled: it
    would log the cancellation as an error); close the connection after."""
    task = asyncio.ensure_future(work)
    tasks.add(task)
    try:
        await asyncio.wait([task])
    finally:
        tasks.discard(task)
        task.cancel()
        writer.close()
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("relay connection failed: %r", task.exception())


class _Relay:
    """What both relays share: a listener and the tasks of its connections."""

    _server: asyncio.Server | None
    _tasks: set[asyncio.Task[None]]

    async def finish(self, deadline: float) -> bool:
        """Stop listening and let the connections end by themselves (each
        side closes its stream once it has everything) for at most
        ``deadline`` seconds, then close what is left. True if none was left.

        qemu counts a migration complete once its last byte is in the
        relay's socket: closing the relay then would cut what is still on
        its way to the destination."""
        self._stop_listening()
        ended = True
        if self._tasks:
            _, left = await asyncio.wait(list(self._tasks), timeout=deadline)
            ended = not left
        await self.close()
        return ended

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        """Stop listening and end every connection (safe twice)."""
        self._stop_listening()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class IncomingRelay(_Relay):
    """Destination: a TCP listener that admits the holder of ``key`` to
    ``channel`` and relays it to qemu's unix socket ``target``."""

    def __init__(
        self,
        *,
        key: bytes,
        channel: str,
        target: Path,
        name: str,
        deadline: float = ADMISSION_DEADLINE,
    ) -> None:
        self.key = key
        self.channel = channel
        self.target = target
        self.name = name
        self.deadline = deadline
        self.admitted = 0
        self.refused = 0
        self._pending: dict[str, int] = {}  # address -> connections waiting for admission
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> int:
        """Listen on ``host`` (a free port); the port.

        Raises:
            MigrationError: the port cannot be bound.
        """
        try:
            self._server = await asyncio.start_server(self._serve, host, 0)
        except OSError as exc:
            raise MigrationError(f"cannot listen on {host}: {exc.strerror}") from None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _tracked(self._tasks, self._handle(reader, writer), writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if sum(self._pending.values()) >= MAX_PENDING:
            self._refuse(peer, f"{MAX_PENDING} connections already wait for admission")
            return
        if self._pending.get(host, 0) >= MAX_PENDING_PER_HOST:
            self._refuse(peer, f"{MAX_PENDING_PER_HOST} of its connections already wait")
            return
        self._pending[host] = self._pending.get(host, 0) + 1
        try:
            why = await admit(
                reader, writer, key=self.key, channel=self.channel, deadline=self.deadline
            )
        finally:
            self._pending[host] -= 1
            if not self._pending[host]:
                del self._pending[host]
        if why is not None:
            self._refuse(peer, why)
            return
        try:
            inner = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.target)), CONNECT_DEADLINE
            )
        except (OSError, TimeoutError) as exc:
            log.warning("%s: %s stream admitted but qemu is not listening: %s",
                        self.name, self.channel, exc)  # fmt: skip
            return
        self.admitted += 1
        log.info("%s: %s stream from %s admitted", self.name, self.channel, peer)
        await splice((reader, writer), inner)

    def _refuse(self, peer: object, why: str) -> None:
        self.refused += 1
        log.warning("%s: %s connection from %s refused: %s", self.name, self.channel, peer, why)


class OutgoingRelay(_Relay):
    """Source: a unix listener at ``path`` for qemu; each connection is
    carried to the destination's relay at ``host:port`` once admitted."""

    def __init__(
        self, *, key: bytes, channel: str, path: Path, host: str, port: int, name: str
    ) -> None:
        self.key = key
        self.channel = channel
        self.path = path
        self.host = host
        self.port = port
        self.name = name
        self.error: MigrationError | None = None  # why the last connection failed
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen for qemu at ``path``.

        Raises:
            MigrationError: the socket cannot be made.
        """
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        except OSError as exc:
            raise MigrationError(f"cannot listen for qemu at {self.path}: {exc.strerror}") from None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _tracked(self._tasks, self._handle(reader, writer), writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_DEADLINE
            )
        except (OSError, TimeoutError) as exc:
            self.error = MigrationError(
                f"cannot reach the destination's {self.channel} relay at"
                f" {self.host}:{self.port}: {getattr(exc, 'strerror', None) or 'no answer'}"
            )
            log.warning("%s: %s", self.name, self.error)
            return
        try:
            await answer_challenge(*outer, key=self.key, channel=self.channel)
        except MigrationError as exc:
            self.error = exc
            log.warning("%s: %s", self.name, exc)
            outer[1].close()
            return
        await splice((reader, writer), outer)
