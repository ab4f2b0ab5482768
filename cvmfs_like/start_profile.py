"""Start profiles: what a revision's readers read first, fetched ahead next time.

The first job on a node reads thousands of small files one after the other,
each a round trip to a peer or the origin.  A *start profile* lists what the
readers of one revision read in the first ``window`` seconds after their
first read on this node: (path, chunk index) pairs, in the order of first
use.  On a later cold start of the same revision (same root catalog hash:
the cache wiped, or a profile copied in from another node) the listed
objects are fetched in parallel, ahead of the readers, through the mount's
normal object source and cache.

Trust: a profile is advisory and never trusted.  It names *paths*, never
object hashes: each entry is resolved against the revision's signed catalog
to the (hash, size) the catalog gives, and the object cache verifies the
fetched bytes against that before it stores them.  A forged or damaged
profile can therefore only make the node fetch (verified) objects of the
revision it describes: entries that do not resolve are skipped with a log
line, a file that is not a profile is ignored with one, and the bytes
fetched ahead are bounded (at most ``max_entries`` entries and half of
what the pinned catalogs leave of the cache quota), so a profile can
neither serve a wrong byte nor push the cache over its quota.  This is
also why a profile can be shared: copied to another node's
``CACHE/profiles/`` it means the same there.  Nodes do not exchange
profiles over the network: a peer's profile would let an untrusted peer
choose what this node fetches and evicts; a profile recorded by the
publisher and shipped in the signed release would be the better route.

Invariants:

* one profile file per root catalog hash, ``profiles/<hash>.json``, written
  once (atomically: complete or absent), never rewritten; while a profile
  exists for a revision it is prefetched, not recorded again (a file that
  is no profile of that revision is removed, and the start records anew);
* recording costs the read path one lock and a set insert per first read of
  a chunk in the window, nothing after it; at most ``max_entries`` entries
  and ``MAX_PROFILE_BYTES`` bytes; the directory keeps the newest ``kept``
  profiles;
* prefetching uses at most ``concurrency`` threads of its own (never the
  mount's FUSE threads or its fetch gate's places), stops at a revision
  switch, and :meth:`StartProfiles.close` (unmount) returns only after
  every thread it started has ended.

The pure parts (:func:`encode_profile`, :func:`decode_profile`,
:class:`Recorder`, :func:`resolve`, :class:`Budget`) take no disk, network
or thread; :class:`ProfileStore`, :class:`Prefetch` and
:class:`StartProfiles` are the thin I/O around them.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cvmfs_like.catalog import Chunk, Entry
from cvmfs_like.exceptions import ProfileError, ReleaseError
from cvmfs_like.objects import ObjectSource, is_digest
from trust.durable import write_file_atomic

log = logging.getLogger(__name__)

FORMAT = "swarm-start-profile/1"
MAX_PROFILE_BYTES = 16 << 20  # a profile file larger than this is not read
_MAX_CHUNK = 1 << 20  # a chunk index above this is no chunk of a real file
_LOGGED_SKIPS = 5  # per prefetch: entries skipped with a line of their own

ProfileEntry = tuple[bytes, int]  # (path in the revision, chunk index)


@dataclass(frozen=True)
class ProfileSettings:
    """How start profiles are recorded and used (``enabled=False``: neither)."""

    enabled: bool = True
    window: float = 60.0  # seconds recorded after the first read of a revision
    max_entries: int = 20_000
    concurrency: int = (
        32  # prefetch threads (16 measured twice as slow in bench.start_profile_bench)
    )
    kept: int = 32  # profiles kept in the directory, newest first
    stop_wait: float = 60.0  # close(): how long to wait for a prefetch thread's fetch


@dataclass(frozen=True)
class StartProfile:
    """What the readers of one revision read first, in order."""

    catalog: str  # the revision's root catalog hash: the profile's key
    revision: int
    entries: tuple[ProfileEntry, ...]


# -- the file format (pure) ---------------------------------------------------------------


def encode_profile(profile: StartProfile) -> bytes:
    """The profile as its file's bytes (JSON; paths as UTF-8 with
    surrogate escapes, so any byte path round-trips); entries beyond
    ``MAX_PROFILE_BYTES`` are left out."""
    entries: list[list[object]] = []
    total = 256
    for path, chunk in profile.entries:
        text = path.decode("utf-8", "surrogateescape")
        total += len(json.dumps(text)) + 16
        if total > MAX_PROFILE_BYTES:
            break
        entries.append([text, chunk])
    doc = {
        "format": FORMAT,
        "catalog": profile.catalog,
        "revision": profile.revision,
        "entries": entries,
    }
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _entry_of(item: object) -> ProfileEntry | None:
    if not (isinstance(item, list) and len(item) == 2):
        return None
    text, chunk = item
    if not isinstance(text, str) or type(chunk) is not int or not 0 <= chunk < _MAX_CHUNK:
        return None
    try:
        path = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    if not path or path.startswith(b"/") or b"\0" in path:
        return None
    return path, chunk


def decode_profile(data: bytes, catalog: str, max_entries: int) -> tuple[StartProfile, int]:
    """The profile of the revision with root catalog ``catalog`` from its
    file's bytes, and how many of its entries were unusable (skipped).
    At most ``max_entries`` entries are kept; duplicates are dropped.

    Raises:
        ProfileError: not a profile, or the profile of another revision.
    """
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"larger than {MAX_PROFILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProfileError(f"not a {FORMAT} document")
    if doc.get("catalog") != catalog:
        raise ProfileError(f"made for catalog {str(doc.get('catalog'))[:80]!r}, not {catalog}")
    revision = doc.get("revision")
    raw = doc.get("entries")
    if type(revision) is not int or not isinstance(raw, list):
        raise ProfileError("revision or entries missing")
    seen: set[ProfileEntry] = set()
    entries: list[ProfileEntry] = []
    bad = 0
    for item in raw:
        entry = _entry_of(item)
        if entry is None:
            bad += 1
        elif entry not in seen and len(entries) < max_entries:
            seen.add(entry)
            entries.append(entry)
    return StartProfile(catalog, revision, tuple(entries)), bad


# -- recording (pure) ------------------------------------------------------------------------


class RecordState(enum.Enum):
    WAITING = "waiting"  # no read of the revision yet: the window has not begun
    RECORDING = "recording"
    ENDED = "ended"  # the window passed, the profile is full, or it was stopped


class Recorder:
    """The profile being recorded for one revision.  Thread-safe; the clock
    is injected (a :func:`time.monotonic`-like function)."""

    def __init__(
        self,
        catalog: str,
        revision: int,
        *,
        window: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.revision = revision
        self._window = window
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[ProfileEntry] = set()
        self._entries: list[ProfileEntry] = []
        self.state = RecordState.WAITING
        self.began: float | None = None

    def saw(self, path: bytes, chunk: int) -> bool:
        """A reader read ``chunk`` of ``path``.  True when this ended the
        recording (the window passed or the profile is full): the caller
        saves :meth:`profile` then."""
        with self._lock:
            if self.state is RecordState.ENDED:
                return False
            now = self._clock()
            if self.state is RecordState.WAITING:
                self.state = RecordState.RECORDING
                self.began = now
            elif self.began is not None and now - self.began > self._window:
                self.state = RecordState.ENDED
                return True
            entry = (path, chunk)
            if entry not in self._seen:
                self._seen.add(entry)
                self._entries.append(entry)
                if len(self._entries) >= self._max:
                    self.state = RecordState.ENDED
                    return True
            return False

    def end(self) -> bool:
        """End the recording now (window timer, switch, unmount); True if it
        was still open, i.e. the caller saves :meth:`profile` now."""
        with self._lock:
            was = self.state
            self.state = RecordState.ENDED
            return was is not RecordState.ENDED

    def profile(self) -> StartProfile | None:
        """What was recorded (None: nothing was read)."""
        with self._lock:
            if not self._entries:
                return None
            return StartProfile(self.catalog, self.revision, tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


# -- prefetching (pure parts) ---------------------------------------------------------------


class RevisionFiles(Protocol):
    """What resolving an entry needs of a revision (cvmfs_like.mounted.Revision)."""

    def lookup(self, path: bytes) -> Entry | None: ...

    def chunks(self, entry: Entry) -> list[Chunk]: ...


def resolve(files: RevisionFiles, path: bytes, chunk: int) -> Chunk | str:
    """The object the revision's signed catalog gives for ``chunk`` of
    ``path``, or why there is none (a string for the log).

    Raises:
        ReleaseError: a nested catalog on the way could not be loaded.
    """
    entry = files.lookup(path)
    if entry is None:
        return "no such path in this revision"
    if not entry.is_file:
        return "not a regular file"
    if entry.chunked:
        chunks = files.chunks(entry)
        if chunk >= len(chunks):
            return f"the file has {len(chunks)} chunks"
        return chunks[chunk]
    if chunk != 0:
        return "the file is not chunked"
    if entry.object is None or not is_digest(entry.object):
        return "an empty file"
    return Chunk(0, entry.size, entry.object)


class Budget:
    """Bytes a prefetch may still fetch (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if size > self.left:
                return False
            self.left -= size
            return True


class PrefetchState(enum.Enum):
    RUNNING = "prefetching"
    DONE = "done"
    STOPPED = "stopped"  # a revision switch or the unmount came first
    OVER_BUDGET = "over budget"  # stopped at half the cache quota


@dataclass(frozen=True)
class ProfileStatus:
    """The current revision's start profile, for status reports: state off,
    none, waiting, recording, recorded, ended (recording) or prefetching,
    done, stopped, over budget (prefetching)."""

    state: str
    recorded: int = 0  # entries recorded so far
    listed: int = 0  # entries of the profile being prefetched
    fetched: int = 0  # objects fetched ahead (verified and stored)
    present: int = 0  # already cached
    skipped: int = 0  # entries naming nothing fetchable in this revision
    failed: int = 0  # fetches that failed or delivered wrong bytes (never stored)


@dataclass
class PrefetchCounts:
    listed: int = 0  # entries in the profile
    fetched: int = 0  # objects fetched ahead (verified and stored)
    present: int = 0  # already in the cache
    skipped: int = 0  # entries that name nothing fetchable in this revision
    failed: int = 0  # fetches that failed or delivered wrong bytes


# -- I/O: the profile directory ---------------------------------------------------------------


class ProfileStore:
    """Profile files in one directory (``CACHE/profiles``): written once,
    atomically; the newest ``kept`` are kept; an unusable one is removed when
    read.  Never raises: a profile is advisory, so every problem is a log
    line."""

    def __init__(self, directory: Path, *, kept: int = 32) -> None:
        self.directory = directory
        self._kept = kept

    def path_of(self, catalog: str) -> Path:
        return self.directory / f"{catalog}.json"

    def exists(self, catalog: str) -> bool:
        return self.path_of(catalog).is_file()

    def load(self, catalog: str, max_entries: int) -> StartProfile | None:
        """The revision's profile, or None (absent or unusable: logged)."""
        path = self.path_of(catalog)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PROFILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("start profile %s unreadable (%s); ignored", path, exc.strerror)
            return None
        try:
            profile, bad = decode_profile(data, catalog, max_entries)
        except ProfileError as exc:
            # Removed, so that this start records a usable one in its place.
            log.warning("start profile %s ignored and removed: %s", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if bad:
            log.warning("start profile %s: %d malformed entries skipped", path, bad)
        return profile

    def save(self, profile: StartProfile) -> bool:
        """Write the profile unless one exists for its revision; True if written."""
        path = self.path_of(profile.catalog)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.exists():
                return False  # written once: the first recording stands
            # Atomic, not fsynced: an unmount must not wait on a busy disk
            # for an advisory file; the cache's clean close flushes it, and
            # one damaged by a crash is removed when read.
            write_file_atomic(path, encode_profile(profile), durable=False)
        except OSError as exc:
            log.warning("start profile %s not written: %s", path, exc.strerror)
            return False
        log.info(
            "start profile of revision %d written: %d entries (%s)",
            profile.revision,
            len(profile.entries),
            path,
        )
        self._prune()
        return True

    def _prune(self) -> None:
        try:
            found = [
                (e.stat().st_mtime_ns, e.path)
                for e in os.scandir(self.directory)
                if e.name.endswith(".json") and is_digest(e.name[:-5])
            ]
        except OSError:
            return
        found.sort(reverse=True)
        for _, old in found[self._kept :]:
            with contextlib.suppress(OSError):
                os.unlink(old)


# -- I/O: prefetching ----------------------------------------------------------------------


class PrefetchCache(Protocol):
    """What prefetching needs of the object cache (cvmfs_like.cache.ObjectCache)."""

    def contains(self, digest: str) -> bool: ...

    def stats(self) -> dict[str, int]: ...

    def open(
        self,
        digest: str,
        size: int,
        source: ObjectSource,
        *,
        catalog: bool = ...,
        gated: bool = ...,
    ) -> int: ...


class Prefetch:
    """Fetch one profile's objects ahead of the readers, ``concurrency`` at
    a time, in the profile's order (module docstring)."""

    def __init__(
        self,
        profile: StartProfile,
        files: RevisionFiles,
        cache: PrefetchCache,
        source: ObjectSource,
        *,
        concurrency: int,
        budget: int,
    ) -> None:
        self.profile = profile
        self._files = files
        self._cache = cache
        self._source = source
        self._budget = Budget(budget)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._logged = 0
        self.counts = PrefetchCounts(listed=len(profile.entries))
        self.state = PrefetchState.RUNNING
        n = max(1, min(concurrency, len(profile.entries)))
        self._threads = [
            threading.Thread(target=self._work, name=f"swarm-prefetch-{i}", daemon=True)
            for i in range(n)
        ]
        self._running = n

    def start(self) -> None:
        log.info(
            "start profile of revision %d: prefetching %d entries, %d at a time",
            self.profile.revision,
            len(self.profile.entries),
            len(self._threads),
        )
        for t in self._threads:
            t.start()

    def stop(self, wait: float | None = None) -> None:
        """Stop taking entries; with ``wait``, wait that long for the fetches
        in progress (each bounded by the source's deadline) to end."""
        with self._lock:
            if self.state is PrefetchState.RUNNING:
                self.state = PrefetchState.STOPPED
        self._stop.set()
        if wait is None:
            return
        deadline = time.monotonic() + wait
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.error("start profile: %s still fetching after %g s", t.name, wait)

    def alive(self) -> int:
        return sum(1 for t in self._threads if t.is_alive())

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the prefetch to end; True if it did."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():  # never started (closed first) counts as ended
                t.join(max(0.0, deadline - time.monotonic()))
        return self.alive() == 0

    def _take(self) -> ProfileEntry | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self.profile.entries):
                return None
            entry = self.profile.entries[self._next]
            self._next += 1
            return entry

    def _work(self) -> None:
        try:
            while (entry := self._take()) is not None:
                self._one(*entry)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
                if last and self.state is PrefetchState.RUNNING:
                    self.state = PrefetchState.DONE
            if last:
                c = self.counts
                log.info(
                    "start profile of revision %d: prefetch %s: %d fetched, %d already cached,"
                    " %d skipped, %d failed of %d",
                    self.profile.revision,
                    self.state.value,
                    c.fetched,
                    c.present,
                    c.skipped,
                    c.failed,
                    c.listed,
                )

    def _skip(self, path: bytes, chunk: int, why: str) -> None:
        with self._lock:
            self.counts.skipped += 1
            self._logged += 1
            loud = self._logged <= _LOGGED_SKIPS
        if loud:
            log.warning(
                "start profile: entry %r chunk %d skipped: %s",
                path.decode("utf-8", "replace")[:200],
                chunk,
                why,
            )

    def _one(self, path: bytes, chunk: int) -> None:
        try:
            found = resolve(self._files, path, chunk)
        except ReleaseError as exc:
            self._skip(path, chunk, str(exc))
            return
        if isinstance(found, str):
            self._skip(path, chunk, found)
            return
        if self._cache.contains(found.object):
            with self._lock:
                self.counts.present += 1
            return
        if not self._budget.take(found.size):
            with self._lock:
                if self.state is PrefetchState.RUNNING:
                    self.state = PrefetchState.OVER_BUDGET
                    log.warning("start profile: prefetch stopped at its budget (half the quota)")
            self._stop.set()
            return
        try:
            # Not gated: these are not FUSE threads.  A reader of the same
            # object meanwhile joins this fetch (single flight).
            fd = self._cache.open(found.object, found.size, self._source, gated=False)
        except ReleaseError:  # the cache logged which object and why
            with self._lock:
                self.counts.failed += 1
            return
        os.close(fd)
        with self._lock:
            self.counts.fetched += 1


# -- I/O: one mounted repository's profiles ------------------------------------------------------


@dataclass
class _Current:
    catalog: str
    revision: int
    recorder: Recorder | None = None
    prefetch: Prefetch | None = None
    timer: threading.Timer | None = None
    written: bool = False


class StartProfiles:
    """A mounted repository's start profiles: record the current revision's,
    or prefetch it (module docstring).  :class:`cvmfs_like.mounted.MountedRelease`
    calls :meth:`revision_loaded` when a revision becomes current,
    :meth:`saw` on each first read of a chunk, :meth:`close` at unmount."""

    def __init__(
        self,
        store: ProfileStore,
        settings: ProfileSettings,
        *,
        quota: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self._quota = quota
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _Current | None = None
        self._closed = False
        # Prefetches stopped at a revision switch whose last fetch may still
        # run: close() waits for them too.
        self._stopped: list[Prefetch] = []

    def revision_loaded(
        self,
        catalog: str,
        revision: int,
        files: RevisionFiles,
        cache: PrefetchCache,
        source: ObjectSource,
    ) -> None:
        """The revision became current: end the previous one's recording
        (saving it) and prefetch; prefetch this one's profile if there is
        one, else record it."""
        self._end_current(wait=None)
        cur = _Current(catalog, revision)
        profile = self.store.load(catalog, self.settings.max_entries)
        if profile is not None:
            cur.prefetch = Prefetch(
                profile,
                files,
                cache,
                source,
                concurrency=self.settings.concurrency,
                # Half of what the pinned catalogs leave: objects fetched
                # ahead never push each other (or much else) out.
                budget=max(0, self._quota - cache.stats()["pinned_bytes"]) // 2,
            )
        else:
            cur.recorder = Recorder(
                catalog,
                revision,
                window=self.settings.window,
                max_entries=self.settings.max_entries,
                clock=self._clock,
            )
        with self._lock:
            if self._closed:
                return
            self._current = cur
        if cur.prefetch is not None:
            cur.prefetch.start()

    def recording(self) -> bool:
        """Whether reads are being recorded now (or will be, from the first):
        a read that does not pass :meth:`saw` would be missing from the profile."""
        cur = self._current
        return (
            cur is not None
            and cur.recorder is not None
            and cur.recorder.state is not RecordState.ENDED
        )

    def saw(self, revision: int, path: bytes, chunk: int) -> None:
        """A reader of ``revision`` read ``chunk`` of ``path`` (the hot path)."""
        cur = self._current
        if cur is None or cur.recorder is None or cur.revision != revision:
            return
        rec = cur.recorder
        first = rec.state is RecordState.WAITING
        ended = rec.saw(path, chunk)
        if first and rec.state is RecordState.RECORDING:
            self._arm_timer(cur)
        if ended:
            self._save(cur)

    def _arm_timer(self, cur: _Current) -> None:
        timer = threading.Timer(self.settings.window, self._window_passed, args=(cur,))
        timer.name = "swarm-start-profile"
        timer.daemon = True
        with self._lock:
            if self._closed or cur.timer is not None:
                return
            cur.timer = timer
        timer.start()

    def _window_passed(self, cur: _Current) -> None:
        if cur.recorder is not None and cur.recorder.end():
            self._save(cur)

    def _save(self, cur: _Current) -> None:
        assert cur.recorder is not None
        profile = cur.recorder.profile()
        if profile is not None:
            cur.written = self.store.save(profile) or cur.written

    def _end_current(self, wait: float | None) -> None:
        with self._lock:
            cur, self._current = self._current, None
        if cur is None:
            return
        if cur.timer is not None:
            cur.timer.cancel()
            if wait is not None and cur.timer is not threading.current_thread():
                cur.timer.join(wait)
        if cur.recorder is not None and cur.recorder.end():
            self._save(cur)
        if cur.prefetch is not None:
            cur.prefetch.stop(wait)
            if wait is None:
                with self._lock:
                    self._stopped = [p for p in self._stopped if p.alive()]
                    self._stopped.append(cur.prefetch)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the current prefetch (if any) to end."""
        cur = self._current
        return cur is None or cur.prefetch is None or cur.prefetch.wait(timeout)

    def close(self) -> None:
        """At unmount: save what was recorded, stop the prefetch and wait for
        its threads (each fetch is bounded by the source's deadline)."""
        self._end_current(wait=self.settings.stop_wait)
        with self._lock:
            self._closed = True
            stopped, self._stopped = self._stopped, []
        for prefetch in stopped:
            prefetch.stop(self.settings.stop_wait)

    def status(self) -> ProfileStatus:
        """The current revision's profile state, for the mount's status."""
        cur = self._current
        if cur is None:
            return ProfileStatus("none")
        if cur.prefetch is not None:
            c = cur.prefetch.counts
            return ProfileStatus(
                cur.prefetch.state.value,
                listed=c.listed,
                fetched=c.fetched,
                present=c.present,
                skipped=c.skipped,
                failed=c.failed,
            )
        assert cur.recorder is not None
        state = cur.recorder.state.value
        if cur.recorder.state is RecordState.ENDED:
            state = "recorded" if cur.written else "ended"
        return ProfileStatus(state, recorded=len(cur.recorder))
