"""The mounted repository without FUSE: lookups below nested catalogs that
are still being fetched."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

from cvmfs_like.cache import ObjectCache
from cvmfs_like.catalog import Catalog
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.objects import ObjectSource
from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from tests.cvmfs_like.test_namespace import FixedReleases
from tests.trees import build_sample_tree
from trust.keys import init_keys

REPO = "sw.example.org"


class HeldStoreSource(ObjectSource):
    """Objects from a store; fetches of ``held`` wait until ``release`` is set."""

    def __init__(self, store: OriginStore) -> None:
        self.store = store
        self.held: set[str] = set()
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    def fetch(self, digest: str, size: int) -> bytes:
        if digest in self.held:
            self.waiting.release()
            assert self.release.wait(30)
        return self.store.path_of(digest).read_bytes()


def test_a_slow_nested_catalog_does_not_hold_up_lookups_elsewhere(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, REPO)
    store = OriginStore(tmp_path / "store", REPO)
    src = build_sample_tree(tmp_path / "src")
    for d in ("a", "b"):
        (src / d).mkdir()
        for i in range(10):
            (src / d / f"f{i}").write_text(f"{d}{i}\n")
    result = publish(src, store, keys, nest_threshold=8)
    root = Catalog(store.path_of(result.release.catalog))
    assert {b"a", b"b"} <= set(root.nested)
    source = HeldStoreSource(store)
    cache = ObjectCache(tmp_path / "cache", 1 << 30)
    m = MountedRelease(REPO, FixedReleases(result.release), source, cache)
    m.start()
    slow_catalog = root.nested[b"a"][0]
    source.held.add(slow_catalog)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        try:
            stuck = [pool.submit(m.lookup, f"a/f{i}".encode()) for i in range(2)]
            assert source.waiting.acquire(timeout=10)  # a's catalog is being fetched
            elsewhere = pool.submit(m.lookup, b"b/f3")
            entry = elsewhere.result(10)  # answered while a's fetch is still stuck
            assert entry is not None and entry.size == 3
            assert not any(f.done() for f in stuck)
        finally:
            source.release.set()
        found = [f.result(10) for f in stuck]
    assert [e.name for e in found if e is not None] == [b"f0", b"f1"]
    # Both lookups loaded a's catalog; the one kept is pinned once, so a
    # revision switch unpins it for good.
    assert cache._pinned[slow_catalog] == 1


def test_lookups_listings_and_cache_hits_take_no_global_lock(tmp_path: Path) -> None:
    """The hot path of many readers: with every lock a lookup, a listing or a
    cache hit could take held by someone else, each is still answered."""
    keys = tmp_path / "keys"
    init_keys(keys, REPO)
    store = OriginStore(tmp_path / "store", REPO)
    src = build_sample_tree(tmp_path / "src")
    result = publish(src, store, keys)
    source = HeldStoreSource(store)
    cache = ObjectCache(tmp_path / "cache", 1 << 30)
    m = MountedRelease(REPO, FixedReleases(result.release), source, cache)
    rev = m.start()
    entry = m.lookup(b"lib/data.bin")
    assert entry is not None and entry.object is not None
    assert [e.name for e in m.list_dir(b"lib")]
    fh = m.open(entry)
    m.read(fh, 0, 1)  # the object is now cached
    m.release(fh)

    def hot_path() -> bytes:
        assert m.lookup(b"lib/data.bin") == entry
        assert [e.name for e in m.list_dir(b"lib")]
        fh = m.open(entry)
        try:
            return m.read(fh, 0, 4)
        finally:
            m.release(fh)

    locks = [cache._lock, rev.listings_lock, rev.load_lock]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for lock in locks:
            lock.acquire()
        try:
            answer = pool.submit(hot_path)
            concurrent.futures.wait([answer], timeout=10)
            blocked = not answer.done()
        finally:  # before the pool waits for its thread
            for lock in locks:
                lock.release()
        assert not blocked, "the hot path waited for a lock"
        assert answer.result(10) == (src / "lib/data.bin").read_bytes()[:4]
