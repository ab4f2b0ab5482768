"""The gather's watch for ranges the workers lost: heartbeats, dead letters,
the reconciler.

* heartbeats (core NATS, ``swarm.site.<ID>.beat``): a range heard of is
  alive, whatever the stream says;
* dead letters: the server's max-deliveries advisories (kept in the job's
  ``SITE_<ID>_DEAD`` stream, so none is missed while the gather is down):
  abandon the range (its ledger line durable first), then purge its
  messages from the ranges stream;
* reconciler, every ~ack_wait: which ranges are in the ranges stream, then
  (once every result published before that snapshot was processed: the
  ``gather`` consumer's ack floor) republish what the ledger says is lost,
  each with a new generation whose ledger line is durable before it is
  published.

What is lost is the pure :class:`~sitejob.ledger.RangeLedger`'s decision;
this module only feeds it and carries out its decisions. A broker that goes
away is waited for; streams that are gone before the job is complete, or a
disk that refuses, end the gather (:class:`~sitejob.exceptions.GatherError`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from sitejob import store
from sitejob.exceptions import GatherError, ProtocolError
from sitejob.gather_session import FETCH_WAIT, GatherConsumer, GatherSession
from sitejob.protocol import (
    GATHER,
    dead_stream,
    decode_beat,
    decode_max_deliveries,
    range_task,
    ranges_stream,
    results_stream,
)

log = logging.getLogger("sitejob.gather")


class Reconciler:
    """Finds one gather's lost and dead ranges; see the module docstring."""

    def __init__(self, session: GatherSession) -> None:
        self.s = session

    async def on_beat(self, msg: Any) -> None:
        """A heartbeat: the range is alive (a malformed one is counted, refused)."""
        try:
            beat = decode_beat(msg.data)
        except ProtocolError as exc:
            self.s.ledger.refuse("malformed heartbeat")
            self.s.refused("malformed heartbeat", "%s", exc)
            return
        if beat.job == self.s.job:
            self.s.ledger.heard_of(beat.task, time.monotonic())

    async def dead_loop(self) -> None:
        """Abandon the ranges of max-deliveries advisories until the run closes.

        Raises:
            GatherError: the ledger cannot be written.
        """
        from nats.js.errors import NotFoundError

        async def fetch(sub: Any) -> list[Any]:
            msgs: list[Any] = await sub.fetch(16, timeout=FETCH_WAIT)
            return msgs

        advisories = GatherConsumer(self.s, dead_stream(self.s.job), fetch, "dead", "advisories")
        while not self.s.closing.is_set():
            msgs = await advisories.next_batch()
            if msgs is None:
                continue
            for msg in msgs:
                try:
                    adv = decode_max_deliveries(msg.data, self.s.job)
                except ProtocolError as exc:
                    self.s.ledger.refuse("malformed advisory")
                    self.s.refused("malformed advisory", "%s", exc)
                    await self.s.settle(msg, "term")
                    continue
                try:
                    raw = await self.s.call(
                        "get range", self.s.js.get_msg(ranges_stream(self.s.job), adv.stream_seq)
                    )
                    task = range_task(self.s.job, raw.subject)
                except NotFoundError:
                    await self.s.settle(msg, "ack")  # acked, deleted or purged since
                    continue
                except ProtocolError as exc:
                    self.s.ledger.refuse("malformed advisory")
                    self.s.refused("malformed advisory", "%s", exc)
                    await self.s.settle(msg, "term")
                    continue
                except Exception as exc:
                    self.s.warn(
                        "dead", "cannot read a dead range (retrying): %s", exc or type(exc).__name__
                    )
                    await self.s.settle(msg, "nak")
                    continue
                d = self.s.ledger.max_deliveries(task, adv.deliveries)
                if d is not None and d.line is not None:
                    try:
                        await self.s.write_ledger([d.line])
                    except OSError as exc:
                        raise GatherError(f"cannot write {self.s.output}: {exc}") from None
                    log.warning("range %d abandoned: %s", task, d.reason)
                    await self.s.purge(task)
                else:
                    with contextlib.suppress(Exception):
                        await self.s.call(
                            "delete",
                            self.s.js.delete_msg(ranges_stream(self.s.job), adv.stream_seq),
                        )
                await self.s.settle(msg, "ack")
            if self.s.ledger.finished:
                self.s.done.set()

    async def reconcile_loop(self) -> None:
        """Reconcile every ~ack_wait until the run closes.

        Raises:
            GatherError: the job's streams are gone before it is complete, or
                the ledger cannot be written.
        """
        from nats.js.errors import NotFoundError

        interval = min(max(self.s.record.ack_wait, 0.5), 60.0)
        while not self.s.closing.is_set():
            await self.s.pause(interval)
            if self.s.closing.is_set():
                return
            try:
                await self.reconcile_once()
            except NotFoundError:
                if not self.s.ledger.finished:
                    raise GatherError(
                        f"site job {self.s.job}: its streams are gone "
                        "(gathered elsewhere, or removed)"
                    ) from None
            except OSError as exc:
                raise GatherError(f"cannot write {self.s.output}: {exc}") from None
            except Exception as exc:
                self.s.warn(
                    "reconcile", "reconciling failed (retrying): %s", exc or type(exc).__name__
                )

    async def reconcile_once(self) -> None:
        """One round: the ranges in the stream, then, once every result published
        before the snapshot was processed, the ledger's republications."""
        subjects = await self.s.call("stream", store.stream_subjects(self.s.js, self.s.job))
        info = await self.s.call("results", self.s.js.stream_info(results_stream(self.s.job)))
        last = info.state.last_seq or 0
        deadline = time.monotonic() + self.s.record.ack_wait
        while True:
            ci = await self.s.call(
                "gather consumer", self.s.js.consumer_info(results_stream(self.s.job), GATHER)
            )
            if (ci.ack_floor.stream_seq or 0) >= last or ci.num_pending == ci.num_ack_pending == 0:
                break
            if time.monotonic() > deadline:
                return  # a backlog: next round
            await self.s.pause(0.1)
            if self.s.closing.is_set():
                return
        in_stream = set()
        for subject in subjects:
            with contextlib.suppress(ProtocolError):
                in_stream.add(range_task(self.s.job, subject))
        decisions = self.s.ledger.reconcile(time.monotonic(), in_stream)
        if not decisions:
            return
        await self.s.write_ledger([d.line for d in decisions if d.line is not None])
        log.warning(
            "republishing %d lost range(s) (first: %s)",
            len(decisions),
            ", ".join(str(d.task) for d in decisions[:10]),
        )
        await self.s.publish([(d.task, d.generation) for d in decisions])
