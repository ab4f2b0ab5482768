"""The node's status reports, typed: one definition for the HTTP API, its
OpenAPI document and ``swarm status``.

Each report is a frozen dataclass; :func:`to_json` turns one (or a list or
dict of them) into the JSON the API sends, and :func:`schema_of` turns its
type into the OpenAPI 3.0 schema the API's document shows, so the document
cannot drift from what is sent.  :meth:`NodeStatus.from_json` reads a report
back and :func:`render` shows it to a person (``swarm status``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from cvmfs_like.start_profile import ProfileStatus
from swarm.transfer import TransferStatus


@dataclass(frozen=True)
class CacheStats:
    """One repository's object cache (cvmfs_like.cache.ObjectCache.stats)."""

    quota: int
    used: int
    objects: int
    pinned_bytes: int
    hits: int
    misses: int
    evictions: int
    failures: int
    rejected: int  # fetched bytes that failed verification (counted in failures too)
    dropped: int


@dataclass(frozen=True)
class SourceProblem:
    """A metadata or torrent source that failed lately (swarm.exchange)."""

    strikes: int
    bad_data: int
    problem: str | None
    at: float


@dataclass(frozen=True)
class RepositoryStatus:
    name: str
    origin: str | None
    policy: str
    revision: int | None
    catalog: str | None
    published: int | None
    tag: str | None
    last_refresh: float | None  # epoch seconds
    last_error: str | None  # every failed phase of the last refresh, in order
    metadata_from: dict[str, str]  # metadata file -> the URL it came from
    source_problems: dict[str, SourceProblem]
    torrents: dict[str, str]  # revision -> info-hash
    objects_from_swarm: int
    objects_from_origin: int
    images: list[str]  # "name/version" in the mount
    refused_images: dict[str, str]  # "name/version" -> why
    cache: CacheStats
    metadata_expires: dict[str, float]  # trusted role -> expiry, epoch seconds
    start_profile: ProfileStatus | None = None


@dataclass(frozen=True)
class RevisionReport:
    revision: int
    catalog: str
    published: int
    files: int
    bytes: int
    tags: list[str]
    current: bool


@dataclass(frozen=True)
class ImageReport:
    """An image: accepted (in the mount; size and hashes set) or refused (reason)."""

    repository: str
    name: str
    version: str
    accepted: bool
    size: int | None = None
    sha256: str | None = None
    info_hash: str | None = None
    path: str | None = None
    progress: float | None = None
    reason: str | None = None


@dataclass
class TransferReport(TransferStatus):
    """A torrent of this node, with what it is for."""

    repository: str = ""
    what: str = ""  # "revision N" or "image NAME/VERSION"


@dataclass(frozen=True)
class PeerReport:
    address: str
    client: str
    torrents: int
    downloaded: int
    uploaded: int


@dataclass(frozen=True)
class RangeReport:
    """A site range this node runs now (sitejob.worker)."""

    job: str
    task: int
    seq: int  # the range message's stream sequence
    delivery: int  # how many times the broker has delivered it
    seconds: float  # running for
    estimate: float  # expected seconds (this node's pace, or the spec's work / power)


@dataclass(frozen=True)
class SiteReport:
    """The node's part in the site event service (``[site]``, sitejob.service)."""

    broker: list[str]
    node_name: str
    connected: bool
    problem: str | None  # why not connected, or the last broker error
    work: bool  # pulls site ranges
    not_pulling: str | None  # why no range is pulled now (None: pulling when ranges wait)
    jobs: list[str]  # site jobs this node pulls from
    running: list[RangeReport]
    ranges_run: int
    ranges_reported: int  # ok results stored by the broker, ranges acked
    ranges_failed: int  # failed runs reported (ok = false)
    ranges_handed_back: int  # stopped and nak'ed (lease end, node stop)
    refused: dict[str, int]  # bad range messages by reason (terminated, never run)
    pace: dict[str, float]  # job -> this node's smoothed wall seconds per event
    cores: dict[str, int]  # the core ledger: capacity, node, site, node_waiting, peak


