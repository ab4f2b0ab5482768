"""swarm.torrent.resume: the resume store against a simulated torrent handle.

The simulation keeps libtorrent's documented contract for
``save_resume_data``: the answer lists every piece libtorrent has when it
handles the request (not when it was asked), and a request with
``only_if_modified`` is refused (``resume_data_not_modified``) when nothing
changed since the last resume data libtorrent produced.  The test decides
when libtorrent answers, so the race between a save's snapshot and
libtorrent's answer is played out exactly.  The files are real, and read back
with libtorrent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import libtorrent as lt

from swarm.torrent.resume import ResumeStore
from swarm.transfer import TorrentMeta
from tests.swarm.torrent_helpers import eventually

NUM_PIECES = 4
INFO_HASH = "ab" * 32
META = TorrentMeta(data=b"", info_hash=INFO_HASH, name="t", piece_length=16384, files=())


@dataclass
class SimulatedHandle:
    """libtorrent's side: the pieces it has and the save requests it has not answered."""

    have: set[int] = field(default_factory=set)
    modified: bool = True  # since the last resume data libtorrent produced
    requests: list[int] = field(default_factory=list)

    def save_resume_data(self, flags: int) -> None:
        self.requests.append(int(flags))

    def verify(self, piece: int) -> None:
        self.have.add(piece)
        self.modified = True


@dataclass
class SimulatedTorrent:
    """What the resume store uses of a transfer; its pieces are libtorrent's,
    seen through piece-finished events (``had``)."""

    handle: SimulatedHandle
    meta: TorrentMeta = META
    had: set[int] = field(default_factory=set)
    complete: bool = False

    def have_snapshot(self) -> bytes:
        return bytes(int(p in self.had) for p in range(NUM_PIECES))

    def flush(self, callback: Callable[[bool], None]) -> None:
        callback(True)  # nothing in flight in a simulation


def answer(store: ResumeStore, torrent: SimulatedTorrent) -> None:
    """libtorrent handles the oldest save request now."""
    flags = torrent.handle.requests.pop(0)
    only_if_modified = bool(flags & int(lt.torrent_handle.only_if_modified))
    if only_if_modified and not torrent.handle.modified:
        store.on_save_failed(torrent, "resume data not modified")
        return
    params = lt.add_torrent_params()
    params.info_hashes = lt.info_hash_t(lt.sha256_hash(bytes.fromhex(INFO_HASH)))
    params.have_pieces = [p in torrent.handle.have for p in range(NUM_PIECES)]
    torrent.handle.modified = False
    store.on_saved(torrent, params)


async def settle(store: ResumeStore, torrent: SimulatedTorrent) -> None:
    """libtorrent answers every save request until the store has nothing pending."""
    give_up = asyncio.get_running_loop().time() + 5
    while torrent.handle.requests or store.pending(INFO_HASH):
        assert asyncio.get_running_loop().time() < give_up, "saves never settled"
        if torrent.handle.requests:
            answer(store, torrent)
        await asyncio.sleep(0.01)


def saved_pieces(state: Path) -> list[int]:
    atp = lt.read_resume_data((state / f"{INFO_HASH}.resume").read_bytes())
    return [p for p, had in enumerate(atp.have_pieces) if had]


def test_pieces_libtorrent_saved_ahead_of_a_snapshot_are_saved_by_the_next_save(
    tmp_path: Path,
) -> None:
    # Pieces arrive while a save is on its way: libtorrent's answer includes
    # them, the store keeps only the snapshot's (it cannot know they are in
    # the file yet), and the next save must still write them although
    # libtorrent has not changed since its last answer.
    async def scenario() -> None:
        store = ResumeStore(tmp_path, 0.05, asyncio.get_running_loop())
        torrent = SimulatedTorrent(SimulatedHandle())
        torrent.handle.verify(0)
        torrent.had.add(0)
        store.progress(torrent)
        for piece in range(1, NUM_PIECES):
            torrent.handle.verify(piece)
            torrent.had.add(piece)
            store.progress(torrent)
        answer(store, torrent)  # the first save, answered late
        path = tmp_path / f"{INFO_HASH}.resume"
        await eventually(path.exists, "the first resume file", timeout=5)
        assert saved_pieces(tmp_path) == [0]  # what was flushed when it was asked
        await settle(store, torrent)
        assert saved_pieces(tmp_path) == list(range(NUM_PIECES))

    asyncio.run(scenario())
