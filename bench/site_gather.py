"""The site gather's own costs: throughput and overhead per range, on loopback.

``python -m bench.site_gather [--ranges N] [--latency-ranges M]`` (or
:func:`bench_gather` from another bench) starts a ``nats-server`` in a
temporary directory (token auth, ``sync_interval: always``) and measures:

* **throughput**: ``N`` (5000) small results are published first, then one
  gather (:func:`sitejob.gather.gather_job`) commits them all: ranges per
  second over the gather's whole run (connect, journal, every commit with
  its fsyncs, ``events.out``, removal of the streams). Goal >= 500/s.
* **overhead per range**: a minimal worker in this process pulls each range
  as soon as it is published and publishes a tiny result at once, while a
  gather runs; ``M`` (200) ranges are published one at a time and each is
  timed from its publication to its commit line in the journal (the
  broker's round trips, the gather's verify + fsyncs, no work). Goal: median
  < 20 ms.

Results: ``bench/results/site_gather.json`` (and the dict returned). A
section of ``python -m bench.run`` (``--only site``), before
:mod:`bench.site_service`, whose ``SITE_SERVICE.md`` shows both.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import say
from sitejob import store
from sitejob.config import SiteConfig, connect
from sitejob.gather import gather_job
from sitejob.protocol import (
    WORKERS,
    JobRecord,
    ResultMsg,
    decode_range,
    encode,
    encode_inline,
    ranges_stream,
    result_subject,
)
from swarm_testing.broker import local_broker

RESULTS = Path(__file__).with_name("results")
THROUGHPUT_GOAL = 500.0  # ranges/s
OVERHEAD_GOAL = 20.0  # ms, median


def _record(job: str, ranges: int) -> JobRecord:
    return JobRecord(
        id=job,
        spec="name = 'bench'\n",
        first_event=0,
        events=ranges,
        events_per_task=1,
        submitted=time.time(),
        ack_wait=60.0,  # no redelivery and no reconciliation during the measure
        max_attempts=3,
    )


def _result(rec: JobRecord, task: int, node: str) -> ResultMsg:
    data = b"event %d\n" % task
    return ResultMsg(
        job=rec.id,
        task=task,
        first=task,
        count=1,
        generation=0,
        node=node,
        ok=True,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        inline=encode_inline(data),
    )


async def _throughput(cfg: SiteConfig, out: Path, ranges: int) -> dict[str, Any]:
    rec = _record("BENCH-THROUGHPUT", ranges)
    nc = await connect(cfg, reconnect=False)
    try:
        js = nc.jetstream(timeout=cfg.request_timeout)
        await store.create_job(js, rec)
        t0 = time.perf_counter()
        for start in range(0, ranges, 256):
            await asyncio.gather(
                *(
                    js.publish(
                        result_subject(rec.id),
                        encode(_result(rec, t, "wn1")),
                        headers={"Nats-Msg-Id": f"{rec.id}.{t}.wn1.{t + 1}"},
                    )
                    for t in range(start, min(start + 256, ranges))
                )
            )
        published = time.perf_counter() - t0
    finally:
        await nc.close()
    t0 = time.perf_counter()
    report = await gather_job(cfg, rec.id, out)
    wall = time.perf_counter() - t0
    if not report.complete or report.events_committed != ranges:
        raise RuntimeError(f"throughput run incomplete: {report.to_json()}")
    return {
        "ranges": ranges,
        "publish_seconds": round(published, 3),
        "gather_seconds": round(wall, 3),
        "ranges_per_second": round(ranges / wall, 1),
        "goal": THROUGHPUT_GOAL,
        "passed": ranges / wall >= THROUGHPUT_GOAL,
    }


async def _worker(cfg: SiteConfig, rec: JobRecord, until: asyncio.Event) -> None:
    """Pull a range, publish its (tiny) result, ack: nothing else."""
    nc = await connect(cfg, name="bench-worker")
    try:
        js = nc.jetstream(timeout=cfg.request_timeout)
        sub = await js.pull_subscribe_bind(WORKERS, stream=ranges_stream(rec.id))
        while not until.is_set():
            try:
                msgs = await sub.fetch(1, timeout=0.5)
            except TimeoutError:
                continue
            for msg in msgs:
                r = decode_range(msg.data, rec)
                seq = msg.metadata.sequence.stream
                await js.publish(
                    result_subject(rec.id),
                    encode(_result(rec, r.task, "wn1")),
                    headers={"Nats-Msg-Id": f"{rec.id}.{r.task}.wn1.{seq}"},
                )
                await msg.ack()
    finally:
        await nc.close()


async def _overhead(cfg: SiteConfig, out: Path, ranges: int) -> dict[str, Any]:
    rec = _record("BENCH-OVERHEAD", ranges)
    nc = await connect(cfg, reconnect=False)
    until = asyncio.Event()
    samples: list[float] = []
    try:
        js = nc.jetstream(timeout=cfg.request_timeout)
        await store.create_job(js, rec)
        gather = asyncio.create_task(gather_job(cfg, rec.id, out))
        worker = asyncio.create_task(_worker(cfg, rec, until))
        journal = out / "journal.jsonl"
        while not journal.exists():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # the gather and the worker are pulling
        lines = 1
        for task in range(ranges):
            t0 = time.perf_counter()
            await store.publish_ranges(js, rec, [(task, 0)])
            deadline = t0 + 10
            while journal.read_bytes().count(b"\n") <= lines:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"range {task} was not committed in 10 s")
                await asyncio.sleep(0.0002)
            samples.append((time.perf_counter() - t0) * 1000)
            lines += 1
        report = await asyncio.wait_for(gather, 30)
        until.set()
        await worker
    finally:
        until.set()
        await nc.close()
    if not report.complete:
        raise RuntimeError(f"overhead run incomplete: {report.to_json()}")
    samples.sort()
    median = statistics.median(samples)
    return {
        "ranges": ranges,
        "median_ms": round(median, 2),
        "p95_ms": round(samples[int(0.95 * (len(samples) - 1))], 2),
        "max_ms": round(samples[-1], 2),
        "goal_ms": OVERHEAD_GOAL,
        "passed": median < OVERHEAD_GOAL,
    }


def bench_gather(tmp: Path, *, ranges: int = 5000, latency_ranges: int = 200) -> dict[str, Any]:
    """Both measures (see the module docstring) with a broker in ``tmp``.

    Raises:
        sitejob.exceptions.BrokerError: no nats-server, or it did not start.
        RuntimeError: a gather did not complete.
    """
    with local_broker(tmp, node_name="bench") as (_server, cfg):
        throughput = asyncio.run(_throughput(cfg, tmp / "throughput", ranges))
        say(f"site gather: {throughput['ranges_per_second']} ranges/s")
        overhead = asyncio.run(_overhead(cfg, tmp / "overhead", latency_ranges))
        say(f"site gather: {overhead['median_ms']} ms median publish -> commit")
    return {
        "throughput": throughput,
        "overhead": overhead,
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "storage": str(tmp),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.site_gather", description=__doc__)
    p.add_argument("--ranges", type=int, default=5000)
    p.add_argument("--latency-ranges", type=int, default=200)
    p.add_argument("--dir", type=Path, help="where the broker and the gathers write (a tmp dir)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        result = bench_gather(Path(tmp), ranges=a.ranges, latency_ranges=a.latency_ranges)
    result["command"] = "python -m bench.site_gather " + " ".join(argv or sys.argv[1:])
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "site_gather.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
