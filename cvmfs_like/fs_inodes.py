"""Inode numbers of the mount: one per directory path, one per file content.

The kernel keys its page cache, attributes and open files by inode number.
A revision's files are immutable, so a file's inode number is tied to its
content, not its path: a file whose content changes in a new revision gets a
new number, and a reader that has the old one open keeps reading the old
content (its inode still maps to the old entry) without any open callback.
Hard links (the same catalog inode and content) share one number.  A
directory keeps its number across revisions; its listing and attributes are
invalidated by the adapter at a revision switch.

Pure bookkeeping, no FUSE: ``node(ino)`` and ``ino_for(...)`` on an existing
key take no lock (a dict read); only allocating a new number takes the
table's lock.  Numbers are never reused within a mount.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable
from dataclasses import dataclass

from cvmfs_like.catalog import Entry

ROOT_INO = 1  # FUSE_ROOT_ID
STREAM_BIT = 1 << 62  # numbers of files read without the page cache (mirrors _fusell.c)


@dataclass
class Node:
    """What one inode number stands for."""

    path: bytes  # the path it was first seen at (directories: their path)
    entry: Entry
    stream: bool = False
    handle: int | None = None  # an open handle kept for the inode's lifetime (chunked files)


def content_key(entry: Entry, revision: int | None = None) -> Hashable:
    """What makes two file entries the same inode.

    ``revision`` is given for chunked files, whose content is their chunk list
    (not a column of the entry): such a file is a new inode in each revision.
    """
    return (
        "f",
        entry.ino,
        entry.object,
        entry.size,
        entry.mode,
        entry.mtime_ns,
        entry.nlink,
        entry.target,
        revision if entry.chunked else None,
    )


class InodeTable:
    """Inode number <-> (directory path | file content) of one mount."""

    def __init__(self, root: Entry) -> None:
        self._nodes: dict[int, Node] = {ROOT_INO: Node(b"", root)}
        self._keys: dict[Hashable, int] = {("d", b""): ROOT_INO}
        self._next = itertools.count(ROOT_INO + 1)
        self._lock = threading.Lock()

    def node(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def dir_ino(self, path: bytes) -> int | None:
        """The number of directory ``path`` if the kernel may know it."""
        return self._keys.get(("d", path))

    def ino_for(self, key: Hashable, make: Node) -> tuple[int, Node]:
        """The number for ``key``, allocated (standing for ``make``) if new.

        Returns the number and the node it stands for (``make`` only if new).
        """
        ino = self._keys.get(key)
        if ino is not None:
            return ino, self._nodes[ino]
        with self._lock:
            ino = self._keys.get(key)
            if ino is not None:
                return ino, self._nodes[ino]
            ino = next(self._next) | (STREAM_BIT if make.stream else 0)
            self._nodes[ino] = make
            self._keys[key] = ino
            return ino, make

    def __len__(self) -> int:
        return len(self._nodes)
