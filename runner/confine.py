"""Confinement of a job's tasks: which user they run as, and their memory limit.

A node daemon runs as root (FUSE, cgroups); the jobs it runs must not. When
the node runs as root, every task of a job runs as a dedicated unprivileged
user (``nobody`` unless configured) with no supplementary groups; when it
does not, tasks run as the node's own user and nothing is switched.

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
died (SIGKILL) can be recognised and swept. A task that exceeds the limit is
killed by the kernel (SIGKILL); the job's ``oom_kill`` counter tells the
gather it was the memory limit. When no usable memory controller exists (or
creating the cgroup fails: not root, a read-only or undelegated hierarchy)
the limit falls back to ``RLIMIT_DATA`` = limit / cores per task, with a log
message saying why; a task over it sees allocation failures instead.

How a task is started: the gather must not run Python between fork and exec
(a ``preexec_fn`` makes ``subprocess`` fork instead of vfork, copy the page
tables of a daemon of hundreds of MB and wait while the child runs Python's
after-fork hooks: 2-5 ms of the gather per task, ten times that on a
CPU-starved node). So the child is started with vfork and *execs* the
confinement, in this order:

1. ``/bin/sh -c`` (only when there is a cgroup to join or an rlimit to set):
   ``echo 0 >&0`` with the job cgroup's ``cgroup.procs`` (opened by the gather
   as root) as its stdin, so the process joins the cgroup while still root,
   before anything of the job runs; ``ulimit -d`` for the rlimit fallback;
   then ``exec ... </dev/null``, which closes that descriptor;
2. ``setpriv`` (util-linux >= 2.33) drops groups, gid and uid and only then
   sets ``PR_SET_PDEATHSIG`` (the kernel clears the parent-death signal on
   any credential change) and execs the command.

The task's niceness is raised by the gather right after the start (a
priority, not a security boundary). Without a ``setpriv`` that knows
``--pdeathsig``, the same steps run in a ``preexec_fn`` (the slow path). A
gather that dies in the instant between the start and ``setpriv``'s prctl
leaves that task running; with a cgroup, the next gather sweeps it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import pwd
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runner.exceptions import ConfinementError, TaskError

log = logging.getLogger("runner.confine")

DEFAULT_JOB_USER = "nobody"
DEFAULT_CGROUP_PARENT = "swarm-jobs"
DEFAULT_NICE = 5
_PR_SET_PDEATHSIG = 1
_STALE = re.compile(r"\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class JobUser:
    """The unprivileged identity a job's tasks run as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> JobUser:
        """The user named ``name`` (or a numeric uid) from the password database.

        Raises:
            ConfinementError: no such user.
        """
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except KeyError:
            raise ConfinementError(f"job user {name!r} does not exist on this node") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def job_user_for_node(
    name: str | None = DEFAULT_JOB_USER, euid: int | None = None
) -> JobUser | None:
    """The user jobs run as: ``name`` when the node runs as root, else None
    (tasks keep the node's own unprivileged user).

    Raises:
        ConfinementError: the node is root and ``name`` does not exist.
    """
    if (os.geteuid() if euid is None else euid) != 0 or not name:
        return None
    return JobUser.lookup(name)


@dataclass(frozen=True)
class Confinement:
    """How the tasks of a job are confined.

    ``user``: who tasks run as (None: the node's own user). ``cgroup_parent``:
    name of the swarm-owned parent cgroup, None to use ``RLIMIT_DATA`` only.
    ``mounts``: where mounted filesystems are listed (tests may inject).
    ``nice``: added to the tasks' niceness, so that the node's own work (the
    gather starting the next task, FUSE serving the jobs' reads, transfers)
    preempts tasks instead of queueing behind them on a fully used node; the
    tasks still get every cycle nothing else wants.
    """

    user: JobUser | None = None
    cgroup_parent: str | None = DEFAULT_CGROUP_PARENT
    mounts: str = "/proc/self/mounts"
    nice: int = DEFAULT_NICE


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


def _read_controllers(mountpoint: Path) -> str:
    try:
        return (mountpoint / "cgroup.controllers").read_text()
    except OSError:
        return ""


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


# --- per-job confinement in the gather ---------------------------------------


@dataclass(frozen=True)
class TaskLaunch:
    """What ``subprocess.Popen`` gets to start one confined task."""

    argv: list[str]
    stdin: int
    preexec_fn: Callable[[], None] | None
    nice: int


