"""A site job's objects in JetStream: created at submit, found by workers and the gather.

The names are :mod:`sitejob.protocol`'s. Every call here is one or a few
JetStream API requests, each with the client's request deadline (nats-py's
``timeout``); errors are raised as :class:`SiteJobError` with one line.

Range publication is idempotent: range ``task`` of generation ``g`` always
carries the message id ``<ID>.<task>.<g>``, so a submit that died half-way
and is run again, or a reconciler that republishes what it believes lost,
never puts a range twice into the stream within the server's duplicate
window (and a range that is in the stream twice is run twice at most: the
gather commits it once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from sitejob.exceptions import ProtocolError, SiteJobError, UnknownSiteJob
from sitejob.protocol import (
    GATHER,
    KV_BUCKET,
    MAX_MESSAGE,
    WORKERS,
    JobRecord,
    RangeMsg,
    dead_stream,
    decode_job,
    encode,
    job_key,
    max_deliveries_subject,
    output_bucket,
    range_msg_id,
    range_subject,
    ranges_stream,
    result_subject,
    results_stream,
    status_key,
)

DUPLICATE_WINDOW = 600.0  # seconds the server remembers message ids
PUBLISH_WINDOW = 256  # range publications in flight at once
GATHER_ACK_WAIT = 60.0  # a result fetched by a gather that died is redelivered after this


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def kv(js: Any) -> Any:
    """The ``SWARM_SITE`` bucket (created if missing: any node may submit first)."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError

    try:
        return await js.key_value(KV_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(KeyValueConfig(bucket=KV_BUCKET, history=1))


async def create_job(js: Any, record: JobRecord) -> None:
    """Create the job's streams, consumers, object store and record (not its ranges).

    Safe to repeat for the same record (a submit that died half-way).

    Raises:
        SiteJobError: a job with this id and another record exists, or the
            broker refused.
    """
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DiscardPolicy,
        ObjectStoreConfig,
        RetentionPolicy,
        StorageType,
        StreamConfig,
    )
    from nats.js.errors import KeyWrongLastSequenceError

    bucket = await kv(js)
    try:
        await bucket.create(job_key(record.id), encode(record))
    except KeyWrongLastSequenceError:
        existing = await load_job(js, record.id)
        if existing != decode_job(encode(record)):
            raise SiteJobError(f"site job {record.id} exists already") from None
    common: dict[str, Any] = {
        "retention": RetentionPolicy.WORK_QUEUE,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.NEW,
        "max_msg_size": MAX_MESSAGE,
        "duplicate_window": DUPLICATE_WINDOW,
    }
    try:
        await js.add_stream(
            StreamConfig(
                name=ranges_stream(record.id), subjects=[range_subject(record.id, "*")], **common
            )
        )
        await js.add_stream(
            StreamConfig(
                name=results_stream(record.id), subjects=[result_subject(record.id)], **common
            )
        )
        await js.add_consumer(
            ranges_stream(record.id),
            ConsumerConfig(
                durable_name=WORKERS,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=record.ack_wait,
                max_deliver=max_deliver(record.max_attempts),
                max_ack_pending=-1,
            ),
        )
        await js.add_consumer(results_stream(record.id), gather_consumer())
        await js.create_object_store(
            output_bucket(record.id), config=ObjectStoreConfig(storage=StorageType.FILE)
        )
    except Exception as exc:
        raise SiteJobError(f"site job {record.id}: the broker refused: {_why(exc)}") from None
    await ensure_dead_letters(js, record.id)


def gather_consumer() -> Any:
    """The ``gather`` consumer of the results and dead-letter streams."""
    from nats.js.api import AckPolicy, ConsumerConfig

    return ConsumerConfig(
        durable_name=GATHER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=GATHER_ACK_WAIT,
        max_ack_pending=-1,
    )


async def reset_gather_consumers(js: Any, job: str) -> None:
    """Forget what a dead gather had fetched and not acked: delete and re-create
    the ``gather`` consumers, so everything still in the results and dead-letter
    streams (work queues: what was acked is gone) is delivered at once instead
    of after ``GATHER_ACK_WAIT``. Only for the one live gather of the job.

    Raises:
        SiteJobError: the broker refused.
    """
    from nats.js.errors import NotFoundError

    for stream in (results_stream(job), dead_stream(job)):
        try:
            with contextlib.suppress(NotFoundError):
                await js.delete_consumer(stream, GATHER)
            await js.add_consumer(stream, gather_consumer())
        except Exception as exc:
            raise SiteJobError(f"site job {job}: the broker refused: {_why(exc)}") from None


