"""The dashboard page in a real headless browser (Debian's chromium, driven
by Selenium through chromium-driver) against a real node daemon with a
published repository, a FUSE mount and its job service: the page loads
without a console error, shows the figures the JSON API gives, follows a
transfer as it progresses, draws finished jobs in the masonry chart, and
sends an action only with the token the person typed; and, over the real
API application with a stand-in node, shows a hostile peer's client name as
text; a node's site jobs (a real nats-server) in their table; and a node
daemon's VMs, from the records it keeps (a guest's outcome text as text)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from runner.vm_jobs import done_report
from swarm.api import NodeView, make_api_app
from swarm.config import render_config
from swarm.release_torrent import torrent_extension
from swarm.status import NodeStatus, PeerReport, VmReport, to_json
from swarm_testing.broker import local_broker
from swarm_testing.waiting import eventually
from tests.conftest import CHROMEDRIVER, CHROMIUM
from tests.harness import NodeProcess, OriginServer, unmount_all
from tests.trees import build_sample_tree
from trust.keys import init_keys

pytestmark = pytest.mark.chromium
REPO = "sw.example.org"
JOB = """
name = "mc-sim"
command = ["/bin/true", "{first}", "{count}", "{output}"]
cpu_work_per_event = 0.01
max_events = 20
min_events = 10
events_per_task = 10
"""


class Node:
    """A published repository, its origin, and ``swarm node`` serving it."""

    def __init__(self, tmp: Path) -> None:
        keys = tmp / "keys"
        root_json = init_keys(keys, REPO)
        store = OriginStore(tmp / "store", REPO)
        self.src = build_sample_tree(tmp / "src", large_mib=2)
        publish(self.src, store, keys, nest_threshold=8, extend_target=torrent_extension(store))
        self.origin = OriginServer(tmp / "store").start()
        self.data, self.mount = tmp / "data", tmp / "mnt"
        config = tmp / "node.toml"
        config.write_text(
            f"""
