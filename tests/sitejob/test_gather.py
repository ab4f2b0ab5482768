"""The gather (sitejob/gather.py) against a real nats-server on 127.0.0.1, with
simulated workers: the test fetches ranges from the ``workers`` consumer and
publishes their results itself, as a node would (the gather is what is tested).

Each test checks the gathered output byte for byte: every planned event
exactly once, in event order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runner.scatter import replay_journal
from sitejob import store
from sitejob.config import SiteConfig, connect
from sitejob.exceptions import GatherBusy
from sitejob.gather import GatherReport, gather_job
from sitejob.protocol import (
    WORKERS,
    BeatMsg,
    JobRecord,
    ResultMsg,
    beat_subject,
    decode_range,
    encode,
    encode_inline,
    output_bucket,
    range_subject,
    ranges_stream,
    result_subject,
)
from swarm_testing.waiting import eventually_async
from tests.sitejob import broker_client
from tests.sitejob.broker_client import Broker, jetstream

pytestmark = pytest.mark.nats

DRIVER = str(Path(__file__).with_name("gather_driver.py"))
ROOT = Path(__file__).resolve().parents[2]


def events_text(first: int, count: int) -> bytes:
    return b"".join(b"event %d\n" % e for e in range(first, first + count))


def record(
    job: str = "J1",
    *,
    events: int = 200,
    per_task: int = 10,
    first: int = 1000,
    ack_wait: float = 2.0,
    max_attempts: int = 3,
) -> JobRecord:
    return JobRecord(
        id=job,
        spec="name = 'synth'\n",
        first_event=first,
        events=events,
        events_per_task=per_task,
        submitted=time.time(),
        ack_wait=ack_wait,
        max_attempts=max_attempts,
    )


async def submit(cfg: SiteConfig, rec: JobRecord) -> None:
    async with jetstream(cfg) as js:
        await broker_client.submit(js, rec)


def result_of(
    rec: JobRecord, task: int, first: int, count: int, gen: int, node: str, **kw: Any
) -> ResultMsg:
    return ResultMsg(
        job=rec.id, task=task, first=first, count=count, generation=gen, node=node, **kw
    )


# What a simulated node does with one range: ("ok", bytes), ("fail", reason),
# ("die",) (takes it, never reports nor acks: the node died), ("skip",) (hands it back).
Policy = Callable[[int, int, int], tuple[Any, ...]]


def good(task: int, first: int, count: int) -> tuple[Any, ...]:
    return ("ok", events_text(first, count))


@dataclass
class SimWorker:
    """A node's worker loop, minus running anything: ``policy`` says what each
    range gives. Outputs of ranges in ``big`` go through the object store."""

    cfg: SiteConfig
    rec: JobRecord
    node: str = "wn1"
    policy: Policy = good
    big: set[int] = field(default_factory=set)
    pace: float = 0.0  # seconds between results
    copies: int = 1  # results published per range (>1: duplicates)
    ran: list[tuple[int, int]] = field(default_factory=list)  # (task, generation)
    nc: Any = None
    when: dict[tuple[int, int], float] = field(default_factory=dict)  # range -> taken at
    holds: list[asyncio.Task[None]] = field(default_factory=list)
    held_until: float = 0.0  # the last heartbeat of a held range

    async def hold(self, task: int, seconds: float) -> None:
        """Heartbeat ``task`` every 0.2 s for ``seconds``, then die silently."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            beat = BeatMsg(job=self.rec.id, task=task, node=self.node)
            await self.nc.publish(beat_subject(self.rec.id), encode(beat))
            self.held_until = time.monotonic()
            await asyncio.sleep(0.2)

    async def run(self, until: asyncio.Event) -> None:
        nc = self.nc = await connect(self.cfg, name=self.node)
        try:
            js = nc.jetstream(timeout=self.cfg.request_timeout)
            sub: Any = None
            while not until.is_set():
                try:
                    if sub is None:
                        sub = await js.pull_subscribe_bind(
                            WORKERS, stream=ranges_stream(self.rec.id)
                        )
                    msgs = await sub.fetch(16, timeout=0.3)
                except TimeoutError:
                    continue
                except Exception:  # the broker is away: a node waits for it
                    await asyncio.sleep(0.2)
                    continue
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await self.one(js, msg)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

    async def one(self, js: Any, msg: Any) -> None:
        r = decode_range(msg.data, self.rec)
        self.ran.append((r.task, r.generation))
        self.when[(r.task, r.generation)] = time.monotonic()
        what = self.policy(r.task, r.first, r.count)
        if what[0] == "die":
            return
        if what[0] == "hold":  # acked at once (a stale ack), heartbeated, never reported
            await msg.ack()
            self.holds.append(asyncio.create_task(self.hold(r.task, what[1])))
            return
        if what[0] == "skip":
            await msg.nak()
            return
        beat = BeatMsg(job=self.rec.id, task=r.task, node=self.node)
        await self.nc.publish(beat_subject(self.rec.id), encode(beat))
        seq = msg.metadata.sequence.stream
        for copy in range(self.copies):
            node = self.node if copy == 0 else f"{self.node}-{copy}"
            kw: dict[str, Any] = {"ok": what[0] == "ok"}
            if what[0] == "ok":
                data: bytes = what[1]
                kw.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
                if r.task in self.big:
                    name = f"{r.task}.{node}.{seq}"
                    obs = await js.object_store(output_bucket(self.rec.id))
                    await obs.put(name, data)
                    kw["object"] = name
                else:
                    kw["inline"] = encode_inline(data)
            else:
                kw["reason"] = what[1]
            res = result_of(self.rec, r.task, r.first, r.count, r.generation, node, **kw)
            await js.publish(
                result_subject(self.rec.id),
                encode(res),
                headers={"Nats-Msg-Id": f"{self.rec.id}.{r.task}.{node}.{seq}"},
            )
        await msg.ack()
        if self.pace:
            await asyncio.sleep(self.pace)


