"""The origin store: what a publisher writes and an origin serves as plain files.

Layout (every path below ``STORE/NAME/`` is served as is over HTTP)::

    STORE/NAME/metadata/    TUF metadata (N.root.json, N.targets.json,
                            N.snapshot.json, timestamp.json)
    STORE/NAME/data/ab/ab.. content-addressed objects (file chunks, catalogs)
    STORE/NAME/.publish/    the publisher's private state (not needed to serve)

Objects are written to a temporary name and renamed, so a reader (or a
publish killed half way) never sees a partial object under its final name.
:func:`sync_filesystem` makes what was written durable at once (the publisher
before its commit, a node's object cache at a clean close).
"""

from __future__ import annotations

import os
from pathlib import Path

from cvmfs_like.exceptions import StoreError
from cvmfs_like.objects import digest_of, object_path
from trust.durable import write_file_atomic
from trust.names import repo_name_problem


def check_repo_name(name: str) -> str:
    """``name`` if it is a repository name (``trust/names.py``).

    Raises:
        StoreError: not a repository name; the message says what is.
    """
    problem = repo_name_problem(name)
    if problem is not None:
        raise StoreError(problem)
    return name


class OriginStore:
    """One repository's directory in an origin store."""

    def __init__(self, store: Path, name: str) -> None:
        self.name = check_repo_name(name)
        self.root = store / name
        self.metadata_dir = self.root / "metadata"
        self.data_dir = self.root / "data"
        self.private_dir = self.root / ".publish"

    def exists(self) -> bool:
        return self.metadata_dir.is_dir()

    def create(self) -> None:
        for d in (self.metadata_dir, self.data_dir, self.private_dir):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.data_dir / f"{i:02x}").mkdir(exist_ok=True)

    def path_of(self, digest: str) -> Path:
        return object_path(self.data_dir, digest)

    def has(self, digest: str) -> bool:
        return os.path.exists(object_path(self.data_dir, digest))


class ObjectWriter:
    """Writes objects into a store's data directory, once each.

    A new object is created with ``O_EXCL`` under its final name: a publish
    killed mid-write can leave a short file, which no committed catalog names
    yet; the next writer of that object sees the wrong size and replaces it
    (through a temporary name).  Equal size with other content cannot come
    from a killed write (the page cache keeps a prefix), and is caught by
    readers' verification anyway.
    """

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = str(data_dir)
        self._known: set[str] = set()
        self.written_objects = 0
        self.written_bytes = 0

    def put(self, data: bytes | memoryview, digest: str | None = None) -> str:
        """Store ``data`` unless present; return its name.

        ``digest`` may be passed when the caller already hashed ``data``.
        """
        if digest is None:
            digest = digest_of(data)
        if digest in self._known:
            return digest
        final = f"{self._data_dir}/{digest[:2]}/{digest}"
        try:
            fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if os.stat(final).st_size != len(data):
                self._replace(final, data)
        else:
            try:
                self._write_all(fd, data)
            finally:
                os.close(fd)
            self.written_objects += 1
            self.written_bytes += len(data)
        self._known.add(digest)
        return digest

    @staticmethod
    def _write_all(fd: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _replace(self, final: str, data: bytes | memoryview) -> None:
        # Not fsynced here: the publisher syncs the file system before it commits.
        write_file_atomic(Path(final), data, durable=False)
        self.written_objects += 1
        self.written_bytes += len(data)


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding ``path`` to disk (``syncfs``: that file
    system only, not the whole machine as ``sync`` would).

    Raises:
        OSError: ``path`` cannot be opened, or the flush failed (EIO, ...).
    """
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
