"""The site event service's wire protocol: names in JetStream and message schemas.

One site job ``ID`` lives in JetStream as (see ``docs/SITE_JOBS.md``):

* stream ``SITE_<ID>_RANGES`` (work-queue retention), one subject per range,
  ``swarm.site.<ID>.range.<task>``; one durable pull consumer ``workers``
  shared by every node (AckWait, MaxDeliver); a range's message id is
  ``<ID>.<task>.<generation>`` so a re-publication with the same generation
  is de-duplicated by the server and a deliberate one (the reconciler, a
  retry) is not;
* stream ``SITE_<ID>_RESULTS`` (work-queue retention), subject
  ``swarm.site.<ID>.result``; one durable pull consumer ``gather``;
* object store ``SITE_<ID>_OUT``: range outputs larger than ``INLINE_MAX``
  (smaller ones travel inside their result message);
* stream ``SITE_<ID>_DEAD`` (work-queue retention): the server's
  max-deliveries advisories for the ``workers`` consumer, kept so that a
  gather that was down when a range died for the last time still hears of
  it; one durable pull consumer ``gather``;
* core-NATS subject ``swarm.site.<ID>.beat``: a worker's heartbeat for a range
  it runs (not stored; the reconciler's "somebody still holds it");
* key-value bucket ``SWARM_SITE``: ``<ID>.job`` the job record (spec text and
  plan, written once by submit), ``<ID>.status`` the gather's last report.

Every message that crosses the broker is decoded here, strictly and with
bounds: anything else raises :class:`ProtocolError` with the reason, which
the receiver logs and counts; it never reaches the journal.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import msgspec

from runner.spec import MAX_EVENTS
from sitejob.exceptions import ProtocolError

KV_BUCKET = "SWARM_SITE"
WORKERS = "workers"  # the ranges stream's durable consumer, shared by all nodes
GATHER = "gather"  # the results stream's durable consumer
INLINE_MAX = 64 * 1024  # outputs up to this size travel inside the result message
MAX_MESSAGE = 1 << 20  # the server's max_payload for site traffic
MAX_REASON = 500  # characters of a failure reason kept
MAX_NODE_NAME = 64
# A site job id: letters, digits and '-' only (it is part of stream names and
# subjects, where '.', '*', '>' and blanks are not allowed).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def job_id_problem(job: str) -> str | None:
    if not _ID.fullmatch(job):
        return f"{job[:80]!r} is not a site job id (1-64 of A-Z a-z 0-9 -, not starting with -)"
    return None


def node_name_problem(name: str) -> str | None:
    if not _NODE.fullmatch(name):
        return f"{name[:80]!r} is not a node name (1-64 of A-Z a-z 0-9 . _ -)"
    return None


def ranges_stream(job: str) -> str:
    return f"SITE_{job}_RANGES"


def results_stream(job: str) -> str:
    return f"SITE_{job}_RESULTS"


def output_bucket(job: str) -> str:
    return f"SITE_{job}_OUT"


def dead_stream(job: str) -> str:
    return f"SITE_{job}_DEAD"


def max_deliveries_subject(job: str) -> str:
    """The server's advisory for a range delivered ``max_deliver`` times, never acked."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{ranges_stream(job)}.{WORKERS}"


def range_subject(job: str, task: int | str) -> str:
    return f"swarm.site.{job}.range.{task}"


def result_subject(job: str) -> str:
    return f"swarm.site.{job}.result"


def beat_subject(job: str) -> str:
    return f"swarm.site.{job}.beat"


def range_msg_id(job: str, task: int, generation: int) -> str:
    return f"{job}.{task}.{generation}"


def job_key(job: str) -> str:
    return f"{job}.job"


def status_key(job: str) -> str:
    return f"{job}.status"


