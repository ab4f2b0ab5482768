"""Real FUSE mounts of published releases (marked ``fuse``)."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cvmfs_like.catalog import Catalog
from cvmfs_like.publish import publish
from cvmfs_like.retention import list_revisions
from cvmfs_like.store import OriginStore
from swarm_testing.waiting import eventually
from tests.harness import MountProcess, OriginServer
from tests.trees import build_sample_tree
from trust.keys import init_keys

pytestmark = pytest.mark.fuse
REPO = "sw.example.org"


class Site:
    """keys + store + a source tree + a running origin."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = tmp / "keys"
        self.root_json = init_keys(self.keys, REPO)
        self.store = OriginStore(tmp / "store", REPO)
        self.src = build_sample_tree(tmp / "src", large_mib=20)
        self.publish()
        self.origin = OriginServer(tmp / "store").start()

    def publish(self) -> None:
        # A tiny nesting threshold: every test also runs on a catalog tree.
        publish(self.src, self.store, self.keys, nest_threshold=8)

    def mount(self, name: str = "mnt", cache: str = "cache", *extra: str) -> MountProcess:
        return MountProcess(
            REPO, self.tmp / name, self.origin.url, self.root_json, self.tmp / cache, *extra
        )

    def object_of(self, rel: str) -> Path:
        releases, _ = list_revisions(self.store)
        cat = Catalog(self.store.path_of(releases[-1].catalog))
        while True:  # descend the catalog tree to the catalog holding rel
            mount = next((m for m in cat.nested if rel.encode().startswith(m + b"/")), None)
            if mount is None:
                break
            cat = Catalog(self.store.path_of(cat.nested[mount][0]))
        entry = cat.lookup(rel.encode())
        assert entry is not None and entry.object is not None
        return self.store.path_of(entry.object)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


def control(mp: Path, command: str) -> dict[str, object]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.cli",
            command,
            str(mp),
            *(["--json"] if command == "status" else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out) if command == "status" else {"out": out}


def test_mount_shows_the_tree_exactly(site: Site) -> None:
    with site.mount() as m:
        mp = m.mountpoint
        for dirpath, dirnames, filenames in os.walk(site.src):
            rel = Path(dirpath).relative_to(site.src)
            for name in dirnames + filenames:
                src_p, mnt_p = site.src / rel / name, mp / rel / name
                s, t = os.lstat(src_p), os.lstat(mnt_p)
                assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(t.st_mode), src_p
                assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(t.st_mode), src_p
                assert s.st_mtime_ns == t.st_mtime_ns, src_p
                if stat.S_ISLNK(s.st_mode):
                    assert os.readlink(src_p) == os.readlink(mnt_p)
                elif stat.S_ISREG(s.st_mode):
                    assert s.st_size == t.st_size
                    assert src_p.read_bytes() == mnt_p.read_bytes(), src_p
            assert sorted(os.listdir(mp / rel)) == sorted(dirnames + filenames)
        a, b = os.lstat(mp / "hard-a"), os.lstat(mp / "lib" / "hard-b")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert os.readlink(mp / "dangling") == "does/not/exist"
        assert (mp / "rel-link").read_text() == (site.src / "bin/hello").read_text()


def test_program_runs_from_the_mount_and_writes_are_refused(site: Site) -> None:
    with site.mount() as m:
        out = subprocess.run([str(m.mountpoint / "bin/hello")], capture_output=True, text=True)
        assert out.stdout == "hello from revision 1\n"
        with pytest.raises(OSError) as exc:
            (m.mountpoint / "new").write_text("x")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            (m.mountpoint / "absent").read_text()


def test_new_revision_is_picked_up_without_remount_and_open_files_keep_theirs(
    site: Site,
) -> None:
    with site.mount() as m:
        mp = m.mountpoint
        assert os.getxattr(mp, "user.swarm.revision") == b"1"
        old = open(mp / "VERSION", "rb")  # noqa: SIM115
        try:
            assert (mp / "VERSION").read_text() == "1\n"
            (site.src / "VERSION").write_text("2 (a longer version)\n")
            (site.src / "added").write_text("new in 2\n")
            (site.src / "private").unlink()
            site.publish()
            control(mp, "reload")
            assert os.getxattr(mp, "user.swarm.revision") == b"2"
            assert (mp / "VERSION").read_text() == "2 (a longer version)\n"
            assert (mp / "added").read_text() == "new in 2\n"
            assert not (mp / "private").exists()
            assert old.read() == b"1\n"
            out = subprocess.run([str(mp / "bin/hello")], capture_output=True, text=True)
            assert out.stdout == "hello from revision 2 (a longer version)\n"
        finally:
            old.close()
        status = control(mp, "status")
        assert status["revision"] == 2 and status["repository"] == REPO


