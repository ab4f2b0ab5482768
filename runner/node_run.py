"""Run one elastic job on the whole node: the process adapter of scatter-gather.

One worker slot per core; each task is one run of the spec's command as a
child process. Layout of the job's work directory::

    journal.jsonl               header (the plan) + one line per committed task
    tasks/000007.out            output of committed task 7
    tasks/000007.2.<pid>.part   attempt 2 of task 7 while it runs (discarded on failure)
    tasks/000007.2.log          the attempt's stdout and stderr
    events.out                  the gathered output: committed tasks in event order
    report.json                 the last RunReport

Commit protocol for a task that exited 0: fsync its part file, rename it to
``NNNNNN.out``, fsync the directory, append the journal line and fsync the
journal. A gather killed anywhere in between leaves either no commit line (the
task is run again; its ``.out`` is overwritten by the rerun's rename) or a
durable commit line with its output in place.

Children get ``PR_SET_PDEATHSIG`` (SIGKILL) so that a SIGKILLed gather takes
its running tasks with it instead of leaving them to write into a directory
a restarted gather owns. SIGTERM (or ``StopRequest.request``) stops dispatch;
running tasks get ``grace`` seconds, then are killed and reported as cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from runner.exceptions import JournalError, TaskError
from runner.scatter import Assignment, Plan, ScatterGather, header_line, replay_journal
from runner.spec import JobSpec

_PR_SET_PDEATHSIG = 1


class StopRequest:
    """Set from a signal handler, the API or a shutdown probe; read by the loop."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


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
    job: str
    events_planned: int
    events_done: int
    tasks: int
    tasks_committed: int
    failed_runs: int
    cut_runs: int
    abandoned: dict[int, list[str]]
    complete: bool
    stopped: str | None
    resumed_tasks: int
    wall_seconds: float
    cpu_seconds: float
    output: str
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["abandoned"] = {str(k): v for k, v in self.abandoned.items()}
        return d


