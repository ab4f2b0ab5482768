"""Peers exchange TUF metadata and ``.torrent`` files, so a node whose origin
is down still learns of new revisions and verifies them.

Every node serves, on its *peer* address (one port per site, config key
``peer``), what it already verified:

``GET /v1/peer/repos/NAME/metadata/FILE``
    ``N.root.json`` (from its root history), ``timestamp.json``,
    ``N.snapshot.json`` and ``N.targets.json`` (only the version it trusts);
``GET /v1/peer/repos/NAME/torrents/SHA256``
    a ``.torrent`` it fetched and checked against a signed target.

Nothing served here is trusted by the receiver: metadata goes through the TUF
client workflow (python-tuf) and torrents are checked against the SHA-256 in
a verified target.  A peer can therefore withhold or delay, never forge; a
stale peer cannot roll a node back (TUF rejects older versions).

:class:`ExchangeFetcher` is the python-tuf ``FetcherInterface`` of a node: it
asks the origin first and then peers, and for ``timestamp.json`` asks them
all and keeps the highest version, so a peer that saw a newer revision than
the node's origin mirror spreads it.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from aiohttp import web
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from cvmfs_like.objects import relative_path
from swarm.exceptions import FetchError, FetchStatus, FetchTooLong
from swarm.http_get import HTTPClient

log = logging.getLogger(__name__)

LOGICAL_BASE = "http://swarm.invalid/"  # what TrustedRepository sees; never contacted
_VERSIONED = re.compile(r"^([1-9][0-9]{0,9})\.(root|snapshot|targets)\.json$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_METADATA = 64 << 20
_MAX_TORRENT = 256 << 20


def logical_metadata_url(repo: str) -> str:
    return f"{LOGICAL_BASE}{repo}/metadata/"


def _version_of(path: Path) -> int | None:
    try:
        doc = json.loads(path.read_bytes())
        v = doc["signed"]["version"]
        return v if isinstance(v, int) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def metadata_file(metadata_dir: Path, name: str) -> Path | None:
    """The verified file a peer asks for by its TUF name, if this node has it."""
    if name == "timestamp.json":
        p = metadata_dir / "timestamp.json"
        return p if p.is_file() else None
    m = _VERSIONED.match(name)
    if m is None:
        return None
    version, role = int(m.group(1)), m.group(2)
    if role == "root":
        p = metadata_dir / "root_history" / f"{version}.root.json"
        return p if p.is_file() else None
    p = metadata_dir / f"{role}.json"
    return p if _version_of(p) == version else None


class PeerExchange:
    """The server side: routes over the node's repositories' state."""

    def __init__(self, repo_dirs: Callable[[], dict[str, Path]]) -> None:
        # repo name -> directory holding metadata/ and torrents/
        self._repo_dirs = repo_dirs

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/v1/peer/repos/{repo}/metadata/{file}", self._metadata)
        app.router.add_get("/v1/peer/repos/{repo}/torrents/{sha}", self._torrent)
        return app

    def _dir(self, request: web.Request) -> Path:
        d = self._repo_dirs().get(request.match_info["repo"])
        if d is None:
            raise web.HTTPNotFound(text="no such repository on this node\n")
        return d

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        path = metadata_file(self._dir(request) / "metadata", request.match_info["file"])
        if path is None:
            raise web.HTTPNotFound(text="not held by this node\n")
        return web.FileResponse(path, headers={"Content-Type": "application/json"})

    async def _torrent(self, request: web.Request) -> web.StreamResponse:
        sha = request.match_info["sha"]
        if not _SHA.match(sha):
            raise web.HTTPBadRequest(text="torrent name must be a SHA-256 hex digest\n")
        path = self._dir(request) / "torrents" / f"{sha}.torrent"
        if not path.is_file():
            raise web.HTTPNotFound(text="not held by this node\n")
        return web.FileResponse(path, headers={"Content-Type": "application/x-bittorrent"})


class ExchangeFetcher(FetcherInterface):
    """Metadata from the origin, else from peers (see the module docstring).

    ``peers()`` returns the peer exchange base URLs known now
    (``http://10.1.0.2:6880/``).  Runs in worker threads, never on the event
    loop: python-tuf's Updater is blocking.
    """

    def __init__(
        self,
        repo: str,
        origin: str | None,
        peers: Callable[[], list[str]],
        *,
        timeout: float = 10.0,
    ) -> None:
        self.repo = repo
        self.origin = origin
        self.peers = peers
        self.timeout = timeout
        # Keep-alive connections per origin and peer; a GET on one the peer
        # closed while idle is retried once on a new connection (http_get).
        self._http = HTTPClient(idle_per_host=4)
        self.last_source: dict[str, str] = {}  # file -> where it came from

    def _sources(self, name: str) -> list[str]:
        out = []
        if self.origin is not None:
            out.append(f"{self.origin}{self.repo}/metadata/{name}")
        out += [f"{p}v1/peer/repos/{self.repo}/metadata/{name}" for p in self.peers()]
        return out

    def _get(self, url: str, limit: int) -> bytes:
        """One GET within ``timeout`` (headers and body), at most ``limit`` bytes.

        Raises:
            tuf.api.exceptions.DownloadHTTPError: an answer other than 200.
            tuf.api.exceptions.DownloadLengthMismatchError: over ``limit`` bytes.
            tuf.api.exceptions.DownloadError: unreachable, broken or too slow.
        """
        try:
            return self._http.get(url, deadline=time.monotonic() + self.timeout, limit=limit)
        except FetchStatus as exc:
            raise tuf_exceptions.DownloadHTTPError(str(exc), exc.status) from exc
        except FetchTooLong as exc:
            raise tuf_exceptions.DownloadLengthMismatchError(f"{url}: over {limit} bytes") from exc
        except FetchError as exc:
            raise tuf_exceptions.DownloadError(str(exc)) from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.rpartition("/metadata/")[2]
        sources = self._sources(name)
        if not sources:
            raise tuf_exceptions.DownloadError(f"{name}: no origin and no peers known")
        if name == "timestamp.json":
            data, where = self._newest(sources)
        else:
            data, where = self._first(sources)
        self.last_source[name] = where
        return iter([data])

    def _first(self, sources: list[str]) -> tuple[bytes, str]:
        errors = []
        not_found = False
        for src in sources:
            try:
                return self._get(src, _MAX_METADATA), src
            except tuf_exceptions.DownloadHTTPError as exc:
                not_found |= exc.status_code in (403, 404)
                errors.append(str(exc))
            except tuf_exceptions.DownloadError as exc:
                errors.append(str(exc))
        if not_found:
            # "Nobody has it" (e.g. the next root version): python-tuf stops
            # looking on 403/404, so say so rather than a transport failure.
            raise tuf_exceptions.DownloadHTTPError("; ".join(errors), 404)
        raise tuf_exceptions.DownloadError("; ".join(errors))

    def _newest(self, sources: list[str]) -> tuple[bytes, str]:
        best: tuple[int, bytes, str] | None = None
        errors = []
        with concurrent.futures.ThreadPoolExecutor(min(len(sources), 16)) as pool:
            futures = {pool.submit(self._get, s, 1 << 20): s for s in sources}
            for fut in concurrent.futures.as_completed(futures):
                src = futures[fut]
                try:
                    data = fut.result()
                    version = json.loads(data)["signed"]["version"]
                except (tuf_exceptions.DownloadError, ValueError, KeyError, TypeError) as exc:
                    errors.append(f"{src}: {exc}")
                    continue
                if isinstance(version, int) and (best is None or version > best[0]):
                    best = (version, data, src)
        if best is None:
            raise tuf_exceptions.DownloadError("; ".join(errors) or "no source answered")
        return best[1], best[2]

    def fetch_torrent(self, sha256: str, length: int) -> tuple[bytes, str]:
        """A ``.torrent`` by hash from the origin (as a store object) or a peer.

        The caller checks it against the signed reference.

        Raises:
            tuf.api.exceptions.DownloadError: nobody could deliver it.
        """
        sources = []
        if self.origin is not None:
            sources.append(f"{self.origin}{self.repo}/data/{relative_path(sha256)}")
        sources += [f"{p}v1/peer/repos/{self.repo}/torrents/{sha256}" for p in self.peers()]
        errors = []
        for src in sources:
            try:
                data = self._get(src, min(length, _MAX_TORRENT))
            except tuf_exceptions.DownloadError as exc:
                errors.append(str(exc))
                continue
            return data, src
        raise tuf_exceptions.DownloadError("; ".join(errors) or "no origin and no peers known")