async def ensure_dead_letters(js: Any, job: str) -> None:
    """Create the job's ``SITE_<ID>_DEAD`` stream (the server's max-deliveries
    advisories for its ranges, kept for the gather) and its ``gather``
    consumer, if missing. Called by :func:`create_job` and by the gather.

    Raises:
        SiteJobError: the broker refused.
    """
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    try:
        await js.add_stream(
            StreamConfig(
                name=dead_stream(job),
                subjects=[max_deliveries_subject(job)],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        await js.add_consumer(dead_stream(job), gather_consumer())
    except Exception as exc:
        raise SiteJobError(f"site job {job}: the broker refused: {_why(exc)}") from None


async def remove_job_data(js: Any, job: str) -> None:
    """Delete the job's streams and object store (the KV record and status stay):
    workers find nothing more to pull. Safe to repeat.

    Raises:
        SiteJobError: the broker refused (other than "not found").
    """
    from nats.js.errors import NotFoundError

    for name in (ranges_stream(job), results_stream(job), dead_stream(job)):
        try:
            await js.delete_stream(name)
        except NotFoundError:
            pass
        except Exception as exc:
            raise SiteJobError(f"site job {job}: cannot delete {name}: {_why(exc)}") from None
    try:
        await js.delete_object_store(output_bucket(job))
    except NotFoundError:
        pass
    except Exception as exc:
        raise SiteJobError(f"site job {job}: cannot delete its objects: {_why(exc)}") from None


def max_deliver(max_attempts: int) -> int:
    """Deliveries of one range message before the server gives up on it.

    They count crashes of whole nodes (failures a node reports are retried by
    the gather's ledger with a new generation, not redelivered) and
    hand-backs (a nak at a lease's end or a node's stop), hence the room
    above ``max_attempts``.
    """
    return 2 * max_attempts + 4


def range_of(record: JobRecord, task: int, generation: int = 0) -> RangeMsg:
    start = task * record.events_per_task
    return RangeMsg(
        job=record.id,
        task=task,
        first=record.first_event + start,
        count=min(record.events_per_task, record.events - start),
        generation=generation,
    )


async def publish_ranges(
    js: Any,
    record: JobRecord,
    tasks: Iterable[tuple[int, int]],
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Publish ranges ``(task, generation)``; returns how many the server stored anew
    (a duplicate message id is not stored again).

    At most :data:`PUBLISH_WINDOW` publications are in flight; each has the
    client's request deadline.

    Raises:
        SiteJobError: the broker refused or did not answer.
    """
    stored = 0
    done = 0

    async def one(task: int, generation: int) -> bool:
        ack = await js.publish(
            range_subject(record.id, task),
            encode(range_of(record, task, generation)),
            headers={"Nats-Msg-Id": range_msg_id(record.id, task, generation)},
        )
        return not ack.duplicate

    batch: list[tuple[int, int]] = []

    async def flush() -> None:
        nonlocal stored, done
        try:
            results = await asyncio.gather(*(one(t, g) for t, g in batch))
        except Exception as exc:
            raise SiteJobError(
                f"site job {record.id}: publishing ranges failed after {done}: {_why(exc)}"
            ) from None
        stored += sum(results)
        done += len(batch)
        batch.clear()
        if progress is not None:
            progress(done)

    for item in tasks:
        batch.append(item)
        if len(batch) >= PUBLISH_WINDOW:
            await flush()
    if batch:
        await flush()
    return stored


async def load_job(js: Any, job: str) -> JobRecord:
    """The job's record.

    Raises:
        UnknownSiteJob: no such job.
        SiteJobError: the record is unreadable (names why).
    """
    from nats.js.errors import KeyNotFoundError

    bucket = await kv(js)
    try:
        entry = await bucket.get(job_key(job))
    except KeyNotFoundError:
        raise UnknownSiteJob(f"no site job {job!r}") from None
    if entry.value is None:
        raise UnknownSiteJob(f"no site job {job!r}")
    try:
        return decode_job(entry.value)
    except ProtocolError as exc:
        raise SiteJobError(f"site job {job!r}: {exc}") from None


async def job_ids(js: Any) -> list[str]:
    """Every site job's id, in id order."""
    from nats.js.errors import NoKeysError

    bucket = await kv(js)
    try:
        keys = await bucket.keys()
    except NoKeysError:
        return []
    return sorted(k[: -len(".job")] for k in keys if k.endswith(".job"))


async def stream_subjects(js: Any, job: str) -> dict[str, int]:
    """Messages in the job's ranges stream, by subject (``swarm.site.ID.range.N``).

    The server answers at most 100 000 subjects at a time (``limit``, with
    ``total``): the rest are asked for page by page (nats-py's
    ``stream_info`` reads the first page only). Each page is one request with
    the client's deadline.

    Raises:
        nats.js.errors.NotFoundError: the stream is gone.
        nats.errors.TimeoutError: the broker did not answer.
    """
    subject = f"$JS.API.STREAM.INFO.{ranges_stream(job)}"
    subjects: dict[str, int] = {}
    while True:
        request = {"subjects_filter": ">", "offset": len(subjects)}
        # nats-py has no public call for a page; _api_request maps API errors.
        resp = await js._api_request(subject, json.dumps(request).encode(), timeout=js._timeout)
        page = (resp.get("state") or {}).get("subjects") or {}
        subjects.update(page)
        if not page or len(subjects) >= int(resp.get("total") or 0):
            return subjects


async def put_status(js: Any, job: str, payload: bytes) -> None:
    bucket = await kv(js)
    await bucket.put(status_key(job), payload)


async def get_status(js: Any, job: str) -> bytes | None:
    from nats.js.errors import KeyNotFoundError

    bucket = await kv(js)
    with contextlib.suppress(KeyNotFoundError):
        entry = await bucket.get(status_key(job))
        return bytes(entry.value) if entry.value is not None else None
    return None
