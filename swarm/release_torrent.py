"""A release revision as a BitTorrent v2 torrent, tied into its signed target.

Publisher side: :func:`torrent_extension` is handed to
:func:`cvmfs_like.publish.publish`; after the revision's objects are durable
it builds a v2 torrent whose files are every object the revision needs (its
catalogs and what they reference), laid out as in the store
(``NAME/data/ab/<sha256>``), stores the ``.torrent`` as an object of its own
and records it in the target's ``custom["torrent"]``: its SHA-256, length
and v2 info-hash.  The chain of trust is therefore target (signed) -> the
``.torrent``'s SHA-256 -> info-hash -> each file's merkle root -> every 16 KiB
block a peer sends.

Because the layout is the store's, the origin serving ``STORE`` over HTTP is
a web seed (BEP 19) of every revision with no extra files, and a node that
fetched a revision from peers holds files a later revision's torrent names
by the same paths.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from cvmfs_like.objects import relative_path
from cvmfs_like.publish import TargetExtension
from cvmfs_like.retention import catalog_tree_objects
from cvmfs_like.store import ObjectWriter, OriginStore
from swarm.exceptions import TransferError
from swarm.transfer import TorrentMeta
from trust.targets import ReleaseTarget

RELEASE_PIECE_LENGTH = 256 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TorrentRef:
    """What a signed target says about its torrent."""

    sha256: str  # of the bencoded .torrent file
    length: int
    info_hash: str  # v2

    def to_custom(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "length": self.length, "info_hash": self.info_hash}

    @classmethod
    def from_custom(cls, custom: object, where: str) -> TorrentRef | None:
        """The ``torrent`` field of a target's ``custom``, or None if absent.

        Raises:
            TransferError: present but malformed (the target is then unusable
                through the swarm; the origin still serves its objects).
        """
        if not isinstance(custom, dict) or "torrent" not in custom:
            return None
        t = custom["torrent"]
        if not isinstance(t, dict):
            raise TransferError(f"{where}: custom.torrent is not an object")
        sha, length, ih = t.get("sha256"), t.get("length"), t.get("info_hash")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise TransferError(f"{where}: custom.torrent.sha256 is not a SHA-256 hex digest")
        if not isinstance(ih, str) or not _HEX64.match(ih):
            raise TransferError(f"{where}: custom.torrent.info_hash is not a v2 info-hash")
        if not isinstance(length, int) or isinstance(length, bool) or not 0 < length < 1 << 31:
            raise TransferError(f"{where}: custom.torrent.length is not a sane size")
        return cls(sha, length, ih)

    def check(self, data: bytes, meta: TorrentMeta) -> None:
        """Tie fetched ``.torrent`` bytes and their parse to this reference.

        Raises:
            TransferError: length, hash or info-hash differ.
        """
        if len(data) != self.length:
            raise TransferError(
                f"torrent {self.sha256[:12]}: {len(data)} bytes, signed {self.length}"
            )
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise TransferError(f"torrent {self.sha256[:12]}: SHA-256 differs from the signed one")
        if meta.info_hash != self.info_hash:
            raise TransferError(
                f"torrent {self.sha256[:12]}: info-hash differs from the signed one"
            )


def object_file(digest: str) -> str:
    """A revision torrent's file path for an object (the store's layout)."""
    return "data/" + relative_path(digest)


def torrent_extension(store: OriginStore, *, progress: bool = False) -> TargetExtension:
    """The publish hook that adds the revision's torrent to its target."""

    def extend(release: ReleaseTarget, custom: dict[str, Any]) -> None:
        from swarm.torrent import create_torrent  # libtorrent only where needed

        started = time.monotonic()
        digests = sorted(catalog_tree_objects(store, release.catalog))
        files = [object_file(d) for d in digests if store.path_of(d).stat().st_size > 0]
        if len(files) < 2:
            # A one-file torrent is a single-file torrent, laid out unlike the
            # store; a revision this small is served by the origin alone.
            return
        if progress:
            sys.stderr.write(f"\n  torrent of revision {release.revision}: {len(files)} objects\n")
        meta = create_torrent(store.root, files, name=store.name, piece_length=RELEASE_PIECE_LENGTH)
        digest = ObjectWriter(store.data_dir).put(meta.data)
        ref = TorrentRef(digest, len(meta.data), meta.info_hash)
        custom["torrent"] = ref.to_custom()
        if progress:
            sys.stderr.write(
                f"  torrent {meta.info_hash[:16]}: {len(meta.data)} bytes,"
                f" {time.monotonic() - started:.1f} s\n"
            )

    return extend
