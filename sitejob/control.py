"""The site job control plane: submit a job, read its status, list the jobs.

Used by ``swarm site-job submit/status/list`` (``sitejob/cli.py``) and by the
node API's ``/v1/site-jobs`` routes (``sitejob/api.py``, through
:class:`SiteControl`). Everything here is a few JetStream requests, each
with the client's request deadline; nothing is written but the job's record,
streams and ranges (:mod:`sitejob.store` owns those).

Invariants:

* a job is submitted only with a spec that ``runner.spec`` accepts and a
  plan that the protocol's decoders accept (at most ``MAX_RANGES`` ranges,
  events within ``MAX_EVENTS``), so no worker or gather ever meets a record
  it must refuse;
* a job id is ``YYYYMMDD-HHMMSS-mmm-xxxxxx`` (UTC, then random hex): it sorts
  by submission time and is a valid stream-name part (``protocol._ID``);
* the status's live counts (``ready``, ``running``) come from the ranges
  stream's consumer; everything the gather decides (committed, retrying,
  abandoned, nodes, duplicates, refused) from the gather's last report in the
  KV. A job whose streams are gone (complete, cleaned up) is reported from the
  KV alone; a job without a gather report yet has nothing finished.

Errors: :class:`runner.exceptions.JobSpecError` (the spec; names the field),
:class:`swarm.exceptions.ConfigError` (a submit option; names it),
:class:`sitejob.exceptions.UnknownSiteJob`, :class:`sitejob.exceptions.SiteJobError`
(the broker refused), :class:`sitejob.exceptions.BrokerError` (the broker cannot
be reached or did not answer in time).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from runner.exceptions import JobSpecError
from runner.spec import MAX_EVENTS, decode_spec, parse_spec
from sitejob import store
from sitejob.exceptions import BrokerError, NotConnected, SiteJobError, UnknownSiteJob
from sitejob.protocol import WORKERS, JobRecord, job_id_problem, ranges_stream
from swarm.exceptions import ConfigError
from swarm.options import ValueRangeError, parse_count, parse_seconds

MAX_RANGES = 10**6  # the protocol's bound on a job's ranges (protocol.decode_job)
MIN_ACK_WAIT, MAX_ACK_WAIT = 0.5, 3600.0  # the protocol's bounds (protocol.decode_job)
MAX_ATTEMPTS = 100
DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_ATTEMPTS = 3
RANGE_STATES = ("ready", "running", "finished", "retrying", "abandoned")
# Submit options are numbers, or their decimal text (an API query): parsed by
# swarm.options, their one owner, when the job is planned.
Count = int | str
Seconds = float | int | str


def new_job_id(now: float | None = None) -> str:
    """``YYYYMMDD-HHMMSS-mmm-xxxxxx``: UTC time of submission, then 24 random bits."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now % 1 * 1000):03d}-{secrets.token_hex(3)}"


