"""What the gather's loops share: one job's broker side, its ledger, its directory.

:class:`GatherSession` holds, for one run of the gather (``sitejob/gather.py``),
the connected client and its JetStream context, the job's record, the pure
:class:`~sitejob.ledger.RangeLedger`, the :class:`~sitejob.gather_dir.GatherDir`,
and the events that end the run; and the small tools every loop uses: a
broker call with a deadline, a warning logged once per cause every 30 s, a
pause that ends when the run closes, ledger lines written one writer at a
time, and the publication, purge and settling of messages.

Invariants: every broker call goes through :meth:`GatherSession.call` (it
has a deadline); a ledger line is durable before the publication or purge
it records (callers write it with :meth:`GatherSession.write_ledger` first);
a broker failure in :meth:`publish`, :meth:`purge` or :meth:`settle` is
logged, never raised: the reconciler or a redelivery repairs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sitejob import store
from sitejob.config import SiteConfig
from sitejob.exceptions import SiteJobError
from sitejob.gather_dir import GatherDir
from sitejob.ledger import RangeLedger
from sitejob.protocol import GATHER, JobRecord, range_subject, ranges_stream

log = logging.getLogger("sitejob.gather")

T = TypeVar("T")

FETCH_WAIT = 1.0  # seconds a fetch waits for messages: an idle gather wakes this often
RETRY_PAUSE = 0.5  # seconds between attempts while the broker is away


class GatherSession:
    """One run of the gather over a connected client ``nc``: the shared state
    and the small tools (see the module docstring)."""

    def __init__(
        self,
        cfg: SiteConfig,
        nc: Any,
        record: JobRecord,
        files: GatherDir,
        output: Path,
    ) -> None:
        self.cfg = cfg
        self.nc = nc
        self.js = nc.jetstream(timeout=cfg.request_timeout)
        self.record = record
        self.job = record.id
        self.files = files
        self.output = output
        self.t0 = time.monotonic()
        self.ledger = RangeLedger(
            files.plan,
            ack_wait=record.ack_wait,
            max_attempts=record.max_attempts,
            started=self.t0,
            committed=files.committed,
            history=files.history,
            nodes=files.nodes,
        )
        self.closing = asyncio.Event()
        self.done = asyncio.Event()
        self.ledger_lock = asyncio.Lock()  # one writer of ledger.jsonl at a time
        self.warned: dict[str, float] = {}

    async def call(self, what: str, aw: Awaitable[T], timeout: float | None = None) -> T:
        """``aw`` with a deadline (the request timeout by default).

        Raises:
            TimeoutError: no answer in time (the message names ``what``).
        """
        limit = timeout or self.cfg.request_timeout
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a
            # cancellation that arrives as the awaited call completes.
            async with asyncio.timeout(limit):
                return await aw
        except TimeoutError:
            raise TimeoutError(f"{what}: the broker did not answer in {limit:g} s") from None

    def warn(self, key: str, text: str, *args: object) -> None:
        """Log a broker trouble once per ``key`` every 30 s (it may last)."""
        now = time.monotonic()
        if now - self.warned.get(key, -1e9) >= 30:
            self.warned[key] = now
            log.warning(text, *args)

    def refused(self, kind: str, text: str, *args: object) -> None:
        """Log a refusal the ledger has counted under ``kind`` (a flood: sampled)."""
        n = self.ledger.refused[kind]
        if n <= 20 or n & (n - 1) == 0:  # a flood is counted, not logged line by line
            log.warning("refused (%s, #%d): " + text, kind, n, *args)

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the run closes meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)

    async def write_ledger(self, lines: list[str]) -> None:
        """Append ``lines`` to ``ledger.jsonl``, durably (in a thread).

        Raises:
            OSError: the disk refused.
        """
        async with self.ledger_lock:
            await asyncio.to_thread(self.files.append_ledger, lines)

    async def publish(self, tasks: list[tuple[int, int]]) -> None:
        """Publish ranges (their ledger lines are durable); a failure is left
        to the reconciler (they are neither in the stream nor heard of)."""
        if not tasks:
            return
        try:
            await self.call("publish", store.publish_ranges(self.js, self.record, tasks), 30)
        except (TimeoutError, SiteJobError) as exc:
            self.warn(
                "publish",
                "publishing %d range(s) failed (the reconciler will): %s",
                len(tasks),
                exc,
            )

    async def purge(self, task: int) -> None:
        """Remove every message of range ``task`` from the ranges stream (abandoned)."""
        try:
            await self.call(
                "purge",
                self.js.purge_stream(
                    ranges_stream(self.job), subject=range_subject(self.job, task)
                ),
            )
        except Exception as exc:
            self.warn("purge", "cannot purge range %d from the stream: %s", task, exc)

    async def settle(self, msg: Any, kind: str, what: str = "acking") -> None:
        """``ack``, ``term`` or ``nak`` ``msg``; a failure is logged as ``what``
        failed (the message is redelivered)."""
        try:
            if kind == "ack":
                await msg.ack()
            elif kind == "term":
                await msg.term()
            else:
                await msg.nak(delay=RETRY_PAUSE)
        except Exception as exc:
            self.warn("ack", f"{what} failed: %s", exc or type(exc).__name__)


class GatherConsumer:
    """The ``gather`` consumer of one of the job's streams, bound on first use.

    :meth:`next_batch` fetches with ``fetch(subscription)``; a broker failure
    is logged under ``key`` (as fetching ``what``) and paused for.
    """

    def __init__(
        self,
        session: GatherSession,
        stream: str,
        fetch: Callable[[Any], Awaitable[list[Any]]],
        key: str,
        what: str,
    ) -> None:
        self.s = session
        self.stream = stream
        self.fetch = fetch
        self.key = key
        self.what = what
        self.sub: Any = None

    async def next_batch(self) -> list[Any] | None:
        """The next messages, or None: nothing came in time, or the broker
        failed (after :data:`RETRY_PAUSE`); the caller tries again."""
        try:
            if self.sub is None:
                self.sub = await self.s.call(
                    "bind", self.s.js.pull_subscribe_bind(GATHER, stream=self.stream)
                )
            return await self.fetch(self.sub)
        except TimeoutError:
            return None
        except Exception as exc:
            self.s.warn(
                self.key,
                f"fetching {self.what} failed (retrying): %s",
                exc or type(exc).__name__,
            )
            await self.s.pause(RETRY_PAUSE)
            return None
