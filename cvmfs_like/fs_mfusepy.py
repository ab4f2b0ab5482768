"""The previous FUSE adapter, over mfusepy's high-level API: kept only so the
benchmark can compare it with :mod:`cvmfs_like.fs` (``SWARM_FUSE_ADAPTER=mfusepy``,
see ``fs.mount``).  Nothing else uses it.

Only this module imports mfusepy.  It maps domain errors to errnos (ENOENT for
absent paths, EIO for objects that fail verification or cannot be fetched,
EROFS for writes) and uses the kernel caches hard, because a revision's
content is immutable:

* long entry and attribute timeouts, READDIRPLUS (one readdir fills the
  kernel's dentries and attributes of a whole directory) and cached readdir;
* page cache kept across opens of the same content (``keep_cache``); a file
  whose content changed in a new revision is opened without it, which drops
  the stale pages; while an older revision's copy is still open, the new one
  is opened ``direct_io`` so the two never share pages;
* on a revision switch the changed paths are invalidated with
  ``fuse_invalidate_path``.  Negative entries expire after
  ``negative_timeout`` (libfuse cannot invalidate a name it never knew), so a
  newly added name appears at most that long after the switch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mfusepy

from cvmfs_like.cache import MOUNT_THREADS
from cvmfs_like.catalog import Entry
from cvmfs_like.exceptions import ObjectUnavailable, ObjectVerificationError, ReleaseError
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.namespace import Namespace

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.swarm."
_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags
_READDIR_PLUS = 1  # enum fuse_readdir_flags

_libfuse: Any = mfusepy._libfuse
_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]
_BUF_IS_FD = 1 << 1
_BUF_FD_SEEK = 1 << 2


class _FuseBuf(ctypes.Structure):
    """``struct fuse_buf`` of libfuse 3."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


def _bufvec_type(n: int) -> Any:
    """``struct fuse_bufvec`` with room for ``n`` buffers (its array is inline)."""

    class _FuseBufvec(ctypes.Structure):
        _fields_ = [
            ("count", ctypes.c_size_t),
            ("idx", ctypes.c_size_t),
            ("off", ctypes.c_size_t),
            ("buf", _FuseBuf * max(n, 1)),
        ]

    return _FuseBufvec


_BUFVEC_TYPES = [_bufvec_type(n) for n in range(1, 9)]
_libfuse.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_libfuse.fuse_invalidate_path.restype = ctypes.c_int


def _path(raw: bytes | str) -> bytes:
    """FUSE's ``/a/b`` to the catalog's ``a/b``."""
    b = raw if isinstance(raw, bytes) else os.fsencode(raw)
    return b[1:]


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