def plan_job(
    spec_text: str,
    *,
    events: Count | None,
    ack_wait: Seconds = DEFAULT_ACK_WAIT,
    max_attempts: Count = DEFAULT_MAX_ATTEMPTS,
    job_id: str | None = None,
    now: float | None = None,
) -> JobRecord:
    """The record of a job to submit (pure: no broker).

    Raises:
        JobSpecError: the spec is not a valid job spec (names the field), or
            it cuts the job into more than :data:`MAX_RANGES` ranges.
        ConfigError: ``events``, ``ack_wait`` or ``max_attempts`` out of
            bounds (names it).
    """
    spec = parse_spec(decode_spec(spec_text.encode("utf-8")))
    n: int = (
        spec.max_events if events is None else _option("events", parse_count, events, 1, MAX_EVENTS)
    )
    wait: float = _option("ack_wait", parse_seconds, ack_wait, MIN_ACK_WAIT, MAX_ACK_WAIT)
    attempts: int = _option("max_attempts", parse_count, max_attempts, 1, MAX_ATTEMPTS)
    if spec.first_event + n > MAX_EVENTS:
        raise ConfigError(
            f"events: {spec.first_event} + {n} events run past event number {MAX_EVENTS}"
        )
    ranges = -(-n // spec.events_per_task)
    if ranges > MAX_RANGES:
        raise JobSpecError(
            "events_per_task",
            f"{n} events in ranges of {spec.events_per_task} make {ranges} ranges; a site job "
            f"has at most {MAX_RANGES} (raise events_per_task or ask for fewer events)",
        )
    now = time.time() if now is None else now
    return JobRecord(
        id=job_id or new_job_id(now),
        spec=spec_text,
        first_event=spec.first_event,
        events=n,
        events_per_task=spec.events_per_task,
        submitted=now,
        ack_wait=wait,
        max_attempts=attempts,
    )


def _option(key: str, parse: Callable[..., Any], value: object, low: Any, high: Any) -> Any:
    """``parse(value, minimum=low, maximum=high)``; a bad value is a ConfigError naming ``key``."""
    try:
        return parse(value, minimum=low, maximum=high)
    except ValueRangeError as exc:
        raise ConfigError(f"{key}: {exc}") from None


@contextlib.contextmanager
def _broker(what: str) -> Iterator[None]:
    """Map nats-py's errors at the boundary: no answer or no connection is a
    :class:`BrokerError` (transport), any other refusal a :class:`SiteJobError`."""
    import nats.errors

    try:
        yield
    except (SiteJobError, BrokerError):
        raise
    except (
        nats.errors.TimeoutError,
        nats.errors.NoRespondersError,
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionDrainingError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
        TimeoutError,
    ) as exc:
        why = str(exc) or type(exc).__name__
        raise BrokerError(f"{what}: the broker did not answer ({why})") from None
    except nats.errors.Error as exc:
        why = str(exc) or type(exc).__name__
        raise SiteJobError(f"{what}: the broker refused: {why}") from None


async def submit(
    js: Any,
    spec_text: str,
    *,
    events: Count | None,
    ack_wait: Seconds = DEFAULT_ACK_WAIT,
    max_attempts: Count = DEFAULT_MAX_ATTEMPTS,
    progress: Callable[[int], None] | None = None,
) -> JobRecord:
    """Validate, record and publish a new site job; returns its record.

    Every range of generation 0 is published (``progress(done)`` after each
    batch). A submit that fails half-way leaves a job whose missing ranges
    the gather's reconciler publishes.

    Raises:
        JobSpecError, ConfigError: bad spec or option (nothing was written).
        SiteJobError: the broker refused.
        BrokerError: the broker did not answer.
    """
    record = plan_job(spec_text, events=events, ack_wait=ack_wait, max_attempts=max_attempts)
    with _broker(f"submitting site job {record.id}"):
        await store.create_job(js, record)
        await store.publish_ranges(
            js, record, ((task, 0) for task in range(record.tasks)), progress=progress
        )
    return record


def _spec_name(record: JobRecord) -> str | None:
    try:
        name = decode_spec(record.spec.encode("utf-8")).get("name")
    except Exception:  # the record was validated at submit; a name is only a label
        return None
    return name if isinstance(name, str) else None


def _gather_report(raw: bytes | None) -> tuple[dict[str, Any], str | None]:
    """The gather's last report as a JSON object, or ``{}`` and why not."""
    if raw is None:
        return {}, None
    try:
        report = json.loads(raw)
    except ValueError as exc:
        return {}, f"the gather's status is not JSON: {exc}"
    if not isinstance(report, dict):
        return {}, "the gather's status is not a JSON object"
    return report, None


def _int(report: dict[str, Any], key: str) -> int:
    value = report.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def summarize(
    record: JobRecord, raw_status: bytes | None, live: tuple[int, int] | None
) -> dict[str, Any]:
    """The job's status from its record, the gather's last report and the
    consumer's live counts ``(ready, running)`` (None: the streams are gone).
    Pure."""
    report, problem = _gather_report(raw_status)
    counts = report.get("ranges")
    counts = counts if isinstance(counts, dict) else {}
    abandoned = report.get("abandoned")
    abandoned = abandoned if isinstance(abandoned, list) else []
    ranges = {state: _int(counts, state) for state in RANGE_STATES}
    if "abandoned" not in counts:
        ranges["abandoned"] = len(abandoned)
    ready, running = live if live is not None else (0, 0)
    ranges["ready"], ranges["running"] = ready, running
    out: dict[str, Any] = {
        "id": record.id,
        "name": _spec_name(record),
        "submitted": record.submitted,
        "events_planned": record.events,
        "events_committed": _int(report, "events_committed"),
        "first_event": record.first_event,
        "events_per_task": record.events_per_task,
        "ranges_planned": record.tasks,
        "ack_wait": record.ack_wait,
        "max_attempts": record.max_attempts,
        "ranges": ranges,
        "nodes": report.get("nodes", {}),
        "retries": _int(report, "retries"),
        "duplicates": _int(report, "duplicates"),
        "refused": report.get("refused", {}),
        "abandoned": abandoned,
        "complete": report.get("complete") is True,
        "streams": live is not None,
        "gather": report.get("gather"),
    }
    if problem is not None:
        out["status_error"] = problem
    return out


async def status(js: Any, job: str) -> dict[str, Any]:
    """The job's status (see :func:`summarize` and ``docs/SITE_JOBS.md``).

    Raises:
        UnknownSiteJob: no such job (or not a job id).
        SiteJobError: the record is unreadable, or the broker refused.
        BrokerError: the broker did not answer.
    """
    from nats.js.errors import NotFoundError

    if job_id_problem(job):
        raise UnknownSiteJob(f"no site job {job[:80]!r}")
    with _broker(f"site job {job}"):
        record = await store.load_job(js, job)
        raw = await store.get_status(js, job)
        live: tuple[int, int] | None
        try:
            info = await js.consumer_info(ranges_stream(job), WORKERS)
        except NotFoundError:
            live = None  # a completed job whose streams were removed: the KV says all
        else:
            live = (info.num_pending or 0, info.num_ack_pending or 0)
    return summarize(record, raw, live)


async def list_jobs(js: Any) -> list[dict[str, Any]]:
    """Every site job, in submission order: id, name, submitted, events
    planned and committed, ranges planned, complete (from the KV alone).

    Raises:
        SiteJobError: the broker refused.
        BrokerError: the broker did not answer.
    """
    keys = ("id", "name", "submitted", "events_planned", "events_committed", "ranges_planned")
    out: list[dict[str, Any]] = []
    with _broker("listing site jobs"):
        for job in await store.job_ids(js):
            try:
                record = await store.load_job(js, job)
            except UnknownSiteJob:
                continue  # removed while we listed
            except SiteJobError as exc:
                out.append({"id": job, "error": str(exc)})
                continue
            st = summarize(record, await store.get_status(js, job), None)
            out.append({**{k: st[k] for k in keys}, "complete": st["complete"]})
    return out


class SiteControl:
    """The control plane over a connection that may come and go (a node's).

    ``js_provider()`` returns the JetStream context, or None while the node
    is not connected to the broker: then every call raises
    :class:`NotConnected`.
    """

    def __init__(self, js_provider: Callable[[], Any | None]) -> None:
        self._js_provider = js_provider

    def _js(self) -> Any:
        js = self._js_provider()
        if js is None:
            raise NotConnected(
                "this node is not connected to the site broker (down or unreachable; "
                "the node keeps trying)"
            )
        return js

    async def submit(
        self,
        spec_text: str,
        *,
        events: Count | None = None,
        ack_wait: Seconds = DEFAULT_ACK_WAIT,
        max_attempts: Count = DEFAULT_MAX_ATTEMPTS,
    ) -> JobRecord:
        """:func:`submit` (raises as it does, and :class:`NotConnected`).

        The spec and options are checked before the connection, so a bad
        request is refused as such even while the broker is away.
        """
        plan_job(spec_text, events=events, ack_wait=ack_wait, max_attempts=max_attempts)
        return await submit(
            self._js(), spec_text, events=events, ack_wait=ack_wait, max_attempts=max_attempts
        )

    async def status(self, job: str) -> dict[str, Any]:
        """:func:`status` (raises as it does, and :class:`NotConnected`)."""
        return await status(self._js(), job)

    async def list_jobs(self) -> list[dict[str, Any]]:
        """:func:`list_jobs` (raises as it does, and :class:`NotConnected`)."""
        return await list_jobs(self._js())
