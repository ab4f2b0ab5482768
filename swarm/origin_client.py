"""HTTP access to an origin (or any plain web server or proxy serving a store).

One :class:`swarm.http_get.HTTPClient` per origin (or any injected
:class:`swarm.http_get.Transport`), shared by FUSE threads and the metadata
updater.  Every GET has one deadline for the whole transfer (connect,
headers and body): a dead, silent or trickling origin turns into an error
``timeout`` seconds after the GET began, never a hang.  Bodies are
bounded by the expected length (endless-data defence); verification is the
caller's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient.fetcher import FetcherInterface

from cvmfs_like.exceptions import ObjectUnavailable
from swarm.exceptions import FetchError, FetchStatus, FetchTimeout, FetchTooLong
from swarm.http_get import HTTPClient, Transport
from swarm.layout import RepositoryURLs

_MAX_METADATA = 64 << 20  # python-tuf stops sooner, at each role's own limit


class OriginObjectSource:
    """Objects of one repository from ``BASE/NAME/data/``."""

    def __init__(
        self,
        base_url: str,
        repo: str,
        *,
        timeout: float = 10.0,
        connections: int = 16,
        transport: Transport | None = None,
    ) -> None:
        self.urls = RepositoryURLs.origin(base_url, repo)
        self.timeout = timeout
        self._http: Transport = transport or HTTPClient(idle_per_host=connections)

    def fetch(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
        """GET one object, at most ``size`` bytes, by ``deadline`` (a
        :func:`time.monotonic` value; default: ``timeout`` seconds from now).

        Raises:
            ObjectUnavailable: unreachable, HTTP error, deadline or over-long body.
        """
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        url = self.urls.data(digest)
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
    """python-tuf fetcher for metadata over HTTP, each GET within ``timeout``
    and at most the length python-tuf allows for the file."""

    def __init__(self, *, timeout: float = 10.0, transport: Transport | None = None) -> None:
        self.timeout = timeout
        self._http: Transport = transport or HTTPClient(idle_per_host=4)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """The body of ``url``, at most ``max_length`` bytes, within ``timeout``.

        Raises:
            tuf.api.exceptions.DownloadHTTPError: an answer other than 200.
            tuf.api.exceptions.DownloadLengthMismatchError: over ``max_length``.
            tuf.api.exceptions.DownloadError: unreachable, broken or too slow.
        """
        try:
            return self._http.get(url, deadline=time.monotonic() + self.timeout, limit=max_length)
        except FetchStatus as exc:
            raise tuf_exceptions.DownloadHTTPError(str(exc), exc.status) from exc
        except FetchTooLong as exc:
            raise tuf_exceptions.DownloadLengthMismatchError(
                f"{url}: over {max_length} bytes"
            ) from exc
        except FetchError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        return iter([self.download_bytes(url, _MAX_METADATA)])
