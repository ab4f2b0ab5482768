"""A simulated swarm: in-memory fakes of :mod:`swarm.transfer`'s protocols.

A :class:`FakeWorld` holds every fake session; a piece a transfer lacks is
copied from another session of the world that has it (optionally a
*corrupting* one, whose pieces fail verification and get it banned), else
from the web seed, the origin store on disk, while ``origin_up``; while
``stalled``, a piece the transfer lacks never arrives (a swarm that hangs).  The truth
against which pieces are verified is the origin store's file, standing in
for libtorrent's merkle check; without ``verify_pieces`` a piece is kept as
delivered, as if that check had been defeated (for tests of the node's own
check).  Every piece request is recorded in order, so
tests can check what a read asked for.

The fakes subclass the Protocols they stand for, so that mypy checks them
against those (a fake that drifts from the real interface fails the lint).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from swarm.exceptions import TransferError
from swarm.transfer import (
    PeerInfo,
    ReceivedBytes,
    TorrentMeta,
    Transfer,
    TransferSession,
    TransferStatus,
)


class FakeWorld:
    def __init__(self, origin_root: Path) -> None:
        self.origin_root = origin_root  # STORE: files at STORE/NAME/PATH
        self.origin_up = True
        self.stalled = False
        self.verify_pieces = True
        self.sessions: list[FakeSession] = []
        self.web_seed_pieces = 0

    def session(self, address: str, *, corrupt: bool = False) -> FakeSession:
        s = FakeSession(self, address, corrupt=corrupt)
        self.sessions.append(s)
        return s


def _rel(meta: TorrentMeta, index: int) -> Path:
    if len(meta.files) == 1:
        return Path(meta.name)
    return Path(meta.name) / meta.files[index].path


@dataclass
class FakeTransfer(Transfer):
    session: FakeSession
    meta: TorrentMeta
    save_path: Path
    prefetch: bool
    web_seeds: tuple[str, ...]
    have: set[int] = field(default_factory=set)
    downloaded: int = 0
    hash_failures: int = 0
    removed: bool = False

    def _locate(self, piece: int) -> tuple[int, int, int]:
        """(file index, offset in file, length) of a piece."""
        for i, f in enumerate(self.meta.files):
            if f.first_piece <= piece < f.first_piece + f.num_pieces:
                off = (piece - f.first_piece) * self.meta.piece_length
                return i, off, min(self.meta.piece_length, f.size - off)
        raise TransferError(f"piece {piece} is in no file")

    def _truth(self, piece: int) -> bytes:
        i, off, n = self._locate(piece)
        root = self.session.world.origin_root
        if len(self.meta.files) == 1:  # an image: STORE/NAME/images/I/V/FILE
            path = next(root.rglob(self.meta.name))
        else:
            path = root / _rel(self.meta, i)
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def piece_bytes(self, piece: int) -> bytes:
        i, off, n = self._locate(piece)
        with open(self.file_path(i), "rb") as f:
            f.seek(off)
            data = f.read(n)
        if self.session.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def _store(self, piece: int, data: bytes) -> None:
        i, off, _ = self._locate(piece)
        p = self.file_path(i)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "r+b" if p.exists() else "wb") as f:
            f.seek(off)
            f.write(data)
        self.have.add(piece)
        self.downloaded += len(data)

    async def _get_piece(self, piece: int) -> None:
        world = self.session.world
        self.session.requests.append((self.meta.info_hash, piece))
        if world.stalled:
            await asyncio.Event().wait()  # until the reader gives up (cancelled)
        truth = self._truth(piece)
        for other in world.sessions:
            if other is self.session or other.address in self.session.banned_set:
                continue
            t = other.transfers.get(self.meta.info_hash)
            if t is None or piece not in t.have:
                continue
            data = t.piece_bytes(piece)
            if data != truth and world.verify_pieces:
                self.hash_failures += 1
                self.session.banned_set.add(other.address)
                continue
            self._store(piece, data)
            self.session.from_peers += len(data)
            return
        if self.web_seeds and world.origin_up:
            world.web_seed_pieces += 1
            self._store(piece, truth)
            self.session.from_web_seeds += len(truth)
            return
        raise TransferError(f"piece {piece}: no peer has it and no web seed answers")

    async def read(self, file_index: int, offset: int, size: int) -> bytes:
        if self.removed:
            raise TransferError("torrent removed")
        f = self.meta.files[file_index]
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        pl = self.meta.piece_length
        for p in range(f.first_piece + offset // pl, f.first_piece + (end - 1) // pl + 1):
            if p not in self.have:
                await self._get_piece(p)
        await asyncio.sleep(0)
        with open(self.file_path(file_index), "rb") as fh:
            fh.seek(offset)
            return fh.read(end - offset)

    def have_file(self, file_index: int) -> bool:
        f = self.meta.files[file_index]
        return all(p in self.have for p in range(f.first_piece, f.first_piece + f.num_pieces))

    def file_path(self, file_index: int) -> Path:
        return self.save_path / _rel(self.meta, file_index)

    def set_prefetch(self, prefetch: bool) -> None:
        self.prefetch = prefetch

    def _wanted(self) -> int:
        return sum(f.num_pieces for f in self.meta.files)

    def status(self) -> TransferStatus:
        total = sum(f.size for f in self.meta.files)
        done = sum(f.size for i, f in enumerate(self.meta.files) if self.have_file(i))
        return TransferStatus(
            info_hash=self.meta.info_hash,
            name=self.meta.name,
            state="seeding" if len(self.have) == self._wanted() else "downloading",
            progress=done / total if total else 1.0,
            total_wanted=total,
            total_done=done,
            download_rate=0,
            upload_rate=0,
            downloaded=self.downloaded,
            uploaded=0,
            num_peers=len(self.peers()),
            num_seeds=0,
            prefetch=self.prefetch,
            hash_failures=self.hash_failures,
        )

    def peers(self) -> list[PeerInfo]:
        return [
            PeerInfo(o.address, "fake", 0, 0, 0, 0, False)
            for o in self.session.world.sessions
            if o is not self.session and self.meta.info_hash in o.transfers
        ]

    async def wait_complete(self) -> None:
        for p in range(self._wanted()):
            if p not in self.have:
                await self._get_piece(p)


class FakeSession(TransferSession):
    def __init__(self, world: FakeWorld, address: str, *, corrupt: bool = False) -> None:
        self.world = world
        self.address = address
        self.corrupt = corrupt
        self.transfers: dict[str, FakeTransfer] = {}
        self.requests: list[tuple[str, int]] = []
        self.banned_set: set[str] = set()
        self.connected: list[str] = []
        self.started = False
        self.from_peers = 0  # payload bytes received, by source
        self.from_web_seeds = 0

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    def add(
        self,
        meta: TorrentMeta,
        save_path: Path,
        *,
        prefetch: bool = False,
        web_seeds: tuple[str, ...] = (),
    ) -> FakeTransfer:
        t = self.transfers.get(meta.info_hash)
        if t is None:
            t = self.transfers[meta.info_hash] = FakeTransfer(
                self, meta, save_path, prefetch, web_seeds
            )
        return t

    def seed_from(self, meta: TorrentMeta, save_path: Path) -> FakeTransfer:
        """Add a torrent whose every piece this session holds (a seeder)."""
        t = self.add(meta, save_path)
        t.have = set(range(t._wanted()))
        return t

    def get(self, info_hash: str) -> FakeTransfer | None:
        return self.transfers.get(info_hash)

    def remove(self, info_hash: str) -> None:
        t = self.transfers.pop(info_hash, None)
        if t is not None:
            t.removed = True

    def connect(self, address: str) -> None:
        self.connected.append(address)

    def status(self) -> dict[str, object]:
        return {
            "listen": self.address,
            "num_peers": 0,
            "dht_nodes": 0,
            "received_from_peers": self.from_peers,
            "received_from_web_seeds": self.from_web_seeds,
        }

    def received(self) -> ReceivedBytes:
        return ReceivedBytes(self.from_peers, self.from_web_seeds)

    def banned(self) -> list[str]:
        return sorted(self.banned_set)
