from __future__ import annotations

import concurrent.futures
import os
import threading
from pathlib import Path

import pytest

from cvmfs_like.cache import CLEAN_MARKER, FetchGate, ObjectCache
from cvmfs_like.exceptions import ObjectUnavailable, ObjectVerificationError, StoreError
from tests.fakes import InMemoryObjectSource


def read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_fetches_verifies_and_then_hits(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"hello world")
    cache = ObjectCache(tmp_path, 1 << 20)
    assert read_fd(cache.open(d, 11, src)) == b"hello world"
    assert read_fd(cache.open(d, 11, src)) == b"hello world"
    assert src.calls == [d]
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


@pytest.mark.parametrize(
    ("bad", "reason"), [(b"hello w0rld", "content hash"), (b"hello", "size 5 != expected 11")]
)
def test_tampered_or_truncated_object_is_refused_and_not_stored(
    tmp_path: Path, bad: bytes, reason: str
) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"hello world")
    src.tampered[d] = bad
    cache = ObjectCache(tmp_path, 1 << 20)
    with pytest.raises(ObjectVerificationError, match=reason):
        cache.open(d, 11, src)
    assert not cache.path_of(d).exists()
    assert not cache.contains(d)
    del src.tampered[d]
    assert read_fd(cache.open(d, 11, src)) == b"hello world"


def test_unavailable_source_raises_and_stores_nothing(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"x")
    src.down = True
    cache = ObjectCache(tmp_path, 1 << 20)
    with pytest.raises(ObjectUnavailable):
        cache.open(d, 1, src)
    assert cache.stats()["objects"] == 0


def test_quota_evicts_least_recently_used_but_never_pinned(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    blobs = [bytes([i]) * 400 for i in range(5)]
    ds = [src.add(b) for b in blobs]
    cache = ObjectCache(tmp_path, 1000)
    os.close(cache.open(ds[0], 400, src))
    cache.pin(ds[0])
    os.close(cache.open(ds[1], 400, src))
    os.close(cache.open(ds[2], 400, src))  # over quota: evicts ds[1], not the pinned ds[0]
    assert cache.contains(ds[0]) and not cache.contains(ds[1]) and cache.contains(ds[2])
    assert cache.used <= 1000
    os.close(cache.open(ds[2], 400, src))  # touch ds[2]
    os.close(cache.open(ds[3], 400, src))  # the least recently used unpinned is ds[2]
    assert cache.used <= 1000 and cache.contains(ds[0]) and cache.contains(ds[3])
    assert not cache.contains(ds[2])


def test_reader_holding_an_evicted_object_keeps_its_bytes(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    a, b = src.add(b"A" * 800), src.add(b"B" * 800)
    cache = ObjectCache(tmp_path, 1000)
    fd = cache.open(a, 800, src)
    os.close(cache.open(b, 800, src))  # evicts a while fd is open
    assert not cache.contains(a)
    assert read_fd(fd) == b"A" * 800


def test_object_larger_than_quota_is_still_served(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"Z" * 5000)
    cache = ObjectCache(tmp_path, 1000)
    assert read_fd(cache.open(d, 5000, src)) == b"Z" * 5000


def test_concurrent_readers_fetch_once(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"shared" * 1000)
    src.delay = 0.2
    cache = ObjectCache(tmp_path, 1 << 20)
    results: list[bytes] = []

    def reader() -> None:
        results.append(read_fd(cache.open(d, 6000, src)))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"shared" * 1000] * 8
    assert src.calls == [d]


def test_index_survives_restart_and_leftover_temp_files_are_removed(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"persist")
    cache = ObjectCache(tmp_path, 1 << 20)
    os.close(cache.open(d, 7, src))
    leftover = cache.path_of(d).parent / ".tmp-1-2"
    leftover.write_bytes(b"partial")
    again = ObjectCache(tmp_path, 1 << 20)
    assert again.contains(d) and again.used == 7
    assert not leftover.exists()


def test_bad_quota_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="quota"):
        ObjectCache(tmp_path, 0)


