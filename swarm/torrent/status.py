"""Torrent status from libtorrent's ``state_update_alert``, never by polling.

``torrent_handle.status()`` is a synchronous round trip to libtorrent's
network thread; asking it for every transfer on every status request blocks
the event loop for as long as there are torrents.  Instead the session asks
libtorrent to post one ``state_update_alert`` (``post_torrent_updates``)
holding the status of every torrent that changed since the last one, once a
second and whenever a status is asked for, and each transfer keeps the last
:class:`TorrentCounters` it got.  A status is therefore at most one update
old; :meth:`StatusUpdates.refresh` waits for an update asked for after the
call, for callers that need numbers that include what just happened.

Invariant: every ``post_torrent_updates`` is answered by exactly one alert,
in order, unless libtorrent drops alerts (then :meth:`StatusUpdates.dropped`
forgets what was outstanding, so nobody waits for a lost answer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libtorrent as lt

_CHECKING_STATES = {
    lt.torrent_status.checking_files,
    lt.torrent_status.checking_resume_data,
    lt.torrent_status.queued_for_checking,
}


def is_checking(state: Any) -> bool:
    """Whether a libtorrent ``torrent_status.state`` is one of the checking states."""
    return state in _CHECKING_STATES


def error_text(ec: Any) -> str | None:
    """The message of a libtorrent ``error_code``, or None if it is no error."""
    return None if ec.value() == 0 else str(ec.message())


@dataclass(frozen=True)
class TorrentCounters:
    """What a transfer's status takes from libtorrent's ``torrent_status``."""

    progress: float = 0.0  # 0..1 of wanted bytes
    total_wanted: int = 0
    total_done: int = 0
    download_rate: int = 0  # payload bytes/s
    upload_rate: int = 0
    downloaded: int = 0  # payload bytes in this session
    uploaded: int = 0
    num_peers: int = 0
    num_seeds: int = 0
    paused: bool = False
    error: str | None = None

    @classmethod
    def of(cls, st: Any) -> TorrentCounters:
        """The counters of a libtorrent ``torrent_status``."""
        return cls(
            progress=float(st.progress),
            total_wanted=int(st.total_wanted),
            total_done=int(st.total_done),
            download_rate=int(st.download_payload_rate),
            upload_rate=int(st.upload_payload_rate),
            downloaded=int(st.total_payload_download),
            uploaded=int(st.total_payload_upload),
            num_peers=int(st.num_peers),
            num_seeds=int(st.num_seeds),
            paused=bool(st.flags & lt.torrent_flags.paused),
            error=error_text(st.errc),
        )


class StatusUpdates:
    """Asks libtorrent for torrent status updates and tells who waits for them.

    ``post`` asks libtorrent for an update (``post_torrent_updates``) and
    says whether it could (not once the session is gone).  Runs on the event
    loop's thread only.
    """

    def __init__(self, post: Callable[[], bool], loop: asyncio.AbstractEventLoop) -> None:
        self._post = post
        self._loop = loop
        self._asked = 0  # updates asked for
        self._answered = 0  # updates received (or given up on)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def request(self) -> None:
        """Ask for an update unless one is already on its way."""
        if self._answered >= self._asked:
            self._ask()

    async def refresh(self, timeout: float = 10.0) -> None:
        """Until an update asked for now has been handled (or ``timeout`` passed:
        the status is then as old as the last update)."""
        number = self._ask()
        if number is None:
            return  # no session: the last update is all there will be
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((number, fut))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), timeout)

    def received(self, alert: Any) -> list[tuple[str, TorrentCounters]]:
        """(v2 info-hash, counters) of each torrent in a ``state_update_alert``
        (copied: the alert dies at the next pop); its waiters are woken."""
        out = []
        for st in alert.status:
            with contextlib.suppress(RuntimeError):
                out.append((st.info_hashes.v2.to_bytes().hex(), TorrentCounters.of(st)))
        self._answered = min(self._answered + 1, self._asked)
        self._wake()
        return out

    def dropped(self) -> None:
        """libtorrent dropped alerts: answers outstanding may be lost."""
        self._answered = self._asked
        self._wake()

    def close(self) -> None:
        """No more updates will come: wake everyone."""
        self.dropped()

    def _ask(self) -> int | None:
        """Ask for an update; its number, or None if the session is gone."""
        if not self._post():
            return None
        self._asked += 1
        return self._asked

    def _wake(self) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for number, fut in self._waiters:
            if number <= self._answered:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((number, fut))
        self._waiters = still
