"""Confinement of a job's tasks: which user they run as, their memory limit, their end.

:class:`Confinement` is the node's setting (job user, parent cgroup,
niceness); :class:`JobConfinement` applies it to one running job and owns
everything the job's confinement holds. The parts live in their own modules:

* :mod:`runner.job_user`: who tasks run as (a dedicated unprivileged user
  on a root node, else the node's own) and the checks that it can reach the
  work directory and execute the command;
* :mod:`runner.memory_cgroup`: the lease's memory (``max_rss_bytes``)
  limits the *whole job* through one memory cgroup per job (v2, or v1 on a
  hybrid hierarchy). When no usable memory controller exists (or creating
  the cgroup fails: not root, a read-only or undelegated hierarchy) the
  limit falls back to ``RLIMIT_DATA`` = limit / cores per task, with a log
  message saying why; a task over it sees allocation failures instead;
* :mod:`runner.task_launch`: how each task is started (vfork + exec of
  ``sh`` and ``setpriv``, or the slow ``preexec_fn``) so that nothing of it
  runs before it is confined;
* :mod:`runner.process_sweep`: the end-of-job sweep without a cgroup.

Invariant: every process a job started is gone when the job ends, also one
that left its task's process group (``setsid``), whose kill the gather's
``killpg`` at the task's end misses. :meth:`JobConfinement.close` sweeps:

* with a cgroup: every process in it is killed (``cgroup.kill`` on v2, else
  SIGKILL to each pid in ``cgroup.procs`` until it is empty) and the cgroup
  removed: nothing can leave a cgroup on its own;
* without one, when tasks run as a job user (a root node): the gather's
  process is a child subreaper while the job runs, and at the end every
  child of the gather whose real uid is the job user's is killed and reaped
  (:func:`runner.process_sweep.sweep_children`);
* without either (tasks keep the node's own user; or the kernel refused the
  subreaper): every process of the tasks' uid whose environment carries
  this job's ``SWARM_RUNNER_JOB`` token is killed through a pidfd
  (:func:`runner.process_sweep.sweep_marked`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from runner.job_user import JobUser, check_reachable
from runner.memory_cgroup import JobCgroup, find_memory_hierarchy, read_controllers
from runner.process_sweep import (
    JOB_MARKER,
    Subreaper,
    add_running_task,
    discard_running_task,
    sweep_children,
    sweep_marked,
)
from runner.task_launch import TaskLaunch, TaskLauncher

log = logging.getLogger("runner.confine")

DEFAULT_CGROUP_PARENT = "swarm-jobs"
DEFAULT_NICE = 5

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
        self.cgroup: JobCgroup | None = None
        self.rlimit: int | None = None
        self.memory_limit = "none"
        self._subreaper = False
        self._limit_memory(conf, job, memory, cores)
        self._launcher = TaskLauncher(
            self.user,
            None if self.cgroup is None else self.cgroup.procs_fd,
            self.rlimit,
            self.nice,
        )
        if self.cgroup is None and self.user is not None:
            self._subreaper = Subreaper.hold()

    def _limit_memory(self, conf: Confinement, job: str, memory: int | None, cores: int) -> None:
        if memory is None:
            return
        why = "cgroups are disabled for this node (cgroup_parent unset)"
        if conf.cgroup_parent:
            try:
                with open(conf.mounts) as f:
                    hierarchy = find_memory_hierarchy(f.read(), read_controllers)
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
        add_running_task(pid)

    def task_reaped(self, pid: int) -> None:
        discard_running_task(pid)

    def environment(self) -> dict[str, str]:
        """Variables every task of the job gets (the sweep's marker)."""
        return {JOB_MARKER: self.token}

    def launch(self, argv: list[str]) -> TaskLaunch:
        """How to start one task running ``argv`` under this confinement."""
        return self._launcher.launch(argv)

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
                Subreaper.release()
                self._subreaper = False
        else:
            sweep_marked(self.token, os.getuid() if self.user is None else self.user.uid)

    def __enter__(self) -> JobConfinement:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
