"""What the kernel does for the mount on its own (the low-level adapter, marked ``fuse``).

Each test reads the mount process's request counters over its control socket
(``counters``: requests that reached the process, by kind) to show which
requests the kernel no longer sends.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarm_testing.waiting import eventually
from tests.cvmfs_like.test_fuse_mount import REPO, Site, control
from tests.harness import MountProcess

pytestmark = pytest.mark.fuse
MiB = 1 << 20


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.origin.close()


def counters(site: Site, cache: str = "cache") -> dict[str, int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(site.tmp / cache / "control.sock"))
        sock.sendall(b"counters\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    out: dict[str, int] = json.loads(data)
    return out


def drop_pages(path: Path) -> None:
    """Drop the mount's cached pages of one file: its next read reaches the process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_opens_and_listings_of_immutable_content_need_no_round_trip(site: Site) -> None:
    with site.mount() as m:
        mp = m.mountpoint
        for _ in range(3):
            assert (mp / "bin/hello").read_bytes()
            assert sorted(os.listdir(mp / "lib"))
            assert sorted(os.listdir(mp))
            assert (mp / "lib/data.bin").read_bytes()
        before = counters(site)
        for _ in range(20):
            assert (mp / "bin/hello").read_bytes()
            assert (mp / "lib/data.bin").read_bytes()
            assert sorted(os.listdir(mp / "lib"))
            assert sorted(os.listdir(mp))
        after = counters(site)
        # One ENOSYS answer each at most (before), then the kernel opens alone.
        assert before["open"] <= 1 and before["opendir"] <= 1
        assert after["open"] == before["open"] and after["opendir"] == before["opendir"]
        # Listings come from the kernel's cache; file pages too (keep_cache).
        assert after["readdir"] == before["readdir"]
        assert after["read_c"] + after["read_py"] == before["read_c"] + before["read_py"]


def test_a_listing_fills_the_kernel_so_stat_of_each_entry_needs_no_lookup(site: Site) -> None:
    with site.mount() as m:
        lib = m.mountpoint / "lib"
        before = counters(site)
        names = os.listdir(lib)
        after_list = counters(site)
        for name in names:
            os.lstat(lib / name)
        after_stat = counters(site)
        assert len(names) >= 3
        assert after_list["readdir"] > before["readdir"]
        assert after_stat["lookup"] == after_list["lookup"], "READDIRPLUS did not fill dentries"
        assert after_stat["getattr"] == after_list["getattr"]


