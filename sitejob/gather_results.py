"""The results loop of the gather: fetch results, decide, commit, then ack.

Each round fetches a batch from the job's ``gather`` consumer (one result
waited for, then what else is ready, at most :data:`FETCH_BATCH`), decodes
each against the job's record, lets the :class:`~sitejob.ledger.RangeLedger`
decide (accept, duplicate, retry, abandon), verifies the accepted outputs
(:class:`~sitejob.gather_outputs.OutputFetcher`), commits the batch
(:meth:`~sitejob.gather_dir.GatherDir.commit`: outputs, ledger lines,
journal lines, each durable in that order), THEN acks the batch; then it
publishes the retries, purges the abandoned ranges and deletes used objects.

Invariants: a result is acked only after what it caused is durable (its
journal line, or its ledger line), so a gather killed at any instant and
restarted commits every range once (a redelivered result of a committed
range is a duplicate). Bad input is refused (counted by kind, logged, acked
with ``term``), never committed, never a crash; a result whose output the
broker did not deliver in time is ``nak``-ed and comes back. A broker that
goes away is waited for; a disk that refuses ends the gather
(:class:`~sitejob.exceptions.GatherError`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sitejob.exceptions import GatherError, ProtocolError
from sitejob.gather_dir import Staged
from sitejob.gather_outputs import OutputFetcher, Refused
from sitejob.gather_session import FETCH_WAIT, GatherConsumer, GatherSession
from sitejob.ledger import Decision, Verdict, journal_commit_line
from sitejob.protocol import ResultMsg, decode_result, results_stream

log = logging.getLogger("sitejob.gather")

FETCH_BATCH = 256  # results fetched (and committed as one group) at once
DRAIN_WAIT = 0.5  # seconds a fetch of results known to be ready may take


def _refusal_kind(data: bytes, job: str) -> str:
    """Why a result that the plan refused was refused, as a counter name."""
    try:
        msg = decode_result(data)
    except ProtocolError:
        return "malformed"
    return "other job" if msg.job != job else "not in the plan"


class ResultsLoop:
    """Commits one gather's results; see the module docstring."""

    def __init__(self, session: GatherSession) -> None:
        self.s = session
        self.outputs = OutputFetcher(session)

    async def results_loop(self) -> None:
        """Fetch and handle batches until the run closes; sets ``done`` once
        every range is committed or abandoned.

        Raises:
            GatherError: the directory cannot be written.
        """
        results = GatherConsumer(
            self.s, results_stream(self.s.job), self.fetch_batch, "fetch", "results"
        )
        while not self.s.closing.is_set():
            msgs = await results.next_batch()
            if msgs is None:
                continue
            await self.handle_batch(msgs)
            if self.s.ledger.finished:
                self.s.done.set()

    async def fetch_batch(self, sub: Any) -> list[Any]:
        """The next results: waits (up to FETCH_WAIT) for one, then takes what
        else is there, at most FETCH_BATCH in all.

        nats-py's ``fetch(n)`` waits until it has ``n`` messages or its timeout
        passes: one lone result would wait a whole FETCH_WAIT. So: fetch one,
        ask the consumer how many more are ready, fetch exactly those.

        Raises:
            TimeoutError: nothing came within FETCH_WAIT.
        """
        msgs: list[Any] = await sub.fetch(1, timeout=FETCH_WAIT)
        try:
            info = await self.s.call("gather consumer", sub.consumer_info())
            more = min(info.num_pending or 0, FETCH_BATCH - 1)
            if more:
                msgs += await sub.fetch(more, timeout=DRAIN_WAIT)
        except Exception:  # TimeoutError included: what we have is a batch
            pass
        return msgs

    async def handle_batch(self, msgs: list[Any]) -> None:
        """Decide, verify and commit ``msgs``, then settle each (see the module
        docstring for the order).

        Raises:
            GatherError: the directory cannot be written (nothing is acked).
        """
        now = time.monotonic()
        acks: list[tuple[Any, str]] = []  # (message, "ack" | "term" | "nak")
        lines: list[str] = []
        publish: list[tuple[int, int]] = []
        purge: list[int] = []
        used: list[str] = []  # objects to delete once the batch is acked
        accepted: list[tuple[Any, ResultMsg]] = []

        def act(d: Decision, msg: Any, kind: str = "ack") -> None:
            if d.line is not None:
                lines.append(d.line)
            if d.verdict is Verdict.RETRY:
                publish.append((d.task, d.generation))
                log.info(
                    "range %d failed (%s): retrying as generation %d",
                    d.task,
                    d.reason,
                    d.generation,
                )
            elif d.verdict is Verdict.ABANDON:
                purge.append(d.task)
                log.warning("range %d abandoned: %s", d.task, d.reason)
            acks.append((msg, kind))

        for msg in msgs:
            try:
                res = decode_result(msg.data, self.s.record)
            except ProtocolError as exc:
                kind = _refusal_kind(msg.data, self.s.job)
                self.s.ledger.refuse(kind)
                self.s.refused(kind, "%s", exc)
                acks.append((msg, "term"))
                continue
            d = self.s.ledger.on_result(res.task, res.generation, res.ok, res.node, res.reason, now)
            if d.verdict is Verdict.ACCEPT:
                accepted.append((msg, res))
                continue
            act(d, msg)
            if res.object is not None:
                used.append(res.object)

        staged: list[Staged] = []
        outcomes = await asyncio.gather(*(self.outputs.verify(res) for _, res in accepted))
        for (msg, res), outcome in zip(accepted, outcomes, strict=True):
            if isinstance(outcome, Staged):
                staged.append(outcome)
                acks.append((msg, "ack"))
            elif isinstance(outcome, Refused):
                d = self.s.ledger.output_refused(
                    res.task, res.generation, outcome.kind, str(outcome), now
                )
                self.s.refused(outcome.kind, "range %d from %s: %s", res.task, res.node, outcome)
                act(d, msg, "term")
                if res.object is not None:
                    used.append(res.object)
            else:  # the broker failed us: not the result's fault, it comes back
                self.s.ledger.release(res.task)
                acks.append((msg, "nak"))

        journal = [
            journal_commit_line(
                self.s.ledger.plan,
                s.task,
                node=s.node,
                generation=s.generation,
                attempt=self.s.ledger.attempt_of(s.task),
            )
            for s in staged
        ]
        if staged or lines:
            async with self.s.ledger_lock:
                try:
                    await asyncio.to_thread(self.s.files.commit, staged, lines, journal)
                except OSError as exc:
                    raise GatherError(f"cannot write {self.s.output}: {exc}") from None
        for s in staged:
            self.s.ledger.commit(s.task, s.node)
            if s.object is not None:
                used.append(s.object)
        for msg, kind in acks:  # one that fails is redelivered later: a duplicate then
            await self.s.settle(msg, kind, "acking a result")
        await self.s.publish(publish)
        for task in purge:
            await self.s.purge(task)
        for name in used:
            await self.outputs.delete_object(name)