def test_a_cached_object_cut_short_is_fetched_again_not_served(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"x" * 3370)
    cache = ObjectCache(tmp_path, 1 << 20)
    os.close(cache.open(d, 3370, src))
    cache.close()
    assert (tmp_path / CLEAN_MARKER).read_bytes() == b""
    os.truncate(cache.path_of(d), 0)  # what a power loss after the write left
    again = ObjectCache(tmp_path, 1 << 20)
    assert again.closed_cleanly and not (tmp_path / CLEAN_MARKER).exists()
    assert again.used == 0 and again.contains(d)
    assert read_fd(again.open(d, 3370, src)) == b"x" * 3370
    assert src.calls == [d, d]
    assert again.stats()["dropped"] == 1 and again.used == 3370
    assert read_fd(again.open(d, 3370, src)) == b"x" * 3370  # checked once, then a hit
    assert src.calls == [d, d]


def test_after_a_crash_a_cached_object_changed_at_its_size_is_fetched_again(
    tmp_path: Path,
) -> None:
    src = InMemoryObjectSource()
    a, b = src.add(b"A" * 500), src.add(b"B" * 500)
    cache = ObjectCache(tmp_path, 1 << 20)
    os.close(cache.open(a, 500, src))
    os.close(cache.open(b, 500, src))
    # no close(): a crash.  Both objects come back as zeros of the right size.
    cache.path_of(a).write_bytes(bytes(500))
    cache.path_of(b).write_bytes(bytes(500))
    after_crash = ObjectCache(tmp_path, 1 << 20)
    assert not after_crash.closed_cleanly
    assert read_fd(after_crash.open(a, 500, src)) == b"A" * 500
    # b is not used before a clean close: the marker keeps its debt of a hash check.
    after_crash.close()
    assert (tmp_path / CLEAN_MARKER).read_text() == b + "\n"
    later = ObjectCache(tmp_path, 1 << 20)
    assert later.closed_cleanly
    assert read_fd(later.open(b, 500, src)) == b"B" * 500
    assert read_fd(later.open(a, 500, src)) == b"A" * 500
    assert src.calls == [a, b, a, b]
    assert later.stats()["dropped"] == 1


