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
for one fetch.  A fetch that found the object unavailable is not repeated for
``retry_after`` seconds (1 s): readers arriving meanwhile get the same error
at once.  The kernel retries a failed read-ahead right away with a read of
its own, so without this every EIO from a hung origin cost the reader two
full fetch timeouts.

Waiting on the network is gated (:class:`FetchGate`, one per mount, shared by
all its caches): a mount is served by a fixed pool of FUSE worker threads,
and every thread blocked on a fetch, or on another reader's fetch of the same
object, is one fewer for everything else.  At most ``limit`` threads may
wait at once; one more is refused at once (``ObjectUnavailable``, so EIO)
rather than queued, because a thread queued for a slot is blocked all the
same.  A cached object never passes the gate, so cached reads and lookups
keep the rest of the pool however slow the origin or the swarm is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from cvmfs_like.exceptions import ObjectUnavailable, StoreError
from cvmfs_like.objects import ObjectSource, is_digest, object_path, verify

log = logging.getLogger(__name__)


MOUNT_THREADS = 128  # FUSE worker threads a mount asks libfuse for, by default


class FetchGate:
    """How many threads may wait on fetches at once (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise StoreError(f"fetch gate limit must be positive, got {limit}")
        self.limit = limit
        self.waiting = 0
        self.refused = 0
        self._lock = threading.Lock()

    @classmethod
    def for_threads(cls, threads: int) -> FetchGate:
        """The gate of a mount served by ``threads`` workers: a quarter of them
        (at least one) never wait on the network."""
        return cls(max(threads - max(threads // 4, 1), 1))

    @contextlib.contextmanager
    def waiting_for(self, digest: str) -> Iterator[None]:
        """Hold one of the ``limit`` places while waiting for ``digest``.

        Raises:
            ObjectUnavailable: every place is taken (refused at once).
        """
        with self._lock:
            if self.waiting >= self.limit:
                self.refused += 1
                raise ObjectUnavailable(
                    digest, f"{self.waiting} reads already wait on the network (the mount's limit)"
                )
            self.waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self.waiting -= 1


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class ObjectCache:
    """Verified objects on local disk with LRU eviction under a quota."""

    def __init__(
        self,
        root: Path,
        quota: int,
        *,
        gate: FetchGate | None = None,
        retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (creating) the cache at ``root`` with ``quota`` bytes; fetches
        wait through ``gate`` (none: no limit).

        Raises:
            StoreError: quota not positive, or ``root`` unusable.
        """
        if quota <= 0:
            raise StoreError(f"cache quota must be positive, got {quota}")
        self.root = root
        self.quota = quota
        self._gate = gate
        self._retry_after = retry_after
        self._clock = clock
        self._objects_dir = root / "objects"
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._pinned: dict[str, int] = {}  # digest -> pin count
        self._flights: dict[str, _Flight] = {}
        self._unavailable: dict[str, tuple[float, str]] = {}  # digest -> (when, why)
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
            ObjectUnavailable: the source could not deliver in time, or the
                gate is full.
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
                self._raise_if_failed_recently(digest)
                flight = self._flights.get(digest)
                leader = flight is None
                if flight is None:
                    flight = self._flights[digest] = _Flight()
                    self.misses += 1
            if leader:
                try:
                    with self._waiting_for(digest):
                        fd = self._fetch(digest, size, source)
                except BaseException as exc:
                    flight.error = exc
                    raise
                finally:
                    with self._lock:
                        del self._flights[digest]
                    flight.done.set()
                return fd
            with self._waiting_for(digest):
                flight.done.wait()  # the leader's fetch is bounded by its source
            if flight.error is not None:
                raise flight.error

    def _waiting_for(self, digest: str) -> contextlib.AbstractContextManager[None]:
        if self._gate is None:
            return contextlib.nullcontext()
        return self._gate.waiting_for(digest)

    def _raise_if_failed_recently(self, digest: str) -> None:
        failed = self._unavailable.get(digest)
        if failed is None:
            return
        ago = self._clock() - failed[0]
        if ago >= self._retry_after:
            del self._unavailable[digest]
            return
        raise ObjectUnavailable(digest, f"{failed[1]} ({ago:.1f} s ago; not tried again yet)")

    def _fetch(self, digest: str, size: int, source: ObjectSource) -> int:
        try:
            data = source.fetch(digest, size)
            verify(digest, size, data)
        except Exception as exc:
            self.failures += 1
            log.error("fetch refused: %s", exc)
            if isinstance(exc, ObjectUnavailable):
                self._remember_unavailable(digest, exc.reason)
            raise
        return self.insert_verified(digest, data)

    def _remember_unavailable(self, digest: str, reason: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._unavailable) >= 4096:  # forget the expired ones
                self._unavailable = {
                    d: f for d, f in self._unavailable.items() if now - f[0] < self._retry_after
                }
            self._unavailable[digest] = (now, reason)

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
