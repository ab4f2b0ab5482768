"""The gather of one site job: results -> verified outputs -> journal -> ``events.out``.

``swarm site-job gather ID --output DIR`` runs :func:`run_gather`; this
module is the driver: it takes ``DIR`` (its lock, journal and ledger:
``sitejob/gather_dir.py``), connects, refuses to run beside a live gather
of the same job elsewhere, runs the loops until every range is committed or
abandoned (or it is stopped), then writes ``events.out`` and
``report.json``, tells the broker the job is complete and removes its
streams (``docs/SITE_JOBS.md``, "The gather").

What is decided lives in the pure :class:`~sitejob.ledger.RangeLedger`; the
gather is its adapter to the broker and the disk. Four loops share it
through a :class:`~sitejob.gather_session.GatherSession`:

* results (``sitejob/gather_results.py``): fetch, verify
  (``sitejob/gather_outputs.py``), commit, THEN ack;
* dead letters and the reconciler (``sitejob/gather_reconcile.py``): abandon
  what killed its runners, republish what was lost;
* status (here), about once a second: the ledger's status to the KV and to
  the ``progress`` callback.

Invariants: a range is committed exactly when its journal line is durable,
and its output was renamed into place and fsynced before; a result is acked
only after what it caused is durable, so a gather killed at any instant and
restarted commits every range once. A ledger line is durable before the
publication or purge it records. Every broker call has a deadline; a broker
that goes away is waited for (the client reconnects; failed calls are
retried after :data:`~sitejob.gather_session.RETRY_PAUSE`), it never ends
the gather. A stopped gather ends its loops at their next wakeup and never
cuts a commit in progress.
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
from typing import Any

from runner.exceptions import JournalError
from runner.scatter import Plan
from sitejob import store
from sitejob.config import SiteConfig, connect
from sitejob.exceptions import GatherBusy, GatherError, SiteJobError
from sitejob.gather_dir import DirLock, GatherDir, open_gather_dir
from sitejob.gather_reconcile import Reconciler
from sitejob.gather_results import ResultsLoop
from sitejob.gather_session import FETCH_WAIT, RETRY_PAUSE, GatherSession
from sitejob.protocol import (
    JobRecord,
    beat_subject,
    job_id_problem,
    ranges_stream,
)

log = logging.getLogger("sitejob.gather")

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
        self.results = ResultsLoop(self)
        self.lost = Reconciler(self)

    # --- status
    def status(self) -> dict[str, Any]:
        """The ledger's status, the workers consumer's counts, and who gathers."""
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
        """Write the status to the KV (and ``progress``) about once a second."""
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
        """Run the loops until the job is finished or ``stop`` is set.

        Raises:
            As :func:`gather_job`.
        """
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
                "subscribe", self.nc.subscribe(beat_subject(self.job), cb=self.lost.on_beat)
            )
        except Exception as exc:
            self.warn("beat", "cannot hear heartbeats: %s", exc)
        _honour_cancellation()
        loops = [
            asyncio.create_task(self.results.results_loop(), name="results"),
            asyncio.create_task(self.lost.dead_loop(), name="dead letters"),
            asyncio.create_task(self.lost.reconcile_loop(), name="reconciler"),
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
        """``events.out`` and ``report.json``, the complete status, the streams removed.

        Raises:
            GatherError: the directory cannot be written, or the broker cannot
                be told the job is complete.
        """
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
            log.warning(
                "site job %s: the streams were not removed: %s",
                self.job,
                exc,
                extra={"job": self.job},
            )
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
