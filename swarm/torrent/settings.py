"""How the node's libtorrent session is set up: :class:`SessionConfig`, its
``settings_pack``, and the one place ``ip:port`` addresses are parsed and written.

Invariant: the node contacts only what it is configured to contact, so the
pack turns off every discovery and NAT service libtorrent enables by default
(public DHT routers, UPnP, NAT-PMP, uTP) and names only configured bootstrap
nodes.  Each tuning knob says why it is set where it is set.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

import libtorrent as lt

from swarm.address import Address, AddressError
from swarm.exceptions import ConfigError

# What the session's alert pump is told about; the rest is never posted.
ALERT_MASK = (
    lt.alert.category_t.error_notification
    | lt.alert.category_t.peer_notification
    | lt.alert.category_t.status_notification
    | lt.alert.category_t.storage_notification
    | lt.alert.category_t.progress_notification
    | lt.alert.category_t.ip_block_notification
    # block_finished_alert: the bytes received, by the peer or web seed that sent them
    | lt.alert.category_t.block_progress_notification
)


def parse_address(address: str) -> tuple[str, int]:
    """``"ip:port"`` or ``"[v6]:port"`` as ``(ip, port)`` (the one rule:
    :class:`swarm.address.Address`; port 0 is taken, for a listen address).

    Raises :class:`ConfigError` if it is not an address with a port.
    """
    try:
        a = Address.parse(address, any_port=True)
    except AddressError as exc:
        raise ConfigError(f"{address!r}: {exc}") from None
    return a.host, a.port


def format_address(host: str, port: int) -> str:
    """``(ip, port)`` as ``"ip:port"`` (``"[v6]:port"``), as :func:`parse_address` reads it."""
    return str(Address(host, port))


def url_address(url: str) -> tuple[str, int]:
    """(host, port) a web seed URL connects to."""
    u = urllib.parse.urlsplit(url)
    return u.hostname or "", u.port or (443 if u.scheme == "https" else 80)


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
            "listen_interfaces": format_address(host, port),
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
            "alert_mask": int(ALERT_MASK),
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
