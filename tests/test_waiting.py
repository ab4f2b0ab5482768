"""eventually: the first truthy answer, a timeout naming the event, errors passed on."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from swarm_testing.waiting import eventually, eventually_async


def test_eventually_returns_the_first_truthy_answer() -> None:
    answers = itertools.chain([0, None, ""], itertools.repeat("here"))
    assert eventually("an answer", lambda: next(answers), 5, interval=0) == "here"


def test_a_timeout_names_the_event_and_the_last_answer_after_one_last_check() -> None:
    calls = 0

    def never() -> int:
        nonlocal calls
        calls += 1
        return 0

    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"waiting for the moon \(last: 0\)"):
        eventually("the moon", never, 0.1, interval=0.2)
    assert time.monotonic() - t0 < 5
    assert calls == 2  # at once, and once more after sleeping past the deadline


def test_what_the_check_raises_ends_the_wait_at_once() -> None:
    def dead() -> bool:
        raise AssertionError("the child exited")

    with pytest.raises(AssertionError, match="the child exited"):
        eventually("the child", dead, 60)


def test_eventually_async_awaits_its_check() -> None:
    answers = iter([False, False, True])

    async def check() -> bool:
        await asyncio.sleep(0)
        return next(answers)

    assert asyncio.run(eventually_async("a coroutine's answer", check, 5, interval=0)) is True
