"""VMs on node daemons in network namespaces with the origin down: a VM
starts on a node that streams the signed image from a peer, then moves
(live migration) to a third node that streams the same base through its own
mount from its peers; only the overlay and the memory cross; the guest keeps
counting across it (tests/vm/test_vm_node.py shows the rest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.config import render_config
from swarm.images import publish_image
from swarm_testing.guest_image import GuestImage, build_guest_image
from swarm_testing.netns import Network
from swarm_testing.waiting import eventually
from tests.vm.test_vm_node import COUNT, qemu_pids
from trust.keys import init_keys

pytestmark = [pytest.mark.netns, pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(300)]

REPO = "vm.example.org"
IMAGE = f"{REPO}/guest/1"
PY = sys.executable
POLL = 0.2  # seconds between checks that start a process in a namespace


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest_image()


class Nodes:
    """An origin (host 0) and node daemons (hosts 1..), every process ended by PID."""

    def __init__(self, tmp: Path, net: Network, image: GuestImage) -> None:
        self.tmp, self.net = tmp, net
        keys = tmp / "keys"
        self.root_json = init_keys(keys, REPO)
        self.store = tmp / "store"
        src = tmp / "src"
        src.mkdir()
        (src / "README").write_text("a release beside the image\n")
        publish(src, OriginStore(self.store, REPO), keys)
        publish_image(image.path, name="guest", version="1", repo=REPO, keys=keys,
                      store=self.store)  # fmt: skip
        self.procs: dict[int, subprocess.Popen[Any]] = {}
        self.mounts: list[Path] = []
        self.logs: list[Any] = []

    def _log(self, name: str) -> Any:
        f = open(self.tmp / name, "ab")  # noqa: SIM115 - closed in close()
        self.logs.append(f)
        return f

    def start_origin(self) -> None:
        host = self.net.hosts[0]
        self.procs[0] = host.popen(
            [PY, "-m", "swarm", "serve", self.store, "--listen", "0.0.0.0:8000"],
            stderr=self._log("origin.log"),
        )
        eventually(
            "the origin",
            lambda: host.run(["curl", "-sf", "-o", "/dev/null", "http://127.0.0.1:8000/"])
            .returncode == 0,
            60, interval=POLL,
        )  # fmt: skip

    def stop(self, i: int) -> int:
        proc = self.procs.pop(i)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(60)

    def start_node(self, i: int, bootstrap: tuple[int, ...] = ()) -> Path:
        host = self.net.hosts[i]
        d = self.tmp / f"node{i}"
        mp = d / "mnt"
        mp.mkdir(parents=True)
        self.mounts.append(mp)
        cfg = d / "node.toml"
        cfg.write_text(
            render_config(
                {
                    "data_dir": d / "data",
                    "listen": f"{host.addr}:6881",
                    "api": f"{host.addr}:7000",  # the other node's migrate reaches it
                    "peer": f"{host.addr}:6880",
                    "bootstrap": [f"{self.net.hosts[b].addr}:6881" for b in bootstrap],
                    "mount": mp,
                    "fetch_timeout": 20,
                    "runner": {"cores": 1, "power_per_core": 10.0, "time_left": 3600},
                    "vm": {"accelerator": "tcg", "software": False, "grace": 20},
                },
                {REPO: {"origin": f"http://{self.net.hosts[0].addr}:8000/",
                        "trust": self.root_json}},
            )
        )  # fmt: skip
        log = self._log(f"node{i}.log")
        self.procs[i] = host.popen([PY, "-m", "swarm", "node", "--config", cfg],
                                   stdout=log, stderr=log)  # fmt: skip

        def ready() -> bool:
            assert self.procs[i].poll() is None, (self.tmp / f"node{i}.log").read_text()[-3000:]
            return (d / "data" / "node.json").exists()

        eventually(f"node {i}", ready, 90, interval=POLL)
        return cfg

    def swarm(self, i: int, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return self.net.hosts[i].run(
            [PY, "-m", "swarm", *map(str, argv)], capture_output=True, text=True, timeout=300
        )

    def close(self) -> None:
        for i in sorted(self.procs, reverse=True):
            self.stop(i)
        for mp in self.mounts:
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        for i in (1, 2, 3):
            for pid in qemu_pids(self.tmp / f"node{i}" / "data"):
                os.kill(pid, signal.SIGKILL)
        for f in self.logs:
            f.close()


@pytest.fixture
def nodes(tmp_path: Path, guest_image: GuestImage) -> Iterator[Nodes]:
    with Network(4) as net:
        n = Nodes(tmp_path, net, guest_image)
        try:
            n.start_origin()
            yield n
        finally:
            n.close()


def counter(data: Path, vm_id: str) -> int:
    path = data / "vms" / vm_id / "joboutputs" / "counter"
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text.isdigit() else 0  # the agent may ship it mid-write


def image_transfer(nodes: Nodes, i: int, cfg: Path) -> dict[str, Any]:
    r = nodes.swarm(i, "status", "--config", cfg, "--json")
    (image,) = [t for t in json.loads(r.stdout)["transfers"] if t["what"] == "image guest/1"]
    return dict(image)


def test_a_vm_starts_from_a_peer_with_the_origin_down_and_moves_to_a_node_streaming_it_too(
    nodes: Nodes, guest_image: GuestImage
) -> None:
    seed_cfg = nodes.start_node(1)
    seed = nodes.tmp / "node1" / "mnt" / ".images" / REPO / "guest" / "1"
    eventually("the image in node 1's mount", seed.exists, 60)
    assert seed.read_bytes() == guest_image.path.read_bytes()  # node 1 holds it all now
    assert image_transfer(nodes, 1, seed_cfg)["progress"] >= 1.0
    assert nodes.stop(0) == 0  # the origin goes: the others stream from their peers
    src_cfg = nodes.start_node(2, bootstrap=(1,))
    src, dst = nodes.tmp / "node2" / "data", nodes.tmp / "node3" / "data"
    user_data = nodes.tmp / "count.sh"
    user_data.write_text(COUNT)
    r = nodes.swarm(2, "vm", "start", IMAGE, "--config", src_cfg, "--user-data", user_data,
                    "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr + (nodes.tmp / "node2.log").read_text()[-2000:]
    vm_id = json.loads(r.stdout)["id"]
    eventually("the guest counting on node 2", lambda: counter(src, vm_id) >= 3, 120)
    assert image_transfer(nodes, 2, src_cfg)["total_done"] > 0  # its boot came from node 1
    dst_cfg = nodes.start_node(3, bootstrap=(1, 2))
    r = nodes.swarm(2, "vm", "migrate", vm_id, "--config", src_cfg, "--to", dst_cfg)
    assert r.returncode == 0, r.stderr + (nodes.tmp / "node3.log").read_text()[-2000:]
    assert "migrated to http://" in r.stdout and "guest paused" in r.stdout
    last = counter(src, vm_id)
    record = json.loads((src / "vms" / vm_id / "record.json").read_text())
    assert record["state"] == "migrated" and qemu_pids(src) == []
    eventually("the counter going on on node 3", lambda: counter(dst, vm_id) > last, 90)
    r = nodes.swarm(3, "vm", "status", vm_id, "--config", dst_cfg, "--json")
    here = json.loads(r.stdout)
    assert here["state"] == "running" and here["migrated_from"].startswith("http://")
    assert image_transfer(nodes, 3, dst_cfg)["total_done"] > 0  # the base's blocks it read
    r = nodes.swarm(3, "vm", "stop", vm_id, "--config", dst_cfg, "--json")
    stopped = json.loads(r.stdout)
    assert (stopped["state"], stopped["code"]) == ("stopped", 100), stopped
    assert counter(dst, vm_id) > last  # never rebooted: a reboot counts from 1
