"""Whole-node scatter-gather as a pure state machine, and its journal format.

A :class:`Plan` cuts a job's events into fixed ranges, one per task (task ``i``
covers events ``first_event + i * events_per_task`` onwards). A
:class:`ScatterGather` hands tasks to free workers and takes back outcomes:

    pending --assign--> running --succeeded--> committed
       ^                   |
       +-----failed--------+   (attempts left; another worker preferred)
       +-----cut-----------+   (shutdown: not the task's fault, no attempt used)
                           +--failed, no attempts left--> abandoned

No processes, files or clocks here: the caller passes ``now`` and turns
outcomes into actions (see :mod:`runner.node_run`).

Journal invariant: a task is *committed* exactly when its commit line is in
the journal (appended and fsynced after its output was renamed into place).
Replaying the journal gives the committed set, so a gather killed at any
instant and restarted neither loses a committed event (its line is durable)
nor repeats one (a committed task is never dispatched again). A torn last line
(killed mid-write, no newline) was never committed and is ignored.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from runner.exceptions import JournalError

JOURNAL_VERSION = 1


@dataclass(frozen=True)
class EventRange:
    first: int
    count: int

    @property
    def end(self) -> int:
        return self.first + self.count


@dataclass(frozen=True)
class Plan:
    job: str
    first_event: int
    events: int
    events_per_task: int

    def __post_init__(self) -> None:
        if self.events < 0 or self.events_per_task < 1 or self.first_event < 0:
            raise ValueError(f"invalid plan {self}")

    @property
    def tasks(self) -> int:
        return -(-self.events // self.events_per_task)

    def range_of(self, task: int) -> EventRange:
        if not 0 <= task < self.tasks:
            raise IndexError(task)
        start = task * self.events_per_task
        count = min(self.events_per_task, self.events - start)
        return EventRange(self.first_event + start, count)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "first_event": self.first_event,
            "events": self.events,
            "events_per_task": self.events_per_task,
        }


@dataclass(frozen=True)
class Assignment:
    task: int
    events: EventRange
    attempt: int  # 1 for the first run of this task
    worker: int
    started: float
    deadline: float | None


@dataclass
class _TaskState:
    attempts: int = 0
    tried: set[int] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


class ScatterGather:
    """Dispatch tasks of ``plan`` to ``workers`` workers; see the module docstring.

    ``committed`` are tasks already committed (from the journal): they are
    never dispatched. ``max_attempts`` bounds failed runs of one task.
    """

    def __init__(
        self,
        plan: Plan,
        workers: int,
        *,
        committed: Iterable[int] = (),
        task_timeout: float | None = None,
        max_attempts: int = 3,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self.plan = plan
        self.workers = workers
        self.task_timeout = task_timeout
        self.max_attempts = max_attempts
        self.committed: set[int] = set(committed)
        bad = [t for t in self.committed if not 0 <= t < plan.tasks]
        if bad:
            raise JournalError(f"committed tasks {bad[:5]} are outside the plan")
        self.pending: deque[int] = deque(t for t in range(plan.tasks) if t not in self.committed)
        self.running: dict[int, Assignment] = {}  # worker -> assignment
        self.abandoned: dict[int, list[str]] = {}
        self.state: dict[int, _TaskState] = {}
        self.stopping = False
        self.failed_runs = 0
        self.cut_runs = 0

    # --- queries
    @property
    def events_done(self) -> int:
        return sum(self.plan.range_of(t).count for t in self.committed)

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing more will be dispatched."""
        return not self.running and (self.stopping or not self.pending)

    @property
    def complete(self) -> bool:
        return len(self.committed) == self.plan.tasks

    def free_workers(self) -> list[int]:
        return [w for w in range(self.workers) if w not in self.running]

    # --- transitions
    def assign(self, worker: int, now: float) -> Assignment | None:
        """Give ``worker`` a pending task, preferring one it has not failed."""
        if self.stopping or not self.pending or worker in self.running:
            return None
        chosen = next(
            (t for t in self.pending if worker not in self.state.get(t, _TaskState()).tried),
            self.pending[0],
        )
        self.pending.remove(chosen)
        st = self.state.setdefault(chosen, _TaskState())
        st.attempts += 1
        st.tried.add(worker)
        deadline = None if self.task_timeout is None else now + self.task_timeout
        a = Assignment(chosen, self.plan.range_of(chosen), st.attempts, worker, now, deadline)
        self.running[worker] = a
        return a

    def dispatch(self, now: float) -> list[Assignment]:
        """Fill every free worker; returns the new assignments."""
        out = []
        for w in self.free_workers():
            a = self.assign(w, now)
            if a is None:
                break
            out.append(a)
        return out

    def _release(self, a: Assignment) -> None:
        if self.running.get(a.worker) != a:
            raise ValueError(f"{a} is not running")
        del self.running[a.worker]

    def succeeded(self, a: Assignment) -> str:
        """The task's output is in place; returns the journal line to append."""
        self._release(a)
        self.committed.add(a.task)
        return commit_line(a)

    def failed(self, a: Assignment, reason: str) -> bool:
        """The task died, failed or timed out; its output is discarded.

        Returns True if it was requeued, False if it ran out of attempts.
        """
        self._release(a)
        self.failed_runs += 1
        st = self.state[a.task]
        st.failures.append(f"attempt {a.attempt} on worker {a.worker}: {reason}")
        if st.attempts >= self.max_attempts:
            self.abandoned[a.task] = st.failures
            return False
        # Front of the queue: a retried range should not wait behind the whole job.
        self.pending.appendleft(a.task)
        return True

    def cut(self, a: Assignment) -> None:
        """The task was stopped by a shutdown; it stays pending for a later run."""
        self._release(a)
        self.cut_runs += 1
        st = self.state[a.task]
        st.attempts -= 1
        self.pending.appendleft(a.task)

    def expired(self, now: float) -> list[Assignment]:
        """Running assignments past their deadline (the caller kills them)."""
        return [a for a in self.running.values() if a.deadline is not None and now >= a.deadline]

    def stop(self) -> None:
        """Dispatch no more tasks; running ones may still finish."""
        self.stopping = True


