"""Publishing a directory tree as a new signed revision.

Order of work, which makes a publish atomic:

1. scan the tree; hash and store the content of new or changed files (objects
   are written under temporary names and renamed, so never seen partial);
2. write the catalog, store it as an object;
3. flush the store to disk, then commit the TUF metadata, whose last step
   (renaming ``timestamp.json``) is the single commit point.

A publish killed before step 3 finishes leaves the previous revision served;
the objects it wrote are unreferenced until a later publish uses them or
``gc`` removes them.  The publisher's private state (``.publish/state.sqlite``)
remembers each file's (device and inode, size, mtime, ctime) and content so an
unchanged file is neither re-read nor re-hashed.  The inode change time is in
the check, as in rsync and git, because the modification time can be set back
(``cp -p`` or ``touch -r`` onto an existing file) while ctime cannot: an edit
that keeps size and mtime still changes ctime.  A state written before ctime
was recorded has none, so each file is re-hashed once (no object is rewritten).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvmfs_like.catalog import CatalogWriter, Chunk, Entry, parent_of
from cvmfs_like.chunking import CHUNK_THRESHOLD, cut_stream
from cvmfs_like.exceptions import PublishError
from cvmfs_like.store import ObjectWriter, OriginStore, sync_filesystem
from trust.repository import RepositoryWriter
from trust.targets import ReleaseTarget, releases_of

NEST_THRESHOLD = 4096  # entries below a directory that earn it its own catalog

ProgressCallback = Callable[["PublishStats"], None]
TargetExtension = Callable[[ReleaseTarget, dict[str, Any]], None]


@dataclass
class PublishStats:
    """Counters of a publish, updated as it runs."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    new_objects: int = 0
    new_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PublishResult:
    release: ReleaseTarget
    stats: PublishStats
    seconds: float


# What the publisher knew of a file: (ident, size, mtime_ns, ctime_ns, object,
# chunks as JSON [[offset, size, digest], ...]).  Plain tuples: 100k of them
# are loaded on every publish.  The first four are the change check.
_Known = tuple[int, int, int, int | None, str | None, str | None]


