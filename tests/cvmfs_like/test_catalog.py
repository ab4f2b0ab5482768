from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cvmfs_like.catalog import Catalog, CatalogWriter, Chunk, Entry
from cvmfs_like.exceptions import CatalogError

D = stat.S_IFDIR | 0o755
F = stat.S_IFREG | 0o644
L = stat.S_IFLNK | 0o777
H1 = "a" * 64
H2 = "b" * 64


def build(
    path: Path, entries: list[Entry], chunks: dict[int, list[Chunk]] | None = None
) -> Catalog:
    w = CatalogWriter(path, {"revision": "1"})
    w.add_entries(entries)
    for ino, cs in (chunks or {}).items():
        w.add_chunks(ino, cs)
    w.finish()
    return Catalog(path)


def tree() -> list[Entry]:
    return [
        Entry(b"", b"", D, 0, 1, 1, 2),
        Entry(b"bin", b"bin", D, 0, 2, 2, 2),
        Entry(b"bin/run", b"run", F | 0o111, 5, 3, 3, 1, None, H1),
        Entry("bin/ünï code".encode(), "ünï code".encode(), F, 0, 4, 4, 1),
        Entry(b"bin/\xff raw", b"\xff raw", F, 5, 4, 5, 1, None, H1),
        Entry(b"big", b"big", F, 30, 5, 6, 1, None, None, True),
        Entry(b"link", b"link", L, 7, 6, 7, 1, b"bin/run"),
    ]


def test_lookup_list_and_chunks_round_trip(tmp_path: Path) -> None:
    cat = build(tmp_path / "c", tree(), {6: [Chunk(0, 10, H1), Chunk(10, 20, H2)]})
    assert cat.properties["revision"] == "1"
    run = cat.lookup(b"bin/run")
    assert run is not None and run.object == H1 and run.mode & 0o111
    assert cat.lookup(b"missing") is None
    assert [e.name for e in cat.list_dir(b"bin")] == sorted(
        [b"run", "ünï code".encode(), b"\xff raw"]
    )
    assert [e.name for e in cat.list_dir(b"")] == [b"big", b"bin", b"link"]
    link = cat.lookup(b"link")
    assert link is not None and link.is_symlink and link.target == b"bin/run"
    assert cat.chunks(6) == [Chunk(0, 10, H1), Chunk(10, 20, H2)]
    assert cat.objects() == {H1: 10, H2: 20} or cat.objects().keys() == {H1, H2}
    assert cat.count() == 7


def test_changed_paths_reports_edits_additions_removals_and_parents(tmp_path: Path) -> None:
    old = build(tmp_path / "old", tree(), {6: [Chunk(0, 10, H1), Chunk(10, 20, H2)]})
    entries = [e for e in tree() if e.path != b"link"]
    entries = [
        Entry(
            e.path,
            e.name,
            e.mode,
            e.size,
            e.mtime_ns,
            e.ino,
            e.nlink,
            e.target,
            H2 if e.path == b"bin/run" else e.object,
            e.chunked,
        )
        for e in entries
    ]
    entries.append(Entry(b"bin/new", b"new", F, 0, 9, 9, 1))
    new = build(tmp_path / "new", entries, {6: [Chunk(0, 10, H1), Chunk(10, 20, H1)]})
    changed = new.changed_paths(old)
    assert set(changed) == {b"bin/run", b"bin/new", b"bin", b"link", b"", b"big"}
    assert new.changed_paths(new) == []


def test_garbage_file_is_a_catalog_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="unreadable"):
        Catalog(bad)
