"""The gather's range bookkeeping (sitejob/ledger.py), pure: an injected clock and
an in-memory stand-in for the ranges stream."""

from __future__ import annotations

import io
import json

import pytest

from runner.exceptions import JournalError
from runner.scatter import Plan, TaskSet, header_line, replay_journal
from sitejob.ledger import (
    Decision,
    RangeLedger,
    Verdict,
    journal_commit_line,
    nodes_from_journal,
    replay_ledger,
)

ACK_WAIT = 10.0
PLAN = Plan("J1", first_event=100, events=95, events_per_task=10)  # 10 ranges, the last of 5


class FakeRangesStream:
    """What is in the ranges stream: ``(task, generation)`` messages. Workers
    take them (an ack removes them); the broker may lose them."""

    def __init__(self, tasks: int) -> None:
        self.messages = {(t, 0) for t in range(tasks)}

    def publish(self, d: Decision) -> None:
        assert d.verdict in (Verdict.RETRY, Verdict.REPUBLISH)
        self.messages.add((d.task, d.generation))

    def take(self, task: int) -> int:
        """A worker runs ``task`` and acks it: its message leaves the stream."""
        gen = max(g for t, g in self.messages if t == task)
        self.messages.discard((task, gen))
        return gen

    def lose(self, task: int) -> None:
        self.messages = {(t, g) for t, g in self.messages if t != task}

    def tasks(self) -> set[int]:
        return {t for t, _ in self.messages}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ledger(clock: Clock, max_attempts: int = 3, **kw: object) -> RangeLedger:
    return RangeLedger(
        PLAN,
        ack_wait=ACK_WAIT,
        max_attempts=max_attempts,
        started=clock(),
        **kw,  # type: ignore[arg-type]
    )


def commit(led: RangeLedger, clock: Clock, task: int, node: str = "wn1") -> Decision:
    d = led.on_result(task, led.generation(task), True, node, None, clock())
    if d.verdict is Verdict.ACCEPT:
        led.commit(task, node)
    return d


def test_an_ok_result_is_accepted_committed_and_counted_for_its_node() -> None:
    clock = Clock()
    led = ledger(clock)
    d = led.on_result(3, 0, True, "wn1", None, clock())
    assert d.verdict is Verdict.ACCEPT and d.line is None
    assert not led.finished and 3 in led.committing
    led.commit(3, "wn1")
    assert 3 in led.committed and not led.committing
    st = led.status()
    assert st["events_committed"] == 10 and st["nodes"] == {"wn1": 1}
    assert st["ranges"]["finished"] == 1 and not st["complete"]


def test_a_second_result_of_a_range_being_committed_or_committed_is_a_duplicate() -> None:
    clock = Clock()
    led = ledger(clock)
    assert led.on_result(2, 0, True, "wn1", None, clock()).verdict is Verdict.ACCEPT
    # the same range run by a second node after a redelivery, same batch
    assert led.on_result(2, 0, True, "wn2", None, clock()).verdict is Verdict.DUPLICATE
    led.commit(2, "wn1")
    assert led.on_result(2, 0, True, "wn2", None, clock()).verdict is Verdict.DUPLICATE
    assert led.on_result(2, 0, False, "wn3", "boom", clock()).verdict is Verdict.DUPLICATE
    assert led.duplicates == 3 and led.nodes == {"wn1": 1}
    with pytest.raises(ValueError, match="committed already"):
        led.commit(2, "wn2")


def test_a_failed_range_is_retried_with_the_next_generation_then_abandoned_at_max_attempts() -> (
    None
):
    clock = Clock()
    stream = FakeRangesStream(PLAN.tasks)
    led = ledger(clock, max_attempts=3)
    for attempt in (1, 2):
        gen = stream.take(4)
        d = led.on_result(4, gen, False, f"wn{attempt}", "exit status 1", clock())
        assert d.verdict is Verdict.RETRY and d.generation == attempt and d.line is not None
        assert json.loads(d.line) == {
            "action": "retry",
            "task": 4,
            "generation": attempt,
            "attempts": attempt,
            "reason": f"attempt {attempt} (generation {attempt - 1}): node wn{attempt}: "
            "exit status 1",
        }
        stream.publish(d)
        assert led.status()["ranges"]["retrying"] == 1
    gen = stream.take(4)
    d = led.on_result(4, gen, False, "wn3", "killed by signal 9", clock())
    assert d.verdict is Verdict.ABANDON and d.line is not None
    assert "attempt 3" in d.reason and "killed by signal 9" in d.reason
    assert json.loads(d.line)["action"] == "abandon"
    st = led.status()
    assert st["retries"] == 2 and st["ranges"]["abandoned"] == 1 and st["ranges"]["retrying"] == 0
    assert st["abandoned"] == [{"task": 4, "first": 140, "count": 10, "reason": d.reason}]


