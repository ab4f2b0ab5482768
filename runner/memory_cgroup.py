"""A job's memory cgroup: finding the memory controller, the cgroup's life, the sweep of stale ones.

The lease's memory (``max_rss_bytes``) limits the *whole job* (all its tasks
together) through a memory cgroup created for the job:

* cgroup v2 (a ``cgroup2`` mount whose ``cgroup.controllers`` lists
  ``memory``): ``ROOT/PARENT/JOB`` with ``memory.max`` = the limit and
  ``memory.swap.max`` = 0; ``memory`` is enabled in the ``subtree_control``
  of the root and of ``PARENT``;
* cgroup v1 (a ``cgroup`` mount with the ``memory`` controller, e.g. a hybrid
  hierarchy): ``MOUNT/PARENT/JOB`` with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes`` where swap accounting exists).

``PARENT`` (default ``swarm-jobs``) is owned by swarm; a job's cgroup is
named ``<job>.<pid of the gather>.<n>`` so that cgroups left by a gather that
died (SIGKILL) can be recognised and swept (:func:`sweep_stale_cgroups`, run
by every :meth:`JobCgroup.create`). A task that exceeds the limit is killed
by the kernel (SIGKILL); the cgroup's ``oom_kill`` counter
(:meth:`JobCgroup.oom_kills`) tells the gather it was the memory limit.

Invariants: a cgroup is removed only after every process in it is dead
(nothing can leave a cgroup on its own, so removing it ends the job's
processes); the job's cgroup is opened for joining (``cgroup.procs``) by
the gather, as root, before any task starts. :func:`find_memory_hierarchy`
is pure parsing; the rest touches cgroupfs and raises ``OSError`` for the
caller (:mod:`runner.confine`) to fall back to rlimits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("runner.memory_cgroup")

_STALE = re.compile(r"\.(\d+)\.(\d+)$")


# --- finding the memory controller (pure parsing) ---------------------------


@dataclass(frozen=True)
class MemoryHierarchy:
    version: int  # 1 or 2
    mountpoint: Path


def find_memory_hierarchy(
    mounts_text: str, read_controllers: Callable[[Path], str]
) -> MemoryHierarchy | None:
    """The cgroup hierarchy that has the memory controller, v2 preferred.

    ``mounts_text`` is ``/proc/self/mounts``; ``read_controllers(mountpoint)``
    returns the text of a v2 mount's ``cgroup.controllers`` ("" if unreadable).
    """
    v1: MemoryHierarchy | None = None
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        # /proc/mounts escapes blanks in paths as octal.
        mountpoint = Path(fields[1].replace("\\040", " "))
        if fields[2] == "cgroup2" and "memory" in read_controllers(mountpoint).split():
            return MemoryHierarchy(2, mountpoint)
        if fields[2] == "cgroup" and "memory" in fields[3].split(",") and v1 is None:
            v1 = MemoryHierarchy(1, mountpoint)
    return v1


def read_controllers(mountpoint: Path) -> str:
    """The ``cgroup.controllers`` of a v2 mount, "" if unreadable."""
    try:
        return (mountpoint / "cgroup.controllers").read_text()
    except OSError:
        return ""


# --- the job's cgroup --------------------------------------------------------


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _enable_memory(cgroup: Path) -> None:
    control = cgroup / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        _write(control, "+memory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobCgroup:
    """One job's memory cgroup: created, joined by its tasks, then removed."""

    def __init__(self, path: Path, version: int, limit: int) -> None:
        self.path = path
        self.version = version
        self.limit = limit
        self.procs_fd = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    _counter = 0

    @classmethod
    def create(cls, hierarchy: MemoryHierarchy, parent: str, job: str, limit: int) -> JobCgroup:
        """Create ``parent/<job>.<pid>.<n>`` with ``limit`` bytes of memory.

        Sweeps cgroups under ``parent`` left by gathers that are gone first.

        Raises:
            OSError: the hierarchy is not writable or the controller cannot
                be enabled (the caller falls back to rlimits).
        """
        base = hierarchy.mountpoint / parent
        if hierarchy.version == 2:
            _enable_memory(hierarchy.mountpoint)
            base.mkdir(exist_ok=True)
            _enable_memory(base)
        else:
            base.mkdir(exist_ok=True)
        sweep_stale_cgroups(base, hierarchy.version)
        cls._counter += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job)[:64]
        path = base / f"{safe}.{os.getpid()}.{cls._counter}"
        path.mkdir()
        try:
            if hierarchy.version == 2:
                _write(path / "memory.max", str(limit))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
            else:
                _write(path / "memory.limit_in_bytes", str(limit))
                with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                    _write(path / "memory.memsw.limit_in_bytes", str(limit))
            return cls(path, hierarchy.version, limit)
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise

    def describe(self) -> str:
        knob = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return f"cgroup v{self.version} {self.path} ({knob} {self.limit} bytes for the job)"

    def oom_kills(self) -> int:
        """How many tasks the kernel killed for exceeding the limit so far."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self, timeout: float = 5.0) -> None:
        """Kill whatever is left in the cgroup and remove it."""
        with contextlib.suppress(OSError):
            os.close(self.procs_fd)
        remove_cgroup(self.path, self.version, timeout)


def remove_cgroup(path: Path, version: int, timeout: float = 5.0) -> None:
    """SIGKILL every process in the cgroup ``path`` and remove it (logs on failure)."""
    deadline = time.monotonic() + timeout
    if version == 2 and (path / "cgroup.kill").exists():
        with contextlib.suppress(OSError):
            _write(path / "cgroup.kill", "1")
    while True:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("cannot remove job cgroup %s: %s", path, exc.strerror)
                return
        time.sleep(0.01)


def sweep_stale_cgroups(base: Path, version: int) -> list[Path]:
    """Remove job cgroups under ``base`` whose gather process is gone."""
    swept: list[Path] = []
    try:
        children = [p for p in base.iterdir() if p.is_dir()]
    except OSError:
        return swept
    for child in children:
        m = _STALE.search(child.name)
        if m and not _pid_alive(int(m.group(1))):
            remove_cgroup(child, version, 2.0)
            swept.append(child)
    return swept
