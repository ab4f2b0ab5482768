"""HTTP access to an origin (or any plain web server or proxy serving a store).

One :class:`swarm.http_get.HTTPClient` per origin, shared by FUSE threads and
the metadata updater.  Every GET has one deadline for the whole transfer
(connect, headers and body): a dead, silent or trickling origin turns into an
error ``timeout`` seconds after the GET began, never a hang.  Bodies are
bounded by the expected length (endless-data defence); verification is the
caller's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from cvmfs_like.exceptions import ObjectUnavailable
from cvmfs_like.objects import relative_path
from swarm.exceptions import FetchError, FetchStatus, FetchTimeout, FetchTooLong
from swarm.http_get import HTTPClient, Response

_MAX_METADATA = 64 << 20  # python-tuf stops sooner, at each role's own limit


class OriginObjectSource:
    """Objects of one repository from ``BASE/NAME/data/``."""

    def __init__(
        self, base_url: str, repo: str, *, timeout: float = 10.0, connections: int = 16
    ) -> None:
        self.url = base_url.rstrip("/") + f"/{repo}/data/"
        self.timeout = timeout
        self._http = HTTPClient(idle_per_host=connections)

    def fetch(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
        """GET one object, at most ``size`` bytes, by ``deadline`` (a
        :func:`time.monotonic` value; default: ``timeout`` seconds from now).

        Raises:
            ObjectUnavailable: unreachable, HTTP error, deadline or over-long body.
        """
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        url = self.url + relative_path(digest)
        try:
            return self._http.get(url, deadline=deadline, limit=size)
        except FetchStatus as exc:
            raise ObjectUnavailable(digest, f"origin {url}: HTTP {exc.status}") from exc
        except FetchTooLong as exc:
            raise ObjectUnavailable(digest, f"origin sent more than {size} bytes") from exc
        except FetchTimeout as exc:
            raise ObjectUnavailable(digest, f"origin {url}: no complete answer in time") from exc
        except FetchError as exc:
            raise ObjectUnavailable(digest, f"origin: {exc}") from exc


class OriginMetadataFetcher(FetcherInterface):
    """python-tuf fetcher for metadata over HTTP, each GET within ``timeout``."""

    def __init__(self, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._http = HTTPClient(idle_per_host=4)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self._http.open(
                url, deadline=time.monotonic() + self.timeout, limit=_MAX_METADATA
            )
        except FetchError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {exc}") from exc
        if resp.status != 200:
            resp.close()
            raise tuf_exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: Response) -> Iterator[bytes]:
        # The deadline set in _fetch keeps running while python-tuf reads.
        with resp:
            try:
                yield from resp.chunks(1 << 16)
            except FetchError as exc:
                raise tuf_exceptions.DownloadError(f"cannot fetch {exc}") from exc
