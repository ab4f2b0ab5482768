"""Start profiles without FUSE: the file format, the recorder (fake clock),
resolving entries through a revision, and prefetching into a real object
cache from an in-memory source."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from cvmfs_like.cache import FetchGate, ObjectCache
from cvmfs_like.catalog import Chunk, Entry
from cvmfs_like.exceptions import ObjectUnavailable, ProfileError
from cvmfs_like.start_profile import (
    MAX_PROFILE_BYTES,
    Prefetch,
    PrefetchState,
    ProfileSettings,
    ProfileStatus,
    ProfileStore,
    Recorder,
    RecordState,
    StartProfile,
    StartProfiles,
    decode_profile,
    encode_profile,
    resolve,
)
from swarm_testing.waiting import eventually

CAT = "c" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeRevision:
    """Files of a revision: path -> bytes (or a list of chunk bytes)."""

    def __init__(self, files: dict[bytes, bytes | list[bytes]]) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.chunk_table: dict[int, list[Chunk]] = {}
        for ino, (path, content) in enumerate(files.items(), start=2):
            if isinstance(content, list):
                chunks, off = [], 0
                for part in content:
                    chunks.append(Chunk(off, len(part), _digest(part)))
                    off += len(part)
                self.chunk_table[ino] = chunks
                self.entries[path] = Entry(
                    path, path, stat.S_IFREG | 0o444, off, 0, ino, 1, chunked=True
                )
            else:
                obj = _digest(content) if content else None
                self.entries[path] = Entry(
                    path, path, stat.S_IFREG | 0o444, len(content), 0, ino, 1, object=obj
                )
        self.entries[b"dir"] = Entry(b"dir", b"dir", stat.S_IFDIR | 0o555, 0, 0, 1, 2)

    def lookup(self, path: bytes) -> Entry | None:
        return self.entries.get(path)

    def chunks(self, entry: Entry) -> list[Chunk]:
        return self.chunk_table[entry.ino]


class MemorySource:
    """Objects by hash; ``wrong`` ones are answered with other bytes; ``block``
    holds every fetch until set."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.wrong: set[str] = set()
        self.asked: list[str] = []
        self.block: threading.Event | None = None
        self.lock = threading.Lock()

    def fetch(self, digest: str, size: int) -> bytes:
        with self.lock:
            self.asked.append(digest)
        if self.block is not None and not self.block.wait(10):
            raise ObjectUnavailable(digest, "blocked")
        if digest in self.wrong:
            return b"x" * size
        return self.objects[digest]


# -- the file format ----------------------------------------------------------------------


def test_a_profile_round_trips_any_byte_path_in_order() -> None:
    entries = ((b"lib/a.py", 0), (b"caf\xe9/\xff\xfe", 0), (b"big.bin", 3))
    profile = StartProfile(CAT, 7, entries)
    back, bad = decode_profile(encode_profile(profile), CAT, 100)
    assert back == profile and bad == 0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x00garbage", "not JSON"),
        (b"[]", "not a swarm-start-profile/1"),
        (json.dumps({"format": "other"}).encode(), "not a swarm-start-profile/1"),
        (
            json.dumps({"format": "swarm-start-profile/1", "catalog": "d" * 64}).encode(),
            "made for catalog",
        ),
        (
            json.dumps({"format": "swarm-start-profile/1", "catalog": CAT, "revision": 1}).encode(),
            "entries missing",
        ),
        (b" " * (MAX_PROFILE_BYTES + 1), "larger than"),
    ],
)
def test_a_file_that_is_not_this_revisions_profile_is_refused_whole(data: bytes, why: str) -> None:
    with pytest.raises(ProfileError, match=why):
        decode_profile(data, CAT, 100)


def test_malformed_entries_are_counted_and_skipped_duplicates_dropped_count_bounded() -> None:
    doc = {
        "format": "swarm-start-profile/1",
        "catalog": CAT,
        "revision": 3,
        "entries": [
            ["ok", 0],
            ["ok", 0],  # duplicate: dropped, not bad
            ["/abs", 0],
            ["", 0],
            ["nul\u0000", 0],
            ["neg", -1],
            ["float", 1.5],
            ["bool", True],
            ["lone\ud800surrogate", 0],
            "a string",
            ["three", 0, 1],
            ["b", 0],
            ["c", 0],
        ],
    }
    profile, bad = decode_profile(json.dumps(doc).encode(), CAT, 2)
    assert profile.entries == ((b"ok", 0), (b"b", 0))  # max_entries = 2
    assert bad == 9


# -- recording -----------------------------------------------------------------------------


