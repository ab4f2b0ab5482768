"""Publishing: content, incrementality, atomicity, refusals (no FUSE)."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from cvmfs_like.catalog import Catalog
from cvmfs_like.exceptions import PublishError
from cvmfs_like.publish import publish
from cvmfs_like.retention import catalog_tree_objects, gc, list_revisions, tag
from cvmfs_like.store import ObjectWriter, OriginStore
from tests.trees import build_sample_tree
from trust.keys import init_keys

REPO = "sw.example.org"


@pytest.fixture
def repo(tmp_path: Path) -> tuple[OriginStore, Path]:
    keys = tmp_path / "keys"
    init_keys(keys, REPO)
    return OriginStore(tmp_path / "store", REPO), keys


def catalog_of(store: OriginStore, revision: int | None = None) -> Catalog:
    releases, _ = list_revisions(store)
    r = releases[-1] if revision is None else next(x for x in releases if x.revision == revision)
    return Catalog(store.path_of(r.catalog))


def test_publish_records_every_kind_of_entry(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = build_sample_tree(tmp_path / "src")
    result = publish(src, store, keys)
    assert result.release.revision == 1
    cat = catalog_of(store)
    hello = cat.lookup(b"bin/hello")
    assert hello is not None and hello.mode & 0o777 == 0o755
    assert store.path_of(hello.object or "").read_bytes() == (src / "bin/hello").read_bytes()
    assert cat.lookup(b"dangling") is not None
    assert cat.lookup(b"dangling").target == b"does/not/exist"  # type: ignore[union-attr]
    assert cat.lookup(b"abs-link").target == b"/etc/hostname"  # type: ignore[union-attr]
    a, b = cat.lookup(b"hard-a"), cat.lookup(b"lib/hard-b")
    assert a is not None and b is not None and a.ino == b.ino and a.nlink == b.nlink == 2
    name = "with space and ünïcödé ✓.txt".encode()
    assert cat.lookup(name) is not None
    assert cat.lookup(b"empty-dir") is not None and cat.list_dir(b"empty-dir") == []
    version = cat.lookup(b"VERSION")
    assert version is not None and version.mtime_ns == 1_500_000_000_123_456_789
    deep = b"/".join(f"d{i}".encode() for i in range(40)) + b"/bottom.txt"
    assert cat.lookup(deep) is not None


def test_unchanged_publish_rehashes_nothing_and_one_change_rehashes_one(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = build_sample_tree(tmp_path / "src")
    first = publish(src, store, keys)
    again = publish(src, store, keys)
    assert again.release.revision == 2
    assert again.stats.hashed_files == 0 and again.stats.new_objects <= 1  # the catalog at most
    (src / "lib" / "data.bin").write_bytes(b"changed")
    third = publish(src, store, keys)
    assert third.stats.hashed_files == 1
    assert third.stats.files == first.stats.files


def test_an_in_place_edit_with_the_old_mtime_is_published(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = build_sample_tree(tmp_path / "src")
    f = src / "lib" / "data.bin"
    before = os.stat(f)
    publish(src, store, keys)
    new = bytes(reversed(f.read_bytes()))
    with open(f, "r+b") as out:  # what `cp -p` onto an existing file does
        out.write(new)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(f)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    # Only the inode change time tells (the kernel's multigrain timestamps
    # make it differ even within one clock tick of the publish's stat).
    assert after.st_ctime_ns != before.st_ctime_ns
    r = publish(src, store, keys)
    assert r.stats.hashed_files == 1
    entry = catalog_of(store).lookup(b"lib/data.bin")
    assert entry is not None and store.path_of(entry.object or "").read_bytes() == new
    assert publish(src, store, keys).stats.hashed_files == 0  # and the state remembers it


def test_one_byte_change_in_a_large_file_reships_few_chunks(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(random.Random(1).randbytes(40 << 20))
    (src / "big").write_bytes(data)
    publish(src, store, keys)
    chunks = catalog_of(store).chunks(catalog_of(store).lookup(b"big").ino)  # type: ignore[union-attr]
    assert len(chunks) >= 3
    data[20 << 20] ^= 0xFF
    (src / "big").write_bytes(data)
    r = publish(src, store, keys)
    assert r.stats.new_objects <= 3  # one or two chunks + the catalog
    assert r.stats.new_bytes < 2 * (16 << 20) + (1 << 20)


def test_killed_publish_keeps_last_revision_and_next_publish_works(
    tmp_path: Path, repo: tuple[OriginStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, keys = repo
    src = build_sample_tree(tmp_path / "src")
    publish(src, store, keys)
    before = list_revisions(store)[0]
    (src / "new-file").write_text("new\n")
    real_put = ObjectWriter.put
    calls = {"n": 0}

    def dying_put(self: ObjectWriter, data: bytes | memoryview, digest: str | None = None) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        return real_put(self, data, digest)

    monkeypatch.setattr(ObjectWriter, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        publish(src, store, keys)
    monkeypatch.setattr(ObjectWriter, "put", real_put)
    assert list_revisions(store)[0] == before
    r = publish(src, store, keys)
    assert r.release.revision == 2
    assert catalog_of(store).lookup(b"new-file") is not None


def test_file_changing_while_read_is_refused(
    tmp_path: Path, repo: tuple[OriginStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, keys = repo
    src = tmp_path / "src"
    src.mkdir()
    f = src / "growing.log"
    f.write_text("line\n")
    real_read = os.read

    def read_and_grow(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        with open(f, "a") as out:
            out.write("more\n")
        return data

    monkeypatch.setattr(os, "read", read_and_grow)
    with pytest.raises(PublishError, match=r"growing.log.*changed while"):
        publish(src, store, keys)
    monkeypatch.setattr(os, "read", real_read)
    assert list_revisions(store)[0] == []


def test_special_files_are_skipped_with_a_warning(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    (src / "ok").write_text("ok")
    r = publish(src, store, keys)
    assert r.stats.skipped == ["pipe (special file)"]
    assert catalog_of(store).lookup(b"pipe") is None


def test_not_a_directory_is_refused(tmp_path: Path, repo: tuple[OriginStore, Path]) -> None:
    store, keys = repo
    (tmp_path / "file").write_text("x")
    with pytest.raises(PublishError, match="not a directory"):
        publish(tmp_path / "file", store, keys)
    with pytest.raises(PublishError, match="No such file"):
        publish(tmp_path / "missing", store, keys)


def test_tags_and_gc_keep_what_is_named_and_drop_the_rest(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / "f").write_text(f"version {i}\n")
        publish(src, store, keys)
    tag(store, keys, "stable", 2)
    r = gc(store, keys, keep=2)
    assert r.removed_revisions == [1, 3]
    assert r.kept_revisions == [2, 4, 5]
    assert r.deleted_objects >= 2
    releases, tags = list_revisions(store)
    assert [x.revision for x in releases] == [2, 4, 5] and tags["stable"].revision == 2
    for x in releases:
        cat = Catalog(store.path_of(x.catalog))
        for digest in cat.objects():
            assert store.has(digest)
    (src / "f").write_text("version 2\n")  # content of a deleted revision comes back
    again = publish(src, store, keys)
    assert again.release.revision == 6
    f = Catalog(store.path_of(again.release.catalog)).lookup(b"f")
    assert f is not None and store.has(f.object or "")


def test_large_subtrees_get_nested_catalogs_and_unchanged_ones_are_reused(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = tmp_path / "src"
    for d in ("a", "b", "c/deep"):
        for i in range(12):
            (src / d).mkdir(parents=True, exist_ok=True)
            (src / d / f"f{i}").write_text(f"{d} {i}\n")
    (src / "top").write_text("top\n")
    publish(src, store, keys, nest_threshold=10)
    root = catalog_of(store)
    assert set(root.nested) == {b"a", b"b", b"c/deep"}
    assert root.lookup(b"a") is not None and root.lookup(b"a/f1") is None
    assert root.lookup(b"c") is not None and root.lookup(b"top") is not None
    a = Catalog(store.path_of(root.nested[b"a"][0]))
    assert a.lookup(b"a") is not None and a.lookup(b"a/f1") is not None
    assert [e.name for e in a.list_dir(b"a")][:2] == [b"f0", b"f1"]
    assert catalog_tree_objects(store, root.path.name) >= set(a.objects())

    (src / "b" / "f3").write_text("changed\n")
    r = publish(src, store, keys, nest_threshold=10)
    assert r.stats.new_objects == 3  # the file, catalog b, the root catalog
    new_root = catalog_of(store)
    assert new_root.nested[b"a"] == root.nested[b"a"]
    assert new_root.nested[b"b"] != root.nested[b"b"]
    new_b = Catalog(store.path_of(new_root.nested[b"b"][0]))
    old_b = Catalog(store.path_of(root.nested[b"b"][0]))
    assert new_b.changed_paths(old_b) == [b"b", b"b/f3"]

    (src / "a" / "added").write_text("new\n")  # elsewhere: b's catalog stays as it was
    publish(src, store, keys, nest_threshold=10)
    assert catalog_of(store).nested[b"b"] == new_root.nested[b"b"]
    assert catalog_of(store).nested[b"a"] != new_root.nested[b"a"]


def test_a_state_from_before_ctime_was_recorded_rehashes_once(
    tmp_path: Path, repo: tuple[OriginStore, Path]
) -> None:
    store, keys = repo
    src = build_sample_tree(tmp_path / "src")
    first = publish(src, store, keys)
    db = sqlite3.connect(store.private_dir / "state.sqlite")
    db.execute("ALTER TABLE files DROP COLUMN ctime_ns")  # the old layout
    db.commit()
    db.close()
    again = publish(src, store, keys)
    assert again.stats.hashed_files == first.stats.hashed_files
    assert again.stats.new_objects <= 1  # the same content: no object rewritten
    assert publish(src, store, keys).stats.hashed_files == 0
