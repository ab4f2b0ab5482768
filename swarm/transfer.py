"""The node's view of peer-to-peer transfer, independent of libtorrent.

:mod:`swarm.torrent` implements these protocols with libtorrent (the only
package that imports it); ``tests/fake_swarm.py`` implements them in memory so
the daemon's scheduling, metadata exchange and policy are tested without
sockets.

A *torrent* here is always BitTorrent v2 (BEP 52): every file has its own
SHA-256 merkle tree, whose root (``pieces_root``) is in the info dictionary,
whose SHA-256 (the v2 info-hash) is in the signed TUF target.  A byte handed
out by :meth:`Transfer.read` has been checked against that tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class TorrentFile:
    """One file of a torrent, as laid out in the torrent's piece space."""

    path: str  # relative, "/"-separated, as in the torrent
    size: int
    pieces_root: str  # hex SHA-256 merkle root ("" for an empty file)
    first_piece: int  # index of the file's first piece in the torrent
    num_pieces: int


@dataclass(frozen=True)
class TorrentMeta:
    """A parsed, validated v2 torrent."""

    data: bytes  # the bencoded .torrent file, with its piece layers
    info_hash: str  # hex v2 info-hash (SHA-256 of the bencoded info dict)
    name: str
    piece_length: int
    files: tuple[TorrentFile, ...]

    def file_index(self, path: str) -> int:
        for i, f in enumerate(self.files):
            if f.path == path:
                return i
        raise KeyError(path)

    def piece_size(self, piece: int) -> int:
        """Bytes of piece ``piece``: v2 pieces never span files, so a file's
        last piece holds only what is left of it.

        Raises:
            KeyError: no file has that piece.
        """
        for f in self.files:
            if f.first_piece <= piece < f.first_piece + f.num_pieces:
                return min(self.piece_length, f.size - (piece - f.first_piece) * self.piece_length)
        raise KeyError(piece)


@dataclass
class PeerInfo:
    address: str  # "ip:port"
    client: str
    download_rate: int  # bytes/s from this peer
    upload_rate: int
    downloaded: int
    uploaded: int
    seed: bool


@dataclass(frozen=True)
class ReceivedBytes:
    """Payload bytes a session received since it started, by source: from
    BitTorrent peers and from web seeds (the origin serving the torrent's
    files over HTTP).  Counted per block as it arrives, so a peer that
    disconnects or a torrent that is removed keeps what it delivered."""

    peers: int = 0
    web_seeds: int = 0


@dataclass
class TransferStatus:
    info_hash: str
    name: str
    state: str  # "checking", "downloading", "seeding", "paused", "error: ..."
    progress: float  # 0..1 of wanted bytes
    total_wanted: int
    total_done: int
    download_rate: int
    upload_rate: int
    downloaded: int  # payload bytes downloaded in this session
    uploaded: int
    num_peers: int
    num_seeds: int
    prefetch: bool
    hash_failures: int
    errors: list[str] = field(default_factory=list)


class Transfer(Protocol):
    """One torrent added to the session."""

    meta: TorrentMeta
    save_path: Path

    async def read(self, file_index: int, offset: int, size: int) -> bytes:
        """Verified bytes of a file range; missing pieces are asked for first.

        Raises :class:`swarm.exceptions.TransferError` if the pieces cannot be
        had (torrent removed, storage error) and ``asyncio.TimeoutError`` only
        if the caller wraps it in a timeout.
        """
        ...

    def have_file(self, file_index: int) -> bool: ...

    def file_path(self, file_index: int) -> Path: ...

    def set_prefetch(self, prefetch: bool) -> None:
        """Full prefetch downloads everything at low priority behind reads."""
        ...

    def status(self) -> TransferStatus:
        """Byte counts, rates and peer counts may lag behind by a moment
        (libtorrent's are its last status update); the state is current.

        Raises :class:`swarm.exceptions.TransferError` if the torrent is gone.
        """
        ...

    def peers(self) -> list[PeerInfo]: ...

    async def wait_complete(self) -> None: ...


class TransferSession(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None:
        """Save resume data of every torrent and stop."""
        ...

    def add(
        self,
        meta: TorrentMeta,
        save_path: Path,
        *,
        prefetch: bool = False,
        web_seeds: tuple[str, ...] = (),
    ) -> Transfer:
        """Add (or return the already-added) torrent; resumes from saved state."""
        ...

    def get(self, info_hash: str) -> Transfer | None: ...

    def remove(self, info_hash: str) -> None: ...

    def connect(self, address: str) -> None:
        """Tell every torrent about a peer at ``host:port``."""
        ...

    def status(self) -> dict[str, object]:
        """Session counters (``received_from_peers`` and
        ``received_from_web_seeds``: :meth:`received`)."""
        ...

    def received(self) -> ReceivedBytes:
        """Payload bytes received since the session started, by source."""
        ...

    def banned(self) -> list[str]:
        """Addresses of peers banned for sending data that failed verification."""
        ...
