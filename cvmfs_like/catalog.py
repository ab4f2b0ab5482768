"""SQLite catalogs: the directory tree of one revision.

A catalog is an immutable SQLite file, itself a content-addressed object whose
hash is signed in the revision's TUF target, so every row is as trusted as the
signature.  Paths are stored as bytes (``os.fsencode``), relative to the
repository root, without a leading slash; the root directory is ``b""``.

Invariants kept by :class:`CatalogWriter` and relied on by readers:

* every entry but the root has its parent directory in the catalog;
* hard links share ``ino`` (and so content); ``nlink`` counts them;
* a revision is a tree of catalogs: the root catalog is the signed target;
  a directory whose subtree is large gets a catalog of its own, named with
  its hash and size in its parent's ``nested`` table (a Merkle tree).  The
  directory's own entry is in both catalogs; every path is repository-relative
  in every catalog.  Nested catalogs carry no revision number, so an
  unchanged subtree yields a byte-identical catalog, stored and fetched once;
* a regular file has exactly one of: no content (size 0), one ``object`` of
  ``size`` bytes, or ``chunked`` with chunks covering ``[0, size)`` in order.
"""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmfs_like.exceptions import CatalogError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE properties (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    path BLOB PRIMARY KEY,
    parent BLOB,
    name BLOB NOT NULL,
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    target BLOB,
    object TEXT,
    chunked INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX entries_parent ON entries (parent, name);
CREATE TABLE nested (
    path BLOB PRIMARY KEY,
    catalog TEXT NOT NULL,
    size INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE chunks (
    ino INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    size INTEGER NOT NULL,
    object TEXT NOT NULL,
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
"""

_COLUMNS = "path, name, mode, size, mtime_ns, ino, nlink, target, object, chunked"


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a revision's tree."""

    path: bytes
    name: bytes
    mode: int
    size: int
    mtime_ns: int
    ino: int
    nlink: int
    target: bytes | None = None  # symlink target, exactly as written
    object: str | None = None  # content of an unchunked regular file
    chunked: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece ``[offset, offset+size)`` of a chunked file."""

    offset: int
    size: int
    object: str


def parent_of(path: bytes) -> bytes | None:
    if path == b"":
        return None
    cut = path.rfind(b"/")
    return b"" if cut < 0 else path[:cut]


class CatalogWriter:
    """Builds a catalog file from entries; ``finish`` makes it immutable."""

    def __init__(self, path: Path, properties: dict[str, str]) -> None:
        self._path = path
        path.unlink(missing_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA page_size=4096")
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")
        props = {"schema": str(SCHEMA_VERSION), **properties}
        self._db.executemany("INSERT INTO properties VALUES (?, ?)", sorted(props.items()))

    def add_entries(self, entries: Iterable[Entry]) -> None:
        self._db.executemany(
            "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                (
                    e.path,
                    parent_of(e.path),
                    e.name,
                    e.mode,
                    e.size,
                    e.mtime_ns,
                    e.ino,
                    e.nlink,
                    e.target,
                    e.object,
                    int(e.chunked),
                )
                for e in entries
            ),
        )

    def add_chunks(self, ino: int, chunks: Iterable[Chunk]) -> None:
        self._db.executemany(
            "INSERT INTO chunks VALUES (?,?,?,?,?)",
            ((ino, i, c.offset, c.size, c.object) for i, c in enumerate(chunks)),
        )

    def add_nested(self, path: bytes, digest: str, size: int) -> None:
        """Declare that the subtree below ``path`` lives in catalog ``digest``."""
        self._db.execute("INSERT INTO nested VALUES (?,?,?)", (path, digest, size))

    def finish(self) -> None:
        self._db.execute("COMMIT")
        self._db.close()


class Catalog:
    """Read-only queries on a verified catalog file; safe to share across threads."""

    def __init__(self, path: Path) -> None:
        """Open ``path`` (a verified catalog object).

        Raises:
            CatalogError: not a readable catalog of a schema this code knows.
        """
        self.path = path
        # One connection per OS thread.  Not threading.local: libfuse calls in
        # from native threads, and each callback would see a fresh local.
        self._conns: dict[int, sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        try:
            props = dict(self._conn().execute("SELECT key, value FROM properties"))
        except sqlite3.DatabaseError as exc:
            raise CatalogError(f"catalog {path.name}: unreadable: {exc}") from exc
        if props.get("schema") != str(SCHEMA_VERSION):
            raise CatalogError(f"catalog {path.name}: unknown schema {props.get('schema')!r}")
        self.properties = props
        self.nested: dict[bytes, tuple[str, int]] = {
            p: (h, n) for p, h, n in self._conn().execute("SELECT path, catalog, size FROM nested")
        }

    def _conn(self) -> sqlite3.Connection:
        tid = threading.get_ident()
        conn = self._conns.get(tid)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False
            )
            with self._conns_lock:
                self._conns[tid] = conn
        return conn

    @staticmethod
    def _entry(
        row: tuple[bytes, bytes, int, int, int, int, int, bytes | None, str | None, int],
    ) -> Entry:
        return Entry(
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], bool(row[9])
        )

    def lookup(self, path: bytes) -> Entry | None:
        row = (
            self._conn()
            .execute(f"SELECT {_COLUMNS} FROM entries WHERE path = ?", (path,))
            .fetchone()
        )
        return None if row is None else self._entry(row)

    def list_dir(self, path: bytes) -> list[Entry]:
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM entries WHERE parent = ? ORDER BY name", (path,)
        )
        return [self._entry(r) for r in rows]

    def chunks(self, ino: int) -> list[Chunk]:
        rows = self._conn().execute(
            "SELECT offset, size, object FROM chunks WHERE ino = ? ORDER BY idx", (ino,)
        )
        return [Chunk(o, s, h) for o, s, h in rows]

    def iter_entries(self) -> Iterator[Entry]:
        for row in self._conn().execute(f"SELECT {_COLUMNS} FROM entries ORDER BY path"):
            yield self._entry(row)

    def objects(self) -> dict[str, int]:
        """Every object this catalog references (file contents and nested
        catalogs, not what those reference), with its size."""
        out: dict[str, int] = {h: n for h, n in self.nested.values()}
        conn = self._conn()
        for digest, size in conn.execute(
            "SELECT object, size FROM entries WHERE object IS NOT NULL"
        ):
            out[digest] = size
        for digest, size in conn.execute("SELECT object, size FROM chunks"):
            out[digest] = size
        return out

    def count(self) -> int:
        (n,) = self._conn().execute("SELECT count(*) FROM entries").fetchone()
        return int(n)

    def changed_paths(self, older: Catalog) -> list[bytes]:
        """Paths whose entry differs between ``older`` and this catalog.

        Includes added and removed paths and, for each, its parent directory
        (whose listing changed).  Used to invalidate kernel caches on a
        revision switch.
        """
        conn = sqlite3.connect(
            f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        try:
            conn.execute("ATTACH DATABASE ? AS old", (f"file:{older.path}?mode=ro&immutable=1",))
            cols = "path, mode, size, mtime_ns, nlink, target, object, chunked"
            new_only = f"SELECT {cols} FROM main.entries EXCEPT SELECT {cols} FROM old.entries"
            old_only = f"SELECT {cols} FROM old.entries EXCEPT SELECT {cols} FROM main.entries"
            rows = conn.execute(
                f"SELECT path FROM ({new_only}) UNION SELECT path FROM ({old_only})"
            ).fetchall()
            # A chunked file's content lives in its chunk list, not in a column.
            chunked = conn.execute(
                "SELECT n.path, n.ino, o.ino FROM main.entries n JOIN old.entries o"
                " ON n.path = o.path WHERE n.chunked AND o.chunked"
            ).fetchall()
            for path, new_ino, old_ino in chunked:
                q = "SELECT offset, size, object FROM {}.chunks WHERE ino = ? ORDER BY idx"
                if (
                    conn.execute(q.format("main"), (new_ino,)).fetchall()
                    != conn.execute(q.format("old"), (old_ino,)).fetchall()
                ):
                    rows.append((path,))
        finally:
            conn.close()
        changed = {r[0] for r in rows}
        for p in list(changed):
            parent = parent_of(p)
            if parent is not None:
                changed.add(parent)
        return sorted(changed)

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