@functools.cache
def _setpriv() -> str | None:
    """``setpriv`` if it can set the parent-death signal, else None (slow path)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "--pdeathsig" not in out:
        log.warning("%s has no --pdeathsig (util-linux < 2.33): tasks start the slow way", path)
        return None
    return path


def command_path(argv0: str, env: Mapping[str, str], user: JobUser | None) -> Path:
    """The file ``argv0`` names (searched in ``env``'s PATH without a slash).

    Raises:
        TaskError: it does not exist, is not a regular file, or the job user
            cannot reach or execute it (the job cannot run here as it is).
    """
    if "/" in argv0:
        found: str | None = argv0 if os.path.exists(argv0) else None
    else:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath))
    if found is None:
        raise TaskError(f"cannot start {argv0!r}: no such file")
    path = Path(found)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise TaskError(f"cannot start {argv0!r}: not a regular file")
    if user is None:
        ok = os.access(path, os.X_OK)
        who = "this node's user"
    else:
        try:
            check_reachable(path.parent, user)
        except ConfinementError as exc:
            raise TaskError(f"cannot start {argv0!r}: {exc}") from None
        bit = (
            stat.S_IXUSR
            if st.st_uid == user.uid
            else stat.S_IXGRP
            if st.st_gid == user.gid
            else stat.S_IXOTH
        )
        ok = bool(st.st_mode & bit)
        who = f"job user {user.name}"
    if not ok:
        raise TaskError(
            f"cannot start {argv0!r}: {who} may not execute {path} "
            f"(mode {stat.S_IMODE(st.st_mode):o}, uid {st.st_uid})"
        )
    return path


class JobConfinement:
    """The confinement of one running job: what each task's child must do.

    ``memory`` is the whole job's limit (None: none). Use as a context
    manager; ``close`` removes the job's cgroup.
    """

    def __init__(self, conf: Confinement, job: str, memory: int | None, cores: int) -> None:
        self.user = conf.user
        self.nice = conf.nice
        self._prefix: tuple[list[str], int, Callable[[], None] | None] | None = None
        self.cgroup: JobCgroup | None = None
        self.rlimit: int | None = None
        self.memory_limit = "none"
        if memory is None:
            return
        why = "cgroups are disabled for this node (cgroup_parent unset)"
        if conf.cgroup_parent:
            try:
                with open(conf.mounts) as f:
                    hierarchy = find_memory_hierarchy(f.read(), _read_controllers)
            except OSError as exc:
                hierarchy, why = None, f"cannot read {conf.mounts}: {exc.strerror}"
            else:
                why = "no cgroup hierarchy with the memory controller is mounted"
            if hierarchy is not None:
                try:
                    self.cgroup = JobCgroup.create(hierarchy, conf.cgroup_parent, job, memory)
                except OSError as exc:
                    why = (
                        f"cannot create a memory cgroup under "
                        f"{hierarchy.mountpoint / conf.cgroup_parent}: {exc.strerror or exc}"
                    )
        if self.cgroup is not None:
            self.memory_limit = self.cgroup.describe()
            return
        self.rlimit = max(1, memory // max(1, cores))
        self.memory_limit = f"RLIMIT_DATA {self.rlimit} bytes per task ({why})"
        log.warning(
            "job %s: memory limit %d bytes applied as RLIMIT_DATA %d bytes per task: %s",
            job,
            memory,
            self.rlimit,
            why,
        )

    def launch(self, argv: list[str]) -> TaskLaunch:
        """How to start one task running ``argv`` under this confinement."""
        if self._prefix is None:
            self._prefix = self._launcher()
        prefix, stdin, setup = self._prefix
        return TaskLaunch([*prefix, *argv], stdin, setup, self.nice)

    def _launcher(self) -> tuple[list[str], int, Callable[[], None] | None]:
        """(argv prefix, stdin, preexec_fn): the same for every task of the job."""
        setpriv = _setpriv()
        if setpriv is None:
            return [], subprocess.DEVNULL, self.child_setup()
        drop = [setpriv]
        if self.user is not None:
            drop += [f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--clear-groups"]
        drop += ["--pdeathsig=KILL", "--"]
        steps = []
        stdin: int = subprocess.DEVNULL
        if self.cgroup is not None:
            steps.append("echo 0 >&0 || exit 125")  # stdin is cgroup.procs: join it
            stdin = self.cgroup.procs_fd
        if self.rlimit is not None:
            steps.append(f"ulimit -d {max(1, self.rlimit // 1024)} || exit 125")
        if not steps:
            return drop, stdin, None
        script = "; ".join([*steps, f'exec {shlex.join(drop)} "$@" </dev/null'])
        return ["/bin/sh", "-c", script, "swarm-task"], stdin, None

    def child_setup(self) -> Callable[[], None]:
        """The slow path's ``preexec_fn``: run in the child between fork and exec.

        It must not import, log or take locks: only system calls.
        """
        # Resolved in the parent: the child, between fork and exec, must not dlopen.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        procs_fd = None if self.cgroup is None else self.cgroup.procs_fd
        rlimit = self.rlimit
        user = self.user
        parent = os.getpid()

        def setup() -> None:
            if procs_fd is not None:
                os.write(procs_fd, b"0")  # "0": the writing process itself
            if rlimit is not None:
                resource.setrlimit(resource.RLIMIT_DATA, (rlimit, rlimit))
            if user is not None:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
            # After the credential change, which clears it.
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the gather died before prctl
                os._exit(1)

        return setup

    def memory_kills(self) -> int:
        return 0 if self.cgroup is None else self.cgroup.oom_kills()

    def prepare_dir(self, path: Path) -> None:
        """Create ``path`` writable by the job user (mode 0700, owned by it).

        Raises:
            ConfinementError: the job user cannot reach ``path`` (a parent
                directory denies it search permission).
        """
        path.mkdir(parents=True, exist_ok=True)
        if self.user is None:
            return
        os.chown(path, self.user.uid, self.user.gid)
        path.chmod(0o700)
        check_reachable(path, self.user)

    def close(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def __enter__(self) -> JobConfinement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_reachable(path: Path, user: JobUser) -> None:
    """Raise unless ``user`` (no supplementary groups) can search every
    directory from ``/`` down to ``path``.

    Raises:
        ConfinementError: names the first directory that denies it.
    """
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        st = current.stat()
        if st.st_uid == user.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == user.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise ConfinementError(
                f"job user {user.name} cannot reach {path}: {current} is mode "
                f"{stat.S_IMODE(st.st_mode):o} owned by uid {st.st_uid}"
            )
