"""Reporting a range this node ran: its output, its result, then its ack.

:class:`RangeReporter` carries out the worker's side of the order that makes
a node's death cost at most a re-run (``docs/SITE_JOBS.md``, "The worker"):

* an output above ``INLINE_MAX`` is put in the job's object store
  (``<task>.<node>.<range stream seq>``) before its result; a smaller one
  travels inline;
* the result is published with the message id ``<job>.<task>.<node>.<seq>``
  and stored (PubAck) *before* the range is acked: a node dying in between
  leaves the range to be redelivered, never a range acked without a result.

Every broker call has a deadline; a broker that does not answer is retried
(the range kept in progress) for a while, then the range is left to its
redelivery (AckWait). Nothing here raises for a broker error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.stop import StopRequest
from sitejob.protocol import (
    MAX_REASON,
    RangeMsg,
    ResultMsg,
    encode,
    output_bucket,
    result_subject,
)

log = logging.getLogger("sitejob.worker")


@dataclass
class RunningRange:
    """A range this node runs."""

    job: str
    msg: RangeMsg
    seq: int
    delivered: int  # how many times the broker had delivered it (this delivery's count)
    delivery: Any  # the broker's message of the latest delivery (ack, nak, in-progress)
    started: float
    estimate: float  # seconds
    stop: StopRequest = field(default_factory=StopRequest)
    hand_back: str | None = None  # why it is cut and given back
    node_fault: str | None = None  # why this node could not run it at all


def reason_of(exc: BaseException) -> str:
    """``exc`` as a reason for a log line or a result (bounded)."""
    return (str(exc) or type(exc).__name__)[:MAX_REASON]


def size_and_sha256(path: Path) -> tuple[int, str]:
    """Size and SHA-256 hex of the file ``path``, read once (blocking).

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


class RangeReporter:
    """Publishes the results of the ranges node ``node`` runs, over the
    JetStream context ``js`` (calls with deadlines of ``timeout`` seconds)."""

    def __init__(self, js: Any, node: str, timeout: float, clock: Callable[[], float]) -> None:
        self.js = js
        self.node = node
        self.timeout = timeout
        self.clock = clock

    def result(self, r: RunningRange, **kw: Any) -> ResultMsg:
        """The result message of ``r`` run here (``kw``: the outcome's fields)."""
        return ResultMsg(
            job=r.job,
            task=r.msg.task,
            first=r.msg.first,
            count=r.msg.count,
            generation=r.msg.generation,
            node=self.node,
            delivery=r.delivered,
            **kw,
        )

    async def put_object(self, r: RunningRange, name: str, output: Path, size: int) -> bool:
        """Put the file ``output`` (``size`` bytes) in the job's object store as
        ``name``, trying three times; False: not stored (left to redelivery)."""
        # A generous deadline for the bytes: 10 MB/s at least, on top of a request's.
        deadline = self.timeout + size / 10e6
        for attempt in range(3):
            try:
                store = await asyncio.wait_for(
                    self.js.object_store(output_bucket(r.job)), self.timeout
                )
                with open(output, "rb") as f:
                    await asyncio.wait_for(store.put(name, f), deadline)
                return True
            except Exception as exc:
                log.warning(
                    "site job %s: range %d: storing its output (try %d): %s",
                    r.job,
                    r.msg.task,
                    attempt + 1,
                    reason_of(exc),
                )
                await asyncio.sleep(1.0)
        return False

    async def report(self, r: RunningRange, result: ResultMsg) -> bool:
        """Publish ``result`` (stored: PubAck), then ack the range.

        A broker that does not answer is retried (the range kept in progress)
        for an AckWait at least; then the range is left to its redelivery.
        """
        msg_id = f"{r.job}.{r.msg.task}.{self.node}.{r.seq}"
        data = encode(result)
        patience = self.clock() + max(30.0, 3 * self.timeout)
        while True:
            try:
                await asyncio.wait_for(
                    self.js.publish(
                        result_subject(r.job),
                        data,
                        headers={"Nats-Msg-Id": msg_id},
                        timeout=self.timeout,
                    ),
                    self.timeout + 1,
                )
                break
            except Exception as exc:
                if self.clock() >= patience:
                    log.warning(
                        "site job %s: range %d: result not stored, left to redelivery: %s",
                        r.job,
                        r.msg.task,
                        reason_of(exc),
                    )
                    return False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.delivery.in_progress(), self.timeout)
                await asyncio.sleep(0.5)
        try:
            await asyncio.wait_for(r.delivery.ack_sync(timeout=self.timeout), self.timeout + 1)
        except Exception as exc:  # stored already: a redelivery's result is a duplicate
            log.warning("site job %s: ack of range %d: %s", r.job, r.msg.task, reason_of(exc))
        return True
