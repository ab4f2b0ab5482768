"""A job's work directory on disk: its journal, the commit protocol, the gathered output.

Layout::

    journal.jsonl               header (the plan) + one line per committed task
    tasks/000007.out            output of committed task 7 (gather-owned, read-only to tasks)
    tasks/000007.2.log          stdout and stderr of attempt 2 of task 7
    parts/000007.2.<pid>.part   what attempt 2 writes while it runs (job user's directory)
    scratch/                    the tasks' working directory and $HOME (job user's)
    events.out                  the gathered output: committed tasks in event order
    report.json                 the last RunReport

Commit protocol for a task that exited 0 (:class:`CommitLog`): rename its
part file from ``parts/`` (writable by the job) to ``tasks/NNNNNN.out``
(writable only by the gather, so the entry cannot be swapped afterwards),
check that it is a regular file with one link owned by the job user (a
symlink or hard link planted by a task must not pull a node file into the
output), hand it to the gather's user, fsync it and ``tasks/``, append the
journal line and fsync the journal. A gather killed anywhere in between
leaves either no commit line (the task is run again; its ``.out`` is
overwritten by the rerun's rename) or a durable commit line with its output
in place.

Invariant: a task is committed exactly when its line is durable in the
journal, and then its output is durable in ``tasks/``. The journal's lines
are written by :mod:`runner.scatter` (``header_line``, ``succeeded``) and
read by its ``replay_journal``; this module only stores them.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from runner.exceptions import JournalError
from runner.job_user import JobUser
from runner.scatter import Plan, TaskSet, header_line, replay_journal


def fsync_dir(path: Path) -> None:
    """Make the entries of the directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    fsync_dir(workdir)
    return plan, TaskSet()


class CommitLog:
    """The commit protocol of one run: outputs taken, then made durable with
    their journal lines in groups (see the module docstring).

    ``user`` is who the tasks run as (None: the node's own user). The journal
    (opened for appending, after :func:`open_journal`) is closed by ``close``.
    ``seconds`` is the time spent making commits durable.
    """

    def __init__(self, work: Path, user: JobUser | None) -> None:
        self.tasks_dir = work / "tasks"
        # A plain string on the per-task path: pathlib costs more than the syscalls.
        self.tasks_prefix = f"{work / 'tasks'}/"
        self.user = user
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self.seconds = 0.0
        self.unflushed: list[tuple[int, str]] = []  # (output fd, journal line)
        self.journal = open(work / "journal.jsonl", "a")  # noqa: SIM115 (closed in close)

    def take(self, part: str, task: int, journal_line: Callable[[], str]) -> str | None:
        """Take the output ``part`` of ``task``, which exited 0; None if it is
        good, else why not (the part is gone either way).

        ``journal_line`` is called only for a good output; its line is
        written by the next :meth:`flush`. Until then the task is not
        committed: a gather dying before reruns it.
        """
        dest = f"{self.tasks_prefix}{task:06d}.out"
        try:
            os.replace(part, dest)
        except FileNotFoundError:
            return "exit status 0 but no output file"
        # dest is in a directory only the gather writes: the entry cannot change
        # under us; O_NOFOLLOW + fstat check the very inode we will gather.
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ELOOP: a symlink
            fd = -1
        user = self.user
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
        self.unflushed.append((fd, journal_line()))
        return None

    def flush(self) -> None:
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
        fsync_dir(self.tasks_dir)
        self.journal.write("".join(lines))
        self.journal.flush()
        os.fsync(self.journal.fileno())
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Close the journal (what is not flushed is not committed)."""
        self.journal.close()


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
