"""Helpers for the benchmark: progress, subprocesses, timing, caches and mounts.

Every process this module starts and every mount it makes is recorded in a
:class:`Resources` object, whose :meth:`Resources.close` (called from a
``finally`` block) unmounts and kills them: only what we started, by PID or
mount point.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


class BenchError(Exception):
    """A prerequisite is missing or a step failed; the message says which."""


def say(msg: str) -> None:
    """A progress line on stderr."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def run(
    argv: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    capture: bool = True,
    stdout_devnull: bool = False,
) -> str:
    """Run a command; raise :class:`BenchError` with its stderr if it fails."""
    args = [str(a) for a in argv]
    stdout: int | None = subprocess.PIPE if capture else None
    if stdout_devnull:
        stdout = subprocess.DEVNULL
    r = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, env=env, check=False)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"command failed (exit {r.returncode}): {' '.join(args)}\n{err}")
    return r.stdout.decode(errors="replace") if r.stdout is not None else ""


def timed(argv: Sequence[str | Path], *, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one run of a command, its stdout discarded."""
    t0 = time.perf_counter()
    run(argv, env=env, stdout_devnull=True)
    return time.perf_counter() - t0


def timed_shell(script: str, *, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one run of a ``bash -c`` script."""
    return timed(["bash", "-o", "pipefail", "-c", script], env=env)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def is_root() -> bool:
    return os.geteuid() == 0


def can_drop_caches() -> bool:
    return is_root() and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Flush dirty pages and drop the page, dentry and inode caches (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def mounted_points() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1].replace("\\040", " ") for line in f}


def is_mounted(mp: Path) -> bool:
    return str(mp) in mounted_points()


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def fuse_unmount(mp: Path) -> None:
    """``fusermount3 -u``, retried, then lazy ``-uz`` as the last resort."""
    for _ in range(20):
        if not is_mounted(mp):
            return
        r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, check=False)
        if r.returncode == 0:
            return
        time.sleep(0.25)
    say(f"warning: {mp} busy, lazy unmount")
    subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True, check=False)


def cache_lock_free(cache: Path) -> bool:
    """True when no mount process holds ``CACHE/lock`` (the previous one exited)."""
    lock = cache / "lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


class Resources:
    """Servers and mounts started by the benchmark, cleaned up by :meth:`close`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []

    # -- servers ----------------------------------------------------------------

    def start_origin(self, store: Path, log: Path) -> str:
        """``swarm serve STORE`` on a free loopback port; returns its base URL."""
        port = free_port()
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [str(VENV_BIN / "swarm"), "serve", str(store), "--listen", f"127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
            )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}/"

        def up() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"swarm serve exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return True
            except OSError:
                return False

        wait_until(up, 30, f"the origin at {url}")
        return url

    def stop_proc(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc in self.procs:
            self.procs.remove(proc)

    # -- mounts -----------------------------------------------------------------

    def swarm_mount(
        self,
        repo: str,
        mp: Path,
        origin: str,
        trust: Path,
        cache: Path,
        quota: str = "40G",
        extra: Sequence[str] = (),
    ) -> None:
        """``swarm mount`` (detached; ``extra`` options added); waits for a
        previous mount of ``cache`` to exit."""
        mp.mkdir(parents=True, exist_ok=True)
        wait_until(lambda: cache_lock_free(cache), 30, f"the previous mount of {cache} to exit")
        self.mounts.append(mp)
        run(
            [
                VENV_BIN / "swarm",
                "mount",
                repo,
                mp,
                "--origin",
                origin,
                "--trust",
                trust,
                "--cache",
                cache,
                "--quota",
                quota,
                "--ttl",
                "3600",
                *extra,
            ]
        )
        wait_until(lambda: is_mounted(mp), 10, f"{mp} to appear in /proc/self/mounts")

    def squashfuse_mount(self, image: Path, mp: Path) -> None:
        mp.mkdir(parents=True, exist_ok=True)
        self.mounts.append(mp)
        run(["squashfuse", image, mp])
        wait_until(lambda: is_mounted(mp), 10, f"{mp} to appear in /proc/self/mounts")

    def unmount(self, mp: Path, cache: Path | None = None) -> None:
        fuse_unmount(mp)
        if mp in self.mounts:
            self.mounts.remove(mp)
        if cache is not None:
            wait_until(lambda: cache_lock_free(cache), 30, f"the mount of {cache} to exit")

    def close(self) -> None:
        for mp in list(reversed(self.mounts)):
            try:
                self.unmount(mp)
            except Exception as exc:  # cleanup must go on
                say(f"warning: cleanup of {mp}: {exc}")
        for proc in list(self.procs):
            try:
                self.stop_proc(proc)
            except Exception as exc:
                say(f"warning: cleanup of PID {proc.pid}: {exc}")


def rm_tree(path: Path) -> None:
    """Remove a scratch directory, refusing to touch anything still mounted below it."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    busy = [m for m in mounted_points() if m.startswith(prefix)]
    if busy:
        raise BenchError(f"refusing to remove {path}: still mounted: {busy}")
    shutil.rmtree(path)


def tree_bytes_files(root: Path) -> tuple[int, int]:
    """(bytes of regular files, number of regular files) below ``root``, symlinks not followed."""
    total = 0
    files = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                files += 1
    return total, files
