"""The site worker (sitejob/worker.py) against a real nats-server on 127.0.0.1.

Each test creates a real site job (store.create_job + store.publish_ranges),
runs one or two :class:`SiteWorker` components in its event loop (not the
whole daemon; the last tests do that) and checks what the broker holds: the
result messages read from the results stream by the test itself, the
ranges consumer's counts, and the outputs' SHA-256 against what the command
must have written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runner.cores import CoreLedger
from runner.lease import Lease
from runner.service import JobService
from sitejob.config import SiteConfig, connect
from sitejob.protocol import (
    GATHER,
    INLINE_MAX,
    WORKERS,
    JobRecord,
    RangeMsg,
    ResultMsg,
    decode_result,
    encode,
    inline_bytes,
    output_bucket,
    range_subject,
    ranges_stream,
    results_stream,
)
from sitejob.store import create_job, publish_ranges
from sitejob.worker import SiteWorker
from swarm.config import render_config
from swarm.status import NodeStatus, render
from swarm_testing.waiting import eventually, eventually_async
from tests.harness import NodeProcess
from tests.sitejob.broker_client import Broker, submit

SYNTH = Path(__file__).resolve().parent.parent / "runner" / "synth_events.py"
TIMED = Path(__file__).resolve().parent / "timed_events.py"

pytestmark = pytest.mark.nats
T = TypeVar("T")


def synth(*extra: str) -> list[str]:
    return [sys.executable, str(SYNTH), "{first}", "{count}", "{output}", *extra]


def spec_text(name: str, command: list[str], work: float = 0.001) -> str:
    return (
        f"name = {json.dumps(name)}\ncommand = {json.dumps(command)}\n"
        f"cpu_work_per_event = {work}\nmax_events = 1000000\nevents_per_task = 10\n"
    )


def record(
    job: str,
    command: list[str],
    events: int,
    per_range: int,
    *,
    ack_wait: float = 2.0,
    work: float = 0.001,
) -> JobRecord:
    return JobRecord(
        id=job,
        spec=spec_text(f"site-{job}", command, work),
        first_event=100,
        events=events,
        events_per_task=per_range,
        submitted=time.time(),
        ack_wait=ack_wait,
        max_attempts=3,
    )


def lease(cores: int = 2, time_left: float = 600.0) -> Callable[[float], Lease]:
    def at(now: float) -> Lease:
        return Lease(
            cores=cores, power_per_core=10.0, time_left=time_left, memory=None, now=now, sources={}
        )

    return at


class ShrinkingLease:
    """A long lease until :meth:`shrink`, then one that ends ``after`` seconds
    later (an MJF shutdowntime moved earlier while a range runs)."""

    def __init__(self, cores: int = 1) -> None:
        self.cores = cores
        self.end: float | None = None

    def shrink(self, after: float) -> None:
        self.end = time.monotonic() + after

    def __call__(self, now: float) -> Lease:
        left = 600.0 if self.end is None else max(0.0, self.end - time.monotonic())
        return Lease(
            cores=self.cores, power_per_core=10.0, time_left=left, memory=None, now=now, sources={}
        )


def worker(
    nc: Any,
    broker: Broker,
    data: Path,
    name: str,
    lease_at: Callable[[float], Lease],
    cores: CoreLedger | None = None,
    **kw: Any,
) -> SiteWorker:
    cfg = dataclasses.replace(broker[1], node_name=name)  # broker: (server, site config)
    return SiteWorker(
        nc,
        nc.jetstream(timeout=cfg.request_timeout),
        cfg,
        data_dir=data,
        cores=cores or CoreLedger(),
        lease_at=lease_at,
        grace=0.5,
        poll=0.2,
        jobs_every=0.2,
        lease_every=0.1,
        **kw,
    )


@contextlib.asynccontextmanager
async def running(*workers: SiteWorker) -> AsyncIterator[None]:
    """The workers' loops run inside the block and are stopped after it, always."""
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield
    finally:
        for w in workers:
            await w.stop(0.5)
        for t in tasks:
            await asyncio.wait_for(t, 30)


_clients: list[Any] = []


async def client(site: SiteConfig) -> Any:
    """A connected client that :func:`run` closes whatever happens."""
    nc = await connect(site)
    _clients.append(nc)
    return nc


def run(main: Callable[[], Awaitable[T]]) -> T:
    """``run(main)``, closing every client it opened, also when it fails."""

    async def wrapped() -> T:
        try:
            return await main()
        finally:
            while _clients:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_clients.pop().close(), 10)

    return asyncio.run(wrapped())


