"""The read-only FUSE filesystem: a thin adapter over :class:`MountedRelease`.

Only this module imports the FUSE binding, the project's own C extension
``cvmfs_like._fusell`` over libfuse 3's low-level API (``_fusell.c``).  It maps
domain errors to errnos (ENOENT for absent paths, EIO with a log line naming
the object for bytes that fail verification or cannot be fetched, EROFS for
writes) and lets the kernel answer the hot path on its own, because a
revision's content is immutable:

* inode numbers follow content (:mod:`cvmfs_like.fs_inodes`): a file changed
  by a new revision is a new inode, so the kernel's page cache is never
  stale and a file open across a revision switch keeps reading its revision;
* no OPEN or OPENDIR requests: both are answered ENOSYS once, after which the
  kernel opens files and directories itself, keeps page caches and caches
  directory listings (a node's mount, which serves VM images without the
  page cache, answers OPEN in C instead: ``keep_cache``, or ``direct_io`` for
  an image);
* listings are kept in C after Python's first answer, so READDIR of a
  directory listed before, and LOOKUP of a name in it (there or absent), are
  answered without Python after the kernel dropped its caches; a revision
  switch drops them all;
* READDIRPLUS always (a listing fills the kernel's dentries and attributes),
  long entry and attribute timeouts, negative entries cached until a revision
  switch invalidates them with ``notify_inval_entry`` (so a name added by a
  new revision appears at once), listings and attributes of changed
  directories dropped with ``notify_inval_inode``;
* reads come as requests of up to 992 KiB (4 MiB read-ahead; the largest
  whose splice fits a pipe of ``fs.pipe-max-size``, 1 MiB) and are spliced
  to the kernel from descriptors of verified cached objects: the first read of an
  inode opens (fetching and verifying if needed) its objects in Python and
  hands duplicates of the descriptors to the C table, which answers the
  inode's later reads without the GIL or a global lock until the kernel
  forgets the inode.

Setting ``SWARM_FUSE_ADAPTER=mfusepy`` mounts with the previous high-level
adapter (:mod:`cvmfs_like.fs_mfusepy`), kept for the benchmark's comparison.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvmfs_like import _fusell
from cvmfs_like.cache import MOUNT_THREADS
from cvmfs_like.catalog import Entry
from cvmfs_like.exceptions import ObjectUnavailable, ObjectVerificationError, ReleaseError
from cvmfs_like.fs_inodes import InodeTable, Node, content_key
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.namespace import Namespace

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.swarm."
_XATTR_PREFIX_B = XATTR_PREFIX.encode()
ADAPTER_ENV = "SWARM_FUSE_ADAPTER"
AHEAD_BYTES = 64 << 20  # of a large file, opened ahead of its reader (see _read_ahead)
# The kernel's read-ahead window, in four READs of _fusell's READ_MAX (992 KiB):
# a window of 4 MiB would end each in a fifth READ of 128 KiB.
READ_AHEAD_KB = 4 * 992
Attr = tuple[int, int, int, int, int]  # (ino, mode, nlink, size, mtime_ns): what _fusell reads


def log_read_failure(path: str, exc: ObjectVerificationError | ObjectUnavailable) -> None:
    """The log line a reader's EIO corresponds to: which object, and why."""
    what = "failed verification" if isinstance(exc, ObjectVerificationError) else "unavailable"
    log.error(
        "EIO on %s: object %s %s: %s",
        path,
        exc.digest,
        what,
        exc.reason,
        extra={"object": exc.digest},
    )


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class ReleaseOperations:
    """The low-level operations of one mounted repository (or a node's namespace).

    The methods named after FUSE requests are called by ``_fusell`` from its
    worker threads; each returns its answer or an int, the errno to reply.
    """

    def __init__(
        self,
        mounted: MountedRelease | Namespace,
        *,
        ttl: float | None = 60.0,
        control_socket: Path | None = None,
        on_ready: Callable[[], None] | None = None,
        read_ahead_kb: int = READ_AHEAD_KB,
    ) -> None:
        self.mounted = mounted
        self.read_ahead_kb = read_ahead_kb
        self.mountpoint: Path | None = None
        self.ttl = ttl
        self.control_socket = control_socket
        self._on_ready = on_ready
        self.session: Any = None  # the _fusell.Session once mounted
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: socket.socket | None = None
        self._inodes: InodeTable | None = None
        # Chunk read-ahead of large files (see _read_ahead): files in flight.
        self._ahead: set[int] = set()
        self._ahead_pool = concurrent.futures.ThreadPoolExecutor(2, "swarm-read-ahead")
        self.ready = threading.Event()

    # -- lifecycle ---------------------------------------------------------------

    def inodes(self) -> InodeTable:
        if self._inodes is None:
            root = self.mounted.lookup(b"")
            if root is None:
                raise ReleaseError(f"{self.mounted.name}: no root directory")
            self._inodes = InodeTable(root)
        return self._inodes

    def init(self) -> None:
        if self.ttl is not None:  # else the owner (the node daemon) updates
            updater = threading.Thread(target=self._update_loop, name="swarm-update", daemon=True)
            self._threads.append(updater)
            updater.start()
        if self.control_socket is not None:
            self._start_control()
        tuner = threading.Thread(target=self._tune_read_ahead, name="swarm-tune", daemon=True)
        self._threads.append(tuner)
        tuner.start()

    def _tune_read_ahead(self) -> None:
        """Raise the mount's read-ahead so sequential reads come in requests
        of almost 1 MiB (the kernel offers FUSE 128 KiB); then report readiness.

        Runs once the mount answers (a stat from inside ``init`` would
        deadlock).  Best effort: needs root.
        """
        if self.mountpoint is not None:
            try:
                dev = os.stat(self.mountpoint).st_dev
                knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
                knob.write_text(str(self.read_ahead_kb))
            except OSError as exc:
                log.info("read-ahead left at the kernel default: %s", exc)
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self) -> None:
        self._stop.set()
        self._ahead_pool.shutdown(wait=False, cancel_futures=True)
        if self._server is not None:
            self._server.close()
        if self.control_socket is not None:
            self.control_socket.unlink(missing_ok=True)

    def _update_loop(self) -> None:
        assert self.ttl is not None
        while not self._stop.wait(self.ttl):
            self.check_now()

    def check_now(self) -> dict[str, Any]:
        if not isinstance(self.mounted, MountedRelease):
            return {"error": "this mount is updated by its node daemon"}
        result = self.mounted.update()
        if result.changed:
            self.invalidate(result.changed_paths)
        return {
            "changed": result.changed,
            "revision": result.revision,
            "changed_paths": len(result.changed_paths),
            "error": result.error,
        }

    def invalidate(self, paths: list[bytes]) -> None:
        """Drop what the kernel holds of ``paths``: their dentries (negative
        ones too: a name a new revision adds appears at once) and the listing
        and attributes of their directories.  Inodes of changed files need
        nothing: the new content has a new number."""
        session, table = self.session, self._inodes
        if session is None or table is None:
            return
        # First the listings kept in C (any may have changed), so that what
        # the kernel asks again below is answered from the new revision.
        session.drop_listings()
        dirs: set[int] = set()
        for p in paths:
            parent, _, name = p.rpartition(b"/")
            pino = table.dir_ino(parent)
            if pino is not None:
                if name:
                    # -ENOENT: the kernel holds no such dentry; nothing to drop.
                    session.inval_entry(pino, name)
                dirs.add(pino)
            dino = table.dir_ino(p)
            if dino is not None:
                dirs.add(dino)
        for ino in dirs:
            session.inval_inode(ino, 0, 0)

    # -- control socket: `swarm status` / `swarm reload` -------------------------

    def _start_control(self) -> None:
        assert self.control_socket is not None
        self.control_socket.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.control_socket))
        os.chmod(self.control_socket, 0o600)
        server.listen(8)
        self._server = server
        t = threading.Thread(target=self._serve_control, name="swarm-control", daemon=True)
        self._threads.append(t)
        t.start()

    def _serve_control(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                try:
                    command = conn.makefile("r").readline().strip()
                    reply = self.control(command)
                except Exception as exc:  # a bad client must not stop the mount
                    reply = {"error": str(exc)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def control(self, command: str) -> dict[str, Any]:
        if command == "status":
            return self.mounted.status()
        if command == "reload":
            return self.check_now()
        if command == "counters":
            return self.counters()
        return {"error": f"unknown command {command!r} (status, reload, counters)"}

    def counters(self) -> dict[str, int]:
        """Requests that reached this process, by kind (tests and the bench),
        and ``ahead``: large files whose next chunks are being opened."""
        if self.session is None:
            return {}
        return {**self.session.counters(), "ahead": len(self._ahead)}

    # -- metadata: called by _fusell -------------------------------------------------

    def _lookup_path(self, path: bytes) -> Entry | int | None:
        try:
            return self.mounted.lookup(path)
        except ReleaseError as exc:
            log.error("EIO on /%s: catalog unavailable: %s", os.fsdecode(path), exc)
            return errno.EIO

    def _attr(self, path: bytes, e: Entry) -> Attr:
        """The kernel's view of entry ``e`` at ``path``, allocating its number."""
        table = self.inodes()
        if e.is_dir:
            ino, _ = table.ino_for(("d", path), Node(path, e))
        elif e.chunked:
            # The content is the chunk list of the revision the entry came
            # from; the handle keeps that list for the inode's lifetime.
            fh = self.mounted.open(e)
            rev = self.mounted.open_file(fh).revision
            ino, node = table.ino_for(content_key(e, rev), Node(path, e, handle=fh))
            if node.handle != fh:
                self.mounted.release(fh)
        else:
            stream = self.mounted.streams(e)
            ino, _ = table.ino_for(content_key(e), Node(path, e, stream=stream))
        return (ino, e.mode, e.nlink, e.size, e.mtime_ns)

    def lookup(self, parent: int, name: bytes) -> Attr | int | None:
        pnode = self.inodes().node(parent)
        if pnode is None:
            return errno.ESTALE
        path = _join(pnode.path, name)
        e = self._lookup_path(path)
        if e is None or isinstance(e, int):
            return e
        try:
            attr = self._attr(path, e)
        except ReleaseError as exc:  # a chunked file's chunk list
            log.error("EIO on /%s: catalog unavailable: %s", os.fsdecode(path), exc)
            return errno.EIO
        if e.is_file and self.session is not None:
            self._name_objects(attr[0], e)
        return attr

    def _name_objects(self, ino: int, e: Entry) -> None:
        """A file looked up by name is about to be read, more often than not:
        name its cached objects to C, which opens them on the reads that need
        them, and those ahead of the reader, without coming back here (a
        dropped page cache's readers)."""
        if e.chunked:
            node = self.inodes().node(ino)
            if node is None or node.handle is None:
                return
            of = self.mounted.open_file(node.handle)
            digests, offsets = [c.object for c in of.chunks], [*of.offsets, e.size]
        elif e.object is not None:
            digests, offsets = [e.object], [0, e.size]
        else:
            return
        got = self.mounted.cached_paths(e, digests)
        if got is not None and self.session is not None:
            self.session.set_paths(ino, [os.fsencode(p) for p in got[0]], offsets, got[1])

    def _current(self, ino: int) -> tuple[Node, Entry] | int:
        """An inode's node and its entry now: a directory's attributes follow
        the current revision, a file's are those of its content."""
        node = self.inodes().node(ino)
        if node is None:
            return errno.ESTALE
        if not node.entry.is_dir:
            return node, node.entry
        e = self._lookup_path(node.path)
        if e is None:
            return errno.ENOENT
        if isinstance(e, int):
            return e
        return node, e

    def getattr(self, ino: int) -> Attr | int:
        found = self._current(ino)
        if isinstance(found, int):
            return found
        _, e = found
        return (ino, e.mode, e.nlink, e.size, e.mtime_ns)

    def readdir(self, ino: int) -> list[tuple[bytes, Attr]] | int:
        found = self._current(ino)
        if isinstance(found, int):
            return found
        node, e = found
        if not e.is_dir:
            return errno.ENOTDIR
        try:
            entries = self.mounted.list_dir(node.path)
            return [(c.name, self._attr(_join(node.path, c.name), c)) for c in entries]
        except (ObjectVerificationError, ObjectUnavailable) as exc:
            log_read_failure(os.fsdecode(node.path), exc)
            return errno.EIO
        except ReleaseError as exc:
            log.error("EIO on /%s: catalog unavailable: %s", os.fsdecode(node.path), exc)
            return errno.EIO

    def readlink(self, ino: int) -> bytes | int:
        node = self.inodes().node(ino)
        if node is None:
            return errno.ESTALE
        if node.entry.target is None:
            return errno.EINVAL
        return node.entry.target

    def forget(self, inos: list[int]) -> None:
        # The kernel dropped these inodes (the C table already closed its
        # descriptors).  A chunked file's handle stays: it holds the chunk
        # list of the inode's revision, needed if the number is looked up again.
        del inos

    def statfs(self) -> tuple[int, int] | int:
        try:
            return self.mounted.statfs()
        except ReleaseError:
            return errno.EIO

    # -- content ----------------------------------------------------------------------

    def read(self, ino: int, size: int, offset: int, register: bool = True) -> bytes | int | None:
        """Open what a read of ``ino`` needs and hand it to the C table
        (returns None), or the bytes themselves (images, empty files, and
        always with ``register=False``: the table lost the descriptors to
        other registrations before it could answer)."""
        node = self.inodes().node(ino)
        if node is None:
            return errno.ESTALE
        e = node.entry
        if not e.is_file:
            return errno.EISDIR if e.is_dir else errno.EINVAL
        if offset >= e.size:
            return b""
        mounted = self.mounted
        try:
            if node.stream:
                if node.handle is None:
                    node.handle = mounted.open(e)
                got = mounted.read_pieces(node.handle, offset, size)
                return got if isinstance(got, bytes) else errno.EIO
            fh = node.handle if node.handle is not None else mounted.open(e)
            try:
                mounted.read_pieces(fh, offset, size)  # fetches and verifies what is missing
                if not register or not self._register(ino, fh):
                    return mounted.read(fh, offset, size)
            finally:
                if node.handle is None:
                    mounted.release(fh)
        except (ObjectVerificationError, ObjectUnavailable) as exc:
            log_read_failure("/" + os.fsdecode(node.path), exc)
            return errno.EIO
        except OSError as exc:
            log.error("EIO on /%s: %s", os.fsdecode(node.path), exc)
            return errno.EIO
        if node.handle is not None:
            self._read_ahead(ino, node, offset + size)
        return None

    def _register(self, ino: int, fh: int) -> bool:
        """Hand the C table duplicates of the descriptors ``fh`` has open;
        False when it cannot have them (out of descriptors, or unmounted)."""
        session = self.session
        if session is None:
            return False
        of = self.mounted.open_file(fh)
        fds: list[int] = []
        try:
            for i in range(len(of.chunks)):
                fds.append(os.dup(of.fds[i]) if i in of.fds else -1)
        except OSError as exc:  # EMFILE: the reader still gets its bytes
            log.warning("read table not filled (%s); reading through Python", exc)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            return False
        session.set_fds(ino, fds, [*of.offsets, of.entry.size])
        return True

    def _read_ahead(self, ino: int, node: Node, end: int) -> None:
        """Open the chunks after the one a read of a chunked file ended in, in
        the background: by the time the reader gets there their objects are
        verified, their pages are on their way (``POSIX_FADV_WILLNEED``) and
        their descriptors are in the C table.  The chunks starting in the next
        ``AHEAD_BYTES`` are opened, one background job per file at a time: the
        reads the C table serves never come here to ask for more, so the
        window must hold the reader until its next miss."""
        assert node.handle is not None
        if ino in self._ahead:
            return
        of = self.mounted.open_file(node.handle)
        here = bisect.bisect_right(of.offsets, end) - 1  # the chunk holding the next byte
        last = bisect.bisect_right(of.offsets, end + AHEAD_BYTES) - 1
        todo = [i for i in range(here, min(last + 1, len(of.chunks))) if i not in of.fds]
        if todo:
            self._ahead.add(ino)
            self._ahead_pool.submit(self._open_ahead, ino, node, [of.offsets[i] for i in todo])

    def _open_ahead(self, ino: int, node: Node, offsets: list[int]) -> None:
        try:
            assert node.handle is not None
            for offset in offsets:
                self.mounted.read_pieces(node.handle, offset, 1)
                self._register(ino, node.handle)
        except (ObjectVerificationError, ObjectUnavailable, OSError, ReleaseError) as exc:
            # The reader meets the same failure, with its log line, when it gets there.
            log.debug("read-ahead of /%s stopped: %s", os.fsdecode(node.path), exc)
        finally:
            self._ahead.discard(ino)

    # -- extended attributes -----------------------------------------------------------

    def _xattrs(self, ino: int) -> dict[str, bytes] | int:
        found = self._current(ino)
        if isinstance(found, int):
            return found
        node, e = found
        out = self.mounted.xattrs(e)
        if node.path == b"" and self.control_socket is not None:
            out["control"] = os.fsencode(self.control_socket)
        return out

    def listxattr(self, ino: int) -> bytes | int:
        found = self._xattrs(ino)
        if isinstance(found, int):
            return found
        return b"".join(_XATTR_PREFIX_B + k.encode() + b"\0" for k in found)

    def getxattr(self, ino: int, name: bytes) -> bytes | int:
        if not name.startswith(_XATTR_PREFIX_B):
            return errno.ENODATA
        found = self._xattrs(ino)
        if isinstance(found, int):
            return found
        value = found.get(name[len(_XATTR_PREFIX_B) :].decode(errors="replace"))
        return errno.ENODATA if value is None else value


def mount(
    ops: ReleaseOperations,
    mountpoint: Path,
    *,
    foreground: bool = True,
    debug: bool = False,
    entry_timeout: float = 86400.0,
    negative_timeout: float = 30.0,
    threads: int = MOUNT_THREADS,
) -> None:
    """Mount and serve until unmounted (blocks), with up to ``threads`` worker
    threads (give the mount's caches ``FetchGate.for_threads(threads)``).

    ``negative_timeout`` bounds how long the kernel keeps a name's absence;
    a revision switch drops the absences it changes sooner.  Stops on
    SIGINT/SIGTERM/SIGHUP when called from the main thread.

    Raises:
        ReleaseError: the mount point is unusable or libfuse failed.
    """
    if not mountpoint.is_dir():
        raise ReleaseError(f"mount point {mountpoint} is not a directory")
    if os.environ.get(ADAPTER_ENV) == "mfusepy":
        _mount_mfusepy(ops, mountpoint, entry_timeout, negative_timeout, threads)
        return
    ops.mountpoint = mountpoint
    ops.inodes()
    options = [
        "ro",
        "nosuid",
        "nodev",
        "default_permissions",
        f"fsname=swarm:{ops.mounted.name}",
        "subtype=swarm",
    ]
    if os.geteuid() == 0:
        options.append("allow_other")
    if debug:
        options.append("debug")
    try:
        session = _fusell.Session(
            ops,
            str(mountpoint),
            [arg for opt in options for arg in ("-o", opt)],
            entry_timeout,
            negative_timeout,
            # A node's mount serves VM images without the page cache, which
            # needs an OPEN reply per file (answered in C).
            not isinstance(ops.mounted, Namespace),
            threading.current_thread() is threading.main_thread(),
            # Half the process's descriptors at most: the rest are the
            # cache's, libtorrent's, the catalogs' and the sockets'.
            resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2,
        )
    except RuntimeError as exc:
        raise ReleaseError(f"FUSE mount of {mountpoint} failed: {exc}") from exc
    ops.session = session
    try:
        session.loop(threads)
    finally:
        ops.session = None
    del foreground  # always served in the calling thread


def _mount_mfusepy(
    ops: ReleaseOperations,
    mountpoint: Path,
    entry_timeout: float,
    negative_timeout: float,
    threads: int,
) -> None:
    """The previous adapter, for the benchmark's comparison only."""
    from cvmfs_like import fs_mfusepy

    old = fs_mfusepy.ReleaseOperations(
        ops.mounted,
        ttl=ops.ttl,
        control_socket=ops.control_socket,
        on_ready=ops._on_ready,
        read_ahead_kb=ops.read_ahead_kb,
    )
    fs_mfusepy.mount(
        old,
        mountpoint,
        entry_timeout=entry_timeout,
        negative_timeout=negative_timeout,
        threads=threads,
    )


def is_swarm_mount(fstype: str) -> bool:
    return fstype == "fuse.swarm"
