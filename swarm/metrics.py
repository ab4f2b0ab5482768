"""Prometheus metrics: ``GET /metrics`` of the node daemon and of ``swarm serve``.

Most series are read at scrape time from the node's typed status reports
(:class:`swarm.status.NodeStatus` and its repositories, transfers, peers and
:class:`swarm.status.SiteReport`; the job service's job list) by
:class:`NodeCollector`, so a figure has one owner and the metrics cannot
drift from ``swarm status``.  Only what no report holds is counted where it
happens, in :class:`FetchMeters` (object and image read latencies, bytes
fetched straight from the origin).  The series are listed in docs/NODE.md.

Invariants:

- Every application has its own :class:`prometheus_client.CollectorRegistry`
  (never the process-wide default one): tests run many nodes in one process,
  and a node's figures are its own.
- A scrape does bounded work on the event loop: the reports are in memory;
  the job list, which reads the queue directory, is read in a thread and
  waited for at most :data:`JOBS_WAIT` seconds, else the last list read is
  used (a warning names the slow queue), so a scrape under load answers.
- Label values come from bounded sets: repositories, torrents and peers of
  this node, site jobs, refusal reasons, VM states and outcome codes (the
  tables of ``vm.contract``), images of this node, and the ids of VMs
  running now (at most the lease's cores); never request paths.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import Histogram as PromHistogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from swarm.status import NodeStatus, PeerReport, SiteReport, VmsReport
from vm.contract import LIVE, SHUTDOWN_CODES, State

log = logging.getLogger(__name__)

# Seconds a scrape waits for the job list before it uses the last one read.
JOBS_WAIT = 1.0

# Fetch latencies: a cached read is a few ms, a swarm fetch tens of ms to
# seconds, and fetch_timeout is a few seconds to a minute.
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FetchMeters:
    """What the node counts where it happens (no report holds it): object
    fetches by source, image reads through the mount, bytes straight from the
    origin.  Called from FUSE and worker threads; prometheus_client's metrics
    are thread-safe.  The metrics belong to no registry: :class:`NodeCollector`
    exports them into its application's."""

    def __init__(self) -> None:
        self.object_fetch = PromHistogram(
            "swarm_object_fetch_seconds",
            "Time to fetch one object the cache did not hold, by where it came from",
            ["source"],
            buckets=FETCH_BUCKETS,
            registry=None,
        )
        self.object_fetch_failures = Counter(
            "swarm_object_fetch_failures",
            "Object fetches that failed, by the source that failed (swarm: the origin took over)",
            ["source"],
            registry=None,
        )
        self.image_read = PromHistogram(
            "swarm_image_read_seconds",
            "Time to read one range of a VM image (its torrent pieces) through the mount",
            buckets=FETCH_BUCKETS,
            registry=None,
        )
        self.image_read_failures = Counter(
            "swarm_image_read_failures",
            "Image reads that failed (pieces not delivered in time, torrent error)",
            registry=None,
        )
        self.origin_bytes = Counter(
            "swarm_origin_direct_received_bytes",
            "Object bytes fetched straight from the origin (not through a torrent)",
            registry=None,
        )

    def collect(self) -> Iterator[Metric]:
        for meter in (
            self.object_fetch,
            self.object_fetch_failures,
            self.image_read,
            self.image_read_failures,
        ):
            yield from meter.collect()


class MetricsView(Protocol):
    """What the node's metrics read (swarm.node.Node)."""

    @property
    def meters(self) -> FetchMeters: ...

    @property
    def job_service(self) -> Any: ...

    def status(self) -> NodeStatus: ...

    def peers(self) -> list[PeerReport]: ...


@dataclass(frozen=True)
class NodeSnapshot:
    """Everything one scrape shows, read before it is rendered."""

    status: NodeStatus
    peers: list[PeerReport]
    origin_bytes: float
    jobs: list[dict[str, Any]] | None  # None: no job service (or never read)
    job_service_running: bool | None
    now: float  # epoch seconds of the snapshot


