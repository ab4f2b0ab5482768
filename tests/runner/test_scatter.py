"""The scatter-gather state machine and journal replay, without processes."""

from __future__ import annotations

import pytest

from runner.exceptions import JournalError
from runner.scatter import EventRange, Plan, ScatterGather, header_line, replay_journal

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
    sg = ScatterGather(PLAN, workers=1)
    text = header_line(PLAN)
    for t in tasks:
        sg.pending.remove(t)
        sg.pending.appendleft(t)
        (a,) = sg.dispatch(0.0)
        text += sg.succeeded(a)
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
