"""A node's mount: several repositories and their VM images under one root.

::

    MOUNT/NAME/...                          the current revision of repository NAME
    MOUNT/.images/NAME/IMAGE/VERSION        a VM image signed by NAME (site policy applied)

:class:`Namespace` offers the same interface as :class:`MountedRelease`
(``lookup``, ``list_dir``, ``open``, ``read_pieces``, ``read``, ``release``),
so the FUSE adapter serves either.  It only routes: a repository's entries
come from its ``MountedRelease`` with the inode number tagged by the
repository's slot in the top 7 of 63 bits (inode numbers are per path within
a repository, so two repositories would otherwise collide); image bytes come
from an injected :class:`ImageFile`, which returns only verified bytes.

Invariants: repositories and images are added and removed atomically (one
dict swap), so a reader sees either the old or the new set; a file handle
keeps the repository or image it was opened on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import stat
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from cvmfs_like.catalog import Entry
from cvmfs_like.exceptions import ReleaseError
from cvmfs_like.mounted import MountedRelease, OpenFile

IMAGES_DIR = b".images"
_SLOT_SHIFT = 56
_INNER = (1 << _SLOT_SHIFT) - 1
_IMAGES_SLOT = 127
_DIR_MODE = stat.S_IFDIR | 0o555
_FILE_MODE = stat.S_IFREG | 0o444


class ImageFile(Protocol):
    """One VM image as the mount serves it."""

    size: int
    published: int  # unix seconds: the file's mtime

    def read(self, offset: int, size: int) -> bytes:
        """Verified bytes, fetched first if missing (blocks).

        Raises:
            ObjectUnavailable: the bytes could not be had in time.
        """
        ...

    def xattrs(self) -> dict[str, bytes]: ...


@dataclass
class _OpenImage:
    image: ImageFile
    entry: Entry


def _synthetic_ino(path: bytes) -> int:
    inner = int.from_bytes(hashlib.blake2b(path, digest_size=7).digest(), "big") | 1
    return (_IMAGES_SLOT << _SLOT_SHIFT) | inner


def _dir_entry(path: bytes, mtime_ns: int) -> Entry:
    name = path.rpartition(b"/")[2]
    ino = 1 if path == b"" else _synthetic_ino(path)
    return Entry(path, name, _DIR_MODE, 0, mtime_ns, ino, 2)


class Namespace:
    """The root of a node's mount (see the module docstring)."""

    name = "node"

    def __init__(self) -> None:
        self._repos: dict[bytes, tuple[int, MountedRelease]] = {}
        self._slots: dict[int, MountedRelease] = {}
        self._next_slot = itertools.count(1)
        self._images: dict[bytes, ImageFile] = {}  # "NAME/IMAGE/VERSION" -> image
        self._image_dirs: dict[bytes, list[Entry]] = {}
        self._lock = threading.Lock()
        self._handles: dict[int, tuple[int, int] | _OpenImage] = {}
        self._fh = itertools.count(1)
        self._started_ns = time.time_ns()

    # -- contents --------------------------------------------------------------

    def set_repository(self, name: str, mounted: MountedRelease) -> None:
        key = name.encode()
        with self._lock:
            old = self._repos.get(key)
            slot = old[0] if old is not None else next(self._next_slot)
            if slot >= _IMAGES_SLOT:
                raise ReleaseError("too many repositories in one mount (at most 126)")
            repos = dict(self._repos)
            repos[key] = (slot, mounted)
            self._slots[slot] = mounted
            self._repos = repos

    def repositories(self) -> dict[str, MountedRelease]:
        return {k.decode(): m for k, (_, m) in self._repos.items()}

    def set_images(self, images: dict[tuple[str, str, str], ImageFile]) -> list[bytes]:
        """Replace the set of visible images; returns the paths that changed."""
        table = {f"{r}/{i}/{v}".encode(): img for (r, i, v), img in images.items()}
        dirs: dict[bytes, list[Entry]] = {b"": []}
        for path, img in sorted(table.items()):
            parts = path.split(b"/")
            for depth in range(1, len(parts)):
                parent = b"/".join(parts[: depth - 1])
                here = b"/".join(parts[:depth])
                if here not in dirs:
                    dirs[here] = []
                    dirs[parent].append(_dir_entry(IMAGES_DIR + b"/" + here, self._started_ns))
            dirs[b"/".join(parts[:-1])].append(self._image_entry(path, img))
        with self._lock:
            changed = set(table) ^ set(self._images)
            changed |= {p for p in table if p in self._images and table[p] is not self._images[p]}
            self._images = table
            self._image_dirs = dirs
        out: set[bytes] = set()
        for p in changed:
            parts = p.split(b"/")
            out.update(IMAGES_DIR + b"/" + b"/".join(parts[:d]) for d in range(1, len(parts) + 1))
        return sorted(out | {IMAGES_DIR})

    @staticmethod
    def _image_entry(path: bytes, img: ImageFile) -> Entry:
        full = IMAGES_DIR + b"/" + path
        return Entry(
            full,
            path.rpartition(b"/")[2],
            _FILE_MODE,
            img.size,
            img.published * 1_000_000_000,
            _synthetic_ino(full),
            1,
        )

    # -- lookups ----------------------------------------------------------------

    @staticmethod
    def _tag(entry: Entry, slot: int) -> Entry:
        return dataclasses.replace(entry, ino=(slot << _SLOT_SHIFT) | (entry.ino & _INNER))

    def lookup(self, path: bytes) -> Entry | None:
        if path == b"":
            return _dir_entry(b"", self._started_ns)
        head, _, rest = path.partition(b"/")
        if head == IMAGES_DIR:
            return self._image_lookup(rest)
        found = self._repos.get(head)
        if found is None:
            return None
        slot, mounted = found
        e = mounted.lookup(rest)
        if e is None:
            return None
        e = self._tag(e, slot)
        if rest == b"":
            e = dataclasses.replace(e, name=head)
        return e

    def _image_lookup(self, rest: bytes) -> Entry | None:
        if rest == b"":
            return _dir_entry(IMAGES_DIR, self._started_ns)
        if rest in self._image_dirs:
            return _dir_entry(IMAGES_DIR + b"/" + rest, self._started_ns)
        img = self._images.get(rest)
        return None if img is None else self._image_entry(rest, img)

    def list_dir(self, path: bytes) -> list[Entry]:
        if path == b"":
            out = [_dir_entry(IMAGES_DIR, self._started_ns)]
            for key, (slot, mounted) in sorted(self._repos.items()):
                try:
                    root = mounted.lookup(b"")
                except ReleaseError:
                    continue  # not loaded yet: absent rather than an error for all
                if root is not None:
                    out.append(dataclasses.replace(self._tag(root, slot), name=key, path=key))
            return out
        head, _, rest = path.partition(b"/")
        if head == IMAGES_DIR:
            return list(self._image_dirs.get(rest, []))
        found = self._repos.get(head)
        if found is None:
            return []
        slot, mounted = found
        return [self._tag(e, slot) for e in mounted.list_dir(rest)]

    # -- content -----------------------------------------------------------------

    def open(self, entry: Entry) -> int:
        slot = entry.ino >> _SLOT_SHIFT
        fh = next(self._fh)
        if slot == _IMAGES_SLOT:
            img = self._images.get(entry.path[len(IMAGES_DIR) + 1 :])
            if img is None:
                raise ReleaseError(f"image {entry.path.decode(errors='replace')} is gone")
            self._handles[fh] = _OpenImage(img, entry)
            return fh
        mounted = self._slots[slot]
        inner = mounted.open(dataclasses.replace(entry, ino=entry.ino & _INNER))
        self._handles[fh] = (slot, inner)
        return fh

    @staticmethod
    def streams(entry: Entry) -> bool:
        """An image: read without the kernel's page cache and read-ahead, so a
        cold scattered read asks the swarm for what it reads, not for the
        kernel's read-ahead window; the node does its own read-ahead for
        sequential readers."""
        return entry.ino >> _SLOT_SHIFT == _IMAGES_SLOT

    def open_file(self, fh: int) -> OpenFile:
        h = self._handles[fh]
        if isinstance(h, _OpenImage):
            return OpenFile(h.entry, 0, [], [])
        return self._slots[h[0]].open_file(h[1])

    def cached_paths(self, entry: Entry, digests: list[str]) -> tuple[list[str], bool] | None:
        """See :meth:`MountedRelease.cached_paths` (of ``entry``'s
        repository); None for an image."""
        slot = self._slots.get(entry.ino >> _SLOT_SHIFT)
        return None if slot is None else slot.cached_paths(entry, digests)

    def read_pieces(self, fh: int, offset: int, size: int) -> list[tuple[int, int, int]] | bytes:
        """Descriptor pieces for repository files; the bytes themselves for images."""
        h = self._handles[fh]
        if isinstance(h, _OpenImage):
            end = min(offset + size, h.image.size)
            return b"" if offset >= end else h.image.read(offset, end - offset)
        return self._slots[h[0]].read_pieces(h[1], offset, size)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handles[fh]
        if isinstance(h, _OpenImage):
            got = self.read_pieces(fh, offset, size)
            assert isinstance(got, bytes)
            return got
        return self._slots[h[0]].read(h[1], offset, size)

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and not isinstance(h, _OpenImage):
            self._slots[h[0]].release(h[1])

    # -- what the FUSE adapter shows beside content ---------------------------------------

    def statfs(self) -> tuple[int, int]:
        total = files = 0
        for _, mounted in self._repos.values():
            t, f = mounted.statfs()
            total += t
            files += f
        return total + sum(i.size for i in self._images.values()), files + len(self._images)

    def xattrs(self, entry: Entry) -> dict[str, bytes]:
        slot = entry.ino >> _SLOT_SHIFT
        if slot == _IMAGES_SLOT:
            img = self._images.get(entry.path[len(IMAGES_DIR) + 1 :])
            return {} if img is None else img.xattrs()
        mounted = self._slots.get(slot)
        if mounted is None:  # the root (slot 0)
            return {}
        return mounted.xattrs(dataclasses.replace(entry, ino=entry.ino & _INNER))

    def update(self) -> object:
        raise ReleaseError("the node daemon updates its repositories itself")

    def status(self) -> dict[str, object]:
        return {
            "repositories": {n.decode(): m.status() for n, (_, m) in self._repos.items()},
            "images": sorted(p.decode() for p in self._images),
            "open_files": len(self._handles),
        }
