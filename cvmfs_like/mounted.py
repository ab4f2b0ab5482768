"""A mounted repository: its current revision, open files, and content reads.

This is the filesystem's logic without FUSE: lookups go to the current
revision's catalog; an open file keeps the revision it was opened in; reads
fetch missing objects through the cache (verified there) and never return an
unverified byte.  :mod:`cvmfs_like.fs` is the thin FUSE adapter on top.

Revision switches are an atomic swap of one reference; the previous catalog
stays open (and pinned in the cache) until no open file needs it, which open
files do not: they hold their entry and chunk list.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cvmfs_like.cache import ObjectCache
from cvmfs_like.catalog import Catalog, Chunk, Entry
from cvmfs_like.exceptions import CatalogError, ObjectUnavailable, ReleaseError
from cvmfs_like.objects import ObjectSource
from cvmfs_like.start_profile import ProfileStatus, StartProfiles
from trust.client import Freshness, RefreshOutcome
from trust.exceptions import TrustError
from trust.targets import ReleaseTarget

log = logging.getLogger(__name__)


class TrustedReleases(Protocol):
    """The node-side view of a repository's signed metadata (trust.client)."""

    def refresh_or_cached(self) -> RefreshOutcome: ...

    def releases(self) -> list[ReleaseTarget]: ...

    def tags(self) -> dict[str, ReleaseTarget]: ...


_READ_WHOLE = 128 * 1024  # the kernel's default read-ahead: smaller objects need no advice
_LISTINGS_KEPT = 8192
_ENTRIES_KEPT = 65536


@dataclass
class Revision:
    """One revision's catalog tree, nested catalogs loaded on first use."""

    release: ReleaseTarget
    catalog: Catalog  # the root catalog
    loaded_at: float
    loader: Callable[[str, int], Catalog]  # (digest, size) -> verified, pinned catalog
    discard: Callable[[Catalog], None]  # undoes loader: closes and unpins
    # mount point -> catalog, for every catalog of this revision loaded so far
    catalogs: dict[bytes, Catalog] = field(default_factory=dict)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    # Directory listings, oldest first: a readdir is served in several calls
    # (and again whenever the kernel dropped its copy), each would re-query SQLite.
    listings: OrderedDict[bytes, list[Entry]] = field(default_factory=OrderedDict)
    listings_lock: threading.Lock = field(default_factory=threading.Lock)
    entries: OrderedDict[bytes, Entry] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.catalogs[b""] = self.catalog

    def catalog_for(self, path: bytes) -> Catalog:
        """The catalog holding ``path``'s entry (and, for a directory, its
        children): the deepest nested catalog mounted at or above it.

        Raises:
            ObjectVerificationError, ObjectUnavailable, CatalogError: a nested
                catalog that had to be loaded could not be.
        """
        cat = self.catalog
        if not cat.nested or not path:
            return cat
        prefix = b""
        for part in path.split(b"/"):
            prefix = prefix + b"/" + part if prefix else part
            if prefix in cat.nested:
                cat = self._nested(prefix, cat)
                if not cat.nested:
                    break
        return cat

    def _nested(self, mountpoint: bytes, parent: Catalog) -> Catalog:
        found = self.catalogs.get(mountpoint)
        if found is not None:
            return found
        # Loaded outside load_lock: the fetch may be slow, and lookups below
        # other nested catalogs must not wait behind it.  The cache fetches
        # the object once for concurrent loaders (its waiters gated); a
        # loader that lost the race gives its copy back.
        digest, size = parent.nested[mountpoint]
        loaded = self.loader(digest, size)
        with self.load_lock:
            found = self.catalogs.setdefault(mountpoint, loaded)
        if found is not loaded:
            self.discard(loaded)
        return found

    def lookup(self, path: bytes) -> Entry | None:
        # Hot for open(): the kernel caches attributes but every open of a
        # file comes here.  Negative results are cached by the kernel.
        found = self.entries.get(path)
        if found is not None:
            return found
        entry = self.catalog_for(path).lookup(path)
        if entry is not None:
            with self.listings_lock:
                self.entries[path] = entry
                if len(self.entries) > _ENTRIES_KEPT:
                    self.entries.popitem(last=False)
        return entry

    def list_dir(self, path: bytes) -> list[Entry]:
        # A hit takes no lock (one dict read, atomic under the GIL): listings
        # are kept in the order they were made, not last used.
        found = self.listings.get(path)
        if found is not None:
            return found
        entries = self.catalog_for(path).list_dir(path)
        with self.listings_lock:
            self.listings[path] = entries
            if len(self.listings) > _LISTINGS_KEPT:
                self.listings.popitem(last=False)
        return entries

    def chunks(self, entry: Entry) -> list[Chunk]:
        return self.catalog_for(entry.path).chunks(entry.ino)

    def digests(self) -> list[str]:
        """Hashes of the catalogs loaded (and pinned) for this revision."""
        with self.load_lock:
            return [c.path.name for c in self.catalogs.values()]

    def changed_paths(self, older: Revision) -> list[bytes]:
        """Paths the kernel may hold from ``older`` whose entry differs here.

        Only catalogs ``older`` loaded can have been seen by the kernel; a
        nested catalog whose hash did not change has no changes.
        """
        with older.load_lock:
            seen = dict(older.catalogs)
        changed: set[bytes] = set()
        for mountpoint, old_cat in seen.items():
            new_cat = self.catalog_for(mountpoint)
            if new_cat.path.name == old_cat.path.name:
                continue
            changed.update(new_cat.changed_paths(old_cat))
        return sorted(changed)