data_dir = "{self.data}"
api = "127.0.0.1:0"
listen = "127.0.0.1:0"
peer = "127.0.0.1:0"
dht = false
mount = "{self.mount}"
[repositories."{REPO}"]
origin = "{self.origin.url}"
trust = "{root_json}"
[runner]
cores = 1
power_per_core = 10.0
time_left = 3600
cgroup_parent = ""
"""
        )
        try:
            self.proc = NodeProcess(config, self.data, self.mount, tmp / "node.log")
        except BaseException:
            self.origin.close()
            raise
        self.url = json.loads((self.data / "node.json").read_text())["api"].rstrip("/")
        self.token = (self.data / "api.token").read_text().strip()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes) -> Any:
        req = urllib.request.Request(
            self.url + path, data=body, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        try:
            self.proc.close()
        finally:
            unmount_all(self.mount)
            self.origin.close()


@pytest.fixture
def node(open_dir: Path) -> Iterator[Node]:
    n = Node(open_dir)  # the job user (nobody, when root) reaches its work dir
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="swarm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = None
    try:
        # An explicit driver: Selenium Manager never tries to download one.
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        driver.set_page_load_timeout(20)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def shown(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


@pytest.mark.fuse
def test_the_page_shows_the_nodes_figures_and_follows_a_transfer(node: Node, browser: Any) -> None:
    browser.get(node.url + "/")  # redirected to /dashboard
    assert browser.current_url.endswith("/dashboard")
    revision = eventually(
        "the page to show the repository's revision",
        lambda: shown(
            browser,
            f"const e = document.querySelector('.revision[data-repo=\"{REPO}\"]');"
            "return e && e.textContent;",
        ),
        15,
    )
    assert revision == str(node.get(f"/v1/repositories/{REPO}")["revision"]) == "1"

    transfers = node.get("/v1/transfers")
    assert transfers and transfers[0]["what"] == "revision 1"
    info_hash = transfers[0]["info_hash"]
    held = f"document.querySelector('.held[data-info-hash=\"{info_hash}\"]')"
    before = eventually(  # the page's figure is the API's (nothing is read meanwhile)
        "the page to show the transfer's bytes as the API does",
        lambda: (
            (n := int(shown(browser, f"return {held}.dataset.done")))
            == node.get("/v1/transfers")[0]["total_done"]
            and str(n)
        ),
        15,
    )
    before = int(before)
    peers = node.get("/v1/peers")
    rows = shown(browser, "return document.querySelectorAll('#peers tr').length")
    assert rows == 1 + max(1, len(peers))  # a header, then one row per peer (or "none")
    for p in peers:
        assert p["address"] in browser.find_element("id", "peers").text

    # Reading a file through the mount fetches its pieces: the page follows.
    want = (node.src / "large.bin").read_bytes()
    assert (node.mount / REPO / "large.bin").read_bytes() == want
    after = eventually(
        "the page to show the transfer's progress",
        lambda: (n := int(shown(browser, f"return {held}.dataset.done"))) > before and n,
        15,
    )
    assert after >= before + len(want) // 2
    assert after <= node.get("/v1/transfers")[0]["total_done"]
    assert console_errors(browser) == []


@pytest.mark.fuse
def test_finished_jobs_fill_the_masonry_chart_and_actions_need_the_typed_token(
    node: Node, browser: Any
) -> None:
    job = node.post("/v1/jobs", JOB.encode())
    done = eventually(
        "the job to finish",
        lambda: (j := node.get(f"/v1/jobs/{job['id']}"))["state"] == "done" and j,
        20,
    )
    report = done["report"]
    assert report["started_at"] <= report["ended_at"]

    browser.get(node.url + "/dashboard")
    block = f"document.querySelector('#masonry rect.job[data-job=\"{job['id']}\"]')"
    eventually(
        "the job's block in the masonry chart", lambda: shown(browser, f"return !!{block}"), 15
    )
    x = shown(browser, f"return +{block}.getAttribute('x')")
    unused = "document.querySelector('#masonry rect.unused')"
    ux, uw = shown(
        browser, f"const u = {unused}; return [+u.getAttribute('x'), +u.width.baseVal.value];"
    )
    # The job early in the timeline, then the unused rest of a 1 h lease up to its end (x = 800).
    assert 0 <= x <= ux < 400 and ux + uw == pytest.approx(800, abs=0.2)
    lease = node.get("/dashboard/lease.json")["lease"]
    assert lease["cores"] == 1 and 3000 < lease["time_left"] <= 3600

    refresh = browser.find_element("css selector", "#repositories button")
    refresh.click()  # no token typed: nothing is sent
    assert "enter the API token" in browser.find_element("id", "action").text
    browser.find_element("id", "token").send_keys(node.token)
    refresh.click()
    eventually(
        "the refresh's answer",
        lambda: f"{REPO}: revision 1" in browser.find_element("id", "action").text,
        15,
    )
    assert node.token not in browser.page_source  # typed, kept in memory, never in the page
    assert console_errors(browser) == []


SLOW_JOB = """
name = "slow-sim"
command = ["/bin/sh", "-c", "sleep 20; : > \\"$3\\"", "sh", "{first}", "{count}", "{output}"]
cpu_work_per_event = 0.01
max_events = 20
min_events = 10
events_per_task = 10
"""


@pytest.mark.fuse
def test_a_running_job_is_a_growing_block_in_the_masonry_chart(node: Node, browser: Any) -> None:
    job = node.post("/v1/jobs", SLOW_JOB.encode())
    running = eventually(
        "the job to run",
        lambda: (j := node.get(f"/v1/jobs/{job['id']}"))["state"] == "running" and j,
        20,
    )
    assert time.time() - 20 < running["started_at"] <= time.time()

    browser.get(node.url + "/dashboard")
    block = f"document.querySelector('#masonry rect.job.running[data-job=\"{job['id']}\"]')"
    eventually(
        "the running job's block in the masonry chart",
        lambda: shown(browser, f"return !!{block}"),
        15,
    )
    width = f"return {block}.width.baseVal.value"
    first = shown(browser, width)
    eventually(  # the page polls every 2 s; the block ends at "now" each time
        "the running job's block to grow",
        lambda: (w := shown(browser, width)) > first and w,
        15,
    )
    unused = "document.querySelector('#masonry rect.unused')"
    x, w = shown(
        browser, f"const b = {block}; return [+b.getAttribute('x'), b.width.baseVal.value];"
    )
    ux = shown(browser, f"return +{unused}.getAttribute('x')")
    assert x + w == pytest.approx(ux, abs=1.0)  # the unused rest starts where the job is now
    assert node.get(f"/v1/jobs/{job['id']}")["state"] == "running"
    assert console_errors(browser) == []


HOSTILE = '<img src="x" onerror="window.pwned = 1"><b id="injected">x</b>'


class HostilePeerNode:
    """A stand-in node (swarm.api.NodeView) one of whose peers named its
    client with markup: a peer chooses its client string."""

    job_service = None

    def check_token(self, presented: str | None) -> bool:
        return False

    def repo_names(self) -> list[str]:
        return []

    def status(self) -> NodeStatus:
        return NodeStatus(
            pid=1, uptime=5.0, listen="127.0.0.1:6881", api="127.0.0.1:7000",
            peer="127.0.0.1:6880", mount=None, mounted=False, bootstrap=[], session={},
            banned=[], repositories={}, transfers=[],
        )  # fmt: skip

    def peers(self) -> list[PeerReport]:
        return [PeerReport("127.0.0.9:6881", HOSTILE, 1, 10, 20)]

    def images(self) -> list[Any]:
        return []

    def transfers(self) -> list[Any]:
        return []

    def cache(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def hostile_api() -> Iterator[str]:
    """The real API application over :class:`HostilePeerNode`, on 127.0.0.1."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(make_api_app(cast(NodeView, HostilePeerNode())), access_log=None)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        return int(server.sockets[0].getsockname()[1])

    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_peers_client_name_with_markup_is_shown_as_text_never_run(
    hostile_api: str, browser: Any
) -> None:
    browser.get(hostile_api + "/dashboard")
    eventually(
        "the peer's row",
        lambda: "127.0.0.9:6881" in browser.find_element("id", "peers").text,
        15,
    )
    assert HOSTILE in browser.find_element("id", "peers").text  # the characters, as text
    assert shown(browser, "return document.getElementById('injected')") is None
    assert shown(browser, "return window.pwned === undefined") is True
    assert console_errors(browser) == []