class JobsReader:
    """The job service's job list for scrapes, read in a thread, waited for
    at most ``wait`` seconds; meanwhile the last list read is used.  At most
    one read runs at a time, so slow scrapes do not pile up threads."""

    def __init__(self, read: Callable[[], list[dict[str, Any]]], wait: float = JOBS_WAIT) -> None:
        self._read = read
        self._wait = wait
        self._task: asyncio.Future[list[dict[str, Any]]] | None = None
        self._last: list[dict[str, Any]] | None = None

    async def jobs(self) -> list[dict[str, Any]] | None:
        """The current job list, or the last one read if reading is slow or failed."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(asyncio.to_thread(self._read))
            # A read that ends after its scrape stopped waiting is kept for the
            # next scrape (a failure is logged, not reported as never retrieved).
            self._task.add_done_callback(self._keep)
        try:
            self._last = await asyncio.wait_for(asyncio.shield(self._task), self._wait)
        except TimeoutError:
            log.warning(
                "metrics: the job queue was not listed within %g s; last list used", self._wait
            )
        except Exception:  # any failure of the queue (logged by _keep): the scrape answers
            pass
        return self._last

    def _keep(self, task: asyncio.Future[list[dict[str, Any]]]) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("metrics: the job queue could not be listed: %s", task.exception())
        else:
            self._last = task.result()


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def node_families(snap: NodeSnapshot) -> list[Metric]:
    """The node's series from one snapshot (pure: no I/O, no clock)."""
    st = snap.status
    sess: dict[str, Any] = dict(st.session)
    out: list[Metric] = []

    start = _gauge("swarm_node_start_time_seconds", "When the daemon started, epoch seconds")
    start.add_metric([], snap.now - st.uptime)
    mounted = _gauge("swarm_mounted", "1 if the read-only mount is up")
    mounted.add_metric([], 1.0 if st.mounted else 0.0)
    out += [start, mounted]

    received = _counter(
        "swarm_received_bytes",
        "Payload bytes received, by source: peer (BitTorrent peers), web_seed (the origin"
        " serving a torrent's files), origin (objects fetched from the origin directly)",
        ["source"],
    )
    ts = st.transfers
    received.add_metric(["peer"], float(sess.get("received_from_peers", 0)))
    received.add_metric(["web_seed"], float(sess.get("received_from_web_seeds", 0)))
    received.add_metric(["origin"], snap.origin_bytes)
    sent = _counter("swarm_sent_bytes", "Payload bytes sent to peers (torrents held now)")
    sent.add_metric([], float(sum(t.uploaded for t in ts)))
    rate_in = _gauge("swarm_receive_rate_bytes_per_second", "Payload receive rate, all torrents")
    rate_in.add_metric([], float(sum(t.download_rate for t in ts)))
    rate_out = _gauge("swarm_send_rate_bytes_per_second", "Payload send rate, all torrents")
    rate_out.add_metric([], float(sum(t.upload_rate for t in ts)))
    hash_fail = _counter(
        "swarm_piece_hash_failures", "Torrent pieces that failed their hash check (torrents now)"
    )
    hash_fail.add_metric([], float(sum(t.hash_failures for t in ts)))
    banned = _gauge("swarm_banned_peers", "Peers banned for sending data that failed verification")
    banned.add_metric([], float(len(st.banned)))
    peers = _gauge("swarm_peers", "Distinct peers (and web seeds) connected in any torrent")
    peers.add_metric([], float(len(snap.peers)))
    conns = _gauge("swarm_peer_connections", "Peer connections, summed over torrents")
    conns.add_metric([], float(sum(t.num_peers for t in ts)))
    dht = _gauge("swarm_dht_nodes", "Nodes in the DHT routing table")
    dht.add_metric([], float(sess.get("dht_nodes", 0)))
    out += [received, sent, rate_in, rate_out, hash_fail, banned, peers, conns, dht]

    torrents = _gauge("swarm_torrents", "Torrents held, by state", ["state"])
    by_state: dict[str, int] = {}
    progress = _gauge(
        "swarm_transfer_progress_ratio",
        "Share of a torrent's wanted bytes held (0..1)",
        ["repository", "what"],
    )
    t_peers = _gauge("swarm_transfer_peers", "Peers of a torrent", ["repository", "what"])
    for t in st.transfers:
        state = "error" if t.state.startswith("error") else t.state
        by_state[state] = by_state.get(state, 0) + 1
        progress.add_metric([t.repository, t.what], t.progress)
        t_peers.add_metric([t.repository, t.what], float(t.num_peers))
    for state, n in sorted(by_state.items()):
        torrents.add_metric([state], float(n))
    out += [torrents, progress, t_peers]
    out += _repository_families(st)
    if snap.job_service_running is not None:
        out += _job_families(snap.jobs, snap.job_service_running)
    if st.site is not None:
        out += _site_families(st.site)
    if st.vms is not None:
        out += _vm_families(st.vms, snap.now)
    return out


