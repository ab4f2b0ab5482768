"""The mount process: wires the origin transport, TUF trust and the filesystem.

``swarm mount`` runs this in the foreground, or starts it detached and waits
until the mount is ready (or failed) so the command's exit status is honest.

Mount points (here and for the node daemon's mount): a swarm mount whose
process died stays behind, dead (every access gives ENOTCONN); it is cleared
(lazy unmount, logged) before mounting again, so mounts never stack over dead
ones.  A live mount is never cleared: mounting over it is an error.  Only
mounts of type ``fuse.swarm`` are ever unmounted; ``unmount`` removes every
one stacked at the point.  No check of a mount point waits on the file
system behind it for longer than :data:`PROBE_TIMEOUT`.

Cache directory layout::

    CACHE/objects/         verified objects (cvmfs_like.cache)
    CACHE/closed-cleanly   the cache's clean-close marker (cvmfs_like.cache)
    CACHE/metadata/        the node's trusted TUF metadata (trust.client)
    CACHE/profiles/        start profiles, one per revision (cvmfs_like.start_profile)
    CACHE/control.sock, CACHE/mount.log
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import resource
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cvmfs_like.cache import MOUNT_THREADS, FetchGate, ObjectCache
from cvmfs_like.exceptions import StoreError
from cvmfs_like.fs import ReleaseOperations, is_swarm_mount, mount
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.start_profile import ProfileSettings
from cvmfs_like.store import check_repo_name
from swarm.exceptions import ConfigError
from swarm.options import check_directory
from swarm.origin_client import OriginObjectSource
from swarm.repository import RepositorySpec, open_repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MountConfig:
    name: str
    mountpoint: Path
    origin: str
    trust_root: Path
    cache: Path
    quota: int
    ttl: float = 60.0
    fetch_timeout: float = 10.0
    tag: str | None = None
    negative_timeout: float = 30.0
    threads: int = MOUNT_THREADS
    start_profile: bool = True  # record / prefetch start profiles
    start_profile_window: float = ProfileSettings.window
    start_profile_entries: int = ProfileSettings.max_entries


def _lock_cache(cache: Path) -> int:
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"cache {cache} is in use by another mount") from None
    return fd


def check_mount_config(cfg: MountConfig) -> bytes:
    """Check a mount's options and paths without creating anything (a dead
    swarm mount at the mount point is cleared).  Returns the trusted root.

    Raises:
        ConfigError: naming the option: a bad name, an unreadable trusted
            root, an unusable mount point or cache directory.
    """
    try:
        check_repo_name(cfg.name)
    except StoreError as exc:
        raise ConfigError(f"name: {exc}") from None
    try:
        root_bytes = cfg.trust_root.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--trust: cannot read {cfg.trust_root}: {exc.strerror}") from None
    check_directory(cfg.cache, "--cache")
    prepare_mount_point(cfg.mountpoint)
    return root_bytes


def run_mount(cfg: MountConfig, *, ready_fd: int | None = None) -> None:
    """Mount and serve in this process until unmounted.

    Raises:
        ConfigError: bad options or paths.
        trust.exceptions.TrustError, cvmfs_like.exceptions.ReleaseError: no
            trusted revision could be loaded.
    """
    root_bytes = check_mount_config(cfg)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lock_fd = _lock_cache(cfg.cache)
    cache: ObjectCache | None = None
    mounted: MountedRelease | None = None
    try:
        metadata_dir = cfg.cache / "metadata"
        metadata_dir.mkdir(exist_ok=True)
        spec = RepositorySpec(cfg.name, cfg.origin, root_bytes, metadata_dir, cfg.fetch_timeout)
        repo = open_repository(
            spec,
            OriginObjectSource(cfg.origin, cfg.name, timeout=cfg.fetch_timeout),
            cache_dir=cfg.cache,
            quota=cfg.quota,
            gate=FetchGate.for_threads(cfg.threads),  # one gate per mount
            tag=cfg.tag,
            # stop_wait: a prefetch fetch in progress at unmount ends by its deadline
            start_profile=ProfileSettings(
                enabled=cfg.start_profile,
                window=cfg.start_profile_window,
                max_entries=cfg.start_profile_entries,
                stop_wait=cfg.fetch_timeout + 5.0,
            ),
        )
        cache, mounted = repo.cache, repo.mounted
        rev = mounted.start()
        log.info(
            "%s: revision %d, catalog %s",
            cfg.name,
            rev.release.revision,
            rev.release.catalog,
            extra={"repository": cfg.name, "revision": rev.release.revision},
        )

        def ready() -> None:
            if ready_fd is not None:
                os.write(ready_fd, f"ok {rev.release.revision}\n".encode())
                os.close(ready_fd)

        ops = ReleaseOperations(
            mounted, ttl=cfg.ttl, control_socket=cfg.cache / "control.sock", on_ready=ready
        )
        mount(ops, cfg.mountpoint, negative_timeout=cfg.negative_timeout, threads=cfg.threads)
    finally:
        if mounted is not None:
            mounted.close()  # the start profile's prefetch stops before the cache closes
        if cache is not None:
            cache.close()  # unmounted: flush, so the next start need not hash objects
        os.close(lock_fd)


def start_detached(argv: list[str], cache: Path, timeout: float = 60.0) -> str:
    """Run ``swarm mount ... --foreground`` detached; wait until it is ready.

    Returns the ready message.

    Raises:
        ConfigError: the mount process failed (its last log line is included).
    """
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--cache: cannot create {cache}: {exc.strerror}") from exc
    read_fd, write_fd = os.pipe()
    log_path = cache / "mount.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.cli", *argv, "--foreground", "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout)
        msg = pipe.readline().decode().strip() if ready else ""
    if not ready:
        # Ours to end: a mount that is not ready in time is not left behind
        # half-started (it may be waiting on a hung origin).
        proc.kill()
        proc.wait(timeout=10)  # SIGKILLed: only an uninterruptible sleep could hold it
        raise ConfigError(f"mount not ready within {timeout:g} s; stopped it (log: {log_path})")
    if msg.startswith("ok"):
        # Give the kernel a moment: the mount is live once init ran.
        return msg
    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    lines = log_path.read_text(errors="replace").strip().splitlines()
    # The child's own one-line error ("swarm: ...") says why; else its last line.
    why = next((ln for ln in reversed(lines) if ln.startswith("swarm: ")), None)
    why = why[len("swarm: ") :] if why else (lines[-1].strip() if lines else "no output")
    raise ConfigError(f"mount failed (exit {code}): {why} (log: {log_path})")


# -- mount points ----------------------------------------------------------------------

PROBE_TIMEOUT = 10.0  # a mount that does not answer statfs in this time is hung, not dead
_MAX_STACK = 16  # more swarm mounts at one point than any crash loop leaves


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: Path
    fstype: str
    source: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    """Every mount of this mount namespace, in mount order (a mount stacked
    on another comes after it)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)  # optional fields end at "-"
            out.append(
                MountEntry(Path(_unescape(fields[4])), fields[sep + 1], _unescape(fields[sep + 2]))
            )
    return out


