"""The node mount's root: repositories and images side by side, without FUSE."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cvmfs_like.cache import ObjectCache
from cvmfs_like.exceptions import ObjectUnavailable
from cvmfs_like.mounted import MountedRelease, TrustedReleases
from cvmfs_like.namespace import ImageFile, Namespace
from cvmfs_like.objects import ObjectSource
from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from tests.trees import build_sample_tree
from trust.client import Freshness, RefreshOutcome
from trust.keys import init_keys
from trust.targets import ReleaseTarget


class StoreSource(ObjectSource):
    def __init__(self, store: OriginStore) -> None:
        self.store = store

    def fetch(self, digest: str, size: int) -> bytes:
        return self.store.path_of(digest).read_bytes()


class FixedReleases(TrustedReleases):
    def __init__(self, release: ReleaseTarget) -> None:
        self.release = release

    def refresh_or_cached(self) -> RefreshOutcome:
        return RefreshOutcome(Freshness.REFRESHED)

    def releases(self) -> list[ReleaseTarget]:
        return [self.release]

    def tags(self) -> dict[str, ReleaseTarget]:
        return {}


@dataclass
class MemoryImage(ImageFile):
    data: bytes
    published: int = 1_700_000_000
    fail: bool = False
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.data)

    def read(self, offset: int, size: int) -> bytes:
        if self.fail:
            raise ObjectUnavailable("img", "no peer has it")
        return self.data[offset : offset + size]

    def xattrs(self) -> dict[str, bytes]:
        return {"image": b"test"}


def mounted(tmp: Path, name: str, version: str) -> MountedRelease:
    keys = tmp / f"keys-{name}"
    init_keys(keys, name)
    store = OriginStore(tmp / "store", name)
    src = build_sample_tree(tmp / f"src-{name}", version=version)
    result = publish(src, store, keys)
    m = MountedRelease(
        name,
        FixedReleases(result.release),
        StoreSource(store),
        ObjectCache(tmp / f"cache-{name}", 1 << 30),
    )
    m.start()
    return m


@pytest.fixture
def ns(tmp_path: Path) -> Namespace:
    n = Namespace()
    n.set_repository("a.example.org", mounted(tmp_path, "a.example.org", "1"))
    n.set_repository("b.example.org", mounted(tmp_path, "b.example.org", "2"))
    return n


def read(ns: Namespace, path: str) -> bytes:
    e = ns.lookup(path.encode())
    assert e is not None
    fh = ns.open(e)
    try:
        return ns.read(fh, 0, e.size)
    finally:
        ns.release(fh)


def test_repositories_side_by_side_with_distinct_inodes(ns: Namespace) -> None:
    names = [e.name for e in ns.list_dir(b"")]
    assert names == [b".images", b"a.example.org", b"b.example.org"]
    assert read(ns, "a.example.org/VERSION") == b"1\n"
    assert read(ns, "b.example.org/VERSION") == b"2\n"
    a = ns.lookup(b"a.example.org/VERSION")
    b = ns.lookup(b"b.example.org/VERSION")
    assert a is not None and b is not None
    assert a.ino != b.ino  # same path in two repositories: not a hard link
    listed = {e.name: e.ino for e in ns.list_dir(b"a.example.org")}
    assert listed[b"VERSION"] == a.ino
    assert ns.lookup(b"c.example.org") is None
    assert ns.lookup(b"a.example.org/nope") is None


def test_images_appear_as_files_and_changes_are_reported(ns: Namespace) -> None:
    img = MemoryImage(bytes(range(256)) * 100)
    changed = ns.set_images({("a.example.org", "worker", "1.0"): img})
    assert b".images/a.example.org/worker/1.0" in changed
    assert [e.name for e in ns.list_dir(b".images")] == [b"a.example.org"]
    assert [e.name for e in ns.list_dir(b".images/a.example.org/worker")] == [b"1.0"]
    e = ns.lookup(b".images/a.example.org/worker/1.0")
    assert e is not None and e.is_file and e.size == img.size
    assert read(ns, ".images/a.example.org/worker/1.0") == img.data
    fh = ns.open(e)
    assert ns.read_pieces(fh, 25590, 100) == img.data[25590:]  # clipped at the end
    ns.release(fh)
    # an image removed (or refused by a new policy) disappears
    changed = ns.set_images({})
    assert b".images/a.example.org/worker/1.0" in changed
    assert ns.lookup(b".images/a.example.org/worker/1.0") is None
    assert ns.lookup(b".images/a.example.org") is None


def test_image_read_failure_is_an_object_error(ns: Namespace) -> None:
    ns.set_images({("a.example.org", "w", "1"): MemoryImage(b"x" * 10, fail=True)})
    e = ns.lookup(b".images/a.example.org/w/1")
    assert e is not None
    fh = ns.open(e)
    with pytest.raises(ObjectUnavailable):
        ns.read(fh, 0, 10)
    ns.release(fh)


def test_xattrs_and_statfs_route_to_the_owner(ns: Namespace) -> None:
    e = ns.lookup(b"b.example.org/VERSION")
    assert e is not None
    x = ns.xattrs(e)
    assert x["repository"] == b"b.example.org" and x["revision"] == b"1" and "hash" in x
    total, files = ns.statfs()
    assert files > 0 and total > 0
