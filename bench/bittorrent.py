"""A v1 torrent and a minimal HTTP tracker, for the aria2 baseline of ``bench.distribution``.

:func:`make_v1_torrent` builds the metainfo of one file (BEP 3, SHA-1 pieces) with the
project's one bencoder (``swarm_testing.bencode``).  :func:`serve_tracker` is a tracker
that answers compact peer lists (BEP 23) and ``GET /stats``; it runs in the source's
network namespace as ``python -m bench.distribution --serve-tracker ADDR`` and keeps
its whole state in memory, so it dies with the process.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from swarm_testing.bencode import bencode

TRACKER_PORT = 6969


def piece_length_for(size: int) -> int:
    """A power of two near ``size / 1024``, between 32 KiB and 1 MiB."""
    p = 32 * 1024
    while p < 1 << 20 and p * 1024 < size:
        p *= 2
    return p


def make_v1_torrent(path: Path, announce: str) -> tuple[bytes, str]:
    """(the .torrent bytes, the hex v1 info-hash) of one file, SHA-1 pieces (BEP 3)."""
    size = path.stat().st_size
    plen = piece_length_for(size)
    pieces = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(plen):
            pieces += hashlib.sha1(chunk).digest()
    info = {"name": path.name, "length": size, "piece length": plen, "pieces": bytes(pieces)}
    meta = {"announce": announce, "created by": "swarm-grid bench", "info": info}
    return bencode(meta), hashlib.sha1(bencode(info)).hexdigest()


class _TrackerState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # info_hash -> (ip, port) -> bytes left
        self.swarms: dict[bytes, dict[tuple[str, int], int]] = {}


def serve_tracker(addr: str, port: int) -> None:
    """A minimal HTTP tracker (BEP 3 with compact peers, BEP 23), run inside the
    source namespace; ``GET /stats`` gives {info_hash_hex: [peers, seeds]}."""
    state = _TrackerState()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/stats":
                with state.lock:
                    stats = {
                        ih.hex(): [len(ps), sum(1 for left in ps.values() if left == 0)]
                        for ih, ps in state.swarms.items()
                    }
                self._reply(json.dumps(stats).encode(), "application/json")
                return
            if url.path != "/announce":
                self.send_error(404)
                return
            q = urllib.parse.parse_qs(url.query, encoding="latin-1")
            try:
                info_hash = q["info_hash"][0].encode("latin-1")
                peer = (self.client_address[0], int(q["port"][0]))
                left = int(q.get("left", ["1"])[0])
            except (KeyError, ValueError):
                self._reply(bencode({"failure reason": "bad announce"}))
                return
            event = q.get("event", [""])[0]
            with state.lock:
                peers = state.swarms.setdefault(info_hash, {})
                if event == "stopped":
                    peers.pop(peer, None)
                else:
                    peers[peer] = left
                others = [p for p in peers if p != peer]
                seeds = sum(1 for x in peers.values() if x == 0)
            compact = b"".join(socket.inet_aton(ip) + pt.to_bytes(2, "big") for ip, pt in others)
            body = {
                "interval": 5,
                "min interval": 1,
                "complete": seeds,
                "incomplete": len(peers) - seeds,
                "peers": compact,
            }
            self._reply(bencode(body))

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
