"""The gather's output directory on disk: its lock, its journal and ledger, the commit.

``DIR`` (``swarm site-job gather ID --output DIR``) holds::

    .lock            flock of the live gather (its pid): a second gather is refused
    journal.jsonl    header (the plan) + one line per committed range
                     (runner/scatter.py's format plus "node" and "generation")
    ledger.jsonl     retries, re-publications, abandonments (sitejob/ledger.py)
    tasks/NNNNNN.out output of committed range NNNNNN
    events.out       every committed range's output in event order (at the end)
    report.json      the final report

Invariants: a range is committed exactly when its journal line is durable,
and :meth:`GatherDir.commit` renames and fsyncs its output (and ``tasks/``)
before it writes that line; ledger lines are fsynced before the journal
lines of the same batch. A ``*.tmp`` output is never committed: opening the
directory removes what a dead gather left. A torn last ledger line is cut.
Every method blocks (called in a worker thread, one call at a time); nothing
here touches the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.pid_lock import take_pid_lock
from runner.scatter import Plan, TaskSet
from runner.workdir import fsync_dir, gather_output, open_journal
from sitejob.exceptions import GatherBusy, GatherError
from sitejob.ledger import LedgerReplay, nodes_from_journal, replay_ledger


class DirLock:
    """``flock`` on ``DIR/.lock``, dropped by the kernel when its holder dies."""

    def __init__(self, output: Path) -> None:
        self.path = output / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write this process's pid into it.

        Raises:
            GatherBusy: another live gather holds it (the message names its pid).
            OSError: the lock file cannot be opened.
        """
        self.fd = take_pid_lock(
            self.path,
            lambda holder: GatherBusy(
                f"{self.path.parent} is in use by another gather (pid {holder})"
            ),
        )

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class Staged:
    """A verified output waiting to be committed."""

    task: int
    node: str
    generation: int
    tmp: str
    data: bytes | None  # inline output still to write to ``tmp``; None: written
    object: str | None


class GatherDir:
    """``DIR``'s files (blocking: called in a worker thread, one call at a time)."""

    def __init__(self, output: Path, plan: Plan) -> None:
        """Open (or start) ``output``'s journal and ledger for ``plan``.

        Raises:
            GatherError: the journal holds another plan.
            runner.exceptions.JournalError: the journal is corrupt.
            OSError: the directory cannot be used.
        """
        self.output = output
        self.tasks = output / "tasks"
        self.tasks.mkdir(parents=True, exist_ok=True)
        for stale in self.tasks.glob("*.tmp"):  # a dead gather's: never committed
            stale.unlink()
        journal_plan, self.committed = open_journal(output, plan)
        if journal_plan != plan:
            raise GatherError(
                f"{output} holds a journal of job {plan.job} with another plan "
                f"({journal_plan.to_json()})"
            )
        self.plan = plan
        with open(output / "journal.jsonl", encoding="utf-8", errors="replace") as f:
            self.nodes = nodes_from_journal(f)
        ledger = output / "ledger.jsonl"
        if ledger.exists():
            with open(ledger, "rb") as fb:
                self.history = replay_ledger(fb, plan)
            if ledger.stat().st_size != self.history.good_bytes:
                os.truncate(ledger, self.history.good_bytes)  # a torn last line
        else:
            self.history = LedgerReplay()
        self.ledger = open(ledger, "ab")  # noqa: SIM115 (closed in close)
        fsync_dir(output)
        self.journal = open(output / "journal.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def commit(
        self, staged: list[Staged], ledger_lines: list[str], journal_lines: list[str]
    ) -> None:
        """Outputs into place and durable, then the ledger lines, then the journal lines.

        Raises:
            OSError: the disk refused (nothing of the batch counts as committed).
        """
        fds = []
        try:
            for s in staged:
                if s.data is not None:
                    fd = os.open(s.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                    try:
                        write_all(fd, s.data)
                    finally:
                        os.close(fd)
                final = f"{self.tasks}/{s.task:06d}.out"
                os.replace(s.tmp, final)
                fds.append(os.open(final, os.O_RDONLY | os.O_CLOEXEC))
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        if staged:
            fsync_dir(self.tasks)
        if ledger_lines:
            self.append_ledger(ledger_lines)
        if journal_lines:
            self.journal.write("".join(journal_lines))
            self.journal.flush()
            os.fsync(self.journal.fileno())

    def append_ledger(self, lines: list[str]) -> None:
        """Append ``lines`` to the ledger, durably.

        Raises:
            OSError: the disk refused.
        """
        self.ledger.write("".join(lines).encode())
        self.ledger.flush()
        os.fsync(self.ledger.fileno())

    def finish(self, committed: TaskSet, report: dict[str, Any]) -> Path:
        """``events.out`` and ``report.json`` (each temporary file, fsync, rename).

        Raises:
            OSError: the disk refused.
        """
        out = gather_output(self.output, self.plan, committed)
        tmp = self.output / "report.json.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.output / "report.json")
        fsync_dir(self.output)
        return out

    def close(self) -> None:
        self.ledger.close()
        self.journal.close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def open_gather_dir(output: Path, plan: Plan) -> GatherDir:
    """:class:`GatherDir` built in a thread; cancelled meanwhile, it is closed
    once the thread is done (the thread cannot be stopped).

    Raises:
        As :class:`GatherDir`.
    """
    opening = asyncio.ensure_future(asyncio.to_thread(GatherDir, output, plan))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            (await opening).close()
        raise