async def gather_with(
    cfg: SiteConfig,
    rec: JobRecord,
    out: Path,
    *workers: SimWorker,
    timeout: float = 25,
    started: Callable[[], Awaitable[None]] | None = None,
) -> GatherReport:
    """Run the gather in this process until the job is complete, beside
    ``workers``; ``started`` runs once the gather reported its first status."""
    until = asyncio.Event()
    first = asyncio.Event()
    tasks = [asyncio.create_task(w.run(until)) for w in workers]

    async def on_start() -> None:
        await first.wait()
        if started is not None:
            await started()

    tasks.append(asyncio.create_task(on_start()))
    try:
        return await asyncio.wait_for(
            gather_job(cfg, rec.id, out, progress=lambda st: first.set()), timeout
        )
    finally:
        until.set()
        first.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def check_output(rec: JobRecord, out: Path, missing: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """events.out holds every range but ``missing`` once, in event order; the
    journal commits each range at most once."""
    per = rec.events_per_task
    want = b"".join(
        events_text(rec.first_event + t * per, min(per, rec.events - t * per))
        for t in range(rec.tasks)
        if t not in missing
    )
    got = (out / "events.out").read_bytes()
    assert got == want, f"events.out: {len(got)} bytes, want {len(want)}"
    lines = (out / "journal.jsonl").read_text().splitlines()[1:]
    tasks = [json.loads(line)["task"] for line in lines]
    assert len(tasks) == len(set(tasks)), "a range committed twice in the journal"
    _, committed = replay_journal((out / "journal.jsonl").read_text())
    assert set(committed) == set(range(rec.tasks)) - missing


async def streams_gone(cfg: SiteConfig, job: str) -> bool:
    from nats.js.errors import NotFoundError

    async with jetstream(cfg) as js:
        try:
            await js.stream_info(ranges_stream(job))
        except NotFoundError:
            return await store.load_job(js, job) is not None
        return False


async def kv_status(cfg: SiteConfig, job: str) -> dict[str, Any]:
    async with jetstream(cfg) as js:
        raw = await store.get_status(js, job)
        assert raw is not None
        result: dict[str, Any] = json.loads(raw)
        return result


def test_a_complete_job_gathers_every_event_once_in_order_and_removes_its_streams(
    broker: Broker, tmp_path: Path
) -> None:
    _, cfg = broker
    rec = record(events=195, per_task=10)  # the last range has 5 events
    out = tmp_path / "out"

    async def run() -> GatherReport:
        await submit(cfg, rec)
        workers = [
            SimWorker(cfg, rec, "wn1", big=set(range(0, rec.tasks, 3))),
            SimWorker(cfg, rec, "wn2", big=set(range(0, rec.tasks, 3))),
        ]
        return await gather_with(cfg, rec, out, *workers)

    report = asyncio.run(run())
    assert report.complete and not report.abandoned and report.stopped is None
    assert report.events_committed == report.events_planned == 195
    assert sum(report.nodes.values()) == rec.tasks and not report.refused
    check_output(rec, out)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["complete"] and on_disk["events_committed"] == 195
    st = asyncio.run(kv_status(cfg, rec.id))
    assert st["complete"] and st["events_committed"] == 195 and st["gather"]["pid"] == os.getpid()
    assert asyncio.run(streams_gone(cfg, rec.id))  # the record stays, the streams go
    # gathered again (a gather killed after its last commit): the same output
    before = (out / "events.out").read_bytes()
    again = asyncio.run(gather_job(cfg, rec.id, out))
    assert again.complete and again.events_committed == 195
    assert (out / "events.out").read_bytes() == before


def test_duplicate_results_of_a_range_are_committed_once(broker: Broker, tmp_path: Path) -> None:
    _, cfg = broker
    rec = record(events=100, per_task=10)
    out = tmp_path / "out"

    async def run() -> GatherReport:
        await submit(cfg, rec)
        return await gather_with(cfg, rec, out, SimWorker(cfg, rec, "wn1", copies=3, big={4}))

    report = asyncio.run(run())
    assert report.complete
    assert report.duplicates >= 2 * rec.tasks - 2  # the last ones may arrive after the end
    check_output(rec, out)


def test_a_second_gather_on_the_same_directory_is_refused_and_a_stopped_one_is_not_complete(
    broker: Broker, tmp_path: Path
) -> None:
    _, cfg = broker
    rec = record(events=40, per_task=10)
    out = tmp_path / "out"

    async def run() -> tuple[str, GatherReport]:
        await submit(cfg, rec)
        stop = asyncio.Event()
        started = asyncio.Event()
        first = asyncio.create_task(
            gather_job(cfg, rec.id, out, stop=stop, progress=lambda st: started.set())
        )
        try:
            await asyncio.wait_for(started.wait(), 20)
            with pytest.raises(GatherBusy) as exc:
                await gather_job(cfg, rec.id, out)
        finally:
            stop.set()
            report = await asyncio.wait_for(first, 20)
        return str(exc.value), report

    text, report = asyncio.run(run())
    assert "in use by another gather" in text and "\n" not in text and str(os.getpid()) in text
    assert not report.complete and report.stopped and report.events_committed == 0
    assert not (out / "events.out").exists()
    st = asyncio.run(kv_status(cfg, rec.id))
    assert not st["complete"] and st["ranges"]["planned"] == 4


def start_driver(cfg: SiteConfig, job: str, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """The gather as its own process; its stdout and stderr go to ``log``.{out,err}."""
    assert cfg.token_file is not None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(f"{log}.out", "wb") as so, open(f"{log}.err", "wb") as se:
        return subprocess.Popen(
            [sys.executable, DRIVER, cfg.servers[0], str(cfg.token_file), job, str(out)],
            stdin=subprocess.DEVNULL,
            stdout=so,
            stderr=se,
            env=env,
        )


def test_a_gather_killed_at_random_instants_and_restarted_commits_every_event_once(
    broker: Broker, tmp_path: Path
) -> None:
    _, cfg = broker
    rec = record(events=3000, per_task=5, ack_wait=2.0)  # 600 ranges
    out = tmp_path / "out"
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    procs: list[subprocess.Popen[bytes]] = []
    committed: list[int] = []  # ranges in the journal after each kill

    async def run() -> dict[str, Any]:
        await submit(cfg, rec)
        until = asyncio.Event()
        workers = [
            SimWorker(cfg, rec, "wn1", pace=0.025, big={7, 300}),
            SimWorker(cfg, rec, "wn2", pace=0.025, copies=2),
        ]
        tasks = [asyncio.create_task(w.run(until)) for w in workers]
        try:
            journal = out / "journal.jsonl"

            def in_journal() -> int:
                return len(journal.read_bytes().splitlines()) - 1 if journal.exists() else 0

            for n in range(4):
                p = start_driver(cfg, rec.id, out, tmp_path / f"gather{n}")
                procs.append(p)
                # Killed at a random instant after this driver committed something
                # (waiting for the commit, not a time: on a loaded machine Python's
                # start alone can outlast any fixed delay).
                before = in_journal()
                deadline = time.monotonic() + 60
                while in_journal() <= before and p.poll() is None:
                    assert time.monotonic() < deadline, f"gather {n} idle (seed {seed})"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                await asyncio.to_thread(p.wait, 10)
                committed.append(in_journal())
            p = start_driver(cfg, rec.id, out, tmp_path / "last")
            procs.append(p)
            await asyncio.to_thread(p.wait, 120)
            err = (tmp_path / "last.err").read_text()[-2000:]
            assert p.returncode == 0, err
            result: dict[str, Any] = json.loads((tmp_path / "last.out").read_text())
            return result
        finally:
            until.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        report = asyncio.run(run())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert report["complete"] and not report["abandoned"], f"seed {seed}: {report}"
    assert report["events_committed"] == 3000
    # killed mid-job (not only before the first commit or after the last)
    assert any(0 < c < rec.tasks for c in committed), f"seed {seed}: {committed}"
    check_output(rec, out)


def test_a_broker_killed_mid_job_and_restarted_loses_and_repeats_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    server, cfg = broker
    rec = record(events=400, per_task=5, ack_wait=2.0)  # 80 ranges
    out = tmp_path / "out"

    async def run() -> GatherReport:
        await submit(cfg, rec)
        progress: list[int] = []

        def seen(st: dict[str, Any]) -> None:
            progress.append(st["events_committed"])

        until = asyncio.Event()
        worker = SimWorker(cfg, rec, "wn1", pace=0.02, big={11, 40})
        wtask = asyncio.create_task(worker.run(until))
        gtask = asyncio.create_task(gather_job(cfg, rec.id, out, progress=seen))
        try:
            while not progress or progress[-1] < 100:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
            return await asyncio.wait_for(gtask, 25)
        finally:
            until.set()
            gtask.cancel()
            await asyncio.gather(wtask, gtask, return_exceptions=True)

    report = asyncio.run(run())
    assert report.complete and not report.abandoned
    check_output(rec, out)


def test_bad_results_are_refused_counted_and_never_committed(
    broker: Broker, tmp_path: Path
) -> None:
    _, cfg = broker
    rec = record(events=100, per_task=10, ack_wait=2.0)
    out = tmp_path / "out"
    evil = b"evil\n" * 3

    async def run() -> GatherReport:
        await submit(cfg, rec)
        nc = await connect(cfg, reconnect=False)
        try:
            js = nc.jetstream(timeout=cfg.request_timeout)
            obs = await js.object_store(output_bucket(rec.id))
            await obs.put("2.evil.1", evil)
            sha = hashlib.sha256(evil).hexdigest()
            good1 = events_text(1010, 10)
            bad = [
                b"not json at all",
                encode(result_of(record("OTHER"), 1, 1010, 10, 0, "evil", ok=False)),
                encode(result_of(rec, 10, 1100, 10, 0, "evil", ok=False)),  # beyond the plan
                encode(result_of(rec, 1, 1010, 9, 0, "evil", ok=False)),  # not the plan's range
                # claims range 1's real hash and size, carries other bytes
                encode(
                    result_of(
                        rec,
                        1,
                        1010,
                        10,
                        0,
                        "evil",
                        ok=True,
                        size=len(good1),
                        sha256=hashlib.sha256(good1).hexdigest(),
                        inline=encode_inline(b"x" * len(good1)),
                    )
                ),
                encode(
                    result_of(
                        rec,
                        2,
                        1020,
                        10,
                        0,
                        "evil",
                        ok=True,
                        size=len(evil) + 1,
                        sha256=sha,
                        inline=encode_inline(evil),
                    )
                ),
                encode(
                    result_of(
                        rec,
                        3,
                        1030,
                        10,
                        0,
                        "evil",
                        ok=True,
                        size=len(evil),
                        sha256=sha,
                        object="no.such.object",
                    )
                ),
                encode(
                    result_of(
                        rec,
                        5,
                        1050,
                        10,
                        0,
                        "evil",
                        ok=True,
                        size=len(evil),
                        sha256="0" * 64,
                        object="2.evil.1",
                    )
                ),
            ]
            for i, data in enumerate(bad):
                await js.publish(result_subject(rec.id), data, headers={"Nats-Msg-Id": f"bad{i}"})
        finally:
            await nc.close()

        async def bad_beat() -> None:
            nc = await connect(cfg, reconnect=False)
            try:
                await nc.publish(beat_subject(rec.id), b"{not a heartbeat")
                await nc.flush()
            finally:
                await nc.close()

        worker = SimWorker(cfg, rec, "wn1", pace=0.05)
        return await gather_with(cfg, rec, out, worker, started=bad_beat)

    report = asyncio.run(run())
    assert report.complete and not report.abandoned
    assert report.refused == {
        "malformed heartbeat": 1,
        "malformed": 1,
        "other job": 1,
        "not in the plan": 2,
        "sha256 mismatch": 2,
        "size mismatch": 1,
        "unknown object": 1,
    }
    check_output(rec, out)
    assert b"evil" not in (out / "events.out").read_bytes()
    # an output that does not match is a failed attempt: its range was run again
    assert report.retries >= 3


def test_a_failing_range_is_retried_then_abandoned_at_max_attempts(
    broker: Broker, tmp_path: Path
) -> None:
    _, cfg = broker
    rec = record(events=100, per_task=10, max_attempts=3)
    out = tmp_path / "out"

    def policy(task: int, first: int, count: int) -> tuple[Any, ...]:
        return ("fail", "exit status 3") if task == 6 else good(task, first, count)

    worker = SimWorker(cfg, rec, "wn1", policy=policy)

    async def run() -> GatherReport:
        await submit(cfg, rec)
        return await gather_with(cfg, rec, out, worker)

    report = asyncio.run(run())
    assert report.complete and report.retries == 2
    [ab] = report.abandoned
    assert ab["task"] == 6 and ab["first"] == 1060
    assert "attempt 3 (generation 2)" in ab["reason"] and "exit status 3" in ab["reason"]
    assert sorted(g for t, g in worker.ran if t == 6) == [0, 1, 2]
    check_output(rec, out, missing={6})
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert [(x["action"], x["generation"]) for x in lines] == [
        ("retry", 1),
        ("retry", 2),
        ("abandon", 2),
    ]


def test_the_reconciler_republishes_a_range_the_broker_lost(broker: Broker, tmp_path: Path) -> None:
    _, cfg = broker
    rec = record(events=60, per_task=10, ack_wait=1.0)
    out = tmp_path / "out"
    worker = SimWorker(cfg, rec, "wn1")

    async def run() -> GatherReport:
        await submit(cfg, rec)
        nc = await connect(cfg, reconnect=False)
        try:  # the broker loses range 4 (a crash without sync, a lost volume)
            js = nc.jetstream(timeout=cfg.request_timeout)
            await js.purge_stream(ranges_stream(rec.id), subject=range_subject(rec.id, 4))
        finally:
            await nc.close()
        return await gather_with(cfg, rec, out, worker)

    report = asyncio.run(run())
    assert report.complete and not report.abandoned and report.republished == 1
    assert (4, 1) in worker.ran and (4, 0) not in worker.ran
    check_output(rec, out)
    [line] = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert line == {"action": "republish", "task": 4, "generation": 1}


def test_a_range_that_kills_every_holder_is_abandoned_on_the_max_deliveries_advisory(
    broker: Broker, tmp_path: Path
) -> None:
    _, cfg = broker
    rec = record(events=50, per_task=10, ack_wait=1.0, max_attempts=1)
    deliveries = store.max_deliver(rec.max_attempts)
    out = tmp_path / "out"

    def policy(task: int, first: int, count: int) -> tuple[Any, ...]:
        return ("die",) if task == 2 else good(task, first, count)

    worker = SimWorker(cfg, rec, "wn1", policy=policy)

    async def run() -> GatherReport:
        await submit(cfg, rec)
        return await gather_with(cfg, rec, out, worker)

    report = asyncio.run(run())
    assert report.complete and report.republished == 0
    [ab] = report.abandoned
    assert ab["task"] == 2 and f"delivered {deliveries} times" in ab["reason"]
    assert [t for t, _ in worker.ran].count(2) == deliveries
    check_output(rec, out, missing={2})


def test_a_cancelled_gather_stops_even_when_a_broker_call_swallows_the_cancellation(
    broker: Broker, tmp_path: Path
) -> None:
    """Python 3.11's wait_for (inside nats-py's requests) loses a cancellation
    that lands as a request completes: the gather then ran on forever."""
    _, cfg = broker

    async def run() -> list[str]:
        outcomes = []
        for i in range(8):
            # a job each: a gather that got as far as its status would make the
            # next one on the same job refuse to run beside it
            rec = record(f"J{i}", events=40, per_task=10)
            await submit(cfg, rec)
            out = tmp_path / f"out{i}"
            task = asyncio.create_task(gather_job(cfg, rec.id, out))
            while not (out / "journal.jsonl").exists():
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.002 * i)  # cancel at a different step each time
            task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
                outcomes.append("returned")
            except asyncio.CancelledError:
                outcomes.append("cancelled")
            except TimeoutError:
                outcomes.append("still running")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return outcomes

    assert asyncio.run(run()) == ["cancelled"] * 8


def test_a_range_whose_second_holder_heartbeats_is_not_republished_until_the_beats_stop(
    broker: Broker, tmp_path: Path
) -> None:
    """The stale-ack trap: range 1's message is gone from the stream (acked by
    a stale holder) while another node runs it and heartbeats; it is left
    alone while the beats come, and republished once they stop (that node died)."""
    _, cfg = broker
    rec = record(events=30, per_task=10, ack_wait=1.0)
    out = tmp_path / "out"

    def policy(task: int, first: int, count: int) -> tuple[Any, ...]:
        return ("hold", 4.0) if task == 1 else good(task, first, count)

    worker = SimWorker(cfg, rec, "wn1")
    worker.policy = lambda t, f, c: policy(t, f, c) if (t, 1) not in worker.when else good(t, f, c)

    async def run() -> GatherReport:
        await submit(cfg, rec)
        return await gather_with(cfg, rec, out, worker)

    report = asyncio.run(run())
    assert report.complete and not report.abandoned and report.republished == 1
    # 4 s of beats, ack_wait 1 s: without them it would have gone back at about 2 s
    assert worker.when[(1, 1)] > worker.held_until
    check_output(rec, out)


def test_the_reconcilers_view_of_the_stream_lists_every_range_beyond_the_servers_page(
    broker: Broker,
) -> None:
    """The server lists at most 100 000 subjects per stream-info answer: a job
    with more ranges in the stream looked as if the rest were lost, and the
    reconciler republished them all."""
    _, cfg = broker
    ranges = 100_050

    async def run() -> dict[str, int]:
        from nats.js.api import StorageType, StreamConfig

        nc = await connect(cfg, reconnect=False)
        try:
            js = nc.jetstream(timeout=cfg.request_timeout)
            await js.add_stream(  # in memory: this is about listing, not storing
                StreamConfig(
                    name=ranges_stream("BIG"),
                    subjects=[range_subject("BIG", "*")],
                    storage=StorageType.MEMORY,
                )
            )
            for t in range(ranges):
                await nc.publish(range_subject("BIG", t), b"r")
            await nc.flush()

            async def stored() -> bool:
                info = await js.stream_info(ranges_stream("BIG"))
                return bool(info.state.messages == ranges)

            await eventually_async("every range stored", stored, 20, interval=0.1)
            return await store.stream_subjects(js, "BIG")
        finally:
            await nc.close()

    subjects = asyncio.run(run())
    assert len(subjects) == ranges and range_subject("BIG", ranges - 1) in subjects