@dataclass
class OpenFile:
    """A file opened in one revision; reads stay in that revision."""

    entry: Entry
    revision: int
    chunks: list[Chunk]
    offsets: list[int]
    fds: dict[int, int] = field(default_factory=dict)  # chunk index -> descriptor
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class UpdateResult:
    changed: bool
    revision: int
    changed_paths: list[bytes]
    error: str | None = None


class MountedRelease:
    """The repository as the mount sees it."""

    def __init__(
        self,
        name: str,
        trusted: TrustedReleases,
        source: ObjectSource,
        cache: ObjectCache,
        *,
        tag: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        refreshes: bool = True,
        profiles: StartProfiles | None = None,
    ) -> None:
        # profiles: records what readers read first, prefetches it on a cold
        # start (cvmfs_like.start_profile); None: off.
        self._profiles = profiles
        # refreshes: this mount refreshes the trusted metadata itself before
        # it looks for a revision (a `swarm mount`); else its owner does (the
        # node daemon, which follows a revision's torrent before its catalog).
        self._refreshes = refreshes
        self.name = name
        self._trusted = trusted
        self._source = source
        self._cache = cache
        self._tag = tag
        self._clock = clock
        self._current: Revision | None = None
        self._update_lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._fh = itertools.count(1)
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.offline = False

    # -- revisions -----------------------------------------------------------

    @property
    def current(self) -> Revision:
        rev = self._current
        if rev is None:
            raise ReleaseError(f"{self.name}: no revision loaded")
        return rev

    def start(self) -> Revision:
        """Load the newest trusted revision, from the network or, failing that,
        from the locally cached metadata and catalog.

        Raises:
            TrustError: no trusted metadata at all (first start with origin down).
            ReleaseError: the catalog cannot be had.
        """
        if self._refreshes:
            outcome = self._trusted.refresh_or_cached()
            if outcome.error is not None and not outcome.unreachable:
                raise outcome.error  # bad data is not served, not even from the cache
            if outcome.cached_error is not None:
                raise outcome.cached_error
            if outcome.freshness is Freshness.CACHED:
                log.warning(
                    "%s: metadata refresh failed (%s); using cached metadata",
                    self.name,
                    outcome.error,
                )
                self.offline = True
                self.last_error = str(outcome.error)
        self.last_check = self._clock()
        target = self._wanted()
        if target is None:
            raise ReleaseError(f"{self.name}: the repository has no published revision")
        self._current = self._load(target)
        self._profile(self._current)
        return self._current

    def _profile(self, rev: Revision) -> None:
        if self._profiles is not None:
            self._profiles.revision_loaded(
                rev.release.catalog, rev.release.revision, rev, self._cache, self._source
            )

    def close(self) -> None:
        """At unmount, before the cache is closed: save the start profile
        being recorded and stop (and wait for) its prefetch."""
        if self._profiles is not None:
            self._profiles.close()

    def _wanted(self) -> ReleaseTarget | None:
        if self._tag is not None:
            tags = self._trusted.tags()
            if self._tag not in tags:
                raise ReleaseError(f"{self.name}: no tag {self._tag!r} (have: {sorted(tags)})")
            return tags[self._tag]
        releases = self._trusted.releases()
        return releases[-1] if releases else None

    def _load_catalog(self, digest: str, size: int) -> Catalog:
        fd = self._cache.open(digest, size, self._source, catalog=True)
        os.close(fd)
        self._cache.pin(digest)
        try:
            return Catalog(self._cache.path_of(digest))
        except CatalogError:
            self._cache.unpin(digest)
            raise

    def _discard_catalog(self, catalog: Catalog) -> None:
        catalog.close()
        self._cache.unpin(catalog.path.name)

    def _load(self, target: ReleaseTarget) -> Revision:
        catalog = self._load_catalog(target.catalog, target.catalog_size)
        return Revision(target, catalog, self._clock(), self._load_catalog, self._discard_catalog)

    def update(self) -> UpdateResult:
        """Check for a newer trusted revision now and switch to it.

        Never raises for transport or verification failures: the current
        revision keeps being served and the error is reported.
        """
        with self._update_lock:
            old = self.current
            new: Revision | None = None
            try:
                if self._refreshes:
                    error = self._trusted.refresh_or_cached().error
                    if error is not None:
                        raise error
                self.offline = False
                target = self._wanted()
                self.last_check = self._clock()
                self.last_error = None
                if target is None or (
                    target.revision == old.release.revision
                    and target.catalog == old.release.catalog
                ):
                    return UpdateResult(False, old.release.revision, [])
                new = self._load(target)
                changed = new.changed_paths(old)
            except (TrustError, ReleaseError) as exc:
                if new is not None:
                    for digest in new.digests():
                        self._cache.unpin(digest)
                self.last_error = str(exc)
                self.last_check = self._clock()
                log.warning(
                    "%s: update failed, keeping revision %d: %s",
                    self.name,
                    old.release.revision,
                    exc,
                )
                return UpdateResult(False, old.release.revision, [], str(exc))
            self._current = new
            self._profile(new)
            for digest in old.digests():
                self._cache.unpin(digest)
            log.info(
                "%s: switched from revision %d to %d (%d paths changed)",
                self.name,
                old.release.revision,
                new.release.revision,
                len(changed),
            )
            return UpdateResult(True, new.release.revision, changed)

    # -- lookups ---------------------------------------------------------------

    def lookup(self, path: bytes) -> Entry | None:
        return self.current.lookup(path)

    def list_dir(self, path: bytes) -> list[Entry]:
        return self.current.list_dir(path)

    # -- content ---------------------------------------------------------------

    def open(self, entry: Entry) -> int:
        rev = self.current
        if entry.chunked:
            chunks = rev.chunks(entry)
        elif entry.object is not None:
            chunks = [Chunk(0, entry.size, entry.object)]
        else:
            chunks = []
        fh = next(self._fh)
        self._files[fh] = OpenFile(entry, rev.release.revision, chunks, [c.offset for c in chunks])
        return fh

    def open_file(self, fh: int) -> OpenFile:
        return self._files[fh]

    def cached_paths(self, entry: Entry, digests: list[str]) -> tuple[list[str], bool] | None:
        """Where the verified objects of file ``entry`` (its object, or its
        chunks' in order: ``digests``) are in the local cache, and whether their sizes must be
        checked before they are read (see :meth:`ObjectCache.trusted_path`);
        None unless all are there, and while reads are being recorded for the
        start profile (each must pass :meth:`read_pieces` to be recorded)."""
        if not entry.is_file or (self._profiles is not None and self._profiles.recording()):
            return None
        paths: list[str] = []
        check = False
        for digest in digests:
            got = self._cache.trusted_path(digest)
            if got is None:
                return None
            paths.append(got[0])
            check |= got[1]
        return paths, check

    def read_pieces(self, fh: int, offset: int, size: int) -> list[tuple[int, int, int]]:
        """Where the verified bytes ``[offset, offset+size)`` of an open file are:
        (descriptor of a verified cached object, position in it, length).

        Descriptors stay valid until ``release(fh)``.

        Raises:
            ObjectVerificationError: the object's bytes failed verification.
            ObjectUnavailable: the object could not be fetched in time.
        """
        of = self._files[fh]
        end = min(offset + size, of.entry.size)
        pieces: list[tuple[int, int, int]] = []
        if offset >= end:
            return pieces
        i = bisect.bisect_right(of.offsets, offset) - 1
        pos = offset
        while pos < end:
            chunk = of.chunks[i]
            want = min(end, chunk.offset + chunk.size) - pos
            pieces.append((self._chunk_fd(of, i), pos - chunk.offset, want))
            pos += want
            i += 1
        return pieces

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """Verified bytes ``[offset, offset+size)`` of an open file.

        Raises:
            ObjectVerificationError: the object's bytes failed verification.
            ObjectUnavailable: the object could not be fetched in time.
        """
        parts = []
        for fd, pos, want in self.read_pieces(fh, offset, size):
            data = os.pread(fd, want, pos)
            if len(data) != want:
                raise ObjectUnavailable("?", "short read from the local cache")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _chunk_fd(self, of: OpenFile, index: int) -> int:
        fd = of.fds.get(index)
        if fd is not None:
            return fd
        chunk = of.chunks[index]
        if self._profiles is not None:
            self._profiles.saw(of.revision, of.entry.path, index)
        fd = self._cache.open(chunk.object, chunk.size, self._source)
        if chunk.size > _READ_WHOLE:
            # A chunk is read whole far more often than not: start reading it
            # now.  (A small object is, by the kernel's own read-ahead.)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        with of.lock:
            existing = of.fds.get(index)
            if existing is not None:
                os.close(fd)
                return existing
            of.fds[index] = fd
        return fd

    def release(self, fh: int) -> None:
        of = self._files.pop(fh, None)
        if of is None:
            return
        with of.lock:
            for fd in of.fds.values():
                os.close(fd)
            of.fds.clear()

    def open_count(self) -> int:
        return len(self._files)

    @staticmethod
    def streams(entry: Entry) -> bool:
        """Release files use the page cache (see Namespace.streams)."""
        return False

    def statfs(self) -> tuple[int, int]:
        """(bytes, files) of the current revision."""
        rel = self.current.release
        return rel.total_bytes, rel.files

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        """The ``user.swarm.*`` attributes of an entry of the current revision."""
        rev = self.current
        out = {
            "repository": self.name.encode(),
            "revision": str(rev.release.revision).encode(),
            "catalog": rev.release.catalog.encode(),
        }
        if entry.object is not None:
            out["hash"] = entry.object.encode()
        if entry.chunked:
            out["chunks"] = str(len(rev.chunks(entry))).encode()
        return out

    def status(self) -> dict[str, object]:
        rev = self._current
        return {
            "repository": self.name,
            "revision": None if rev is None else rev.release.revision,
            "catalog": None if rev is None else rev.release.catalog,
            "published": None if rev is None else rev.release.published,
            "tag": self._tag,
            "offline": self.offline,
            "last_error": self.last_error,
            "open_files": len(self._files),
            "cache": self._cache.stats(),
            "start_profile": dataclasses.asdict(self.start_profile_status()),
        }

    def start_profile_status(self) -> ProfileStatus:
        """The current revision's start profile: state and counts."""
        return ProfileStatus("off") if self._profiles is None else self._profiles.status()
