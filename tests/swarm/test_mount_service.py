"""Crash recovery of mounts, for real: mount processes and node daemons killed
with SIGKILL leave dead FUSE mounts (ENOTCONN) behind; mounting again clears
them, ``swarm umount`` removes every swarm mount stacked at a point, and
``swarm status`` reports each mount it finds, whatever its state."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_like.publish import publish
from cvmfs_like.store import OriginStore
from swarm.config import render_config
from swarm_testing.waiting import eventually
from tests.harness import (
    MountProcess,
    NodeProcess,
    OriginServer,
    is_mounted,
    mounts_at,
    unmount_all,
)
from trust.keys import init_keys

pytestmark = pytest.mark.fuse
REPO = "sw.example.org"

# `swarm mount` as it was before dead mounts were detected: it mounts over
# whatever is at the mount point.  Only used to build a stack of mounts.
LEGACY_MOUNT = (
    "-c",
    "import sys, swarm.mount_service as s;"
    "s.prepare_mount_point = lambda *a, **k: None;"
    "from swarm.cli import main; sys.exit(main())",
)


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = tmp / "keys"
        self.root_json = init_keys(self.keys, REPO)
        src = tmp / "src"
        src.mkdir()
        (src / "VERSION").write_text("1\n")
        publish(src, OriginStore(tmp / "store", REPO), self.keys)
        self.origin = OriginServer(tmp / "store").start()
        self.mountpoints: list[Path] = []
        self.processes: list[MountProcess | NodeProcess] = []

    def mount(self, mp: Path, cache: str, **kw: tuple[str, ...]) -> MountProcess:
        self.mountpoints.append(mp)
        m = MountProcess(REPO, mp, self.origin.url, self.root_json, self.tmp / cache, **kw)
        self.processes.append(m)
        return m

    def node(self, config: Path, data: Path, mp: Path) -> NodeProcess:
        n = NodeProcess(config, data, mp, self.tmp / "node.log")
        self.processes.append(n)
        return n

    def swarm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "swarm", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.tmp,
        )

    def node_config(self, name: str) -> tuple[Path, Path, Path]:
        data, mp = self.tmp / name / "data", self.tmp / name / "mnt"
        self.mountpoints.append(mp)
        settings: dict[str, object] = {
            "data_dir": data,
            "api": "127.0.0.1:0",
            "listen": "127.0.0.1:0",
            "peer": "127.0.0.1:0",
            "dht": False,
            "mount": mp,
        }
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(render_config(settings, {}))
        return cfg, data, mp

    def close(self) -> None:
        for m in self.processes:
            m.close()
        for mp in self.mountpoints:
            unmount_all(mp)
        self.origin.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _errno_of_statfs(path: Path) -> int | None:
    try:
        os.statvfs(path)  # a stat may be answered from the kernel's cache
    except OSError as exc:
        return exc.errno
    return None


def test_a_dead_mount_is_cleared_before_mounting_again(site: Site) -> None:
    mp = site.tmp / "mnt"
    site.mount(mp, "cache").kill()
    assert _errno_of_statfs(mp) == errno.ENOTCONN and mounts_at(mp) == 1

    r = site.swarm(
        "mount",
        REPO,
        str(mp),
        "--origin",
        site.origin.url,
        "--trust",
        str(site.root_json),
        "--cache",
        str(site.tmp / "cache"),
    )
    assert r.returncode == 0, r.stderr + (site.tmp / "cache" / "mount.log").read_text()
    assert mounts_at(mp) == 1
    assert (mp / "VERSION").read_text() == "1\n"
    assert f"cleared a dead swarm mount at {mp}" in r.stderr
    r = site.swarm("umount", str(mp))
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)

    # The same for a node daemon killed with SIGKILL and started again.
    cfg, data, node_mp = site.node_config("node")
    site.node(cfg, data, node_mp).kill()
    assert _errno_of_statfs(node_mp) == errno.ENOTCONN and mounts_at(node_mp) == 1
    with site.node(cfg, data, node_mp) as node:
        assert mounts_at(node_mp) == 1, node.log()
        assert os.listdir(node_mp) == [".images"]  # answering; no repository followed
        assert f"cleared a dead swarm mount at {node_mp}" in node.log()
    assert not is_mounted(node_mp)


def test_a_live_mount_is_never_cleared(site: Site) -> None:
    mp = site.tmp / "mnt"
    with site.mount(mp, "cache") as live:
        r = site.swarm(
            "mount",
            REPO,
            str(mp),
            "--origin",
            site.origin.url,
            "--trust",
            str(site.root_json),
            "--cache",
            str(site.tmp / "cache2"),
        )
        assert r.returncode == 2
        assert r.stderr.splitlines() == [
            f"swarm: mountpoint: {mp} is already a live swarm mount (swarm umount {mp} first)"
        ]
        assert mounts_at(mp) == 1 and live.proc.poll() is None
        assert (mp / "VERSION").read_text() == "1\n"


def test_umount_removes_stacked_mounts(site: Site) -> None:
    mp = site.tmp / "mnt"
    with (
        site.mount(mp, "cache1") as bottom,
        site.mount(mp, "cache2", launcher=LEGACY_MOUNT) as middle,
        site.mount(mp, "cache3", launcher=LEGACY_MOUNT) as top,
    ):
        middle.kill()  # a dead mount between two live ones
        assert mounts_at(mp) == 3
        r = site.swarm("umount", str(mp))
        assert r.returncode == 0, r.stderr
        assert mounts_at(mp) == 0
        for m in (bottom, top):  # their mounts gone, both processes end
            m.proc.wait(timeout=10)
    r = site.swarm("umount", str(mp))
    assert r.returncode == 2 and r.stderr.splitlines() == [f"swarm: {mp} is not a swarm mount"]


FOREIGN = (
    "import sys, mfusepy\n"
    "mfusepy.FUSE(mfusepy.Operations(), sys.argv[1], foreground=True, ro=True,"
    " fsname='other', subtype='swarm')\n"
)


def test_status_goes_on_past_a_mount_it_does_not_understand(site: Site) -> None:
    dead = site.tmp / "dead"
    site.mount(dead, "cache1").kill()
    cfg, data, node_mp = site.node_config("node")
    foreign_mp = site.tmp / "foreign"
    foreign_mp.mkdir()
    site.mountpoints.append(foreign_mp)
    with (
        site.node(cfg, data, node_mp),
        subprocess.Popen([sys.executable, "-c", FOREIGN, str(foreign_mp)]) as foreign,
    ):
        try:

            def mounted() -> bool:
                assert foreign.poll() is None, f"the foreign mount exited {foreign.returncode}"
                return is_mounted(foreign_mp)

            eventually("the foreign mount", mounted, 10)
            with site.mount(site.tmp / "live", "cache2") as live:
                r = site.swarm("status")
                # Every swarm mount on the machine is listed (other tests' too).
                assert "Traceback" not in r.stderr
                assert r.returncode == 1, r.stdout + r.stderr
                out = r.stdout
                assert (
                    f"{dead}: dead (transport endpoint not connected): swarm umount {dead}" in out
                )
                assert f"{node_mp}: a node daemon's mount (swarm status --config NODE.toml)" in out
                assert f"{foreign_mp}: not answering as a swarm mount" in out
                assert f"{live.mountpoint}: {REPO} revision 1" in out

                r = site.swarm("status", "--json")
                states = {s["mountpoint"]: s for s in json.loads(r.stdout)}
                assert states[str(dead)]["state"] == "dead"
                assert states[str(node_mp)]["state"] == "node"
                assert states[str(foreign_mp)]["state"] == "unknown"
                assert states[str(live.mountpoint)]["state"] == "mounted"
                assert states[str(live.mountpoint)]["revision"] == 1
        finally:
            unmount_all(foreign_mp)


def test_a_detached_mount_that_never_gets_ready_is_stopped_at_the_deadline(
    site: Site,
) -> None:
    """`swarm mount` waits for its child with a deadline: a child stuck on an
    origin that trickles its metadata is ended, and the command says so."""
    from swarm.exceptions import ConfigError
    from swarm.mount_service import start_detached
    from tests.hostile_http import Answer, HostileServer

    trickle = Answer(b"{" + b" " * 4096 + b"}", trickle_body=True, interval=0.5)
    with HostileServer({f"/{REPO}/metadata/timestamp.json": trickle}) as slow:
        mp = site.tmp / "mnt"
        mp.mkdir()
        site.mountpoints.append(mp)
        argv = ["mount", REPO, str(mp), "--origin", slow.url, "--trust", str(site.root_json)]
        argv += ["--cache", str(site.tmp / "cache"), "--fetch-timeout", "3600"]
        # 8 s: enough for the child to start Python and reach the origin on a
        # loaded machine (with 2 s it sometimes had not yet asked when ended).
        with pytest.raises(ConfigError, match="not ready within 8 s"):
            start_detached(argv, site.tmp / "cache", timeout=8)
        assert slow.requests  # the child did reach the origin, and was stuck on it
    assert not mounts_at(mp)