def test_a_catalog_is_hashed_on_first_use_even_after_a_clean_close(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    d = src.add(b"catalog" * 100)
    cache = ObjectCache(tmp_path, 1 << 20)
    os.close(cache.open(d, 700, src, catalog=True))
    cache.close()
    cache.path_of(d).write_bytes(b"x" * 700)
    again = ObjectCache(tmp_path, 1 << 20)
    assert read_fd(again.open(d, 700, src, catalog=True)) == b"catalog" * 100
    assert src.calls == [d, d]


def test_an_object_stored_after_close_takes_the_clean_marker_away(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    a, b = src.add(b"a"), src.add(b"b")
    cache = ObjectCache(tmp_path, 1 << 20)
    os.close(cache.open(a, 1, src))
    cache.close()
    assert (tmp_path / CLEAN_MARKER).exists()
    os.close(cache.open(b, 1, src))  # not flushed: the cache is no longer clean
    assert not (tmp_path / CLEAN_MARKER).exists()
    cache.close()
    assert (tmp_path / CLEAN_MARKER).exists()
    assert ObjectCache(tmp_path, 1 << 20).closed_cleanly


def test_first_use_after_a_clean_close_takes_no_lock_and_still_checks_the_size(
    tmp_path: Path,
) -> None:
    """Readers after a remount: each object's first use (a size check) is
    answered while the cache's lock is held elsewhere; a cut one is not served."""
    src = InMemoryObjectSource()
    good, cut = src.add(b"g" * 500), src.add(b"c" * 700)
    cache = ObjectCache(tmp_path, 1 << 20)
    for d, n in ((good, 500), (cut, 700)):
        os.close(cache.open(d, n, src))
    cache.close()
    os.truncate(cache.path_of(cut), 10)
    again = ObjectCache(tmp_path, 1 << 20)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        again._lock.acquire()
        try:
            answer = pool.submit(again.open, good, 500, src)
            concurrent.futures.wait([answer], timeout=10)
            blocked = not answer.done()
            damaged = pool.submit(again.open, cut, 700, src)
            concurrent.futures.wait([damaged], timeout=0.5)
            assert not damaged.done()  # the cut object goes the locked way
        finally:
            again._lock.release()
        assert not blocked, "the first use waited for the cache's lock"
        assert read_fd(answer.result(10)) == b"g" * 500
        assert read_fd(damaged.result(10)) == b"c" * 700
    assert src.calls == [good, cut, cut]  # only the cut one fetched again
    assert again.stats()["dropped"] == 1
    again.close()
    assert (tmp_path / CLEAN_MARKER).read_bytes() == b""  # both checked: nothing owed


def test_dropping_a_damaged_object_keeps_the_quota_accounting(tmp_path: Path) -> None:
    src = InMemoryObjectSource()
    ds = [src.add(bytes([i]) * 400) for i in range(3)]
    cache = ObjectCache(tmp_path, 1000)
    for d in ds[:2]:
        os.close(cache.open(d, 400, src))
    cache.close()
    os.truncate(cache.path_of(ds[0]), 100)
    again = ObjectCache(tmp_path, 1000)
    assert again.used == 500
    os.close(again.open(ds[0], 400, src))  # dropped (100) and stored again (400)
    assert again.used == 800
    os.close(again.open(ds[2], 400, src))  # over quota: evicts ds[1], unchecked so far
    assert again.used == 800 and not again.contains(ds[1])
    on_disk = [f.stat().st_size for f in (tmp_path / "objects").rglob("*") if f.is_file()]
    assert sum(on_disk) == 800


class HeldSource(InMemoryObjectSource):
    """Fetches block until ``release`` is set: readers stuck on the network."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def fetch(self, digest: str, size: int) -> bytes:
        self.entered.release()
        assert self.release.wait(30)
        return super().fetch(digest, size)


def test_slow_fetches_beyond_the_gate_fail_at_once_and_cached_reads_never_wait(
    tmp_path: Path,
) -> None:
    src = HeldSource()
    cached = src.add(b"cached")
    slow = [src.add(bytes([i]) * 100) for i in range(3)]
    gate = FetchGate(2)
    cache = ObjectCache(tmp_path, 1 << 20, gate=gate)
    src.release.set()
    os.close(cache.open(cached, 6, src))
    src.release.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:

        def read_object(digest: str) -> bytes:
            return read_fd(cache.open(digest, 100, src))

        stuck = [pool.submit(read_object, d) for d in slow[:2]]
        for _ in stuck:
            assert src.entered.acquire(timeout=10)
        assert gate.waiting == 2
        # Every place is taken: a third fetch, or a third reader waiting for
        # one of the two, is refused at once instead of taking a thread.
        with pytest.raises(ObjectUnavailable, match="already wait on the network"):
            cache.open(slow[2], 100, src)
        with pytest.raises(ObjectUnavailable, match="already wait on the network"):
            cache.open(slow[0], 100, src)
        assert read_fd(cache.open(cached, 6, src)) == b"cached"  # no place needed
        src.release.set()
        assert [f.result(10) for f in stuck] == [bytes([0]) * 100, bytes([1]) * 100]
    assert gate.waiting == 0 and gate.refused == 2
    assert read_fd(cache.open(slow[2], 100, src)) == bytes([2]) * 100


def test_a_mount_gate_leaves_a_quarter_of_the_threads_free() -> None:
    assert FetchGate.for_threads(128).limit == 96
    assert FetchGate.for_threads(16).limit == 12
    assert FetchGate.for_threads(2).limit == 1


def test_an_unavailable_object_is_not_fetched_again_for_a_moment(tmp_path: Path) -> None:
    # The kernel retries a failed read-ahead with a read at once: that retry
    # must not cost a second full fetch timeout.
    now = [100.0]
    src = InMemoryObjectSource()
    d = src.add(b"later")
    src.down = True
    cache = ObjectCache(tmp_path, 1 << 20, retry_after=1.0, clock=lambda: now[0])
    with pytest.raises(ObjectUnavailable, match="fake source is down"):
        cache.open(d, 5, src)
    now[0] += 0.5
    with pytest.raises(ObjectUnavailable, match="not tried again yet"):
        cache.open(d, 5, src)
    assert src.calls == [d]
    src.down = False
    now[0] += 0.5
    assert read_fd(cache.open(d, 5, src)) == b"later"
    assert src.calls == [d, d]