def test_a_second_copy_of_one_failure_uses_no_second_attempt() -> None:
    clock = Clock()
    led = ledger(clock, max_attempts=2)
    d = led.on_result(1, 0, False, "wn1", "exit 1", clock())
    assert d.verdict is Verdict.RETRY and d.generation == 1
    # the redelivered result message, or the other holder of generation 0
    assert led.on_result(1, 0, False, "wn2", "exit 1", clock()).verdict is Verdict.STALE
    assert led.attempts[1] == 1 and led.generation(1) == 1


def test_a_good_result_after_abandonment_is_committed_and_lifts_the_abandonment() -> None:
    clock = Clock()
    led = ledger(clock, max_attempts=1)
    assert led.on_result(0, 0, False, "wn1", "exit 1", clock()).verdict is Verdict.ABANDON
    assert led.on_result(0, 0, False, "wn2", "exit 1", clock()).verdict is Verdict.STALE
    assert commit(led, clock, 0, "wn2").verdict is Verdict.ACCEPT
    assert 0 in led.committed and 0 not in led.abandoned


def test_a_refused_output_counts_the_refusal_and_a_failed_attempt_a_release_neither() -> None:
    clock = Clock()
    led = ledger(clock)
    assert led.on_result(5, 0, True, "wn1", None, clock()).verdict is Verdict.ACCEPT
    d = led.output_refused(5, 0, "sha256 mismatch", "not the hash reported", clock())
    assert d.verdict is Verdict.RETRY and d.generation == 1
    assert led.refused == {"sha256 mismatch": 1} and led.attempts[5] == 1
    assert 5 not in led.committing
    assert led.on_result(5, 1, True, "wn2", None, clock()).verdict is Verdict.ACCEPT
    led.release(5)  # the broker did not answer: the result comes back
    assert led.attempts[5] == 1 and 5 not in led.committing
    assert led.on_result(5, 1, True, "wn2", None, clock()).verdict is Verdict.ACCEPT


def test_max_deliveries_abandons_a_range_unless_it_is_committed_or_abandoned() -> None:
    clock = Clock()
    led = ledger(clock)
    commit(led, clock, 0)
    assert led.max_deliveries(0, 5) is None
    d = led.max_deliveries(6, 5)
    assert d is not None and d.verdict is Verdict.ABANDON and d.line is not None
    assert "delivered 5 times" in d.reason and led.abandoned[6] == d.reason
    assert led.max_deliveries(6, 5) is None
    assert led.max_deliveries(99, 5) is None  # not a range of the plan


def test_the_job_is_finished_when_every_range_is_committed_or_abandoned() -> None:
    clock = Clock()
    led = ledger(clock, max_attempts=1)
    for t in range(PLAN.tasks - 1):
        commit(led, clock, t)
    assert led.on_result(9, 0, True, "wn1", None, clock()).verdict is Verdict.ACCEPT
    led.release(9)
    assert not led.finished
    assert led.on_result(9, 0, False, "wn1", "oom", clock()).verdict is Verdict.ABANDON
    assert led.finished and led.status()["complete"]
    assert led.events_committed == 90


def test_the_reconciler_republishes_nothing_in_the_first_two_ack_waits() -> None:
    clock = Clock()
    led = ledger(clock)
    stream = FakeRangesStream(PLAN.tasks)
    stream.lose(3)  # the broker lost it
    clock.now += 2 * ACK_WAIT - 0.1
    assert led.reconcile(clock(), stream.tasks()) == []
    clock.now += 0.2
    [d] = led.reconcile(clock(), stream.tasks())
    assert (d.verdict, d.task, d.generation) == (Verdict.REPUBLISH, 3, 1)
    assert d.line is not None and json.loads(d.line) == {
        "action": "republish",
        "task": 3,
        "generation": 1,
    }


def test_the_reconciler_republishes_only_ranges_neither_committed_abandoned_in_the_stream_nor_heard_of() -> (  # noqa: E501
    None
):
    clock = Clock()
    led = ledger(clock, max_attempts=1)
    stream = FakeRangesStream(PLAN.tasks)
    for t in (0, 1, 2, 3, 4):
        stream.take(t)  # delivered and acked by their first holders
    commit(led, clock, 0)
    led.on_result(1, 0, False, "wn1", "exit 1", clock())  # abandoned
    assert led.on_result(2, 0, True, "wn1", None, clock()).verdict is Verdict.ACCEPT  # committing
    clock.now += 3 * ACK_WAIT
    led.heard_of(3, clock())  # the second holder of a stale-acked range heartbeats
    decisions = led.reconcile(clock(), stream.tasks())
    assert [d.task for d in decisions] == [4]
    for d in decisions:
        stream.publish(d)
    # republished: not again within 2 x ack_wait, though it is gone again
    stream.lose(4)
    clock.now += 2 * ACK_WAIT - 0.1
    assert led.reconcile(clock(), stream.tasks()) == []
    # the holder of range 3 died: not heard of for 2 x ack_wait
    clock.now += 0.2
    assert [(d.task, d.generation) for d in led.reconcile(clock(), stream.tasks())] == [
        (3, 1),
        (4, 2),
    ]
    assert led.republished == 3