class JobRecord(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A site job as submitted: written once to ``SWARM_SITE/<ID>.job``."""

    id: str
    spec: str  # the spec's TOML text, validated by runner.spec at submit
    first_event: int
    events: int
    events_per_task: int
    submitted: float  # wall-clock seconds
    ack_wait: float  # seconds a range may go without a heartbeat before redelivery
    max_attempts: int  # failed runs of one range before it is abandoned

    @property
    def tasks(self) -> int:
        return -(-self.events // self.events_per_task)


class RangeMsg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One event range to run: task ``task`` covers ``first`` .. ``first + count - 1``."""

    job: str
    task: int
    first: int
    count: int
    generation: int  # 0 at submit; +1 at each deliberate re-publication


class ResultMsg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a node reports for one range it ran.

    ``ok``: the command exited 0 and its output is ``size`` bytes with SHA-256
    ``sha256``, either in ``inline`` (base64, at most ``INLINE_MAX`` bytes
    decoded) or in the job's object store under ``object``. Not ``ok``: the
    run failed for ``reason`` (the range is retried or abandoned by the
    gather's ledger). ``delivery`` is how many times the broker had delivered
    the range message when this node got it.
    """

    job: str
    task: int
    first: int
    count: int
    generation: int
    node: str
    ok: bool
    delivery: int = 1
    reason: str | None = None
    size: int = 0
    sha256: str = ""
    inline: str | None = None
    object: str | None = None
    seconds: float = 0.0  # wall time of the run
    cpu: float = 0.0  # CPU seconds of the run


class MaxDeliveries(msgspec.Struct, kw_only=True):
    """The server's max-deliveries advisory (the fields used; others are ignored)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


class BeatMsg(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    job: str
    task: int
    node: str


_ENC = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _ENC.encode(msg)


def _decode(data: bytes, cls: type[Any], what: str) -> Any:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{what} of {len(data)} bytes: at most {MAX_MESSAGE}")
    try:
        return msgspec.json.decode(data, type=cls)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from None


def _check_range(job: str, task: int, first: int, count: int, record: JobRecord | None) -> None:
    problem = job_id_problem(job)
    if problem:
        raise ProtocolError(problem)
    if not (0 <= task < 10**6 and 0 <= first <= MAX_EVENTS and 1 <= count <= MAX_EVENTS):
        raise ProtocolError(f"range task={task} first={first} count={count} is out of bounds")
    if record is None:
        return
    if job != record.id:
        raise ProtocolError(f"message for job {job!r} on job {record.id!r}'s subject")
    if task >= record.tasks:
        raise ProtocolError(f"task {task} is beyond the job's {record.tasks} ranges")
    start = record.first_event + task * record.events_per_task
    want = min(record.events_per_task, record.events - task * record.events_per_task)
    if (first, count) != (start, want):
        raise ProtocolError(
            f"task {task} claims events {first}+{count}; the job's plan says {start}+{want}"
        )


def decode_job(data: bytes) -> JobRecord:
    rec: JobRecord = _decode(data, JobRecord, "job record")
    problem = job_id_problem(rec.id)
    if problem:
        raise ProtocolError(problem)
    if not (0 <= rec.first_event <= MAX_EVENTS and 1 <= rec.events <= MAX_EVENTS):
        raise ProtocolError(f"job record: events {rec.first_event}+{rec.events} out of bounds")
    if not 1 <= rec.events_per_task <= MAX_EVENTS or rec.tasks > 10**6:
        raise ProtocolError(f"job record: {rec.events_per_task} events per range is out of bounds")
    if not (0.5 <= rec.ack_wait <= 3600 and 1 <= rec.max_attempts <= 100):
        raise ProtocolError("job record: ack_wait or max_attempts out of bounds")
    return rec


def decode_range(data: bytes, record: JobRecord | None = None) -> RangeMsg:
    """A range message, checked against the job's plan when ``record`` is known.

    Raises:
        ProtocolError: malformed, out of bounds, another job's, or not a
            range of the plan.
    """
    msg: RangeMsg = _decode(data, RangeMsg, "range message")
    _check_range(msg.job, msg.task, msg.first, msg.count, record)
    if not 0 <= msg.generation < 10**6:
        raise ProtocolError(f"range generation {msg.generation} is out of bounds")
    return msg


def decode_result(data: bytes, record: JobRecord | None = None) -> ResultMsg:
    """A result message, checked against the job's plan when ``record`` is known.

    The output itself (inline bytes or object) is checked against ``size``
    and ``sha256`` by whoever commits it (:func:`inline_bytes` for the
    inline case).

    Raises:
        ProtocolError: malformed, out of bounds, another job's, not a range
            of the plan, or an ``ok`` result without a well-formed output.
    """
    msg: ResultMsg = _decode(data, ResultMsg, "result message")
    _check_range(msg.job, msg.task, msg.first, msg.count, record)
    problem = node_name_problem(msg.node)
    if problem:
        raise ProtocolError(problem)
    if not (0 <= msg.generation < 10**6 and 1 <= msg.delivery < 10**6):
        raise ProtocolError("result generation or delivery out of bounds")
    if msg.reason is not None and len(msg.reason) > MAX_REASON:
        msg.reason = msg.reason[: MAX_REASON - 3] + "..."
    if not msg.ok:
        return msg
    if not _HEX64.fullmatch(msg.sha256):
        raise ProtocolError(f"result sha256 {msg.sha256[:80]!r} is not 64 lowercase hex digits")
    if not 0 <= msg.size < 1 << 40:
        raise ProtocolError(f"result size {msg.size} is out of bounds")
    if (msg.inline is None) == (msg.object is None):
        raise ProtocolError("an ok result carries exactly one of inline or object")
    if msg.inline is not None and len(msg.inline) > 4 * INLINE_MAX // 3 + 4:
        raise ProtocolError(f"inline output longer than {INLINE_MAX} bytes")
    if msg.object is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", msg.object):
        raise ProtocolError(f"object name {msg.object[:80]!r} is malformed")
    return msg


def decode_beat(data: bytes) -> BeatMsg:
    msg: BeatMsg = _decode(data, BeatMsg, "heartbeat")
    if job_id_problem(msg.job) or node_name_problem(msg.node) or not 0 <= msg.task < 10**6:
        raise ProtocolError("malformed heartbeat")
    return msg


def decode_max_deliveries(data: bytes, job: str) -> MaxDeliveries:
    """A max-deliveries advisory for ``job``'s ``workers`` consumer.

    Raises:
        ProtocolError: malformed, or about another stream or consumer.
    """
    msg: MaxDeliveries = _decode(data, MaxDeliveries, "max-deliveries advisory")
    if (msg.stream, msg.consumer) != (ranges_stream(job), WORKERS):
        raise ProtocolError(f"advisory for {msg.stream[:80]}/{msg.consumer[:80]}")
    if not (1 <= msg.stream_seq < 1 << 63 and 1 <= msg.deliveries < 10**6):
        raise ProtocolError("advisory stream_seq or deliveries out of bounds")
    return msg


def range_task(job: str, subject: str) -> int:
    """The range number of a ranges-stream subject ``swarm.site.<ID>.range.<task>``.

    Raises:
        ProtocolError: not a range subject of ``job``.
    """
    prefix = range_subject(job, "")
    tail = subject[len(prefix) :] if subject.startswith(prefix) else ""
    if not (tail.isascii() and tail.isdigit() and len(tail) <= 7):
        raise ProtocolError(f"{subject[:120]!r} is not a range subject of job {job}")
    return int(tail)


def inline_bytes(msg: ResultMsg) -> bytes:
    """The decoded inline output of ``msg``.

    Raises:
        ProtocolError: not base64.
    """
    assert msg.inline is not None
    try:
        return base64.b64decode(msg.inline, validate=True)
    except ValueError:
        raise ProtocolError("inline output is not base64") from None


def encode_inline(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