def events(first: int, count: int) -> bytes:
    return "".join(f"event {n}\n" for n in range(first, first + count)).encode()


class Results:
    """The job's results stream, read through its ``gather`` consumer by the test."""

    def __init__(self, js: Any, rec: JobRecord) -> None:
        self.js = js
        self.rec = rec
        self.got: list[ResultMsg] = []
        self.sub: Any = None

    async def wait(self, n: int, timeout: float = 20.0) -> list[ResultMsg]:
        import nats.errors

        if self.sub is None:
            self.sub = await self.js.pull_subscribe_bind(
                durable=GATHER, stream=results_stream(self.rec.id)
            )
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            assert time.monotonic() < deadline, f"{len(self.got)} results of {n}: {self.got}"
            try:
                msgs = await self.sub.fetch(10, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):  # nats-py raises either
                continue
            for m in msgs:
                self.got.append(decode_result(m.data, self.rec))
                await m.ack_sync()
        return self.got

    async def output(self, res: ResultMsg) -> bytes:
        if res.inline is not None:
            return inline_bytes(res)
        assert res.object is not None
        store = await self.js.object_store(output_bucket(self.rec.id))
        obj = await store.get(res.object)
        assert obj.data is not None
        return bytes(obj.data)


async def consumer(js: Any, job: str) -> Any:
    return await js.consumer_info(ranges_stream(job), WORKERS)


def check_output(res: ResultMsg, data: bytes) -> None:
    assert res.ok, res.reason
    assert data == events(res.first, res.count)
    assert (res.size, res.sha256) == (len(data), hashlib.sha256(data).hexdigest())


# --- the tests -------------------------------------------------------------------------


def test_ranges_are_run_and_reported_inline_and_through_the_object_store(
    broker: Broker, tmp_path: Path
) -> None:
    _server, site = broker

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        small = record("small", synth(), events=7, per_range=3)  # ranges of 3, 3 and 1
        big = record("big", synth(), events=9000, per_range=9000)  # ~100 KB: object store
        await submit(js, small)
        await submit(js, big)
        w = worker(nc, broker, tmp_path, "wn1", lease(cores=2))
        async with running(w):
            got = await Results(js, small).wait(3)
            big_results = Results(js, big)
            (big_res,) = await big_results.wait(1)
            await eventually_async("the worker to count its reports", _reported(w, 4), 10)
        assert sorted((r.task, r.first, r.count) for r in got) == [
            (0, 100, 3),
            (1, 103, 3),
            (2, 106, 1),
        ]
        for r in got:
            assert (r.node, r.delivery, r.inline is not None) == ("wn1", 1, True)
            check_output(r, await Results(js, small).output(r))
        assert big_res.object == f"0.wn1.{1}" and big_res.size > INLINE_MAX
        check_output(big_res, await big_results.output(big_res))
        for job in ("small", "big"):
            info = await consumer(js, job)
            assert (info.num_pending, info.num_ack_pending) == (0, 0)
        assert w.counters.run == 4 and w.counters.failed == 0 and not w.running
        assert not any((tmp_path / "site").rglob("journal.jsonl"))  # range dirs removed

    run(main)


def _reported(w: SiteWorker, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        return w.counters.reported >= n

    return check


def test_a_range_running_longer_than_ack_wait_is_not_redelivered(
    broker: Broker, tmp_path: Path
) -> None:
    _server, site = broker
    runs = tmp_path / "runs.log"

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        rec = record("slow", synth("--sleep", "5", "--runs", str(runs)), 1, 1, ack_wait=2.0)
        await submit(js, rec)
        a = worker(nc, broker, tmp_path / "a", "wn-a", lease())
        b = worker(nc, broker, tmp_path / "b", "wn-b", lease())
        async with running(a, b):
            (res,) = await Results(js, rec).wait(1, timeout=25)
        assert res.ok and res.delivery == 1
        info = await consumer(js, "slow")
        assert info.num_redelivered == 0 and info.delivered.consumer_seq == 1
        assert len(runs.read_text().splitlines()) == 1  # nobody else started it

    run(main)


def test_a_failing_command_is_reported_not_ok_with_the_reason(
    broker: Broker, tmp_path: Path
) -> None:
    _server, site = broker

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        rec = record("fails", ["/bin/sh", "-c", "exit 3", "{first}{count}{output}"], 2, 2)
        await submit(js, rec)
        w = worker(nc, broker, tmp_path, "wn1", lease())
        async with running(w):
            (res,) = await Results(js, rec).wait(1)
        assert not res.ok and res.reason is not None and "exit status 3" in res.reason
        assert (res.node, res.task, res.size, res.inline, res.object) == ("wn1", 0, 0, None, None)
        info = await consumer(js, "fails")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)  # acked: the ledger decides
        assert w.counters.failed == 1 and w.counters.reported == 0

    run(main)


