"""The end-of-job sweep of a job's processes when it has no cgroup.

A task that ends is killed with its process group, but a process that left
the group (``setsid``, a daemon) escapes that kill. With a memory cgroup the
cgroup's removal ends them (:mod:`runner.memory_cgroup`); without one, this
module finds them:

* when tasks run as a job user (a root node): the gather's process is a
  child subreaper (``PR_SET_CHILD_SUBREAPER``, held through
  :class:`Subreaper`) while the job runs, so every orphaned descendant of a
  task is re-parented to it instead of init, whatever it does (``setsid``,
  double fork, a cleared environment); :func:`sweep_children` kills and
  reaps every child of the gather whose real uid is the job user's, round
  after round until none is left;
* otherwise (tasks keep the node's own user: no boundary between them and
  the node anyway; or the kernel refused the subreaper):
  :func:`sweep_marked` kills every process of the tasks' uid whose
  environment carries this job's ``SWARM_RUNNER_JOB`` token (set for every
  task, random per job). Orphans then belong to init, which reaps them. A
  process that clears its environment escapes this sweep: accidents
  (``setsid daemon &``) are caught, not malice.

Invariants: a sweep never hits a process it did not mean to. A child that is
not reaped keeps its pid (no pid-reuse race in :func:`sweep_children`);
:func:`sweep_marked` signals through a pidfd on which the token is checked
again. Tasks still running under any gather of this process are registered
(:func:`add_running_task`) and never swept by another job's sweep: their
gather reaps them. Every sweep gives up (and logs) after a deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger("runner.process_sweep")

JOB_MARKER = "SWARM_RUNNER_JOB"  # environment variable carrying the job's token
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_SWEEP_SECONDS = 5.0  # how long a sweep keeps killing before it gives up (and logs)


def _prctl() -> Callable[..., int]:
    fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return fn


class Subreaper:
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


# Tasks the gathers of this process are running (their own children, reaped by
# them): a sweep at the end of one job never touches another job's tasks.
_tasks_lock = threading.Lock()
_running_tasks: set[int] = set()


def add_running_task(pid: int) -> None:
    """``pid`` is a running task, reaped by its gather: no sweep touches it."""
    with _tasks_lock:
        _running_tasks.add(pid)


def discard_running_task(pid: int) -> None:
    """``pid`` was reaped by its gather (a sweep may find the pid again, reused)."""
    with _tasks_lock:
        _running_tasks.discard(pid)


# --- /proc ---------------------------------------------------------------------


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


# --- the sweeps ------------------------------------------------------------------


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