def _child_setup(memory: int | None) -> Callable[[], None]:
    # Resolved in the parent: the child, between fork and exec, must not dlopen.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return setup


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Running:
    def __init__(self, a: Assignment, proc: subprocess.Popen[bytes], part: Path) -> None:
        self.assignment = a
        self.proc = proc
        self.part = part


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def open_journal(workdir: Path, plan: Plan) -> tuple[Plan, set[int]]:
    """Create the journal for ``plan``, or replay an existing one.

    An existing journal's plan wins (a resumed job keeps the size it was given
    when it started); it must be for the same job.

    Raises:
        JournalError: the journal is corrupt, for another job, or a committed
            task's output is missing.
    """
    path = workdir / "journal.jsonl"
    if path.exists():
        old, records = replay_journal(path.read_text())
        if old.job != plan.job:
            raise JournalError(f"{path} belongs to job {old.job!r}, not {plan.job!r}")
        # Drop a torn tail so new lines start on a line boundary.
        text = path.read_bytes()
        keep = text.rfind(b"\n") + 1
        if keep != len(text):
            with open(path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        for t in records:
            if not (workdir / "tasks" / f"{t:06d}.out").exists():
                raise JournalError(f"task {t} is committed in {path} but its output is missing")
        return old, set(records)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(header_line(plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(workdir)
    return plan, set()


def run_job(
    spec: JobSpec,
    events: int,
    workdir: str | Path,
    *,
    cores: int,
    stop: StopRequest | None = None,
    should_stop: Callable[[], str | None] | None = None,
    grace: float = 10.0,
    poll_interval: float = 0.005,
    memory: int | None = None,
    max_attempts: int = 3,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RunReport:
    """Run ``events`` events of ``spec`` with ``cores`` workers in ``workdir``.

    Resumes from ``workdir/journal.jsonl`` if present. ``should_stop`` is
    polled about once a second (e.g. a changed MJF shutdowntime) and returns a
    reason to stop or None.

    Raises:
        JournalError: see :func:`open_journal`.
        TaskError: the command cannot be started at all.
    """
    work = Path(workdir)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or StopRequest()
    plan, committed = open_journal(
        work, Plan(spec.name, spec.first_event, events, spec.events_per_task)
    )
    for stale in tasks_dir.glob("*.part"):
        stale.unlink(missing_ok=True)
    sg = ScatterGather(
        plan,
        cores,
        committed=committed,
        task_timeout=spec.task_timeout,
        max_attempts=max_attempts,
    )
    child_env = dict(os.environ if env is None else env)
    setup = _child_setup(memory)
    running: dict[int, _Running] = {}
    t0 = clock()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cut_at: float | None = None
    next_probe = t0
    nonce = os.getpid()

    journal = open(work / "journal.jsonl", "a")  # noqa: SIM115 (closed in finally)
    try:
        while not sg.finished:
            now = clock()
            if should_stop is not None and now >= next_probe:
                next_probe = now + 1.0
                reason = should_stop()
                if reason:
                    stop.request(reason)
            if stop.requested and not sg.stopping:
                sg.stop()
                cut_at = now + grace
            for a in sg.dispatch(now):
                part = tasks_dir / f"{a.task:06d}.{a.attempt}.{nonce}.part"
                log = tasks_dir / f"{a.task:06d}.{a.attempt}.log"
                argv = spec.argv(a.events.first, a.events.count, str(part))
                child_env["SWARM_RUNNER_WORKER"] = str(a.worker)
                child_env["SWARM_RUNNER_TASK"] = str(a.task)
                try:
                    with open(log, "wb") as logf:
                        proc = subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                            env=child_env,
                            start_new_session=True,
                            preexec_fn=setup,
                        )
                except OSError as exc:
                    # A command that cannot be executed will not improve on retry.
                    sg.failed(a, f"cannot start {argv[0]}: {exc}")
                    raise TaskError(f"cannot start {argv[0]!r}: {exc.strerror}") from exc
                running[a.worker] = _Running(a, proc, part)
            for r in list(running.values()):
                rc = r.proc.poll()
                if rc is None:
                    continue
                del running[r.assignment.worker]
                a = r.assignment
                if rc == 0 and r.part.exists():
                    with open(r.part, "rb") as f:
                        os.fsync(f.fileno())
                    os.replace(r.part, tasks_dir / f"{a.task:06d}.out")
                    _fsync_dir(tasks_dir)
                    journal.write(sg.succeeded(a))
                    journal.flush()
                    os.fsync(journal.fileno())
                else:
                    why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
                    if rc == 0:
                        why = "exit status 0 but no output file"
                    r.part.unlink(missing_ok=True)
                    sg.failed(a, why)
            now = clock()
            for a in sg.expired(now):
                r = running.pop(a.worker)
                _kill(r.proc)
                r.part.unlink(missing_ok=True)
                sg.failed(a, f"timed out after {spec.task_timeout} s")
            if cut_at is not None and now >= cut_at:
                for r in list(running.values()):
                    _kill(r.proc)
                    r.part.unlink(missing_ok=True)
                    sg.cut(r.assignment)
                running.clear()
            if not sg.finished:
                time.sleep(poll_interval)
    finally:
        for r in running.values():
            _kill(r.proc)
            r.part.unlink(missing_ok=True)
        journal.close()

    output = gather_output(work, plan, sg.committed)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
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
        stopped=stop.reason,
        resumed_tasks=len(committed),
        wall_seconds=clock() - t0,
        cpu_seconds=(cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        output=str(output),
        failures=[f for st in sg.state.values() for f in st.failures],
    )
    (work / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    return report


def gather_output(workdir: Path, plan: Plan, committed: set[int]) -> Path:
    """Concatenate committed task outputs in event order into ``events.out``."""
    out = workdir / "events.out"
    tmp = workdir / "events.out.tmp"
    with open(tmp, "wb") as dst:
        for t in sorted(committed):
            with open(workdir / "tasks" / f"{t:06d}.out", "rb") as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, out)
    return out
