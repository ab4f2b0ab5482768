"""The node side of the site event service: pull ranges, run them, report them.

:class:`SiteWorker` runs inside the node daemon's event loop
(``docs/SITE_JOBS.md``, "The worker"). For each site job in the broker that
is neither complete (the gather's status in the KV) nor gone (its streams
deleted), it pulls from the job's ``workers`` consumer, one range at a time,
and only when

* a core is free in the node's :class:`runner.cores.CoreLedger` (node jobs
  and site ranges together never hold more than the lease's cores; a node
  job waiting for cores pauses pulling), at most ``site.max_ranges`` at once;
* the range fits the lease: ``estimate x 1.2 <= time left - end reserve``,
  the estimate being this node's smoothed wall seconds per event of this job
  times the range's events, or before any measurement
  ``cpu_work_per_event / power_per_core`` per event (the rule and the pace:
  the pure ``sitejob/pacing.py``).

A range runs exactly like a node task: :func:`runner.node_run.run_job` with
one task of the range's events on one core, confined as the node's jobs are
(job user, memory cgroup of ``lease memory / cores``), in
``DATA_DIR/site/<ID>/<task>.<stream seq>/``, in a thread with a
:class:`runner.stop.StopRequest` so that it can be cut. While it runs, an
in-progress ack and a :class:`sitejob.protocol.BeatMsg` go out every
AckWait/3.

Invariants (the order is what makes a node's death cost at most a re-run):

* a result is published with the message id ``<job>.<task>.<node>.<seq>``
  and stored (PubAck) *before* its range is acked: a node dying in between
  leaves the range to be redelivered, never a range acked without a result;
* an output above ``INLINE_MAX`` is in the object store before its result
  (both carried out by :class:`sitejob.range_report.RangeReporter`);
* a range that cannot finish before the lease ends (less the end reserve),
  or is still running when the daemon stops after the runner's grace, is cut
  and ``nak``-ed: redelivered at once to another node, not reported;
* a bad range message (malformed, not in the job's plan) is logged with the
  reason, counted, terminated (``term``: never redelivered) and never run;
* a failed run (exit status, timeout, memory kill) is reported ``ok =
  false`` with the reason and acked: retries are the gather ledger's call.

Every broker call has a deadline (``site.request_timeout``); a broker that
is down or restarting costs retries after short sleeps, never a crash (the
client reconnects on its own, :func:`sitejob.config.connect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.confine import Confinement
from runner.cores import CoreLedger
from runner.elastic import END_RESERVE, end_reserve
from runner.exceptions import JobSpecError, RunnerError, TaskError
from runner.lease import Lease
from runner.node_run import RunReport, run_job
from runner.spec import JobSpec, decode_spec, parse_spec
from sitejob import pacing
from sitejob.config import SiteConfig
from sitejob.exceptions import ProtocolError, SiteJobError
from sitejob.protocol import (
    INLINE_MAX,
    MAX_REASON,
    WORKERS,
    BeatMsg,
    JobRecord,
    beat_subject,
    decode_range,
    encode,
    encode_inline,
    ranges_stream,
)
from sitejob.range_report import RangeReporter, RunningRange, reason_of, size_and_sha256
from sitejob.store import get_status, job_ids, load_job
from swarm.status import RangeReport, SiteReport

log = logging.getLogger("sitejob.worker")

NODE_FAULT_DELAY = 10.0  # seconds before a range this node could not run is redelivered
_MAX_REFUSAL_KINDS = 32  # distinct refusal reasons counted; the rest go under "other"


@dataclass
class _Job:
    """A site job this node may pull from."""

    record: JobRecord
    spec: JobSpec
    sub: Any = None  # the pull subscription, bound on first use


@dataclass
class _Counters:
    run: int = 0
    reported: int = 0
    failed: int = 0
    handed_back: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        key = reason[:200]
        if key not in self.refused and len(self.refused) >= _MAX_REFUSAL_KINDS:
            key = "other reasons"
        self.refused[key] = self.refused.get(key, 0) + 1


class SiteWorker:
    """Pulls and runs site ranges for one node; see the module docstring.

    ``js`` is a JetStream context of a connected client (``nc``, used for
    heartbeats and to tell whether the broker is reachable). ``lease_at(now)``
    gives the node's lease (read in a thread, at most every ``lease_every``
    seconds); ``cores`` is the node's core ledger, shared with the job
    service. ``poll`` is how long one pull waits for a range; the job list is
    re-read every ``jobs_every`` seconds. Create it inside the running loop,
    ``await run()``, and ``await stop()`` from elsewhere.
    """

    def __init__(
        self,
        nc: Any,
        js: Any,
        cfg: SiteConfig,
        *,
        data_dir: Path,
        cores: CoreLedger,
        lease_at: Callable[[float], Lease],
        confinement: Confinement | None = None,
        grace: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        poll: float = 1.0,
        jobs_every: float = 2.0,
        lease_every: float = 2.0,
        reserve_floor: float = END_RESERVE,
    ) -> None:
        self.nc = nc
        self.js = js
        self.cfg = cfg
        self.root = data_dir / "site"
        self.cores = cores
        self.lease_at = lease_at
        self.confinement = confinement
        self.grace = grace
        self.clock = clock
        self.poll = poll
        self.jobs_every = jobs_every
        self.lease_every = lease_every
        self.reserve_floor = reserve_floor
        self.timeout = cfg.request_timeout
        self.jobs: dict[str, _Job] = {}
        self.unusable: dict[str, str] = {}  # job -> why this node does not pull it
        self.pace: dict[str, float] = {}
        self.running: dict[tuple[str, int, int], RunningRange] = {}
        self.counters = _Counters()
        self.reporter = RangeReporter(js, cfg.node_name, cfg.request_timeout, clock)
        self.not_pulling: str | None = "starting"
        self.problem: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._pull_ended: asyncio.Event | None = None
        self._lease: Lease | None = None
        self._lease_read = -1e18
        self._jobs_read = -1e18
        self._turn = 0

    # --- status
    def status(self) -> SiteReport:
        now = self.clock()
        use = self.cores.snapshot()
        return SiteReport(
            broker=list(self.cfg.servers),
            node_name=self.cfg.node_name,
            connected=bool(self.nc.is_connected),
            problem=self.problem,
            work=True,
            not_pulling=self.not_pulling,
            jobs=sorted(self.jobs),
            running=[
                RangeReport(r.job, r.msg.task, r.seq, r.delivered, now - r.started, r.estimate)
                for r in self.running.values()
            ],
            ranges_run=self.counters.run,
            ranges_reported=self.counters.reported,
            ranges_failed=self.counters.failed,
            ranges_handed_back=self.counters.handed_back,
            refused=dict(self.counters.refused),
            pace=dict(self.pace),
            cores=dataclasses.asdict(use),
        )

    # --- the lease and the estimate
    async def _read_lease(self) -> Lease | None:
        now = self.clock()
        if self._lease is None or now - self._lease_read >= self.lease_every:
            try:
                self._lease = await asyncio.to_thread(self.lease_at, now)
                self._lease_read = now
            except RunnerError as exc:
                self.not_pulling = f"no lease: {exc}"
                log.warning("site worker: no lease: %s", exc)
                return None
        return self._lease.at(self._lease.now + (now - self._lease_read))

    def _per_event(self, job: _Job, lease: Lease) -> float:
        return pacing.per_event(
            self.pace.get(job.record.id), job.spec.cpu_work_per_event, lease.power_per_core
        )

    def _usable(self, lease: Lease) -> float:
        """Seconds from now until ranges must be done."""
        return pacing.usable(lease.time_left, self.reserve_floor)

    def _fits(self, job: _Job, lease: Lease, count: int) -> bool:
        return pacing.fits(self._per_event(job, lease), count, self._usable(lease))

    # --- the job list
    async def _refresh_jobs(self) -> None:
        """Learn new site jobs, forget complete or deleted ones.

        Raises:
            Exception: a broker error (the caller logs it and retries).
        """
        ids = await asyncio.wait_for(job_ids(self.js), self.timeout)
        seen = set(ids)
        for gone in [j for j in self.jobs if j not in seen]:
            await self._forget(gone, "its record is gone")
        for job in ids:
            if job in self.unusable:
                continue
            if await self._finished(job):
                await self._forget(job, "complete or deleted")
                self.unusable[job] = "complete or deleted"
                continue
            if job in self.jobs:
                continue
            try:
                record = await asyncio.wait_for(load_job(self.js, job), self.timeout)
                spec = parse_spec(decode_spec(record.spec.encode()))
            except (SiteJobError, JobSpecError) as exc:
                self.unusable[job] = str(exc)
                log.warning("site job %s: not pulled: %s", job, exc)
                continue
            self.jobs[job] = _Job(record, spec)
            log.info("site job %s: pulling its ranges", job, extra={"job": job})

    async def _finished(self, job: str) -> bool:
        """The gather says it is complete, or its ranges stream is gone."""
        from nats.js.errors import NotFoundError

        status = await asyncio.wait_for(get_status(self.js, job), self.timeout)
        if status is not None:
            with contextlib.suppress(ValueError):
                doc = json.loads(status)
                if isinstance(doc, dict) and doc.get("complete") is True:
                    return True
        try:
            await asyncio.wait_for(self.js.stream_info(ranges_stream(job)), self.timeout)
        except NotFoundError:
            return True
        return False

    async def _forget(self, job: str, why: str) -> None:
        j = self.jobs.pop(job, None)
        if j is None:
            return
        log.info("site job %s: no longer pulled (%s)", job, why, extra={"job": job})
        self.pace.pop(job, None)
        if j.sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(j.sub.unsubscribe(), self.timeout)

    # --- the pull loop
    async def run(self) -> None:
        """Pull and run ranges until :meth:`stop`; never raises for broker errors."""
        self._wake = asyncio.Event()
        self._pull_ended = asyncio.Event()
        try:
            await self._pull()
        finally:
            self._pull_ended.set()

    async def _pull(self) -> None:
        assert self._wake is not None
        await asyncio.to_thread(self._sweep)
        while not self._stopping:
            try:
                pulled = await self._round()
                self.problem = None
            except Exception as exc:  # a broker error: retry after a short sleep
                self.problem = reason_of(exc)
                self.not_pulling = f"broker error: {self.problem}"
                log.warning("site worker: %s", self.problem)
                pulled = False
            if self._stopping:
                break
            if not pulled:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    def _sweep(self) -> None:
        """Range directories left by a node that died: nothing runs in them now."""
        if self.root.is_dir():
            for d in self.root.iterdir():
                shutil.rmtree(d, ignore_errors=True)

    async def _round(self) -> bool:
        """One pass over the jobs; True if a range was pulled (pull again at once)."""
        if not self.nc.is_connected:
            self.not_pulling = "not connected to the broker"
            return False
        now = self.clock()
        if now - self._jobs_read >= self.jobs_every:
            await self._refresh_jobs()
            self._jobs_read = now
        lease = await self._read_lease()
        if lease is None:
            return False
        if not self.jobs:
            self.not_pulling = "no site job to pull from"
            return False
        if not self.cores.site_may_pull(lease.cores, self.cfg.max_ranges):
            use = self.cores.snapshot()
            self.not_pulling = (
                "a node job waits for cores"
                if use.node_waiting
                else f"no core free ({use.site} ranges, {use.node} node job cores of {lease.cores})"
            )
            return False
        fitting = [j for j in self.jobs.values() if self._fits(j, lease, j.record.events_per_task)]
        if not fitting:
            self.not_pulling = (
                f"no range fits the lease ({lease.time_left:.0f} s left,"
                f" {end_reserve(lease.time_left, self.reserve_floor):.0f} s reserve)"
            )
            return False
        self.not_pulling = None
        # Round robin: every job gets the next free core in turn.
        self._turn = (self._turn + 1) % len(fitting)
        for job in fitting[self._turn :] + fitting[: self._turn]:
            if self._stopping or not self.cores.claim_site(lease.cores, self.cfg.max_ranges):
                return False
            try:
                msg = await self._fetch(job)
            except BaseException:
                self.cores.release_site()
                raise
            if msg is None:
                self.cores.release_site()
                continue
            self._start(job, msg, lease)
            return True
        return False

    async def _fetch(self, job: _Job) -> Any:
        """One range message of ``job``, or None if none came within ``poll``."""
        import nats.errors

        if job.sub is None:
            job.sub = await asyncio.wait_for(
                self.js.pull_subscribe_bind(durable=WORKERS, stream=ranges_stream(job.record.id)),
                self.timeout,
            )
        try:
            msgs = await asyncio.wait_for(
                job.sub.fetch(1, timeout=self.poll), self.poll + self.timeout
            )
        except (TimeoutError, nats.errors.TimeoutError):
            return None
        return msgs[0] if msgs else None

    def _start(self, job: _Job, msg: Any, lease: Lease) -> None:
        task = asyncio.create_task(self._handle(job, msg, lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one range
    async def _handle(self, job: _Job, msg: Any, lease: Lease) -> None:
        """Decode, run and report one range; the core is released at the end."""
        try:
            try:
                rng = decode_range(msg.data, job.record)
            except ProtocolError as exc:
                await self._refuse(job, msg, str(exc))
                return
            meta = msg.metadata
            r = RunningRange(
                job=job.record.id,
                msg=rng,
                seq=int(meta.sequence.stream),
                delivered=int(meta.num_delivered),
                delivery=msg,
                started=self.clock(),
                estimate=self._per_event(job, lease) * rng.count,
            )
            mine = self.running.get((r.job, rng.task, r.seq))
            if mine is not None and mine.hand_back is None and not self._stopping:
                # Redelivered to this node while it still runs it (its heartbeats
                # were lost: a broker outage): one run, held by the new delivery.
                mine.delivery, mine.delivered = msg, r.delivered
                log.info("site job %s: range %d redelivered to its runner", r.job, rng.task)
                return
            if mine is not None:  # it is being cut and handed back: again
                await self._give_back(r, mine.hand_back or "the node stops")
                return
            if self._stopping or not self._fits(job, lease, rng.count):
                await self._give_back(r, "does not fit the lease any more")
                return
            await self._run_range(job, r, lease)
        except Exception:  # never let one range take the worker down
            log.exception("site job %s: handling a range failed", job.record.id)
        finally:
            self.cores.release_site()
            if self._wake is not None:
                self._wake.set()

    async def _refuse(self, job: _Job, msg: Any, reason: str) -> None:
        self.counters.refuse(reason)
        log.warning("site job %s: refused a range message: %s", job.record.id, reason)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(msg.term(), self.timeout)

    async def _give_back(self, r: RunningRange, why: str, delay: float | None = None) -> None:
        """``nak``: the broker redelivers the range at once (after ``delay``).

        When the node stops, not before this node's last pull request has
        expired: else the broker could hand the range straight back to it.
        """
        if self._stopping and self._pull_ended is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pull_ended.wait(), self.poll + self.timeout + 1)
        self.counters.handed_back += 1
        log.info(
            "site job %s: range %d handed back: %s",
            r.job,
            r.msg.task,
            why,
            extra={"job": r.job, "range": r.msg.task},
        )
        try:
            await asyncio.wait_for(r.delivery.nak(delay), self.timeout)
            await asyncio.wait_for(self.nc.flush(self.timeout), self.timeout + 1)
        except Exception as exc:  # AckWait redelivers it anyway
            log.warning(
                "site job %s: nak of range %d failed: %s", r.job, r.msg.task, reason_of(exc)
            )

    async def _run_range(self, job: _Job, r: RunningRange, lease: Lease) -> None:
        key = (r.job, r.msg.task, r.seq)
        work = self.root / r.job / f"{r.msg.task}.{r.seq}"
        self.running[key] = r
        self.counters.run += 1
        deadline = r.started + self._usable(lease)
        spec = dataclasses.replace(
            job.spec,
            first_event=r.msg.first,
            events_per_task=r.msg.count,
            max_events=r.msg.count,
            min_events=1,
        )
        memory = None if lease.memory is None else max(1, lease.memory // max(1, lease.cores))
        run = asyncio.ensure_future(
            asyncio.to_thread(self._run_blocking, spec, r, work, memory, deadline)
        )
        beat_every = job.record.ack_wait / 3
        next_beat = r.started  # the first one at once: the delivery may have waited
        try:
            while True:
                now = self.clock()
                if now >= next_beat:
                    await self._beat(r)
                    next_beat = now + beat_every
                await self._check_lease(r)
                tick = max(0.05, min(next_beat - self.clock(), 1.0))
                done, _ = await asyncio.wait({run}, timeout=tick)
                if done:
                    break
            outcome = run.result()
            await self._conclude(job, r, work, outcome)
        finally:
            if not run.done():  # cancelled (the loop is closing): cut the run
                r.stop.request("site worker cancelled", 0)
            self.running.pop(key, None)

    def _run_blocking(
        self, spec: JobSpec, r: RunningRange, work: Path, memory: int | None, deadline: float
    ) -> RunReport | str:
        """The range's run (a worker thread): its report, or why it could not run."""
        try:
            return run_job(
                spec,
                r.msg.count,
                work,
                cores=1,
                stop=r.stop,
                grace=self.grace,
                memory=memory,
                confinement=self.confinement,
                deadline=deadline,
                max_attempts=1,  # retries are the gather ledger's decision
                clock=self.clock,
            )
        except TaskError as exc:  # the command cannot start here: the range failed
            return f"cannot run: {exc}"
        except RunnerError as exc:  # the node's fault (confinement, its directory)
            r.node_fault = f"this node cannot run it: {exc}"
            return r.node_fault

    async def _beat(self, r: RunningRange) -> None:
        """In-progress ack and heartbeat; a broker hiccup only costs this one."""
        try:
            await asyncio.wait_for(r.delivery.in_progress(), self.timeout)
            beat = BeatMsg(job=r.job, task=r.msg.task, node=self.cfg.node_name)
            await asyncio.wait_for(self.nc.publish(beat_subject(r.job), encode(beat)), self.timeout)
        except Exception as exc:
            log.warning("site job %s: heartbeat of range %d: %s", r.job, r.msg.task, reason_of(exc))

    async def _check_lease(self, r: RunningRange) -> None:
        """Cut a range that cannot finish before the lease ends (less the reserve)."""
        if r.hand_back is not None:
            return
        lease = await self._read_lease()
        if lease is None:
            return
        now = self.clock()
        remaining = max(0.0, r.started + r.estimate - now)
        usable = self._usable(lease)
        if remaining > usable or usable <= 0:
            r.hand_back = (
                f"the lease ends in {lease.time_left:.3g} s; about {remaining:.3g} s of the"
                " range are left"
            )
            r.stop.request(r.hand_back, 0)

    async def _conclude(
        self, job: _Job, r: RunningRange, work: Path, outcome: RunReport | str
    ) -> None:
        report = outcome if isinstance(outcome, RunReport) else None
        if report is not None and report.complete and report.tasks_committed == 1:
            await self._report_success(job, r, work, report)
        elif r.node_fault is not None:
            # Not the range's fault: another node (or this one, later) runs it.
            self.problem = r.node_fault
            log.warning("site job %s: %s", r.job, r.node_fault)
            await self._give_back(r, r.node_fault, delay=NODE_FAULT_DELAY)
        elif r.hand_back is not None or (report is not None and not report.abandoned):
            # Cut (lease end, node stop): another node runs it now.
            await self._give_back(r, r.hand_back or str(report and report.stopped))
        else:
            if report is None:
                why = str(outcome)
            else:
                reasons = next(iter(report.abandoned.values()), None) or report.failures
                why = "; ".join(reasons) or "the run failed"
            await self.reporter.report(
                r, self.reporter.result(r, ok=False, reason=why[:MAX_REASON])
            )
            self.counters.failed += 1
        await asyncio.to_thread(shutil.rmtree, work, True)

    async def _report_success(
        self, job: _Job, r: RunningRange, work: Path, report: RunReport
    ) -> None:
        output = Path(report.output)
        size, digest = await asyncio.to_thread(size_and_sha256, output)
        extra: dict[str, Any] = {}
        if size <= INLINE_MAX:
            extra["inline"] = encode_inline(await asyncio.to_thread(output.read_bytes))
        else:
            name = f"{r.msg.task}.{self.cfg.node_name}.{r.seq}"
            if not await self.reporter.put_object(r, name, output, size):
                return  # not reported, not acked: AckWait redelivers it elsewhere
            extra["object"] = name
        result = self.reporter.result(
            r,
            ok=True,
            size=size,
            sha256=digest,
            seconds=report.wall_seconds,
            cpu=report.cpu_seconds,
            **extra,
        )
        if await self.reporter.report(r, result):
            self.counters.reported += 1
            per_event = (self.clock() - r.started) / r.msg.count
            self.pace[r.job] = pacing.smoothed(self.pace.get(r.job), per_event)

    # --- stopping
    async def stop(self, grace: float | None = None) -> None:
        """Stop pulling; running ranges get ``grace`` (default: the runner's)
        seconds to finish and be reported, then are cut and handed back."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        g = self.grace if grace is None else grace
        for r in self.running.values():
            r.hand_back = r.hand_back or "the node stops"
            r.stop.request("the node stops", g)
        tasks = list(self._tasks)
        if tasks:
            # The grace, the cut, then publishing and nak-ing (each with its deadline).
            await asyncio.wait(tasks, timeout=g + 4 * self.timeout + 35.0)
        for job in list(self.jobs):
            await self._forget(job, "the node stops")
