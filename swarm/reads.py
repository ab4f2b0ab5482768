"""Reads from FUSE and worker threads through the node's event loop.

The event loop owns libtorrent; FUSE callbacks arrive on libfuse's threads.
:class:`LoopBridge` is the one way such a thread waits on the loop: it runs a
coroutine there and waits for it until a *deadline* on the node's clock,
cancelling it when the deadline passes, and is never called on the loop
thread itself.

:class:`SwarmObjectSource` reads a repository's objects: from the swarm when
a torrent of this node names them, else (or if the swarm cannot deliver in
time) from the origin.  One deadline per fetch, ``timeout`` seconds from its
start: the swarm gets the first half of it when an origin can take over (all
of it otherwise), the origin what is left, so a reader has its bytes or EIO
within ``timeout``, and the error names both the swarm's and the origin's
reason.  :class:`NodeImage` reads a VM image's pieces the same way.

Nothing here verifies: the object cache checks every object's SHA-256 before
a reader sees it, and libtorrent checks image pieces against the signed
merkle root.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cvmfs_like.exceptions import ObjectUnavailable
from swarm.exceptions import TransferError
from swarm.metrics import FetchMeters
from swarm.origin_client import OriginObjectSource
from swarm.transfer import Transfer

T = TypeVar("T")


class LoopBridge:
    """Run coroutines on ``loop`` from other threads, each waited for until
    a deadline on ``clock`` (a :func:`time.monotonic`-like clock)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.loop = loop
        self.clock = clock

    def run(self, coro: Coroutine[Any, Any, T], deadline: float) -> T:
        """The coroutine's result, by ``deadline``.

        Raises:
            TimeoutError: not done by the deadline (it is cancelled).
            whatever the coroutine raises.
        """
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(max(0.0, deadline - self.clock()))
        except TimeoutError:
            fut.cancel()
            raise


@dataclass
class Holding:
    """Where one object can be read from the swarm."""

    transfer: Transfer
    file_index: int


class SwarmObjectSource:
    """Objects of one repository (module docstring).  Called from FUSE and
    worker threads only."""

    def __init__(
        self,
        repo: str,
        bridge: LoopBridge,
        origin: OriginObjectSource | None,
        *,
        timeout: float,
        meters: FetchMeters | None = None,
    ) -> None:
        self.repo = repo
        self.meters = FetchMeters() if meters is None else meters
        self.bridge = bridge
        self.origin = origin
        self.timeout = timeout
        self.index: dict[str, Holding] = {}  # replaced whole, never changed in place
        self.from_swarm = 0
        self.from_origin = 0

    def fetch(self, digest: str, size: int) -> bytes:
        """The object's (unverified) bytes, within ``timeout`` seconds.

        Raises:
            ObjectUnavailable: neither the swarm nor the origin delivered in
                time; the message names both reasons.
        """
        start = self.bridge.clock()
        deadline = start + self.timeout
        held = self.index.get(digest)
        swarm_error = "no torrent of this node names it"
        if held is not None:
            swarm_time = self.timeout if self.origin is None else self.timeout / 2
            try:
                data = self.bridge.run(
                    held.transfer.read(held.file_index, 0, size), start + swarm_time
                )
                self.from_swarm += 1
                self.meters.object_fetch.labels("swarm").observe(self.bridge.clock() - start)
                return data
            except TimeoutError:
                swarm_error = f"the swarm did not deliver within {swarm_time:g} s"
            except TransferError as exc:
                swarm_error = f"swarm: {exc}"
            self.meters.object_fetch_failures.labels("swarm").inc()
        if self.origin is None:
            raise ObjectUnavailable(digest, f"{swarm_error}, and no origin is configured")
        try:
            data = self.origin.fetch(digest, size, deadline=deadline)
        except ObjectUnavailable as exc:
            self.meters.object_fetch_failures.labels("origin").inc()
            raise ObjectUnavailable(digest, f"{swarm_error}; {exc.reason}") from exc
        self.from_origin += 1
        self.meters.object_fetch.labels("origin").observe(self.bridge.clock() - start)
        self.meters.origin_bytes.inc(len(data))
        return data


@dataclass
class NodeImage:
    """A VM image served by the mount, read through its torrent (ImageFile)."""

    repo: str
    name: str
    version: str
    size: int
    published: int
    sha256: str
    transfer: Transfer
    bridge: LoopBridge
    timeout: float
    meters: FetchMeters = field(default_factory=FetchMeters)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the image, within ``timeout`` seconds.

        Raises:
            ObjectUnavailable: the pieces did not arrive in time, or the
                torrent failed.
        """
        start = self.bridge.clock()
        deadline = start + self.timeout
        try:
            data = self.bridge.run(self.transfer.read(0, offset, size), deadline)
        except TimeoutError:
            self.meters.image_read_failures.inc()
            raise ObjectUnavailable(
                self.transfer.meta.info_hash, f"image pieces not delivered in {self.timeout:g} s"
            ) from None
        except TransferError as exc:
            self.meters.image_read_failures.inc()
            raise ObjectUnavailable(self.transfer.meta.info_hash, str(exc)) from exc
        self.meters.image_read.observe(self.bridge.clock() - start)
        return data

    def xattrs(self) -> dict[str, bytes]:
        return {
            "repository": self.repo.encode(),
            "image": self.name.encode(),
            "version": self.version.encode(),
            "hash": self.sha256.encode(),
            "info_hash": self.transfer.meta.info_hash.encode(),
        }
