"""The scatter-gather state machine and journal replay, without processes."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from runner.exceptions import JournalError
from runner.scatter import (
    MAX_TASKS,
    Assignment,
    EventRange,
    Plan,
    ScatterGather,
    TaskSet,
    commit_line,
    header_line,
    replay_journal,
)

PLAN = Plan(job="j", first_event=100, events=25, events_per_task=10)


def test_plan_ranges_cover_every_event_once() -> None:
    assert PLAN.tasks == 3
    ranges = [PLAN.range_of(t) for t in range(PLAN.tasks)]
    assert ranges == [EventRange(100, 10), EventRange(110, 10), EventRange(120, 5)]
    covered = [e for r in ranges for e in range(r.first, r.end)]
    assert covered == list(range(100, 125))
    with pytest.raises(IndexError):
        PLAN.range_of(3)


def test_dispatch_fills_workers_and_commits() -> None:
    sg = ScatterGather(PLAN, workers=2)
    a, b = sg.dispatch(0.0)
    assert (a.task, a.worker, b.task, b.worker) == (0, 0, 1, 1)
    assert sg.dispatch(0.0) == []
    line = sg.succeeded(a)
    assert '"task": 0' in line and line.endswith("\n")
    (c,) = sg.dispatch(1.0)
    assert (c.task, c.worker) == (2, 0)
    sg.succeeded(b)
    sg.succeeded(c)
    assert sg.finished and sg.complete and sg.events_done == 25


def test_failed_task_goes_to_another_worker_first() -> None:
    sg = ScatterGather(PLAN, workers=2)
    a, b = sg.dispatch(0.0)
    assert sg.failed(a, "killed by signal 9")
    # worker 0 is free; task 0 failed on it, so it takes task 2 instead
    (c,) = sg.dispatch(0.0)
    assert (c.task, c.worker) == (2, 0)
    sg.succeeded(b)
    (d,) = sg.dispatch(0.0)
    assert (d.task, d.worker, d.attempt) == (0, 1, 2)


def test_single_worker_retries_itself() -> None:
    sg = ScatterGather(Plan("j", 0, 5, 5), workers=1)
    (a,) = sg.dispatch(0.0)
    sg.failed(a, "exit status 1")
    (b,) = sg.dispatch(0.0)
    assert (b.task, b.attempt) == (0, 2)


def test_attempts_are_bounded() -> None:
    sg = ScatterGather(Plan("j", 0, 5, 5), workers=1, max_attempts=2)
    for expected in (True, False):
        (a,) = sg.dispatch(0.0)
        assert sg.failed(a, "boom") is expected
    assert sg.finished and not sg.complete
    assert list(sg.abandoned) == [0] and len(sg.abandoned[0]) == 2


def test_timeouts_with_injected_clock() -> None:
    sg = ScatterGather(PLAN, workers=2, task_timeout=5.0)
    a, b = sg.dispatch(10.0)
    assert sg.expired(14.9) == []
    assert set(sg.expired(15.0)) == {a, b}


def test_stop_then_cut_keeps_task_pending_without_using_an_attempt() -> None:
    sg = ScatterGather(PLAN, workers=2)
    a, b = sg.dispatch(0.0)
    sg.stop()
    sg.succeeded(a)
    assert sg.dispatch(0.0) == [] and not sg.finished
    sg.cut(b)
    assert sg.finished and not sg.complete and sg.events_done == 10
    resumed = ScatterGather(PLAN, workers=2, committed=sg.committed)
    assert [x.task for x in resumed.dispatch(0.0)] == [1, 2]
    assert sg.state[1].attempts == 0


def test_committed_tasks_are_never_dispatched() -> None:
    sg = ScatterGather(PLAN, workers=3, committed={0, 2})
    assert [a.task for a in sg.dispatch(0.0)] == [1]
    with pytest.raises(JournalError):
        ScatterGather(PLAN, workers=1, committed={7})


def _journal(*tasks: int) -> str:
    text = header_line(PLAN)
    for t in tasks:
        text += commit_line(Assignment(t, PLAN.range_of(t), 1, 0, 0.0, None))
    return text


def test_replay_gives_plan_and_committed() -> None:
    plan, committed = replay_journal(_journal(2, 0))
    assert plan == PLAN and set(committed) == {0, 2}


def test_replay_ignores_torn_last_line() -> None:
    text = _journal(0, 1)
    torn = text[: text.rindex('"task": 1') + 4]
    _, committed = replay_journal(torn)
    assert set(committed) == {0}


def test_replay_rejects_corrupt_middle_line_and_foreign_range() -> None:
    text = _journal(0, 1)
    lines = text.split("\n")
    lines[1] = lines[1][:10]
    with pytest.raises(JournalError, match="line 2"):
        replay_journal("\n".join(lines))
    bad = text.replace('"first": 110', '"first": 111')
    with pytest.raises(JournalError, match="disagrees"):
        replay_journal(bad)
    with pytest.raises(JournalError, match="header"):
        replay_journal("")


def test_task_set_keeps_ranges_not_tasks() -> None:
    s = TaskSet([5, 3, 4, 9])
    assert list(s.ranges()) == [(3, 6), (9, 10)] and len(s) == 4
    assert not s.add(4) and s.add(7) and s.add(8)  # 7 and 8 join 6..9 to 9
    assert list(s.ranges()) == [(3, 6), (7, 10)]
    assert s.add(6) and list(s.ranges()) == [(3, 10)] and len(s) == 7
    assert list(s) == list(range(3, 10)) and 2 not in s and 3 in s and 10 not in s
    assert (s.first_absent(0), s.first_absent(3), s.first_absent(9)) == (0, 10, 10)
    assert s.bounds() == (3, 9) and TaskSet().bounds() is None
    copy = s.copy()
    copy.add(20)
    assert 20 not in s


def test_a_plan_of_max_tasks_is_handed_out_lazily() -> None:
    # The ScatterGather of a million-task plan costs what a ten-task one does.
    plan = Plan("big", 0, MAX_TASKS * 10**6, 10**6)
    assert plan.tasks == MAX_TASKS
    with pytest.raises(ValueError, match="at most"):
        Plan("bigger", 0, MAX_TASKS * 10**6 + 1, 10**6)
    tracemalloc.start()
    try:
        sg = ScatterGather(plan, workers=4, committed=TaskSet(range(0, 1000)))
        for _ in range(1000):
            for a in sg.dispatch(0.0):
                sg.succeeded(a)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"{peak} bytes"
    assert len(sg.committed) == 5000 and list(sg.committed.ranges()) == [(0, 5000)]
    assert sg.events_done == 5000 * 10**6 and sg.next_pending() == 5000


def test_replay_reads_a_journal_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with open(path, "w") as f:
        f.write(_journal(0, 2, 1) + '{"task": 3, "fir')  # torn tail
    with open(path) as f:
        plan, committed = replay_journal(f)
    assert plan == PLAN and list(committed.ranges()) == [(0, 3)]