def header_line(plan: Plan) -> str:
    return json.dumps({"version": JOURNAL_VERSION, "plan": plan.to_json()}) + "\n"


def commit_line(a: Assignment) -> str:
    return (
        json.dumps(
            {
                "task": a.task,
                "first": a.events.first,
                "count": a.events.count,
                "attempt": a.attempt,
                "worker": a.worker,
            }
        )
        + "\n"
    )


@dataclass(frozen=True)
class JournalRecord:
    task: int
    first: int
    count: int
    attempt: int
    worker: int


def replay_journal(text: str) -> tuple[Plan, dict[int, JournalRecord]]:
    """Plan and committed tasks from a journal's text.

    A last line without its newline is torn (the writer died mid-append) and
    is ignored: it was never committed.

    Raises:
        JournalError: no header, a malformed complete line, or a commit that
            disagrees with the plan.
    """
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is torn or empty
    if not complete:
        raise JournalError("journal has no complete header line")
    try:
        head = json.loads(complete[0])
        if head.get("version") != JOURNAL_VERSION:
            raise JournalError(f"journal version {head.get('version')!r} is not supported")
        p = head["plan"]
        plan = Plan(
            job=str(p["job"]),
            first_event=int(p["first_event"]),
            events=int(p["events"]),
            events_per_task=int(p["events_per_task"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise JournalError(f"journal header is malformed: {complete[0][:80]!r}") from exc
    committed: dict[int, JournalRecord] = {}
    for number, line in enumerate(complete[1:], start=2):
        try:
            d = json.loads(line)
            rec = JournalRecord(
                *(int(d[k]) for k in ("task", "first", "count", "attempt", "worker"))
            )
            expected = plan.range_of(rec.task)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise JournalError(f"journal line {number} is malformed: {line[:80]!r}") from exc
        if (rec.first, rec.count) != (expected.first, expected.count):
            raise JournalError(f"journal line {number}: task {rec.task} range disagrees with plan")
        committed.setdefault(rec.task, rec)
    return plan, committed
