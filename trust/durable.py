"""Replacing a file atomically, and making it durable: the one implementation.

:func:`write_file_atomic` writes the new content under a temporary name in
the same directory and renames it over the file, so a reader, or whoever
looks after a crash, finds the old content or the new one, never a part.
With ``durable`` (the default) the data is fsynced before the rename and
the directory after it, so once it returns the new content survives a power
loss.  Without, the caller makes it durable later (``syncfs`` before a
publish commits, the object cache's clean close) or can afford to lose it
(a cached object is verified again on its first use after an unclean stop).

Temporary names start with ``.tmp-`` (process id, a counter, the file's
name): unique among threads and processes, never a name a store or cache
serves, and what their recovery removes (``cvmfs_like/cache.py``,
``cvmfs_like/retention.py``).  A failed write removes its temporary file.

In ``trust``, the bottom layer, so keys, the origin store, the node cache and
``swarm`` share it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

_counter = itertools.count()


def temporary_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (``.tmp-PID-N-NAME``)."""
    return path.with_name(f".tmp-{os.getpid()}-{next(_counter)}-{path.name}")


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable.

    Raises:
        OSError: the directory cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make the content of the file ``path`` durable (one written by others).

    Raises:
        OSError: the file cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(
    path: Path, data: bytes | memoryview, *, mode: int = 0o644, durable: bool = True
) -> None:
    """Replace ``path`` by ``data`` atomically (see the module docstring);
    ``mode`` is that of a new file, less the umask.

    Raises:
        OSError: the file or the directory cannot be written; ``path`` then
            still has its old content (or is still absent).
    """
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