def test_a_lease_too_short_for_a_range_is_not_pulled(broker: Broker, tmp_path: Path) -> None:
    _server, site = broker

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        # 100 HS06.s per event at 10 HS06 per core: 20 s per range x 1.2 > 10 s - reserve.
        rec = record("long", synth(), 4, 2, work=100.0)
        await submit(js, rec)
        w = worker(nc, broker, tmp_path, "wn1", lease(time_left=10.0))
        async with running(w):

            async def refused() -> bool:
                return "no range fits the lease" in (w.not_pulling or "")

            await eventually_async("the worker to see the lease is too short", refused, 10)
            await asyncio.sleep(0.5)  # more rounds of the loop: still nothing pulled
            info = await consumer(js, "long")
        assert info.delivered.consumer_seq == 0 and info.num_pending == 2
        assert w.counters.run == 0

    run(main)


def test_a_lease_ending_mid_range_hands_the_range_back_to_another_worker(
    broker: Broker, tmp_path: Path
) -> None:
    _server, site = broker
    runs = tmp_path / "runs.log"
    once = tmp_path / "once"
    once.mkdir()

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        # The first run of the range hangs; the worker's lease then ends 2 s later.
        # AckWait 20 s: a redelivery before it is the hand-back's, not a timeout's.
        command = synth("--runs", str(runs), "--hang-once", str(once), "--crash-first", "100")
        rec = record("handback", command, 2, 2, ack_wait=20.0)
        await submit(js, rec)
        a_lease = ShrinkingLease()
        a = worker(nc, broker, tmp_path / "a", "wn-a", a_lease)
        b = worker(nc, broker, tmp_path / "b", "wn-b", lease())
        results = Results(js, rec)
        async with running(a):

            async def a_runs() -> bool:
                return bool(a.running)

            await eventually_async("worker a to take the range", a_runs, 10)
            a_lease.shrink(2.0)
            async with running(b):
                (res,) = await results.wait(1, timeout=15)
                handed_back = a.counters.handed_back
        assert res.ok and res.node == "wn-b" and res.delivery == 2
        check_output(res, await results.output(res))
        assert handed_back == 1 and a.counters.reported == 0 and a.counters.run == 1
        assert len(runs.read_text().splitlines()) == 2  # a's run (cut) and b's

    run(main)


def test_a_bad_range_message_is_refused_counted_not_run_and_terminated(
    broker: Broker, tmp_path: Path
) -> None:
    _server, site = broker
    runs = tmp_path / "runs.log"

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        rec = record("bad", synth("--runs", str(runs)), 3, 3)
        await create_job(js, rec)
        beyond = RangeMsg(job="bad", task=7, first=121, count=3, generation=0)
        wrong = RangeMsg(job="bad", task=0, first=100, count=50, generation=0)
        for i, data in enumerate([b"not json", encode(beyond), encode(wrong)]):
            await js.publish(range_subject("bad", 0), data, headers={"Nats-Msg-Id": f"x{i}"})
        await publish_ranges(js, rec, [(0, 0)])  # and the one good range, last
        w = worker(nc, broker, tmp_path, "wn1", lease())
        async with running(w):
            (res,) = await Results(js, rec).wait(1)
            info = await consumer(js, "bad")
        assert res.ok and (res.task, res.first, res.count) == (0, 100, 3)
        assert sum(w.counters.refused.values()) == 3, w.counters.refused
        reasons = " | ".join(w.counters.refused)
        assert "malformed range message" in reasons
        assert "beyond the job's 1 ranges" in reasons
        assert "the job's plan says 100+3" in reasons
        assert len(runs.read_text().splitlines()) == 1  # only the good range ran
        assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)

    run(main)


