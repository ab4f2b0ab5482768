"""Start profiles on real FUSE mounts (``swarm mount``) over a real loopback
origin (marked ``fuse``): recorded on first use, prefetched on a cold start
before any read, harmless when forged, never a source of unverified bytes,
and stopped cleanly at unmount."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cvmfs_like.catalog import Catalog
from cvmfs_like.publish import publish
from cvmfs_like.retention import list_revisions
from cvmfs_like.start_profile import ProfileStatus
from cvmfs_like.store import OriginStore
from swarm_testing.waiting import eventually
from tests.harness import MountProcess, OriginServer
from tests.slow_http import SlowStore
from trust.keys import init_keys

pytestmark = pytest.mark.fuse
REPO = "sw.example.org"
FILES = [f"pkg/m{i // 8}/f{i}.py" for i in range(32)]


class Site:
    """keys + store + a tree of small files (in nested catalogs) + an origin."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = tmp / "keys"
        self.root_json = init_keys(self.keys, REPO)
        self.store = OriginStore(tmp / "store", REPO)
        self.src = tmp / "src"
        self.content: dict[str, bytes] = {}
        for i, rel in enumerate(FILES):
            p = self.src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"# module {i}\n".encode() * (i + 1))
            self.content[rel] = p.read_bytes()
        (self.src / "README").write_text("not read at start\n")
        publish(self.src, self.store, self.keys, nest_threshold=8)
        self.origin = OriginServer(tmp / "store").start()
        self.cache = tmp / "cache"

    @property
    def catalog(self) -> str:
        releases, _ = list_revisions(self.store)
        return releases[-1].catalog

    def object_of(self, rel: str) -> str:
        cat = Catalog(self.store.path_of(self.catalog))
        while True:
            mount = next((m for m in cat.nested if rel.encode().startswith(m + b"/")), None)
            if mount is None:
                break
            cat = Catalog(self.store.path_of(cat.nested[mount][0]))
        entry = cat.lookup(rel.encode())
        assert entry is not None and entry.object is not None
        return entry.object

    def mount(self, *extra: str, origin: str | None = None) -> MountProcess:
        return MountProcess(
            REPO,
            self.tmp / "mnt",
            origin or self.origin.url,
            self.root_json,
            self.cache,
            "--fetch-timeout",
            "2",
            *extra,
        )

    def profile_path(self) -> Path:
        return self.cache / "profiles" / f"{self.catalog}.json"

    def profile(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.profile_path().read_bytes())
        return doc

    def wipe_objects(self) -> None:
        """What a node whose cache was wiped keeps: its metadata and profiles."""
        shutil.rmtree(self.cache / "objects")
        (self.cache / "closed-cleanly").unlink(missing_ok=True)

    def data_requests(self) -> list[str]:
        return [p.rsplit("/", 1)[1] for p in self.origin.paths if "/data/" in p]

    def record(self, files: list[str]) -> None:
        with self.mount() as m:
            for rel in files:
                assert (m.mountpoint / rel).read_bytes() == self.content[rel]
        assert self.profile_path().exists()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