def drop_kernel_caches() -> None:
    """The kernel forgets unused dentries, inodes and pages (as under memory
    pressure, or the bench's dropped-caches runs): machine-wide, needs root."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def test_a_directory_listed_once_is_answered_in_c_after_the_kernel_forgot_it(
    site: Site,
) -> None:
    with site.mount() as m:
        lib = m.mountpoint / "lib"
        names = sorted(os.listdir(lib))
        attrs = {n: os.lstat(lib / n) for n in names}
        drop_kernel_caches()
        os.lstat(lib)  # the root's listing is never kept: this may reach Python
        before = counters(site)
        assert sorted(os.listdir(lib)) == names
        again = {n: os.lstat(lib / n) for n in names}
        assert not (lib / "no-such-name").exists()
        after = counters(site)
        delta = {k: after[k] - before[k] for k in after}
        assert delta["readdir"] >= 1 and delta["readdir_c"] == delta["readdir"]
        assert delta["lookup"] >= 1 and delta["lookup_c"] == delta["lookup"]
        assert delta["getattr"] == 0
        for n in names:  # the same inodes and attributes as Python gave
            a, b = attrs[n], again[n]
            assert (a.st_ino, a.st_mode, a.st_size, a.st_mtime_ns) == (
                b.st_ino, b.st_mode, b.st_size, b.st_mtime_ns
            ), n  # fmt: skip
        assert after["listed"] > 0


def test_a_revision_switch_drops_the_listings_kept_in_c(site: Site) -> None:
    with site.mount("mnt", "cache", "--ttl", "3600") as m:
        mp = m.mountpoint
        lib = mp / "lib"
        old = set(os.listdir(lib))
        assert "data.bin" in old and "added.txt" not in old
        assert not (lib / "added.txt").exists()
        (site.src / "lib/added.txt").write_text("new in revision 2\n")
        (site.src / "lib/data.bin").unlink()
        site.publish()
        assert control(mp, "reload")
        assert set(os.listdir(lib)) == (old - {"data.bin"}) | {"added.txt"}
        drop_kernel_caches()  # what the kernel asks again comes from the new revision
        assert set(os.listdir(lib)) == (old - {"data.bin"}) | {"added.txt"}
        assert (lib / "added.txt").read_text() == "new in revision 2\n"
        assert not (lib / "data.bin").exists()
        assert counters(site)["readdir_c"] >= 1


def test_a_file_open_across_a_revision_switch_keeps_its_content_and_inode(site: Site) -> None:
    with site.mount("mnt", "cache", "--ttl", "3600") as m:
        mp = m.mountpoint
        old = (site.src / "lib/data.bin").read_bytes()
        ino_before = os.stat(mp / "lib/data.bin").st_ino
        with open(mp / "lib/data.bin", "rb") as f:
            assert f.read(100) == old[:100]
            new = bytes(reversed(old))
            (site.src / "lib/data.bin").write_bytes(new)
            site.publish()
            assert control(mp, "reload")
            assert os.getxattr(mp, "user.swarm.revision") == b"2"
            drop_pages(mp / "lib/data.bin")  # its old pages would hide a wrong inode
            assert f.read() == old[100:], "an open file switched revision"
        assert (mp / "lib/data.bin").read_bytes() == new
        assert os.stat(mp / "lib/data.bin").st_ino != ino_before
        assert os.stat(mp / "VERSION").st_ino == os.stat(mp / "VERSION").st_ino


def test_a_name_added_by_a_new_revision_appears_at_once_despite_negative_caching(
    site: Site,
) -> None:
    # The mount's negative_timeout is 30 s: "at once" is well inside it.
    with site.mount("mnt", "cache", "--ttl", "3600") as m:
        mp = m.mountpoint
        for _ in range(2):  # the second miss is answered by the kernel's negative dentry
            assert not (mp / "lib/added.txt").exists()
        misses = counters(site)["lookup"]
        assert not (mp / "lib/added.txt").exists()
        assert counters(site)["lookup"] == misses, "the absence was not cached"
        (site.src / "lib/added.txt").write_text("new in revision 2\n")
        site.publish()
        assert control(mp, "reload")
        assert (mp / "lib/added.txt").read_text() == "new in revision 2\n"
        assert "added.txt" in os.listdir(mp / "lib")


def test_a_hot_import_from_the_mount_reaches_the_process_not_at_all(site: Site) -> None:
    # A package as jobs import them: modules, a subpackage, and the misses
    # of Python's path probing (names tried in each directory of the path).
    pkg = site.src / "py/pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a, sub\n")
    (pkg / "a.py").write_text("import json\nVALUE = json.dumps([1])\n")
    (pkg / "sub/__init__.py").write_text("from pkg.sub.b import B\n")
    (pkg / "sub/b.py").write_text("B = 2\n")
    site.publish()
    with site.mount() as m:
        env = {"PYTHONPATH": str(m.mountpoint / "py"), "PYTHONDONTWRITEBYTECODE": "1"}

        def run_import() -> None:
            out = subprocess.run(
                [sys.executable, "-c", "import pkg, pkg.missing_x"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "No module named 'pkg.missing_x'" in out.stderr, out.stderr

        run_import()
        run_import()
        before = counters(site)
        run_import()
        after = counters(site)
        kinds = ("open", "opendir", "read_c", "read_py", "lookup", "readdir", "getattr")
        assert {k: after[k] - before[k] for k in kinds} == dict.fromkeys(kinds, 0)


def test_counters_report_the_time_python_spent_answering(site: Site) -> None:
    with site.mount() as m:
        before = counters(site)
        assert (m.mountpoint / "lib/data.bin").read_bytes()
        after = counters(site)
        for kind in ("lookup", "read_py"):
            assert after[kind] > before[kind], kind
            assert after[f"{kind}_us"] > before[f"{kind}_us"], kind


def test_sequential_reads_come_in_requests_of_almost_1_mib(site: Site) -> None:
    with site.mount() as m:
        (m.mountpoint / "large.bin").read_bytes()  # fetched into the cache
    # A remount: each READ is answered by C alone and counted once (a READ
    # Python registers for C to answer counts in both read_py and read_c).
    with site.mount() as m:
        big = m.mountpoint / "large.bin"
        size = os.stat(big).st_size
        assert size >= 16 * MiB
        before = counters(site)
        with open(big, "rb") as f:
            while f.read(MiB):
                pass
        after = counters(site)
        requests = (after["read_c"] + after["read_py"]) - (before["read_c"] + before["read_py"])
        # 128 KiB requests would be 8 per MiB; 992 KiB requests about one.
        assert 0 < requests <= 2 * size // MiB, requests


def test_a_large_file_is_opened_ahead_of_its_reader_so_c_serves_the_rest(site: Site) -> None:
    want = (site.src / "large.bin").read_bytes()
    with site.mount() as m:
        with open(m.mountpoint / "large.bin", "rb", buffering=0) as f:
            assert f.read(MiB) == want[:MiB]
            # The first read started opening the chunks after it (all of
            # them: the file is smaller than the read-ahead window).
            eventually("the chunks to be opened ahead", lambda: counters(site)["ahead"] == 0, 30)
            before = counters(site)
            rest = b"".join(iter(lambda: f.read(MiB), b""))
        after = counters(site)
    assert rest == want[MiB:]
    assert after["read_c"] > before["read_c"]
    assert after["read_py"] == before["read_py"], "a chunk was not open when the reader got there"


def test_the_first_read_of_a_file_looked_up_by_name_opens_its_object_in_c(site: Site) -> None:
    want = {rel: (site.src / rel).read_bytes() for rel in ("lib/data.bin", "VERSION")}
    with site.mount() as m:
        for rel, data in want.items():
            assert (m.mountpoint / rel).read_bytes() == data  # fetched into the cache
    with site.mount() as m:  # a remount: lookups and first reads again
        before = counters(site)
        for rel, data in want.items():
            assert (m.mountpoint / rel).read_bytes() == data
        after = counters(site)
    assert after["open_c"] - before["open_c"] == len(want)
    assert after["read_py"] == before["read_py"], "a first read went through Python"


def _chunk_objects(site: Site, want: bytes) -> dict[int, Path]:
    """The cached objects of a file's chunks, by their offset in it."""
    out = {}
    for obj in (site.tmp / "cache" / "objects").glob("*/*"):
        if obj.stat().st_size >= MiB:  # chunks are at least 1 MiB; other objects are small
            data = obj.read_bytes()
            out[want.index(data)] = obj
    return dict(sorted(out.items()))


