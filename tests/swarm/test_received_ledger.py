"""swarm.torrent.received: the pure ledger of bytes received by source."""

from __future__ import annotations

from swarm.torrent.received import ReceivedLedger, Source
from swarm.transfer import ReceivedBytes


def test_each_block_counts_once_for_the_source_that_delivered_it() -> None:
    ledger = ReceivedLedger()
    ledger.asked("t", (0, 0), Source.WEB_SEED, 16384)
    ledger.asked("t", (0, 0), Source.PEER, 16384)  # end game: asked twice
    ledger.finished("t", (0, 0), Source.PEER, 16384)
    ledger.seeded("t")
    assert ledger.totals() == ReceivedBytes(peers=16384, web_seeds=0)


def test_blocks_written_after_the_torrent_became_a_seed_count_for_who_was_asked() -> None:
    # libtorrent announces no block once it dropped the piece picker.
    ledger = ReceivedLedger()
    ledger.asked("t", (4, 0), Source.WEB_SEED, 16384)
    ledger.asked("t", (5, 0), Source.WEB_SEED, 4464)
    ledger.finished("t", (4, 0), Source.WEB_SEED, 16384)
    assert ledger.totals() == ReceivedBytes(peers=0, web_seeds=16384)
    ledger.seeded("t")
    assert ledger.totals() == ReceivedBytes(peers=0, web_seeds=16384 + 4464)
    ledger.seeded("t")  # nothing outstanding is counted twice
    assert ledger.totals() == ReceivedBytes(peers=0, web_seeds=16384 + 4464)


def test_a_removed_torrent_keeps_what_it_received_and_drops_what_it_asked() -> None:
    ledger = ReceivedLedger()
    ledger.asked("t", (0, 0), Source.PEER, 100)
    ledger.asked("t", (0, 1), Source.PEER, 100)
    ledger.finished("t", (0, 0), Source.PEER, 100)
    ledger.forget("t")
    ledger.seeded("t")
    assert ledger.totals() == ReceivedBytes(peers=100, web_seeds=0)