@pytest.mark.nats
def test_a_nodes_site_jobs_are_shown(open_dir: Path, browser: Any) -> None:
    with local_broker(open_dir) as (server, site):
        assert site.token_file is not None
        data = open_dir / "node"
        cfg = open_dir / "node.toml"
        settings: dict[str, object] = {
            "data_dir": data,
            "api": "127.0.0.1:0",
            "listen": "127.0.0.1:0",
            "peer": "127.0.0.1:0",
            "dht": False,
        }
        cfg.write_text(
            render_config(settings, {})
            + "\n[runner]\ncores = 1\npower_per_core = 10.0\ntime_left = 600\n"
            + f"\n[site]\nnats = {json.dumps(server.url)}\n"
            + f"token_file = {json.dumps(str(site.token_file))}\nwork = false\n"
        )
        with NodeProcess(cfg, data, None, open_dir / "node.log"):
            url = json.loads((data / "node.json").read_text())["api"].rstrip("/")
            token = (data / "api.token").read_text().strip()

            def status() -> Any:
                with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
                    return json.loads(r.read())

            eventually("the node to reach its broker", lambda: status()["site"]["connected"], 20)
            spec = 'name = "mc"\ncommand = ["/bin/true", "{first}", "{count}", "{output}"]\n'
            spec += "cpu_work_per_event = 1.0\nmax_events = 30\nevents_per_task = 10\n"
            req = urllib.request.Request(
                url + "/v1/site-jobs",
                data=spec.encode(),
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                job = json.loads(r.read())
            browser.get(url + "/dashboard")
            row = eventually(
                "the site job's row",
                lambda: next(
                    (
                        tr.text
                        for tr in browser.find_elements("css selector", "#site-jobs tr")
                        if job["id"] in tr.text
                    ),
                    None,
                ),
                15,
            )
            assert " mc " in f" {row} " and "/ 30" in row
            assert console_errors(browser) == []


def test_a_nodes_vms_are_listed_and_a_guests_outcome_text_is_never_markup(
    tmp_path: Path, browser: Any
) -> None:
    # The records a node keeps under DATA_DIR/vms (as vm.manager writes them),
    # loaded by the daemon at its start: a VM whose guest ended with a
    # shutdown_message carrying markup (printable ASCII: the guest's choice),
    # a failed start, and one a killed node left "running".
    data = tmp_path / "data"
    t = time.time() - 600
    records = [
        VmReport("20261201-070000-aaaaaa", "vm.example.org/guest/1", "stopped", 2, 256 << 20, t,
                 accelerator="tcg", started=t + 1, ends=t + 3600, stopped=t + 60, code=200,
                 outcome=HOSTILE),
        VmReport("20261201-070100-bbbbbb", "vm.example.org/guest/1", "failed", 1, 128 << 20, t,
                 error="cannot run /nonexistent/qemu-system: No such file or directory"),
        VmReport("20261201-070200-cccccc", "vm.example.org/other/2", "running", 1, 128 << 20, t,
                 accelerator="tcg", started=t + 2, ends=t + 7200),
    ]  # fmt: skip
    for r in records:
        (data / "vms" / r.id).mkdir(parents=True)
        (data / "vms" / r.id / "record.json").write_text(json.dumps(to_json(r)))
    # The first VM as a VM job of the node's queue, done (as runner.vm_jobs files it).
    done = data / "jobs" / "queue" / "done"
    done.mkdir(parents=True)
    job_id = "20261201-070000.000-abcdef"
    spec = 'name = "vm-job"\n[vm]\nimage = "vm.example.org/guest/1"\n'
    (done / f"{job_id}.toml").write_text(spec)
    report = done_report(f"{job_id}.toml", records[0].id, to_json(records[0]))
    (done / f"{job_id}.report.json").write_text(json.dumps(report))
    cfg = tmp_path / "node.toml"
    settings: dict[str, object] = {
        "data_dir": data,
        "api": "127.0.0.1:0",
        "listen": "127.0.0.1:0",
        "peer": "127.0.0.1:0",
        "dht": False,
    }
    cfg.write_text(
        render_config(settings, {})
        + "\n[runner]\ncores = 1\npower_per_core = 10.0\ntime_left = 3600\n"
        + '\n[vm]\naccelerator = "tcg"\n'
    )
    with NodeProcess(cfg, data, None, tmp_path / "node.log"):
        url = json.loads((data / "node.json").read_text())["api"].rstrip("/")
        with urllib.request.urlopen(url + "/v1/vms", timeout=10) as r:
            vms = {v["id"]: v for v in json.loads(r.read())}
        assert vms.keys() == {r.id for r in records}

        browser.get(url + "/dashboard")

        def row(vm_id: str) -> str:
            return str(
                shown(
                    browser,
                    f"const e = document.querySelector('#vms .vm[data-vm=\"{vm_id}\"]');"
                    "return e ? e.closest('tr').innerText : '';",
                )
            )

        stopped = eventually("the VMs' rows", lambda: row(records[0].id), 15)
        cells = stopped.split("\t")
        assert cells[:6] == [records[0].id, "vm.example.org/guest/1", "stopped", "tcg", "2",
                             "268.4 MB"]  # fmt: skip
        assert cells[6].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t + 1)))
        assert cells[7].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t + 3600)))
        assert cells[8] == f"200 {HOSTILE}"  # the guest's characters, as text
        assert shown(browser, "return document.getElementById('injected')") is None
        assert shown(browser, "return window.pwned === undefined") is True
        failed = row(records[1].id)
        assert "\tfailed\t" in failed and "cannot run /nonexistent/qemu-system" in failed
        left = row(records[2].id)
        assert "\tstopped\t" in left and "the node daemon stopped while it ran" in left
        assert vms[records[2].id]["outcome"] == "the node daemon stopped while it ran"
        summary = browser.find_element("id", "vms-summary").text
        assert summary.startswith("0 running, 0 cores held; accelerator not chosen yet")

        # The VM job: a block of the masonry chart and a row of the jobs table, as text.
        block = f"document.querySelector('#masonry rect.job[data-job=\"{job_id}\"]')"
        title = eventually(
            "the VM job's block",
            lambda: shown(browser, f"const b = {block}; return b ? b.textContent : '';"),
            15,
        )
        assert title.startswith(f"vm-job: VM {records[0].id}, 200 {HOSTILE}, 59.0 s"), title
        job_row = shown(
            browser,
            "return [...document.querySelectorAll('#jobs tr')].map(r => r.innerText)"
            f".find(t => t.startsWith('{job_id}')) || '';",
        )
        assert job_row.split("\t")[1:5] == ["vm-job", "done", f"VM {records[0].id}", "59.0"]
        assert job_row.split("\t")[5] == f"200 {HOSTILE}"
        assert shown(browser, "return document.getElementById('injected')") is None
        assert console_errors(browser) == []
