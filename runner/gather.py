"""The gather: the event loop that runs one job's tasks on the node's cores.

One worker slot per core; each task is one run of the spec's command as a
child process, started confined (:mod:`runner.confine`) in its own process
group and session, with its output committed through the work directory's
:class:`~runner.workdir.CommitLog`. What to run next, retries and
abandonment are decided by the pure :class:`~runner.scatter.ScatterGather`;
this module only turns its assignments into processes and their ends back
into outcomes.

The loop is event driven: each child has a pidfd in a selector, beside an
eventfd that :meth:`StopRequest.request` writes, so a task's exit or a stop
is handled at once and an idle gather costs nothing; the selector's timeout
is the nearest timer (task timeout, grace end, lease deadline, shutdown
probe). Without a pidfd (an old kernel) children are polled every
``poll_interval``. A stop stops dispatch; running tasks get ``grace``
seconds, then are killed and reported as cut. With a ``deadline`` (the
lease's end), no task is started that would not finish before it by the
measured duration of earlier tasks, and tasks still running at the deadline
are cut: an elastic job stops itself, it is never killed by its lease.

Invariants: a task's process group is killed before its leader is reaped
(while the unreaped leader still holds the group's id), so nothing it left
in its group survives it; every task started is reaped by this gather,
also when it is closed early (:meth:`Gather.close`); commits are made
durable after each dispatch, so fsync latency never delays starting a task.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from runner.confine import JobConfinement
from runner.exceptions import TaskError
from runner.scatter import Assignment, ScatterGather
from runner.spec import JobSpec
from runner.stop import StopRequest
from runner.task_launch import SETUP_FAILED
from runner.workdir import CommitLog

# Estimated task duration x this must fit before the deadline for the task to start.
_DEADLINE_MARGIN = 1.2
_EWMA = 0.3
# The longest the gather sleeps at once: epoll refuses timeouts beyond ~24.8 days,
# and a far deadline (a lease of years) must not crash the loop.
_MAX_WAIT = 3600.0


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _Running:
    def __init__(self, a: Assignment, proc: subprocess.Popen[bytes], part: str) -> None:
        self.assignment = a
        self.proc = proc
        self.part = part
        self.pidfd: int | None = None
        self.cpu = 0.0


class Gather:
    """The event loop of one run; see the module docstring.

    ``run`` until the scatter-gather is finished, then ``close`` (also after
    an error): it kills what still runs and flushes the commits.
    """

    def __init__(
        self,
        spec: JobSpec,
        work: Path,
        sg: ScatterGather,
        conf: JobConfinement,
        env: Mapping[str, str],
        stop: StopRequest,
        *,
        should_stop: Callable[[], str | None] | None,
        grace: float,
        deadline: float | None,
        task_estimate: float | None,
        clock: Callable[[], float],
        poll_interval: float,
    ) -> None:
        self.spec = spec
        # Plain strings on the per-task path: pathlib costs more than the syscalls.
        self.tasks_prefix = f"{work / 'tasks'}/"
        self.parts_prefix = f"{work / 'parts'}/"
        self.scratch = work / "scratch"
        self.sg = sg
        self.conf = conf
        # Encoded once: subprocess would encode every variable for every task.
        self.env = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        self.stop = stop
        self.should_stop = should_stop
        self.grace = grace
        self.deadline = deadline
        self.clock = clock
        self.poll_interval = poll_interval
        self.per_event = None if task_estimate is None else task_estimate / spec.events_per_task
        self.paced = False  # per_event measured by a commit of this run, not estimated
        self.base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.running: dict[int, _Running] = {}
        self.stopped: str | None = None
        self.cut_at: float | None = None
        self.cpu = 0.0
        self.cpu_committed = 0.0
        self.task_runs = 0
        self.busy = 0.0
        self.spawning = 0.0
        self.spawn_cpu = 0.0
        self.busy_cpu = 0.0
        self.memory_kills = 0
        self.nonce = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.sel.register(self.wake_fd, selectors.EVENT_READ, None)
        self.commits = CommitLog(work, conf.user)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake_fd, 1)

    # --- one task's life
    def spawn(self, a: Assignment) -> None:
        part = f"{self.parts_prefix}{a.task:06d}.{a.attempt}.{self.nonce}.part"
        log = f"{self.tasks_prefix}{a.task:06d}.{a.attempt}.log"
        argv = self.spec.argv(a.events.first, a.events.count, part)
        self.env[b"SWARM_RUNNER_WORKER"] = b"%d" % a.worker
        self.env[b"SWARM_RUNNER_TASK"] = b"%d" % a.task
        launch = self.conf.launch(argv)
        t0 = c0 = 0.0
        try:
            with open(log, "wb") as logf:
                t0 = time.perf_counter()
                c0 = time.thread_time()
                proc = subprocess.Popen(
                    launch.argv,
                    stdin=launch.stdin,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.scratch,
                    start_new_session=True,
                    preexec_fn=launch.preexec_fn,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            # A command that cannot be executed will not improve on retry.
            self.sg.failed(a, f"cannot start {argv[0]}: {exc}")
            who = "" if self.conf.user is None else f" as {self.conf.user.name}"
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise TaskError(f"cannot start {argv[0]!r}{who}: {why}") from exc
        finally:
            if t0:
                self.spawning += time.perf_counter() - t0
                self.spawn_cpu += time.thread_time() - c0
        self.task_runs += 1
        self.conf.task_started(proc.pid)
        if launch.nice:
            with contextlib.suppress(OSError):  # it may have ended already
                os.setpriority(os.PRIO_PROCESS, proc.pid, self.base_nice + launch.nice)
        r = _Running(a, proc, part)
        try:
            r.pidfd = os.pidfd_open(proc.pid)
            self.sel.register(r.pidfd, selectors.EVENT_READ, r)
        except (OSError, AttributeError):
            r.pidfd = None  # no pidfd (old kernel): this child is polled
        self.running[a.worker] = r

    def _reaped(self, r: _Running, block: bool) -> bool:
        """Collect the exit status and CPU time of ``r``; False if it still runs.

        Whatever the task left running in its process group is killed first,
        while the unreaped leader still holds the group's id.
        """
        try:
            if os.waitid(os.P_PID, r.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                if not block:
                    return False
                os.waitid(os.P_PID, r.proc.pid, os.WEXITED | os.WNOWAIT)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(r.proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(r.proc.pid, 0)
        except ChildProcessError:  # reaped elsewhere: no status, no CPU figure
            if r.proc.returncode is None:
                r.proc.returncode = -signal.SIGKILL
            usage = None
        else:
            r.proc.returncode = os.waitstatus_to_exitcode(status)
        self.conf.task_reaped(r.proc.pid)
        if usage is not None:
            r.cpu = usage.ru_utime + usage.ru_stime
            self.cpu += r.cpu
        if r.pidfd is not None:
            self.sel.unregister(r.pidfd)
            os.close(r.pidfd)
            r.pidfd = None
        return True

    def kill(self, r: _Running) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.proc.pid, signal.SIGKILL)
        self._reaped(r, block=True)
        _unlink(r.part)

    def finished(self, r: _Running) -> None:
        del self.running[r.assignment.worker]
        a = r.assignment
        rc = r.proc.returncode
        assert rc is not None
        if rc == 0:
            self.count_memory_kills()
            why = self.commit(r)
            if why is None:
                return
        else:
            why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            if rc == SETUP_FAILED:
                why += " (the task's confinement may have failed: see its log)"
            if rc == -signal.SIGKILL and self.count_memory_kills():
                why = f"killed by the memory limit ({self.conf.memory_limit})"
            _unlink(r.part)
        self.sg.failed(a, why)

    def count_memory_kills(self) -> bool:
        """Take in the job's OOM kills so far; True if there were new ones.

        Read at every task's end, whatever its exit status: the kernel may
        have killed a child of a task that itself exited 0.
        """
        if self.conf.cgroup is None:
            return False
        kills = self.conf.memory_kills()
        new = kills > self.memory_kills
        self.memory_kills = max(self.memory_kills, kills)
        return new

    def commit(self, r: _Running) -> str | None:
        """Take the output of a run that exited 0; None if it is good, else why not.

        The task counts as done at once (its worker is free for the next
        task); its output, the directory and the journal line are made
        durable by the :class:`CommitLog`'s flush after the next dispatch, so
        fsync latency never keeps a core idle.
        """
        a = r.assignment
        why = self.commits.take(r.part, a.task, lambda: self.sg.succeeded(a))
        if why is not None:
            return why
        self.cpu_committed += r.cpu
        self.paced = True
        per_event = (self.clock() - a.started) / a.events.count
        self.per_event = (
            per_event
            if self.per_event is None
            else (1 - _EWMA) * self.per_event + _EWMA * per_event
        )
        return None

    # --- the loop
    def _next_fits(self, now: float) -> bool:
        task = self.sg.next_pending()
        if self.deadline is None or self.per_event is None or task is None:
            return True
        count = self.sg.plan.range_of(task).count
        return now + self.per_event * count * _DEADLINE_MARGIN <= self.deadline

    def _halt(self, reason: str, cut_at: float) -> None:
        if not self.sg.stopping:
            self.sg.stop()
            self.stopped = self.stopped or reason
        self.cut_at = cut_at if self.cut_at is None else min(self.cut_at, cut_at)

    def run(self) -> None:
        sg = self.sg
        next_probe = self.clock() + 1.0  # the lease was read just before the run
        ready: list[tuple[selectors.SelectorKey, int]] = []
        stop_seen = False
        self.stop.subscribe(self._wake)
        try:
            while True:
                t0 = time.perf_counter()
                c0 = time.thread_time()
                spawning0 = self.spawning
                spawn_cpu0 = self.spawn_cpu
                for key, _ in ready:
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(self.wake_fd)
                    elif self._reaped(key.data, block=False):
                        self.finished(key.data)
                for r in [r for r in self.running.values() if r.pidfd is None]:
                    if self._reaped(r, block=False):
                        self.finished(r)
                now = self.clock()
                for a in sg.expired(now):
                    r = self.running.pop(a.worker)
                    self.kill(r)
                    sg.failed(a, f"timed out after {self.spec.task_timeout} s")
                if self.should_stop is not None and now >= next_probe:
                    next_probe = now + 1.0
                    reason = self.should_stop()
                    if reason:  # this job stops; a pilot may go on with others
                        self._halt(reason, now + self.grace)
                if self.stop.requested and not stop_seen:
                    stop_seen = True
                    grace = self.grace if self.stop.grace is None else self.stop.grace
                    self._halt(self.stop.reason or "stop", now + grace)
                if self.deadline is not None:
                    if now >= self.deadline:
                        self._halt("lease deadline reached", now)
                    elif not sg.stopping and not self._next_fits(now):
                        left = self.deadline - now
                        why = f"lease ends in {left:.3g} s: no time for another task"
                        self._halt(why, self.deadline)
                if self.cut_at is not None and now >= self.cut_at:
                    for r in list(self.running.values()):
                        self.kill(r)
                        sg.cut(r.assignment)
                    self.running.clear()
                for a in sg.dispatch(now):
                    self.spawn(a)
                self.busy += time.perf_counter() - t0 - (self.spawning - spawning0)
                self.busy_cpu += time.thread_time() - c0 - (self.spawn_cpu - spawn_cpu0)
                self.commits.flush()
                if sg.finished:
                    return
                ready = self.sel.select(self._timeout(now, next_probe))
        finally:
            self.stop.unsubscribe(self._wake)

    def _timeout(self, now: float, next_probe: float) -> float:
        timers = [a.deadline for a in self.sg.running.values() if a.deadline is not None]
        if self.should_stop is not None:
            timers.append(next_probe)
        if self.cut_at is not None:
            timers.append(self.cut_at)
        if self.deadline is not None:
            timers.append(self.deadline)
        timeout = _MAX_WAIT if not timers else min(_MAX_WAIT, max(0.0, min(timers) - now))
        if any(r.pidfd is None for r in self.running.values()):
            timeout = min(timeout, self.poll_interval)
        return timeout

    def close(self) -> None:
        for r in self.running.values():
            self.kill(r)
        self.running.clear()
        self.commits.flush()
        self.sel.close()
        os.close(self.wake_fd)
        self.commits.close()
