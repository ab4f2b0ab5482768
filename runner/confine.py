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

Invariant: every process a job started is gone when the job ends, also one
that left its task's process group (``setsid``), whose kill the gather's
``killpg`` at the task's end misses. :meth:`JobConfinement.close` sweeps:

* with a cgroup: every process in it is killed (``cgroup.kill`` on v2, else
  SIGKILL to each pid in ``cgroup.procs`` until it is empty) and the cgroup
  removed: nothing can leave a cgroup on its own;
* without one, when tasks run as a job user (a root node): the gather's
  process is a child subreaper (``PR_SET_CHILD_SUBREAPER``) while the job
  runs, so every orphaned descendant of a task is re-parented to it instead
  of init, whatever it does (``setsid``, double fork, a cleared
  environment); at the end every child of the gather whose real uid is the
  job user's is killed and reaped, round after round until none is left (a
  child that is not reaped keeps its pid, so there is no pid-reuse race);
* without either (tasks keep the node's own user: no boundary between them
  and the node anyway; or the kernel refused the subreaper): every process
  of the tasks' uid whose environment carries this job's
  ``SWARM_RUNNER_JOB`` token (set for every task, random per job) is killed
  through a pidfd (the token is checked again on the pidfd's process, so a
  reused pid is never hit). Orphans then belong to init, which reaps them.
  A process that clears its environment escapes this sweep: accidents
  (``setsid daemon &``) are caught, not malice.
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
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import threading
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
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_STALE = re.compile(r"\.(\d+)\.(\d+)$")
JOB_MARKER = "SWARM_RUNNER_JOB"  # environment variable carrying the job's token
_SWEEP_SECONDS = 5.0  # how long a sweep keeps killing before it gives up (and logs)


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


_CGROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def cgroup_parent_problem(name: str) -> str | None:
    """What is wrong with ``name`` as the jobs' parent cgroup, None if usable
    (one directory name under the hierarchy's root, or "" for none)."""
    if name == "" or _CGROUP_NAME.fullmatch(name):
        return None
    shown = repr(name) if len(name) <= 40 else repr(name[:37]) + "..."
    return f'expected a directory name of A-Z a-z 0-9 . _ - (or "" for none), got {shown}'


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


# --- sweeping a job's processes without a cgroup ------------------------------


def _prctl() -> Callable[..., int]:
    fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return fn


class _Subreaper:
    """``PR_SET_CHILD_SUBREAPER`` on this process while at least one job needs it.

    A process-wide attribute: held with a count so that two gathers in one
    process (threads) do not turn it off under each other; the value found
    before the first hold is restored after the last release.
    """

    _lock = threading.Lock()
    _holders = 0
    _before = 0

    @classmethod
    def hold(cls) -> bool:
        """Turn it on; False if the kernel refuses (the sweep then finds nothing)."""
        with cls._lock:
            if cls._holders == 0:
                was = ctypes.c_int(0)
                prctl = _prctl()
                prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
                if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                    err = ctypes.get_errno()
                    log.warning("cannot become a child subreaper: %s", os.strerror(err))
                    return False
                cls._before = was.value
            cls._holders += 1
            return True

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and not cls._before:
                _prctl()(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent(pid: int) -> int | None:
    """The parent pid of ``pid`` from ``/proc/PID/stat`` (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold anything, ")" included: fields follow the last ")".
    fields = text[text.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


# Tasks the gathers of this process are running (their own children, reaped by
# them): a sweep at the end of one job never touches another job's tasks.
_tasks_lock = threading.Lock()
_running_tasks: set[int] = set()


def sweep_children(uid: int, timeout: float = _SWEEP_SECONDS) -> int:
    """Kill and reap every child of this process whose real uid is ``uid``,
    except running tasks (of any gather of this process).

    With this process a child subreaper, the orphaned descendants of its
    tasks are its children: each round kills those found, reaps them (their
    own children are re-parented here in turn) and looks again, until none
    is left or ``timeout`` passes. Returns how many were killed.
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    killed = 0
    while True:
        with _tasks_lock:
            spare = set(_running_tasks)
        found = [p for p in _pids() if p not in spare and _parent(p) == me and _real_uid(p) == uid]
        if not found:
            return killed
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # unreaped: the pid cannot have been reused
        killed += len(found)
        waiting = set(found)
        while waiting:
            for pid in list(waiting):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        waiting.discard(pid)
                except ChildProcessError:
                    waiting.discard(pid)
            if waiting and time.monotonic() > deadline:
                log.warning("job processes %s do not die (uninterruptible?)", sorted(waiting))
                return killed
            if waiting:
                time.sleep(0.005)


def sweep_marked(token: str, uid: int, timeout: float = _SWEEP_SECONDS) -> int:
    """Kill every process of ``uid`` whose environment has ``JOB_MARKER=token``.

    Each is signalled through a pidfd on which the marker was checked again,
    so a pid reused between the look and the kill is never hit. Returns how
    many were killed.
    """
    mark = f"{JOB_MARKER}={token}".encode()
    me = os.getpid()
    deadline = time.monotonic() + timeout
    killed = 0
    while time.monotonic() < deadline:
        hit = 0
        for pid in _pids():
            try:
                if pid == me or os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
            except OSError:
                continue
            if mark not in _environ(pid):
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone
            try:
                if mark in _environ(pid):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    hit += 1
            except OSError:
                pass
            finally:
                os.close(pidfd)
        killed += hit
        if not hit:
            return killed
    log.warning("job %s: processes marked with it still appear after %.0f s", token, timeout)
    return killed


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
    manager; ``close`` kills every process the job left (see the module
    docstring) and removes the job's cgroup.
    """

    def __init__(self, conf: Confinement, job: str, memory: int | None, cores: int) -> None:
        self.user = conf.user
        self.nice = conf.nice
        self.token = secrets.token_hex(8)
        self._prefix: tuple[list[str], int, Callable[[], None] | None] | None = None
        self.cgroup: JobCgroup | None = None
        self.rlimit: int | None = None
        self.memory_limit = "none"
        self._subreaper = False
        self._limit_memory(conf, job, memory, cores)
        if self.cgroup is None and self.user is not None:
            self._subreaper = _Subreaper.hold()

    def _limit_memory(self, conf: Confinement, job: str, memory: int | None, cores: int) -> None:
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

    def task_started(self, pid: int) -> None:
        """``pid`` is a task of this job, reaped by its gather: never swept."""
        with _tasks_lock:
            _running_tasks.add(pid)

    def task_reaped(self, pid: int) -> None:
        with _tasks_lock:
            _running_tasks.discard(pid)

    def environment(self) -> dict[str, str]:
        """Variables every task of the job gets (the sweep's marker)."""
        return {JOB_MARKER: self.token}

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
        """Processes of the job the kernel killed for its memory limit so far (any
        process in the job's cgroup: a task, or a child of a task that itself
        exited 0)."""
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
        """Kill every process the job left running and remove its cgroup."""
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        elif self._subreaper:
            assert self.user is not None
            try:
                sweep_children(self.user.uid)
            finally:
                _Subreaper.release()
                self._subreaper = False
        else:
            sweep_marked(self.token, os.getuid() if self.user is None else self.user.uid)

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
