"""HTTP access to an origin (or any plain web server or proxy serving a store).

One urllib3 pool per origin, shared by FUSE threads and the metadata updater.
Every request is bounded: connect and read timeouts per socket operation and
an overall deadline per object, so a dead origin turns into an error after
``timeout`` seconds, never a hang.  Bodies are bounded by the expected length
(endless-data defence); verification is the caller's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from cvmfs_like.exceptions import ObjectUnavailable
from cvmfs_like.objects import relative_path


def _pool(timeout: float, connections: int) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=connections,
        block=False,
        timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
        retries=False,
    )


class OriginObjectSource:
    """Objects of one repository from ``BASE/NAME/data/``."""

    def __init__(
        self, base_url: str, repo: str, *, timeout: float = 10.0, connections: int = 16
    ) -> None:
        self.url = base_url.rstrip("/") + f"/{repo}/data/"
        self.timeout = timeout
        self._http = _pool(timeout, connections)

    def fetch(self, digest: str, size: int) -> bytes:
        """GET one object, at most ``size`` bytes, within ``timeout`` seconds.

        Raises:
            ObjectUnavailable: unreachable, HTTP error, deadline or over-long body.
        """
        deadline = time.monotonic() + self.timeout
        url = self.url + relative_path(digest)
        try:
            resp = self._http.request("GET", url, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise ObjectUnavailable(digest, f"origin {url}: {exc}") from exc
        try:
            if resp.status != 200:
                raise ObjectUnavailable(digest, f"origin {url}: HTTP {resp.status}")
            parts: list[bytes] = []
            got = 0
            for part in resp.stream(1 << 20):
                got += len(part)
                if got > size:
                    raise ObjectUnavailable(digest, f"origin sent more than {size} bytes")
                parts.append(part)
                if time.monotonic() > deadline:
                    raise ObjectUnavailable(digest, f"origin too slow (> {self.timeout:g} s)")
            return b"".join(parts)
        except urllib3.exceptions.HTTPError as exc:
            raise ObjectUnavailable(digest, f"origin {url}: {exc}") from exc
        finally:
            resp.release_conn()


class OriginMetadataFetcher(FetcherInterface):
    """python-tuf fetcher for metadata over HTTP with bounded time."""

    def __init__(self, *, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._http = _pool(timeout, 4)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self._http.request("GET", url, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        if resp.status != 200:
            resp.release_conn()
            raise tuf_exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        return self._chunks(resp, url)

    def _chunks(self, resp: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
        try:
            yield from resp.stream(1 << 16)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        finally:
            resp.release_conn()