@dataclass(frozen=True)
class NodeStatus:
    pid: int
    uptime: float
    listen: str
    api: str
    peer: str
    mount: str | None
    mounted: bool
    bootstrap: list[str]
    session: dict[str, object]  # libtorrent session counters
    banned: list[str]
    repositories: dict[str, RepositoryStatus]
    transfers: list[TransferReport]
    site: SiteReport | None = None  # None: no [site] table
    vms: VmsReport | None = None  # None: VMs turned off ([vm] enabled = false)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> NodeStatus:
        """A report as :func:`to_json` wrote it.

        Raises:
            KeyError, TypeError: not such a report.
        """
        repos = {
            name: RepositoryStatus(
                **{
                    **r,
                    "cache": CacheStats(**r["cache"]),
                    "start_profile": None
                    if r.get("start_profile") is None
                    else ProfileStatus(**r["start_profile"]),
                    "source_problems": {
                        s: SourceProblem(**p) for s, p in r["source_problems"].items()
                    },
                }
            )
            for name, r in doc["repositories"].items()
        }
        transfers = [TransferReport(**t) for t in doc["transfers"]]
        site = doc.get("site")
        if site is not None:
            site = SiteReport(**{**site, "running": [RangeReport(**r) for r in site["running"]]})
        vms = doc.get("vms")
        if vms is not None:
            vms = VmsReport(**{**vms, "vms": [VmReport(**v) for v in vms["vms"]]})
        return cls(
            **{**doc, "repositories": repos, "transfers": transfers, "site": site, "vms": vms}
        )


def render(st: NodeStatus) -> list[str]:
    """``swarm status``: the report for a person, one line per fact."""
    sess: dict[str, Any] = dict(st.session)
    out = [
        f"node pid {st.pid}, up {st.uptime:.0f} s; listen {st.listen}, api {st.api},"
        f" peer exchange {st.peer}",
        f"  mount {st.mount or '-'} ({'mounted' if st.mounted else 'not mounted'});"
        f" {sess.get('peers', 0)} peer connections, {sess.get('dht_nodes', 0)} DHT nodes;"
        f" {int(sess.get('downloaded', 0)) / 1e6:.1f} MB in"
        f" ({int(sess.get('received_from_peers', 0)) / 1e6:.1f} from peers,"
        f" {int(sess.get('received_from_web_seeds', 0)) / 1e6:.1f} from the origin's web seed),"
        f" {int(sess.get('uploaded', 0)) / 1e6:.1f} MB out;"
        f" banned: {', '.join(st.banned) or 'none'}",
    ]
    for name, r in st.repositories.items():
        out.append(
            f"  {name}: revision {r.revision} ({r.policy}),"
            f" objects {r.objects_from_swarm} from swarm"
            f" / {r.objects_from_origin} from origin,"
            f" cache {r.cache.used / 1e6:.1f} / {r.cache.quota / 1e6:.0f} MB"
        )
        prof = r.start_profile
        if prof is not None and prof.state not in ("off", "none"):
            out.append(
                f"    start profile: {prof.state}"
                + (f", {prof.recorded} entries" if prof.listed == 0 else "")
                + (
                    f", {prof.fetched} fetched, {prof.present} cached, {prof.skipped} skipped,"
                    f" {prof.failed} failed of {prof.listed}"
                    if prof.listed
                    else ""
                )
            )
        out += [f"    image {img}" for img in r.images]
        out += [f"    image {img} REFUSED: {why}" for img, why in r.refused_images.items()]
        if r.last_error:
            out.append(f"    last error: {r.last_error}")
        for source, p in r.source_problems.items():
            lied = f", {p.bad_data} bad answers" if p.bad_data else ""
            out.append(f"    source {source} asked last ({p.strikes} strikes{lied}): {p.problem}")
    for t in st.transfers:
        out.append(
            f"  transfer {t.repository} {t.what}: {t.state}"
            + (" (full prefetch)" if t.prefetch else " (on demand)")
            + f", holds {t.total_done / 1e6:.1f} MB, {t.num_peers} peers,"
            f" in {t.downloaded / 1e6:.1f} MB / out {t.uploaded / 1e6:.1f} MB"
            + (f", {t.hash_failures} hash failures" if t.hash_failures else "")
        )
    if st.site is not None:
        out += _render_site(st.site)
    if st.vms is not None:
        out += render_vms(st.vms)
    return out


def render_vm(v: VmReport) -> str:
    """One VM on one line (``swarm status``, ``swarm vm list``)."""
    end = ""
    if v.code is not None or v.outcome:
        end = f"; outcome: {v.code if v.code is not None else '-'} {v.outcome or ''}".rstrip()
    if v.error:
        end += f"; error: {v.error}"
    return (
        f"vm {v.id} {v.image}: {v.state}, {v.cores} cores, {v.memory >> 20} MiB,"
        f" {v.accelerator or 'accelerator not chosen'}"
        + (f", pid {v.pid}" if v.pid else "")
        + (f", job {v.job}" if v.job else "")
        + end
    )


def render_vms(r: VmsReport) -> list[str]:
    out = [
        f"  vms: {r.running} running, {r.cores} cores held;"
        f" accelerator {r.accelerator or 'not chosen yet'}"
        + (f" ({r.accelerator_why})" if r.accelerator_why else "")
    ]
    out += [f"    VM type {t} backed off for {s:.0f} s more" for t, s in r.backed_off.items()]
    out += [f"    {render_vm(v)}" for v in r.vms]
    return out


