"""One torrent of the session: ``swarm.transfer.Transfer`` over a libtorrent handle.

A thin adapter around the pure :class:`~swarm.torrent.pieces.PieceRequests`:
it turns a reader's call into an event of the core, carries out the core's
actions on the torrent handle (piece deadlines, read-backs) and on the
readers' futures, and feeds the core the session's alerts through the
``on_*`` methods.  It never reads a data file itself: a verified piece may
still sit in libtorrent's store buffer, not yet written, and
``read_piece`` serves it from there too.

Threading: everything runs on the event loop's thread; the session's alert
pump calls the ``on_*`` methods there.

Invariants: every future of a reader is resolved by the core's
:class:`ReadDone`/:class:`ReadFailed` for its read or cancelled by the
reader; once the transfer failed (removed, session closed, storage error)
every read and wait raises the same :class:`TransferError`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import libtorrent as lt

from swarm.exceptions import TransferError
from swarm.torrent.pieces import (
    Action,
    AskPiece,
    Completed,
    PieceRequests,
    ReadAhead,
    ReadDone,
    ReadFailed,
    ReadPiece,
)
from swarm.torrent.settings import format_address
from swarm.torrent.status import TorrentCounters
from swarm.transfer import PeerInfo, TorrentFile, TorrentMeta, TransferStatus

DONT_DOWNLOAD = 0
LOW_PRIORITY = 1


class StatusSource(Protocol):
    """How a transfer asks the session for fresher libtorrent status."""

    def request(self) -> None:
        """Ask for an update soon; the answer arrives through ``on_status``."""
        ...

    def refresh(self) -> Awaitable[None]:
        """Until an update asked for now has arrived."""
        ...


class TorrentTransfer:
    """One torrent in a :class:`~swarm.torrent.session.TorrentSession`
    (implements ``Transfer``).  Made by the session's ``add`` only."""

    def __init__(
        self,
        meta: TorrentMeta,
        save_path: Path,
        handle: Any,
        *,
        stored_paths: Sequence[str],
        num_pieces: int,
        prefetch: bool,
        loop: asyncio.AbstractEventLoop,
        read_ahead: int,
        piece_cache: int,
        status_source: StatusSource,
    ) -> None:
        self.meta = meta
        self.save_path = save_path
        self.handle = handle  # libtorrent's torrent_handle, for the session
        self.rechecked = False  # libtorrent hash-checked files on disk when added
        self._loop = loop
        self._stored_paths = list(stored_paths)
        self._prefetch = prefetch
        self._pieces = PieceRequests(
            meta, num_pieces, clock=loop.time, read_ahead=read_ahead, piece_cache=piece_cache
        )
        self._status_source = status_source
        self._counters = TorrentCounters()
        self._reads: dict[int, asyncio.Future[bytes]] = {}
        self._retry_timer: asyncio.TimerHandle | None = None
        self._complete_waiters: list[asyncio.Future[None]] = []
        self._flush_callbacks: deque[Callable[[bool], None]] = deque()
        self._errors: list[str] = []
        self._error_reason: str | None = None
        self._failed: TransferError | None = None
        self._gone = False  # the handle is no longer valid (removed, closed)

    # -- Transfer protocol ----------------------------------------------

    async def read(self, file_index: int, offset: int, size: int) -> bytes:
        """Verified bytes of ``size`` bytes at ``offset`` of file ``file_index``.

        Short at the end of the file.  Pieces not yet had are asked for with
        deadlines (first piece soonest); if this read continues the previous
        one of the same file, the next ``read_ahead`` bytes are asked for too.
        Every byte returned has passed libtorrent's v2 merkle check.

        Raises :class:`TransferError` if the torrent is removed, the session
        closed or storage failed; ``IndexError``/``ValueError`` for bad
        arguments.
        """
        read_id, actions = self._pieces.read(file_index, offset, size)
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._reads[read_id] = fut
        try:
            self._apply(actions)
            return await fut
        except asyncio.CancelledError:
            self._pieces.cancel(read_id)
            raise
        finally:
            self._reads.pop(read_id, None)

    def have_file(self, file_index: int) -> bool:
        return self._pieces.have_file(file_index)

    def file_path(self, file_index: int) -> Path:
        """Where the file is stored.  Reading it directly is safe only after
        :meth:`wait_complete` (or for pieces had before the session started):
        verified pieces may still be in flight to the file.  Use :meth:`read`.
        """
        self._file(file_index)
        return self.save_path / self._stored_paths[file_index]

    def set_prefetch(self, prefetch: bool) -> None:
        """Full prefetch: every piece at low priority, behind deadline reads.

        Raises :class:`TransferError` if the torrent is gone.
        """
        self._prefetch = prefetch
        priority = LOW_PRIORITY if prefetch else DONT_DOWNLOAD
        try:
            self.handle.prioritize_pieces([priority] * self._pieces.num_pieces)
        except RuntimeError as exc:
            raise TransferError(f"{self.meta.name}: {exc}") from exc
        # Priority 0 drops libtorrent's deadlines: ask again for what is awaited.
        self._apply(self._pieces.deadlines_dropped())

    def status(self) -> TransferStatus:
        """The status as of libtorrent's last update (asks for the next one);
        the state, prefetch, hash failures and errors are current.

        Raises :class:`TransferError` if the torrent is gone.
        """
        if self._gone and self._failed is not None:
            raise self._failed
        self._status_source.request()
        c = self._counters
        reason = self._error_reason or c.error
        if reason is not None:
            state = f"error: {reason}"
        elif c.paused:
            state = "paused"
        elif not self._pieces.ready:
            state = "checking"
        elif self._pieces.complete:
            state = "seeding"
        else:
            state = "downloading"
        return TransferStatus(
            info_hash=self.meta.info_hash,
            name=self.meta.name,
            state=state,
            progress=c.progress,
            total_wanted=c.total_wanted,
            total_done=c.total_done,
            download_rate=c.download_rate,
            upload_rate=c.upload_rate,
            downloaded=c.downloaded,
            uploaded=c.uploaded,
            num_peers=c.num_peers,
            num_seeds=c.num_seeds,
            prefetch=self._prefetch,
            hash_failures=self._pieces.hash_failures,
            errors=list(self._errors),
        )

    def peers(self) -> list[PeerInfo]:
        """Connected peers and web seeds. Raises :class:`TransferError` if gone."""
        try:
            infos = self.handle.get_peer_info()
        except RuntimeError as exc:
            raise TransferError(f"{self.meta.name}: {exc}") from exc
        return [
            PeerInfo(
                address=format_address(*p.ip),
                client=bytes(p.client).decode("utf-8", "replace"),
                download_rate=int(p.payload_down_speed),
                upload_rate=int(p.payload_up_speed),
                downloaded=int(p.total_download),
                uploaded=int(p.total_upload),
                seed=bool(p.flags & lt.peer_info.seed),
            )
            for p in infos
        ]

    async def wait_complete(self) -> None:
        """Until every piece is had and written to the files (see :meth:`file_path`).

        With prefetch off only reads fetch pieces, so this may never return.
        Raises :class:`TransferError` if the torrent goes away first.
        """
        while not self._pieces.complete:
            if self._failed is not None:
                raise self._failed
            fut: asyncio.Future[None] = self._loop.create_future()
            self._complete_waiters.append(fut)
            await fut
        # A piece is "had" once verified, possibly before libtorrent has
        # written all its blocks to the file: wait for those writes.
        flushed: asyncio.Future[bool] = self._loop.create_future()
        self.flush(lambda ok: _resolve(flushed, ok))
        await flushed
        if self._failed is not None:
            raise self._failed

    # -- beyond the protocol ----------------------------------------------

    @property
    def complete(self) -> bool:
        return self._pieces.complete

    @property
    def ready(self) -> bool:
        """libtorrent has finished checking what is on disk."""
        return self._pieces.ready

    @property
    def hash_failures(self) -> int:
        return self._pieces.hash_failures

    @property
    def counters(self) -> TorrentCounters:
        """libtorrent's numbers as of its last status update."""
        return self._counters

    @property
    def awaited(self) -> frozenset[int]:
        """Pieces readers are waiting for."""
        return self._pieces.awaited

    async def updated_status(self) -> TransferStatus:
        """:meth:`status` with libtorrent's numbers as of now (at most a few
        milliseconds later, or as of the last update if none comes in 10 s)."""
        await self._status_source.refresh()
        return self.status()

    def have_snapshot(self) -> bytes:
        """One byte per piece, 1 where the piece is had (verified) now."""
        return self._pieces.have_snapshot()

    def flush(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(True)`` once every block libtorrent has so far is
        written, or ``callback(False)`` if the torrent fails first.

        flush_cache is a fence in libtorrent's disk I/O: its
        cache_flushed_alert comes after every write queued before it.
        """
        if self._failed is not None:
            callback(False)
            return
        self._flush_callbacks.append(callback)
        try:
            self.handle.flush_cache()
        except RuntimeError as exc:
            self.fail(f"{exc}", gone=True)

    def fail(self, reason: str, *, gone: bool = False) -> None:
        """The transfer can no longer serve (``reason``: removed, session
        closed, libtorrent error): fail every read, flush and wait.  ``gone``:
        the handle is no longer valid either, so neither is a status."""
        self._gone = self._gone or gone
        if self._failed is None:
            self._failed = TransferError(f"{self.meta.name}: {reason}")
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self._apply(self._pieces.fail(reason))
        callbacks, self._flush_callbacks = self._flush_callbacks, deque()
        for callback in callbacks:
            callback(False)
        self._wake_complete()

    # -- alerts (called by the session's dispatch) --------------------------

    def on_read_piece(self, piece: int, data: bytes, error: str | None) -> None:
        self._apply(self._pieces.piece_read(piece, data, error))

    def on_piece_finished(self, piece: int) -> None:
        self._apply(self._pieces.piece_finished(piece))

    def on_hash_failed(self, piece: int) -> None:
        self._apply(self._pieces.hash_failed(piece))

    def on_checked(self) -> None:
        """libtorrent's piece bitfield is final (or alerts were lost): adopt it,
        ask again for what readers wait for."""
        try:
            pieces = self.handle.status(lt.torrent_handle.query_pieces).pieces
        except RuntimeError as exc:
            self.fail(f"{exc}", gone=True)
            return
        self._apply(self._pieces.checked(pieces))

    def on_alerts_dropped(self) -> None:
        """A lost read_piece or piece_finished alert would strand readers, a
        lost cache_flushed alert a flush: ask again for both."""
        self.on_checked()
        for _ in range(len(self._flush_callbacks)):
            try:
                self.handle.flush_cache()
            except RuntimeError:
                break

    def on_flushed(self) -> None:
        if self._flush_callbacks:
            self._flush_callbacks.popleft()(True)

    def on_error(self, message: str, reason: str | None) -> None:
        """libtorrent stopped the torrent: ``message`` for the log and the
        status's errors, ``reason`` (the error itself) for its state."""
        self._errors.append(message)
        self._error_reason = reason or message
        self.fail(message)

    def on_status(self, counters: TorrentCounters) -> None:
        self._counters = counters

    # -- internals ----------------------------------------------------------

    def _file(self, file_index: int) -> TorrentFile:
        if not 0 <= file_index < len(self.meta.files):
            raise IndexError(f"{self.meta.name} has no file {file_index}")
        return self.meta.files[file_index]

    def _apply(self, actions: list[Action]) -> None:
        """Carry out the core's actions, in order.  Once the handle fails,
        the rest still reach the readers (a finished read is no longer the
        core's to fail)."""
        for action in actions:
            match action:
                case ReadDone(read_id, data):
                    fut = self._reads.get(read_id)
                    if fut is not None and not fut.done():
                        fut.set_result(data)
                case ReadFailed(read_id, error):
                    self._fail_read(read_id, error)
                case Completed():
                    self._wake_complete()
                case _ if self._failed is None:
                    try:
                        self._ask(action)
                    except RuntimeError as exc:  # the handle is gone
                        self.fail(f"{exc}", gone=True)
        self._schedule_retry()

    def _ask(self, action: Action) -> None:
        match action:
            # The data comes back in a read_piece alert, read by libtorrent's
            # disk I/O after the piece passed its hash check;
            # alert_when_available posts the same alert for a piece not yet
            # had once it is downloaded and verified.
            case ReadPiece(piece):
                self.handle.read_piece(piece)
            case AskPiece(piece, deadline_ms):
                self.handle.set_piece_deadline(
                    piece, deadline_ms, lt.torrent_handle.alert_when_available
                )
            case ReadAhead(piece, deadline_ms):
                self.handle.set_piece_deadline(piece, deadline_ms)

    def _fail_read(self, read_id: int, error: str) -> None:
        fut = self._reads.get(read_id)
        if fut is None or fut.done():
            return
        failed = self._failed
        exc = failed if failed is not None else TransferError(f"{self.meta.name}: {error}")
        fut.set_exception(exc)
        # Mark it retrieved: a reader that gave up leaves no "never retrieved" noise.
        fut.exception()

    def _schedule_retry(self) -> None:
        when = self._pieces.next_wakeup()
        timer = self._retry_timer
        if when is None or (timer is not None and timer.when() <= when):
            return
        if timer is not None:
            timer.cancel()
        self._retry_timer = self._loop.call_at(when, self._on_retry_due)

    def _on_retry_due(self) -> None:
        self._retry_timer = None
        self._apply(self._pieces.tick())

    def _wake_complete(self) -> None:
        waiters, self._complete_waiters = self._complete_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():  # its waiter may have been cancelled
        fut.set_result(value)
