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
outcomes into actions (see :mod:`runner.gather`).

Memory does not grow with the size of a job: tasks are handed out lazily (a
cursor over the plan's fresh tasks plus a queue of requeued ones, never a
list of every task), the committed set is a :class:`TaskSet` of ranges
(tasks commit roughly in order, so it holds a few ranges however many tasks
there are), per-task state exists only for tasks that have run and are not
committed, and failure texts kept for the report are bounded
(``KEPT_FAILURES``). A plan has at most ``MAX_TASKS`` tasks (one journal
line, one output file and one process start each).

Journal invariant: a task is *committed* exactly when its commit line is in
the journal (appended and fsynced after its output was renamed into place).
Replaying the journal gives the committed set, so a gather killed at any
instant and restarted neither loses a committed event (its line is durable)
nor repeats one (a committed task is never dispatched again). A torn last line
(killed mid-write, no newline) was never committed and is ignored. Replay
reads the journal line by line.
"""

from __future__ import annotations

import bisect
import io
import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from runner.exceptions import JournalError

JOURNAL_VERSION = 1
MAX_TASKS = 10**6
KEPT_FAILURES = 100  # failure texts a run keeps for its report; the rest are counted


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
        if self.tasks > MAX_TASKS:
            raise ValueError(f"plan of {self.tasks} tasks: at most {MAX_TASKS}")

    @property
    def tasks(self) -> int:
        return -(-self.events // self.events_per_task)

    def range_of(self, task: int) -> EventRange:
        if not 0 <= task < self.tasks:
            raise IndexError(task)
        start = task * self.events_per_task
        count = min(self.events_per_task, self.events - start)
        return EventRange(self.first_event + start, count)

    def events_in(self, start: int, end: int) -> int:
        """Events of tasks ``start`` to ``end - 1``."""
        return min(end * self.events_per_task, self.events) - start * self.events_per_task

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "first_event": self.first_event,
            "events": self.events,
            "events_per_task": self.events_per_task,
        }


class TaskSet:
    """A set of task numbers kept as sorted, disjoint, non-adjacent ranges
    ``[start, end)``: its memory grows with the gaps between committed tasks,
    not with their number. Iteration yields the tasks in order, lazily."""

    def __init__(self, tasks: Iterable[int] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._len = 0
        for t in tasks:
            self.add(t)

    def add(self, task: int) -> bool:
        """Add ``task``; False if it was already in the set."""
        i = bisect.bisect_right(self._starts, task) - 1
        if i >= 0 and task < self._ends[i]:
            return False
        joins_left = i >= 0 and self._ends[i] == task
        joins_right = i + 1 < len(self._starts) and self._starts[i + 1] == task + 1
        if joins_left and joins_right:
            self._ends[i] = self._ends[i + 1]
            del self._starts[i + 1], self._ends[i + 1]
        elif joins_left:
            self._ends[i] = task + 1
        elif joins_right:
            self._starts[i + 1] = task
        else:
            self._starts.insert(i + 1, task)
            self._ends.insert(i + 1, task + 1)
        self._len += 1
        return True

    def copy(self) -> TaskSet:
        other = TaskSet()
        other._starts, other._ends, other._len = list(self._starts), list(self._ends), self._len
        return other

    def __contains__(self, task: object) -> bool:
        if not isinstance(task, int):
            return False
        i = bisect.bisect_right(self._starts, task) - 1
        return i >= 0 and task < self._ends[i]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for start, end in self.ranges():
            yield from range(start, end)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """The set as ``(start, end)`` ranges, in order."""
        return zip(list(self._starts), list(self._ends), strict=True)

    def first_absent(self, task: int) -> int:
        """The smallest task number >= ``task`` that is not in the set."""
        i = bisect.bisect_right(self._starts, task) - 1
        return self._ends[i] if i >= 0 and task < self._ends[i] else task

    def bounds(self) -> tuple[int, int] | None:
        """(smallest, largest) task in the set, None if it is empty."""
        return (self._starts[0], self._ends[-1] - 1) if self._starts else None


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
        self.committed = committed.copy() if isinstance(committed, TaskSet) else TaskSet(committed)
        bounds = self.committed.bounds()
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= plan.tasks):
            bad = bounds[0] if bounds[0] < 0 else bounds[1]
            raise JournalError(f"committed task {bad} is outside the plan")
        # Pending tasks, lazily: requeued ones first, then fresh ones from the cursor.
        self.requeued: deque[int] = deque()
        self._fresh = self.committed.first_absent(0)
        self.running: dict[int, Assignment] = {}  # worker -> assignment
        self.abandoned: dict[int, list[str]] = {}  # the first KEPT_FAILURES abandoned tasks
        self.abandoned_count = 0
        self.state: dict[int, _TaskState] = {}  # tasks that ran and are not committed
        self.failures: list[str] = []  # the first KEPT_FAILURES failure texts
        self.stopping = False
        self.failed_runs = 0
        self.cut_runs = 0

    # --- queries
    @property
    def events_done(self) -> int:
        return sum(self.plan.events_in(a, b) for a, b in self.committed.ranges())

    @property
    def has_pending(self) -> bool:
        return bool(self.requeued) or self._fresh < self.plan.tasks

    def next_pending(self) -> int | None:
        """The task the next free worker would most likely get (None: nothing pending)."""
        if self.requeued:
            return self.requeued[0]
        return self._fresh if self._fresh < self.plan.tasks else None

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing more will be dispatched."""
        return not self.running and (self.stopping or not self.has_pending)

    @property
    def complete(self) -> bool:
        return len(self.committed) == self.plan.tasks

    def free_workers(self) -> list[int]:
        return [w for w in range(self.workers) if w not in self.running]

    # --- transitions
    def _take(self, worker: int) -> int | None:
        """A pending task for ``worker``: a requeued one it has not failed,
        else a fresh one, else the first requeued one."""
        for t in self.requeued:
            if worker not in self.state[t].tried:
                self.requeued.remove(t)
                return t
        if self._fresh < self.plan.tasks:
            t = self._fresh
            self._fresh = self.committed.first_absent(t + 1)
            return t
        return self.requeued.popleft() if self.requeued else None

    def assign(self, worker: int, now: float) -> Assignment | None:
        """Give ``worker`` a pending task, preferring one it has not failed."""
        if self.stopping or worker in self.running:
            return None
        chosen = self._take(worker)
        if chosen is None:
            return None
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
        self.state.pop(a.task, None)
        return commit_line(a)

    def failed(self, a: Assignment, reason: str) -> bool:
        """The task died, failed or timed out; its output is discarded.

        Returns True if it was requeued, False if it ran out of attempts.
        """
        self._release(a)
        self.failed_runs += 1
        st = self.state[a.task]
        text = f"attempt {a.attempt} on worker {a.worker}: {reason}"
        st.failures.append(text)
        if len(self.failures) < KEPT_FAILURES:
            self.failures.append(text)
        if st.attempts >= self.max_attempts:
            del self.state[a.task]
            self.abandoned_count += 1
            if len(self.abandoned) < KEPT_FAILURES:
                self.abandoned[a.task] = st.failures
            return False
        # Front of the queue: a retried range should not wait behind the whole job.
        self.requeued.appendleft(a.task)
        return True

    def cut(self, a: Assignment) -> None:
        """The task was stopped by a shutdown; it stays pending for a later run."""
        self._release(a)
        self.cut_runs += 1
        st = self.state[a.task]
        st.attempts -= 1
        self.requeued.appendleft(a.task)

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