def _render_site(s: SiteReport) -> list[str]:
    state = "connected" if s.connected else "NOT connected"
    out = [
        f"  site: node {s.node_name}, broker {', '.join(s.broker)} ({state})"
        + (f": {s.problem}" if s.problem else ""),
    ]
    if s.work:
        c = s.cores
        out.append(
            f"    ranges: {len(s.running)} running, {s.ranges_run} run,"
            f" {s.ranges_reported} reported, {s.ranges_failed} failed,"
            f" {s.ranges_handed_back} handed back; cores {c.get('site', 0)} site"
            f" + {c.get('node', 0)} node jobs of {c.get('capacity', 0)}"
            + (f"; not pulling: {s.not_pulling}" if s.not_pulling else "")
        )
        out += [f"    refused {n} range messages: {why}" for why, n in s.refused.items()]
        out += [
            f"    range {r.job}/{r.task} (seq {r.seq}, delivery {r.delivery}):"
            f" {r.seconds:.0f} s of ~{r.estimate:.0f} s"
            for r in s.running
        ]
    return out


@dataclass(frozen=True)
class VmReport:
    """One VM of the node (vm.manager): its request, its state and its outcome."""

    id: str
    image: str  # REPO/NAME/VERSION
    state: str  # starting, running, stopping, stopped, failed (vm.contract.State)
    cores: int
    memory: int  # bytes
    created: float  # epoch seconds
    accelerator: str | None = None  # kvm or tcg
    accelerator_why: str | None = None
    pid: int | None = None  # qemu's, while it runs
    started: float | None = None  # qemu started (epoch seconds)
    ends: float | None = None  # its lifetime or the lease's end, the earlier
    stopped: float | None = None
    agent: str | None = None  # the guest agent's HELLO version
    booted: float | None = None  # the agent's first HELLO (epoch seconds)
    last_heartbeat: float | None = None
    code: int | None = None  # the outcome: shutdown_message code (700 for a stale heartbeat)
    outcome: str | None = None
    aborted: bool = False
    fizzled: bool = False
    message_problem: str | None = None  # a malformed shutdown_message, as recorded
    error: str | None = None  # why it failed to start or was ended
    outputs: list[str] = dataclasses.field(default_factory=list)  # $JOBOUTPUTS names kept
    refused: list[str] = dataclasses.field(default_factory=list)  # lines and outputs refused
    dir: str = ""  # its directory on the node (record.json, joboutputs/, logs)
    software: bool = False  # the node's mount is exported to it (9p, swarm-software)
    migrated_from: str | None = None  # a migration's destination: the source node
    migrated_to: str | None = None  # a migration's source: the destination node
    migration_seconds: float | None = None  # mirror + memory, as the source saw it
    migration_downtime_ms: float | None = None  # the guest's pause (qemu's downtime)
    job: str | None = None  # the queued VM job (runner masonry) that started it


@dataclass(frozen=True)
class VmsReport:
    """The node's VMs (``vms`` in the node status)."""

    accelerator: str | None  # chosen once per daemon, at the first VM
    accelerator_why: str | None
    running: int
    cores: int  # held by VMs
    backed_off: dict[str, float]  # VM type -> seconds left
    vms: list[VmReport]
    # the node's core ledger (runner.cores.CoreUse): capacity, node, site, vm, peak, ...
    ledger: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Stopping:
    stopping: bool


def to_json(report: Any) -> Any:
    """A report (or a list or dict of reports) as plain JSON values."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return {f.name: to_json(getattr(report, f.name)) for f in dataclasses.fields(report)}
    if isinstance(report, list | tuple):
        return [to_json(r) for r in report]
    if isinstance(report, dict):
        return {k: to_json(v) for k, v in report.items()}
    return report


_SCALARS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    object: {},
    Any: {},
}


def schema_of(tp: Any) -> dict[str, Any]:
    """The OpenAPI 3.0 schema of a report type (a dataclass, a scalar,
    ``X | None``, ``list[X]``, ``dict[str, X]``).

    Raises:
        TypeError: a type this module does not describe.
    """
    if tp in _SCALARS:
        return dict(_SCALARS[tp])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1 and len(args) == 2:
            return {**schema_of(kinds[0]), "nullable": True}
    if origin is list:
        return {"type": "array", "items": schema_of(args[0])}
    if origin is dict and args[0] is str:
        return {"type": "object", "additionalProperties": schema_of(args[1])}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = dataclasses.fields(tp)
        return {
            "type": "object",
            "properties": {f.name: schema_of(hints[f.name]) for f in fields},
            "required": [f.name for f in fields],
        }
    raise TypeError(f"no schema for {tp!r}")
