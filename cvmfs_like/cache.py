"""A node's local object cache: verified objects only, bounded by a quota.

Invariants:

* an object is visible under its final name only after its bytes were
  verified against its name (SHA-256) and expected size;
* an object found on disk when the cache is opened is handed to a reader only
  after a check on its first use: its size always, its SHA-256 too when the
  cache was not closed cleanly (and always for a catalog).  One that fails is
  deleted and fetched again, never served;
* the total size of unpinned objects is kept at or under the quota, evicting
  the least recently used first; pinned objects (the current catalogs) and
  objects a reader is fetching or checking right now are never evicted;
* eviction unlinks files: a reader that already holds a descriptor keeps
  reading it, so a full cache never turns into errors for readers of cached
  files.  Over-quota by pinned objects is allowed (and reported), never an
  error.

Fetching is single-flight: concurrent readers of the same missing (or not yet
checked) object wait for one fetch (or check).  A fetch that found the object
unavailable is not repeated for ``retry_after`` seconds (1 s): readers
arriving meanwhile get the same error at once.  The kernel retries a failed
read-ahead right away with a read of its own, so without this every EIO from
a hung origin cost the reader two full fetch timeouts.

Waiting on the network is gated (:class:`FetchGate`, one per mount, shared by
all its caches): a mount is served by a fixed pool of FUSE worker threads,
and every thread blocked on a fetch, or on another reader's fetch of the same
object, is one fewer for everything else.  At most ``limit`` threads may
wait at once; one more is refused at once (``ObjectUnavailable``, so EIO)
rather than queued, because a thread queued for a slot is blocked all the
same.  A cached object never passes the gate, so cached reads and lookups
keep the rest of the pool however slow the origin or the swarm is.

Durability.  Objects are written without ``fsync``: a cold start stores
thousands of small objects on the FUSE read path, and an ``fsync`` of each
object and of its directory made storing 2,000 small objects (0.2-4 KB)
take 1.0-2.3 s instead of 0.1-1.0 s on this project's test machine (ten
times slower on an idle disk, two to three times when other work keeps it
busy; a disk that honours flushes slowly would be worse).  A crash or a
power loss can therefore leave an object cut short, or of the right size
with other bytes (zeros of an unwritten extent), under its final name.
Instead:

* ``CACHE/closed-cleanly`` is the clean-close marker.  Opening the cache
  removes it (and syncs the directory, so the removal survives a crash);
  :meth:`ObjectCache.close` flushes the file system (``syncfs``) and only then
  writes it again.  Its lines name objects that still owe a hash check from
  an earlier unclean close (they were not used since), so a clean close never
  launders a suspect object;
* on its first use after the open, an object is checked by size (an
  ``fstat``), and by SHA-256 if the marker was missing or names it.  Catalogs
  are always hashed on first use: a damaged SQLite page would otherwise make
  a mount refuse to start or, worse, serve wrong rows;
* a damaged object is deleted, logged (``cached object <hash>: <why>``) and
  fetched again; the reader gets the right bytes, or EIO if no source can
  deliver them.

Measured cost on the same machine: a clean close (one ``syncfs`` and the
marker) 10-40 ms; the first use of each of 2,000 small objects after an open
about 8 us more than a hot open when checked by size (without the lock, as
a hit) and 15 us more when hashed (SHA-256 costs about 0.8 ms per MiB); every later use nothing.

An object whose bytes change on disk after a clean close while keeping its
size is outside this: the local disk is trusted while the cache is closed
cleanly, as it is while the cache is open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path

from cvmfs_like.exceptions import ObjectUnavailable, ObjectVerificationError, StoreError
from cvmfs_like.objects import ObjectSource, is_digest, object_path, relative_path, verify
from cvmfs_like.store import sync_filesystem
from trust.durable import fsync_dir, write_file_atomic

log = logging.getLogger(__name__)

CLEAN_MARKER = "closed-cleanly"


_TOUCH_BATCH = 4096  # queued LRU touches applied by a hit that finds the lock free
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


def _read_object(fd: int, size: int) -> bytes:
    parts = []
    pos = 0
    while pos < size:
        part = os.pread(fd, size - pos, pos)
        if not part:
            break
        parts.append(part)
        pos += len(part)
    return b"".join(parts)


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
        self._objects_prefix = f"{self._objects_dir}/"
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest first
        self._touched: deque[str] = deque()  # hits not yet applied to _lru (see open)
        self._pinned: dict[str, int] = {}  # digest -> pin count
        self._flights: dict[str, _Flight] = {}
        # Objects found on disk at open and not used since: digest -> whether
        # the check on first use includes the hash (see the module docstring).
        self._unchecked: dict[str, bool] = {}
        self._writing = 0  # inserts between their first write and their index entry
        self._marked_clean = False  # close() ran and no insert came after it
        self._unavailable: dict[str, tuple[float, str]] = {}  # digest -> (when, why)
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.failures = 0
        self.rejected = 0  # of the failures: bytes that did not match their hash
        self.dropped = 0
        try:
            for i in range(256):
                (self._objects_dir / f"{i:02x}").mkdir(parents=True, exist_ok=True)
            self.closed_cleanly, suspects = self._take_marker()
        except OSError as exc:
            raise StoreError(f"cannot create cache at {root}: {exc.strerror}") from exc
        self._load_index(suspects)

    def _take_marker(self) -> tuple[bool, set[str]]:
        """Remove the clean-close marker, durably; return (was it there, the
        objects it says still owe a hash check)."""
        marker = self.root / CLEAN_MARKER
        try:
            lines = marker.read_bytes().decode("ascii", "replace").split()
        except FileNotFoundError:
            return False, set()
        clean = all(is_digest(line) for line in lines)
        if not clean:
            log.warning("cache %s: clean-close marker unreadable; treating as a crash", self.root)
        marker.unlink()
        # Before any new object is written: a crash must not bring it back.
        fsync_dir(self.root)
        return clean, set(lines)

    def _load_index(self, suspects: set[str]) -> None:
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
            self._unchecked[digest] = not self.closed_cleanly or digest in suspects
        if found and not self.closed_cleanly:
            log.warning(
                "cache %s was not closed cleanly: its %d objects are checked by hash on first use",
                self.root,
                len(found),
            )

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

    def open(
        self,
        digest: str,
        size: int,
        source: ObjectSource,
        *,
        catalog: bool = False,
        gated: bool = True,
    ) -> int:
        """A read-only descriptor of the verified object, fetching it if missing
        (or found damaged on its first use since the cache was opened).

        ``catalog``: the object is a catalog, hashed on its first use.
        ``gated=False``: the caller is no FUSE thread (the start profile's
        prefetch) and waits without taking a place of the gate.

        Raises:
            ObjectVerificationError: the source delivered wrong bytes.
            ObjectUnavailable: the source could not deliver in time, or the
                gate is full.
        """
        # A hit takes no lock, so many readers never queue behind one: two
        # dict reads (atomic under the GIL), the open outside any lock, the
        # LRU touch queued for the lock's next holder (eviction applies the
        # queue before it picks victims).  So does the first use after an
        # open when it is a size check only (the cache was closed cleanly).
        # An object evicted between the check and the open is not found, and
        # one of the wrong size is not taken: both go the locked way below
        # (which drops a damaged object and fetches it again).
        if digest in self._lru:
            unchecked = self._unchecked.get(digest)  # None: checked already
            if unchecked is None or (unchecked is False and not catalog):
                fd = self._open_lock_free(digest, None if unchecked is None else size)
                if fd is not None:
                    return fd
        while True:
            with self._lock:
                if digest in self._lru and digest not in self._unchecked:
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
            if leader:
                try:
                    found = self._open_checked(digest, size, catalog)
                    if found is not None:
                        fd = found
                    else:
                        with self._waiting_for(digest, gated):
                            fd = self._fetch(digest, size, source)
                except BaseException as exc:
                    flight.error = exc
                    raise
                finally:
                    with self._lock:
                        del self._flights[digest]
                    flight.done.set()
                return fd
            with self._waiting_for(digest, gated):
                flight.done.wait()  # the leader's fetch is bounded by its source
            if flight.error is not None:
                raise flight.error

    def trusted_path(self, digest: str) -> tuple[str, bool] | None:
        """Where a reader may open the cached object itself, and whether it
        must check its size first (the first use after a clean close); None
        when the object is not here or owes a hash check.  The reader drops
        the path when the object is gone or has another size, and asks
        :meth:`open` instead.  Counts as a use (the LRU touch is queued)."""
        if digest not in self._lru:
            return None
        unchecked = self._unchecked.get(digest)  # None: checked already
        if unchecked:
            return None
        self._touch(digest)
        return self._objects_prefix + relative_path(digest), unchecked is False

    def _open_lock_free(self, digest: str, size: int | None) -> int | None:
        """The cached object's descriptor, taken without the lock (see
        :meth:`open`); None if it is gone, or is not ``size`` bytes long.

        Two readers may both check an object's size (both find the same), and
        one evicted meanwhile is read through the open descriptor.
        """
        try:
            # A str path: building a Path costs more than the open.
            fd = os.open(self._objects_prefix + relative_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        if size is not None:
            if os.fstat(fd).st_size != size:
                os.close(fd)
                return None
            self._unchecked.pop(digest, None)  # atomic under the GIL; see close for the reader
        self._touch(digest)
        self.hits += 1  # may lose a count under races: statistics only
        return fd

    def _touch(self, digest: str) -> None:
        """Queue a use for the LRU without the lock; a batch is applied by
        whoever finds the lock free once the queue is long (else by the next
        holder), so the queue stays bounded however long only hits come."""
        self._touched.append(digest)
        if len(self._touched) > _TOUCH_BATCH and self._lock.acquire(blocking=False):
            try:
                self._apply_touches_locked()
            finally:
                self._lock.release()

    def _open_checked(self, digest: str, size: int, catalog: bool) -> int | None:
        """The cached object's descriptor once it passed its first-use check;
        None (counted as a miss) if it is absent or was damaged and dropped.

        Called by the flight's leader only: nobody else opens or evicts it now.
        """
        with self._lock:
            present = digest in self._lru
            with_hash = self._unchecked.get(digest)  # None: not found at open, or checked
        fd = None
        damage = None
        if present:
            path = self.path_of(digest)
            with contextlib.suppress(FileNotFoundError):  # removed behind our back
                fd = os.open(path, os.O_RDONLY)
            if fd is not None and with_hash is not None:
                damage = self._damage(fd, digest, size, with_hash or catalog)
                if damage is not None:
                    os.close(fd)
                    fd = None
                    log.warning("cached object %s: %s; dropped, fetching it again", digest, damage)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        with self._lock:
            self._unchecked.pop(digest, None)
            if fd is None:
                self.misses += 1
                if present:
                    self.used -= self._lru.pop(digest)
                if damage is not None:
                    self.dropped += 1
            else:
                self._lru.move_to_end(digest)
                self.hits += 1
        return fd

    @staticmethod
    def _damage(fd: int, digest: str, size: int, with_hash: bool) -> str | None:
        """Why the object open on ``fd`` is not ``digest`` of ``size`` bytes, if it is not."""
        actual = os.fstat(fd).st_size
        if actual != size:
            return f"size {actual} != expected {size}"
        if with_hash:
            try:
                verify(digest, size, _read_object(fd, size))
            except ObjectVerificationError as exc:
                return exc.reason
        return None

    def _waiting_for(self, digest: str, gated: bool) -> contextlib.AbstractContextManager[None]:
        if self._gate is None or not gated:
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
            if isinstance(exc, ObjectVerificationError):
                self.rejected += 1
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
        """Store bytes already verified as ``digest``; return an open descriptor.

        Raises:
            ObjectUnavailable: the object cannot be written to the cache.
        """
        final = self.path_of(digest)
        try:
            self._begin_write()
        except OSError as exc:
            raise ObjectUnavailable(digest, f"cannot store in cache: {exc.strerror}") from exc
        try:  # not fsynced: see "Durability" above
            write_file_atomic(final, data, durable=False)
            fd = os.open(final, os.O_RDONLY)
        except OSError as exc:
            with self._lock:
                self._writing -= 1
            raise ObjectUnavailable(digest, f"cannot store in cache: {exc.strerror}") from exc
        with self._lock:
            self._writing -= 1
            self._unchecked.pop(digest, None)
            if digest not in self._lru:
                self.used += len(data)
            else:
                self.used += len(data) - self._lru[digest]
            self._lru[digest] = len(data)
            self._lru.move_to_end(digest)
            # Evict while this object is held by the caller's descriptor: even
            # if the cache is tiny, the reader keeps its bytes.
            self._evict_locked(keep=digest)
        return fd

    def _begin_write(self) -> None:
        """Count a write in progress; after a clean close, first take the
        marker away again (durably), since this object will not be flushed."""
        with self._lock:
            if self._marked_clean:
                (self.root / CLEAN_MARKER).unlink(missing_ok=True)
                fsync_dir(self.root)
                self._marked_clean = False
            self._writing += 1

    def close(self) -> None:
        """Record a clean close: flush every object to disk, then write the
        marker that spares the next open the hash checks.

        Call it after the last read.  An object stored after it takes the
        marker away again, and one being stored while it runs keeps it from
        being written, so the marker never vouches for an unflushed object.
        Never raises: when anything fails, the marker is simply not written
        (the next open checks every object by hash) and the reason is logged.
        """
        with self._lock:
            if self._marked_clean:
                return
            if self._writing:
                log.warning("cache %s: closed while storing; not marked clean", self.root)
                return
            self._marked_clean = True
        try:
            sync_filesystem(self.root)
            with self._lock:
                if not self._marked_clean or self._writing:
                    return  # an insert came in meanwhile
                # One C-level copy first: _open_lock_free pops entries without the lock.
                owing = sorted(d for d, with_hash in list(self._unchecked.items()) if with_hash)
                marker = "".join(f"{d}\n" for d in owing).encode("ascii")
                write_file_atomic(self.root / CLEAN_MARKER, marker)  # fsynced, then its directory
        except OSError as exc:
            with self._lock:
                self._marked_clean = False
            log.warning(
                "cache %s: cannot record a clean close (%s); the next start hashes its objects",
                self.root,
                exc,
            )

    def _apply_touches_locked(self) -> None:
        """Move the objects hit since the last call to the LRU's young end."""
        while True:
            try:
                digest = self._touched.popleft()
            except IndexError:
                return
            if digest in self._lru:
                self._lru.move_to_end(digest)

    def _evict_locked(self, keep: str | None = None) -> None:
        if self.used <= self.quota:
            return
        self._apply_touches_locked()
        for digest in list(self._lru):
            if self.used <= self.quota:
                break
            if digest == keep or digest in self._pinned or digest in self._flights:
                continue
            size = self._lru.pop(digest)
            self._unchecked.pop(digest, None)
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
                "rejected": self.rejected,
                "dropped": self.dropped,
            }
