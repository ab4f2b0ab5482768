"""Run one elastic job on the whole node: the process adapter of scatter-gather.

One worker slot per core; each task is one run of the spec's command as a
child process. Layout of the job's work directory::

    journal.jsonl               header (the plan) + one line per committed task
    tasks/000007.out            output of committed task 7 (gather-owned, read-only to tasks)
    tasks/000007.2.log          stdout and stderr of attempt 2 of task 7
    parts/000007.2.<pid>.part   what attempt 2 writes while it runs (job user's directory)
    scratch/                    the tasks' working directory and $HOME (job user's)
    events.out                  the gathered output: committed tasks in event order
    report.json                 the last RunReport

Commit protocol for a task that exited 0: rename its part file from
``parts/`` (writable by the job) to ``tasks/NNNNNN.out`` (writable only by
the gather, so the entry cannot be swapped afterwards), check that it is a
regular file with one link owned by the job user (a symlink or hard link
planted by a task must not pull a node file into the output), hand it to the
gather's user, fsync it and ``tasks/``, append the journal line and fsync the
journal. A gather killed anywhere in between leaves either no commit line (the
task is run again; its ``.out`` is overwritten by the rerun's rename) or a
durable commit line with its output in place.

Tasks are confined by :mod:`runner.confine` (job user, memory cgroup or
rlimit, ``PR_SET_PDEATHSIG`` so that a SIGKILLed gather takes its running
tasks with it instead of leaving them to write into a directory a restarted
gather owns).

The loop is event driven: each child has a pidfd in a selector, beside an
eventfd that :meth:`StopRequest.request` writes, so a task's exit or a stop
is handled at once and an idle gather costs nothing; the selector's timeout
is the nearest timer (task timeout, grace end, lease deadline, shutdown
probe). SIGTERM (or ``StopRequest.request``) stops dispatch; running tasks get
``grace`` seconds, then are killed and reported as cut. With a ``deadline``
(the lease's end), no task is started that would not finish before it by the
measured duration of earlier tasks, and tasks still running at the deadline
are cut: an elastic job stops itself, it is never killed by its lease.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from runner.confine import Confinement, JobConfinement, command_path
from runner.exceptions import JournalError, TaskError
from runner.scatter import (
    Assignment,
    Plan,
    ScatterGather,
    TaskSet,
    header_line,
    replay_journal,
)
from runner.spec import JobSpec

# Estimated task duration x this must fit before the deadline for the task to start.
_DEADLINE_MARGIN = 1.2
_EWMA = 0.3
_SETUP_FAILED = 125  # the launcher's exit status when joining the cgroup or ulimit fails
# The longest the gather sleeps at once: epoll refuses timeouts beyond ~24.8 days,
# and a far deadline (a lease of years) must not crash the loop.
_MAX_WAIT = 3600.0


MAX_GRACE = 3600.0  # seconds: a stop (a node's shutdown) must end in bounded time


def grace_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a grace period, None if it is usable:
    seconds from 0 (cut at once) to ``MAX_GRACE``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_GRACE
    ):
        text = repr(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"expected seconds from 0 to {MAX_GRACE:g}, got {text}"
    return None


class StopRequest:
    """Set from a signal handler, the API or a shutdown probe; read by the loop.

    ``request`` may come from any thread (or a signal handler in the main
    thread): it wakes every gather waiting on this request at once.
    ``grace``, when given with the first request, overrides the run's grace.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.grace: float | None = None
        # Reentrant: a signal handler may run while the main thread holds it.
        self._lock = threading.RLock()
        self._wakers: list[Callable[[], None]] = []

    def request(self, reason: str, grace: float | None = None) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
                self.grace = grace
            # Called under the lock, so no waker runs after its unsubscribe returned.
            for wake in self._wakers:
                wake()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def subscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers.append(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers.remove(wake)


@contextlib.contextmanager
def stop_on_sigterm(stop: StopRequest) -> Iterator[StopRequest]:
    """Turn SIGTERM into ``stop.request`` while the block runs (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.request("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class RunReport:
    """What one run of a job did.

    ``cpu_seconds`` is the CPU time of every task run (from ``wait4``),
    ``cpu_seconds_committed`` that of the runs whose output was committed.
    Costs of the gather itself, over ``task_runs`` started runs:
    ``dispatch_seconds`` is its busy time on the critical path, from a wakeup
    to the end of the dispatch it caused (reaping, taking outputs, scatter,
    bookkeeping) without starting the commands, whose time is
    ``spawn_seconds`` (``Popen``: vfork, exec); ``dispatch_cpu_seconds`` is
    the CPU time of that critical path (its wall time also counts being
    preempted by the tasks on a fully used node); ``commit_seconds`` is the
    deferred fsyncs of outputs and journal, off the critical path;
    ``gather_cpu_seconds`` is the CPU time of the gather's thread.
    """

    job: str
    events_planned: int
    events_done: int
    tasks: int
    tasks_committed: int
    failed_runs: int
    cut_runs: int
    abandoned: dict[int, list[str]]  # the first 100 abandoned tasks and why
    complete: bool
    stopped: str | None
    resumed_tasks: int
    wall_seconds: float
    cpu_seconds: float
    output: str
    failures: list[str] = field(default_factory=list)
    cpu_seconds_committed: float = 0.0
    task_runs: int = 0
    dispatch_seconds: float = 0.0
    dispatch_cpu_seconds: float = 0.0
    spawn_seconds: float = 0.0
    commit_seconds: float = 0.0
    gather_cpu_seconds: float = 0.0
    user: str = ""
    memory_limit: str = "none"
    memory_kills: int = 0
    seconds_per_event: float | None = None  # wall time of a task / its events, smoothed
    tasks_abandoned: int = 0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["abandoned"] = {str(k): v for k, v in self.abandoned.items()}
        return d


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Running:
    def __init__(self, a: Assignment, proc: subprocess.Popen[bytes], part: str) -> None:
        self.assignment = a
        self.proc = proc
        self.part = part
        self.pidfd: int | None = None
        self.cpu = 0.0


def _drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (no newline) so new lines start on a line boundary."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 4096)
            f.seek(pos - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                pos = pos - step + newline + 1
                break
            pos -= step
        if pos != end:
            f.truncate(pos)
            os.fsync(f.fileno())


def open_journal(workdir: Path, plan: Plan) -> tuple[Plan, TaskSet]:
    """Create the journal for ``plan``, or replay an existing one (line by line).

    An existing journal's plan wins (a resumed job keeps the size it was given
    when it started); it must be for the same job.

    Raises:
        JournalError: the journal is corrupt, for another job, or a committed
            task's output is missing.
    """
    path = workdir / "journal.jsonl"
    if path.exists():
        with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
            old, committed = replay_journal(f)
        if old.job != plan.job:
            raise JournalError(f"{path} belongs to job {old.job!r}, not {plan.job!r}")
        _drop_torn_tail(path)
        for t in committed:
            if not os.path.exists(f"{workdir}/tasks/{t:06d}.out"):
                raise JournalError(f"task {t} is committed in {path} but its output is missing")
        return old, committed
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(header_line(plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(workdir)
    return plan, TaskSet()


class _Gather:
    """The event loop of one run; see the module docstring."""

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
        self.tasks_dir = work / "tasks"
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
        self.committing = 0.0
        self.unflushed: list[tuple[int, str]] = []  # (output fd, journal line)
        self.memory_kills = 0
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self.nonce = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.sel.register(self.wake_fd, selectors.EVENT_READ, None)
        self.journal = open(work / "journal.jsonl", "a")  # noqa: SIM115 (closed in close)

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
            if rc == _SETUP_FAILED:
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
        durable by :meth:`flush_commits` after the next dispatch, so fsync
        latency never keeps a core idle. Until its line is durable the task
        is not committed: a gather dying before reruns it.
        """
        a = r.assignment
        dest = f"{self.tasks_prefix}{a.task:06d}.out"
        try:
            os.replace(r.part, dest)
        except FileNotFoundError:
            return "exit status 0 but no output file"
        # dest is in a directory only the gather writes: the entry cannot change
        # under us; O_NOFOLLOW + fstat check the very inode we will gather.
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ELOOP: a symlink
            fd = -1
        user = self.conf.user
        if fd >= 0:
            st = os.fstat(fd)
            good = (
                stat.S_ISREG(st.st_mode)
                and st.st_nlink == 1
                and (user is None or st.st_uid == user.uid)
            )
        if fd < 0 or not good:
            if fd >= 0:
                os.close(fd)
            os.unlink(dest)
            return "output is not a regular file of the job's own (symlink or hard link?)"
        if user is not None:
            # The job user may no longer write what is committed.
            os.fchown(fd, self.uid, self.gid)
            os.fchmod(fd, 0o644)
        self.unflushed.append((fd, self.sg.succeeded(a)))
        self.cpu_committed += r.cpu
        self.paced = True
        per_event = (self.clock() - a.started) / a.events.count
        self.per_event = (
            per_event
            if self.per_event is None
            else (1 - _EWMA) * self.per_event + _EWMA * per_event
        )
        return None

    def flush_commits(self) -> None:
        """Make taken outputs durable, then their journal lines (group commit)."""
        if not self.unflushed:
            return
        t0 = time.perf_counter()
        lines = []
        for fd, line in self.unflushed:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            lines.append(line)
        self.unflushed.clear()
        _fsync_dir(self.tasks_dir)
        self.journal.write("".join(lines))
        self.journal.flush()
        os.fsync(self.journal.fileno())
        self.committing += time.perf_counter() - t0

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
                self.flush_commits()
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
        self.flush_commits()
        self.sel.close()
        os.close(self.wake_fd)
        self.journal.close()