def test_a_cached_large_file_is_read_in_c_alone_after_a_remount(site: Site) -> None:
    want = (site.src / "large.bin").read_bytes()
    with site.mount() as m:
        assert (m.mountpoint / "large.bin").read_bytes() == want  # fetched into the cache
        chunks = int(os.getxattr(m.mountpoint / "large.bin", "user.swarm.chunks"))
    assert chunks >= 2
    with site.mount() as m:  # a remount: the lookup names every chunk's object to C
        before = counters(site)
        with open(m.mountpoint / "large.bin", "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(MiB), b""))
        after = counters(site)
    assert got == want
    assert after["open_c"] - before["open_c"] == chunks
    assert after["read_py"] == before["read_py"], "a read went through Python"


def _io(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def test_a_large_read_is_spliced_from_the_cache_not_copied_through_the_process(
    site: Site,
) -> None:
    want = (site.src / "large.bin").read_bytes()
    with site.mount() as m:
        assert (m.mountpoint / "large.bin").read_bytes() == want  # fetched into the cache
    with site.mount() as m:  # a remount: every READ reaches the process
        before = _io(m.proc.pid)
        with open(m.mountpoint / "large.bin", "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(MiB), b""))
        after = _io(m.proc.pid)
    assert got == want
    # A 1 MiB READ's splice needs a pipe a little larger than 1 MiB, more than
    # fs.pipe-max-size allows without CAP_SYS_RESOURCE: libfuse then copies
    # every byte through the process (read, then write to /dev/fuse).
    assert after["rchar"] - before["rchar"] < len(want) // 8
    assert after["wchar"] - before["wchar"] < len(want) // 8


def test_a_chunk_cut_short_in_the_cache_is_fetched_again_and_the_file_read_whole(
    site: Site,
) -> None:
    want = (site.src / "large.bin").read_bytes()
    with site.mount() as m:
        assert (m.mountpoint / "large.bin").read_bytes() == want
    objs = _chunk_objects(site, want)
    assert len(objs) >= 2 and (site.tmp / "cache" / "closed-cleanly").exists()
    offset, cut = list(objs.items())[1]
    size = cut.stat().st_size
    os.truncate(cut, size // 2)  # what a power loss after the write left
    with site.mount() as m:
        before = counters(site)
        assert (m.mountpoint / "large.bin").read_bytes() == want
        after = counters(site)
        assert f"cached object {cut.name}: size {size // 2} != expected {size}" in m.log()
    assert after["read_py"] > before["read_py"]  # the cut chunk: Python fetched it again
    assert after["open_c"] > before["open_c"]  # the chunks before it: opened in C
    assert cut.read_bytes() == want[offset : offset + size]


def test_the_kernel_may_keep_64_reads_in_flight(site: Site, tmp_path: Path) -> None:
    """Read-ahead READs are background requests: with the kernel's default of
    12 in flight, 64 readers of dropped files would queue in the kernel."""
    if os.geteuid() != 0 and os.environ.get("SWARM_REQUIRE_ALL") != "1":
        pytest.skip("mounting fusectl (to read the connection's settings) needs root")
    ctl = tmp_path / "fusectl"
    ctl.mkdir()
    subprocess.run(["mount", "-t", "fusectl", "fusectl", str(ctl)], check=True, timeout=30)
    try:
        with site.mount() as m:
            conn = ctl / str(os.stat(m.mountpoint).st_dev)
            assert int((conn / "max_background").read_text()) == 64
            assert int((conn / "congestion_threshold").read_text()) == 48
    finally:
        subprocess.run(["umount", str(ctl)], check=True, timeout=30)


def test_64_concurrent_readers_are_served_from_the_descriptor_table(site: Site) -> None:
    with site.mount() as m:
        mp = m.mountpoint
        files = [mp / "lib/data.bin", mp / "bin/hello", mp / "VERSION", mp / "large.bin"]
        want = {p: (site.src / p.relative_to(mp)).read_bytes() for p in files}
        for p in files:
            assert p.read_bytes() == want[p]  # opens (and verifies) each object once
        before = counters(site)

        def reader(i: int) -> bool:
            p = files[i % len(files)]
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                got = b"".join(iter(lambda: os.read(fd, MiB), b""))
            finally:
                os.close(fd)
            return got == want[p]

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            assert all(pool.map(reader, range(256)))
        after = counters(site)
        assert after["read_c"] > before["read_c"]
        # Chunks of large.bin not yet opened may reach Python; small files never again.
        assert after["read_py"] - before["read_py"] <= 16


def test_the_previous_adapter_stays_mountable_for_the_benchmark(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARM_FUSE_ADAPTER", "mfusepy")
    with site.mount() as m:
        assert (m.mountpoint / "lib/data.bin").read_bytes() == (
            site.src / "lib/data.bin"
        ).read_bytes()
        assert "error" in counters(site)  # the old adapter has no counters


def mount_launched_by(site: Site, launcher: tuple[str, ...]) -> MountProcess:
    """The site's mount, its `swarm mount` started by ``python *launcher``."""
    return MountProcess(
        REPO,
        site.tmp / "mnt",
        site.origin.url,
        site.root_json,
        site.tmp / "cache",
        launcher=launcher,
    )


# `swarm mount` under a descriptor limit of 256 (it raises its soft limit to the hard one).
_LOW_FD_LIMIT = (
    "-c",
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
    "sys.argv = ['swarm', *sys.argv[1:]]; runpy.run_module('swarm.cli', run_name='__main__')",
)


def test_more_files_than_the_read_table_holds_are_read_correctly(site: Site) -> None:
    many = site.src / "many"
    many.mkdir()
    for i in range(400):
        (many / f"f{i}").write_bytes(f"file {i}\n".encode() * (i + 1))
    site.publish()
    with mount_launched_by(site, _LOW_FD_LIMIT) as m:
        for _ in range(2):
            for i in range(400):
                p = m.mountpoint / "many" / f"f{i}"
                drop_pages(p)
                assert p.read_bytes() == f"file {i}\n".encode() * (i + 1)
        assert counters(site)["read_c"] > 0


# `swarm mount` whose read table loses every entry as soon as it is registered:
# what a full table under many concurrent readers does to a few reads (another
# registration evicts the entry before the C side serves it).
_EVICTED_AT_ONCE = (
    "-c",
    "import runpy, sys; from cvmfs_like.fs import ReleaseOperations as R; r = R._register; "
    "R._register = lambda s, i, f: r(s, i, f) and (s.session.drop_fds(i), True)[1]; "
    "sys.argv = ['swarm', *sys.argv[1:]]; runpy.run_module('swarm.cli', run_name='__main__')",
)


def test_a_read_whose_descriptors_are_evicted_before_it_is_served_still_gets_its_bytes(
    site: Site,
) -> None:
    with mount_launched_by(site, _EVICTED_AT_ONCE) as m:
        for rel in ("lib/data.bin", "bin/hello"):
            p = m.mountpoint / rel
            drop_pages(p)
            assert p.read_bytes() == (site.src / rel).read_bytes()  # not EIO
        c = counters(site)
        assert c["read_py"] >= 2 and c["read_c"] == 0  # each answered by Python