def test_revision_is_picked_up_by_ttl(site: Site) -> None:
    with site.mount("mnt", "cache", "--ttl", "0.3") as m:
        (site.src / "VERSION").write_text("ttl\n")
        site.publish()
        eventually(
            "revision 2 in the mount",
            lambda: os.getxattr(m.mountpoint, "user.swarm.revision") == b"2",
            15,
        )
        assert (m.mountpoint / "VERSION").read_text() == "ttl\n"


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_object_gives_eio_and_a_log_line_naming_it(site: Site, damage: str) -> None:
    obj = site.object_of("lib/data.bin")
    data = obj.read_bytes()
    obj.write_bytes(bytes([data[0] ^ 1]) + data[1:] if damage == "tamper" else data[:100])
    with site.mount() as m:
        with pytest.raises(OSError) as exc:
            (m.mountpoint / "lib/data.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        log = m.log()
        assert obj.name in log
        assert ("content hash" if damage == "tamper" else "size 100 != expected") in log
        obj.write_bytes(data)  # repaired at the origin: the next read succeeds
        assert (m.mountpoint / "lib/data.bin").read_bytes() == data


def test_origin_down_cached_files_read_uncached_fail_fast(site: Site) -> None:
    with site.mount("mnt", "cache", "--fetch-timeout", "2") as m:
        assert (m.mountpoint / "bin/hello").read_bytes()
        site.origin.stop()
        assert (m.mountpoint / "bin/hello").read_text().startswith("#!/bin/sh")
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            (m.mountpoint / "lib/data.bin").read_bytes()
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started < 5


def test_unresponsive_origin_gives_eio_after_the_timeout_not_a_hang(site: Site) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections, never answers
    try:
        with site.mount() as warm:
            (warm.mountpoint / "VERSION").read_bytes()
        port = silent.getsockname()[1]
        with MountProcess(
            REPO,
            site.tmp / "mnt2",
            f"http://127.0.0.1:{port}/",
            site.root_json,
            site.tmp / "cache",
            "--fetch-timeout",
            "1.5",
        ) as m:
            assert (m.mountpoint / "VERSION").read_text() == "1\n"  # cached metadata + object
            started = time.monotonic()
            with pytest.raises(OSError) as exc:
                (m.mountpoint / "lib/data.bin").read_bytes()
            assert exc.value.errno == errno.EIO
            assert time.monotonic() - started < 6
    finally:
        silent.close()


def test_small_quota_under_concurrent_readers_serves_correct_bytes(site: Site) -> None:
    files = {}
    for i in range(60):
        p = site.src / "many" / f"f{i}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(50_000 + i))
        files[f"many/f{i}"] = p.read_bytes()
    site.publish()
    with site.mount("mnt", "cache", "--quota", "1M") as m:

        def check(rel: str) -> bool:
            return (m.mountpoint / rel).read_bytes() == files[rel]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(2):
                assert all(pool.map(check, files))
        status = control(m.mountpoint, "status")
        cache = status["cache"]
        assert isinstance(cache, dict)
        assert cache["used"] <= (1 << 20) + cache["pinned_bytes"]
        assert cache["evictions"] > 0 and cache["failures"] == 0


def test_chunked_large_file_streams_correctly(site: Site) -> None:
    with site.mount() as m:
        big = m.mountpoint / "large.bin"
        want = (site.src / "large.bin").read_bytes()
        with open(big, "rb") as f:
            f.seek(15 << 20)
            assert f.read(1 << 20) == want[15 << 20 : 16 << 20]
        assert big.read_bytes() == want
        assert int(os.getxattr(big, "user.swarm.chunks")) >= 2


def _cached(site: Site, digest: str) -> Path:
    return site.tmp / "cache" / "objects" / digest[:2] / digest


def test_a_cached_object_cut_short_is_fetched_again_not_served(site: Site) -> None:
    want = (site.src / "lib/data.bin").read_bytes()
    with site.mount() as m:
        assert (m.mountpoint / "lib/data.bin").read_bytes() == want
    assert (site.tmp / "cache" / "closed-cleanly").exists()  # unmounted: a clean close
    cached = _cached(site, site.object_of("lib/data.bin").name)
    assert cached.read_bytes() == want
    os.truncate(cached, 0)  # what a power loss after the write left
    with site.mount() as m:
        assert (m.mountpoint / "lib/data.bin").read_bytes() == want
        assert f"cached object {cached.name}: size 0 != expected {len(want)}" in m.log()
    assert cached.read_bytes() == want


def test_a_cached_object_changed_in_a_crash_is_fetched_again_not_served(site: Site) -> None:
    want = (site.src / "lib/data.bin").read_bytes()
    m = site.mount()
    try:
        assert (m.mountpoint / "lib/data.bin").read_bytes() == want
        m.proc.kill()  # a crash: the cache is never closed
        m.proc.wait(timeout=10)
    finally:
        m.close()
    assert not (site.tmp / "cache" / "closed-cleanly").exists()
    cached = _cached(site, site.object_of("lib/data.bin").name)
    cached.write_bytes(bytes(len(want)))  # same size, other bytes (zeros from a crash)
    with site.mount() as m:
        assert (m.mountpoint / "lib/data.bin").read_bytes() == want
        assert f"cached object {cached.name}: content hash is" in m.log()


def test_a_cached_catalog_cut_short_is_fetched_again(site: Site) -> None:
    deep = "/".join(f"d{i}" for i in range(40)) + "/bottom.txt"
    with site.mount() as m:
        assert (m.mountpoint / deep).read_text() == "deep\n"  # loads the nested catalogs
    releases, _ = list_revisions(site.store)
    catalogs, stack = [], [releases[-1].catalog]
    while stack:
        digest = stack.pop()
        catalogs.append(digest)
        stack.extend(h for h, _ in Catalog(site.store.path_of(digest)).nested.values())
    assert len(catalogs) > 1
    for digest in catalogs:
        cached = _cached(site, digest)
        os.truncate(cached, cached.stat().st_size // 2)
    with site.mount() as m:  # starts (a cut catalog used to stop it: "malformed")
        assert (m.mountpoint / deep).read_text() == "deep\n"
        assert (m.mountpoint / "VERSION").read_text() == "1\n"
    for digest in catalogs:
        assert _cached(site, digest).read_bytes() == site.store.path_of(digest).read_bytes()
