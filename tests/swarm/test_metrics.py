"""``GET /metrics``, scraped over HTTP and parsed with prometheus_client's
text parser: the node daemon's series show what the node really did (bytes
received, the revision published, verification failures, a job's events,
reads through a real FUSE mount), ``swarm serve`` counts what it served, and
a slow job queue cannot hold a scrape; a node's VMs (a real qemu on a blank
disk, no guest) show by state, outcome, cores and back-off."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from cvmfs_like.exceptions import ObjectVerificationError
from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from runner.confine import Confinement
from runner.service import JobService
from swarm.config import render_config
from swarm.metrics import JobsReader, NodeSnapshot, OriginMeters, node_families
from swarm.status import RangeReport, SiteReport, VmReport, VmsReport
from swarm_testing.waiting import eventually, eventually_async
from tests.harness import NodeProcess, OriginServer, unmount_all
from tests.runner.test_service import fixed_lease, spec_text
from tests.swarm.test_node import REPO, Site, read_file, running
from tests.vm.test_vm_service import IMAGE, lease_for, service
from trust.keys import init_keys
from vm.config import ImageName, VmRequest
from vm.exceptions import QemuError
from vm.manager import ImageLookup

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scrape(base: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


def test_node_metrics_show_the_published_revision_bytes_received_and_the_cache(
    site: Site,
) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            base = f"http://127.0.0.2:{a.api_port}"
            before = await scrape(base)  # no token: read-only and open
            assert value(before, "swarm_repository_revision", repository=REPO) == 1
            published = a.repo_status(REPO).published
            assert published is not None
            assert (
                value(before, "swarm_repository_published_timestamp_seconds", repository=REPO)
                == published
            )
            expiry = value(
                before, "swarm_metadata_expiry_timestamp_seconds", repository=REPO, role="timestamp"
            )
            assert time.time() < expiry < time.time() + 400 * 86400
            quota = a.repo_status(REPO).cache.quota
            assert value(before, "swarm_cache_quota_bytes", repository=REPO) == quota

            want = (site.src / "large.bin").read_bytes()
            assert await asyncio.to_thread(read_file, a.namespace, f"{REPO}/large.bin") == want
            st = a.repo_status(REPO)

            async def received_it() -> bool:
                after = await scrape(base)
                # the fake swarm's only holder of the release is the origin's web seed
                return value(after, "swarm_received_bytes_total", source="web_seed") >= len(want)

            await eventually_async("the bytes received to show", received_it, 10)
            after = await scrape(base)
            assert value(after, "swarm_cache_used_bytes", repository=REPO) >= len(want)
            assert value(after, "swarm_cache_misses_total", repository=REPO) == st.cache.misses
            assert value(after, "swarm_cache_misses_total", repository=REPO) > value(
                before, "swarm_cache_misses_total", repository=REPO
            )
            fetched = value(after, "swarm_objects_fetched_total", repository=REPO, source="swarm")
            assert fetched == st.objects_from_swarm > 0
            # every object fetched from the swarm was timed
            fetch_count = value(after, "swarm_object_fetch_seconds_count", source="swarm")
            assert fetch_count == st.objects_from_swarm
            assert value(after, "swarm_object_fetch_seconds_bucket", source="swarm", le="+Inf") == (
                fetch_count
            )
            assert value(after, "swarm_verification_failures_total", repository=REPO) == 0

            # a new revision published and refreshed shows at once
            (site.src / "NEW").write_bytes(b"two\n")
            site.publish()
            await a.refresh(REPO)
            assert value(await scrape(base), "swarm_repository_revision", repository=REPO) == 2

    asyncio.run(main())


def test_bytes_that_fail_verification_are_counted(site: Site) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            await asyncio.to_thread(read_file, a.namespace, f"{REPO}/large.bin")
            async with running(site.node(1, bootstrap=(0,))) as b:
                await asyncio.to_thread(read_file, b.namespace, f"{REPO}/bin/hello")
                base = f"http://127.0.0.3:{b.api_port}"
                assert value(await scrape(base), "swarm_peers") >= 1
                site.world.sessions[0].corrupt = True
                site.world.verify_pieces = False
                with pytest.raises(ObjectVerificationError):
                    await asyncio.to_thread(read_file, b.namespace, f"{REPO}/large.bin")
                got = await scrape(base)
                assert value(got, "swarm_verification_failures_total", repository=REPO) == 1
                assert value(got, "swarm_cache_fetch_failures_total", repository=REPO) == 1

    asyncio.run(main())


def test_objects_the_origin_delivers_when_the_swarm_stalls_count_as_origin_bytes(
    site: Site,
) -> None:
    async def main() -> None:
        async with running(site.node(0, fetch_timeout=1)) as a:
            base = f"http://127.0.0.2:{a.api_port}"
            before = await scrape(base)
            assert value(before, "swarm_received_bytes_total", source="origin") == 0
            site.world.stalled = True  # the swarm hangs: the origin takes over at 0.5 s
            want = (site.src / "bin/hello").read_bytes()
            assert await asyncio.to_thread(read_file, a.namespace, f"{REPO}/bin/hello") == want
            st = a.repo_status(REPO)
            assert st.objects_from_origin >= 1
            got = await scrape(base)
            assert value(got, "swarm_received_bytes_total", source="origin") > 0
            assert value(got, "swarm_object_fetch_seconds_count", source="origin") == (
                st.objects_from_origin
            )
            assert value(got, "swarm_object_fetch_failures_total", source="swarm") == (
                st.objects_from_origin
            )
            assert value(got, "swarm_objects_fetched_total", repository=REPO, source="origin") == (
                st.objects_from_origin
            )

    asyncio.run(main())


def test_a_jobs_committed_events_show_in_the_node_metrics(site: Site, tmp_path: Path) -> None:
    async def main() -> None:
        node = site.node(0)
        node.job_service = JobService(
            tmp_path / "queue",
            tmp_path / "work",
            fixed_lease(),
            confinement=Confinement(user=None),
            recheck=0.2,
        )
        async with running(node) as a:
            base = f"http://127.0.0.2:{a.api_port}"
            job = a.job_service.submit(spec_text("mc", max_events=20))

            async def done() -> bool:
                got = await scrape(base)
                return value(got, "swarm_jobs", state="done") == 1

            await eventually_async("the job to finish", done, 30)
            got = await scrape(base)
            report = a.job_service.job(job)["report"]
            assert value(got, "swarm_job_events_done_total") == report["events_done"] == 20
            assert value(got, "swarm_job_tasks_committed_total") == report["tasks_committed"] == 4
            assert value(got, "swarm_job_task_runs_failed_total") == 0
            assert value(got, "swarm_job_service_running") == 1
            assert value(got, "swarm_jobs", state="queued") == 0
        node.job_service.close()

    asyncio.run(main())


def test_a_slow_job_queue_does_not_hold_a_scrape() -> None:
    # The job list reads the queue directory; on a loaded disk that can take
    # long.  The scrape waits a bounded time, then uses the last list read.
    release = threading.Event()
    calls: list[float] = []

    def read() -> list[dict[str, object]]:
        calls.append(time.monotonic())
        if len(calls) > 1:
            release.wait(30)
        return [{"id": "x", "state": "queued"}]

    async def main() -> None:
        reader = JobsReader(read, wait=0.2)
        # The first read is quick, but on a loaded machine may take longer than the wait.
        await eventually_async("the first list", reader.jobs, 10)
        start = time.monotonic()
        assert await reader.jobs() == [{"id": "x", "state": "queued"}]  # the last list
        assert await reader.jobs() == [{"id": "x", "state": "queued"}]
        assert time.monotonic() - start < 5  # two waits of 0.2 s, generous slack
        assert len(calls) == 2  # one slow read at a time, not one thread per scrape
        release.set()

    asyncio.run(main())


def test_a_list_read_after_its_scrape_stopped_waiting_is_used_by_the_next_scrape() -> None:
    # Defect: such a list was thrown away, and the next scrape (which starts
    # a new read) had nothing to show while that read was slow.
    first_done = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def read() -> list[dict[str, object]]:
        calls.append(1)
        if len(calls) == 1:
            release.wait(30)
            first_done.set()
            return [{"id": "x", "state": "running"}]
        release.wait(30)
        return []

    async def main() -> None:
        reader = JobsReader(read, wait=0.1)
        assert await reader.jobs() is None  # nothing read yet
        release.set()
        await asyncio.to_thread(first_done.wait, 10)

        async def handed_back() -> bool:  # the read's thread gave its list to the loop
            return reader._task is not None and reader._task.done()

        await eventually_async("the first read to end", handed_back, 10)
        release.clear()  # the second read is slow
        assert await reader.jobs() == [{"id": "x", "state": "running"}]
        release.set()

    asyncio.run(main())


def test_a_job_queue_that_cannot_be_listed_leaves_the_last_list_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def read() -> list[dict[str, object]]:
        calls.append(1)
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        return [{"id": "x", "state": "done"}]

    async def main() -> None:
        reader = JobsReader(read, wait=5)
        assert await reader.jobs() == [{"id": "x", "state": "done"}]
        assert await reader.jobs() == [{"id": "x", "state": "done"}]

    asyncio.run(main())
    assert "the job queue could not be listed: [Errno 5] Input/output error" in caplog.text


def test_swarm_serve_counts_requests_and_bytes_served(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, REPO)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10000)
    publish(src, OriginStore(tmp_path / "store", REPO), keys)
    objects = sorted((tmp_path / "store" / REPO / "data").glob("*/*"))
    obj = objects[0]
    url_of = f"{REPO}/data/{obj.parent.name}/{obj.name}"
    with OriginServer(tmp_path / "store") as origin:

        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
            req = urllib.request.Request(origin.url + path, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, b""

        status, body = get(url_of)
        assert status == 200 and len(body) == obj.stat().st_size
        status, part = get(url_of, {"Range": "bytes=0-99"})
        assert status == 206 and len(part) == 100
        assert get(f"{REPO}/data/00/{'0' * 64}")[0] == 404
        assert get(f"{REPO}/private/x")[0] == 404
        status, text = get("metrics")
        assert status == 200
        got = parse(text.decode())
        assert value(got, "swarm_origin_requests_total", kind="data", code="200") == 1
        assert value(got, "swarm_origin_requests_total", kind="data", code="206") == 1
        assert value(got, "swarm_origin_requests_total", kind="data", code="404") == 1
        assert value(got, "swarm_origin_requests_total", kind="other", code="404") == 1
        assert value(got, "swarm_origin_sent_bytes_total", kind="data") == len(body) + 100
        assert value(got, "swarm_origin_request_seconds_count", kind="data") == 3


@pytest.mark.fuse
def test_a_read_through_the_mount_of_a_node_daemon_shows_in_its_metrics(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    root_json = init_keys(keys, REPO)
    src = tmp_path / "src"
    src.mkdir()
    data = bytes(range(256)) * 4096  # 1 MiB
    (src / "big").write_bytes(data)
    publish(src, OriginStore(tmp_path / "store", REPO), keys)
    mp, node_dir = tmp_path / "mnt", tmp_path / "node"
    with OriginServer(tmp_path / "store") as origin:
        cfg = tmp_path / "node.toml"
        cfg.write_text(
            render_config(
                {
                    "data_dir": node_dir,
                    "api": "127.0.0.1:0",
                    "listen": "127.0.0.1:0",
                    "peer": "127.0.0.1:0",
                    "dht": False,
                    "mount": mp,
                },
                {REPO: {"origin": origin.url, "trust": root_json}},
            )
        )
        node = NodeProcess(cfg, node_dir, mp, tmp_path / "node.log")
        try:
            api = json.loads((node_dir / "node.json").read_text())["api"]

            def metrics() -> Samples:
                with urllib.request.urlopen(api + "metrics", timeout=10) as r:
                    return parse(r.read().decode())

            def received(s: Samples) -> float:
                return sum(
                    value(s, "swarm_received_bytes_total", source=source)
                    for source in ("peer", "web_seed", "origin")
                )

            eventually("the mount", lambda: (mp / REPO / "big").exists(), 30)
            before = metrics()
            assert value(before, "swarm_mounted") == 1
            assert value(before, "swarm_repository_revision", repository=REPO) == 1
            assert (mp / REPO / "big").read_bytes() == data
            eventually("the bytes to show", lambda: received(metrics()) >= len(data), 15)
            after = metrics()
            assert received(after) > received(before)
            assert value(after, "swarm_cache_used_bytes", repository=REPO) >= len(data)
        except BaseException:
            print(node.log())
            raise
        finally:
            node.close()
            unmount_all(mp)


SITE = SiteReport(
    broker=["nats://127.0.0.1:4222"],
    node_name="n1",
    connected=True,
    problem=None,
    work=True,
    not_pulling=None,
    jobs=["sim"],
    running=[RangeReport("sim", 3, 17, 1, 2.0, 10.0)],
    ranges_run=7,
    ranges_reported=5,
    ranges_failed=1,
    ranges_handed_back=1,
    refused={"bad spec": 2},
    pace={"sim": 0.5},
    cores={"capacity": 4, "node": 1, "site": 2, "node_waiting": 0, "peak": 3},
)

VMS = VmsReport(
    accelerator="tcg",
    accelerator_why="configured",
    running=1,
    cores=2,
    backed_off={"r.example.org/bad/1": 300.0},
    vms=[
        VmReport("a", "r.example.org/good/1", "running", 2, 1 << 30, 1.0, started=2.0),
        VmReport("b", "r.example.org/good/1", "stopped", 1, 1 << 30, 1.0, code=200, outcome="ok"),
    ],
)

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> set[str]:
    """Series names in docs/NODE.md's metrics tables."""
    text = (ROOT / "docs" / "NODE.md").read_text()
    section = text[text.index("## Metrics (Prometheus)") :]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `swarm_"):
            names |= set(re.findall(r"`(swarm_\w+)`", line.split("|")[1]))
    return names


def test_site_series_documented_series_and_the_dashboard_agree(site: Site) -> None:
    # node_families is pure: a real node's status with a site report as the
    # site service gives it (sitejob.service), every series there is.
    async def main() -> list[Metric]:
        async with running(site.node(0)) as a:
            snap = NodeSnapshot(
                dataclasses.replace(a.status(), site=SITE, vms=VMS),
                a.peers(),
                0.0,
                [],
                True,
                time.time(),
            )
            return [*node_families(snap), *a.meters.collect()]

    families = asyncio.run(main())
    samples: Samples = {}
    for f in families:
        for s in f.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert value(samples, "swarm_site_connected") == 1
    assert value(samples, "swarm_site_ranges_running") == 1
    assert value(samples, "swarm_site_ranges_run_total") == 7
    assert value(samples, "swarm_site_ranges_reported_total") == 5
    assert value(samples, "swarm_site_ranges_failed_total") == 1
    assert value(samples, "swarm_site_ranges_handed_back_total") == 1
    assert value(samples, "swarm_site_ranges_refused_total", reason="bad spec") == 2
    assert value(samples, "swarm_site_cores", kind="site") == 2
    assert value(samples, "swarm_vms", state="running") == 1
    assert value(samples, "swarm_vms", state="migrated") == 0  # every state, 0 too
    assert value(samples, "swarm_vm_outcomes_total", code="200") == 1
    assert value(samples, "swarm_vm_outcomes_total", code="none") == 0
    assert value(samples, "swarm_vm_cores") == 2
    assert value(samples, "swarm_vm_backoff_seconds", image="r.example.org/bad/1") == 300

    origin = OriginMeters().registry.collect()
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in [*families, *origin]}
    documented = _documented()
    assert exported == documented, (exported - documented, documented - exported)
    dashboard = json.loads((ROOT / "contrib" / "grafana" / "swarm-node.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    read = {
        re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"swarm_\w+", e)
    }
    assert read <= documented, read - documented
    assert {n for n in documented if any(k in n for k in ("site", "job", "origin", "vm"))} <= read


@pytest.mark.qemu
def test_a_nodes_vms_show_by_state_outcome_cores_back_off_and_heartbeat(
    site: Site, tmp_path: Path
) -> None:
    # A real qemu booting a blank disk: no agent ever says HELLO, so after
    # boot_seconds the node destroys it (700 heartbeat, an abort, a back-off).
    async def main() -> None:
        node = site.node(0)
        svc = service(tmp_path, lease_for(3600), boot_seconds=8, backoff_seconds=600)
        node.vms = svc
        async with running(node) as a:
            base = f"http://127.0.0.2:{a.api_port}"
            vm = await svc.start_vm(VmRequest(IMAGE, cores=1))
            got = await scrape(base)
            assert value(got, "swarm_vms", state="running") == 1
            assert value(got, "swarm_vm_cores") == 1
            assert value(got, "swarm_vm_memory_bytes") == vm.memory == 32 << 20
            assert value(got, "swarm_vm_accelerator", accelerator="tcg") == 1
            assert 0 <= value(got, "swarm_vm_heartbeat_age_seconds", vm=vm.id) < 8
            assert value(got, "swarm_vm_outcomes_total", code="700") == 0

            await asyncio.wait_for(svc.vms[vm.id].done.wait(), 60)
            got = await scrape(base)
            assert value(got, "swarm_vms", state="running") == 0
            assert value(got, "swarm_vms", state="stopped") == 1
            assert value(got, "swarm_vm_outcomes_total", code="700") == 1
            assert value(got, "swarm_vm_aborts_total") == 1
            assert value(got, "swarm_vm_cores") == 0
            assert 0 < value(got, "swarm_vm_backoff_seconds", image=str(IMAGE)) <= 600
            assert not [k for k in got if k[0] == "swarm_vm_heartbeat_age_seconds"]

            # An image whose base cannot be read: qemu-img fails, the VM is a failed start.
            svc.find_image = lambda image: ImageLookup(tmp_path / "missing.img", "raw")
            with pytest.raises(QemuError):
                await svc.start_vm(VmRequest(ImageName("r.example.org", "other", "1")))
            got = await scrape(base)
            assert value(got, "swarm_vms", state="failed") == 1
            assert value(got, "swarm_vm_outcomes_total", code="none") == 0  # it never ran

    asyncio.run(main())


def test_a_node_without_vms_has_no_vm_series(site: Site) -> None:
    async def main() -> None:
        async with running(site.node(0)) as a:
            got = await scrape(f"http://127.0.0.2:{a.api_port}")
            assert not [k for k in got if k[0].startswith("swarm_vm")]

    asyncio.run(main())
