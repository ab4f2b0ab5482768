"""Piece requests of one torrent: which pieces to ask for, when, and who waits.

A pure core, in the manner of Kraken's piece-request manager: it neither
sends nor receives pieces and knows no libtorrent and no event loop.  Events
go in (a read, a piece finished, a piece's data read back, a failed hash, the
end of checking, a tick of the injected clock); :class:`Action` values come
out, which the adapter (:mod:`swarm.torrent.transfer`) carries out on the
torrent handle and on its readers.

The piece space is libtorrent's: file ``i`` covers pieces
``first_piece .. first_piece + num_pieces - 1`` (see
:mod:`swarm.torrent.metainfo`).

Invariants:

* a piece is *had* only once libtorrent verified it (its bitfield after
  checking, then piece-finished events); ``have_count`` counts the had pieces;
* every *awaited* piece was asked for (:class:`AskPiece` or
  :class:`ReadPiece`) and is asked again whenever libtorrent may have
  forgotten it (checking done, deadlines dropped, hash failure, a retry);
* every read ends in exactly one :class:`ReadDone` or :class:`ReadFailed`,
  unless the reader cancels it first;
* after :meth:`PieceRequests.fail` nothing is asked again and every read fails
  with the first failure.

Deadlines are instants of the injected clock: a read's pieces are due one
after the other, ``DEADLINE_STEP_MS`` apart, so two readers' pieces interleave
by arrival time instead of one long read holding back a later short one; a
piece asked again keeps what is left of its deadline.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from swarm.transfer import TorrentFile, TorrentMeta

log = logging.getLogger(__name__)

# Milliseconds between the deadlines of consecutive pieces of one read.
DEADLINE_STEP_MS = 2
# Read-ahead pieces are due this long after they are asked for.
READ_AHEAD_DEADLINE_MS = 1000
# A piece whose data could not be read while the torrent is usable is asked
# again this often, RETRY_DELAY * tries seconds later.
MAX_READ_RETRIES = 3
RETRY_DELAY = 0.2


@dataclass(frozen=True)
class AskPiece:
    """Fetch a piece not yet had by ``deadline_ms`` from now; post its data when had."""

    piece: int
    deadline_ms: int


@dataclass(frozen=True)
class ReadPiece:
    """Read back the data of a piece already had."""

    piece: int


@dataclass(frozen=True)
class ReadAhead:
    """Fetch a piece by ``deadline_ms`` from now; nobody waits for its data yet."""

    piece: int
    deadline_ms: int


@dataclass(frozen=True)
class ReadDone:
    """Read ``read`` has its bytes."""

    read: int
    data: bytes


@dataclass(frozen=True)
class ReadFailed:
    """Read ``read`` cannot be served: ``error`` says why."""

    read: int
    error: str


@dataclass(frozen=True)
class Completed:
    """Every piece of the torrent is had."""


Action = AskPiece | ReadPiece | ReadAhead | ReadDone | ReadFailed | Completed


@dataclass
class _Read:
    first: int  # first piece
    last: int  # last piece
    start: int  # offset of the range in the first piece
    length: int
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass
class _Awaited:
    deadline: float  # clock instant
    readers: set[int] = field(default_factory=set)


class PieceRequests:
    """Piece bookkeeping of one torrent of ``num_pieces`` pieces.

    ``clock`` gives the current instant in seconds (the event loop's time in
    the adapter, a fake one in tests).  ``read_ahead`` bytes after a read that
    continues the previous read of the same file are asked for too;
    ``piece_cache`` bytes of recently read pieces are kept, so small reads of
    the same piece need not read it back again.
    """

    def __init__(
        self,
        meta: TorrentMeta,
        num_pieces: int,
        *,
        clock: Callable[[], float],
        read_ahead: int,
        piece_cache: int,
    ) -> None:
        self.meta = meta
        self.num_pieces = num_pieces
        self.hash_failures = 0
        self._clock = clock
        self._read_ahead_bytes = read_ahead
        self._cache_limit = piece_cache
        self._have = bytearray(num_pieces)
        self._have_count = 0
        self._ready = False  # checking is done: _have is complete
        self._failed: str | None = None
        self._next_read = 0
        self._reads: dict[int, _Read] = {}
        self._awaited: dict[int, _Awaited] = {}
        self._retry_at: dict[int, float] = {}
        self._tries: dict[int, int] = {}
        self._read_ahead: set[int] = set()
        self._last_end: dict[int, int] = {}  # file index -> end of its last read
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0

    # -- state ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Checking is done: the had pieces are all known."""
        return self._ready

    @property
    def complete(self) -> bool:
        return self._ready and self._have_count == self.num_pieces

    @property
    def failed(self) -> str | None:
        """Why the torrent can no longer serve reads (the first failure), if it cannot."""
        return self._failed

    @property
    def awaited(self) -> frozenset[int]:
        """Pieces asked for whose data has not come back yet."""
        return frozenset(self._awaited)

    def has(self, piece: int) -> bool:
        return bool(self._have[piece])

    def have_file(self, file_index: int) -> bool:
        """Raises ``IndexError`` for a file the torrent does not have."""
        f = self._file(file_index)
        return all(self._have[f.first_piece : f.first_piece + f.num_pieces])

    def have_snapshot(self) -> bytes:
        """One byte per piece, 1 where the piece is had now."""
        return bytes(self._have)

    def next_wakeup(self) -> float | None:
        """The instant :meth:`tick` has something to do, if any."""
        return min(self._retry_at.values(), default=None)

    # -- events ---------------------------------------------------------------

    def read(self, file_index: int, offset: int, size: int) -> tuple[int, list[Action]]:
        """A reader wants ``size`` bytes at ``offset`` of a file (short at its end).

        Returns the read's id and what to do: each piece it covers that is
        neither awaited already nor cached is asked for (had: read back; not
        had: fetched, deadlines one step apart, the first now); a read that
        continues the previous one of the same file also asks for the next
        ``read_ahead`` bytes.  The read ends in :class:`ReadDone` or
        :class:`ReadFailed`, possibly among the returned actions.

        Raises ``IndexError`` for a file the torrent does not have and
        ``ValueError`` for a negative offset or size.
        """
        f = self._file(file_index)
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        read_id = self._next_read
        self._next_read += 1
        end = min(f.size, offset + size)
        if offset >= end:
            return read_id, [ReadDone(read_id, b"")]
        if self._failed is not None:
            return read_id, [ReadFailed(read_id, self._failed)]
        length = self.meta.piece_length
        first = f.first_piece + offset // length
        last = f.first_piece + (end - 1) // length
        read = _Read(first, last, offset - (first - f.first_piece) * length, end - offset)
        sequential = self._last_end.get(file_index) == offset
        self._last_end[file_index] = end
        self._reads[read_id] = read
        now = self._clock()
        actions: list[Action] = []
        for k, piece in enumerate(range(first, last + 1)):
            cached = self._cache.get(piece)
            awaited = self._awaited.get(piece)
            if awaited is not None:
                awaited.readers.add(read_id)
            elif cached is not None:
                self._cache.move_to_end(piece)
                read.parts[piece] = cached
            else:
                deadline = now + k * DEADLINE_STEP_MS / 1000
                self._awaited[piece] = _Awaited(deadline, {read_id})
                actions.append(self._ask(piece, now))
        if sequential:
            actions += self._ask_read_ahead(f, end)
        actions += self._finish_if_whole(read_id)
        return read_id, actions

    def cancel(self, read_id: int) -> None:
        """The reader gave up.  Its pieces stay asked for: others may want them."""
        self._reads.pop(read_id, None)
        for awaited in self._awaited.values():
            awaited.readers.discard(read_id)

    def piece_finished(self, piece: int) -> list[Action]:
        """libtorrent verified ``piece``."""
        self._read_ahead.discard(piece)
        if not self._have[piece]:
            self._have[piece] = 1
            self._have_count += 1
        return [Completed()] if self.complete else []

    def piece_read(self, piece: int, data: bytes, error: str | None) -> list[Action]:
        """``piece``'s data (verified) came back, or reading it failed with ``error``."""
        if error is None:
            self._tries.pop(piece, None)
            self._retry_at.pop(piece, None)
            self._remember(piece, data)
            awaited = self._awaited.pop(piece, None)
            if awaited is None:
                return []
            actions: list[Action] = []
            for read_id in sorted(awaited.readers):
                read = self._reads.get(read_id)
                if read is not None:
                    read.parts[piece] = data
                    actions += self._finish_if_whole(read_id)
            return actions
        awaited = self._awaited.get(piece)
        if awaited is None or not self._ready:
            return []  # nobody waits, or still checking: checked() asks again
        tries = self._tries.get(piece, 0) + 1
        if tries > MAX_READ_RETRIES:
            del self._awaited[piece]
            self._tries.pop(piece, None)
            reason = f"piece {piece}: {error}"
            return [self._fail_read(r, reason) for r in sorted(awaited.readers)]
        self._tries[piece] = tries
        self._retry_at[piece] = self._clock() + RETRY_DELAY * tries
        log.info("%s: read of piece %d failed (%s), retrying", self.meta.name, piece, error)
        return []

    def hash_failed(self, piece: int) -> list[Action]:
        """``piece`` failed its hash check; libtorrent fetches it again."""
        self.hash_failures += 1
        log.warning("%s: piece %d failed its hash check", self.meta.name, piece)
        if piece in self._awaited and self._failed is None:
            return [self._ask(piece, self._clock())]  # keep its deadline and alert
        return []

    def checked(self, have: Iterable[bool]) -> list[Action]:
        """libtorrent's piece bitfield is final (or must be read again, after
        lost alerts): adopt it and ask again for every awaited piece."""
        for piece, had in enumerate(have):
            if had and piece < self.num_pieces and not self._have[piece]:
                self._have[piece] = 1
                self._have_count += 1
        self._ready = True
        actions = self._ask_awaited()
        if self.complete:
            actions.append(Completed())
        return actions

    def deadlines_dropped(self) -> list[Action]:
        """libtorrent forgot every piece deadline (piece priorities were reset)."""
        self._read_ahead.clear()
        return self._ask_awaited()

    def tick(self) -> list[Action]:
        """The clock moved on: ask again for pieces whose retry is due."""
        now = self._clock()
        due = sorted(p for p, at in self._retry_at.items() if at <= now)
        for piece in due:
            del self._retry_at[piece]
        if self._failed is not None:
            return []
        return [self._ask(p, now) for p in due if p in self._awaited]

    def fail(self, error: str) -> list[Action]:
        """The torrent cannot serve reads any more (removed, closed, storage
        error): every read fails with the first such ``error``."""
        if self._failed is None:
            self._failed = error
        reads, self._reads = self._reads, {}
        self._awaited.clear()
        self._retry_at.clear()
        self._read_ahead.clear()
        return [ReadFailed(r, self._failed) for r in sorted(reads)]

    # -- internals -------------------------------------------------------------

    def _file(self, file_index: int) -> TorrentFile:
        if not 0 <= file_index < len(self.meta.files):
            raise IndexError(f"{self.meta.name} has no file {file_index}")
        return self.meta.files[file_index]

    def _ask(self, piece: int, now: float) -> Action:
        if self._have[piece]:
            return ReadPiece(piece)
        left = self._awaited[piece].deadline - now
        return AskPiece(piece, max(0, round(left * 1000)))

    def _ask_awaited(self) -> list[Action]:
        if self._failed is not None:
            return []
        now = self._clock()
        return [self._ask(p, now) for p in sorted(self._awaited)]

    def _ask_read_ahead(self, f: TorrentFile, end: int) -> list[Action]:
        length = self.meta.piece_length
        stop = min(f.size, end + self._read_ahead_bytes)
        if end >= stop:
            return []
        first = f.first_piece + end // length
        last = f.first_piece + (stop - 1) // length
        actions: list[Action] = []
        for k, piece in enumerate(range(first, last + 1)):
            if self._have[piece] or piece in self._awaited or piece in self._read_ahead:
                continue
            self._read_ahead.add(piece)
            actions.append(ReadAhead(piece, READ_AHEAD_DEADLINE_MS + k * DEADLINE_STEP_MS))
        return actions

    def _finish_if_whole(self, read_id: int) -> list[Action]:
        read = self._reads[read_id]
        if len(read.parts) <= read.last - read.first:
            return []
        del self._reads[read_id]
        data = b"".join(read.parts[p] for p in range(read.first, read.last + 1))
        return [ReadDone(read_id, data[read.start : read.start + read.length])]

    def _fail_read(self, read_id: int, error: str) -> Action:
        self._reads.pop(read_id, None)
        for awaited in self._awaited.values():
            awaited.readers.discard(read_id)
        return ReadFailed(read_id, error)

    def _remember(self, piece: int, data: bytes) -> None:
        if len(data) > self._cache_limit:
            return
        old = self._cache.pop(piece, None)
        if old is not None:
            self._cache_bytes -= len(old)
        self._cache[piece] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > self._cache_limit:
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= len(evicted)
