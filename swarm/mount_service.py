"""The mount process: wires the origin transport, TUF trust and the filesystem.

``swarm mount`` runs this in the foreground, or starts it detached and waits
until the mount is ready (or failed) so the command's exit status is honest.

Cache directory layout::

    CACHE/objects/   verified objects (cvmfs_like.cache)
    CACHE/metadata/  the node's trusted TUF metadata (trust.client)
    CACHE/control.sock, CACHE/mount.log
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cvmfs_like.cache import MOUNT_THREADS, FetchGate, ObjectCache
from cvmfs_like.fs import ReleaseOperations, mount
from cvmfs_like.mounted import MountedRelease
from cvmfs_like.store import check_repo_name
from swarm.exceptions import ConfigError
from swarm.origin_client import OriginMetadataFetcher, OriginObjectSource
from trust.client import TrustedRepository

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


def _lock_cache(cache: Path) -> int:
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"cache {cache} is in use by another mount") from None
    return fd


def run_mount(cfg: MountConfig, *, ready_fd: int | None = None) -> None:
    """Mount and serve in this process until unmounted.

    Raises:
        ConfigError: bad options or paths.
        trust.exceptions.TrustError, cvmfs_like.exceptions.ReleaseError: no
            trusted revision could be loaded.
    """
    check_repo_name(cfg.name)
    try:
        root_bytes = cfg.trust_root.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trusted root {cfg.trust_root}: {exc.strerror}") from exc
    if not cfg.mountpoint.is_dir():
        raise ConfigError(f"mount point {cfg.mountpoint} is not a directory")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lock_fd = _lock_cache(cfg.cache)
    try:
        cache = ObjectCache(cfg.cache, cfg.quota, gate=FetchGate.for_threads(cfg.threads))
        metadata_dir = cfg.cache / "metadata"
        metadata_dir.mkdir(exist_ok=True)
        base = cfg.origin.rstrip("/")
        trusted = TrustedRepository(
            metadata_dir,
            f"{base}/{cfg.name}/metadata/",
            fetcher=OriginMetadataFetcher(timeout=cfg.fetch_timeout),
            trusted_root=root_bytes,
        )
        source = OriginObjectSource(cfg.origin, cfg.name, timeout=cfg.fetch_timeout)
        mounted = MountedRelease(cfg.name, trusted, source, cache, tag=cfg.tag)
        rev = mounted.start()
        log.info("%s: revision %d, catalog %s", cfg.name, rev.release.revision, rev.release.catalog)

        def ready() -> None:
            if ready_fd is not None:
                os.write(ready_fd, f"ok {rev.release.revision}\n".encode())
                os.close(ready_fd)

        ops = ReleaseOperations(
            mounted, ttl=cfg.ttl, control_socket=cfg.cache / "control.sock", on_ready=ready
        )
        mount(ops, cfg.mountpoint, negative_timeout=cfg.negative_timeout, threads=cfg.threads)
    finally:
        os.close(lock_fd)


def start_detached(argv: list[str], cache: Path, timeout: float = 60.0) -> str:
    """Run ``swarm mount ... --foreground`` detached; wait until it is ready.

    Returns the ready message.

    Raises:
        ConfigError: the mount process failed (its log's tail is included).
    """
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create cache {cache}: {exc.strerror}") from exc
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
        msg = pipe.readline().decode().strip()
    if msg.startswith("ok"):
        # Give the kernel a moment: the mount is live once init ran.
        return msg
    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    raise ConfigError(f"mount failed (exit {code}):\n  " + "\n  ".join(tail))


def swarm_mounts() -> list[tuple[str, Path]]:
    """(fsname, mountpoint) of every swarm mount on this machine."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fsname, mp, fstype = line.split()[:3]
            if fstype == "fuse.swarm":
                out.append((fsname, Path(mp.replace("\\040", " "))))
    return out


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


def unmount(mountpoint: Path) -> None:
    """Unmount a swarm mount (``fusermount3 -u``).

    Raises:
        ConfigError: unmount failed (busy, not mounted).
    """
    r = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise ConfigError(f"cannot unmount {mountpoint}: {r.stderr.strip()}")
