"""A node's local object cache: verified objects only, bounded by a quota.

Invariants:

* an object is visible under its final name only after its bytes were
  verified against its name (SHA-256) and expected size;
* the total size of unpinned objects is kept at or under the quota, evicting
  the least recently used first; pinned objects (the current catalogs) and
  objects a reader is fetching right now are never evicted;
* eviction unlinks files: a reader that already holds a descriptor keeps
  reading it, so a full cache never turns into errors for readers of cached
  files.  Over-quota by pinned objects is allowed (and reported), never an
  error.

Fetching is single-flight: concurrent readers of the same missing object wait
for one fetch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from cvmfs_like.exceptions import ObjectUnavailable, StoreError
from cvmfs_like.objects import ObjectSource, is_digest, object_path, verify

log = logging.getLogger(__name__)


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class ObjectCache:
    """Verified objects on local disk with LRU eviction under a quota."""

    def __init__(self, root: Path, quota: int) -> None:
        """Open (creating) the cache at ``root`` with ``quota`` bytes.

        Raises:
            StoreError: quota not positive, or ``root`` unusable.
        """
        if quota <= 0:
            raise StoreError(f"cache quota must be positive, got {quota}")
        self.root = root
        self.quota = quota
        self._objects_dir = root / "objects"
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._pinned: dict[str, int] = {}  # digest -> pin count
        self._flights: dict[str, _Flight] = {}
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.failures = 0
        try:
            for i in range(256):
                (self._objects_dir / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create cache at {root}: {exc.strerror}") from exc
        self._load_index()

    def _load_index(self) -> None:
        found: list[tuple[float, str, int]] = []
        for sub in self._objects_dir.iterdir():
            for entry in os.scandir(sub):
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)  # a fetch interrupted by a crash
                    continue
                if not is_digest(entry.name):
                    continue
                st = entry.stat()
                found.append((st.st_mtime, entry.name, st.st_size))
        found.sort()
        for _, digest, size in found:
            self._lru[digest] = size
            self.used += size

    def path_of(self, digest: str) -> Path:
        return object_path(self._objects_dir, digest)

    def pin(self, digest: str) -> None:
        with self._lock:
            self._pinned[digest] = self._pinned.get(digest, 0) + 1

    def unpin(self, digest: str) -> None:
        with self._lock:
            n = self._pinned.get(digest, 0) - 1
            if n <= 0:
                self._pinned.pop(digest, None)
            else:
                self._pinned[digest] = n
            self._evict_locked()

    def contains(self, digest: str) -> bool:
        with self._lock:
            return digest in self._lru

    def open(self, digest: str, size: int, source: ObjectSource) -> int:
        """A read-only descriptor of the verified object, fetching it if missing.

        Raises:
            ObjectVerificationError: the source delivered wrong bytes.
            ObjectUnavailable: the source could not deliver in time.
        """
        while True:
            with self._lock:
                if digest in self._lru:
                    try:
                        fd = os.open(self.path_of(digest), os.O_RDONLY)
                    except FileNotFoundError:
                        # Removed behind our back: forget it and fetch again.
                        self.used -= self._lru.pop(digest)
                    else:
                        self._lru.move_to_end(digest)
                        self.hits += 1
                        return fd
                flight = self._flights.get(digest)
                leader = flight is None
                if flight is None:
                    flight = self._flights[digest] = _Flight()
                    self.misses += 1
            if leader:
                try:
                    fd = self._fetch(digest, size, source)
                except BaseException as exc:
                    flight.error = exc
                    raise
                finally:
                    with self._lock:
                        del self._flights[digest]
                    flight.done.set()
                return fd
            flight.done.wait()
            if flight.error is not None:
                raise flight.error

    def _fetch(self, digest: str, size: int, source: ObjectSource) -> int:
        try:
            data = source.fetch(digest, size)
            verify(digest, size, data)
        except Exception as exc:
            self.failures += 1
            log.error("fetch refused: %s", exc)
            raise
        return self.insert_verified(digest, data)

    def insert_verified(self, digest: str, data: bytes) -> int:
        """Store bytes already verified as ``digest``; return an open descriptor."""
        final = self.path_of(digest)
        tmp = final.parent / f".tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
            fd = os.open(final, os.O_RDONLY)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ObjectUnavailable(digest, f"cannot store in cache: {exc.strerror}") from exc
        with self._lock:
            if digest not in self._lru:
                self.used += len(data)
            self._lru[digest] = len(data)
            self._lru.move_to_end(digest)
            # Evict while this object is held by the caller's descriptor: even
            # if the cache is tiny, the reader keeps its bytes.
            self._evict_locked(keep=digest)
        return fd

    def _evict_locked(self, keep: str | None = None) -> None:
        if self.used <= self.quota:
            return
        for digest in list(self._lru):
            if self.used <= self.quota:
                break
            if digest == keep or digest in self._pinned or digest in self._flights:
                continue
            size = self._lru.pop(digest)
            self.used -= size
            self.evictions += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path_of(digest))

    def stats(self) -> dict[str, int]:
        with self._lock:
            pinned = sum(self._lru.get(d, 0) for d in self._pinned)
            return {
                "quota": self.quota,
                "used": self.used,
                "objects": len(self._lru),
                "pinned_bytes": pinned,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "failures": self.failures,
            }
