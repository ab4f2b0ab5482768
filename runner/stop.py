"""Asking a run to stop: the stop request shared by gathers, and the grace period.

A stop comes from SIGTERM, the daemon's API, or a pilot's shutdown probe;
every gather waiting on the same :class:`StopRequest` wakes at once. Running
tasks then get a grace period before they are cut.

Invariants: the first request wins (its reason and grace stay; later
requests only wake the waiters again); a grace period is bounded
(:data:`MAX_GRACE`), so a stop (a node's shutdown) ends in bounded time.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

MAX_GRACE = 3600.0  # seconds: a stop (a node's shutdown) must end in bounded time


def grace_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a grace period, None if it is usable:
    seconds from 0 (cut at once) to ``MAX_GRACE``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_GRACE
    ):
        text = repr(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"expected seconds from 0 to {MAX_GRACE:g}, got {text}"
    return None


class StopRequest:
    """Set from a signal handler, the API or a shutdown probe; read by the loop.

    ``request`` may come from any thread (or a signal handler in the main
    thread): it wakes every gather waiting on this request at once.
    ``grace``, when given with the first request, overrides the run's grace.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.grace: float | None = None
        # Reentrant: a signal handler may run while the main thread holds it.
        self._lock = threading.RLock()
        self._wakers: list[Callable[[], None]] = []

    def request(self, reason: str, grace: float | None = None) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
                self.grace = grace
            # Called under the lock, so no waker runs after its unsubscribe returned.
            for wake in self._wakers:
                wake()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def subscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers.append(wake)

    def unsubscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakers.remove(wake)


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
