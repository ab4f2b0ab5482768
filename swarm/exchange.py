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

:class:`ExchangeFetcher` is a node's :class:`trust.client.MetadataSource`
(asked by file name) and its ``.torrent`` fetcher: it asks the origin first
and then peers, and for ``timestamp.json`` asks them all and keeps the
highest version, so a peer that saw a newer revision than the node's origin
mirror spreads it.  Every URL comes from :class:`swarm.layout.RepositoryURLs`;
every GET goes through an injected :class:`swarm.http_get.Transport`.
Every candidate is *screened* before it is chosen (``screen``: signed by a
threshold of the trusted keys for its role), so a forged file with a huge
version loses instead of winning the comparison and failing the refresh (a
freeze).  :class:`SourceScores` keeps which sources lied or were slow: they
are asked last until they answer well.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from aiohttp import web
from tuf.api import exceptions as tuf_exceptions

from swarm.exceptions import FetchError, FetchStatus, FetchTooLong
from swarm.http_get import HTTPClient, Transport
from swarm.layout import PEER_METADATA_ROUTE, PEER_TORRENT_ROUTE, RepositoryURLs
from swarm.status import SourceProblem
from trust.exceptions import TrustError

log = logging.getLogger(__name__)

_VERSIONED = re.compile(r"^([1-9][0-9]{0,9})\.(root|snapshot|targets)\.json$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_METADATA = 64 << 20
_MAX_TORRENT = 256 << 20
_SLACK = 1.0  # seconds past a source's own deadline before it is left behind


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
        app.router.add_get(PEER_METADATA_ROUTE, self._metadata)
        app.router.add_get(PEER_TORRENT_ROUTE, self._torrent)
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


@dataclass
class SourceRecord:
    """What one source (the origin or a peer's exchange) did lately."""

    strikes: int = 0  # failures since its last good answer: the lower, the sooner asked
    bad_data: int = 0  # answers that failed verification, ever
    problem: str | None = None  # the last failure, for status
    at: float = 0.0  # when (epoch seconds)


class SourceScores:
    """Which sources to ask first: a source that sent data failing
    verification, or did not answer in time, is asked after the others until
    it gives a good answer again.  Nothing is ever dropped for good: an
    honest peer that hiccuped comes back, and a lying one costs at most one
    request per file.  Thread-safe (fetches run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, SourceRecord] = {}

    def ordered(self, sources: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``sources`` (source, URL), fewest strikes first, else as given."""
        with self._lock:
            strikes = {s: r.strikes for s, r in self._records.items()}
        return sorted(sources, key=lambda su: strikes.get(su[0], 0))

    def good(self, source: str) -> None:
        with self._lock:
            record = self._records.get(source)
            if record is not None:
                record.strikes = 0

    def bad_data(self, source: str, text: str) -> None:
        with self._lock:
            record = self._records.setdefault(source, SourceRecord())
            repeated = record.problem == text
            record.strikes += 1
            record.bad_data += 1
            record.problem, record.at = text, time.time()
        if not repeated:
            log.warning(
                "%s sent bad data, asked last from now on: %s",
                source,
                text,
                extra={"peer": source},
            )

    def unreachable(self, source: str, why: str) -> None:
        with self._lock:
            record = self._records.setdefault(source, SourceRecord())
            record.strikes += 1
            record.problem, record.at = why, time.time()

    def report(self) -> dict[str, SourceProblem]:
        """Sources with a recorded problem, for the node's status."""
        with self._lock:
            return {
                s: SourceProblem(r.strikes, r.bad_data, r.problem, r.at)
                for s, r in self._records.items()
                if r.problem is not None
            }


class ExchangeFetcher:
    """Metadata from the origin, else from peers (see the module docstring).

    ``peers()`` returns the peer exchange base URLs known now
    (``http://10.1.0.2:6880/``).  ``transport`` makes the GETs (default: an
    :class:`HTTPClient` keeping a few connections per host).  Runs in worker
    threads, never on the event loop: python-tuf's Updater is blocking.
    """

    def __init__(
        self,
        repo: str,
        origin: str | None,
        peers: Callable[[], list[str]],
        *,
        timeout: float = 10.0,
        screen: Callable[[str, bytes], int] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.repo = repo
        self.origin = origin
        self.peers = peers
        self.timeout = timeout
        # Keep-alive connections per origin and peer; a GET on one the peer
        # closed while idle is retried once on a new connection (http_get).
        self._http: Transport = transport or HTTPClient(idle_per_host=4)
        self.last_source: dict[str, str] = {}  # file -> where it came from
        self.scores = SourceScores()
        # Checks a candidate before it is chosen (TrustedRepository.screen):
        # set by the node once the repository's TrustedRepository exists.
        self.screen: Callable[[str, bytes], int] | None = screen

    def _servers(self) -> list[tuple[str, RepositoryURLs]]:
        """(source, its URLs): the origin first, then the peers known now."""
        out = []
        if self.origin is not None:
            out.append((self.origin, RepositoryURLs.origin(self.origin, self.repo)))
        out += [(p, RepositoryURLs.peer(p, self.repo)) for p in self.peers()]
        return out

    def _sources(self, name: str) -> list[tuple[str, str]]:
        """(source, URL) pairs for metadata file ``name``, best first."""
        return self.scores.ordered([(s, urls.metadata(name)) for s, urls in self._servers()])

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

    def fetch_metadata(self, name: str) -> bytes:
        """Metadata file ``name`` (the TUF name): the first source whose copy
        passes the screen, or for ``timestamp.json`` the highest version any
        source offers.

        Raises:
            tuf.api.exceptions.RepositoryError: every source sent bad data.
            tuf.api.exceptions.DownloadHTTPError: (404) no source has it.
            tuf.api.exceptions.DownloadError: no source delivered.
        """
        sources = self._sources(name)
        if not sources:
            raise tuf_exceptions.DownloadError(f"{name}: no origin and no peers known")
        if name == "timestamp.json":
            data, where = self._newest(name, sources)
        else:
            data, where = self._first(name, sources)
        self.last_source[name] = where
        return data

    def _screened(self, name: str, source: str, data: bytes) -> tuple[int | None, str]:
        """(the version of ``data``, "") if it passes the screen, else (None,
        why).  A source whose data fails is reported and scored down; without
        a screen nothing can be verified, so nothing is chosen (nor blamed)."""
        if self.screen is None:
            return None, f"{name}: not screened (no trusted root to check it against)"
        try:
            version = self.screen(name, data)
        except TrustError as exc:
            self.scores.bad_data(source, str(exc))  # the screen's message names the file
            return None, str(exc)
        self.scores.good(source)
        return version, ""

    def _refuse(self, name: str, errors: list[str], bad: list[str], not_found: bool) -> NoReturn:
        detail = "; ".join(bad + errors) or "no source answered"
        if bad and not errors:
            # Every source that answered sent data that fails verification:
            # that is a verdict on the data, not a transport failure.
            raise tuf_exceptions.RepositoryError(f"{name}: every source sent bad data: {detail}")
        if not_found and not bad:
            # "Nobody has it" (e.g. the next root version): python-tuf stops
            # looking on 403/404, so say so rather than a transport failure.
            raise tuf_exceptions.DownloadHTTPError(detail, 404)
        raise tuf_exceptions.DownloadError(detail)

    def _first(self, name: str, sources: list[tuple[str, str]]) -> tuple[bytes, str]:
        """The first source, in score order, whose file passes the screen."""
        errors: list[str] = []
        bad: list[str] = []
        not_found = False
        for source, url in sources:
            try:
                data = self._get(url, _MAX_METADATA)
            except tuf_exceptions.DownloadHTTPError as exc:
                if exc.status_code in (403, 404):
                    not_found = True
                else:
                    self.scores.unreachable(source, str(exc))
                errors.append(str(exc))
                continue
            except tuf_exceptions.DownloadError as exc:
                self.scores.unreachable(source, str(exc))
                errors.append(str(exc))
                continue
            version, why = self._screened(name, source, data)
            if version is None:
                bad.append(f"{url}: {why}")
                continue
            return data, url
        self._refuse(name, errors, bad, not_found)

    def _newest(self, name: str, sources: list[tuple[str, str]]) -> tuple[bytes, str]:
        """Ask every source at once; of the answers that pass the screen keep
        the highest version.  A source that has not answered when the
        deadline passes is left behind (its thread ends at its own transfer
        deadline): one trickling peer cannot stall the refresh."""
        best: tuple[int, bytes, str] | None = None
        errors: list[str] = []
        bad: list[str] = []
        not_found = False
        pool = concurrent.futures.ThreadPoolExecutor(min(len(sources), 16))
        try:
            futures = {pool.submit(self._get, url, 1 << 20): (s, url) for s, url in sources}
            done, late = concurrent.futures.wait(futures, timeout=self.timeout + _SLACK)
            for fut in late:
                source, url = futures[fut]
                self.scores.unreachable(source, f"no answer within {self.timeout:g} s")
                errors.append(f"{url}: no answer within {self.timeout:g} s")
            for fut in done:
                source, url = futures[fut]
                try:
                    data = fut.result()
                except tuf_exceptions.DownloadHTTPError as exc:
                    not_found |= exc.status_code in (403, 404)
                    errors.append(str(exc))
                    continue
                except tuf_exceptions.DownloadError as exc:
                    self.scores.unreachable(source, str(exc))
                    errors.append(str(exc))
                    continue
                version, why = self._screened(name, source, data)
                if version is None:
                    bad.append(f"{url}: {why}")
                elif best is None or version > best[0]:
                    best = (version, data, url)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if best is None:
            self._refuse(name, errors, bad, not_found)
        return best[1], best[2]

    def fetch_torrent(self, sha256: str, length: int) -> tuple[bytes, str]:
        """A ``.torrent`` by hash from the origin (as a store object) or a peer.

        Each answer is checked against ``sha256`` and ``length`` (from a
        verified target) before anything parses it; a source that sends other
        bytes is reported and scored down, and the next one is tried.

        Raises:
            tuf.api.exceptions.DownloadError: nobody delivered the right bytes.
        """
        sources = [(s, urls.torrent(sha256)) for s, urls in self._servers()]
        errors = []
        for source, url in self.scores.ordered(sources):
            try:
                data = self._get(url, min(length, _MAX_TORRENT))
            except tuf_exceptions.DownloadError as exc:
                errors.append(str(exc))
                continue
            if len(data) != length or hashlib.sha256(data).hexdigest() != sha256:
                self.scores.bad_data(source, f"torrent {sha256[:12]}: not the signed torrent")
                errors.append(f"{url}: not the signed torrent (SHA-256 or length differ)")
                continue
            self.scores.good(source)
            return data, url
        raise tuf_exceptions.DownloadError("; ".join(errors) or "no origin and no peers known")