def test_recording_begins_at_the_first_read_and_ends_after_the_window() -> None:
    clock = FakeClock()
    rec = Recorder(CAT, 1, window=10, max_entries=100, clock=clock)
    clock.now += 1000  # mounted long before anyone reads: the window has not begun
    assert rec.state is RecordState.WAITING and rec.profile() is None
    assert rec.saw(b"a", 0) is False
    clock.now += 5
    assert rec.saw(b"b", 0) is False
    assert rec.saw(b"a", 0) is False  # seen: not listed twice
    clock.now += 6
    assert rec.saw(b"late", 0) is True  # the window passed: ends, caller saves
    assert rec.saw(b"later", 0) is False
    profile = rec.profile()
    assert profile is not None and profile.entries == ((b"a", 0), (b"b", 0))


def test_recording_is_bounded_by_max_entries() -> None:
    rec = Recorder(CAT, 1, window=10, max_entries=3, clock=FakeClock())
    ended = [rec.saw(f"f{i}".encode(), 0) for i in range(10)]
    assert ended == [False, False, True] + [False] * 7
    profile = rec.profile()
    assert profile is not None and len(profile.entries) == 3
    assert rec.end() is False  # already ended: nothing more to save


# -- the directory ----------------------------------------------------------------------------


def test_a_profile_is_written_once_and_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ProfileStore(tmp_path / "profiles")
    first = StartProfile(CAT, 1, ((b"a", 0),))
    real_write = os.write

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data)[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    assert store.save(first) is False  # a failed write leaves nothing behind
    monkeypatch.undo()
    assert os.listdir(tmp_path / "profiles") == []
    assert store.save(first) is True
    assert store.save(StartProfile(CAT, 1, ((b"other", 0),))) is False  # written once
    assert store.load(CAT, 100) == first


def test_the_directory_keeps_the_newest_profiles(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, kept=3)
    for i in range(5):
        store.save(StartProfile(f"{i:064x}", i, ((b"a", 0),)))
        os.utime(store.path_of(f"{i:064x}"), ns=(i * 10**9, i * 10**9))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:064x}.json" for i in (2, 3, 4)]


# -- resolving and prefetching ---------------------------------------------------------------


def test_entries_resolve_only_to_objects_the_revision_names() -> None:
    rev = FakeRevision({b"a": b"A" * 10, b"empty": b"", b"big": [b"1" * 5, b"2" * 7]})
    assert resolve(rev, b"a", 0) == Chunk(0, 10, _digest(b"A" * 10))
    assert resolve(rev, b"big", 1) == Chunk(5, 7, _digest(b"2" * 7))
    assert resolve(rev, b"big", 2) == "the file has 2 chunks"
    assert resolve(rev, b"a", 1) == "the file is not chunked"
    assert resolve(rev, b"empty", 0) == "an empty file"
    assert resolve(rev, b"dir", 0) == "not a regular file"
    assert resolve(rev, b"../../etc/passwd", 0) == "no such path in this revision"


def _setup(
    tmp_path: Path, n: int, quota: int = 1 << 20
) -> tuple[FakeRevision, MemorySource, ObjectCache]:
    files: dict[bytes, bytes | list[bytes]] = {
        f"f{i}".encode(): f"content {i}".encode() * 10 for i in range(n)
    }
    rev = FakeRevision(files)
    objects = {_digest(v): v for v in files.values() if isinstance(v, bytes)}
    cache = ObjectCache(tmp_path / "cache", quota, gate=FetchGate(1))
    return rev, MemorySource(objects), cache


def test_prefetch_fetches_every_listed_object_and_skips_what_is_not_there(tmp_path: Path) -> None:
    rev, source, cache = _setup(tmp_path, 20)
    entries = (*((f"f{i}".encode(), 0) for i in range(20)), (b"nope", 0), (b"dir", 0))
    pf = Prefetch(StartProfile(CAT, 1, entries), rev, cache, source, concurrency=4, budget=1 << 20)
    pf.start()
    assert pf.wait(10)
    assert pf.state is PrefetchState.DONE
    assert (pf.counts.fetched, pf.counts.skipped, pf.counts.failed) == (20, 2, 0)
    for i in range(20):
        entry = rev.lookup(f"f{i}".encode())
        assert entry is not None and entry.object is not None and cache.contains(entry.object)


def test_prefetch_never_stores_wrong_bytes(tmp_path: Path) -> None:
    rev, source, cache = _setup(tmp_path, 3)
    bad = rev.lookup(b"f1")
    assert bad is not None and bad.object is not None
    source.wrong.add(bad.object)
    entries = ((b"f0", 0), (b"f1", 0), (b"f2", 0))
    pf = Prefetch(StartProfile(CAT, 1, entries), rev, cache, source, concurrency=2, budget=1 << 20)
    pf.start()
    assert pf.wait(10)
    assert (pf.counts.fetched, pf.counts.failed) == (2, 1)
    assert not cache.contains(bad.object)
    assert not cache.path_of(bad.object).exists()
    assert cache.stats()["rejected"] == 1


