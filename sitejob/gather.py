"""The gather of one site job: results -> verified outputs -> journal -> ``events.out``.

``swarm site-job gather ID --output DIR`` runs :func:`run_gather`. The gather
owns ``DIR`` (an ``flock`` on ``DIR/.lock``: a second gather on it is
refused) and keeps there (``docs/SITE_JOBS.md``, "The gather")::

    journal.jsonl    header (the plan) + one line per committed range
                     (runner/scatter.py's format plus "node" and "generation")
    ledger.jsonl     retries, re-publications, abandonments (sitejob/ledger.py)
    tasks/NNNNNN.out output of committed range NNNNNN
    events.out       every committed range's output in event order (at the end)
    report.json      the final report

What is decided lives in the pure :class:`~sitejob.ledger.RangeLedger`; this
module is its adapter to the broker and the disk. Four loops share it:

* results: fetch a batch from the ``gather`` consumer, decode each result
  against the job's record, verify size and SHA-256 of its output (inline,
  or from the object store, each get with a deadline), write
  ``tasks/NNNNNN.out`` (temporary file, rename), fsync the outputs and
  ``tasks/``, append and fsync the ledger lines then the journal lines,
  THEN ack the batch; then publish the retries and delete used objects;
* dead letters: the server's max-deliveries advisories (kept in the job's
  ``SITE_<ID>_DEAD`` stream, so none is missed while the gather is down):
  abandon the range, then purge its messages from the ranges stream;
* reconciler, every ~ack_wait: which ranges are in the ranges stream, then
  (once every result published before that was processed) republish what
  the ledger says is lost;
* status, about once a second: the ledger's status to the KV and to the
  ``progress`` callback.

Invariants: a range is committed exactly when its journal line is durable,
and its output was renamed into place and fsynced before; a result is acked
only after what it caused is durable (its journal line, or its ledger
line), so a gather killed at any instant and restarted commits every range
once (a redelivered result of a committed range is a duplicate). A ledger
line is durable before the publication or purge it records. Bad input is
refused (counted by kind in the status, logged, acked with ``term``), never
committed, never a crash. Every broker call has a deadline; a broker that
goes away is waited for (the client reconnects; failed calls are retried
after :data:`RETRY_PAUSE`), it never ends the gather.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.exceptions import JournalError
from runner.scatter import Plan
from sitejob import store
from sitejob.config import SiteConfig, connect
from sitejob.exceptions import GatherBusy, GatherError, ProtocolError, SiteJobError
from sitejob.gather_dir import DirLock, GatherDir, Staged, open_gather_dir
from sitejob.gather_outputs import OutputFetcher, Refused
from sitejob.gather_session import FETCH_WAIT, RETRY_PAUSE, GatherSession
from sitejob.ledger import (
    Decision,
    Verdict,
    journal_commit_line,
)
from sitejob.protocol import (
    GATHER,
    JobRecord,
    ResultMsg,
    beat_subject,
    dead_stream,
    decode_beat,
    decode_max_deliveries,
    decode_result,
    job_id_problem,
    range_task,
    ranges_stream,
    results_stream,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("sitejob.gather")

FETCH_BATCH = 256  # results fetched (and committed as one group) at once
DRAIN_WAIT = 0.5  # seconds a fetch of results known to be ready may take
STATUS_INTERVAL = 1.0  # seconds between status reports
FINISH_TRIES = 20  # attempts to tell the broker a job is complete (x RETRY_PAUSE apart)
RIVAL_QUIET = 10.0  # another gather whose status is younger than this is alive


@dataclass
class GatherReport:
    """What a gather did; ``complete``: every range is committed or abandoned."""

    job: str
    output: str
    complete: bool
    events_planned: int
    events_committed: int
    ranges: dict[str, int]
    abandoned: list[dict[str, Any]]
    nodes: dict[str, int]
    retries: int
    republished: int
    duplicates: int
    refused: dict[str, int]
    seconds: float
    events_out: str | None = None  # the gathered output (complete only)
    stopped: str | None = None  # why it ended before the job was complete
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "output": self.output,
            "complete": self.complete,
            "events_planned": self.events_planned,
            "events_committed": self.events_committed,
            "ranges": self.ranges,
            "abandoned": self.abandoned,
            "nodes": self.nodes,
            "retries": self.retries,
            "republished": self.republished,
            "duplicates": self.duplicates,
            "refused": self.refused,
            "seconds": round(self.seconds, 3),
            "events_out": self.events_out,
            "stopped": self.stopped,
            "warnings": self.warnings,
        }


def _refusal_kind(data: bytes, job: str) -> str:
    """Why a result that the plan refused was refused, as a counter name."""
    try:
        msg = decode_result(data)
    except ProtocolError:
        return "malformed"
    return "other job" if msg.job != job else "not in the plan"


def _honour_cancellation() -> None:
    """Raise CancelledError if this task was cancelled and a call swallowed it.

    Python 3.11's ``asyncio.wait_for`` (used inside nats-py's requests) loses
    a cancellation that arrives as the awaited call completes; the task's
    ``cancelling()`` count still says it was asked to stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Gather(GatherSession):
    """One run of the gather over a connected client; see the module docstring."""

    def __init__(
        self,
        cfg: SiteConfig,
        nc: Any,
        record: JobRecord,
        files: GatherDir,
        output: Path,
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        super().__init__(cfg, nc, record, files, output)
        self.progress = progress
        self.live: dict[str, int] = {}  # ready/running from the workers consumer
        self.outputs = OutputFetcher(self)

    # --- results
    async def results_loop(self) -> None:
        sub: Any = None
        while not self.closing.is_set():
            try:
                if sub is None:
                    sub = await self.call(
                        "bind", self.js.pull_subscribe_bind(GATHER, stream=results_stream(self.job))
                    )
                msgs = await self.fetch_batch(sub)
            except TimeoutError:
                continue
            except Exception as exc:
                self.warn(
                    "fetch", "fetching results failed (retrying): %s", exc or type(exc).__name__
                )
                await self.pause(RETRY_PAUSE)
                continue
            await self.handle_batch(msgs)
            if self.ledger.finished:
                self.done.set()

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
            info = await self.call("gather consumer", sub.consumer_info())
            more = min(info.num_pending or 0, FETCH_BATCH - 1)
            if more:
                msgs += await sub.fetch(more, timeout=DRAIN_WAIT)
        except Exception:  # TimeoutError included: what we have is a batch
            pass
        return msgs

    async def handle_batch(self, msgs: list[Any]) -> None:
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
                res = decode_result(msg.data, self.record)
            except ProtocolError as exc:
                kind = _refusal_kind(msg.data, self.job)
                self.ledger.refuse(kind)
                self.refused(kind, "%s", exc)
                acks.append((msg, "term"))
                continue
            d = self.ledger.on_result(res.task, res.generation, res.ok, res.node, res.reason, now)
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
                d = self.ledger.output_refused(
                    res.task, res.generation, outcome.kind, str(outcome), now
                )
                self.refused(outcome.kind, "range %d from %s: %s", res.task, res.node, outcome)
                act(d, msg, "term")
                if res.object is not None:
                    used.append(res.object)
            else:  # the broker failed us: not the result's fault, it comes back
                self.ledger.release(res.task)
                acks.append((msg, "nak"))

        journal = [
            journal_commit_line(
                self.ledger.plan,
                s.task,
                node=s.node,
                generation=s.generation,
                attempt=self.ledger.attempt_of(s.task),
            )
            for s in staged
        ]
        if staged or lines:
            async with self.ledger_lock:
                try:
                    await asyncio.to_thread(self.files.commit, staged, lines, journal)
                except OSError as exc:
                    raise GatherError(f"cannot write {self.output}: {exc}") from None
        for s in staged:
            self.ledger.commit(s.task, s.node)
            if s.object is not None:
                used.append(s.object)
        for msg, kind in acks:
            try:
                if kind == "ack":
                    await msg.ack()
                elif kind == "term":
                    await msg.term()
                else:
                    await msg.nak(delay=RETRY_PAUSE)
            except Exception as exc:  # redelivered later: a duplicate then
                self.warn("ack", "acking a result failed: %s", exc or type(exc).__name__)
        await self.publish(publish)
        for task in purge:
            await self.purge(task)
        for name in used:
            await self.outputs.delete_object(name)

    # --- heartbeats
    async def on_beat(self, msg: Any) -> None:
        try:
            beat = decode_beat(msg.data)
        except ProtocolError as exc:
            self.ledger.refuse("malformed heartbeat")
            self.refused("malformed heartbeat", "%s", exc)
            return
        if beat.job == self.job:
            self.ledger.heard_of(beat.task, time.monotonic())

    # --- dead letters
    async def dead_loop(self) -> None:
        from nats.js.errors import NotFoundError

        sub: Any = None
        while not self.closing.is_set():
            try:
                if sub is None:
                    sub = await self.call(
                        "bind", self.js.pull_subscribe_bind(GATHER, stream=dead_stream(self.job))
                    )
                msgs = await sub.fetch(16, timeout=FETCH_WAIT)
            except TimeoutError:
                continue
            except Exception as exc:
                self.warn(
                    "dead", "fetching advisories failed (retrying): %s", exc or type(exc).__name__
                )
                await self.pause(RETRY_PAUSE)
                continue
            for msg in msgs:
                try:
                    adv = decode_max_deliveries(msg.data, self.job)
                except ProtocolError as exc:
                    self.ledger.refuse("malformed advisory")
                    self.refused("malformed advisory", "%s", exc)
                    await self.settle(msg, "term")
                    continue
                try:
                    raw = await self.call(
                        "get range", self.js.get_msg(ranges_stream(self.job), adv.stream_seq)
                    )
                    task = range_task(self.job, raw.subject)
                except NotFoundError:
                    await self.settle(msg, "ack")  # acked, deleted or purged since
                    continue
                except ProtocolError as exc:
                    self.ledger.refuse("malformed advisory")
                    self.refused("malformed advisory", "%s", exc)
                    await self.settle(msg, "term")
                    continue
                except Exception as exc:
                    self.warn(
                        "dead", "cannot read a dead range (retrying): %s", exc or type(exc).__name__
                    )
                    await self.settle(msg, "nak")
                    continue
                d = self.ledger.max_deliveries(task, adv.deliveries)
                if d is not None and d.line is not None:
                    try:
                        await self.write_ledger([d.line])
                    except OSError as exc:
                        raise GatherError(f"cannot write {self.output}: {exc}") from None
                    log.warning("range %d abandoned: %s", task, d.reason)
                    await self.purge(task)
                else:
                    with contextlib.suppress(Exception):
                        await self.call(
                            "delete", self.js.delete_msg(ranges_stream(self.job), adv.stream_seq)
                        )
                await self.settle(msg, "ack")
            if self.ledger.finished:
                self.done.set()

    # --- reconciler
    async def reconcile_loop(self) -> None:
        from nats.js.errors import NotFoundError

        interval = min(max(self.record.ack_wait, 0.5), 60.0)
        while not self.closing.is_set():
            await self.pause(interval)
            if self.closing.is_set():
                return
            try:
                await self.reconcile_once()
            except NotFoundError:
                if not self.ledger.finished:
                    raise GatherError(
                        f"site job {self.job}: its streams are gone "
                        "(gathered elsewhere, or removed)"
                    ) from None
            except OSError as exc:
                raise GatherError(f"cannot write {self.output}: {exc}") from None
            except Exception as exc:
                self.warn(
                    "reconcile", "reconciling failed (retrying): %s", exc or type(exc).__name__
                )

    async def reconcile_once(self) -> None:
        """One round: the ranges in the stream, then, once every result published
        before the snapshot was processed, the ledger's republications."""
        subjects = await self.call("stream", store.stream_subjects(self.js, self.job))
        info = await self.call("results", self.js.stream_info(results_stream(self.job)))
        last = info.state.last_seq or 0
        deadline = time.monotonic() + self.record.ack_wait
        while True:
            ci = await self.call(
                "gather consumer", self.js.consumer_info(results_stream(self.job), GATHER)
            )
            if (ci.ack_floor.stream_seq or 0) >= last or ci.num_pending == ci.num_ack_pending == 0:
                break
            if time.monotonic() > deadline:
                return  # a backlog: next round
            await self.pause(0.1)
            if self.closing.is_set():
                return
        in_stream = set()
        for subject in subjects:
            with contextlib.suppress(ProtocolError):
                in_stream.add(range_task(self.job, subject))
        decisions = self.ledger.reconcile(time.monotonic(), in_stream)
        if not decisions:
            return
        await self.write_ledger([d.line for d in decisions if d.line is not None])
        log.warning(
            "republishing %d lost range(s) (first: %s)",
            len(decisions),
            ", ".join(str(d.task) for d in decisions[:10]),
        )
        await self.publish([(d.task, d.generation) for d in decisions])

    # --- status
    def status(self) -> dict[str, Any]:
        st = self.ledger.status()
        st["ranges"].update(self.live)
        st["gather"] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "output": str(self.output),
            "updated": time.time(),
        }
        return st

    async def put_status(self, st: dict[str, Any]) -> None:
        await self.call("status", store.put_status(self.js, self.job, json.dumps(st).encode()))

    async def status_loop(self) -> None:
        from nats.js.api import ConsumerInfo

        while not self.closing.is_set():
            try:
                ci: ConsumerInfo = await self.call(
                    "workers", self.js.consumer_info(ranges_stream(self.job), "workers")
                )
                self.live = {"ready": ci.num_pending or 0, "running": ci.num_ack_pending or 0}
            except Exception:
                self.live = {}
            st = self.status()
            try:
                await self.put_status(st)
            except Exception as exc:
                self.warn(
                    "status", "cannot write the status (retrying): %s", exc or type(exc).__name__
                )
            if self.progress is not None:
                self.progress(st)
            await self.pause(STATUS_INTERVAL)

    # --- the run
    async def check_rival(self) -> None:
        """Refuse to run beside a live gather of the same job in another place."""
        try:
            raw = await self.call("status", store.get_status(self.js, self.job))
        except Exception:
            return
        if raw is None:
            return
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            other = json.loads(raw).get("gather") or {}
            mine = (socket.gethostname(), str(self.output))
            age = time.time() - float(other.get("updated", 0))
            if (other.get("host"), other.get("output")) != mine and age < RIVAL_QUIET:
                raise GatherBusy(
                    f"site job {self.job} is being gathered by {other.get('host')} "
                    f"(pid {other.get('pid')}) into {other.get('output')}"
                )

    async def run(self, stop: asyncio.Event | None) -> GatherReport:
        if self.ledger.finished:
            return await self.finish()
        await self.check_rival()
        # The job's dead letters (a job made before they existed gets them
        # now), and a clean slate for what a killed gather had fetched.
        await store.ensure_dead_letters(self.js, self.job)
        await store.reset_gather_consumers(self.js, self.job)
        beats = None
        try:
            beats = await self.call(
                "subscribe", self.nc.subscribe(beat_subject(self.job), cb=self.on_beat)
            )
        except Exception as exc:
            self.warn("beat", "cannot hear heartbeats: %s", exc)
        _honour_cancellation()
        loops = [
            asyncio.create_task(self.results_loop(), name="results"),
            asyncio.create_task(self.dead_loop(), name="dead letters"),
            asyncio.create_task(self.reconcile_loop(), name="reconciler"),
            asyncio.create_task(self.status_loop(), name="status"),
        ]
        waits = [asyncio.create_task(self.done.wait())]
        if stop is not None:
            waits.append(asyncio.create_task(stop.wait()))
        try:
            await asyncio.wait([*loops, *waits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.closing.set()
            for w in waits:
                w.cancel()
            # Every loop ends at its next wakeup (at most a fetch's wait plus a
            # batch's broker deadlines); a commit in progress is never cut.
            _, late = await asyncio.wait(
                loops, timeout=FETCH_WAIT + 6 * self.cfg.request_timeout + 30
            )
            for t in late:
                t.cancel()
            if beats is not None:
                with contextlib.suppress(Exception):
                    await beats.unsubscribe()
        for t in loops:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        if self.ledger.finished:
            return await self.finish()
        st = self.status()
        with contextlib.suppress(Exception):
            await self.put_status(st)
        return self.report(st, stopped="stopped before the job was complete")

    async def finish(self) -> GatherReport:
        st = self.status()
        report = self.report(st)
        try:
            out = await asyncio.to_thread(
                self.files.finish, self.ledger.committed, report.to_json()
            )
        except OSError as exc:
            raise GatherError(f"cannot write {self.output}: {exc}") from None
        report.events_out = str(out)
        for attempt in range(FINISH_TRIES):
            try:
                await self.put_status(st)
                break
            except Exception as exc:
                if attempt == FINISH_TRIES - 1:
                    raise GatherError(
                        f"site job {self.job} is gathered in {out}, but the broker could not be "
                        f"told ({exc or type(exc).__name__}): run the gather again to finish"
                    ) from None
                await asyncio.sleep(RETRY_PAUSE)
        try:
            await self.call("cleanup", store.remove_job_data(self.js, self.job), 30)
        except (TimeoutError, SiteJobError) as exc:
            report.warnings.append(f"the job's streams were not removed: {exc}")
            log.warning("site job %s: the streams were not removed: %s", self.job, exc)
        return report

    def report(self, st: dict[str, Any], stopped: str | None = None) -> GatherReport:
        return GatherReport(
            job=self.job,
            output=str(self.output),
            complete=bool(st["complete"]),
            events_planned=st["events_planned"],
            events_committed=st["events_committed"],
            ranges=dict(st["ranges"]),
            abandoned=list(st["abandoned"]),
            nodes=dict(st["nodes"]),
            retries=st["retries"],
            republished=st["republished"],
            duplicates=st["duplicates"],
            refused=dict(st["refused"]),
            seconds=time.monotonic() - self.t0,
            stopped=stopped,
        )


async def gather_job(
    cfg: SiteConfig,
    job: str,
    output: Path,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> GatherReport:
    """Gather site job ``job`` into the directory ``output`` until every range is
    committed or abandoned (or ``stop`` is set); see the module docstring.

    ``progress`` is called about once a second with the status (``events_committed``,
    ``events_planned``, ``ranges``...).

    Raises:
        GatherBusy: another gather holds ``output`` or gathers the job elsewhere.
        GatherError: ``output`` belongs to another job or plan, cannot be
            written, or the job's streams are gone before it was complete.
        sitejob.exceptions.UnknownSiteJob: no such job.
        sitejob.exceptions.SiteJobError: its record is unreadable.
        sitejob.exceptions.BrokerError: the broker cannot be reached at start.
        swarm.exceptions.ConfigError: the token or credentials cannot be read.
    """
    problem = job_id_problem(job)
    if problem:
        raise GatherError(problem)
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GatherError(f"cannot create {output}: {exc.strerror}") from None
    lock = DirLock(output)
    lock.acquire()
    try:
        nc = await connect(cfg, name=f"swarm-gather-{job}")
        try:
            js = nc.jetstream(timeout=cfg.request_timeout)
            record = await store.load_job(js, job)
            plan = Plan(job, record.first_event, record.events, record.events_per_task)
            try:
                files = await open_gather_dir(output, plan)
            except JournalError as exc:
                raise GatherError(f"{output}: {exc}") from None
            except OSError as exc:
                raise GatherError(f"cannot use {output}: {exc}") from None
            try:
                return await _Gather(cfg, nc, record, files, output, progress).run(stop)
            finally:
                files.close()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), cfg.request_timeout)
    finally:
        lock.release()


def run_gather(
    cfg: SiteConfig,
    job: str,
    output: Path,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> GatherReport:
    """:func:`gather_job` for a command line: SIGINT and SIGTERM stop it cleanly
    (the status is written; the report says it is not complete).

    Raises:
        As :func:`gather_job`.
    """

    async def main() -> GatherReport:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            return await gather_job(cfg, job, output, progress=progress, stop=stop)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())