def _repository_families(st: NodeStatus) -> list[Metric]:
    r_ = ["repository"]
    revision = _gauge("swarm_repository_revision", "The revision the mount shows", r_)
    published = _gauge(
        "swarm_repository_published_timestamp_seconds", "When the shown revision was published", r_
    )
    refreshed = _gauge(
        "swarm_repository_last_refresh_timestamp_seconds", "When metadata was last refreshed", r_
    )
    failing = _gauge(
        "swarm_repository_refresh_failing", "1 if a phase of the last refresh failed", r_
    )
    expiry = _gauge(
        "swarm_metadata_expiry_timestamp_seconds",
        "When a trusted metadata role expires, epoch seconds",
        ["repository", "role"],
    )
    objects = _counter(
        "swarm_objects_fetched",
        "Objects fetched (the cache did not hold them), by source",
        ["repository", "source"],
    )
    rejected = _counter(
        "swarm_verification_failures",
        "Fetched objects whose bytes did not match their hash (refused, never served)",
        r_,
    )
    images = _gauge("swarm_images", "VM images, accepted or refused", ["repository", "accepted"])
    used = _gauge("swarm_cache_used_bytes", "Object cache bytes used", r_)
    quota = _gauge("swarm_cache_quota_bytes", "Object cache quota", r_)
    pinned = _gauge("swarm_cache_pinned_bytes", "Object cache bytes pinned (in use)", r_)
    cached = _gauge("swarm_cache_objects", "Objects in the cache", r_)
    hits = _counter("swarm_cache_hits", "Object reads the cache answered", r_)
    misses = _counter("swarm_cache_misses", "Object reads the cache fetched for", r_)
    evictions = _counter("swarm_cache_evictions", "Objects evicted for the quota", r_)
    failures = _counter("swarm_cache_fetch_failures", "Fetches that failed (any cause)", r_)
    dropped = _counter(
        "swarm_cache_dropped", "Cached objects found damaged, dropped and fetched again", r_
    )
    for name, r in st.repositories.items():
        if r.revision is not None:
            revision.add_metric([name], float(r.revision))
        if r.published is not None:
            published.add_metric([name], float(r.published))
        if r.last_refresh is not None:
            refreshed.add_metric([name], r.last_refresh)
        failing.add_metric([name], 0.0 if r.last_error is None else 1.0)
        for role, at in sorted(r.metadata_expires.items()):
            expiry.add_metric([name, role], at)
        objects.add_metric([name, "swarm"], float(r.objects_from_swarm))
        objects.add_metric([name, "origin"], float(r.objects_from_origin))
        rejected.add_metric([name], float(r.cache.rejected))
        images.add_metric([name, "true"], float(len(r.images)))
        images.add_metric([name, "false"], float(len(r.refused_images)))
        c = r.cache
        for family, value in (
            (used, c.used),
            (quota, c.quota),
            (pinned, c.pinned_bytes),
            (cached, c.objects),
            (hits, c.hits),
            (misses, c.misses),
            (evictions, c.evictions),
            (failures, c.failures),
            (dropped, c.dropped),
        ):
            family.add_metric([name], float(value))
    return [
        revision,
        published,
        refreshed,
        failing,
        expiry,
        objects,
        rejected,
        images,
        used,
        quota,
        pinned,
        cached,
        hits,
        misses,
        evictions,
        failures,
        dropped,
    ]