def replay_journal(journal: str | Iterable[str]) -> tuple[Plan, TaskSet]:
    """Plan and committed tasks from a journal: its text, or its lines as an
    open text file yields them (read one at a time).

    A last line without its newline is torn (the writer died mid-append) and
    is ignored: it was never committed.

    Raises:
        JournalError: no header, a malformed complete line, or a commit that
            disagrees with the plan.
    """
    lines = iter(io.StringIO(journal) if isinstance(journal, str) else journal)
    first = next(lines, "")
    if not first.endswith("\n"):
        raise JournalError("journal has no complete header line")
    try:
        head = json.loads(first)
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
        raise JournalError(f"journal header is malformed: {first[:80]!r}") from exc
    committed = TaskSet()
    for number, line in enumerate(lines, start=2):
        if not line.endswith("\n"):
            break  # torn: never committed
        try:
            d = json.loads(line)
            task, first_event, count, _attempt, _worker = (
                int(d[k]) for k in ("task", "first", "count", "attempt", "worker")
            )
            expected = plan.range_of(task)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise JournalError(f"journal line {number} is malformed: {line[:80]!r}") from exc
        if (first_event, count) != (expected.first, expected.count):
            raise JournalError(f"journal line {number}: task {task} range disagrees with plan")
        committed.add(task)
    return plan, committed