def test_node_jobs_and_site_ranges_never_hold_more_cores_than_the_lease(
    broker: Broker, tmp_path: Path
) -> None:
    """Every task, node job's or site range's, logs its start and end; at no
    instant do more than the lease's two run at once."""
    _server, site = broker
    log = tmp_path / "intervals.log"
    cores = CoreLedger()
    service = JobService(
        tmp_path / "queue", tmp_path / "work", lease(cores=2), recheck=0.5, cores=cores
    )
    command = [sys.executable, str(TIMED), "{first}", "{count}", "{output}", str(log), "0.4"]

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        rec = record("share", command, 8, 1)
        await submit(js, rec)
        w = worker(nc, broker, tmp_path / "data", "wn1", lease(cores=2), cores=cores)
        async with running(w):

            async def two_ranges() -> bool:
                return len(w.running) == 2

            await eventually_async("two ranges running", two_ranges, 10)
            node_spec = spec_text("node-job", command).replace("1000000", "4")
            node_spec = node_spec.replace("events_per_task = 10", "events_per_task = 1")
            job = await asyncio.to_thread(service.submit, node_spec)

            def done() -> bool:
                return bool(service.job(job)["state"] == "done")

            await asyncio.to_thread(eventually, "the node job to be done", done, 30)
            await Results(js, rec).wait(8, timeout=30)
        intervals = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
        assert len(intervals) == 8 + 4  # every range and every node task ran once
        points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
        at_once = peak = 0
        for _, step in points:
            at_once += step
            peak = max(peak, at_once)
        assert peak <= 2, intervals
        assert cores.snapshot().peak <= 2

    service.start()
    try:
        run(main)
    finally:
        service.close()


def test_a_broker_restart_is_survived(broker: Broker, tmp_path: Path) -> None:
    server, site = broker

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        first = record("before", synth(), 2, 1)
        await submit(js, first)
        w_nc = await client(site)
        w = worker(w_nc, broker, tmp_path, "wn1", lease())
        async with running(w):
            await Results(js, first).wait(2)
            await asyncio.to_thread(server.kill)

            async def noticed() -> bool:
                return not w_nc.is_connected

            await eventually_async("the worker's client to notice", noticed, 10)
            await asyncio.sleep(1.0)  # pulls fail meanwhile: the worker keeps going
            await asyncio.to_thread(server.start)

            async def back() -> bool:
                return bool(w_nc.is_connected and nc.is_connected)

            await eventually_async("both clients to reconnect", back, 20)
            after = record("after", synth(), 2, 1)

            async def submitted() -> bool:
                with contextlib.suppress(Exception):  # JetStream may still be recovering
                    await submit(js, after)
                    return True
                return False

            await eventually_async("the job to be submitted after the restart", submitted, 20)
            got = await Results(js, after).wait(2, timeout=20)
        assert all(r.ok for r in got)
        assert w.counters.reported == 4
        await nc.close()

    run(main)


# --- the whole daemon ------------------------------------------------------------------


def _node_config(
    tmp: Path, site: dict[str, object], name: str = "node", runner: str = ""
) -> tuple[Path, Path]:
    data = tmp / name
    settings: dict[str, object] = {
        "data_dir": data,
        "api": "127.0.0.1:0",
        "listen": "127.0.0.1:0",
        "peer": "127.0.0.1:0",
        "dht": False,
    }
    cfg = tmp / f"{name}.toml"
    text = render_config(settings, {})
    text += f"\n[runner]\ncores = 2\npower_per_core = 10.0\ntime_left = 600\n{runner}"
    text += "\n[site]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in site.items())
    cfg.write_text(text)
    return cfg, data


