"""swarm.torrent.pieces: the piece-request core, with a fake clock and no libtorrent.

The torrent here is laid out by hand the way BEP 52 lays it out (every file
starts on a piece boundary): file 0 covers pieces 0..9, file 1 (100 bytes)
piece 10, the empty file 2 none, file 3 pieces 11..12.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from swarm.torrent.pieces import (
    MAX_READ_RETRIES,
    RETRY_DELAY,
    Action,
    AskPiece,
    Completed,
    PieceRequests,
    ReadAhead,
    ReadDone,
    ReadFailed,
    ReadPiece,
)
from swarm.transfer import TorrentFile, TorrentMeta

PIECE = 1024
NUM_PIECES = 13


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def piece_data(piece: int) -> bytes:
    """The content of a piece: distinct bytes everywhere."""
    return bytes((piece * 7 + i) % 251 for i in range(PIECE))


META = TorrentMeta(
    data=b"",
    info_hash="00" * 32,
    name="rel",
    piece_length=PIECE,
    files=(
        TorrentFile("big", 10 * PIECE, "", 0, 10),
        TorrentFile("small", 100, "", 10, 1),
        TorrentFile("empty", 0, "", 11, 0),
        TorrentFile("tail", PIECE + 10, "", 11, 2),
    ),
)


def content(file_index: int) -> bytes:
    f = META.files[file_index]
    whole = b"".join(piece_data(p) for p in range(f.first_piece, f.first_piece + f.num_pieces))
    return whole[: f.size]


def core(
    clock: FakeClock | None = None, *, read_ahead: int = 0, piece_cache: int = 64 * PIECE
) -> PieceRequests:
    return PieceRequests(
        META,
        NUM_PIECES,
        clock=clock or FakeClock(),
        read_ahead=read_ahead,
        piece_cache=piece_cache,
    )


def asks(actions: list[Action]) -> list[Action]:
    return [a for a in actions if isinstance(a, AskPiece | ReadPiece | ReadAhead)]


def done(actions: list[Action]) -> dict[int, bytes]:
    return {a.read: a.data for a in actions if isinstance(a, ReadDone)}


def test_a_read_asks_exactly_the_pieces_it_covers_with_stepped_deadlines() -> None:
    pieces = core()
    _, actions = pieces.read(0, PIECE + 10, 3 * PIECE)  # pieces 1..4
    assert actions == [AskPiece(1, 0), AskPiece(2, 2), AskPiece(3, 4), AskPiece(4, 6)]
    assert pieces.awaited == {1, 2, 3, 4}
    # A file past the first: its pieces, and a range past its end is short.
    _, actions = pieces.read(3, PIECE, 5000)
    assert actions == [AskPiece(12, 0)]


def test_a_read_past_the_end_or_of_nothing_asks_nothing() -> None:
    pieces = core()
    for file_index, offset, size in [(0, 10 * PIECE, 5), (1, 0, 0), (2, 0, 10)]:
        read, actions = pieces.read(file_index, offset, size)
        assert actions == [ReadDone(read, b"")]
    assert pieces.awaited == frozenset()


def test_bad_read_arguments_raise() -> None:
    pieces = core()
    with pytest.raises(IndexError):
        pieces.read(4, 0, 1)
    with pytest.raises(ValueError):
        pieces.read(0, -1, 1)
    with pytest.raises(ValueError):
        pieces.read(0, 0, -1)


def test_waiters_are_woken_by_read_piece_with_exactly_their_bytes() -> None:
    pieces = core()
    wide, _ = pieces.read(0, 100, 2 * PIECE)  # pieces 0..2
    narrow, actions = pieces.read(0, PIECE + 5, 10)  # piece 1, already asked for
    assert asks(actions) == []
    assert pieces.piece_read(1, piece_data(1), None) == [
        ReadDone(narrow, content(0)[PIECE + 5 : PIECE + 15])
    ]
    assert pieces.piece_read(0, piece_data(0), None) == []
    assert done(pieces.piece_read(2, piece_data(2), None)) == {
        wide: content(0)[100 : 100 + 2 * PIECE]
    }
    assert pieces.awaited == frozenset()


def test_a_piece_already_present_is_not_fetched() -> None:
    pieces = core()
    pieces.checked([p in (3, 4) for p in range(NUM_PIECES)])
    # Had pieces are read back, not fetched.
    _, actions = pieces.read(0, 3 * PIECE, 3 * PIECE)
    assert actions == [ReadPiece(3), ReadPiece(4), AskPiece(5, 4)]
    pieces.piece_read(3, piece_data(3), None)
    pieces.piece_read(4, piece_data(4), None)
    pieces.piece_read(5, piece_data(5), None)
    # Pieces read recently are served without asking libtorrent at all.
    again, actions = pieces.read(0, 3 * PIECE + 1, 2 * PIECE)
    assert actions == [ReadDone(again, content(0)[3 * PIECE + 1 : 5 * PIECE + 1])]


def test_the_piece_cache_keeps_only_its_size() -> None:
    pieces = core(piece_cache=2 * PIECE)
    for p in range(3):
        pieces.read(0, p * PIECE, 1)
        pieces.piece_read(p, piece_data(p), None)
    _, actions = pieces.read(0, 0, 1)  # evicted: the oldest
    assert actions == [AskPiece(0, 0)]
    read, actions = pieces.read(0, 2 * PIECE, 1)
    assert actions == [ReadDone(read, piece_data(2)[:1])]


def test_sequential_reads_trigger_read_ahead_once() -> None:
    pieces = core(read_ahead=3 * PIECE)
    _, actions = pieces.read(0, 0, PIECE)
    assert actions == [AskPiece(0, 0)]  # a first read is not sequential
    _, actions = pieces.read(0, PIECE, PIECE)  # continues it
    assert actions == [AskPiece(1, 0), ReadAhead(2, 1000), ReadAhead(3, 1002), ReadAhead(4, 1004)]
    pieces.piece_finished(3)
    _, actions = pieces.read(0, 2 * PIECE, PIECE)
    # Piece 2 is now awaited; 3 is had, 4 asked already: only 5 is new (the
    # third piece of the read-ahead range, so due two steps after its first).
    assert actions == [AskPiece(2, 0), ReadAhead(5, 1004)]
    # A jump elsewhere is not sequential, and read-ahead stops at the file's end.
    _, actions = pieces.read(0, 8 * PIECE, 10)
    assert actions == [AskPiece(8, 0)]
    _, actions = pieces.read(0, 8 * PIECE + 10, 10)
    assert actions == [ReadAhead(9, 1002)]  # 8 is awaited already; 10 is past the end


def test_a_failed_read_back_is_retried_after_a_delay_of_the_clock() -> None:
    clock = FakeClock()
    pieces = core(clock)
    pieces.checked([p == 6 for p in range(NUM_PIECES)])
    read, actions = pieces.read(0, 6 * PIECE, 10)
    assert actions == [ReadPiece(6)]
    for tries in range(1, MAX_READ_RETRIES + 1):
        assert pieces.piece_read(6, b"", "disk busy") == []
        assert pieces.next_wakeup() == pytest.approx(clock.now + RETRY_DELAY * tries)
        clock.now += RETRY_DELAY * tries - 0.01
        assert pieces.tick() == []  # not yet
        clock.now += 0.01
        assert pieces.tick() == [ReadPiece(6)]
        assert pieces.next_wakeup() is None
    assert pieces.piece_read(6, b"", "disk busy") == [ReadFailed(read, "piece 6: disk busy")]
    assert pieces.awaited == frozenset()


def test_a_retried_read_back_that_succeeds_serves_the_reader() -> None:
    clock = FakeClock()
    pieces = core(clock)
    pieces.checked([True] * NUM_PIECES)
    read, _ = pieces.read(1, 0, 100)
    pieces.piece_read(10, b"", "disk busy")
    clock.now += RETRY_DELAY
    assert pieces.tick() == [ReadPiece(10)]
    assert pieces.piece_read(10, piece_data(10), None) == [ReadDone(read, content(1))]


def test_a_failed_read_back_while_checking_is_asked_again_when_checked() -> None:
    pieces = core()
    _, actions = pieces.read(0, 0, 10)
    assert actions == [AskPiece(0, 0)]
    assert pieces.piece_read(0, b"", "not had yet") == []
    assert pieces.next_wakeup() is None  # no retry: checking will decide
    assert pieces.checked([True] + [False] * (NUM_PIECES - 1)) == [ReadPiece(0)]


def test_pieces_asked_again_keep_what_is_left_of_their_deadline() -> None:
    clock = FakeClock()
    pieces = core(clock)
    pieces.read(0, 0, 4 * PIECE)  # deadlines 0, 2, 4, 6 ms from now
    clock.now += 0.003
    assert pieces.deadlines_dropped() == [
        AskPiece(0, 0),
        AskPiece(1, 0),
        AskPiece(2, 1),
        AskPiece(3, 3),
    ]
    assert pieces.hash_failed(3) == [AskPiece(3, 3)]
    assert pieces.hash_failed(9) == []  # nobody waits for it
    assert pieces.hash_failures == 2


def test_deadlines_dropped_forgets_read_ahead() -> None:
    pieces = core(read_ahead=PIECE)
    pieces.read(0, 0, 10)
    pieces.read(0, 10, 10)  # sequential: piece 1 read ahead
    pieces.deadlines_dropped()
    _, actions = pieces.read(0, 20, 10)
    assert actions == [ReadAhead(1, 1002)]  # asked again; piece 0 is awaited already


def test_completion_is_announced_when_the_last_piece_finishes() -> None:
    pieces = core()
    assert pieces.piece_finished(0) == []  # still checking: not complete
    assert pieces.checked([p < NUM_PIECES - 1 for p in range(NUM_PIECES)]) == []
    assert not pieces.complete and pieces.have_file(0) and not pieces.have_file(3)
    assert pieces.piece_finished(NUM_PIECES - 1) == [Completed()]
    assert pieces.complete and pieces.have_snapshot() == b"\x01" * NUM_PIECES


def test_a_cancelled_read_is_not_served_but_its_piece_is_kept() -> None:
    pieces = core()
    read, _ = pieces.read(0, 0, 10)
    pieces.cancel(read)
    assert pieces.awaited == {0}  # another reader may come for it
    assert pieces.piece_read(0, piece_data(0), None) == []
    again, actions = pieces.read(0, 5, 10)
    assert actions == [ReadDone(again, content(0)[5:15])]


def test_failure_fails_every_read_with_the_first_reason() -> None:
    pieces = core()
    first, _ = pieces.read(0, 0, 10)
    second, _ = pieces.read(3, 0, 10)
    assert pieces.fail("removed") == [ReadFailed(first, "removed"), ReadFailed(second, "removed")]
    assert pieces.fail("session closed") == []
    assert pieces.failed == "removed"
    later, actions = pieces.read(0, 0, 10)
    assert actions == [ReadFailed(later, "removed")]
    # Nothing is asked of a failed torrent any more.
    assert pieces.checked([False] * NUM_PIECES) == []
    assert pieces.piece_read(0, piece_data(0), None) == []


def test_the_core_is_imported_without_libtorrent() -> None:
    code = "import sys, swarm.torrent.pieces; sys.exit('libtorrent' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
