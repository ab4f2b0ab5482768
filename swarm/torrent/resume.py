"""Resume data: the one owner of ``STATE_DIR/<info_hash>.resume``.

Only this module reads, asks libtorrent for, and writes resume data.  A
torrent's resume data is saved at most every ``resume_interval`` seconds
while pieces arrive, at once when it completes, and a last time when the
session closes (after the session is paused, so nothing changes after that
save).  A SIGKILL thus loses at most ``resume_interval`` of progress, and a
restart neither downloads nor hashes again what was saved.

Invariants:

* resume data never claims a piece whose blocks are not in the file yet
  (after a SIGKILL the restarted node would serve zeros as verified data).
  libtorrent's ``flush_disk_cache`` flag does not wait for the flush, so a
  save notes the pieces had, flushes (a fence after their writes), then asks
  for resume data and keeps only those pieces.  So a save may leave out
  pieces libtorrent listed; they are had after the snapshot, so a later save
  is already due, and it asks unconditionally (``only_if_modified`` would be
  refused: libtorrent thinks it saved them);
* files are replaced atomically (write, fsync, rename), and the writes of one
  torrent land in the order they were asked for;
* unreadable resume data, or resume data of another torrent, is ignored
  (libtorrent then checks the files) with a log line naming the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import libtorrent as lt

from swarm.transfer import TorrentMeta

log = logging.getLogger(__name__)

# How long closing waits for the last saves, and then for their writes.
CLOSE_TIMEOUT = 30.0


class Resumable(Protocol):
    """What the store uses of a torrent (a ``TorrentTransfer``)."""

    meta: TorrentMeta
    handle: Any  # libtorrent's torrent_handle: save_resume_data

    @property
    def complete(self) -> bool: ...

    def have_snapshot(self) -> bytes:
        """One byte per piece, 1 where the piece is had (verified) now."""
        ...

    def flush(self, callback: Callable[[bool], None]) -> None:
        """``callback(True)`` once what libtorrent holds so far is written."""
        ...


@dataclass
class _Saves:
    """The saves of one torrent."""

    last_save: float = 0.0
    timer: asyncio.TimerHandle | None = None
    outstanding: int = 0  # asked for, not yet landed
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    snapshots: deque[bytes] = field(default_factory=deque)  # pieces had when each flush began
    write: asyncio.Task[None] | None = None
    idle_waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        return (
            self.timer is not None
            or self.outstanding > 0
            or (self.write is not None and not self.write.done())
        )


class ResumeStore:
    """Resume data of the session's torrents in ``state_dir``."""

    def __init__(self, state_dir: Path, interval: float, loop: asyncio.AbstractEventLoop) -> None:
        self.state_dir = state_dir
        self.interval = interval
        self._loop = loop
        self._saves: dict[str, _Saves] = {}
        self._closing = False

    def path(self, info_hash: str) -> Path:
        return self.state_dir / f"{info_hash}.resume"

    def load(self, meta: TorrentMeta) -> Any:
        """libtorrent's ``add_torrent_params`` from the saved resume data of
        ``meta``, or None if there is none usable (never raises)."""
        path = self.path(meta.info_hash)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read resume data %s: %s", meta.name, path, exc)
            return None
        try:
            atp = lt.read_resume_data(data)
        except RuntimeError as exc:
            log.warning("%s: ignoring unreadable resume data %s: %s", meta.name, path, exc)
            return None
        if atp.info_hashes.v2.to_bytes().hex() != meta.info_hash:
            log.warning("%s: ignoring resume data %s of another torrent", meta.name, path)
            return None
        return atp

    def pending(self, info_hash: str) -> bool:
        """Progress not yet in the resume file (a save is due, asked or being written)."""
        saves = self._saves.get(info_hash)
        return saves is not None and saves.pending

    async def wait_saved(self, info_hash: str) -> None:
        """Until the torrent's progress so far is in its resume file."""
        saves = self._saves.get(info_hash)
        while saves is not None and saves.pending:
            fut: asyncio.Future[None] = self._loop.create_future()
            saves.idle_waiters.append(fut)
            await fut

    # -- driven by the session ------------------------------------------------

    def progress(self, transfer: Resumable) -> None:
        """A piece was had: save now if the torrent is complete, else soon."""
        if transfer.complete:
            self.save(transfer)
            return
        saves = self._of(transfer)
        if saves.timer is not None or self._closing:
            return
        delay = saves.last_save + self.interval - self._loop.time()
        if delay <= 0:
            self.save(transfer)
        else:
            saves.timer = self._loop.call_later(delay, self.save, transfer)

    def save(self, transfer: Resumable) -> asyncio.Future[None]:
        """Save the torrent's resume data (see the module's invariants); the
        future resolves when every save asked for so far has landed."""
        saves = self._of(transfer)
        fut: asyncio.Future[None] = self._loop.create_future()
        saves.last_save = self._loop.time()
        if saves.timer is not None:
            saves.timer.cancel()
            saves.timer = None
        saves.outstanding += 1
        saves.waiters.append(fut)
        snapshot = transfer.have_snapshot()

        def flushed(ok: bool) -> None:
            if not ok:  # the torrent failed: nothing trustworthy to save
                self._landed(transfer, None)
                return
            try:
                # Never only_if_modified: libtorrent's last resume data may
                # have listed pieces this store left out (not yet in the
                # snapshot), and it would refuse to save them again.
                transfer.handle.save_resume_data(0)
            except RuntimeError as exc:
                log.warning("%s: cannot save resume data: %s", transfer.meta.name, exc)
                self._landed(transfer, None)
                return
            saves.snapshots.append(snapshot)

        transfer.flush(flushed)
        return fut

    def on_saved(self, transfer: Resumable, params: Any) -> None:
        """libtorrent's resume data (``save_resume_data_alert.params``), to be
        serialized now: the alert dies at the next pop."""
        saves = self._of(transfer)
        if saves.snapshots:
            flushed = saves.snapshots.popleft()
            params.have_pieces = [
                bool(had and i < len(flushed) and flushed[i])
                for i, had in enumerate(params.have_pieces)
            ]
        self._landed(transfer, bytes(lt.write_resume_data_buf(params)))

    def on_save_failed(self, transfer: Resumable, message: str) -> None:
        """libtorrent did not save (``message`` says why)."""
        saves = self._of(transfer)
        if saves.snapshots:
            saves.snapshots.popleft()
        log.warning("%s: resume data not saved: %s", transfer.meta.name, message)
        self._landed(transfer, None)

    def forget(self, transfer: Resumable) -> None:
        """The torrent was removed: no more saves (writes under way finish)."""
        saves = self._saves.get(transfer.meta.info_hash)
        if saves is not None and saves.timer is not None:
            saves.timer.cancel()
            saves.timer = None
            self._check_idle(saves)

    async def close(self, transfers: Iterable[Resumable]) -> None:
        """Save every torrent a last time and wait for the files (each wait
        bounded by ``CLOSE_TIMEOUT``).  Call with the session paused."""
        self._closing = True
        transfers = list(transfers)
        waits = [self.save(t) for t in transfers]
        if waits:
            _, not_done = await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
            if not_done:
                log.error("resume data of %d torrents not saved in time", len(not_done))
        writes = [s.write for s in self._saves.values() if s.write is not None]
        if writes:
            await asyncio.wait(writes, timeout=CLOSE_TIMEOUT)
        for saves in self._saves.values():
            if saves.timer is not None:
                saves.timer.cancel()
                saves.timer = None
            for fut in saves.waiters + saves.idle_waiters:
                if not fut.done():
                    fut.set_result(None)

    # -- internals --------------------------------------------------------------

    def _of(self, transfer: Resumable) -> _Saves:
        return self._saves.setdefault(transfer.meta.info_hash, _Saves())

    def _landed(self, transfer: Resumable, data: bytes | None) -> None:
        saves = self._of(transfer)
        if data is not None:
            write = self._loop.create_task(
                _write_after(saves.write, self.path(transfer.meta.info_hash), data)
            )
            write.add_done_callback(lambda _: self._check_idle(saves))
            saves.write = write
        saves.outstanding = max(0, saves.outstanding - 1)
        if saves.outstanding == 0:
            waiters, saves.waiters = saves.waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._check_idle(saves)

    def _check_idle(self, saves: _Saves) -> None:
        if saves.pending:
            return
        waiters, saves.idle_waiters = saves.idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


async def _write_after(previous: asyncio.Task[None] | None, path: Path, data: bytes) -> None:
    """Write resume data after the previous write of the same torrent (order matters)."""
    if previous is not None:
        with contextlib.suppress(Exception):
            await previous
    try:
        await asyncio.to_thread(_atomic_write, path, data)
    except OSError as exc:
        log.error("cannot write resume data %s: %s", path, exc)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