def _status(data: Path) -> dict[str, Any]:
    api = json.loads((data / "node.json").read_text())["api"]
    with urllib.request.urlopen(f"{api}v1/status", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def test_the_node_daemon_runs_site_ranges(broker: Broker, open_dir: Path) -> None:
    """``swarm node --config`` with a [site] table pulls, runs and reports ranges."""
    server, site = broker
    assert site.token_file is not None
    cfg, data = _node_config(
        open_dir,
        {"nats": server.url, "token_file": str(site.token_file), "node_name": "d1"},
    )
    # /bin/sh: the job user (a root node runs tasks as nobody) can execute it.
    command = ["/bin/sh", "-c", 'seq -f "event %g" "$1" "$(($1+$2-1))" > "$3"', "sh"]
    command += ["{first}", "{count}", "{output}"]

    async def submit_and_read() -> list[ResultMsg]:
        nc = await client(site)
        js = nc.jetstream()
        rec = record("daemon", command, 6, 2)
        await submit(js, rec)
        got = await Results(js, rec).wait(3, timeout=30)
        return got

    with NodeProcess(cfg, data, None, open_dir / "node.log") as node:
        got = run(submit_and_read)
        site = eventually(
            "the node's status to count the reports",
            lambda: (s := _status(data)["site"]) and s["ranges_reported"] == 3 and s,
            20,
        )
        assert node.proc.poll() is None
        shown = "\n".join(render(NodeStatus.from_json(_status(data))))  # `swarm status`
    assert "site: node d1, broker nats://127.0.0.1:" in shown and "3 reported" in shown
    assert sorted(r.task for r in got) == [0, 1, 2] and all(r.node == "d1" for r in got)
    for r in got:
        check_output(r, inline_bytes(r))
    assert site["connected"] and site["node_name"] == "d1" and site["cores"]["capacity"] == 2


def test_a_node_whose_broker_is_unreachable_starts_and_says_why(
    broker: Broker, open_dir: Path
) -> None:
    from swarm_testing.broker import free_port

    _server, site = broker

    assert site.token_file is not None
    cfg, data = _node_config(
        open_dir,
        {"nats": f"nats://127.0.0.1:{free_port()}", "token_file": str(site.token_file)},
    )
    with NodeProcess(cfg, data, None, open_dir / "node.log") as node:
        site = eventually(
            "the status to say why",
            lambda: (
                (s := _status(data)["site"]) and s["problem"] and "connect" in s["problem"] and s
            ),
            20,
        )
        assert not site["connected"] and node.proc.poll() is None


def test_a_range_redelivered_to_the_node_running_it_is_not_run_twice(
    broker: Broker, tmp_path: Path
) -> None:
    """Heartbeats lost for longer than AckWait (here: the worker's event loop
    stalls for 2.5 s) get the range redelivered, to this very node when it
    has a free core: it keeps its one run, held by the new delivery. (Before:
    a second run in the same ``<task>.<seq>`` directory, which broke both.)"""
    _server, site = broker
    runs = tmp_path / "runs.log"

    async def main() -> None:
        nc = await client(site)
        js = nc.jetstream()
        rec = record("again", synth("--sleep", "5", "--runs", str(runs)), 1, 1, ack_wait=1.0)
        await submit(js, rec)
        w = worker(nc, broker, tmp_path, "wn1", lease(cores=2))
        async with running(w):

            async def runs_it() -> bool:
                return bool(w.running)

            await eventually_async("the worker to take the range", runs_it, 10)
            time.sleep(2.5)  # the loop stalls: no heartbeat for 2.5 AckWaits
            (res,) = await Results(js, rec).wait(1, timeout=20)
        assert res.ok and res.delivery == 2
        assert len(runs.read_text().splitlines()) == 1
        assert w.counters.run == 1 and w.counters.reported == 1
        info = await consumer(js, "again")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)

    run(main)


def test_a_node_stopping_hands_its_running_range_back(broker: Broker, open_dir: Path) -> None:
    """SIGTERM: the running range gets the runner's grace (0.5 s), is cut, and
    is given back (``nak``): ready for another node at once, not after AckWait."""
    _server, site = broker
    assert site.token_file is not None
    cfg, data = _node_config(
        open_dir,
        {"nats": site.servers[0], "token_file": str(site.token_file), "node_name": "d2"},
        runner="grace = 0.5\n",
    )
    command = ["/bin/sh", "-c", "sleep 60", "{first}{count}{output}"]
    rec = record("stopped", command, 1, 1, ack_wait=120.0)

    async def submit_it() -> None:
        nc = await client(site)
        await submit(nc.jetstream(), rec)

    async def take_it() -> int:
        """The range, fetched from the workers' consumer by the test: its delivery count."""
        nc = await client(site)
        sub = await nc.jetstream().pull_subscribe_bind(
            durable=WORKERS, stream="SITE_stopped_RANGES"
        )
        (msg,) = await sub.fetch(1, timeout=5)
        await msg.term()
        return int(msg.metadata.num_delivered)

    with NodeProcess(cfg, data, None, open_dir / "node.log") as node:
        run(submit_it)
        eventually("the node to run the range", lambda: _status(data)["site"]["running"], 30)
        t0 = time.monotonic()
        node.proc.terminate()
        node.proc.wait(timeout=30)
        stopped_in = time.monotonic() - t0
    delivered = run(take_it)
    assert delivered == 2  # handed back: delivered again at once (AckWait is 120 s)
    assert stopped_in < 15, stopped_in
    assert "range 0 handed back" in (open_dir / "node.log").read_text()


def test_a_bad_site_table_stops_the_node_at_start_with_one_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    cases: list[tuple[dict[str, object], str]] = [
        ({"nats": 42, "token_file": str(token)}, "site.nats: expected a nats:// URL"),
        ({"nats": "nats://127.0.0.1:1"}, "site: exactly one of token_file and credentials"),
        ({"nats": "nats://127.0.0.1:1", "token_file": "missing"}, "site.token_file: cannot read"),
    ]
    for site, want in cases:
        cfg, data = _node_config(tmp_path, site)
        r = subprocess.run(
            [sys.executable, "-m", "swarm", "node", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r.stderr
        assert want in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not data.exists()  # nothing was created
