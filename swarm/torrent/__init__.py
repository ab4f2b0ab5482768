"""BitTorrent v2 with libtorrent: the only package that imports it.

It implements :mod:`swarm.transfer`'s protocols.  The modules, from the
inside out:

* :mod:`~swarm.torrent.pieces`: the piece-request core (which pieces to ask
  for with which deadline, read-ahead, retries, who waits); pure, with an
  injected clock, no libtorrent;
* :mod:`~swarm.torrent.metainfo`: v2-only .torrent files, made and checked
  (layout, paths and web seed URLs are described there);
* :mod:`~swarm.torrent.settings`: :class:`SessionConfig` and libtorrent's
  settings pack; ``ip:port`` addresses;
* :mod:`~swarm.torrent.status`: torrent status from ``state_update_alert``;
* :mod:`~swarm.torrent.transfer`: :class:`TorrentTransfer`, a torrent handle
  behind the ``Transfer`` protocol, driving the core;
* :mod:`~swarm.torrent.resume`: the one owner of resume data;
* :mod:`~swarm.torrent.session`: :class:`TorrentSession`, the libtorrent
  session, its alert pump and dispatch.

The names below are imported on first use, so importing the pure core
(``swarm.torrent.pieces``) does not load libtorrent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swarm.torrent.metainfo import create_torrent, load_info, parse_torrent
    from swarm.torrent.session import TorrentSession
    from swarm.torrent.settings import SessionConfig, parse_address
    from swarm.torrent.transfer import TorrentTransfer

_HOMES = {
    "SessionConfig": "swarm.torrent.settings",
    "TorrentSession": "swarm.torrent.session",
    "TorrentTransfer": "swarm.torrent.transfer",
    "create_torrent": "swarm.torrent.metainfo",
    "load_info": "swarm.torrent.metainfo",
    "parse_address": "swarm.torrent.settings",
    "parse_torrent": "swarm.torrent.metainfo",
}

__all__ = [
    "SessionConfig",
    "TorrentSession",
    "TorrentTransfer",
    "create_torrent",
    "load_info",
    "parse_address",
    "parse_torrent",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