# Fields of a finished job's report (runner.node_run.RunReport) summed into counters.
_JOB_REPORT_COUNTERS = (
    ("swarm_job_events_done", "events_done", "Events done by finished jobs"),
    ("swarm_job_tasks_committed", "tasks_committed", "Tasks committed by finished jobs"),
    ("swarm_job_task_runs_failed", "failed_runs", "Task runs that failed, in finished jobs"),
    ("swarm_job_tasks_abandoned", "tasks_abandoned", "Tasks abandoned by finished jobs"),
)


def _job_families(jobs: list[dict[str, Any]] | None, running: bool) -> list[Metric]:
    service = _gauge("swarm_job_service_running", "1 if the job service's masonry thread runs")
    service.add_metric([], 1.0 if running else 0.0)
    if jobs is None:
        return [service]
    states = _gauge("swarm_jobs", "Jobs in the node's queue, by state", ["state"])
    count: dict[str, int] = dict.fromkeys(("queued", "running", "done", "rejected"), 0)
    sums: dict[str, float] = {key: 0.0 for _, key, _ in _JOB_REPORT_COUNTERS}
    committed_running = 0.0
    for job in jobs:
        count[job["state"]] = count.get(job["state"], 0) + 1
        report = job.get("report")
        if isinstance(report, dict):
            for key in sums:
                value = report.get(key)
                if isinstance(value, int | float):
                    sums[key] += value
        if job["state"] == "running":
            committed_running += float(job.get("tasks_committed", 0))
    for state, n in count.items():
        states.add_metric([state], float(n))
    out: list[Metric] = [service, states]
    for name, key, doc in _JOB_REPORT_COUNTERS:
        family = _counter(name, doc)
        family.add_metric([], sums[key])
        out.append(family)
    now = _gauge("swarm_job_running_tasks_committed", "Tasks committed so far by running jobs")
    now.add_metric([], committed_running)
    return [*out, now]


def _site_families(s: SiteReport) -> list[Metric]:
    connected = _gauge("swarm_site_connected", "1 if connected to the site's event broker")
    connected.add_metric([], 1.0 if s.connected else 0.0)
    running = _gauge("swarm_site_ranges_running", "Site event ranges running on this node now")
    running.add_metric([], float(len(s.running)))
    out: list[Metric] = [connected, running]
    for what, value, doc in (
        ("run", s.ranges_run, "Site event ranges run"),
        ("reported", s.ranges_reported, "Site ranges whose results the broker stored"),
        ("failed", s.ranges_failed, "Site ranges reported failed"),
        ("handed_back", s.ranges_handed_back, "Site ranges stopped and handed back"),
    ):
        family = _counter(f"swarm_site_ranges_{what}", doc)
        family.add_metric([], float(value))
        out.append(family)
    refused = _counter(
        "swarm_site_ranges_refused", "Bad site range messages refused, by reason", ["reason"]
    )
    for reason, n in sorted(s.refused.items()):
        refused.add_metric([reason], float(n))
    pace = _gauge(
        "swarm_site_pace_seconds_per_event", "This node's smoothed wall seconds per event", ["job"]
    )
    for job, seconds in sorted(s.pace.items()):
        pace.add_metric([job], seconds)
    cores = _gauge("swarm_site_cores", "The core ledger (capacity, node, site, ...)", ["kind"])
    for kind, n in sorted(s.cores.items()):
        cores.add_metric([kind], float(n))
    return [*out, refused, pace, cores]


_LIVE_STATES = frozenset(s.value for s in LIVE)
NO_CODE = "none"  # the outcome label of a VM that ended without a code


