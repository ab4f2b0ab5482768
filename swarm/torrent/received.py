"""Payload bytes received, by source (BitTorrent peers, web seeds): the pure ledger.

libtorrent counts a torrent's payload but not who sent it; its block alerts
do: ``block_downloading_alert`` when a block is asked of an endpoint,
``block_finished_alert`` when the block from an endpoint has been written.
The session (:mod:`swarm.torrent.session`) tells :class:`ReceivedLedger`
about both, each with the block's size and whether the endpoint is a peer or
a web seed; the ledger adds each block once, to the source that sent it.

One gap is closed here: libtorrent posts ``block_finished_alert`` only
while the torrent has a piece picker, which it drops the moment the torrent
becomes a seed, so the blocks whose writes complete after the last piece
passed its hash check are never announced.  Alerts arrive in order, so when
the session sees the torrent become a seed, every block still outstanding
(asked for, never announced finished) is one of those: it was received, and
from the endpoint it was last asked of.  (In end-game mode a block asked of
two sources and announced by neither is credited to the last one asked.)

Invariants: a block is counted at most once per download of it; the totals
never decrease (removing a torrent forgets only its outstanding requests);
no libtorrent, no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from swarm.transfer import ReceivedBytes


class Source(Enum):
    """Who sent a block."""

    PEER = "peer"
    WEB_SEED = "web_seed"


Block = tuple[int, int]  # (piece index, block index in the piece)


@dataclass
class ReceivedLedger:
    """Bytes received per source, and the blocks asked for and not yet announced."""

    peers: int = 0
    web_seeds: int = 0
    _asked: dict[str, dict[Block, tuple[Source, int]]] = field(default_factory=dict)

    def asked(self, torrent: str, block: Block, source: Source, size: int) -> None:
        """``block`` (``size`` bytes) of ``torrent`` was asked of ``source``."""
        self._asked.setdefault(torrent, {})[block] = (source, size)

    def finished(self, torrent: str, block: Block, source: Source, size: int) -> None:
        """``block`` of ``torrent`` came from ``source`` and was written."""
        pending = self._asked.get(torrent)
        if pending is not None:
            pending.pop(block, None)
        self._add(source, size)

    def seeded(self, torrent: str) -> None:
        """``torrent`` became a seed: its outstanding blocks were received,
        unannounced (see the module docstring)."""
        for source, size in self._asked.pop(torrent, {}).values():
            self._add(source, size)

    def forget(self, torrent: str) -> None:
        """``torrent`` was removed: its outstanding requests will never be answered."""
        self._asked.pop(torrent, None)

    def totals(self) -> ReceivedBytes:
        return ReceivedBytes(peers=self.peers, web_seeds=self.web_seeds)

    def _add(self, source: Source, size: int) -> None:
        if source is Source.WEB_SEED:
            self.web_seeds += size
        else:
            self.peers += size
