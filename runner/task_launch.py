"""How one task of a job is started confined: the argv prefix, or the slow path's preexec_fn.

The gather must not run Python between fork and exec (a ``preexec_fn``
makes ``subprocess`` fork instead of vfork, copy the page tables of a daemon
of hundreds of MB and wait while the child runs Python's after-fork hooks:
2-5 ms of the gather per task, ten times that on a CPU-starved node). So the
child is started with vfork and *execs* the confinement, in this order:

1. ``/bin/sh -c`` (only when there is a cgroup to join or an rlimit to set):
   ``echo 0 >&0`` with the job cgroup's ``cgroup.procs`` (opened by the gather
   as root) as its stdin, so the process joins the cgroup while still root,
   before anything of the job runs; ``ulimit -d`` for the rlimit fallback;
   then ``exec ... </dev/null``, which closes that descriptor. Either step
   failing exits with :data:`SETUP_FAILED`;
2. ``setpriv`` (util-linux >= 2.33) drops groups, gid and uid and only then
   sets ``PR_SET_PDEATHSIG`` (the kernel clears the parent-death signal on
   any credential change) and execs the command.

The task's niceness is raised by the gather right after the start (a
priority, not a security boundary). Without a ``setpriv`` that knows
``--pdeathsig``, the same steps run in a ``preexec_fn`` (the slow path). A
gather that dies in the instant between the start and ``setpriv``'s prctl
leaves that task running; with a cgroup, the next gather sweeps it.

Invariant: nothing of the job runs before it is in the job's cgroup, under
its rlimit, as the job user, with the parent-death signal set; in that order.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from runner.job_user import JobUser

log = logging.getLogger("runner.task_launch")

SETUP_FAILED = 125  # the launcher's exit status when joining the cgroup or ulimit fails
_PR_SET_PDEATHSIG = 1


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


class TaskLauncher:
    """Starts the tasks of one job: the same prefix (or preexec_fn) for each.

    ``user``: who tasks run as (None: the node's own user); ``procs_fd``: the
    job cgroup's ``cgroup.procs`` open for writing (None: no cgroup);
    ``rlimit``: ``RLIMIT_DATA`` per task (None: none); ``nice``: added to
    each task's niceness by the gather.
    """

    def __init__(
        self, user: JobUser | None, procs_fd: int | None, rlimit: int | None, nice: int
    ) -> None:
        self.user = user
        self.procs_fd = procs_fd
        self.rlimit = rlimit
        self.nice = nice
        self._prefix: tuple[list[str], int, Callable[[], None] | None] | None = None

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
        if self.procs_fd is not None:
            # stdin is cgroup.procs: join it
            steps.append(f"echo 0 >&0 || exit {SETUP_FAILED}")
            stdin = self.procs_fd
        if self.rlimit is not None:
            steps.append(f"ulimit -d {max(1, self.rlimit // 1024)} || exit {SETUP_FAILED}")
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
        procs_fd = self.procs_fd
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