class ReleaseOperations(mfusepy.Operations):  # type: ignore[misc]
    """fusepy-style operations of one mounted repository."""

    use_ns = True

    def __init__(
        self,
        mounted: MountedRelease | Namespace,
        *,
        ttl: float | None = 60.0,
        control_socket: Path | None = None,
        on_ready: Callable[[], None] | None = None,
        read_ahead_kb: int = 4096,
    ) -> None:
        self.mounted = mounted
        self.read_ahead_kb = read_ahead_kb
        self.mountpoint: Path | None = None
        self.ttl = ttl
        self.control_socket = control_socket
        self._on_ready = on_ready
        self._fuse_ptr: int | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._page_content: dict[bytes, str] = {}
        self._open_content: dict[bytes, Counter[str]] = {}
        self._fh_path: dict[int, tuple[bytes, str]] = {}
        self._server: socket.socket | None = None

    # -- lifecycle ---------------------------------------------------------------

    def init(self, path: str) -> None:
        self._fuse_ptr = _libfuse.fuse_get_context().contents.fuse
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
        """Raise the mount's read-ahead so sequential reads come in 1 MiB
        requests (the kernel offers FUSE 128 KiB); then report readiness.

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
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        self._stop.set()
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
        if self._fuse_ptr is None:
            return
        for p in paths:
            # -ENOENT means the kernel never saw that path: nothing to drop.
            _libfuse.fuse_invalidate_path(self._fuse_ptr, b"/" + p)
        with self._lock:
            for p in paths:
                self._page_content.pop(p, None)

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
        return {"error": f"unknown command {command!r} (status, reload)"}

    # -- metadata ------------------------------------------------------------------

    def entry(self, path: bytes) -> Entry:
        try:
            e = self.mounted.lookup(path)
        except ReleaseError as exc:
            log.error("EIO on /%s: catalog unavailable: %s", os.fsdecode(path), exc)
            raise mfusepy.FuseOSError(errno.EIO) from exc
        if e is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return e

    @staticmethod
    def fill_stat(st: Any, e: Entry) -> None:
        st.st_mode = e.mode
        st.st_ino = e.ino
        st.st_nlink = e.nlink
        st.st_uid = 0
        st.st_gid = 0
        st.st_size = e.size
        st.st_blksize = 65536
        st.st_blocks = (e.size + 511) // 512
        sec, nsec = divmod(e.mtime_ns, 1_000_000_000)
        for ts in (st.st_mtimespec, st.st_ctimespec, st.st_atimespec):
            ts.tv_sec = sec
            ts.tv_nsec = nsec

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        e = self.entry(_path(path))
        return {
            "st_mode": e.mode,
            "st_ino": e.ino,
            "st_nlink": e.nlink,
            "st_size": e.size,
            "st_mtime": e.mtime_ns,
            "st_ctime": e.mtime_ns,
            "st_atime": e.mtime_ns,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", ".."] + [os.fsdecode(e.name) for e in self.mounted.list_dir(_path(path))]

    def opendir(self, path: str) -> int:
        e = self.entry(_path(path))
        if not e.is_dir:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return 0

    def readlink(self, path: str) -> str:
        e = self.entry(_path(path))
        if e.target is None:
            raise mfusepy.FuseOSError(errno.EINVAL)
        return os.fsdecode(e.target)

    def statfs(self, path: str) -> dict[str, int]:
        total_bytes, files = self.mounted.statfs()
        blocks = (total_bytes + 4095) // 4096
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": files,
            "f_ffree": 0,
            "f_namemax": 255,
        }

    # -- content ---------------------------------------------------------------------

    def open(self, path: str, fi: Any) -> int:
        if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise mfusepy.FuseOSError(errno.EROFS)
        p = _path(path)
        e = self.entry(p)
        if not e.is_file:
            raise mfusepy.FuseOSError(errno.EISDIR if e.is_dir else errno.EINVAL)
        fh = self.mounted.open(e)
        of = self.mounted.open_file(fh)
        content = e.object or (f"r{of.revision}:{e.ino}" if e.chunked else "empty")
        with self._lock:
            users = self._open_content.setdefault(p, Counter())
            if self.mounted.streams(e):
                fi.direct_io = 1
            elif any(c != content and n > 0 for c, n in users.items()):
                fi.direct_io = 1  # another revision's copy is open: share no pages
            elif self._page_content.get(p) == content:
                fi.keep_cache = 1
            else:
                self._page_content[p] = content
            users[content] += 1
            self._fh_path[fh] = (p, content)
        fi.fh = fh
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        try:
            return self.mounted.read(fi.fh, offset, size)
        except (ObjectVerificationError, ObjectUnavailable) as exc:
            log_read_failure(path, exc)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fh: Any) -> int:
        raise NotImplementedError  # served by ReleaseFUSE.read_buf; defined to register it

    def release(self, path: str, fi: Any) -> int:
        fh = fi.fh
        self.mounted.release(fh)
        with self._lock:
            p, content = self._fh_path.pop(fh, (b"", ""))
            users = self._open_content.get(p)
            if users is not None:
                users[content] -= 1
                if users[content] <= 0:
                    del users[content]
                if not users:
                    del self._open_content[p]
        return 0

    # -- extended attributes -----------------------------------------------------------

    def _xattrs(self, path: str) -> dict[str, bytes]:
        p = _path(path)
        out = self.mounted.xattrs(self.entry(p))
        if p == b"" and self.control_socket is not None:
            out["control"] = os.fsencode(self.control_socket)
        return out

    def listxattr(self, path: str) -> list[str]:
        return [XATTR_PREFIX + k for k in self._xattrs(path)]

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            raise mfusepy.FuseOSError(mfusepy.ENOATTR)
        value = self._xattrs(path).get(name[len(XATTR_PREFIX) :])
        if value is None:
            raise mfusepy.FuseOSError(mfusepy.ENOATTR)
        return value


def _memory_bufvec(bufpp: Any, data: bytes) -> int:
    """A one-buffer ``fuse_bufvec`` holding a copy of ``data`` (libfuse frees both)."""
    vec_type = _BUFVEC_TYPES[0]
    raw = _libc.malloc(ctypes.sizeof(vec_type))
    mem = _libc.malloc(max(len(data), 1))
    if not raw or not mem:
        if raw:
            _libc.free(raw)
        if mem:
            _libc.free(mem)
        return -errno.ENOMEM
    ctypes.memset(raw, 0, ctypes.sizeof(vec_type))
    ctypes.memmove(mem, data, len(data))
    vec = vec_type.from_address(raw)
    vec.count = 1
    vec.buf[0].size = len(data)
    vec.buf[0].mem = mem
    bufpp[0] = ctypes.cast(raw, type(bufpp[0]))
    return 0


class ReleaseFUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with the hot paths written against the C structs."""

    def _lookup(self, path: bytes) -> Entry | None:
        try:
            entry: Entry | None = self.operations.mounted.lookup(path[1:])
        except ReleaseError as exc:
            log.error("EIO on %s: catalog unavailable: %s", os.fsdecode(path), exc)
            raise mfusepy.FuseOSError(errno.EIO) from exc
        return entry

    def getattr_fuse_3(self, path: bytes, buf: Any, fip: Any) -> int:
        e = self._lookup(path)
        if e is None:
            return -errno.ENOENT
        st = buf.contents
        ctypes.memset(buf, 0, ctypes.sizeof(st))
        ReleaseOperations.fill_stat(st, e)
        return 0

    def opendir(self, path: bytes, fip: Any) -> int:
        e = self._lookup(path)
        if e is None:
            return -errno.ENOENT
        if not e.is_dir:
            return -errno.ENOTDIR
        fi = fip.contents
        fi.fh = 0
        fi.cache_readdir = 1  # immutable until a revision switch invalidates it
        fi.keep_cache = 1
        return 0

    def read_buf(self, path: bytes, bufpp: Any, size: int, offset: int, fip: Any) -> int:
        # Zero copy: hand libfuse descriptors of verified cached objects; it
        # splices (or reads) them to the kernel without Python touching data.
        ops: ReleaseOperations = self.operations
        try:
            pieces = ops.mounted.read_pieces(fip.contents.fh, offset, size)
        except (ObjectVerificationError, ObjectUnavailable) as exc:
            log_read_failure(os.fsdecode(path), exc)
            return -errno.EIO
        if isinstance(pieces, bytes):
            return _memory_bufvec(bufpp, pieces)
        if len(pieces) > len(_BUFVEC_TYPES):
            return -errno.EIO  # a read spans at most a few 1 MiB+ chunks
        vec_type = _BUFVEC_TYPES[max(len(pieces), 1) - 1]
        raw = _libc.malloc(ctypes.sizeof(vec_type))  # libfuse frees it
        if not raw:
            return -errno.ENOMEM
        vec = vec_type.from_address(raw)
        ctypes.memset(raw, 0, ctypes.sizeof(vec_type))
        vec.count = max(len(pieces), 1)
        for i, (fd, pos, length) in enumerate(pieces):
            b = vec.buf[i]
            b.size = length
            b.flags = _BUF_IS_FD | _BUF_FD_SEEK
            b.fd = fd
            b.pos = pos
        bufpp[0] = ctypes.cast(raw, type(bufpp[0]))
        return 0

    def readdir_fuse_3(
        self, path: bytes, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        # Non-zero offsets make libfuse pass each entry's attributes on to the
        # kernel when it asks for READDIRPLUS (sparing one lookup per entry);
        # for a plain READDIR only the name and type are built.
        entries = self.operations.mounted.list_dir(path[1:])
        st = mfusepy.c_stat()
        size = ctypes.sizeof(st)
        ref = ctypes.byref(st)
        if offset < 1 and filler(buf, b".", None, 1, 0) != 0:
            return 0
        if offset < 2 and filler(buf, b"..", None, 2, 0) != 0:
            return 0
        start = max(offset - 2, 0)
        if flags & _READDIR_PLUS:
            fill = ReleaseOperations.fill_stat
            for i in range(start, len(entries)):
                e = entries[i]
                ctypes.memset(ref, 0, size)
                fill(st, e)
                if filler(buf, e.name, st, i + 3, _FILL_DIR_PLUS) != 0:
                    break
        else:
            for i in range(start, len(entries)):
                e = entries[i]
                st.st_mode = e.mode
                st.st_ino = e.ino
                if filler(buf, e.name, st, i + 3, 0) != 0:
                    break
        return 0


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

    Raises:
        ReleaseError: the mount point is unusable or libfuse failed.
    """
    if not mountpoint.is_dir():
        raise ReleaseError(f"mount point {mountpoint} is not a directory")
    ops.mountpoint = mountpoint
    try:
        ReleaseFUSE(
            ops,
            str(mountpoint),
            raw_fi=True,
            foreground=foreground,
            debug=debug,
            ro=True,
            nosuid=True,
            nodev=True,
            allow_other=os.geteuid() == 0,
            default_permissions=True,
            fsname=f"swarm:{ops.mounted.name}",
            subtype="swarm",
            use_ino=True,
            entry_timeout=entry_timeout,
            attr_timeout=entry_timeout,
            negative_timeout=negative_timeout,
            # libfuse 3.14 caps its workers at max_threads, 10 unless told
            # (fuse_parse_cmdline); its default max_idle_threads (UINT_MAX,
            # "never reap") is what it logs as "Ignoring invalid max threads
            # value 4294967295".  Equal values: all threads kept, none reaped.
            max_threads=threads,
            max_idle_threads=threads,
        )
    except RuntimeError as exc:
        raise ReleaseError(f"FUSE mount of {mountpoint} failed: {exc}") from exc


def is_swarm_mount(fstype: str) -> bool:
    return fstype == "fuse.swarm"
