"""The node's libtorrent session, driven by asyncio (implements ``TransferSession``).

Threading: everything here runs on the event loop's thread.  libtorrent's
own threads never call into Python: they signal the alert socket
(``set_alert_fd``), the loop's reader pops the alerts and dispatches each to
the transfer it names, to the resume store or to the session's own
bookkeeping, copying what it needs (an alert is invalid after the next pop).

Between the session and its parts the interfaces are explicit:
:class:`~swarm.torrent.transfer.TorrentTransfer` gets alerts through its
``on_*`` methods and status through a
:class:`~swarm.torrent.status.StatusUpdates`;
:class:`~swarm.torrent.resume.ResumeStore` owns the resume data.  Neither
reaches into the other's fields.

Bytes received by source: libtorrent's block alerts name the piece, the
block and the endpoint asked (``block_downloading_alert``) or that delivered
it (``block_finished_alert``); :class:`~swarm.torrent.received.ReceivedLedger`
adds each block's size (from the torrent's layout) once, to peers or to web
seeds.  An endpoint is a web seed if a torrent's web seed URL names it
(``url_address``) or libtorrent lists it as a web seed connection when it is
first seen; what an endpoint is, is remembered, so the counts stay exact
after peers disconnect and torrents are removed.

Peers: configured bootstrap peers and those given to :meth:`connect` are
connected to for every torrent, again every ``reconnect_interval``; a peer
banned for corrupt data never is (nor, with ``ban_by_ip``, anything at its IP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import libtorrent as lt

from swarm.exceptions import TransferError
from swarm.torrent.metainfo import BLOCK_SIZE, load_info, stored_paths
from swarm.torrent.received import Block, ReceivedLedger, Source
from swarm.torrent.resume import ResumeStore
from swarm.torrent.settings import SessionConfig, format_address, parse_address, url_address
from swarm.torrent.status import StatusUpdates, error_text, is_checking
from swarm.torrent.transfer import DONT_DOWNLOAD, LOW_PRIORITY, TorrentTransfer
from swarm.transfer import ReceivedBytes, TorrentMeta

log = logging.getLogger(__name__)

# Flags a resume file may carry that we never want: libtorrent's queueing
# (auto_managed) would pause torrents beyond its active limits, and a paused,
# upload-only or share-mode torrent neither reads on demand nor seeds fully.
_UNWANTED_FLAGS = (
    lt.torrent_flags.paused
    | lt.torrent_flags.auto_managed
    | lt.torrent_flags.upload_mode
    | lt.torrent_flags.share_mode
    | lt.torrent_flags.stop_when_ready
    | lt.torrent_flags.seed_mode
    | lt.torrent_flags.super_seeding
)

_WEB_SEED_TYPES = {int(lt.peer_info.web_seed), int(lt.peer_info.http_seed)}

# The session's periodic work: session stats, status updates, reconnects.
TICK = 1.0


class TorrentSession:
    """A libtorrent session driven by asyncio.

    ``state_dir`` holds each torrent's resume data (see
    :mod:`swarm.torrent.resume`).
    """

    def __init__(self, config: SessionConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.reconnect_rounds = 0  # rounds of connecting every torrent to known peers
        self._settings = config.settings()  # ConfigError early
        self._ses: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._resume: ResumeStore | None = None
        self._updates: StatusUpdates | None = None
        self._transfers: dict[str, TorrentTransfer] = {}
        self._peers: dict[str, tuple[str, int]] = {}
        self._banned: dict[str, None] = {}
        self._banned_ips: set[str] = set()
        self._blocked = 0
        self._stats: dict[str, int] = {}
        self._received = ReceivedLedger()
        self._endpoint_source: dict[tuple[str, int], Source] = {}
        self._tick: asyncio.Task[None] | None = None
        self._closed = False
        for peer in config.bootstrap:
            self._peers[peer] = parse_address(peer)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """Raises :class:`TransferError` before :meth:`start`."""
        if self._loop is None:
            raise TransferError("session not started")
        return self._loop

    @property
    def resume(self) -> ResumeStore:
        """The owner of the torrents' resume data.

        Raises :class:`TransferError` before :meth:`start`.
        """
        if self._resume is None:
            raise TransferError("session not started")
        return self._resume

    @property
    def listen_port(self) -> int:
        """The TCP port libtorrent listens on (0 before start)."""
        return int(self._ses.listen_port()) if self._ses is not None else 0

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Start libtorrent and its alert pump; call inside the running loop.

        Raises :class:`TransferError` if libtorrent cannot listen.
        """
        if self._ses is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._resume = ResumeStore(self.state_dir, self.config.resume_interval, loop)
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._sockets = (reader, writer)
        try:
            self._ses = lt.session(self._settings)
        except RuntimeError as exc:
            reader.close()
            writer.close()
            raise TransferError(f"cannot start libtorrent: {exc}") from exc
        self._updates = StatusUpdates(self._post_torrent_updates, loop)
        self._ses.set_alert_fd(writer.fileno())
        loop.add_reader(reader.fileno(), self._pump)
        self._pump()  # alerts posted before the reader existed
        if self.config.dht:
            # Bootstrap nodes given as routers only seed lookups and are never
            # kept in the routing table; as nodes they are, so a swarm whose
            # members all name one node still finds each other.
            for endpoint in self._peers.values():
                self._ses.add_dht_node(endpoint)
        if not self._ses.is_listening():
            await self.close()
            raise TransferError(f"libtorrent cannot listen on {self.config.listen}")
        self._tick = loop.create_task(self._ticker())

    async def close(self) -> None:
        """Pause every torrent, save their resume data (waiting for it), then stop."""
        if self._ses is None or self._closed:
            return
        self._closed = True
        loop = self.loop
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        # Paused first: no piece arrives, no peer is served after the last save.
        self._ses.pause()
        transfers = list(self._transfers.values())
        await self.resume.close(transfers)
        for t in transfers:
            t.fail("session closed", gone=True)
        if self._updates is not None:
            self._updates.close()
        if self._sockets is not None:
            loop.remove_reader(self._sockets[0].fileno())
        self._transfers.clear()
        ses, self._ses = self._ses, None
        # Destroying a session waits for libtorrent's threads: not on the loop.
        await asyncio.to_thread(_drop, ses)
        del ses
        if self._sockets is not None:
            for s in self._sockets:
                s.close()
            self._sockets = None

    # -- torrents -----------------------------------------------------------

    def add(
        self,
        meta: TorrentMeta,
        save_path: Path,
        *,
        prefetch: bool = False,
        web_seeds: tuple[str, ...] = (),
    ) -> TorrentTransfer:
        """Add (or return the already added) torrent, resuming from saved state.

        Raises :class:`TransferError` if the session is not running or
        libtorrent refuses the torrent.
        """
        self._require_running()
        existing = self._transfers.get(meta.info_hash)
        if existing is not None:
            for url in web_seeds:
                existing.handle.add_url_seed(url)
            return existing
        ti = load_info(meta.data)
        atp = self.resume.load(meta) or lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_path)
        num_pieces = int(ti.num_pieces())
        # On demand: nothing downloads unless read (deadlines raise a piece's
        # priority); prefetch: everything, at the lowest priority.
        atp.piece_priorities = [LOW_PRIORITY if prefetch else DONT_DOWNLOAD] * num_pieces
        atp.file_priorities = []
        atp.flags = (
            (atp.flags & ~_UNWANTED_FLAGS)
            | lt.torrent_flags.override_trackers
            | lt.torrent_flags.update_subscribe  # in post_torrent_updates' answers
        )
        atp.trackers = []
        atp.url_seeds = sorted(set(atp.url_seeds) | set(web_seeds))
        atp.peers = [e for e in self._peers.values() if not self._is_banned(e)]
        try:
            handle = self._ses.add_torrent(atp)
        except RuntimeError as exc:
            raise TransferError(f"libtorrent refused torrent {meta.name!r}: {exc}") from exc
        transfer = TorrentTransfer(
            meta,
            save_path,
            handle,
            stored_paths=stored_paths(ti),
            num_pieces=num_pieces,
            prefetch=prefetch,
            loop=self.loop,
            read_ahead=self.config.read_ahead,
            piece_cache=self.config.piece_cache,
            status_source=self._status_updates(),
        )
        self._transfers[meta.info_hash] = transfer
        for address in self._peers.values():
            self._connect(transfer, address)
        return transfer

    def get(self, info_hash: str) -> TorrentTransfer | None:
        return self._transfers.get(info_hash)

    def remove(self, info_hash: str) -> None:
        """Stop serving a torrent; its files and resume data stay on disk."""
        transfer = self._transfers.pop(info_hash, None)
        if transfer is None:
            return
        self.resume.forget(transfer)
        self._received.forget(info_hash)
        transfer.fail("removed", gone=True)
        if self._ses is not None:
            self._ses.remove_torrent(transfer.handle)

    def connect(self, address: str) -> None:
        """Connect ``host:port`` to every torrent, now and when added later.

        Raises :class:`ConfigError` for a malformed address.
        """
        endpoint = parse_address(address)
        self._peers[address] = endpoint
        for transfer in self._transfers.values():
            self._connect(transfer, endpoint)

    def status(self) -> dict[str, object]:
        """Session totals, as of libtorrent's last status update."""
        statuses = [t.status() for t in self._transfers.values()]
        return {
            "listen_port": self.listen_port,
            "dht": self.config.dht,
            "dht_nodes": self._stats.get("dht.dht_nodes", 0),
            "torrents": len(statuses),
            "peers": sum(s.num_peers for s in statuses),
            "downloaded": sum(s.downloaded for s in statuses),
            "uploaded": sum(s.uploaded for s in statuses),
            "download_rate": sum(s.download_rate for s in statuses),
            "upload_rate": sum(s.upload_rate for s in statuses),
            "received_from_peers": self._received.peers,
            "received_from_web_seeds": self._received.web_seeds,
            "hash_failures": sum(s.hash_failures for s in statuses),
            "banned": len(self._banned),
            "blocked_connections": self._blocked,
        }

    def received(self) -> ReceivedBytes:
        """Payload bytes received since the session started, by source."""
        return self._received.totals()

    def banned(self) -> list[str]:
        return list(self._banned)

    def libtorrent_settings(self) -> dict[str, object]:
        """The settings libtorrent is running with (for diagnostics and tests).

        Raises :class:`TransferError` if the session is not running.
        """
        self._require_running()
        return dict(self._ses.get_settings())

    # -- internals ------------------------------------------------------------

    def _require_running(self) -> None:
        if self._ses is None or self._closed:
            raise TransferError("session is not running")

    def _post_torrent_updates(self) -> bool:
        # Not a bound method of the libtorrent session: StatusUpdates outlives
        # it, and the session must be destroyed in close(), off the loop.
        if self._ses is None or self._closed:
            return False
        self._ses.post_torrent_updates()
        return True

    def _status_updates(self) -> StatusUpdates:
        if self._updates is None:
            raise TransferError("session not started")
        return self._updates

    def _is_banned(self, endpoint: tuple[str, int]) -> bool:
        return format_address(*endpoint) in self._banned or endpoint[0] in self._banned_ips

    def _connect(self, transfer: TorrentTransfer, endpoint: tuple[str, int]) -> None:
        if endpoint[1] == self.listen_port and endpoint[0] in ("127.0.0.1", "::1"):
            return  # ourselves
        if self._is_banned(endpoint):
            return  # connect_peer would bring a banned peer back
        try:
            transfer.handle.connect_peer(endpoint)
        except RuntimeError as exc:
            log.debug("%s: cannot connect %s: %s", transfer.meta.name, endpoint, exc)

    async def _ticker(self) -> None:
        last_connect = self.loop.time()
        while True:
            await asyncio.sleep(TICK)
            if self._ses is None:
                return
            self._ses.post_session_stats()
            self._status_updates().request()
            if self.loop.time() - last_connect >= self.config.reconnect_interval:
                last_connect = self.loop.time()
                for transfer in self._transfers.values():
                    for endpoint in self._peers.values():
                        self._connect(transfer, endpoint)
                    # libtorrent announces to the DHT every 15 minutes; a
                    # torrent nobody serves us should look for peers sooner.
                    lonely = transfer.counters.num_peers == 0
                    if self.config.dht and not transfer.complete and lonely:
                        with contextlib.suppress(RuntimeError):
                            transfer.handle.force_dht_announce()
                self.reconnect_rounds += 1

    # -- alerts -------------------------------------------------------------

    def _pump(self) -> None:
        if self._sockets is None or self._ses is None:
            return
        with contextlib.suppress(BlockingIOError):
            while self._sockets[0].recv(4096):
                pass
        for alert in self._ses.pop_alerts():
            try:
                self._dispatch(alert)
            except Exception:
                log.exception("error handling libtorrent alert %s", type(alert).__name__)

    def _transfer_of(self, alert: Any) -> TorrentTransfer | None:
        try:
            info_hash = alert.handle.info_hashes().v2.to_bytes().hex()
        except RuntimeError:
            return None
        return self._transfers.get(info_hash)

    def _dispatch(self, alert: Any) -> None:
        handler = self._handlers.get(type(alert))
        if handler is not None:
            handler(self, alert)
        elif isinstance(alert, lt.torrent_alert) and alert.category() & int(
            lt.alert.category_t.error_notification
        ):
            log.info("libtorrent: %s", alert.message())

    def _on_read_piece(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        error = error_text(alert.error)
        data = bytes(alert.buffer) if error is None else b""
        transfer.on_read_piece(int(alert.piece), data, error)

    def _on_piece_finished(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        transfer.on_piece_finished(int(alert.piece_index))
        if not self._closed:
            self.resume.progress(transfer)

    def _on_hash_failed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            transfer.on_hash_failed(int(alert.piece_index))

    def _block(self, alert: Any) -> tuple[TorrentTransfer, Block, Source, int] | None:
        """The transfer, block, source and size a block alert names (None:
        not a transfer or a piece of ours)."""
        transfer = self._transfer_of(alert)
        if transfer is None:
            return None
        piece, block = int(alert.piece_index), int(alert.block_index)
        try:
            size = min(BLOCK_SIZE, transfer.meta.piece_size(piece) - block * BLOCK_SIZE)
        except KeyError:
            return None
        host, port = alert.ip
        return transfer, (piece, block), self._source_of(transfer, (str(host), int(port))), size

    def _on_block_downloading(self, alert: Any) -> None:
        got = self._block(alert)
        if got is not None:
            transfer, block, source, size = got
            self._received.asked(transfer.meta.info_hash, block, source, size)

    def _on_block_finished(self, alert: Any) -> None:
        got = self._block(alert)
        if got is not None:
            transfer, block, source, size = got
            self._received.finished(transfer.meta.info_hash, block, source, size)

    def _source_of(self, transfer: TorrentTransfer, endpoint: tuple[str, int]) -> Source:
        """Whether ``endpoint`` is one of ``transfer``'s web seeds or a peer.

        A block was just asked of it or came from it, so it is connected:
        libtorrent's peer list says which it is.  Remembered: a web seed's
        endpoint (the origin's HTTP port) is never a BitTorrent listener.
        """
        source = self._endpoint_source.get(endpoint)
        if source is not None:
            return source
        with contextlib.suppress(RuntimeError):
            if endpoint in {url_address(u) for u in transfer.handle.url_seeds()}:
                source = Source.WEB_SEED
            else:
                for peer in transfer.handle.get_peer_info():
                    if tuple(peer.ip) == endpoint:
                        web = peer.connection_type in _WEB_SEED_TYPES
                        source = Source.WEB_SEED if web else Source.PEER
                        break
        if source is None:
            return Source.PEER  # gone already, and no web seed URL names it
        self._endpoint_source[endpoint] = source
        return source

    def _on_peer_ban(self, alert: Any) -> None:
        host, port = alert.ip
        address = format_address(host, port)
        # libtorrent posts the alert for every source of a failed piece, web
        # seeds included, even though ban_web_seeds=False keeps them: a web
        # seed still connected was not banned, and its host must not be.
        # The web seed may have disconnected before this alert is handled, so
        # also compare with the torrent's web seed URLs.
        with contextlib.suppress(RuntimeError):
            seeds = {url_address(u) for u in alert.handle.url_seeds()}
            if (
                any(
                    tuple(peer.ip) == (host, port) and peer.connection_type in _WEB_SEED_TYPES
                    for peer in alert.handle.get_peer_info()
                )
                or (host, port) in seeds
            ):
                log.info(
                    "%s: web seed %s kept (shared a failed piece)", alert.torrent_name, address
                )
                return
        if address not in self._banned:
            log.warning("%s: banned peer %s: %s", alert.torrent_name, address, alert.message())
        self._banned[address] = None
        if self.config.ban_by_ip and host not in self._banned_ips:
            self._banned_ips.add(host)
            ip_filter = self._ses.get_ip_filter()
            ip_filter.add_rule(host, host, 1)  # 1: blocked
            self._ses.set_ip_filter(ip_filter)

    def _on_peer_blocked(self, alert: Any) -> None:
        self._blocked += 1
        log.debug("libtorrent: %s", alert.message())

    def _on_checked(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            transfer.on_checked()

    def _on_state_changed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        if alert.state == lt.torrent_status.checking_files:
            transfer.rechecked = True
        elif not is_checking(alert.state) and not transfer.ready:
            transfer.on_checked()
        if alert.state == lt.torrent_status.seeding:
            # libtorrent dropped the piece picker: blocks written from now on
            # are never announced (swarm/torrent/received.py).
            self._received.seeded(transfer.meta.info_hash)
        if alert.state == lt.torrent_status.seeding and self.config.super_seeding:
            # A designated seed (e.g. the site's first node, fed by the
            # origin) offers each peer a piece nobody else has yet, so its
            # upload carries every piece into the swarm about once.
            with contextlib.suppress(RuntimeError):
                alert.handle.set_flags(lt.torrent_flags.super_seeding)

    def _on_fastresume_rejected(self, alert: Any) -> None:
        log.warning("%s: resume data rejected: %s", alert.torrent_name, alert.message())

    def _on_torrent_error(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        message = str(alert.message())
        log.error("libtorrent: %s", message)
        if transfer is not None:
            transfer.on_error(message, error_text(alert.error))

    def _on_save_resume(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            self.resume.on_saved(transfer, alert.params)

    def _on_save_resume_failed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            self.resume.on_save_failed(transfer, str(alert.message()))

    def _on_cache_flushed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            transfer.on_flushed()

    def _on_alerts_dropped(self, alert: Any) -> None:
        log.error("libtorrent dropped alerts; re-requesting pending pieces and flushes")
        for transfer in self._transfers.values():
            transfer.on_alerts_dropped()
        self._status_updates().dropped()

    def _on_state_update(self, alert: Any) -> None:
        for info_hash, counters in self._status_updates().received(alert):
            transfer = self._transfers.get(info_hash)
            if transfer is not None:
                transfer.on_status(counters)

    def _on_session_stats(self, alert: Any) -> None:
        values = alert.values
        self._stats = {k: int(values[k]) for k in ("dht.dht_nodes",) if k in values}

    def _on_listen_failed(self, alert: Any) -> None:
        log.error("libtorrent: %s", alert.message())

    def _on_web_seed(self, alert: Any) -> None:
        log.info("libtorrent: %s", alert.message())

    _handlers: ClassVar[dict[type, Callable[[TorrentSession, Any], None]]] = {
        lt.read_piece_alert: _on_read_piece,
        lt.piece_finished_alert: _on_piece_finished,
        lt.block_downloading_alert: _on_block_downloading,
        lt.block_finished_alert: _on_block_finished,
        lt.hash_failed_alert: _on_hash_failed,
        lt.peer_ban_alert: _on_peer_ban,
        lt.peer_blocked_alert: _on_peer_blocked,
        lt.torrent_checked_alert: _on_checked,
        lt.state_changed_alert: _on_state_changed,
        lt.fastresume_rejected_alert: _on_fastresume_rejected,
        lt.file_error_alert: _on_torrent_error,
        lt.torrent_error_alert: _on_torrent_error,
        lt.save_resume_data_alert: _on_save_resume,
        lt.save_resume_data_failed_alert: _on_save_resume_failed,
        lt.cache_flushed_alert: _on_cache_flushed,
        lt.alerts_dropped_alert: _on_alerts_dropped,
        lt.state_update_alert: _on_state_update,
        lt.session_stats_alert: _on_session_stats,
        lt.listen_failed_alert: _on_listen_failed,
        lt.url_seed_alert: _on_web_seed,
    }


def _drop(session: Any) -> None:
    del session
