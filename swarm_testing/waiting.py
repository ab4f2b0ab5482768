"""Waiting for an event: the one polling loop of the tests, with a deadline.

A test that depends on timing waits for the event itself, never for a guessed
time: it names the event, gives a check that is truthy once the event has
happened, and a deadline generous enough for a loaded machine (the deadline
only bounds a failure; a passing test waits only as long as the event takes).

Invariants: the check runs at least once, and once more after the deadline
has passed (a check that slept through it still counts); what the check
raises propagates (a check may fail fast, e.g. when the child it waits for
has exited); the timeout names the event and the check's last answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.02  # seconds between checks: short, since checks are cheap


def eventually(
    what: str, check: Callable[[], T | None], timeout: float, interval: float = INTERVAL
) -> T:
    """The first truthy value of ``check()``, polled every ``interval`` seconds.

    Raises:
        AssertionError: ``check()`` was not truthy within ``timeout`` seconds;
            the message names ``what`` and the last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        late = time.monotonic() >= deadline
        last = check()
        if last:
            return last
        if late:
            raise _timed_out(what, timeout, last)
        time.sleep(interval)


async def eventually_async(
    what: str, check: Callable[[], Awaitable[T | None]], timeout: float, interval: float = INTERVAL
) -> T:
    """:func:`eventually` in a coroutine, with a coroutine check: the event
    loop runs between checks (and during them).

    Raises:
        AssertionError: as :func:`eventually`.
    """
    deadline = time.monotonic() + timeout
    while True:
        late = time.monotonic() >= deadline
        last = await check()
        if last:
            return last
        if late:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(interval)


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