def run_job(
    spec: JobSpec,
    events: int,
    workdir: str | Path,
    *,
    cores: int,
    stop: StopRequest | None = None,
    should_stop: Callable[[], str | None] | None = None,
    grace: float = 10.0,
    memory: int | None = None,
    confinement: Confinement | None = None,
    deadline: float | None = None,
    task_estimate: float | None = None,
    max_attempts: int = 3,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    poll_interval: float = 0.05,
) -> RunReport:
    """Run ``events`` events of ``spec`` with ``cores`` workers in ``workdir``.

    Resumes from ``workdir/journal.jsonl`` if present. ``should_stop`` is
    polled about once a second (e.g. a changed MJF shutdowntime) and returns a
    reason to stop this run or None (``stop`` is left alone: a pilot sharing
    it goes on with jobs that fit the new lease). ``memory`` limits the whole job (bytes), applied
    as ``confinement`` says (see :mod:`runner.confine`). ``deadline`` (a
    ``clock`` time) is when tasks must be done; ``task_estimate`` (seconds)
    is the expected duration of one task before any has been measured.
    ``poll_interval`` is used only when the kernel has no pidfd.

    Raises:
        JournalError: see :func:`open_journal`.
        TaskError: the command cannot be started at all (missing, or not
            executable by the job user).
        ConfinementError: the job user cannot reach the work directory.
    """
    work = Path(workdir)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or StopRequest()
    plan, committed = open_journal(
        work, Plan(spec.name, spec.first_event, events, spec.events_per_task)
    )
    t0 = clock()
    cpu0 = time.thread_time()
    with JobConfinement(confinement or Confinement(), spec.name, memory, cores) as conf:
        conf.prepare_dir(work / "parts")
        conf.prepare_dir(work / "scratch")
        for stale in [*tasks_dir.glob("*.part"), *(work / "parts").glob("*.part")]:
            stale.unlink(missing_ok=True)
        sg = ScatterGather(
            plan,
            cores,
            committed=committed,
            task_timeout=spec.task_timeout,
            max_attempts=max_attempts,
        )
        child_env = dict(os.environ if env is None else env)
        # A command that cannot run will not improve on retry: refuse at once.
        command_path(spec.argv(0, 0, "-")[0], child_env, conf.user)
        child_env.update(conf.environment())
        if conf.user is not None:
            child_env.update(
                HOME=str(work / "scratch"), USER=conf.user.name, LOGNAME=conf.user.name
            )
        gather = _Gather(
            spec,
            work,
            sg,
            conf,
            child_env,
            stop,
            should_stop=should_stop,
            grace=grace,
            deadline=deadline,
            task_estimate=task_estimate,
            clock=clock,
            poll_interval=poll_interval,
        )
        try:
            gather.run()
        finally:
            gather.close()
            gather.count_memory_kills()  # before the cgroup goes, with its counter
        memory_limit = conf.memory_limit

    output = gather_output(work, plan, sg.committed)
    report = RunReport(
        job=spec.name,
        events_planned=plan.events,
        events_done=sg.events_done,
        tasks=plan.tasks,
        tasks_committed=len(sg.committed),
        failed_runs=sg.failed_runs,
        cut_runs=sg.cut_runs,
        abandoned=sg.abandoned,
        complete=sg.complete,
        stopped=gather.stopped or stop.reason,
        resumed_tasks=len(committed),
        wall_seconds=clock() - t0,
        cpu_seconds=gather.cpu,
        output=str(output),
        failures=sg.failures,
        cpu_seconds_committed=gather.cpu_committed,
        task_runs=gather.task_runs,
        dispatch_seconds=gather.busy,
        dispatch_cpu_seconds=gather.busy_cpu,
        spawn_seconds=gather.spawning,
        commit_seconds=gather.committing,
        gather_cpu_seconds=time.thread_time() - cpu0,
        user=str(conf.user) if conf.user is not None else f"uid {os.geteuid()} (the node's)",
        memory_limit=memory_limit,
        memory_kills=gather.memory_kills,
        seconds_per_event=gather.per_event if gather.paced else None,
        tasks_abandoned=sg.abandoned_count,
    )
    (work / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    return report


def gather_output(workdir: Path, plan: Plan, committed: TaskSet) -> Path:
    """Concatenate committed task outputs in event order into ``events.out``."""
    out = workdir / "events.out"
    tmp = workdir / "events.out.tmp"
    with open(tmp, "wb") as dst:
        for t in committed:  # in task order, which is event order
            with open(workdir / "tasks" / f"{t:06d}.out", "rb") as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)
    return out