def _vm_families(r: VmsReport, now: float) -> list[Metric]:
    """The VM service's series (``vms`` of the node status): states and
    outcomes over every VM record the node keeps (records outlive the
    daemon, so the outcome counters only grow while data_dir is kept)."""
    states = _gauge("swarm_vms", "VMs the node keeps a record of, by state", ["state"])
    count = dict.fromkeys((s.value for s in State), 0)
    outcomes = _counter(
        "swarm_vm_outcomes",
        "VMs that ended here, by their outcome's shutdown_message code (none: no code)",
        ["code"],
    )
    by_code = dict.fromkeys([*(str(c) for c in SHUTDOWN_CODES), NO_CODE], 0)
    aborts = _counter("swarm_vm_aborts", "VMs that ended in an abort (their image backed off)")
    cores = _gauge("swarm_vm_cores", "Cores held by VMs (taken from the lease's)")
    memory = _gauge("swarm_vm_memory_bytes", "Memory of the VMs that may run now")
    heartbeat = _gauge(
        "swarm_vm_heartbeat_age_seconds",
        "Seconds since a running VM's last heartbeat (before the first: since its agent's"
        " HELLO, before that since qemu started)",
        ["vm"],
    )
    n_aborts = held_memory = 0
    for v in r.vms:
        count[v.state] = count.get(v.state, 0) + 1
        if v.state in _LIVE_STATES:
            held_memory += v.memory
        if v.state == State.STOPPED.value:
            code = str(v.code) if v.code is not None else NO_CODE
            by_code[code] = by_code.get(code, 0) + 1
            n_aborts += v.aborted
        if v.state == State.RUNNING.value:
            since = v.last_heartbeat or v.booted or v.started or v.created
            heartbeat.add_metric([v.id], max(0.0, now - since))
    for state, n in count.items():
        states.add_metric([state], float(n))
    for code, n in by_code.items():
        outcomes.add_metric([code], float(n))
    aborts.add_metric([], float(n_aborts))
    cores.add_metric([], float(r.cores))
    memory.add_metric([], float(held_memory))
    backoff = _gauge(
        "swarm_vm_backoff_seconds",
        "Seconds left before a VM of an image that aborted may start again",
        ["image"],
    )
    for image, left in sorted(r.backed_off.items()):
        backoff.add_metric([image], left)
    accelerator = _gauge(
        "swarm_vm_accelerator",
        "1 for the accelerator the daemon chose at its first VM (kvm or tcg)",
        ["accelerator"],
    )
    if r.accelerator is not None:
        accelerator.add_metric([r.accelerator], 1.0)
    return [states, outcomes, aborts, cores, memory, heartbeat, backoff, accelerator]


class NodeCollector(Collector):
    """The node's series of the snapshot the scrape took (:func:`node_families`)
    and the node's :class:`FetchMeters`."""

    def __init__(self) -> None:
        self.snapshot: NodeSnapshot | None = None
        self.meters: FetchMeters | None = None

    def collect(self) -> Iterable[Metric]:
        if self.snapshot is not None:
            yield from node_families(self.snapshot)
        if self.meters is not None:
            yield from self.meters.collect()


def _origin_bytes(meters: FetchMeters) -> float:
    for family in meters.origin_bytes.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0


def _exposition(registry: CollectorRegistry) -> web.Response:
    resp = web.Response(body=generate_latest(registry))
    # Prometheus text format 0.0.4 (prometheus_client.CONTENT_TYPE_LATEST), set in
    # aiohttp's two parts.
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    return resp


def add_node_metrics(app: web.Application, node: MetricsView) -> None:
    """``GET /metrics`` (no token, read-only) on the node's API application."""
    registry = CollectorRegistry(auto_describe=False)
    collector = NodeCollector()  # the node is read at scrape time, never before
    registry.register(collector)
    service = node.job_service
    reader = None if service is None else JobsReader(service.jobs)

    async def metrics(request: web.Request) -> web.Response:
        jobs = None if reader is None else await reader.jobs()
        running = None if service is None else bool(service.status()["running"])
        # No await from here to the rendering: concurrent scrapes do not mix.
        meters = node.meters
        collector.snapshot = NodeSnapshot(
            node.status(), node.peers(), _origin_bytes(meters), jobs, running, time.time()
        )
        collector.meters = meters
        return _exposition(registry)

    app.router.add_get("/metrics", metrics)