def test_a_retry_is_not_republished_by_the_reconciler_before_two_ack_waits() -> None:
    clock = Clock()
    led = ledger(clock)
    stream = FakeRangesStream(PLAN.tasks)
    clock.now += 5 * ACK_WAIT
    stream.take(7)
    d = led.on_result(7, 0, False, "wn1", "exit 1", clock())
    assert d.verdict is Verdict.RETRY  # its publication failed: not in the stream
    assert all(x.task != 7 for x in led.reconcile(clock(), stream.tasks()))
    clock.now += 2 * ACK_WAIT
    assert [(x.task, x.generation) for x in led.reconcile(clock(), stream.tasks())] == [(7, 2)]


def test_a_restarted_ledger_replays_generations_attempts_and_abandonments() -> None:
    clock = Clock()
    led = ledger(clock, max_attempts=2)
    lines = []
    d = led.on_result(1, 0, False, "wn1", "exit 1", clock())
    lines.append(d.line)
    d = led.on_result(2, 0, False, "wn1", "exit 1", clock())
    lines.append(d.line)
    d = led.on_result(2, 1, False, "wn1", "exit 1", clock())
    assert d.verdict is Verdict.ABANDON
    lines.append(d.line)
    clock.now += 3 * ACK_WAIT
    [d] = [x for x in led.reconcile(clock(), {0, 1, 4, 5, 6, 7, 8, 9}) if x.task == 3]
    lines.append(d.line)
    text = "".join(x for x in lines if x is not None).encode()
    torn = b'{"action": "retry", "task": 3, "gen'
    replay = replay_ledger(io.BytesIO(text + torn), PLAN)
    assert replay.good_bytes == len(text)
    again = ledger(clock, max_attempts=2, history=replay)
    assert (again.generation(1), again.generation(2), again.generation(3)) == (1, 1, 1)
    assert again.attempts == {1: 1, 2: 2} and set(again.abandoned) == {2}
    assert again.retries == 2 and again.republished == 1
    # the redelivered failure of generation 0 is not a second attempt...
    assert again.on_result(1, 0, False, "wn1", "exit 1", clock()).verdict is Verdict.STALE
    # ...and a generation is never reused after a restart
    d = again.on_result(1, 1, False, "wn2", "exit 1", clock())
    assert d.verdict is Verdict.ABANDON and "attempt 1" in d.reason and "attempt 2" in d.reason
    # nothing republished before 2 x ack_wait after the restart
    again.started = clock()
    assert again.reconcile(clock() + ACK_WAIT, set()) == []


def test_the_journal_wins_over_an_abandonment_in_the_ledger() -> None:
    clock = Clock()
    led = ledger(clock, max_attempts=1)
    d = led.on_result(0, 0, False, "wn1", "exit 1", clock())
    assert d.line is not None
    replay = replay_ledger(io.BytesIO(d.line.encode()), PLAN)
    again = ledger(clock, history=replay, committed=TaskSet([0]))
    assert again.abandoned == {} and 0 in again.committed


def test_replaying_a_corrupt_ledger_line_names_it() -> None:
    with pytest.raises(JournalError, match="ledger line 2 is malformed"):
        replay_ledger(
            io.BytesIO(b'{"action": "republish", "task": 1, "generation": 1}\n{x\n'), PLAN
        )
    with pytest.raises(JournalError, match="outside the plan"):
        replay_ledger(io.BytesIO(b'{"action": "republish", "task": 10, "generation": 1}\n'), PLAN)


def test_commit_lines_replay_with_runner_journal_and_count_nodes() -> None:
    text = header_line(PLAN) + "".join(
        journal_commit_line(PLAN, t, node=n, generation=0, attempt=1)
        for t, n in ((0, "wn1"), (9, "wn2"), (3, "wn1"))
    )
    plan, committed = replay_journal(text)
    assert plan == PLAN and list(committed) == [0, 3, 9]
    assert nodes_from_journal(io.StringIO(text + '{"task": 4')) == {"wn1": 2, "wn2": 1}
    assert json.loads(journal_commit_line(PLAN, 9, node="wn2", generation=2, attempt=3)) == {
        "task": 9,
        "first": 190,
        "count": 5,
        "attempt": 3,
        "worker": 0,
        "node": "wn2",
        "generation": 2,
    }