def test_prefetch_stops_at_its_budget(tmp_path: Path) -> None:
    rev, source, cache = _setup(tmp_path, 10)
    size = len(b"content 0" * 10)
    entries = tuple((f"f{i}".encode(), 0) for i in range(10))
    pf = Prefetch(StartProfile(CAT, 1, entries), rev, cache, source, concurrency=1, budget=3 * size)
    pf.start()
    assert pf.wait(10)
    assert pf.state is PrefetchState.OVER_BUDGET
    assert pf.counts.fetched == 3 and cache.stats()["objects"] == 3


def test_prefetch_does_not_take_places_of_the_fetch_gate(tmp_path: Path) -> None:
    rev, source, cache = _setup(tmp_path, 4)  # the gate lets one reader wait
    source.block = threading.Event()
    entries = tuple((f"f{i}".encode(), 0) for i in range(4))
    pf = Prefetch(StartProfile(CAT, 1, entries), rev, cache, source, concurrency=4, budget=1 << 20)
    pf.start()
    try:
        eventually("four prefetch fetches", lambda: len(source.asked) == 4, 30)
        # Four fetches wait; a reader of another object still gets the gate's place.
        other = b"reader's object"
        source.objects[_digest(other)] = other
        got: list[int] = []
        reader = threading.Thread(
            target=lambda: got.append(cache.open(_digest(other), len(other), source))
        )
        reader.start()
        # The reader's fetch waits too (or it was refused at once: the test fails).
        eventually(
            "the reader's fetch", lambda: len(source.asked) == 5 or not reader.is_alive(), 30
        )
        source.block.set()
        reader.join(10)
        assert got and os.pread(got[0], 100, 0) == other
        os.close(got[0])
    finally:
        source.block.set()
        pf.stop(wait=10)
    assert pf.alive() == 0


def test_stop_with_a_wait_returns_after_every_prefetch_thread_ended(tmp_path: Path) -> None:
    rev, source, cache = _setup(tmp_path, 50)
    source.block = threading.Event()
    entries = tuple((f"f{i}".encode(), 0) for i in range(50))
    pf = Prefetch(StartProfile(CAT, 1, entries), rev, cache, source, concurrency=8, budget=1 << 20)
    pf.start()
    eventually("eight prefetch fetches", lambda: len(source.asked) == 8, 30)
    threading.Timer(0.2, source.block.set).start()  # the fetches in flight end by themselves
    pf.stop(wait=10)
    assert pf.alive() == 0
    assert pf.state is PrefetchState.STOPPED
    assert len(source.asked) == 8  # nothing new was taken after the stop
    assert not [t for t in threading.enumerate() if t.name.startswith("swarm-prefetch")]


def test_start_profiles_record_then_prefetch_the_same_revision(tmp_path: Path) -> None:
    rev, source, cache = _setup(tmp_path, 5)
    settings = ProfileSettings(window=3600, max_entries=100, concurrency=2)
    store = ProfileStore(tmp_path / "profiles")
    first = StartProfiles(store, settings, quota=1 << 20)
    first.revision_loaded(CAT, 1, rev, cache, source)
    for i in (3, 1, 4):
        first.saw(1, f"f{i}".encode(), 0)
    first.saw(2, b"f0", 0)  # a file open in another revision: not this profile's
    assert first.status() == ProfileStatus("recording", recorded=3)
    first.close()
    assert first.status() == ProfileStatus("none")
    saved = store.load(CAT, 100)
    assert saved is not None and saved.entries == ((b"f3", 0), (b"f1", 0), (b"f4", 0))

    empty = ObjectCache(tmp_path / "cache2", 1 << 20)
    second = StartProfiles(store, settings, quota=1 << 20)
    second.revision_loaded(CAT, 1, rev, empty, source)
    assert second.wait(10)
    assert second.status() == ProfileStatus("done", listed=3, fetched=3)
    second.close()


def test_a_revision_switch_stops_the_old_prefetch_and_saves_the_old_recording(
    tmp_path: Path,
) -> None:
    rev, source, cache = _setup(tmp_path, 40)
    settings = ProfileSettings(window=3600, concurrency=4)
    store = ProfileStore(tmp_path / "profiles")
    store.save(StartProfile(CAT, 1, tuple((f"f{i}".encode(), 0) for i in range(40))))
    profiles = StartProfiles(store, settings, quota=1 << 20)
    source.block = threading.Event()
    profiles.revision_loaded(CAT, 1, rev, cache, source)
    eventually("four prefetch fetches", lambda: len(source.asked) == 4, 30)
    other = "e" * 64
    profiles.revision_loaded(other, 2, rev, cache, source)  # no profile yet: records
    assert profiles.status() == ProfileStatus("waiting")
    profiles.saw(2, b"f7", 0)
    threading.Timer(0.2, source.block.set).start()  # the old fetches end by themselves
    profiles.close()  # waits for the old prefetch's threads too
    assert len(source.asked) == 4  # the old prefetch took nothing after the switch
    assert not [t for t in threading.enumerate() if t.name.startswith("swarm-prefetch")]
    saved = store.load(other, 100)
    assert saved is not None and saved.entries == ((b"f7", 0),)