def swarm_mounts() -> list[tuple[str, Path]]:
    """(fsname, mountpoint) of every swarm mount on this machine."""
    return [(m.source, m.mountpoint) for m in mount_table() if is_swarm_mount(m.fstype)]


def _top_mount(mountpoint: Path) -> MountEntry | None:
    """The mount visible at ``mountpoint`` (the last one stacked there)."""
    return next((m for m in reversed(mount_table()) if m.mountpoint == mountpoint), None)


def is_swarm_mountpoint(path: Path) -> bool:
    """Is the mount visible at ``path`` a swarm mount (dead or alive)?"""
    top = _top_mount(Path(os.path.realpath(path)))
    return top is not None and is_swarm_mount(top.fstype)


def probe(path: Path, timeout: float = PROBE_TIMEOUT) -> int | None:
    """The errno of ``statvfs(path)`` (None: it answered), asked in a thread
    so a hung file system costs at most ``timeout`` (then ETIMEDOUT).

    statvfs, not stat: the kernel answers a stat of a FUSE mount's root from
    its attribute cache even when the mount's process is gone, while statfs
    always asks the file system, so a dead mount gives ENOTCONN."""
    result: list[int | None] = []

    def stat() -> None:
        try:
            os.statvfs(path)
            result.append(None)
        except OSError as exc:
            result.append(exc.errno)

    t = threading.Thread(target=stat, name="swarm-probe", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else errno.ETIMEDOUT


def _fusermount_u(mountpoint: Path, *, lazy: bool) -> str | None:
    """Unmount the top mount at ``mountpoint``; the error text, or None."""
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return "fusermount3 did not finish within 30 s"
    return None if r.returncode == 0 else r.stderr.strip() or f"exit {r.returncode}"


def prepare_mount_point(
    mountpoint: Path, *, create: bool = False, what: str = "mountpoint"
) -> None:
    """Make ``mountpoint`` ready to be mounted on: clear the dead swarm
    mounts there (logged), refuse a live one, check it is a directory
    (``create``: make it and its parents if missing).

    Raises:
        ConfigError: naming ``what``: a live swarm mount, a dead mount of
            another file system, a hung mount, not a directory, or not creatable.
    """
    mountpoint = Path(os.path.realpath(mountpoint))
    for _ in range(_MAX_STACK):
        top = _top_mount(mountpoint)
        err = probe(mountpoint)
        if top is None or not is_swarm_mount(top.fstype):
            break  # not mounted, or another file system: mounting over it is the user's call
        if err is None:
            raise ConfigError(
                f"{what}: {mountpoint} is already a live swarm mount"
                f" (swarm umount {mountpoint} first)"
            )
        if err != errno.ENOTCONN:
            raise ConfigError(
                f"{what}: swarm mount {mountpoint} does not answer: {os.strerror(err)}"
            )
        failed = _fusermount_u(mountpoint, lazy=True)
        if failed is not None:
            raise ConfigError(f"{what}: cannot clear the dead swarm mount {mountpoint}: {failed}")
        log.warning(
            "cleared a dead swarm mount at %s (%s: its process died)", mountpoint, top.source
        )
    else:
        raise ConfigError(f"{what}: more than {_MAX_STACK} swarm mounts stacked at {mountpoint}")
    if err is not None and err != errno.ENOENT:
        raise ConfigError(f"{what}: {mountpoint}: {os.strerror(err)}")
    if err == errno.ENOENT and create:
        check_directory(mountpoint, what)
        try:
            mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot create {mountpoint}: {exc.strerror}") from None
    elif err == errno.ENOENT:
        raise ConfigError(f"{what}: {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise ConfigError(f"{what}: {mountpoint} is not a directory")


class MountState(StrEnum):
    """What ``swarm status`` makes of a swarm mount (see :func:`mount_state`)."""

    MOUNTED = "mounted"  # a `swarm mount`, answering on its control socket
    NODE = "node"  # a node daemon's mount: its API reports on it
    DEAD = "dead"  # its process died: ENOTCONN
    UNKNOWN = "unknown"  # a fuse.swarm mount that does not answer as ours


def control(mountpoint: Path, command: str, timeout: float = 30.0) -> dict[str, object]:
    """Send a command to a mount's control socket.

    Raises:
        ConfigError: not a swarm mount, or it does not answer.
    """
    import json
    import socket

    try:
        sock_path = os.getxattr(mountpoint, "user.swarm.control")
    except OSError as exc:
        raise ConfigError(f"{mountpoint} is not a swarm mount: {exc.strerror}") from exc
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fsdecode(sock_path))
            s.sendall(command.encode() + b"\n")
            reply = s.makefile("r").readline()
        except OSError as exc:
            raise ConfigError(f"{mountpoint}: control socket: {exc}") from exc
    result: dict[str, object] = json.loads(reply)
    return result


def mount_state(mountpoint: Path) -> dict[str, object]:
    """A swarm mount's status report: its control socket's answer with
    ``state`` "mounted", or ``state`` and ``error`` saying why there is none.
    Never raises for a mount that does not answer."""
    try:
        os.getxattr(mountpoint, "user.swarm.control")
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return {
                "state": MountState.DEAD,
                "error": f"dead (transport endpoint not connected): swarm umount {mountpoint}",
            }
        if exc.errno == errno.ENODATA:
            # A swarm file system without a control socket: the node's mount.
            return {
                "state": MountState.NODE,
                "error": "a node daemon's mount (swarm status --config NODE.toml)",
            }
        return {
            "state": MountState.UNKNOWN,
            "error": f"not answering as a swarm mount: {exc.strerror}",
        }
    try:
        return {"state": MountState.MOUNTED, **control(mountpoint, "status", timeout=10.0)}
    except (ConfigError, ValueError) as exc:
        return {"state": MountState.UNKNOWN, "error": f"not answering as a swarm mount: {exc}"}


def unmount(mountpoint: Path) -> None:
    """Unmount every swarm mount stacked at ``mountpoint`` (``fusermount3
    -u``; lazily for a dead one, which serves nothing).  A mount of another
    type is left alone, and stops the unmounting.

    Raises:
        ConfigError: no swarm mount there, or an unmount failed (busy).
    """
    mountpoint = Path(os.path.realpath(mountpoint))
    removed = 0
    for _ in range(_MAX_STACK):
        top = _top_mount(mountpoint)
        if top is None or not is_swarm_mount(top.fstype):
            break
        dead = probe(mountpoint) == errno.ENOTCONN
        failed = _fusermount_u(mountpoint, lazy=dead)
        if failed is not None:
            raise ConfigError(f"cannot unmount {mountpoint}: {failed}")
        removed += 1
    if removed == 0:
        raise ConfigError(f"{mountpoint} is not a swarm mount")
