"""Where a repository's files are, over HTTP: the one owner of the URL layout.

Two kinds of server hold a repository's files:

* an **origin** (or any web server or proxy serving a store, see
  :mod:`swarm.origin`): ``BASE/NAME/metadata/FILE``, objects (and the
  ``.torrent`` files, which are objects) at ``BASE/NAME/data/ab/<sha256>``,
  VM images at ``BASE/NAME/images/<image>/<version>/<file>``;
* a node's **peer exchange** (:mod:`swarm.exchange`):
  ``BASE/v1/peer/repos/NAME/metadata/FILE`` and
  ``BASE/v1/peer/repos/NAME/torrents/<sha256>``.

:class:`RepositoryURLs` writes every one of these URLs; nothing else spells
them (the exchange's routes are :data:`PEER_METADATA_ROUTE` and
:data:`PEER_TORRENT_ROUTE` below).  A base URL is normalised to end in one
``/``.  No URL is ever parsed back apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cvmfs_like.objects import relative_path

PEER_METADATA_ROUTE = "/v1/peer/repos/{repo}/metadata/{file}"
PEER_TORRENT_ROUTE = "/v1/peer/repos/{repo}/torrents/{sha}"


class ServerKind(StrEnum):
    ORIGIN = "origin"  # a store served over HTTP
    PEER = "peer"  # another node's peer exchange


@dataclass(frozen=True)
class RepositoryURLs:
    """URLs of repository ``repo``'s files at one server (``base``)."""

    kind: ServerKind
    base: str  # ends in "/"
    repo: str

    @classmethod
    def origin(cls, base: str, repo: str) -> RepositoryURLs:
        return cls(ServerKind.ORIGIN, base.rstrip("/") + "/", repo)

    @classmethod
    def peer(cls, base: str, repo: str) -> RepositoryURLs:
        return cls(ServerKind.PEER, base.rstrip("/") + "/", repo)

    @property
    def _root(self) -> str:
        if self.kind is ServerKind.PEER:
            return f"{self.base}v1/peer/repos/{self.repo}/"
        return f"{self.base}{self.repo}/"

    def metadata(self, name: str) -> str:
        """TUF metadata file ``name`` (``timestamp.json``, ``3.root.json``...)."""
        return f"{self._root}metadata/{name}"

    def torrent(self, sha256: str) -> str:
        """A ``.torrent`` by its SHA-256: an object at an origin."""
        if self.kind is ServerKind.PEER:
            return f"{self._root}torrents/{sha256}"
        return self.data(sha256)

    def data(self, digest: str) -> str:
        """A content-addressed object (origin only: peers serve objects over
        BitTorrent)."""
        if self.kind is ServerKind.PEER:
            raise ValueError("a peer exchange serves no objects")
        return f"{self._root}data/{relative_path(digest)}"

    def image_seed(self, target_name: str) -> str:
        """The BEP 19 web seed of an image, target ``images/<image>/<version>``:
        a directory URL, libtorrent appends the torrent's one file name
        (origin only)."""
        if self.kind is ServerKind.PEER:
            raise ValueError("a peer exchange serves no images")
        return f"{self._root}{target_name}/"