# What ``swarm serve`` serves, by the first path segment after the repository.
_ORIGIN_KINDS = frozenset({"metadata", "data", "images"})


class OriginMeters:
    """``swarm serve``'s counts: requests by kind and status, bytes sent, and
    request latency, in the application's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "swarm_origin_requests",
            "Requests answered, by kind (metadata, data, images, index, other) and HTTP status",
            ["kind", "code"],
            registry=self.registry,
        )
        self.sent = Counter(
            "swarm_origin_sent_bytes",
            "Body bytes sent (file and range responses), by kind",
            ["kind"],
            registry=self.registry,
        )
        self.seconds = PromHistogram(
            "swarm_origin_request_seconds",
            "Time to answer a request, body sent included, by kind",
            ["kind"],
            buckets=FETCH_BUCKETS,
            registry=self.registry,
        )

    def done(self, kind: str, code: int, start: float) -> None:
        """One answer given."""
        self.requests.labels(kind, str(code)).inc()
        self.seconds.labels(kind).observe(time.monotonic() - start)


def _origin_kind(request: web.Request) -> str:
    if request.path == "/":
        return "index"
    parts = request.path.split("/", 3)
    return parts[2] if len(parts) > 3 and parts[2] in _ORIGIN_KINDS else "other"


class _CountedFile(web.FileResponse):
    """A file answer that counts itself once sent: its status (304, 206 and
    416 are only known then), its bytes and its time."""

    def __init__(self, path: Any, meters: OriginMeters, kind: str, start: float, **kw: Any):
        super().__init__(path, **kw)
        self._counted_by = meters
        self._counted_kind = kind
        self._counted_since = start

    async def prepare(self, request: web.BaseRequest) -> Any:
        try:
            writer = await super().prepare(request)  # sends the file (sendfile)
        except BaseException:  # the client went away, or the file could not be read
            self._counted_by.done(self._counted_kind, 500, self._counted_since)
            raise
        if request.method == "GET" and self.status in (200, 206):
            self._counted_by.sent.labels(self._counted_kind).inc(self.content_length or 0)
        self._counted_by.done(self._counted_kind, self.status, self._counted_since)
        return writer


_ORIGIN_METERS: web.AppKey[OriginMeters] = web.AppKey("origin_meters")


def served_file(request: web.Request, path: Any, **kw: Any) -> web.FileResponse:
    """``web.FileResponse(path, **kw)``, counted by ``swarm serve``'s metrics
    when its app has them (:func:`add_origin_metrics`)."""
    meters = request.app.get(_ORIGIN_METERS)
    if meters is None:
        return web.FileResponse(path, **kw)
    # Timed from here: the handler before it only matched the path (and a stat).
    return _CountedFile(path, meters, _origin_kind(request), time.monotonic(), **kw)


def add_origin_metrics(app: web.Application) -> None:
    """``GET /metrics`` on ``swarm serve``'s application, and the middleware
    that counts every other answer (files count themselves once sent,
    :func:`served_file`).  Add before the app is frozen."""
    meters = OriginMeters()
    app[_ORIGIN_METERS] = meters

    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.path == "/metrics":
            resp: web.StreamResponse = await handler(request)
            return resp
        start = time.monotonic()
        code = 500
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            code = exc.status
            raise
        else:
            code = 0 if isinstance(resp, _CountedFile) else resp.status  # 0: counts itself
            return resp
        finally:
            if code:
                meters.done(_origin_kind(request), code, start)

    async def metrics(request: web.Request) -> web.Response:
        return _exposition(meters.registry)

    app.middlewares.append(count)
    app.router.add_get("/metrics", metrics)
