"""BitTorrent v2 with libtorrent: the only module that imports it.

Torrents are v2 only (BEP 52): every file has its own SHA-256 merkle tree
whose root is in the info dictionary, and the info dictionary's SHA-256 (the
v2 info-hash) is what the signed TUF target names.  A hybrid or v1 torrent is
refused, since its SHA-1 piece hashes would be a second, weaker way to accept
bytes.

Layout (BEP 52 and libtorrent's ``file_storage``): each file starts on a piece
boundary.  libtorrent represents the gap after a file as a *pad file*
(``NAME/.pad/N``, ``flag_pad_file``) in its file list, so libtorrent file
indices and :attr:`TorrentMeta.files` indices differ; ``TorrentMeta.files``
never lists pad files.  A file of ``size`` bytes starting at piece ``p`` covers
pieces ``p .. p + ceil(size / piece_length) - 1``; an empty file covers none.

Paths: a torrent of exactly one file is a *single-file* torrent (libtorrent
makes every one-file torrent one), stored at ``SAVE_PATH/NAME``, and its
``TorrentFile.path`` is ``NAME``.  Otherwise the files are stored at
``SAVE_PATH/NAME/PATH`` and ``TorrentFile.path`` is ``PATH`` (relative to the
torrent's directory, ``/``-separated, as in the file tree).

Web seeds (BEP 19 ``url-list``): give a *directory* URL ending in ``/``.
libtorrent fetches each file at ``URL + NAME + "/" + PATH`` (multi-file) or
``URL + NAME`` (single file), percent-escaping the path, with HTTP ranges.
So an HTTP server whose document root is ``STORE`` and which holds the
files at ``STORE/NAME/PATH`` (or ``STORE/NAME``) is a web seed with
``URL = http://host:port/``.  (A v2 single-file torrent usually has a tail pad
file, which makes libtorrent treat it as multi-file and always append the
path; a URL that names the file itself would therefore break, hence the rule
"always a directory URL".)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import libtorrent as lt

from swarm.exceptions import ConfigError, TransferError
from swarm.transfer import PeerInfo, TorrentFile, TorrentMeta, TransferStatus

__all__ = [
    "SessionConfig",
    "TorrentSession",
    "TorrentTransfer",
    "create_torrent",
    "parse_torrent",
]

log = logging.getLogger(__name__)

BLOCK_SIZE = 16 * 1024


def _check_relative(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise TransferError(f"file path {path!r} must be relative, without '.' or '..'")
    return p


def create_torrent(
    root: Path,
    files: Sequence[str],
    *,
    name: str,
    piece_length: int = 256 * 1024,
    web_seeds: Sequence[str] = (),
) -> TorrentMeta:
    """A v2-only torrent of ``root/f`` for each ``f`` in ``files``, hashed by libtorrent.

    One file makes a single-file torrent named ``name`` (stored as ``NAME``);
    several make a directory ``NAME`` holding each file at its relative path.
    The .torrent includes the piece layers of every file larger than a piece,
    so a peer needs nothing but the torrent to verify every block.
    ``web_seeds`` are directory URLs (see the module docstring).  Blocking:
    it reads every byte, so call it off the event loop.

    Raises :class:`TransferError` for a bad name, path or piece length, a
    missing or unreadable file.
    """
    if not name or "/" in name or name in (".", ".."):
        raise TransferError(f"torrent name {name!r} must be one path component")
    if piece_length < BLOCK_SIZE or piece_length & (piece_length - 1):
        raise TransferError(f"piece length {piece_length} must be a power of two >= 16 KiB")
    if not files:
        raise TransferError("a torrent needs at least one file")
    if len(set(files)) != len(files):
        raise TransferError("duplicate file paths")
    relative = [_check_relative(f) for f in files]
    sources = [root / f for f in relative]
    for src in sources:
        if not src.is_file():
            raise TransferError(f"{src} is not a regular file")
    single = len(files) == 1
    torrent_paths = [name] if single else [f"{name}/{f}" for f in relative]
    entries = [
        lt.create_file_entry(tp, src.stat().st_size)
        for tp, src in zip(torrent_paths, sources, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="swarm-torrent-") as stage:
        # libtorrent reads each file at STAGE/<torrent path>; a symlink makes
        # that path lead to the caller's file wherever it lives.
        if single:
            os.symlink(sources[0].resolve(), Path(stage) / name)
        else:
            os.symlink(root.resolve(), Path(stage) / name, target_is_directory=True)
        try:
            ct = lt.create_torrent(entries, piece_length, lt.create_torrent.v2_only)
            lt.set_piece_hashes(ct, stage)
        except RuntimeError as exc:
            raise TransferError(f"cannot hash files for torrent {name!r}: {exc}") from exc
    for url in web_seeds:
        ct.add_url_seed(url)
    entry = ct.generate()
    # No creation date: the same files give the same .torrent bytes.
    entry.pop(b"creation date", None)
    return parse_torrent(lt.bencode(entry))


def _bdecode_dict(data: bytes) -> dict[bytes, Any]:
    try:
        decoded: Any = lt.bdecode(data)
    except RuntimeError as exc:
        raise TransferError(f"not a torrent (bdecode failed: {exc})") from exc
    if not isinstance(decoded, dict) or not isinstance(decoded.get(b"info"), dict):
        raise TransferError("not a torrent (no info dictionary)")
    return decoded


def load_info(data: bytes) -> Any:
    """libtorrent's ``torrent_info`` of a validated v2 torrent (untyped: libtorrent's).

    Raises :class:`TransferError` like :func:`parse_torrent`.
    """
    decoded = _bdecode_dict(data)
    info = decoded[b"info"]
    if info.get(b"meta version") != 2:
        raise TransferError("not a BitTorrent v2 torrent (info has no 'meta version' 2)")
    if b"pieces" in info:
        raise TransferError("hybrid v1/v2 torrent refused: v2-only torrents are required")
    # Peers come only from configured bootstrap nodes, the DHT they seed and
    # LSD: a torrent must not make the node contact trackers or DHT nodes.
    for key in (b"announce", b"announce-list", b"nodes"):
        if key in decoded:
            raise TransferError(
                f"torrent names {key.decode()!r}: trackers and DHT nodes are refused"
            )
    try:
        ti = lt.torrent_info(data)
    except RuntimeError as exc:
        raise TransferError(f"invalid v2 torrent: {exc}") from exc
    hashes = ti.info_hashes()
    if hashes.has_v1() or not hashes.has_v2():
        raise TransferError("not a v2-only torrent")
    return ti


def parse_torrent(data: bytes) -> TorrentMeta:
    """Parse and validate a v2-only .torrent (bytes) into :class:`TorrentMeta`.

    libtorrent checks the file tree and that each piece layer hashes to its
    file's root; we also require a piece layer for every file larger than a
    piece (so no peer is needed to learn the hashes).

    Raises :class:`TransferError` naming what is wrong: not bencoded, v1 or
    hybrid, malformed v2 metadata, invalid or missing piece layers.
    """
    ti = load_info(data)
    info_bytes = bytes(ti.info_section())
    info_hash = hashlib.sha256(info_bytes).hexdigest()
    if info_hash != ti.info_hashes().v2.to_bytes().hex():
        raise TransferError("info-hash mismatch between libtorrent and the info dictionary")
    layers = _bdecode_dict(data).get(b"piece layers", {})
    if not isinstance(layers, dict):
        raise TransferError("'piece layers' is not a dictionary")
    piece_length = int(ti.piece_length())
    name = str(ti.name())
    fs = ti.layout()
    files: list[TorrentFile] = []
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        size = int(fs.file_size(i))
        lt_path = str(fs.file_path(i))
        path = lt_path.removeprefix(name + "/") if lt_path != name else name
        root = fs.root(i).to_bytes() if size else b""
        if size > piece_length and root not in layers:
            raise TransferError(f"torrent lacks the piece layer of {path!r}")
        files.append(
            TorrentFile(
                path=path,
                size=size,
                pieces_root=root.hex(),
                first_piece=int(fs.file_offset(i)) // piece_length,
                num_pieces=-(-size // piece_length),
            )
        )
    return TorrentMeta(
        data=bytes(data),
        info_hash=info_hash,
        name=name,
        piece_length=piece_length,
        files=tuple(files),
    )


# -- the session ------------------------------------------------------------
#
# Threading: everything below runs on the event loop's thread.  libtorrent's
# own threads never call into Python: they signal the alert socket, and the
# loop pops and dispatches alerts, copying what it needs (an alert object is
# invalid after the next pop_alerts).

DONT_DOWNLOAD = 0
LOW_PRIORITY = 1
# Deadlines (ms from now) of the pieces of one read: the first soonest, then a
# small step each, so two readers' pieces interleave by arrival time instead
# of one long read holding back a later short one.
DEADLINE_STEP_MS = 2
READ_AHEAD_DEADLINE_MS = 1000
# A read_piece that fails while the torrent is usable is retried this often.
MAX_READ_RETRIES = 3
# libtorrent::errors::resume_data_not_modified (an only_if_modified save with no change)
_RESUME_DATA_NOT_MODIFIED = 143

_ALERT_MASK = (
    lt.alert.category_t.error_notification
    | lt.alert.category_t.peer_notification
    | lt.alert.category_t.status_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.progress_notification
    | lt.alert.category_t.ip_block_notification
)

_WEB_SEED_TYPES = {int(lt.peer_info.web_seed), int(lt.peer_info.http_seed)}

_CHECKING_STATES = {
    lt.torrent_status.checking_files,
    lt.torrent_status.checking_resume_data,
    lt.torrent_status.queued_for_checking,
}

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


def parse_address(address: str) -> tuple[str, int]:
    """``"ip:port"`` or ``"[v6]:port"`` as ``(ip, port)``.

    Raises :class:`ConfigError` if it is not an address with a port.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{address!r} is not an 'ip:port' address")
    return host, int(port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class SessionConfig:
    """How the node's libtorrent session is set up.

    ``listen`` is ``"ip:port"`` (port 0: any free port, see
    :attr:`TorrentSession.listen_port`).  ``bootstrap`` peers are connected to
    directly for every torrent and are the only DHT bootstrap nodes: the
    node never contacts libtorrent's public routers.  With ``dht`` and no
    bootstrap the DHT runs passively (others may bootstrap from this node).
    ``dht_restrict_ips`` keeps libtorrent's anti-Sybil rule of one DHT node
    per IP; turn it off only where several nodes share an address (tests on
    127.0.0.1).  ``ban_by_ip``: a peer banned for corrupt data is blocked by
    IP for every torrent; libtorrent's own ban is per ``ip:port``, which a
    peer dodges by reconnecting from another port since we allow several
    connections per IP.  Turn it off only where honest peers share the
    banned peer's IP (tests on 127.0.0.1).  Rate limits are bytes/s, 0 for
    none; libtorrent exempts loopback and private-range peers from them, so
    shape links with ``tc``.
    """

    listen: str = "0.0.0.0:6881"
    bootstrap: list[str] = field(default_factory=list)
    dht: bool = True
    lsd: bool = False
    dht_restrict_ips: bool = True
    ban_by_ip: bool = True
    upload_rate_limit: int = 0
    download_rate_limit: int = 0
    # Tuning (see settings() for why each is set).
    unchoke_slots: int = 64
    max_out_request_queue: int = 1500
    request_queue_time: int = 1
    min_reconnect_time: int = 10
    web_seed_retry: int = 10
    read_ahead: int = 4 * 1024 * 1024
    resume_interval: float = 2.0
    piece_cache: int = 8 * 1024 * 1024
    reconnect_interval: float = 10.0
    piece_extent_affinity: bool = False
    seed_choking: str = "anti_leech"  # or "round_robin", "fastest_upload"
    tick_interval_ms: int = 500
    initial_picker_threshold: int = 4
    super_seeding: bool = False

    def settings(self) -> lt.settings_pack:
        """The libtorrent ``settings_pack`` for this configuration.

        Raises :class:`ConfigError` for a malformed address.
        """
        host, port = parse_address(self.listen)
        for peer in self.bootstrap:
            parse_address(peer)
        pack: lt.settings_pack = {
            "listen_interfaces": _format_address(host, port),
            # Connect out from the address we listen on, so peers know this
            # node by one address (their bans and our logs agree).
            "outgoing_interfaces": "" if host in ("0.0.0.0", "::") else host,
            # Only configured nodes: the default names public routers.
            "dht_bootstrap_nodes": ",".join(self.bootstrap),
            "enable_dht": self.dht,
            "dht_restrict_routing_ips": self.dht_restrict_ips,
            "dht_restrict_search_ips": self.dht_restrict_ips,
            "enable_lsd": self.lsd,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_ip_notifier": False,
            # TCP only: uTP's congestion control costs a core on this machine
            # and buys nothing on a LAN we shape with tc.
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_tcp": True,
            "enable_incoming_tcp": True,
            # Tests (and some sites) run many nodes behind one address.
            "allow_multiple_connections_per_ip": True,
            "anonymous_mode": False,
            "alert_mask": int(_ALERT_MASK),
            # Piece alerts must not be dropped: a lost one would strand a read
            # (we still recover from alerts_dropped_alert).
            "alert_queue_size": 100_000,
            # An on-demand torrent is "finished" (all wanted pieces had) most
            # of the time; libtorrent would then drop connections to seeds as
            # redundant and the next read would wait for min_reconnect_time.
            "close_redundant_connections": False,
            # Cooperating LAN nodes: no tit-for-tat.  A high fixed number of
            # unchoke slots serves every interested peer at once (rate-based
            # choking starts from few slots and grows slowly).
            "choking_algorithm": int(lt.choking_algorithm_t.fixed_slots_choker),
            "unchoke_slots_limit": self.unchoke_slots,
            # anti_leech favours peers that have little or almost all of the
            # torrent: the seed's upload goes where it is rarest (measured
            # slightly better than fastest_upload and round_robin).
            "seed_choking_algorithm": int(getattr(lt.seed_choking_algorithm_t, self.seed_choking)),
            # Deep request pipelines for fast links, but only ~1 s of queued
            # requests per peer, so a deadline read does not sit behind bulk.
            "max_out_request_queue": self.max_out_request_queue,
            "max_allowed_in_request_queue": max(2000, self.max_out_request_queue),
            "request_queue_time": self.request_queue_time,
            # Extent affinity makes peers pick pieces in the 4 MiB extents
            # others are downloading: in a flash crowd they then ask the one
            # seed for the same pieces (16 nodes, 64 MiB: the seed sent 2.9
            # copies with it, 1.7 without; 3.4x the Kumar-Ross bound -> 2.2x).
            "piece_extent_affinity": self.piece_extent_affinity,
            "tick_interval": self.tick_interval_ms,
            "initial_picker_threshold": self.initial_picker_threshold,
            # The web seed is the origin: every byte it sends is verified all
            # the same, and libtorrent blames every source of a failed piece,
            # so a corrupt peer would get the origin banned with it and leave
            # readers with no good source.
            "ban_web_seeds": False,
            # Parole confines every source of a failed piece to downloading
            # whole pieces alone; with an origin and one corrupt peer both on
            # parole, a deadline read's piece sat unrequested for seconds.
            # Bans still come from trust points (and v2 block hashes).
            "use_parole_mode": False,
            # A LAN peer that restarted should be retried soon, not after 60 s.
            "min_reconnect_time": self.min_reconnect_time,
            "urlseed_wait_retry": self.web_seed_retry,
            "upload_rate_limit": self.upload_rate_limit,
            "download_rate_limit": self.download_rate_limit,
            "user_agent": "swarm-grid libtorrent/" + lt.__version__,
        }
        return pack


def _url_address(url: str) -> tuple[str, int]:
    """(host, port) a web seed URL connects to."""
    u = urllib.parse.urlsplit(url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


def _error_text(ec: Any) -> str | None:
    """The message of a libtorrent ``error_code``, or None if it is no error."""
    return None if ec.value() == 0 else str(ec.message())


def _set_error(fut: asyncio.Future[bytes], exc: TransferError) -> None:
    fut.set_exception(exc)
    # Mark it retrieved: readers still waiting get the error all the same,
    # and a reader that gave up (cancelled) leaves no "never retrieved" noise.
    fut.exception()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TorrentTransfer:
    """One torrent in a :class:`TorrentSession` (implements ``Transfer``).

    Invariants: ``_have[p]`` is 1 only for pieces libtorrent has verified
    (from its piece bitfield once checking is done, then piece_finished
    alerts); every future in ``_pending`` is resolved by a read_piece alert
    for its piece, or failed when the torrent goes away.
    """

    def __init__(
        self,
        session: TorrentSession,
        meta: TorrentMeta,
        save_path: Path,
        handle: Any,
        lt_paths: list[str],
        num_pieces: int,
        prefetch: bool,
    ) -> None:
        self.meta = meta
        self.save_path = save_path
        self.rechecked = False  # libtorrent hash-checked files on disk when added
        self._session = session
        self._handle = handle
        self._lt_paths = lt_paths
        self._prefetch = prefetch
        self._num_pieces = num_pieces
        self._have = bytearray(self._num_pieces)
        self._have_count = 0
        self._ready = False  # libtorrent finished checking; _have is complete
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._retries: dict[int, int] = {}
        self._read_ahead: set[int] = set()
        self._last_end: dict[int, int] = {}
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._complete_waiters: list[asyncio.Future[None]] = []
        self._hash_failures = 0
        self._errors: list[str] = []
        self._failed: TransferError | None = None
        # resume data bookkeeping (driven by the session)
        self._last_save = 0.0
        self._save_timer: asyncio.TimerHandle | None = None
        self._saves_outstanding = 0
        self._save_waiters: list[asyncio.Future[None]] = []
        self._save_snapshots: deque[bytes] = deque()  # _have when each save's flush began
        self._flush_callbacks: deque[Callable[[bool], None]] = deque()
        self._write_task: asyncio.Task[None] | None = None

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
        f = self._file(file_index)
        if offset < 0 or size < 0:
            raise ValueError(f"negative offset or size ({offset}, {size})")
        end = min(f.size, offset + size)
        if offset >= end:
            return b""
        if self._failed is not None:
            raise self._failed
        length = self.meta.piece_length
        first = f.first_piece + offset // length
        last = f.first_piece + (end - 1) // length
        sequential = self._last_end.get(file_index) == offset
        self._last_end[file_index] = end
        futures = [
            self._piece(p, k * DEADLINE_STEP_MS) for k, p in enumerate(range(first, last + 1))
        ]
        if sequential:
            self._ask_read_ahead(f, end)
        waiting = [fut for fut in futures if not fut.done()]
        if waiting:
            # asyncio.wait, not gather: a cancelled reader must not cancel
            # futures other readers of the same pieces share.
            await asyncio.wait(waiting)
        data = b"".join(fut.result() for fut in futures)
        start = offset - (first - f.first_piece) * length
        return data[start : start + (end - offset)]

    def have_file(self, file_index: int) -> bool:
        f = self._file(file_index)
        return all(self._have[f.first_piece : f.first_piece + f.num_pieces])

    def file_path(self, file_index: int) -> Path:
        """Where the file is stored.  Reading it directly is safe only after
        :meth:`wait_complete` (or for pieces had before the session started):
        verified pieces may still be in flight to the file.  Use :meth:`read`.
        """
        self._file(file_index)
        return self.save_path / self._lt_paths[file_index]

    def set_prefetch(self, prefetch: bool) -> None:
        """Full prefetch: every piece at low priority, behind deadline reads.

        Raises :class:`TransferError` if the torrent is gone.
        """
        self._prefetch = prefetch
        priority = LOW_PRIORITY if prefetch else DONT_DOWNLOAD
        try:
            self._handle.prioritize_pieces([priority] * self._num_pieces)
        except RuntimeError as exc:
            raise TransferError(f"{self.meta.name}: {exc}") from exc
        # Priority 0 drops libtorrent's deadlines: ask again for what is awaited.
        self._read_ahead.clear()
        for p in list(self._pending):
            self._request(p, 0)

    def status(self) -> TransferStatus:
        """Raises :class:`TransferError` if the torrent is gone."""
        try:
            st = self._handle.status()
        except RuntimeError as exc:
            raise TransferError(f"{self.meta.name}: {exc}") from exc
        error = _error_text(st.errc)
        if error is not None:
            state = f"error: {error}"
        elif st.flags & lt.torrent_flags.paused:
            state = "paused"
        elif st.state in _CHECKING_STATES:
            state = "checking"
        elif st.is_seeding:
            state = "seeding"
        else:
            state = "downloading"
        return TransferStatus(
            info_hash=self.meta.info_hash,
            name=self.meta.name,
            state=state,
            progress=float(st.progress),
            total_wanted=int(st.total_wanted),
            total_done=int(st.total_done),
            download_rate=int(st.download_payload_rate),
            upload_rate=int(st.upload_payload_rate),
            downloaded=int(st.total_payload_download),
            uploaded=int(st.total_payload_upload),
            num_peers=int(st.num_peers),
            num_seeds=int(st.num_seeds),
            prefetch=self._prefetch,
            hash_failures=self._hash_failures,
            errors=list(self._errors),
        )

    def peers(self) -> list[PeerInfo]:
        """Connected peers and web seeds. Raises :class:`TransferError` if gone."""
        try:
            infos = self._handle.get_peer_info()
        except RuntimeError as exc:
            raise TransferError(f"{self.meta.name}: {exc}") from exc
        return [
            PeerInfo(
                address=_format_address(*p.ip),
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
        while not self.complete:
            if self._failed is not None:
                raise self._failed
            fut: asyncio.Future[None] = self._session.loop.create_future()
            self._complete_waiters.append(fut)
            await fut
        # A piece is "had" once verified, possibly before libtorrent has
        # written all its blocks to the file: wait for those writes.
        flushed: asyncio.Future[None] = self._session.loop.create_future()
        self._flush(lambda _: _resolve(flushed))
        await flushed
        if self._failed is not None:
            raise self._failed

    # -- beyond the protocol ----------------------------------------------

    @property
    def complete(self) -> bool:
        return self._ready and self._have_count == self._num_pieces

    @property
    def hash_failures(self) -> int:
        return self._hash_failures

    @property
    def resume_pending(self) -> bool:
        """Progress not yet in the resume file (a save is due, asked or being written)."""
        return (
            self._save_timer is not None
            or self._saves_outstanding > 0
            or (self._write_task is not None and not self._write_task.done())
        )

    # -- piece requests ---------------------------------------------------

    def _file(self, file_index: int) -> TorrentFile:
        if not 0 <= file_index < len(self.meta.files):
            raise IndexError(f"{self.meta.name} has no file {file_index}")
        return self.meta.files[file_index]

    def _piece(self, piece: int, deadline_ms: int) -> asyncio.Future[bytes]:
        fut = self._pending.get(piece)
        if fut is not None:
            return fut
        fut = self._session.loop.create_future()
        cached = self._cache.get(piece)
        if cached is not None:
            self._cache.move_to_end(piece)
            fut.set_result(cached)
            return fut
        self._pending[piece] = fut
        self._request(piece, deadline_ms)
        return fut

    def _request(self, piece: int, deadline_ms: int) -> None:
        # Data comes back in a read_piece alert, read by libtorrent's disk
        # I/O after the piece passed its hash check.  We do not read the file
        # ourselves after piece_finished: libtorrent may still hold the
        # piece's blocks in its store buffer, not yet written to the file,
        # and read_piece serves those too.  For a piece not yet had,
        # set_piece_deadline(alert_when_available) posts the same alert once
        # the piece has been downloaded and verified.
        try:
            if self._have[piece]:
                self._handle.read_piece(piece)
            else:
                self._handle.set_piece_deadline(
                    piece, deadline_ms, lt.torrent_handle.alert_when_available
                )
        except RuntimeError as exc:
            self._fail(TransferError(f"{self.meta.name}: {exc}"))

    def _ask_read_ahead(self, f: TorrentFile, end: int) -> None:
        length = self.meta.piece_length
        stop = min(f.size, end + self._session.config.read_ahead)
        if end >= stop:
            return
        first = f.first_piece + end // length
        last = f.first_piece + (stop - 1) // length
        for k, p in enumerate(range(first, last + 1)):
            if self._have[p] or p in self._pending or p in self._read_ahead:
                continue
            self._read_ahead.add(p)
            try:
                self._handle.set_piece_deadline(p, READ_AHEAD_DEADLINE_MS + k * DEADLINE_STEP_MS)
            except RuntimeError as exc:
                self._fail(TransferError(f"{self.meta.name}: {exc}"))
                return

    def _remember(self, piece: int, data: bytes) -> None:
        limit = self._session.config.piece_cache
        if len(data) > limit:
            return
        self._cache[piece] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)

    # -- alert handlers (called by the session) ---------------------------

    def _on_read_piece(self, piece: int, data: bytes, error: str | None) -> None:
        fut = self._pending.pop(piece, None)
        if error is None:
            self._retries.pop(piece, None)
            self._remember(piece, data)
            if fut is not None and not fut.done():
                fut.set_result(data)
            return
        if fut is None or fut.done():
            return
        if self._failed is not None:
            _set_error(fut, self._failed)
            return
        self._pending[piece] = fut
        if not self._ready:
            return  # still checking: _on_checked asks again
        tries = self._retries.get(piece, 0) + 1
        if tries > MAX_READ_RETRIES:
            self._pending.pop(piece)
            _set_error(fut, TransferError(f"{self.meta.name}: piece {piece}: {error}"))
            return
        self._retries[piece] = tries
        log.info("%s: read of piece %d failed (%s), retrying", self.meta.name, piece, error)
        self._session.loop.call_later(0.2 * tries, self._retry, piece)

    def _retry(self, piece: int) -> None:
        if piece in self._pending and self._failed is None:
            self._request(piece, 0)

    def _on_piece_finished(self, piece: int) -> None:
        self._read_ahead.discard(piece)
        if not self._have[piece]:
            self._have[piece] = 1
            self._have_count += 1
        if self.complete:
            self._wake_complete()

    def _on_hash_failed(self, piece: int) -> None:
        self._hash_failures += 1
        log.warning("%s: piece %d failed its hash check", self.meta.name, piece)
        if piece in self._pending:
            # libtorrent re-requests the piece; keep its deadline and alert.
            self._request(piece, 0)

    def _on_checked(self) -> None:
        """libtorrent's piece bitfield is final: adopt it, serve waiting reads."""
        try:
            pieces = self._handle.status(lt.torrent_handle.query_pieces).pieces
        except RuntimeError as exc:
            self._fail(TransferError(f"{self.meta.name}: {exc}"))
            return
        for p, had in enumerate(pieces):
            if had and not self._have[p]:
                self._have[p] = 1
                self._have_count += 1
        self._ready = True
        for p in list(self._pending):
            self._request(p, 0)
        if self.complete:
            self._wake_complete()

    def _on_error(self, message: str) -> None:
        self._errors.append(message)
        self._fail(TransferError(f"{self.meta.name}: {message}"))

    def _flush(self, callback: Callable[[bool], None]) -> None:
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
            self._handle.flush_cache()
        except RuntimeError as exc:
            self._fail(TransferError(f"{self.meta.name}: {exc}"))

    def _on_flushed(self) -> None:
        if self._flush_callbacks:
            self._flush_callbacks.popleft()(True)

    def _fail(self, exc: TransferError) -> None:
        if self._failed is None:
            self._failed = exc
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                _set_error(fut, self._failed)
        callbacks, self._flush_callbacks = self._flush_callbacks, deque()
        for callback in callbacks:
            callback(False)
        self._wake_complete()

    def _wake_complete(self) -> None:
        waiters, self._complete_waiters = self._complete_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class TorrentSession:
    """A libtorrent session driven by asyncio (implements ``TransferSession``).

    ``state_dir/<info_hash>.resume`` holds each torrent's resume data, saved
    at most every ``resume_interval`` seconds while pieces arrive, at
    completion and at :meth:`close`, so a SIGKILL loses at most that much
    progress and a restart neither re-downloads nor re-hashes what it had.
    """

    def __init__(self, config: SessionConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self._settings = config.settings()  # ConfigError early
        self._ses: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._transfers: dict[str, TorrentTransfer] = {}
        self._peers: dict[str, tuple[str, int]] = {}
        self._banned: dict[str, None] = {}
        self._banned_ips: set[str] = set()
        self._blocked = 0
        self._stats: dict[str, int] = {}
        self._tick: asyncio.Task[None] | None = None
        self._closed = False
        for peer in config.bootstrap:
            self._peers[peer] = parse_address(peer)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise TransferError("session not started")
        return self._loop

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
        self._loop = asyncio.get_running_loop()
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
        self._ses.set_alert_fd(writer.fileno())
        self._loop.add_reader(reader.fileno(), self._pump)
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
        self._tick = self._loop.create_task(self._ticker())

    async def close(self) -> None:
        """Save resume data of every torrent (waiting for it), then stop."""
        if self._ses is None or self._closed:
            return
        self._closed = True
        loop = self.loop
        transfers = list(self._transfers.values())
        waits = [self._save(t, final=True) for t in transfers]
        if waits:
            _, not_done = await asyncio.wait(waits, timeout=30)
            if not_done:
                log.error("resume data of %d torrents not saved in time", len(not_done))
        writes = [t._write_task for t in transfers if t._write_task is not None]
        if writes:
            await asyncio.wait(writes, timeout=30)
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
        self._ses.pause()
        for t in transfers:
            if t._save_timer is not None:
                t._save_timer.cancel()
            t._fail(TransferError(f"{t.meta.name}: session closed"))
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
                existing._handle.add_url_seed(url)
            return existing
        ti = load_info(meta.data)
        atp = self._resume_params(meta) or lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_path)
        num_pieces = int(ti.num_pieces())
        # On demand: nothing downloads unless read (deadlines raise a piece's
        # priority); prefetch: everything, at the lowest priority.
        atp.piece_priorities = [LOW_PRIORITY if prefetch else DONT_DOWNLOAD] * num_pieces
        atp.file_priorities = []
        atp.flags = (atp.flags & ~_UNWANTED_FLAGS) | lt.torrent_flags.override_trackers
        atp.trackers = []
        atp.url_seeds = sorted(set(atp.url_seeds) | set(web_seeds))
        atp.peers = [
            e
            for e in self._peers.values()
            if _format_address(*e) not in self._banned and e[0] not in self._banned_ips
        ]
        try:
            handle = self._ses.add_torrent(atp)
        except RuntimeError as exc:
            raise TransferError(f"libtorrent refused torrent {meta.name!r}: {exc}") from exc
        fs = ti.layout()
        lt_paths = [
            str(fs.file_path(i))
            for i in range(fs.num_files())
            if not fs.file_flags(i) & lt.file_storage.flag_pad_file
        ]
        transfer = TorrentTransfer(self, meta, save_path, handle, lt_paths, num_pieces, prefetch)
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
        if transfer._save_timer is not None:
            transfer._save_timer.cancel()
        transfer._fail(TransferError(f"{transfer.meta.name}: removed"))
        if self._ses is not None:
            self._ses.remove_torrent(transfer._handle)

    def connect(self, address: str) -> None:
        """Connect ``host:port`` to every torrent, now and when added later.

        Raises :class:`ConfigError` for a malformed address.
        """
        endpoint = parse_address(address)
        self._peers[address] = endpoint
        for transfer in self._transfers.values():
            self._connect(transfer, endpoint)

    def status(self) -> dict[str, object]:
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
            "hash_failures": sum(s.hash_failures for s in statuses),
            "banned": len(self._banned),
            "blocked_connections": self._blocked,
        }

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

    def _connect(self, transfer: TorrentTransfer, endpoint: tuple[str, int]) -> None:
        if endpoint[1] == self.listen_port and endpoint[0] in ("127.0.0.1", "::1"):
            return  # ourselves
        if _format_address(*endpoint) in self._banned or endpoint[0] in self._banned_ips:
            return  # connect_peer would bring a banned peer back
        try:
            transfer._handle.connect_peer(endpoint)
        except RuntimeError as exc:
            log.debug("%s: cannot connect %s: %s", transfer.meta.name, endpoint, exc)

    def _resume_path(self, info_hash: str) -> Path:
        return self.state_dir / f"{info_hash}.resume"

    def _resume_params(self, meta: TorrentMeta) -> Any:
        path = self._resume_path(meta.info_hash)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read resume data %s: %s", meta.name, path, exc)
            return None
        try:
            atp = lt.read_resume_data(data)
        except RuntimeError as exc:
            log.warning("%s: ignoring unreadable resume data %s: %s", meta.name, path, exc)
            return None
        if atp.info_hashes.v2.to_bytes().hex() != meta.info_hash:
            log.warning("%s: ignoring resume data %s of another torrent", meta.name, path)
            return None
        return atp

    def _save(self, transfer: TorrentTransfer, *, final: bool = False) -> asyncio.Future[None]:
        """Save resume data; the future resolves when every asked-for save landed.

        Resume data must never claim a piece whose blocks are not in the file
        yet (after a SIGKILL the restarted node would serve zeros as verified
        data).  libtorrent's flush_disk_cache flag does not wait for the
        flush, so: note the pieces had now, flush (a fence after their
        writes), then ask for resume data and keep only those pieces.
        """
        fut: asyncio.Future[None] = self.loop.create_future()
        transfer._last_save = self.loop.time()
        if transfer._save_timer is not None:
            transfer._save_timer.cancel()
            transfer._save_timer = None
        transfer._saves_outstanding += 1
        transfer._save_waiters.append(fut)
        snapshot = bytes(transfer._have)
        flags = 0 if final else lt.torrent_handle.only_if_modified

        def flushed(ok: bool) -> None:
            if not ok:  # the torrent failed: nothing trustworthy to save
                self._save_landed(transfer, None)
                return
            try:
                transfer._handle.save_resume_data(flags)
            except RuntimeError as exc:
                log.warning("%s: cannot save resume data: %s", transfer.meta.name, exc)
                self._save_landed(transfer, None)
                return
            transfer._save_snapshots.append(snapshot)

        transfer._flush(flushed)
        return fut

    def _save_soon(self, transfer: TorrentTransfer) -> None:
        if transfer._save_timer is not None or self._closed:
            return
        delay = transfer._last_save + self.config.resume_interval - self.loop.time()
        if delay <= 0:
            self._save(transfer)
        else:
            transfer._save_timer = self.loop.call_later(delay, self._save, transfer)

    def _save_landed(self, transfer: TorrentTransfer, data: bytes | None) -> None:
        if data is not None:
            previous = transfer._write_task
            path = self._resume_path(transfer.meta.info_hash)
            transfer._write_task = self.loop.create_task(_write_after(previous, path, data))
        transfer._saves_outstanding -= 1
        if transfer._saves_outstanding <= 0:
            transfer._saves_outstanding = 0
            waiters, transfer._save_waiters = transfer._save_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def _ticker(self) -> None:
        last_connect = self.loop.time()
        while True:
            await asyncio.sleep(1.0)
            if self._ses is None:
                return
            self._ses.post_session_stats()
            if self.loop.time() - last_connect >= self.config.reconnect_interval:
                last_connect = self.loop.time()
                for transfer in self._transfers.values():
                    for endpoint in self._peers.values():
                        self._connect(transfer, endpoint)
                    # libtorrent announces to the DHT every 15 minutes; a
                    # torrent nobody serves us should look for peers sooner.
                    if self.config.dht and not transfer.complete:
                        with contextlib.suppress(RuntimeError):
                            if transfer._handle.status().num_peers == 0:
                                transfer._handle.force_dht_announce()

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
        error = _error_text(alert.error)
        data = bytes(alert.buffer) if error is None else b""
        transfer._on_read_piece(int(alert.piece), data, error)

    def _on_piece_finished(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        transfer._on_piece_finished(int(alert.piece_index))
        if transfer.complete:
            self._save(transfer)
        else:
            self._save_soon(transfer)

    def _on_hash_failed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            transfer._on_hash_failed(int(alert.piece_index))

    def _on_peer_ban(self, alert: Any) -> None:
        host, port = alert.ip
        address = _format_address(host, port)
        # libtorrent posts the alert for every source of a failed piece, web
        # seeds included, even though ban_web_seeds=False keeps them: a web
        # seed still connected was not banned, and its host must not be.
        # The web seed may have disconnected before this alert is handled, so
        # also compare with the torrent's web seed URLs.
        with contextlib.suppress(RuntimeError):
            seeds = {_url_address(u) for u in alert.handle.url_seeds()}
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
            transfer._on_checked()

    def _on_state_changed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        if alert.state == lt.torrent_status.checking_files:
            transfer.rechecked = True
        elif alert.state not in _CHECKING_STATES and not transfer._ready:
            transfer._on_checked()
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
            transfer._on_error(message)

    def _on_save_resume(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        # Serialize now: the alert (and its params) die at the next pop.
        params = alert.params
        if transfer._save_snapshots:
            flushed = transfer._save_snapshots.popleft()
            params.have_pieces = [
                bool(had and i < len(flushed) and flushed[i])
                for i, had in enumerate(params.have_pieces)
            ]
        self._save_landed(transfer, bytes(lt.write_resume_data_buf(params)))

    def _on_save_resume_failed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is None:
            return
        if transfer._save_snapshots:
            transfer._save_snapshots.popleft()
        if alert.error.value() != _RESUME_DATA_NOT_MODIFIED:
            log.warning("%s: resume data not saved: %s", transfer.meta.name, alert.message())
        self._save_landed(transfer, None)

    def _on_cache_flushed(self, alert: Any) -> None:
        transfer = self._transfer_of(alert)
        if transfer is not None:
            transfer._on_flushed()

    def _on_alerts_dropped(self, alert: Any) -> None:
        # A lost read_piece or piece_finished alert would strand readers: ask
        # libtorrent again for everything awaited (it re-posts for had pieces).
        # Flush callbacks wait for one cache_flushed alert each: fence again.
        log.error("libtorrent dropped alerts; re-requesting pending pieces and flushes")
        for transfer in self._transfers.values():
            transfer._on_checked()
            for _ in range(len(transfer._flush_callbacks)):
                with contextlib.suppress(RuntimeError):
                    transfer._handle.flush_cache()

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
        lt.session_stats_alert: _on_session_stats,
        lt.listen_failed_alert: _on_listen_failed,
        lt.url_seed_alert: _on_web_seed,
    }


async def _write_after(previous: asyncio.Task[None] | None, path: Path, data: bytes) -> None:
    """Write resume data after the previous write of the same torrent (order matters)."""
    if previous is not None:
        with contextlib.suppress(Exception):
            await previous
    try:
        await asyncio.to_thread(_atomic_write, path, data)
    except OSError as exc:
        log.error("cannot write resume data %s: %s", path, exc)


def _drop(session: Any) -> None:
    del session
