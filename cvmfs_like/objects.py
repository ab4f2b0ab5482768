"""Content addressing: object names, their place on disk, and object sources.

An object is named by the SHA-256 of its bytes (64 lowercase hex characters).
On disk, in the origin store and in a node's cache alike, it lives at
``<root>/<first two hex>/<name>``: the same relative path over HTTP, so the
origin store can be served as plain files by any web server.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

from cvmfs_like.exceptions import ObjectVerificationError

_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(name: str) -> bool:
    """True for a well-formed object name."""
    return _DIGEST.fullmatch(name) is not None


def digest_of(data: bytes | memoryview) -> str:
    """The object name of ``data``."""
    return hashlib.sha256(data).hexdigest()


def relative_path(digest: str) -> str:
    """``ab/abcdef...``: where an object lives below an object root."""
    return f"{digest[:2]}/{digest}"


def object_path(root: Path, digest: str) -> Path:
    return root / digest[:2] / digest


def verify(digest: str, size: int, data: bytes | memoryview) -> None:
    """Check that ``data`` is the object ``digest`` of ``size`` bytes.

    Raises:
        ObjectVerificationError: wrong length (truncated/extended) or wrong hash.
    """
    if len(data) != size:
        raise ObjectVerificationError(digest, f"size {len(data)} != expected {size}")
    actual = digest_of(data)
    if actual != digest:
        raise ObjectVerificationError(digest, f"content hash is {actual}")


class ObjectSource(Protocol):
    """Where a node gets objects it does not hold (origin over HTTP, peers ...).

    Called from worker threads (FUSE callbacks); implementations must be
    thread-safe and bounded in time.  The bytes returned are *untrusted*: the
    caller verifies them.
    """

    def fetch(self, digest: str, size: int) -> bytes:
        """Return the bytes of object ``digest`` (expected ``size`` bytes).

        Raises:
            ObjectUnavailable: no copy could be had within the source's deadline.
        """
        ...
