"""The control plane (sitejob/control.py): the plan is pure; submit, status and
list run against a real nats-server (JetStream, token auth) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from runner.exceptions import JobSpecError
from sitejob import control, store
from sitejob.config import SiteConfig, connect
from sitejob.control import SiteControl, new_job_id, plan_job, summarize
from sitejob.exceptions import BrokerError, NotConnected, UnknownSiteJob
from sitejob.protocol import WORKERS, decode_range, ranges_stream, results_stream
from swarm.exceptions import ConfigError
from tests.sitejob.broker_client import Broker, jetstream

T = TypeVar("T")


def spec_text(name: str = "mc", *, max_events: int = 50, per_task: int = 10, **extra: Any) -> str:
    lines = [
        f'name = "{name}"',
        'command = ["/bin/sh", "-c", "seq {first} {count} > {output}"]',
        "cpu_work_per_event = 1.0",
        f"max_events = {max_events}",
        f"events_per_task = {per_task}",
        *(f"{k} = {v!r}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def with_js(cfg: SiteConfig, body: Callable[[Any], Awaitable[T]]) -> T:
    async def main() -> T:
        async with jetstream(cfg) as js:
            return await body(js)

    return asyncio.run(main())


# -- the plan (pure) --------------------------------------------------------------------


def test_job_ids_are_stream_name_safe_and_sort_by_submission_time() -> None:
    ids = [new_job_id(t) for t in (1_700_000_000.0, 1_700_000_000.5, 1_700_000_061.25)]
    assert ids == sorted(ids)
    for job in ids:
        assert re.fullmatch(r"\d{8}-\d{6}-\d{3}-[0-9a-f]{6}", job), job
    assert ids[0].startswith("20231114-221320-000-") and ids[1][16:19] == "500"


def test_the_plan_takes_max_events_unless_events_is_given() -> None:
    record = plan_job(spec_text(max_events=95, per_task=10, first_event=7), events=None)
    assert (record.events, record.first_event, record.events_per_task) == (95, 7, 10)
    assert record.tasks == 10 and record.ack_wait == 30.0 and record.max_attempts == 3
    record = plan_job(spec_text(), events=1000, ack_wait=2, max_attempts=5)
    assert (record.events, record.tasks, record.ack_wait, record.max_attempts) == (1000, 100, 2, 5)


@pytest.mark.parametrize(
    ("text", "options", "error", "message"),
    [
        ('name = "x"\n', {}, JobSpecError, "field 'command'"),
        ("name = \n", {}, JobSpecError, "not valid TOML"),
        (spec_text() + "colour = 1\n", {}, JobSpecError, "field 'colour'"),
        (spec_text(), {"events": 0}, ConfigError, "events: expected a whole number from 1"),
        (spec_text(first_event=10**12), {"events": 1}, ConfigError, "events: "),
        (spec_text(per_task=1), {"events": 10**6 + 1}, JobSpecError, "at most 1000000"),
        (spec_text(), {"ack_wait": 0.1}, ConfigError, "ack_wait: expected"),
        (spec_text(), {"ack_wait": float("nan")}, ConfigError, "ack_wait: expected"),
        (spec_text(), {"max_attempts": 0}, ConfigError, "max_attempts: expected"),
        (spec_text(), {"max_attempts": 101}, ConfigError, "max_attempts: expected"),
    ],
)
def test_a_bad_spec_or_option_is_one_line_naming_it(
    text: str, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    events = options.pop("events", None)
    with pytest.raises(error) as caught:
        plan_job(text, events=events, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_status_without_a_gather_report_has_nothing_finished() -> None:
    record = plan_job(spec_text(max_events=50), events=None)
    st = summarize(record, None, (4, 1))
    assert st["ranges"] == {"ready": 4, "running": 1, "finished": 0, "retrying": 0, "abandoned": 0}
    assert st["events_planned"] == 50 and st["events_committed"] == 0
    assert st["complete"] is False and st["streams"] is True and st["name"] == "mc"


def test_a_malformed_gather_report_is_named_not_a_crash() -> None:
    record = plan_job(spec_text(), events=None)
    for raw in (b"{not json", b"[1, 2]", b'{"events_committed": "lots", "ranges": 3}'):
        st = summarize(record, raw, None)
        assert st["events_committed"] == 0 and st["ranges"]["finished"] == 0
        assert st["complete"] is False
    assert "not JSON" in summarize(record, b"{not json", None)["status_error"]


# -- against a real broker --------------------------------------------------------------

nats = pytest.mark.nats


@nats
def test_submit_publishes_every_range_once_and_status_counts_them(broker: Broker) -> None:
    _server, cfg = broker
    seen: list[int] = []

    async def body(js: Any) -> tuple[Any, dict[str, Any], list[Any]]:
        record = await control.submit(
            js, spec_text(max_events=95), events=None, ack_wait=2.0, progress=seen.append
        )
        st = await control.status(js, record.id)
        info = await js.stream_info(ranges_stream(record.id))
        sub = await js.pull_subscribe_bind(WORKERS, stream=ranges_stream(record.id))
        msgs = await sub.fetch(10, timeout=5)
        return record, st, [info.state.messages, [decode_range(m.data, record) for m in msgs]]

    record, st, (stored, ranges) = with_js(cfg, body)
    assert record.tasks == 10 and seen == [10]
    assert stored == 10
    assert sorted((r.task, r.first, r.count, r.generation) for r in ranges) == [
        (t, t * 10, 5 if t == 9 else 10, 0) for t in range(10)
    ]
    assert st["ranges"] == {"ready": 10, "running": 0, "finished": 0, "retrying": 0, "abandoned": 0}
    assert st["events_planned"] == 95 and st["events_committed"] == 0 and st["id"] == record.id


@nats
def test_status_shows_running_ranges_and_the_gathers_report(broker: Broker) -> None:
    _server, cfg = broker
    report = {
        "events_committed": 30,
        "ranges": {"finished": 3, "retrying": 1, "abandoned": 1},
        "nodes": {"wn1": 2, "wn2": 1},
        "retries": 2,
        "duplicates": 1,
        "refused": {"hash mismatch": 1},
        "abandoned": [{"task": 4, "reason": "exit status 1 (3 attempts)"}],
        "complete": False,
        "gather": {"node": "wn9", "pid": 123},
    }

    async def body(js: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        record = await control.submit(js, spec_text(max_events=100), events=None, ack_wait=30)
        sub = await js.pull_subscribe_bind(WORKERS, stream=ranges_stream(record.id))
        await sub.fetch(3, timeout=5)  # three ranges held, not acked: running
        await store.put_status(js, record.id, json.dumps(report).encode())
        live = await control.status(js, record.id)
        # A completed job whose streams were removed: the KV alone answers.
        report["complete"] = True
        await store.put_status(js, record.id, json.dumps(report).encode())
        await js.delete_stream(ranges_stream(record.id))
        await js.delete_stream(results_stream(record.id))
        return live, await control.status(js, record.id)

    live, done = with_js(cfg, body)
    assert live["ranges"] == {
        "ready": 7,
        "running": 3,
        "finished": 3,
        "retrying": 1,
        "abandoned": 1,
    }
    assert live["events_committed"] == 30 and live["nodes"] == {"wn1": 2, "wn2": 1}
    assert live["retries"] == 2 and live["duplicates"] == 1
    assert live["refused"] == {"hash mismatch": 1}
    assert live["abandoned"] == [{"task": 4, "reason": "exit status 1 (3 attempts)"}]
    assert live["complete"] is False and live["streams"] is True
    assert done["complete"] is True and done["streams"] is False
    assert done["ranges"]["ready"] == 0 and done["ranges"]["running"] == 0
    assert done["ranges"]["finished"] == 3


@nats
def test_list_in_submission_order_and_unknown_jobs(broker: Broker) -> None:
    _server, cfg = broker

    async def body(js: Any) -> tuple[list[str], list[dict[str, Any]]]:
        assert await control.list_jobs(js) == []
        ids = [(await control.submit(js, spec_text(f"job{i}"), events=20)).id for i in range(3)]
        for job in ("20250101-000000-000-abcdef", "../../x", "a.b", "*", ""):
            with pytest.raises(UnknownSiteJob, match="no site job"):
                await control.status(js, job)
        return ids, await control.list_jobs(js)

    ids, listed = with_js(cfg, body)
    assert [j["id"] for j in listed] == ids == sorted(ids)
    assert [j["name"] for j in listed] == ["job0", "job1", "job2"]
    assert all(j["events_planned"] == 20 and j["ranges_planned"] == 2 for j in listed)
    assert not any(j["complete"] for j in listed)


@nats
def test_a_bad_submit_writes_nothing(broker: Broker) -> None:
    _server, cfg = broker

    async def body(js: Any) -> list[str]:
        with pytest.raises(JobSpecError):
            await control.submit(js, 'name = "x"\n', events=None)
        with pytest.raises(ConfigError):
            await control.submit(js, spec_text(), events=None, ack_wait=0)
        return await store.job_ids(js)

    assert with_js(cfg, body) == []


def test_site_control_without_a_connection_says_so() -> None:
    ctl = SiteControl(lambda: None)

    async def body() -> None:
        with pytest.raises(NotConnected, match="not connected to the site broker"):
            await ctl.status("20250101-000000-000-abcdef")
        with pytest.raises(NotConnected):
            await ctl.list_jobs()
        with pytest.raises(NotConnected):
            await ctl.submit(spec_text())
        with pytest.raises(JobSpecError):  # a bad spec is refused as such, connected or not
            await ctl.submit('name = "x"\n')

    asyncio.run(body())


@nats
def test_a_broker_gone_mid_session_is_a_broker_error_within_the_deadline(broker: Broker) -> None:
    server, cfg = broker
    cfg = dataclasses.replace(cfg, request_timeout=1.5)

    async def body() -> float:
        nc = await connect(cfg, reconnect=False)
        try:
            js = nc.jetstream(timeout=cfg.request_timeout)
            record = await control.submit(js, spec_text(), events=None)
            server.kill()
            start = time.monotonic()
            with pytest.raises(BrokerError, match=f"site job {record.id}"):
                await control.status(js, record.id)
            return time.monotonic() - start
        finally:
            await nc.close()

    assert asyncio.run(body()) < cfg.request_timeout + 5