class _PublishState:
    """path -> what the file was when last published (private to the publisher)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, ident INTEGER,"
            " size INTEGER, mtime_ns INTEGER, object TEXT, chunks TEXT,"
            " ctime_ns INTEGER) WITHOUT ROWID"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        if "ctime_ns" not in columns:  # a state from before ctime was checked
            self._db.execute("ALTER TABLE files ADD COLUMN ctime_ns INTEGER")

    def catalogs(self) -> dict[bytes, tuple[str, int]]:
        """Catalogs built before: content key -> (digest, size)."""
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS catalogs (key BLOB PRIMARY KEY, digest TEXT,"
            " size INTEGER) WITHOUT ROWID"
        )
        return {k: (d, n) for k, d, n in self._db.execute("SELECT key, digest, size FROM catalogs")}

    def remember_catalogs(self, built: dict[bytes, tuple[str, int]]) -> None:
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM catalogs")
        self._db.executemany(
            "INSERT INTO catalogs VALUES (?,?,?)", ((k, d, n) for k, (d, n) in built.items())
        )
        self._db.execute("COMMIT")

    def load(self) -> dict[bytes, _Known]:
        rows = self._db.execute(
            "SELECT path, ident, size, mtime_ns, ctime_ns, object, chunks FROM files"
        )
        return {row[0]: row[1:] for row in rows}

    def save(self, changed: dict[bytes, _Known], removed: set[bytes]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("DELETE FROM files WHERE path = ?", ((p,) for p in removed))
        self._db.executemany(
            "INSERT OR REPLACE INTO files (path, ident, size, mtime_ns, ctime_ns, object, chunks)"
            " VALUES (?,?,?,?,?,?,?)",
            ((p, *k) for p, k in changed.items()),
        )
        self._db.execute("COMMIT")

    def forget(self, digests: set[str]) -> None:
        """Drop rows whose content objects were garbage-collected."""
        rows = self._db.execute("SELECT path, object, chunks FROM files").fetchall()
        gone = []
        for path, obj, chunks in rows:
            used = {obj} if obj else {c[2] for c in json.loads(chunks or "[]")}
            if used & digests:
                gone.append((path,))
        self._db.execute("BEGIN")
        self._db.executemany("DELETE FROM files WHERE path = ?", gone)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def _ident(st: os.stat_result) -> int:
    """(device, inode) folded into a signed 64-bit SQLite integer."""
    return (st.st_dev * 0x9E3779B97F4A7C15 + st.st_ino) & ((1 << 63) - 1)


def _change_key(st: os.stat_result, ident: int) -> tuple[int, int, int, int]:
    """What must be equal for a file to count as unchanged since the last publish."""
    return (ident, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _inode_of(rel: bytes) -> int:
    """A stable inode number from the path (of a hard link group's first name).

    Derived from the path, not from a position in the scan, so adding a file
    elsewhere leaves an unchanged subtree's catalog byte-identical.  56 bits:
    a collision among 10^6 names has odds of about 10^-5.
    """
    return int.from_bytes(hashlib.blake2b(rel, digest_size=7).digest(), "big") | 1


def _display(path: bytes) -> str:
    return os.fsdecode(path) or "."


def _changed_since(st: os.stat_result, mtime_ns: int, ctime_ns: int) -> bool:
    return st.st_mtime_ns != mtime_ns or st.st_ctime_ns != ctime_ns


def _read_whole(abs_path: bytes, size: int, mtime_ns: int, ctime_ns: int, rel: bytes) -> bytes:
    """Read a small file, refusing one that changes while it is read."""
    try:
        fd = os.open(abs_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise PublishError(f"cannot read {_display(rel)!r}: {exc.strerror}") from exc
    try:
        # A regular file returns fewer bytes than asked only at its end, so
        # one read of size+1 tells both the content and that nothing follows.
        data = os.read(fd, size + 1)
        after = os.fstat(fd)
    except OSError as exc:
        raise PublishError(f"cannot read {_display(rel)!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) != size or _changed_since(after, mtime_ns, ctime_ns):
        raise PublishError(f"{_display(rel)!r} changed while it was published; publish again")
    return data


def _store_chunked(
    abs_path: bytes, size: int, mtime_ns: int, ctime_ns: int, rel: bytes, writer: ObjectWriter
) -> list[Chunk]:
    chunks: list[Chunk] = []
    try:
        with open(abs_path, "rb", buffering=0) as f:
            for span in cut_stream(f):
                digest = hashlib.sha256(span.data).hexdigest()
                writer.put(span.data, digest)
                chunks.append(Chunk(span.offset, len(span.data), digest))
            after = os.fstat(f.fileno())
    except OSError as exc:
        raise PublishError(f"cannot read {_display(rel)!r}: {exc.strerror}") from exc
    total = sum(c.size for c in chunks)
    if total != size or _changed_since(after, mtime_ns, ctime_ns):
        raise PublishError(f"{_display(rel)!r} changed while it was published; publish again")
    return chunks


_Content = tuple[str | None, list[Chunk] | None]
_Todo = tuple[bytes, int, int, int]  # relative path, size, mtime_ns, ctime_ns


def _store_files(src: bytes, data_dir: Path, todo: list[_Todo]) -> tuple[list[_Content], int, int]:
    """Hash and store files; also the body of each worker process."""
    writer = ObjectWriter(data_dir)
    out: list[_Content] = []
    for rel, size, mtime_ns, ctime_ns in todo:
        abs_path = src + b"/" + rel
        if size > CHUNK_THRESHOLD:
            out.append((None, _store_chunked(abs_path, size, mtime_ns, ctime_ns, rel, writer)))
        else:
            out.append((writer.put(_read_whole(abs_path, size, mtime_ns, ctime_ns, rel)), None))
    return out, writer.written_objects, writer.written_bytes


def _batches(
    todo: list[_Todo], max_files: int = 512, max_bytes: int = 32 << 20
) -> list[list[_Todo]]:
    batches: list[list[_Todo]] = []
    current: list[_Todo] = []
    size = 0
    for item in todo:
        if current and (len(current) >= max_files or size + item[1] > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item[1]
    if current:
        batches.append(current)
    return batches


def _store_all(
    src: bytes,
    data_dir: Path,
    todo: list[_Todo],
    workers: int,
    stats: PublishStats,
    tick: Callable[[], None],
) -> list[_Content]:
    """Contents of ``todo`` in order, hashed and stored by ``workers`` processes."""
    batches = _batches(todo)
    if workers <= 1 or len(batches) <= 2:
        results: list[_Content] = []
        for batch in batches:
            contents, objects, nbytes = _store_files(src, data_dir, batch)
            results.extend(contents)
            _account(stats, batch, objects, nbytes)
            tick()
        return results
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_store_files, src, data_dir, b) for b in batches]
        try:
            ordered: list[_Content] = []
            for batch, fut in zip(batches, futures, strict=True):
                contents, objects, nbytes = fut.result()
                ordered.extend(contents)
                _account(stats, batch, objects, nbytes)
                tick()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return ordered


def _account(stats: PublishStats, batch: list[_Todo], objects: int, nbytes: int) -> None:
    stats.hashed_files += len(batch)
    stats.hashed_bytes += sum(t[1] for t in batch)
    stats.new_objects += objects
    stats.new_bytes += nbytes


def _scan(src: bytes) -> list[tuple[bytes, os.stat_result]]:
    """Every entry below ``src`` (relative path, lstat), parents before children."""
    try:
        root_st = os.lstat(src)
    except OSError as exc:
        raise PublishError(f"cannot publish {os.fsdecode(src)!r}: {exc.strerror}") from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise PublishError(f"cannot publish {os.fsdecode(src)!r}: not a directory")
    out: list[tuple[bytes, os.stat_result]] = [(b"", root_st)]
    stack = [b""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(src, rel) if rel else src) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            raise PublishError(f"cannot list {_display(rel)!r}: {exc.strerror}") from exc
        for d in children:
            child = rel + b"/" + d.name if rel else d.name
            try:
                st = d.stat(follow_symlinks=False)
            except OSError as exc:
                raise PublishError(f"cannot stat {_display(child)!r}: {exc.strerror}") from exc
            out.append((child, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
    return out


def publish(
    src: Path,
    store: OriginStore,
    keydir: Path,
    *,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.2,
    workers: int | None = None,
    nest_threshold: int = NEST_THRESHOLD,
    extend_target: TargetExtension | None = None,
) -> PublishResult:
    """Publish ``src`` as the next revision of ``store``'s repository.

    Raises:
        PublishError: the tree cannot be read or changed while read.
        trust.exceptions.TrustError: keys unusable, another publish running.

    ``extend_target(release, custom)`` may add fields to the target's
    ``custom`` before the commit (the swarm adds the revision's torrent); it
    runs after every object is durable and may raise to abort the publish.
    """
    started = time.monotonic()
    if not store.exists():
        store.create()
    with RepositoryWriter.open(store.metadata_dir, keydir) as repo:
        state = _PublishState(store.private_dir / "state.sqlite")
        try:
            result = _publish_locked(
                src,
                store,
                repo,
                state,
                progress,
                progress_interval,
                workers or os.cpu_count() or 1,
                nest_threshold,
                extend_target,
            )
        finally:
            state.close()
    return PublishResult(result[0], result[1], time.monotonic() - started)


def _publish_locked(
    src: Path,
    store: OriginStore,
    repo: RepositoryWriter,
    state: _PublishState,
    progress: ProgressCallback | None,
    progress_interval: float,
    workers: int,
    nest_threshold: int,
    extend_target: TargetExtension | None,
) -> tuple[ReleaseTarget, PublishStats]:
    stats = PublishStats()
    known = state.load()
    src_b = os.fsencode(src.resolve())
    scanned = _scan(src_b)
    next_tick = [time.monotonic() + progress_interval]

    def tick() -> None:
        if progress is not None and time.monotonic() >= next_tick[0]:
            progress(stats)
            next_tick[0] = time.monotonic() + progress_interval

    # Hard links: one catalog inode per (device, inode) of the source.
    link_count: dict[int, int] = {}
    for _, st in scanned:
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            key = _ident(st)
            link_count[key] = link_count.get(key, 0) + 1

    # Pass 1: what each regular file holds, if the state already knows it.
    content: dict[int, _Content] = {}  # scanned index -> content
    todo: list[_Todo] = []
    todo_index: list[int] = []
    first_link: dict[int, int] = {}  # ident -> scanned index of its first name
    changed: dict[bytes, _Known] = {}
    for i, (rel, st) in enumerate(scanned):
        if not stat.S_ISREG(st.st_mode):
            continue
        ident = _ident(st)
        if ident in link_count:
            if ident in first_link:
                continue
            first_link[ident] = i
        prev = known.get(rel)
        if prev is not None and prev[:4] == _change_key(st, ident):
            chunks = None
            if prev[5] is not None:
                chunks = [Chunk(o, s, h) for o, s, h in json.loads(prev[5])]
            content[i] = (prev[4], chunks)
        elif st.st_size == 0:
            content[i] = (None, None)
        else:
            todo.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            todo_index.append(i)

    # Pass 2: hash and store what is new, in parallel.
    for i, c in zip(
        todo_index, _store_all(src_b, store.data_dir, todo, workers, stats, tick), strict=True
    ):
        content[i] = c

    # Pass 3: the catalog entries.
    entries: list[Entry] = []
    chunk_lists: list[tuple[int, list[Chunk]]] = []
    for n, (rel, st) in enumerate(scanned):
        mode = st.st_mode
        name = rel.rsplit(b"/", 1)[-1]
        ino, nlink, size = _inode_of(rel), 1, 0
        obj: str | None = None
        chunks_: list[Chunk] | None = None
        target: bytes | None = None
        if stat.S_ISDIR(mode):
            nlink = 2
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(src_b + b"/" + rel)
            except OSError as exc:
                raise PublishError(f"cannot read link {_display(rel)!r}: {exc.strerror}") from exc
            size = len(target)
        elif stat.S_ISREG(mode):
            size = st.st_size
            ident = _ident(st)
            first = n
            if ident in link_count:
                nlink = link_count[ident]
                first = first_link[ident]
                ino = _inode_of(scanned[first][0])
            obj, chunks_ = content[first]
            prev = known.get(rel)
            now = _change_key(st, ident)
            if prev is None or prev[:4] != now:
                chunk_json = None
                if chunks_ is not None:
                    chunk_json = json.dumps([[c.offset, c.size, c.object] for c in chunks_])
                changed[rel] = (*now, obj, chunk_json)
            stats.files += 1
            stats.bytes += size
            if chunks_ is not None and first == n:
                chunk_lists.append((ino, chunks_))
        else:
            stats.skipped.append(f"{_display(rel)} (special file)")
            continue
        entries.append(
            Entry(
                rel, name, mode, size, st.st_mtime_ns, ino, nlink, target, obj, chunks_ is not None
            )
        )
        stats.entries += 1

    revision = max((r.revision for r in releases_of(repo.targets())), default=0) + 1
    published = int(time.time())
    writer = ObjectWriter(store.data_dir)
    previous = state.catalogs()
    built: dict[bytes, tuple[str, int]] = {}
    catalog_digest, catalog_size = _write_catalogs(
        entries,
        dict(chunk_lists),
        store,
        writer,
        {"revision": str(revision), "published": str(published)},
        nest_threshold,
        previous,
        built,
    )
    state.remember_catalogs(built)
    stats.new_objects += writer.written_objects
    stats.new_bytes += writer.written_bytes

    removed = set(known) - {rel for rel, _ in scanned}
    state.save(changed, removed)
    release = ReleaseTarget(
        revision=revision,
        catalog=catalog_digest,
        catalog_size=catalog_size,
        published=published,
        files=stats.files,
        total_bytes=stats.bytes,
    )
    # Objects must be durable before the metadata that names them.
    _sync(store.data_dir)
    target_file = release.to_target_file()
    if extend_target is not None:
        extend_target(release, target_file.custom)
        _sync(store.data_dir)
    repo.commit({release.target_name: target_file})
    if progress is not None:
        progress(stats)
    return release, stats


def _catalog_roots(entries: list[Entry], threshold: int) -> set[bytes]:
    """Directories that get a catalog of their own (the root always does).

    Bottom-up: a directory is cut when the entries below it that are not
    already in a cut subtree reach ``threshold``, so every catalog holds
    roughly between ``threshold`` and a small multiple of it.
    """
    below: dict[bytes, int] = {}
    dirs = [e.path for e in entries if e.is_dir]
    for e in entries:
        parent = parent_of(e.path)
        if parent is not None:
            below[parent] = below.get(parent, 0) + 1
    roots = {b""}
    for d in sorted(dirs, key=lambda p: p.count(b"/"), reverse=True):
        if d == b"":
            continue
        n = below.get(d, 0)
        parent = parent_of(d)
        assert parent is not None
        if n >= threshold:
            roots.add(d)
        else:
            below[parent] = below.get(parent, 0) + n
    return roots


def _write_catalogs(
    entries: list[Entry],
    chunk_map: dict[int, list[Chunk]],
    store: OriginStore,
    writer: ObjectWriter,
    root_properties: dict[str, str],
    threshold: int,
    previous: dict[bytes, tuple[str, int]],
    built: dict[bytes, tuple[str, int]],
) -> tuple[str, int]:
    """Write the revision's catalog tree, deepest first; return the root's
    (digest, size).

    A nested catalog whose rows are exactly those of one built before (same
    content key in ``previous``, object still in the store) is reused without
    being rebuilt; ``built`` receives the keys of this revision's catalogs.
    """
    roots = _catalog_roots(entries, threshold)
    owned: dict[bytes, list[Entry]] = {r: [] for r in roots}
    owner_of: dict[bytes, bytes] = {}
    for e in entries:  # parents come before children
        if e.path == b"":
            owner = b""
        else:
            parent = parent_of(e.path)
            assert parent is not None
            owner = parent if parent in roots else owner_of[parent]
        owned[owner].append(e)
        if e.is_dir:
            owner_of[e.path] = e.path if e.path in roots else owner
            if e.path in roots and e.path != b"":
                owned[e.path].append(e)  # a nested root is in both catalogs
    written: dict[bytes, tuple[str, int]] = {}
    tmp = store.private_dir / f"catalog-{os.getpid()}.sqlite"
    for root in sorted(roots, key=lambda p: p.count(b"/") if p else -1, reverse=True):
        props = root_properties if root == b"" else {}
        mine = owned[root]
        chunked = sorted({e.ino for e in mine if e.chunked})
        children = [
            (child, *written[child])
            for child in sorted(roots)
            if child and child != root and owner_of[parent_of(child) or b""] == root
        ]
        key = hashlib.blake2b(
            repr((root, props, mine, [chunk_map[i] for i in chunked], children)).encode(),
            digest_size=20,
        ).digest()
        reuse = previous.get(key)
        if reuse is not None and store.has(reuse[0]):
            written[root] = built[key] = reuse
            continue
        cw = CatalogWriter(tmp, {"root": root.hex(), **props})
        cw.add_entries(mine)
        for ino in chunked:
            cw.add_chunks(ino, chunk_map[ino])
        for child, digest, size in children:
            cw.add_nested(child, digest, size)
        cw.finish()
        data = tmp.read_bytes()
        written[root] = built[key] = (writer.put(data), len(data))
        tmp.unlink()
    return written[b""]


def _sync(path: Path) -> None:
    """Flush the store to disk.

    Raises:
        PublishError: the flush failed.
    """
    try:
        sync_filesystem(path)
    except OSError as exc:
        raise PublishError(f"syncfs failed: {exc.strerror}") from exc