def mount_status(mp: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "status", str(mp), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def status(mp: Path) -> ProfileStatus:
    return ProfileStatus(**mount_status(mp)["start_profile"])


def test_a_profile_is_recorded_on_first_use_in_read_order_and_written_at_unmount(
    site: Site,
) -> None:
    order = FILES[5:15] + FILES[:3]
    with site.mount("--start-profile-window", "3600") as m:
        assert status(m.mountpoint) == ProfileStatus("waiting")
        for rel in order:
            assert (m.mountpoint / rel).read_bytes() == site.content[rel]
        assert status(m.mountpoint) == ProfileStatus("recording", recorded=len(order))
        assert not site.profile_path().exists()  # written once, at the end of the window
    doc = site.profile()
    assert doc["catalog"] == site.catalog and doc["revision"] == 1
    assert doc["entries"] == [[rel, 0] for rel in order]
    assert [p.name for p in site.profile_path().parent.iterdir()] == [site.profile_path().name]


def test_a_profile_is_bounded_by_its_window_and_its_entries(site: Site) -> None:
    with site.mount("--start-profile-entries", "4") as m:
        for rel in FILES[:6]:
            (m.mountpoint / rel).read_bytes()
        # Full: written while mounted, the two reads after it not listed.
        assert site.profile_path().exists()
        assert status(m.mountpoint) == ProfileStatus("recorded", recorded=4)
    assert site.profile()["entries"] == [[rel, 0] for rel in FILES[:4]]
    site.profile_path().unlink()
    with site.mount("--start-profile-window", "1") as m:
        (m.mountpoint / FILES[7]).read_bytes()
        eventually("the window to end", site.profile_path().exists, 60)
        (m.mountpoint / FILES[8]).read_bytes()
    assert site.profile()["entries"] == [[FILES[7], 0]]


def test_a_cold_start_with_the_profile_fetches_the_listed_objects_before_any_read(
    site: Site,
) -> None:
    site.record(FILES)
    site.wipe_objects()
    site.origin.paths.clear()
    wanted = {site.object_of(rel) for rel in FILES}
    with site.mount() as m:
        # Nobody reads: the origin is asked for every listed object anyway.
        eventually("the prefetch", lambda: wanted <= set(site.data_requests()), 60)
        eventually("the prefetch to end", lambda: status(m.mountpoint).state == "done", 60)
        st = status(m.mountpoint)
        assert st == ProfileStatus("done", listed=len(FILES), fetched=len(FILES))
        for digest in wanted:
            assert (site.cache / "objects" / digest[:2] / digest).exists()
        asked = len(site.data_requests())
        for rel in FILES:
            assert (m.mountpoint / rel).read_bytes() == site.content[rel]
        assert len(site.data_requests()) == asked  # every read was a cache hit
        assert (m.mountpoint / "README").read_text() == "not read at start\n"
        assert len(site.data_requests()) == asked + 1  # what the profile did not list


def test_a_partly_cached_start_fetches_only_the_missing_objects_ahead(site: Site) -> None:
    site.record(FILES)
    missing = {site.object_of(rel) for rel in FILES[::2]}
    for digest in missing:
        (site.cache / "objects" / digest[:2] / digest).unlink()
    site.origin.paths.clear()
    with site.mount() as m:
        eventually("the prefetch to end", lambda: status(m.mountpoint).state == "done", 60)
        half = len(FILES) // 2
        assert status(m.mountpoint) == ProfileStatus(
            "done", listed=len(FILES), fetched=half, present=half
        )
        assert sorted(site.data_requests()) == sorted(missing)  # nothing else was asked for


def test_a_prefetch_stops_at_half_of_the_quota_the_catalogs_leave(site: Site) -> None:
    site.record(FILES)
    site.wipe_objects()
    quota = site.store.path_of(site.catalog).stat().st_size + 4096  # pinned: the root catalog
    with site.mount("--quota", str(quota)) as m:
        eventually("the prefetch to end", lambda: status(m.mountpoint).state != "prefetching", 60)
        st = status(m.mountpoint)
        assert st.state == "over budget" and 0 < st.fetched < len(FILES)
        fetched = [rel for rel in FILES if (site.cache / "objects" / site.object_of(rel)[:2]
                                           / site.object_of(rel)).exists()]  # fmt: skip
        assert sum(len(site.content[rel]) for rel in fetched) <= 2048
        cache = mount_status(m.mountpoint)["cache"]
        assert cache["used"] - cache["pinned_bytes"] <= quota
        assert "prefetch stopped at its budget" in m.log()
        for rel in FILES:  # the rest is read as without a profile
            assert (m.mountpoint / rel).read_bytes() == site.content[rel]


def test_without_start_profiles_nothing_is_recorded_or_prefetched(site: Site) -> None:
    with site.mount("--no-start-profile") as m:
        assert status(m.mountpoint) == ProfileStatus("off")
        for rel in FILES[:3]:
            (m.mountpoint / rel).read_bytes()
    assert not (site.cache / "profiles").exists()


@pytest.mark.parametrize("forgery", ["entries", "garbage", "other revision"])
def test_a_forged_profile_is_harmless(site: Site, forgery: str) -> None:
    real = FILES[2]
    if forgery == "entries":
        entries: list[object] = [
            ["no/such/file", 0],
            ["pkg", 0],  # a directory
            ["../../../etc/passwd", 0],
            [real, 5],  # no such chunk
            ["/" + real, 0],
            [real, "zero"],
            "not an entry",
            [real, 0],
        ]
        doc = {"format": "swarm-start-profile/1", "catalog": site.catalog, "revision": 1}
        data = json.dumps({**doc, "entries": entries}).encode()
    elif forgery == "garbage":
        data = os.urandom(4096)
    else:
        data = json.dumps(
            {"format": "swarm-start-profile/1", "catalog": "0" * 64, "revision": 1, "entries": []}
        ).encode()
    site.profile_path().parent.mkdir(parents=True)
    site.profile_path().write_bytes(data)
    with site.mount() as m:
        if forgery == "entries":
            eventually("the prefetch to end", lambda: status(m.mountpoint).state == "done", 60)
            st = status(m.mountpoint)
            assert st == ProfileStatus("done", listed=5, fetched=1, skipped=4)
            assert "3 malformed entries skipped" in m.log()
            assert "entry 'no/such/file' chunk 0 skipped: no such path in this revision" in m.log()
        else:
            assert status(m.mountpoint).state == "waiting"  # recording a real one instead
            assert "ignored and removed" in m.log()
        for rel in FILES:
            assert (m.mountpoint / rel).read_bytes() == site.content[rel]
    if forgery != "entries":
        assert site.profile()["entries"] == [[rel, 0] for rel in FILES]


def test_an_object_the_origin_serves_corrupted_is_never_stored(site: Site) -> None:
    site.record(FILES[:8])
    site.wipe_objects()
    bad = site.object_of(FILES[3])
    stored = site.store.path_of(bad)
    good = stored.read_bytes()
    stored.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    with site.mount() as m:
        eventually("the prefetch to end", lambda: status(m.mountpoint).state == "done", 60)
        st = status(m.mountpoint)
        assert st == ProfileStatus("done", listed=8, fetched=7, failed=1)
        assert not (site.cache / "objects" / bad[:2] / bad).exists()
        assert f"fetch refused: object {bad}: content hash is" in m.log()
        with pytest.raises(OSError) as exc:
            (m.mountpoint / FILES[3]).read_bytes()
        assert exc.value.errno == errno.EIO
        stored.write_bytes(good)  # repaired at the origin: the reader gets it
        assert (m.mountpoint / FILES[3]).read_bytes() == site.content[FILES[3]]


def test_unmount_during_prefetch_stops_it_and_leaves_nothing_running(site: Site) -> None:
    site.record(FILES)
    site.wipe_objects()
    slow = {site.object_of(rel) for rel in FILES}
    with SlowStore(site.tmp / "store", slow=slow, interval=0.5) as origin:
        m = site.mount(origin=origin.url)
        try:
            assert origin.wait_trickling(4, 60)  # the prefetch is fetching
            subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True, timeout=30)
            # Each fetch in progress ends by its deadline (2 s), then the process.
            assert m.proc.wait(timeout=60) == 0
        finally:
            m.close()
        log = m.log_path.read_text(errors="replace")
    assert "prefetch stopped:" in log
    assert "still fetching" not in log
    assert (site.cache / "closed-cleanly").exists()  # no object was being stored
    stored = {n for _, _, names in os.walk(site.cache / "objects") for n in names}
    assert not stored & slow  # none arrived whole (the catalogs did)
    assert not [n for n in stored if n.startswith(".tmp-")]
