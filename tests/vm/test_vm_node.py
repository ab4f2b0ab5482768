"""VMs on a real node daemon: the test guest image published as a signed image,
streamed into the node's FUSE mount, booted under qemu (TCG), talking the
Vacuum contract with the node (docs/VMS.md).

Boots are few (each ~10-20 s under software emulation on a loaded machine)
and checks are combined per boot. Every qemu a node started is ended by the
node; a test's finally also kills, by its recorded PID, any qemu a record
still names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.config import render_config
from swarm_testing.guest_image import GuestImage, build_guest_image
from swarm_testing.waiting import eventually
from tests.harness import NodeProcess, OriginServer
from trust.keys import init_keys

pytestmark = [pytest.mark.qemu, pytest.mark.fuse, pytest.mark.timeout(240)]

REPO = "vm.example.org"
IMAGE = f"{REPO}/guest/1"
BOOT = 90.0  # s for a VM to boot and do a small thing under TCG on a loaded machine
PAYLOAD = b'#!/bin/sh\necho "payload $((6 * 7)) from the swarm"\n'


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest_image()


@dataclass
class VmNode:
    node: NodeProcess
    config: Path
    data_dir: Path
    mjf: Path

    @property
    def base(self) -> str:
        return str(json.loads((self.data_dir / "node.json").read_text())["api"])

    def api(self, method: str, path: str, body: Any = None, *, token: bool = True,
            timeout: float = 60) -> tuple[int, Any]:  # fmt: skip
        """A JSON body, or a str sent as it is (a TOML job spec)."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + (self.data_dir / "api.token").read_text().strip()
        data = None if body is None else json.dumps(body).encode()
        if isinstance(body, str):
            data, headers["Content-Type"] = body.encode(), "application/toml"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def vm(self, vm_id: str) -> dict[str, Any]:
        status, doc = self.api("GET", f"v1/vms/{vm_id}")
        assert status == 200, doc
        return dict(doc)

    def wait(self, vm_id: str, what: str, check: Any, timeout: float = BOOT) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            v = self.vm(vm_id)
            return v if check(v) else None

        return eventually(f"vm {vm_id}: {what}", probe, timeout, interval=0.5)

    def start(self, user_data: str, **kw: Any) -> dict[str, Any]:
        status, doc = self.api("POST", "v1/vms", {"image": IMAGE, "user_data": user_data, **kw})
        assert status == 201, doc
        return dict(doc)

    def swarm(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "swarm", *argv],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def output(self, vm_id: str, name: str) -> bytes:
        return (self.data_dir / "vms" / vm_id / "joboutputs" / name).read_bytes()


def qemu_pids(data_dir: Path) -> list[int]:
    """PIDs of live processes whose working directory is a VM directory of the node."""
    root = str((data_dir / "vms").resolve())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(root + "/"):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture
def vm_node(
    tmp_path: Path, guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """A factory: a node daemon following REPO (a release with bin/payload, the
    guest image and an ISO the site policy refuses), its lease's shutdowntime in
    a MACHINEFEATURES directory the test may change."""
    keys = tmp_path / "keys"
    root_json = init_keys(keys, REPO)
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "payload").write_bytes(PAYLOAD)
    (src / "bin" / "payload").chmod(0o755)
    store = tmp_path / "store"
    publish(src, OriginStore(store, REPO), keys)
    iso = tmp_path / "refused.iso"
    iso.write_bytes(b"\0" * 0x8001 + b"CD001" + b"\0" * 4000)
    for path, name in ((guest_image.path, "guest"), (iso, "refused")):
        subprocess.run(
            [sys.executable, "-m", "swarm", "image", "publish", str(path), "--name", name,
             "--version", "1", "--repo", REPO, "--keys", str(keys), "--store", str(store),
             "--quiet"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    mjf = tmp_path / "mjf"
    mjf.mkdir()
    (mjf / "shutdowntime").write_text(str(int(time.time()) + 3000))
    monkeypatch.setenv("MACHINEFEATURES", str(mjf))
    nodes: list[VmNode] = []
    with OriginServer(store) as origin:

        def make(policy: dict[str, Any] | None = None, **vm: Any) -> VmNode:
            data_dir = tmp_path / f"node{len(nodes)}"
            mp = tmp_path / f"mnt{len(nodes)}"
            config = tmp_path / f"node{len(nodes)}.toml"
            config.write_text(
                render_config(
                    {
                        "data_dir": data_dir,
                        "api": "127.0.0.1:0",
                        "listen": "127.0.0.1:0",
                        "peer": "127.0.0.1:0",
                        "dht": False,
                        "mount": mp,
                        "runner": {"cores": 2, "power_per_core": 10.0, "time_left": 3600},
                        "image_policy": policy or {"formats": ["raw"]},
                        "vm": {"accelerator": "tcg", "grace": 10, "memory": "128M", **vm},
                    },
                    {REPO: {"origin": origin.url, "trust": root_json}},
                )
            )
            node = NodeProcess(config, data_dir, mp, tmp_path / f"node{len(nodes)}.log")
            nodes.append(VmNode(node, config, data_dir, mjf))
            return nodes[-1]

        try:
            yield make
        finally:
            for n in nodes:
                n.node.close()
                for pid in qemu_pids(n.data_dir):  # a node must leave none; never leak one
                    os.kill(pid, signal.SIGKILL)


WORK = f"""#!/bin/sh
cat $MACHINEFEATURES/shutdowntime > $JOBOUTPUTS/mjf_shutdowntime
cat $JOBFEATURES/allocated_cpu > $JOBOUTPUTS/mjf_allocated_cpu
cat $JOBFEATURES/max_rss_bytes > $JOBOUTPUTS/mjf_max_rss_bytes
touch $JOBOUTPUTS/vm-heartbeat
sh $SWARM_SOFTWARE/{REPO}/bin/payload > $JOBOUTPUTS/result
echo "200 Success" > $JOBOUTPUTS/shutdown_message
"""

LOOP = """#!/bin/sh
while true; do
  cat $MACHINEFEATURES/shutdowntime > $JOBOUTPUTS/shutdowntime
  touch $JOBOUTPUTS/vm-heartbeat
  sleep 1
done
"""


def test_a_guest_runs_software_from_the_mount_cannot_migrate_holding_it_and_stops_on_demand(
    vm_node: Any,
) -> None:
    n: VmNode = vm_node()
    shutdowntime = (n.mjf / "shutdowntime").read_text()

    # Bad input and refusals first: each one line, nothing started.
    status, doc = n.api("POST", "v1/vms", {"image": f"{REPO}/refused/1"})
    assert status == 409 and "format iso is not allowed" in doc["error"], doc
    status, doc = n.api("POST", "v1/vms", {"image": f"{REPO}/nothing/1"})
    assert status == 409 and "unknown image" in doc["error"], doc
    status, doc = n.api("POST", "v1/vms", {"image": "../x/y"})
    assert status == 400 and doc["error"].startswith("image:"), doc
    status, doc = n.api("POST", "v1/vms", {"image": IMAGE, "memory": "lots"})
    assert status == 400 and doc["error"].startswith("memory:"), doc
    status, doc = n.api("POST", "v1/vms", {"image": IMAGE, "cores": 3})
    assert status == 409 and "3 cores asked, 2 free" in doc["error"], doc
    status, doc = n.api("POST", "v1/vms", {"image": IMAGE}, token=False)
    assert status == 401
    r = n.swarm("vm", "start", f"{REPO}/refused/1", "--config", str(n.config))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not allowed" in r.stderr
    assert n.api("GET", "v1/vms") == (200, [])
    assert not (n.data_dir / "vms").exists() or not any((n.data_dir / "vms").iterdir())

    work = n.start(WORK)
    assert work["state"] == "running" and work["accelerator"] == "tcg"
    loop_file = n.data_dir.parent / "loop.sh"
    loop_file.write_text(LOOP)
    r = n.swarm("vm", "start", IMAGE, "--config", str(n.config), "--user-data", str(loop_file),
                "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    loop = json.loads(r.stdout)
    status, doc = n.api("POST", "v1/vms", {"image": IMAGE})
    assert status == 409 and "1 cores asked, 0 free" in doc["error"]  # never overcommitted

    done = n.wait(work["id"], "stopped by itself", lambda v: v["state"] == "stopped")
    assert (done["code"], done["outcome"], done["aborted"]) == (200, "Success", False), done
    assert n.output(work["id"], "result") == b"payload 42 from the swarm\n"
    assert n.output(work["id"], "mjf_shutdowntime").decode().strip() == shutdowntime
    assert n.output(work["id"], "mjf_allocated_cpu") == b"1"
    assert n.output(work["id"], "mjf_max_rss_bytes") == str(128 << 20).encode()
    assert done["agent"] == "1" and done["last_heartbeat"] is not None
    assert set(done["outputs"]) >= {"result", "shutdown_message", "vm-heartbeat"}
    assert not (Path(done["dir"]) / "disk.qcow2").exists()  # the overlay goes with the VM

    n.wait(loop["id"], "a heartbeat", lambda v: v["last_heartbeat"] is not None)
    # Its guest holds the software mount (9p): qemu 7.2 cannot migrate it, and
    # `swarm vm migrate` says so in one line before any destination starts anything.
    r = n.swarm("vm", "migrate", loop["id"], "--config", str(n.config), "--to", str(n.config))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"VM {loop['id']} cannot migrate now" in r.stderr, r.stderr
    assert "software mount (9p) mounted" in r.stderr and "VirtFS" in r.stderr, r.stderr
    assert n.vm(loop["id"])["state"] == "running"
    assert len(n.api("GET", "v1/vms")[1]) == 2  # no VM waits for it anywhere
    r = n.swarm("vm", "stop", loop["id"], "--config", str(n.config), "--grace", "20")
    assert r.returncode == 0, r.stderr
    assert "100 Shutdown as requested by the host" in r.stdout
    stopped = n.vm(loop["id"])
    assert (stopped["state"], stopped["code"], stopped["aborted"]) == ("stopped", 100, False)
    assert qemu_pids(n.data_dir) == []

    # A moved shutdowntime reaches the running guest's MJF in place; SIGTERM
    # stops it with the grace, and the node leaves no qemu behind.
    third = n.start(LOOP)
    n.wait(third["id"], "its MJF", lambda v: "shutdowntime" in v["outputs"])
    later = str(int(time.time()) + 2000)
    (n.mjf / "shutdowntime").write_text(later)
    eventually(
        "the new shutdowntime in the guest",
        lambda: n.output(third["id"], "shutdowntime").decode().strip() == later,
        30,
    )
    assert n.vm(third["id"])["ends"] <= int(later)
    r = n.swarm("status", "--config", str(n.config))
    assert f"vm {third['id']} {IMAGE}: running" in r.stdout, r.stdout
    n.node.proc.send_signal(signal.SIGTERM)
    assert n.node.proc.wait(timeout=60) == 0
    assert qemu_pids(n.data_dir) == []
    record = json.loads((n.data_dir / "vms" / third["id"] / "record.json").read_text())
    assert (record["state"], record["code"]) == ("stopped", 100), record


def test_a_stale_heartbeat_is_700_a_fizzle_and_a_malformed_message_abort_and_back_off(
    vm_node: Any,
) -> None:
    n: VmNode = vm_node(heartbeat_seconds=6, fizzle_seconds=200, backoff_seconds=600)
    silent = n.start("#!/bin/sh\nsleep 600\n")  # never touches vm-heartbeat
    fizzle = n.start("#!/bin/sh\necho '2OO done' > $JOBOUTPUTS/shutdown_message\n")

    fz = n.wait(fizzle["id"], "stopped by itself", lambda v: v["state"] == "stopped")
    assert fz["code"] is None and fz["aborted"] and fz["fizzled"], fz
    assert "malformed shutdown_message" in fz["outcome"]
    assert "2OO done" in (fz["message_problem"] or "")
    status, doc = n.api("POST", "v1/vms", {"image": IMAGE})
    assert status == 409 and "backed off" in doc["error"], doc

    # A site that does not accept the publisher starts nothing, saying why.
    refusing: VmNode = vm_node(policy={"accept": []})
    status, doc = refusing.api("POST", "v1/vms", {"image": IMAGE})
    assert status == 409 and "not accepted for images by the site policy" in doc["error"], doc
    assert refusing.api("GET", "v1/vms") == (200, []) and qemu_pids(refusing.data_dir) == []

    st = n.wait(silent["id"], "destroyed", lambda v: v["state"] == "stopped")
    assert (st["code"], st["outcome"], st["aborted"]) == (700, "heartbeat", True), st
    assert st["booted"] is not None and st["stopped"] - st["booted"] < 6 + 20
    _, nodestatus = n.api("GET", "v1/status")
    assert IMAGE in nodestatus["vms"]["backed_off"]
    assert qemu_pids(n.data_dir) == []


VM_JOB = f"""#!/bin/sh
touch $JOBOUTPUTS/vm-heartbeat
sh $SWARM_SOFTWARE/{REPO}/bin/payload > $JOBOUTPUTS/result
sleep 1
echo "200 Success" > $JOBOUTPUTS/shutdown_message
"""


def vm_job_spec(name: str, min_seconds: int = 60) -> str:
    return (
        f'name = "{name}"\n[vm]\nimage = "{IMAGE}"\ncores = 1\nmin_seconds = {min_seconds}\n'
        f"user_data = {json.dumps(VM_JOB)}\n"
    )


def test_the_pilot_fills_a_lease_with_vm_jobs_at_once_never_over_its_cores(vm_node: Any) -> None:
    n: VmNode = vm_node()  # its ledger: the lease's 2 cores
    ids = []
    for spec in (vm_job_spec("vm-a"), vm_job_spec("vm-b")):
        status, doc = n.api("POST", "v1/jobs", spec)
        assert status == 201, doc
        ids.append(doc["id"])
    a, b = ids
    spec_file = n.data_dir.parent / "long.toml"
    spec_file.write_text(vm_job_spec("vm-long", 100000))
    r = n.swarm("job", "submit", str(spec_file), "--config", str(n.config), "--json")
    assert r.returncode == 0, r.stderr
    long = json.loads(r.stdout)["id"]
    spec_file.write_text(vm_job_spec("vm-bad").replace("cores = 1", "cores = 0"))
    r = n.swarm("job", "submit", str(spec_file), "--config", str(n.config))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'vm.cores'" in r.stderr, r.stderr

    def running_both() -> list[dict[str, Any]] | None:
        jobs = [n.api("GET", f"v1/jobs/{i}")[1] for i in (a, b)]
        return jobs if all(j["state"] == "running" and j["vm"] for j in jobs) else None

    jobs = eventually("both VM jobs running", running_both, 60, interval=0.2)
    assert [j["kind"] for j in jobs] == ["vm", "vm"], jobs
    _, status = n.api("GET", "v1/status")
    ledger = status["vms"]["ledger"]
    assert (ledger["capacity"], ledger["vm"], ledger["node"] + ledger["site"]) == (2, 2, 0)
    r = n.swarm("vm", "list", "--config", str(n.config))
    assert f"job {a}" in r.stdout and f"job {b}" in r.stdout, r.stdout
    r = n.swarm("job", "list", "--config", str(n.config))
    assert f"job {a} vm-a (vm): running, vm {jobs[0]['vm']}" in r.stdout, r.stdout
    refused = n.api("GET", f"v1/jobs/{long}")[1]
    assert refused["state"] == "queued" and "needs min_seconds 100000 s" in refused["refused"]

    def done(job_id: str) -> dict[str, Any] | None:
        job = n.api("GET", f"v1/jobs/{job_id}")[1]
        return job if job["state"] == "done" else None

    reports = [eventually(f"job {i} done", partial(done, i), 2 * BOOT)["report"] for i in (a, b)]
    for job, report in zip(jobs, reports, strict=True):
        out = report["outcome"]
        assert (report["vm"], out["code"], out["outcome"]) == (job["vm"], 200, "Success"), out
        assert out["accelerator"] == "tcg" and "result" in out["outputs"]
        assert n.output(job["vm"], "result") == b"payload 42 from the swarm\n"
        assert (n.data_dir / "jobs" / "queue" / "done" / f"{job['id']}.toml").exists()
    # the two VMs ran at the same time, and the cores never went over the lease's
    vms = [n.vm(job["vm"]) for job in jobs]
    assert max(v["started"] for v in vms) < min(v["stopped"] for v in vms), vms
    _, status = n.api("GET", "v1/status")
    assert status["vms"]["ledger"]["peak"] == 2 and status["vms"]["ledger"]["vm"] == 0
    assert n.api("GET", f"v1/jobs/{long}")[1]["state"] == "queued"
    assert qemu_pids(n.data_dir) == []


COUNT = """#!/bin/sh
i=0
while true; do
  i=$((i + 1))
  echo $i > $JOBOUTPUTS/counter
  touch $JOBOUTPUTS/vm-heartbeat
  sleep 1
done
"""


def count(n: VmNode, vm_id: str) -> int:
    path = n.data_dir / "vms" / vm_id / "joboutputs" / "counter"
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else 0  # the agent may ship it mid-write


def test_swarm_vm_migrate_moves_a_running_vm_to_another_node_which_streams_the_image(
    vm_node: Any,
) -> None:
    a: VmNode = vm_node(software=False)  # a mounted 9p export would block the migration
    b: VmNode = vm_node(software=False)
    vm = a.start(COUNT)
    eventually("the guest counting on the first node", lambda: count(a, vm["id"]) >= 3, BOOT)
    r = a.swarm("vm", "migrate", vm["id"], "--config", str(a.config), "--to", str(b.config))
    assert r.returncode == 0, r.stderr
    assert f"vm {vm['id']} migrated to {b.base}" in r.stdout and "guest paused" in r.stdout
    gone = a.vm(vm["id"])
    assert (gone["state"], gone["outcome"]) == ("migrated", f"migrated to {b.base}"), gone
    last = count(a, vm["id"])
    assert qemu_pids(a.data_dir) == []
    here = b.wait(vm["id"], "running", lambda v: v["state"] == "running", 60)
    assert here["migrated_from"] == a.base
    eventually("the counter going on", lambda: count(b, vm["id"]) > last, 60)
    _, images = b.api("GET", "v1/images")
    assert any(i["name"] == "guest" and i["accepted"] for i in images)  # its own copy
    stopped = b.api("POST", f"v1/vms/{vm['id']}/stop", {"grace": 20}, timeout=90)[1]
    assert (stopped["state"], stopped["code"]) == ("stopped", 100), stopped
    assert count(b, vm["id"]) > last  # never restarted: a reboot counts from 1
